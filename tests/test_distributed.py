"""The Ray executor with a real local Ray instance: the same vectors and checkpoints as the sequential executor,
the cascade order, a worker killed mid-cell, a driver killed mid-run, and the errors a user can meet."""
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import load_file

from harness import spec as spec_module
from harness.evaluation import SequentialExecutor
from harness.matrix import run
from harness.planning import plan
from harness.store import ResultStore

ray = pytest.importorskip("ray")
from harness.distributed import RayExecutor  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SPEC = """
[benchmark]
name = "tiny-ray"
dataset = "mnist5k"
seed = 0
eval_examples = 60
batch_size = 25
cascade = true
rank_by = ["linf", 0.3]

[eps]
linf = [0.1, 0.3]
l2 = [1.5]

[defenses.natural]
recipe = "natural"
epochs = 1

[defenses.fgsm-at]
recipe = "fgsm-at"
epochs = 1

[attacks.fgsm]
attack = "fgsm"

[attacks.pgd]
attack = "pgd-linf"
steps = {steps}

[attacks.pgd-l2]
attack = "pgd-l2"
steps = 5

[attacks.transfer]
attack = "pgd-linf"
steps = 5
source = "natural"

[checks.restart-sweep]
restarts = 2
steps = 5
examples = 30

[transfer]                    # a cell that loads three models: its source and both targets travel to the worker
models = ["natural", "fgsm-at"]
attacks = ["fgsm"]
eps = [0.1]
"""


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture()
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_spec(folder: Path, steps: int = 5) -> Path:
    path = folder / "tiny-ray.toml"
    path.write_text(SPEC.replace("{steps}", str(steps)))
    return path


def vectors(store) -> dict:
    """Every stored cell's outcome vectors and measurements, bit for bit."""
    return {key: (r.clean_correct.tolist(), r.adv_correct.tolist(),
                  {name: np.asarray(value).tobytes() for name, value in r.measurements.items()})
            for key, r in store.cells().items()}


class Recording:
    """Wraps an executor's map: the order cells come back (= the order they are stored)."""

    def __init__(self, executor):
        self.executor, self.stored = executor, []

    def __getattr__(self, name):
        return getattr(self.executor, name)

    def map(self, runner, cells):
        for cell, outcome in self.executor.map(runner, cells):
            yield cell, outcome
            self.stored.append(cell.key)  # the driver has written it when it asks for the next


def test_ray_gives_the_sequential_vectors_and_checkpoints_and_keeps_the_cascade(local_ray, one_thread, tmp_path, mnist):
    spec = spec_module.load(write_spec(tmp_path))
    with ResultStore(tmp_path / "sequential.sqlite") as store:
        summary = run(spec, store=store, cache_dir=tmp_path / "ckpt-seq", device=torch.device("cpu"), progress=False,
                      data=mnist, executor=SequentialExecutor())
        sequential = vectors(store)
    assert summary.failed == [] and summary.computed == len(sequential) == summary.planned
    executor = Recording(RayExecutor(threads=1, max_in_flight=4))
    with ResultStore(tmp_path / "ray.sqlite") as store:
        summary = run(spec, store=store, cache_dir=tmp_path / "ckpt-ray", device=torch.device("cpu"), progress=False,
                      data=mnist, executor=executor)
        distributed = vectors(store)
        seconds = {key: record.seconds for key, record in store.cells().items()}
    assert summary.failed == [] and summary.computed == summary.planned
    assert distributed == sequential  # same keys (checkpoints included in them) and the same bits
    trained = sorted((tmp_path / "ckpt-seq").glob("*.safetensors"))
    assert len(trained) == 2
    for weights in trained:  # trained in a Ray task, written by the driver; the same file name is the same key
        ours, theirs = load_file(weights), load_file(tmp_path / "ckpt-ray" / weights.name)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    position = {key: i for i, key in enumerate(executor.stored)}
    cells = {cell.key: cell for cell in plan(spec, mnist)}
    for key, cell in cells.items():  # a cell never comes back before the cells it builds on were stored
        assert all(position[before] < position[key] for before in (*cell.after, *([cell.reuses] if cell.reuses else [])))
    timings = executor.timings  # the task body holds the attack (the stored seconds); Ray's part is what is left
    assert sorted(t.cell for t in timings) == sorted(seconds) and any(t.worker_free for t in timings)
    assert all(seconds[t.cell] <= t.body and 0 <= t.overhead < t.round_trip for t in timings)
    assert "submitted to a free worker" in executor.overhead_summary()


def _kill_first_cell_worker(killed: list, stop: threading.Event) -> None:
    """Find a Ray worker process running a cell (Ray titles it ray::_cell_task) and kill it, once."""
    while not stop.is_set() and not killed:
        for process in psutil.process_iter(["pid", "cmdline"]):
            cmdline = " ".join(process.info["cmdline"] or [])
            if cmdline.startswith("ray::_cell_task"):
                time.sleep(0.2)  # well inside the cell
                try:
                    process.send_signal(signal.SIGKILL)
                    killed.append(process.info["pid"])
                except psutil.NoSuchProcess:
                    continue
                return
        time.sleep(0.05)


@pytest.mark.parametrize("retries", [3, 0])
def test_a_worker_killed_mid_cell_is_retried_and_every_cell_is_stored_once(local_ray, one_thread, tmp_path, mnist, retries):
    """With retries the run finishes with every cell stored once; without, the killed cell (and what builds on
    it) fails as a cell, reported like any other failure, and the run still finishes."""
    spec = spec_module.load(write_spec(tmp_path, steps=400))  # PGD cells long enough to be caught running
    killed, stop = [], threading.Event()
    watcher = threading.Thread(target=_kill_first_cell_worker, args=(killed, stop), daemon=True)
    with ResultStore(tmp_path / "ray.sqlite") as store:
        watcher.start()
        try:
            summary = run(spec, store=store, cache_dir=tmp_path / "ckpt", device=torch.device("cpu"), progress=False,
                          data=mnist, executor=RayExecutor(threads=1, max_retries=retries))
        finally:
            stop.set()
            watcher.join()
        stored = store.cells()
    assert killed, "no cell task was seen running"
    rows = sqlite3.connect(tmp_path / "ray.sqlite").execute("SELECT COUNT(*), COUNT(DISTINCT key) FROM cells").fetchone()
    assert rows[0] == rows[1] == len(stored) == summary.computed
    if retries:
        assert summary.failed == [] and summary.computed == summary.planned
    else:
        assert summary.failed and summary.computed + len(summary.failed) == summary.planned
        assert any("WorkerCrashedError after 0 retries" in reason for _, reason in summary.failed)


def test_a_killed_driver_resumes_from_the_store_recomputing_nothing(tmp_path):
    spec = write_spec(tmp_path, steps=200)
    home = tmp_path / "home"
    command = [sys.executable, "-m", "harness", "run", str(spec), "--home", str(home), "--out", str(tmp_path / "boards"),
               "--executor", "ray", "--threads", "1", "--no-progress"]
    driver = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    database, before = home / "results.sqlite", []
    deadline = time.time() + 300
    while time.time() < deadline and driver.poll() is None:
        if database.exists():
            try:
                before = sqlite3.connect(database).execute("SELECT key, finished_at FROM cells").fetchall()
            except sqlite3.OperationalError:  # the schema is being created
                before = []
            if len(before) >= 3:
                break
        time.sleep(0.2)
    ray_processes = psutil.Process(driver.pid).children(recursive=True)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    for process in ray_processes:  # the local instance the killed driver had started
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    assert len(before) >= 3, driver.stdout.read().decode()[-2000:]
    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    after = dict(sqlite3.connect(database).execute("SELECT key, finished_at FROM cells").fetchall())
    rows = sqlite3.connect(database).execute("SELECT COUNT(*), COUNT(DISTINCT key) FROM cells").fetchone()
    assert rows[0] == rows[1] == len(after) > len(before)
    assert all(after[key] == when for key, when in before)  # stored before the kill: not computed again
    assert "already in the store" in finished.stdout


def test_missing_ray_or_an_unreachable_cluster_is_a_clear_error_naming_the_flag(tmp_path):
    spec = write_spec(tmp_path)
    base = [sys.executable, "-c", "import sys; sys.modules['ray'] = None; from harness.__main__ import main; "
            "sys.exit(main(sys.argv[1:]))", "run", str(spec), "--home", str(tmp_path / "h"), "--executor", "ray"]
    missing = subprocess.run(base, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "--executor ray needs Ray" in missing.stderr and "Traceback" not in missing.stderr
    command = [sys.executable, "-m", "harness", "run", str(spec), "--home", str(tmp_path / "h"), "--executor", "ray",
               "--ray-address", "127.0.0.1:1"]
    unreachable = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert unreachable.returncode == 2 and "--ray-address '127.0.0.1:1'" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr
    flag_alone = subprocess.run(command[:-4] + ["--ray-address", "auto"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert flag_alone.returncode == 2 and "need --executor ray" in flag_alone.stderr
