"""The Ray executor: defenses train and cells run as Ray tasks, on a local instance or an existing cluster.

The driver (`matrix.run`) still writes the store alone, one transaction per cell; Ray only computes. Nothing
assumes a shared file system: the data set, the benchmark and each model's weights go into Ray's object store
once; a training task sends the safetensors bytes and the log back, and the driver writes the checkpoint cache
and checks the bytes' sha256. A cell is submitted only when every cell it builds on (its cascade predecessors, a
column it reuses) has been stored, and it gets their records with it. At most `max_in_flight` tasks run at once.

Same numbers: every task sets torch's intra-op threads to the run's thread count (`threads`), which is part of
every checkpoint key, because CPU kernels split reductions by thread and 1 and 2 threads give different bits.
A worker process that dies mid-task is retried by Ray (`max_retries`); an attack that raises fails its cell only.
Ray is imported only here, and only when this executor is asked for.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
import statistics
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from harness.cells import Cell
from harness.data import Dataset
from harness.spec import BenchmarkSpec

MISSING_RAY = ("--executor ray needs Ray, which is not installed: pip install 'robustness-harness[ray]' "
               "(or pip install ray==2.60.0)")


def import_ray():
    try:
        import ray
    except ImportError:
        raise RuntimeError(MISSING_RAY) from None
    return ray


@dataclasses.dataclass(frozen=True)
class TaskTiming:
    """One cell's round trip as the driver saw it (submitted to collected) and the seconds its task body ran in the
    worker (weights, model, clean pass and attack). The difference is Ray's part: scheduling, moving arguments and
    the result, and, when every worker was busy at submission (`worker_free` False), the wait in Ray's queue."""
    cell: str
    round_trip: float
    body: float
    worker_free: bool

    @property
    def overhead(self) -> float:
        return self.round_trip - self.body


@dataclasses.dataclass(frozen=True)
class _Timed:
    """What a cell task returns: its result and how long its body ran, measured in the worker."""
    result: object
    seconds: float


class RayExecutor:
    """Runs training and cells as Ray tasks: `address` None starts a local instance sized to this machine,
    otherwise connects ('auto', 'ray://host:port'). `threads`: torch threads (and Ray CPUs) per task;
    `gpus`: GPUs per task (fractions share one GPU); `max_in_flight`: tasks submitted and not yet collected."""

    def __init__(self, *, address: str | None = None, threads: int = 1, gpus: float = 0.0,
                 max_in_flight: int | None = None, max_retries: int = 3):
        if threads < 1:
            raise ValueError(f"threads per task must be >= 1, got {threads}")
        if gpus < 0:
            raise ValueError(f"GPUs per task must be >= 0, got {gpus}")
        self.address, self.threads, self.gpus, self.max_retries = address, threads, gpus, max_retries
        self.max_in_flight = max_in_flight
        self.ray = import_ray()
        torch.set_num_threads(threads)  # the driver computes the checkpoint keys with its own count: the tasks'.
        self._started = self._owner = False
        self._spec_ref = self._data_ref = self._shared_for = None
        self.timings: list[TaskTiming] = []  # per computed cell: what Ray's part of its round trip cost

    # --- the Ray instance ---------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._started or self.ray.is_initialized():
            self._started = True
            return
        options = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        try:
            if self.address is None:
                self.ray.init(num_cpus=os.cpu_count(), **options)
            else:
                _reachable(self.address)  # Ray itself retries an absent head for minutes before giving up
                self.ray.init(address=self.address, **options)
        except (ConnectionError, TimeoutError, RuntimeError, ValueError, OSError) as error:
            raise RuntimeError(f"--ray-address {self.address!r}: cannot connect to a Ray cluster there ({error}); "
                               "give 'auto' for the cluster this machine belongs to, ray://host:port for a remote "
                               "one, or leave the flag out for a local instance") from None
        self._owner = True
        self._started = True

    def close(self) -> None:
        """Disconnect; a local instance this executor started stops with it."""
        if self._owner and self.ray.is_initialized():
            self.ray.shutdown()
        self._started = self._owner = False

    def overhead_summary(self) -> str:
        """Ray's part of a cell's round trip (median, ms): over the cells submitted while a worker was free, Ray's own
        cost per task; over every cell, with the waits in Ray's queue that the in-flight limit allows."""
        free = [t.overhead for t in self.timings if t.worker_free]
        every = [t.overhead for t in self.timings]
        text = "Ray overhead per cell (round trip minus the task's own run time), median "
        if free:
            text += f"{1000 * statistics.median(free):.1f} ms over the {len(free)} cells submitted to a free worker, "
        return text + f"{1000 * statistics.median(every):.1f} ms over all {len(every)} (queue waits included)"

    def _in_flight_limit(self) -> int:
        if self.max_in_flight is not None:
            return max(1, self.max_in_flight)
        return max(2, 2 * self._cluster_cpus() // self.threads)

    def _cluster_cpus(self) -> int:
        return int(self.ray.cluster_resources().get("CPU", 1))

    def _options(self) -> dict:
        return {"num_cpus": self.threads, "num_gpus": self.gpus, "max_retries": self.max_retries}

    def _shared(self, spec: BenchmarkSpec, data: Dataset) -> None:
        """The benchmark and data set in the object store, once per (spec, data) pair."""
        if self._shared_for != (id(spec), id(data)):
            self._spec_ref, self._data_ref = self.ray.put(spec), self.ray.put(data)
            self._shared_for = (id(spec), id(data))

    # --- training -------------------------------------------------------------------------------------------------
    def train(self, spec: BenchmarkSpec, names: Iterable[str], data: Dataset, *, cache_dir: Path, device: torch.device,
              failed: dict[str, str]) -> None:
        """Train every named recipe (and the ensemble sources it needs) whose checkpoint is not in the cache, in
        parallel tasks; an ensemble is submitted once its sources are in the cache. The driver writes each entry."""
        from defenses.checkpoints import cached_checkpoint
        from harness.preparation import defense_keys

        self.start()
        self._shared(spec, data)
        keys = defense_keys(spec, data)
        by_name = spec.defenses_by_name
        wanted: list[str] = []

        def need(name: str) -> None:
            defense = by_name[name]
            if defense.recipe is None or name in wanted:
                return
            for source in defense.recipe.ensemble_sources:
                need(source)
            wanted.append(name)

        for name in names:
            need(name)
        todo = [n for n in wanted if cached_checkpoint(by_name[n].recipe, data, keys[n], cache_dir) is None]
        running: dict = {}
        remote = self.ray.remote(_train_task).options(**self._options())
        while todo or running:
            for name in [n for n in todo if not any(s in todo or s in running.values() for s in
                                                    by_name[n].recipe.ensemble_sources)]:
                sources = {s: (by_name[s].recipe, keys[s],
                               cached_checkpoint(by_name[s].recipe, data, keys[s], cache_dir).weights.read_bytes())
                           for s in by_name[name].recipe.ensemble_sources if s not in failed}
                if len(sources) < len(by_name[name].recipe.ensemble_sources):
                    failed[name] = "an ensemble source failed to train"
                else:
                    running[remote.remote(by_name[name].recipe, self._data_ref, spec.training_seed(by_name[name]),
                                          keys[name], sources, str(device), self.threads)] = name
                todo.remove(name)
            if not running:
                break
            done, _ = self.ray.wait(list(running), num_returns=1)
            name = running.pop(done[0])
            result = self._result(done[0])
            if isinstance(result, tuple) and len(result) == 2:  # the task died more often than Ray retries it
                failed[name] = result[0]
                continue
            if isinstance(result, str):  # the task's traceback: a recipe that cannot train
                failed[name] = result.strip().splitlines()[-1]
                continue
            _write_trained(by_name[name].recipe, data, keys[name], spec.training_seed(by_name[name]), result, cache_dir)

    def _result(self, ref):
        """A task's return value; (error text, '') when Ray gave up on it (its worker died on every retry)."""
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayError as error:
            return f"{type(error).__name__} after {self.max_retries} retries: {str(error).splitlines()[0]}", ""

    # --- cells ------------------------------------------------------------------------------------------------------
    def map(self, runner, cells: Iterable[Cell]) -> Iterator[tuple[Cell, object]]:
        """Yields (cell, outcome or the exception it raised) as tasks finish. The driver stores each outcome before
        it asks for the next, so a cell whose predecessors are all stored may be submitted then."""
        self.start()
        self._shared(runner.spec, runner.data)
        cells = list(cells)
        pending = {cell.key for cell in cells}
        waiting = list(cells)
        defenses = {name: self.ray.put(_portable(prepared)) for name, prepared in runner.defenses.items()}
        remote = self.ray.remote(_cell_task).options(**self._options())
        running: dict = {}
        limit = self._in_flight_limit()
        workers = max(1, self._cluster_cpus() // self.threads)
        while waiting or running:
            ready = [c for c in waiting if not (_needs(c) & pending)]
            for cell in ready[: max(0, limit - len(running))]:
                needed = list(_needs(cell))
                records = runner.finished(needed) if needed else {}
                names = cell.models
                # object refs resolve only as top-level arguments: the defenses' weights go last, one each
                ref = remote.remote(self._spec_ref, self._data_ref, str(runner.device), self.threads, cell, records,
                                    *(defenses[n] for n in names))
                running[ref] = (cell, time.perf_counter(), len(running) < workers)
                waiting.remove(cell)
            if not running:  # nothing can start: a predecessor is not in this run and not stored
                for cell in waiting:
                    yield cell, RuntimeError(f"{cell.describe()} waits for cells that are neither stored nor planned")
                return
            done, _ = self.ray.wait(list(running), num_returns=1)
            cell, submitted, worker_free = running.pop(done[0])
            result = self._result(done[0])
            if isinstance(result, _Timed):
                self.timings.append(TaskTiming(cell.key, time.perf_counter() - submitted, result.seconds, worker_free))
                result = result.result
            if isinstance(result, tuple):  # (exception text, traceback): the cell failed, the run goes on
                error = RuntimeError(result[0])
                error.traceback_text = result[1]
                outcome = error
            else:
                outcome = result
            pending.discard(cell.key)
            yield cell, outcome


def _reachable(address: str, timeout: float = 5.0) -> None:
    """A host:port head address must accept a TCP connection ('auto' and ray:// are Ray's own to resolve)."""
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError("not an address: give host:port, 'auto' or ray://host:port")
    with socket.create_connection((host, int(port)), timeout=timeout):
        pass


def _needs(cell: Cell) -> set[str]:
    """The cells this one reads: its cascade predecessors and the column it reuses."""
    return set(cell.after) | ({cell.reuses} if cell.reuses else set())


def _write_trained(recipe, data: Dataset, key: str, seed: int, result: tuple, cache_dir: Path) -> None:
    from defenses.checkpoints import write_checkpoint

    weights, sha256, log = result
    write_checkpoint(recipe, data, key=key, seed=seed, weights_bytes=weights, log=log, cache_dir=cache_dir, sha256=sha256)


def _portable(prepared):
    """What a worker needs of a prepared defense: its spec, key, training log and the weights' bytes."""
    return prepared.spec, prepared.key, prepared.training, Path(prepared.weights).read_bytes(), Path(prepared.weights).name


# --- the tasks (run in Ray worker processes) ---------------------------------------------------------------------------
_WORKER_FILES: dict[str, Path] = {}  # checkpoint key -> this worker's local copy of the weights
_WORKER_RUNNERS: dict = {}  # (benchmark, device, defenses) -> CellRunner: models load once per worker


def _train_task(recipe, data: Dataset, seed: int, key: str, sources: dict, device: str, threads: int):
    """Train one recipe; returns (safetensors bytes, their sha256, the log), or the traceback text."""
    torch.set_num_threads(threads)
    try:
        from defenses.checkpoints import checkpoint_bytes
        from defenses.train import build_recipe_model, train
        from safetensors.torch import load

        models = {}
        for name, (source_recipe, _, weights) in sources.items():
            model = build_recipe_model(source_recipe, data)
            model.load_state_dict(load(weights), strict=True)
            models[name] = model.to(device).eval()
        model, log = train(recipe, data, seed=seed, device=device, progress=False, sources=models)
        weights = checkpoint_bytes(recipe, key, model)
        return weights, hashlib.sha256(weights).hexdigest(), log.as_dict()
    except Exception:
        return traceback.format_exc()


def _local_weights(key: str, weights: bytes, filename: str) -> Path:
    if key not in _WORKER_FILES:
        folder = Path(tempfile.mkdtemp(prefix="harness-weights-"))
        (folder / filename).write_bytes(weights)
        _WORKER_FILES[key] = folder / filename
    return _WORKER_FILES[key]


def _cell_task(spec: BenchmarkSpec, data: Dataset, device: str, threads: int, cell: Cell, records: dict, *defenses):
    """Compute one cell; returns its CellOutcome, or (error text, traceback) when the cell raised, with the seconds
    the task ran (`_Timed`). `defenses`: the models the cell loads (`Cell.models`), as `_portable` packs them."""
    started = time.perf_counter()
    return _Timed(_compute_cell(spec, data, device, threads, cell, records, defenses), time.perf_counter() - started)


def _compute_cell(spec: BenchmarkSpec, data: Dataset, device: str, threads: int, cell: Cell, records: dict, defenses):
    from harness.evaluation import CellRunner
    from harness.preparation import PreparedDefense

    torch.set_num_threads(threads)
    try:
        prepared = {defense_spec.name: PreparedDefense(defense_spec, key, _local_weights(key, weights, filename), training)
                    for defense_spec, key, training, weights, filename in defenses}
        identity = (spec.name, device, tuple(sorted((name, p.key) for name, p in prepared.items())))
        runner = _WORKER_RUNNERS.get(identity)
        if runner is None:
            runner = _WORKER_RUNNERS[identity] = CellRunner(spec, data, prepared, torch.device(device))
        runner.finished = _given(records)
        return runner(cell)
    except Exception as error:
        return f"{type(error).__name__}: {error}", traceback.format_exc()


def _given(records: dict) -> Callable[[list[str]], dict]:
    return lambda keys: {key: records[key] for key in keys if key in records}

