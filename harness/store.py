"""The results store: SQLite, one row per finished cell with its per-example outcome vectors.

A cell is written in one transaction, so an interrupted run keeps every finished cell and no half
cell. Aggregates (accuracies, worst cases) are computed from the stored vectors, never stored.

Nothing is lost silently: each cell carries a checksum of its outcome vectors and measurements, verified on
every read; a file that exists but holds no store (emptied, or some other file) is refused unless the caller
asks to start over; a damaged file is reported with its path and what to do; and one run at a time holds the
store (a lock file beside it), so a second run on the same home stops at once instead of redoing the work.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
from pathlib import Path

import numpy as np

from harness.records import CellRecord

SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
    key            TEXT PRIMARY KEY,
    benchmark      TEXT NOT NULL,
    defense        TEXT NOT NULL,
    defense_key    TEXT NOT NULL,
    attack         TEXT NOT NULL,   -- the benchmark's column label; 'clean' for the clean evaluation
    attack_id      TEXT NOT NULL,
    options        TEXT NOT NULL,   -- JSON of the attack's options
    norm           TEXT NOT NULL,
    eps            REAL NOT NULL,
    examples       INTEGER NOT NULL,
    clean_correct  BLOB NOT NULL,   -- numpy.packbits of the per-example booleans
    adv_correct    BLOB NOT NULL,
    seconds        REAL NOT NULL,
    forward_evals  INTEGER NOT NULL,
    gradient_evals INTEGER NOT NULL,
    seed           INTEGER NOT NULL,
    versions       TEXT NOT NULL,   -- JSON: python, torch, art, torchattacks, numpy
    git_commit     TEXT NOT NULL,
    device         TEXT NOT NULL,
    finished_at    TEXT NOT NULL,
    measurements   BLOB,             -- safetensors bytes of a probe's per-example arrays; NULL for attack cells
    checksum       TEXT              -- sha256 of every other column of the row (see `_checksum`)
);
CREATE TABLE IF NOT EXISTS defenses (
    key        TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    kind       TEXT NOT NULL,      -- 'trained' or 'external'
    description TEXT NOT NULL,     -- JSON: recipe, or factory + weights
    training   TEXT NOT NULL       -- JSON: training log (cost, per-epoch metrics); {} for external
);
"""


COLUMNS = ("key", "benchmark", "defense", "defense_key", "attack", "attack_id", "options", "norm", "eps", "examples",
           "clean_correct", "adv_correct", "seconds", "forward_evals", "gradient_evals", "seed", "versions",
           "git_commit", "device", "finished_at", "measurements", "checksum")


def pack(vector: np.ndarray) -> bytes:
    return np.packbits(np.asarray(vector, dtype=bool)).tobytes()


def unpack(blob: bytes, length: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(blob, dtype=np.uint8), count=length).astype(bool)


def pack_measurements(arrays: dict[str, np.ndarray]) -> bytes | None:
    """safetensors bytes (never pickle) of named numeric arrays; None when there are none."""
    if not arrays:
        return None
    from safetensors.numpy import save

    return save({name: np.ascontiguousarray(value) for name, value in arrays.items()})


def unpack_measurements(blob: bytes | None) -> dict[str, np.ndarray]:
    if blob is None:
        return {}
    from safetensors.numpy import load

    return dict(load(bytes(blob)))


def _checksum(values: tuple) -> str:
    """sha256 over every stored column of a cell but the checksum itself: outcome vectors, measurements, identity,
    cost and provenance alike."""
    digest = hashlib.sha256()
    for value in values:
        data = bytes(value) if isinstance(value, (bytes, memoryview)) else repr(value).encode()
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


class StoreError(RuntimeError):
    """The store cannot be used as it is; the message names the file and what to do."""


class ResultStore:
    """SQLite store of cells; only the matrix driver writes to it. `start_over`: replace a file that holds no store.
    `lock`: hold the store's lock file while open (the runner does; readers need not)."""

    def __init__(self, path: str | Path, *, start_over: bool = False, lock: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = self._acquire_lock() if lock else None
        try:
            self._open(start_over)
        except BaseException:
            self._release_lock()
            raise

    def _acquire_lock(self):
        handle = open(self.path.with_name(self.path.name + ".lock"), "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise StoreError(f"{self.path}: another run is using this results store ({holder}); wait for it to "
                             "finish, or give this run its own --home") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        return handle

    def _release_lock(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def _open(self, start_over: bool) -> None:
        exists = self.path.exists()
        self._conn = sqlite3.connect(str(self.path))
        try:
            tables = {row[0] for row in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if exists and "cells" not in tables:
                if not start_over:
                    self._conn.close()
                    size = self.path.stat().st_size
                    raise StoreError(
                        f"{self.path} exists but holds no results store ({size} bytes, no cells table): it may have "
                        "been emptied or overwritten, and its cells would be lost silently. Restore it from a backup, "
                        "or pass --start-over to begin a new store in its place")
                self._conn.close()
                self.path.unlink()
                self._conn = sqlite3.connect(str(self.path))
            self._conn.executescript(SCHEMA)
            columns = {row[1] for row in self._conn.execute("PRAGMA table_info(cells)")}
            for column, kind in (("measurements", "BLOB"), ("checksum", "TEXT")):  # stores older than the column
                if column not in columns:
                    with self._conn:
                        self._conn.execute(f"ALTER TABLE cells ADD COLUMN {column} {kind}")
        except sqlite3.DatabaseError as error:
            self._conn.close()
            raise self._damaged(error) from None

    def _damaged(self, error: sqlite3.DatabaseError) -> StoreError:
        return StoreError(f"{self.path} is damaged ({error}). Its finished cells may be recoverable with "
                          f"`sqlite3 {self.path} .recover | sqlite3 recovered.sqlite`; or move it aside and run "
                          "again to recompute every cell")

    def _query(self, sql: str, parameters=()) -> list:
        try:
            return self._conn.execute(sql, parameters).fetchall()
        except sqlite3.DatabaseError as error:
            raise self._damaged(error) from None

    def close(self) -> None:
        self._conn.close()
        self._release_lock()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def has(self, key: str) -> bool:
        return bool(self._query("SELECT 1 FROM cells WHERE key = ?", (key,)))

    def write_cell(self, record: CellRecord) -> None:
        """Insert one finished cell in its own transaction; a key already present is an error."""
        if len(record.clean_correct) != len(record.adv_correct):
            raise ValueError("clean and adversarial outcome vectors differ in length")
        values = (record.key, record.benchmark, record.defense, record.defense_key, record.attack, record.attack_id,
                  json.dumps(record.options, sort_keys=True), record.norm, float(record.eps), len(record.clean_correct),
                  pack(record.clean_correct), pack(record.adv_correct), float(record.seconds),
                  int(record.forward_evals), int(record.gradient_evals), int(record.seed),
                  json.dumps(record.versions, sort_keys=True), record.git_commit, record.device, record.finished_at,
                  pack_measurements(record.measurements))
        with self._conn:
            self._conn.execute(f"INSERT INTO cells ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                               values + (_checksum(values),))

    def cells(self, keys: list[str] | None = None) -> dict[str, CellRecord]:
        """Stored cells by key (all of them, or those among `keys` that exist)."""
        select = f"SELECT {', '.join(COLUMNS)} FROM cells"
        rows = self._query(select) if keys is None else [
            row for key in keys for row in self._query(select + " WHERE key = ?", (key,))
        ]
        out = {}
        for row in rows:
            (key, benchmark, defense, defense_key, attack, attack_id, options, norm, eps, examples, clean, adv,
             seconds, forward, gradient, seed, versions, commit, device, finished, measurements, checksum) = row
            if checksum is not None and checksum != _checksum(row[:-1]):
                raise StoreError(
                    f"{self.path}: cell {defense} / {attack} (eps {eps:g}, key {key}) fails its checksum: it was "
                    "changed after it was written (outcome vectors, cost or provenance). Delete that cell to recompute it: "
                    f"sqlite3 {self.path} \"DELETE FROM cells WHERE key = '{key}'\"")
            out[key] = CellRecord(key, benchmark, defense, defense_key, attack, attack_id, json.loads(options), norm, eps,
                                  unpack(clean, examples), unpack(adv, examples), seconds, forward, gradient, seed,
                                  json.loads(versions), commit, device, finished, unpack_measurements(measurements))
        return out

    def count(self) -> int:
        return self._query("SELECT COUNT(*) FROM cells")[0][0]

    def write_defense(self, key: str, name: str, kind: str, description: dict, training: dict) -> None:
        with self._conn:
            self._conn.execute("INSERT OR REPLACE INTO defenses VALUES (?,?,?,?,?)",
                               (key, name, kind, json.dumps(description, sort_keys=True, default=str),
                                json.dumps(training, sort_keys=True)))

    def defense(self, key: str) -> dict | None:
        rows = self._query("SELECT name, kind, description, training FROM defenses WHERE key = ?", (key,))
        if not rows:
            return None
        row = rows[0]
        return {"name": row[0], "kind": row[1], "description": json.loads(row[2]), "training": json.loads(row[3])}
