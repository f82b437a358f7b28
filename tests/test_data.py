import gzip
import struct

import numpy as np
import pytest
import torch

from harness.data import load_dataset, read_idx


def test_mnist5k_is_the_embedded_default(mnist):
    assert mnist.x_train.shape == (4000, 1, 28, 28) and mnist.x_test.shape == (1000, 1, 28, 28)
    assert mnist.x_train.dtype == torch.float32 and mnist.y_train.dtype == torch.int64
    assert 0.0 == float(mnist.x_train.min()) and float(mnist.x_train.max()) == 1.0
    assert torch.bincount(mnist.y_test).tolist() == [100] * 10
    assert torch.bincount(mnist.y_train).tolist() == [400] * 10
    assert load_dataset("mnist5k").fingerprint == mnist.fingerprint  # fixed split seed


def write_idx(path, array: np.ndarray, compress: bool):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_reads_idx_files(tmp_path, compress):
    rng = np.random.default_rng(0)
    images = {"train": rng.integers(0, 256, (6, 28, 28)), "t10k": rng.integers(0, 256, (4, 28, 28))}
    labels = {"train": np.arange(6) % 10, "t10k": np.array([3, 1, 4, 1])}
    suffix = ".gz" if compress else ""
    for split in ("train", "t10k"):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte{suffix}", images[split], compress)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte{suffix}", labels[split], compress)
    data = load_dataset("mnist", data_dir=str(tmp_path))
    assert data.x_train.shape == (6, 1, 28, 28) and data.x_test.shape == (4, 1, 28, 28)
    assert torch.allclose(data.x_test[2, 0], torch.tensor(images["t10k"][2] / 255.0, dtype=torch.float32))
    assert data.y_test.tolist() == [3, 1, 4, 1]


def test_mnist_names_the_missing_files(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((1, 28, 28)), False)
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("mnist", data_dir=str(tmp_path))
    message = str(info.value)
    assert "train-labels-idx1-ubyte" in message and "t10k-images-idx3-ubyte" in message
    assert "train-images-idx3-ubyte[" not in message


def test_mnist_needs_a_data_dir():
    with pytest.raises(ValueError, match="data_dir"):
        load_dataset("mnist")


def test_idx_with_bad_magic_or_length_is_rejected(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00\x00\x00\x00")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(struct.pack(">BBBBI", 0, 0, 8, 1, 5) + b"\x01\x02")
    with pytest.raises(ValueError, match="promises 5 bytes"):
        read_idx(tmp_path / "short")


def write_cifar_batch(path, labels, rng):
    records = [np.concatenate([[label], rng.integers(0, 256, 3072)]) for label in labels]
    np.asarray(records, dtype=np.uint8).tofile(path)


def test_cifar10_reads_the_binary_distribution(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    for i in range(1, 6):
        write_cifar_batch(folder / f"data_batch_{i}.bin", [i, (i + 1) % 10], rng)
    write_cifar_batch(folder / "test_batch.bin", [7, 8, 9], rng)
    data = load_dataset("cifar10", data_dir=str(tmp_path))
    assert data.x_train.shape == (10, 3, 32, 32) and data.x_test.shape == (3, 3, 32, 32)
    assert data.y_train.tolist()[:4] == [1, 2, 2, 3] and data.y_test.tolist() == [7, 8, 9]
    raw = np.fromfile(folder / "test_batch.bin", dtype=np.uint8).reshape(3, 3073)
    assert torch.allclose(data.x_test[1], torch.tensor(raw[1, 1:].reshape(3, 32, 32) / 255.0, dtype=torch.float32))


def test_cifar10_names_the_missing_files_and_never_reads_pickles(tmp_path):
    (tmp_path / "data_batch_1").write_bytes(b"pickled")  # the python distribution's name: ignored
    with pytest.raises(FileNotFoundError, match="data_batch_1.bin.*test_batch.bin.*binary distribution"):
        load_dataset("cifar10", data_dir=str(tmp_path))
