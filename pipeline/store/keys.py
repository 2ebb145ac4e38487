"""A set of ids too large for memory, for anti-joins: which of this batch does the store hold?

Re-scanning the store's ids for every batch a writer adds is quadratic at D3 size (11.5M ids, a
scan per 40k-row batch). `KeySet` scans once: the ids of a query, reduced to 128-bit keys (the MD5
of the id: the ids are SHA-256 hex, so equal keys mean equal ids), sorted by DuckDB (which spills
beyond its memory limit) into a file that is memory-mapped. A batch is then looked up by binary
search (O(batch · log N), pages of the file cache, not process memory); keys added since the scan
wait in a small sorted array that is merged into the file when it reaches `DELTA_MAX` keys.
Anonymous memory stays at the batch plus the delta (16 MB), whatever the store's size.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import TracebackType

import duckdb
import numpy as np
import pyarrow as pa

from pipeline.store import catalog
from pipeline.store.atomic import pid_alive
from pipeline.store.layout import Store

KEY = "S16"
KEY_BYTES = 16
DELTA_MAX = 1 << 20  # keys held in memory before they are merged into the file (16 MB)
DUCKDB_MEMORY = "512MB"  # the sort that builds a set spills beyond this
_MERGE_BLOCK = 1 << 22


def key_sql(column: str) -> str:
    """The SQL for one id's key: the MD5 of its text (any id, hex or not, gets 16 bytes)."""
    return f"unhex(md5({column}))"


def scratch_dir(root: Path) -> Path:
    """A directory for this process's key files under `root/cache` (the store's disk, not /tmp,
    which may be RAM); directories of dead processes are removed first."""
    cache = root / "cache"
    for old in cache.glob("keys-*") if cache.exists() else ():
        pid = old.name.removeprefix("keys-")
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    directory = cache / f"keys-{os.getpid()}"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


class KeySet:
    """Sorted 128-bit keys in a memory-mapped file plus a small sorted in-memory delta."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._base = _map(path)
        self._delta = np.empty(0, KEY)

    @classmethod
    def from_query(cls, con: duckdb.DuckDBPyConnection, sql: str, path: Path, spill: Path) -> KeySet:
        """The distinct ids of `sql` (one VARCHAR column; NULLs ignored) as a set stored at `path`."""
        con.execute(f"SET memory_limit = '{DUCKDB_MEMORY}'")
        con.execute(f"SET temp_directory = '{str(spill).replace(chr(39), chr(39) * 2)}'")
        reader = con.sql(f"SELECT DISTINCT {key_sql('id')} AS k FROM ({sql}) AS q(id) WHERE id IS NOT NULL "
                         "ORDER BY k").to_arrow_reader(1 << 16)
        with open(path, "wb") as f:
            for batch in reader:
                f.write(_keys(batch.column(0)).tobytes())
        return cls(path)

    def __len__(self) -> int:
        return len(self._base) + len(self._delta)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """A mask: which of `keys` the set holds."""
        return _member(self._base, keys) | _member(self._delta, keys)

    def add(self, keys: np.ndarray) -> None:
        """Add keys (duplicates and keys already held are fine)."""
        fresh = keys[~self.contains(keys)]
        if not len(fresh):
            return
        self._delta = np.union1d(self._delta, fresh).astype(KEY)
        if len(self._delta) >= DELTA_MAX:
            self._merge()

    def _merge(self) -> None:
        """Write base ∪ delta to a new file, block by block, and map it in place of the old one."""
        base, delta = self._base, self._delta
        merged = self.path.with_name(self.path.name + ".next")
        total = len(base) + len(delta)
        target = np.memmap(merged, KEY, "w+", shape=(total,))
        ins = np.searchsorted(base, delta)  # base keys before each delta key
        target[ins + np.arange(len(delta))] = delta
        for start in range(0, len(base), _MERGE_BLOCK):
            idx = np.arange(start, min(len(base), start + _MERGE_BLOCK))
            target[idx + np.searchsorted(ins, idx, side="right")] = base[start:idx[-1] + 1]
        target.flush()
        del target
        os.replace(merged, self.path)
        self._base, self._delta = _map(self.path), np.empty(0, KEY)


class StoreKeys:
    """Key sets of queries over a store's views (name → SQL of one id column), each built on first
    use: one scan per run, whatever the number of batches looked up. A context manager: the files
    are removed at its end."""

    def __init__(self, store: Store, queries: dict[str, str]) -> None:
        self.store, self.queries = store, queries
        self.sets: dict[str, KeySet] = {}
        self.directory: Path | None = None

    def get(self, name: str) -> KeySet:
        if name not in self.sets:
            self.directory = self.directory or scratch_dir(self.store.root)
            with catalog.connect(self.store) as con:
                self.sets[name] = KeySet.from_query(con, self.queries[name], self.directory / f"{name}.keys",
                                                    self.directory)
        return self.sets[name]

    def __enter__(self) -> StoreKeys:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.sets.clear()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


def keys_of(ids: pa.Array | pa.ChunkedArray | pa.Table, expression: str = "id") -> np.ndarray:
    """The keys of ids (or of an SQL expression over a table's columns, such as the one a set was
    built from), computed by the same SQL the sets are built with."""
    table = ids if isinstance(ids, pa.Table) else pa.table({"id": ids})
    with duckdb.connect() as con:
        con.execute("SET threads = 2")
        con.register("ids", table)
        out = con.sql(f"SELECT {key_sql(expression)} FROM ids").to_arrow_table().column(0).combine_chunks()
    return _keys(out)


def first_occurrence(keys: np.ndarray) -> np.ndarray:
    """Which entries are the first of their value (a batch may repeat an id)."""
    first = np.zeros(len(keys), bool)
    if len(keys):
        first[np.unique(keys, return_index=True)[1]] = True
    return first


def _keys(column: pa.Array) -> np.ndarray:
    """A binary column of 16-byte values as a numpy array of keys (no copy)."""
    if len(column) == 0:
        return np.empty(0, KEY)
    if column.null_count:
        raise ValueError("ids must not be NULL")
    width = np.int64 if pa.types.is_large_binary(column.type) else np.int32
    offsets = np.frombuffer(column.buffers()[1], width)[column.offset:column.offset + len(column) + 1]
    if not (np.diff(offsets) == KEY_BYTES).all():
        raise ValueError("keys must be 16 bytes each")
    return np.frombuffer(column.buffers()[2], np.uint8)[offsets[0]:offsets[-1]].view(KEY)


def _map(path: Path) -> np.ndarray:
    size = path.stat().st_size if path.exists() else 0
    if size == 0:
        return np.empty(0, KEY)
    return np.memmap(path, KEY, "r", shape=(size // KEY_BYTES,))


def _member(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    if not len(sorted_keys) or not len(keys):
        return np.zeros(len(keys), bool)
    order = np.argsort(keys, kind="stable")  # ascending lookups walk the file's pages in order
    found = np.zeros(len(keys), bool)
    at = np.searchsorted(sorted_keys, keys[order])
    inside = at < len(sorted_keys)
    found[order[inside]] = sorted_keys[at[inside]] == keys[order][inside]
    return found
