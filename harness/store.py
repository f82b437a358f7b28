"""The results store: SQLite, one row per finished cell with its per-example outcome vectors.

A cell is written in one transaction, so an interrupted run keeps every finished cell and no half
cell. Aggregates (accuracies, worst cases) are computed from the stored vectors, never stored.
"""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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
    measurements   BLOB              -- safetensors bytes of a probe's per-example arrays; NULL for attack cells
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
           "git_commit", "device", "finished_at", "measurements")


@dataclass(frozen=True)
class CellRecord:
    """A stored cell: identity, outcome vectors and cost."""

    key: str
    benchmark: str
    defense: str
    defense_key: str
    attack: str
    attack_id: str
    options: dict
    norm: str
    eps: float
    clean_correct: np.ndarray
    adv_correct: np.ndarray
    seconds: float
    forward_evals: int
    gradient_evals: int
    seed: int
    versions: dict
    git_commit: str
    device: str
    finished_at: str
    measurements: dict[str, np.ndarray] = field(default_factory=dict)  # a probe's named arrays (sanity checks)

    @property
    def robust_correct(self) -> np.ndarray:
        """Correct on the clean input and on its adversarial version."""
        return self.clean_correct & self.adv_correct

    @property
    def robust_accuracy(self) -> float:
        """Robust accuracy in %: the share of examples correct both clean and under the attack."""
        return 100 * float(self.robust_correct.mean())


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


class ResultStore:
    """SQLite store of cells; only the matrix driver writes to it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(self.path))
        self._conn.executescript(SCHEMA)
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(cells)")}
        if "measurements" not in columns:  # a store written before probes existed: keep its cells, add the column
            with self._conn:
                self._conn.execute("ALTER TABLE cells ADD COLUMN measurements BLOB")

    def close(self) -> None:
        self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def has(self, key: str) -> bool:
        return self._conn.execute("SELECT 1 FROM cells WHERE key = ?", (key,)).fetchone() is not None

    def write_cell(self, record: CellRecord) -> None:
        """Insert one finished cell in its own transaction; a key already present is an error."""
        if len(record.clean_correct) != len(record.adv_correct):
            raise ValueError("clean and adversarial outcome vectors differ in length")
        with self._conn:
            self._conn.execute(
                f"INSERT INTO cells ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                (record.key, record.benchmark, record.defense, record.defense_key, record.attack, record.attack_id,
                 json.dumps(record.options, sort_keys=True), record.norm, float(record.eps), len(record.clean_correct),
                 pack(record.clean_correct), pack(record.adv_correct), float(record.seconds),
                 int(record.forward_evals), int(record.gradient_evals), int(record.seed),
                 json.dumps(record.versions, sort_keys=True), record.git_commit, record.device, record.finished_at,
                 pack_measurements(record.measurements)),
            )

    def cells(self, keys: list[str] | None = None) -> dict[str, CellRecord]:
        """Stored cells by key (all of them, or those among `keys` that exist)."""
        select = f"SELECT {', '.join(COLUMNS)} FROM cells"
        rows = self._conn.execute(select).fetchall() if keys is None else [
            row for key in keys for row in self._conn.execute(select + " WHERE key = ?", (key,)).fetchall()
        ]
        out = {}
        for row in rows:
            (key, benchmark, defense, defense_key, attack, attack_id, options, norm, eps, examples, clean, adv,
             seconds, forward, gradient, seed, versions, commit, device, finished, measurements) = row
            out[key] = CellRecord(key, benchmark, defense, defense_key, attack, attack_id, json.loads(options), norm, eps,
                                  unpack(clean, examples), unpack(adv, examples), seconds, forward, gradient, seed,
                                  json.loads(versions), commit, device, finished, unpack_measurements(measurements))
        return out

    def count(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM cells").fetchone()[0]

    def write_defense(self, key: str, name: str, kind: str, description: dict, training: dict) -> None:
        with self._conn:
            self._conn.execute("INSERT OR REPLACE INTO defenses VALUES (?,?,?,?,?)",
                               (key, name, kind, json.dumps(description, sort_keys=True, default=str),
                                json.dumps(training, sort_keys=True)))

    def defense(self, key: str) -> dict | None:
        row = self._conn.execute("SELECT name, kind, description, training FROM defenses WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        return {"name": row[0], "kind": row[1], "description": json.loads(row[2]), "training": json.loads(row[3])}
