"""Sets of ids too large for memory, for anti-joins: which of this batch does the store hold?

Re-scanning the store's ids for every batch a writer adds is quadratic at D3 size (11.5M ids, a
scan per 40k-row batch). A `KeySet` holds ids reduced to 128-bit keys (the MD5 of the id: the ids
are SHA-256 hex, so equal keys mean equal ids) in a sorted file that is memory-mapped: a batch is
looked up by binary search (O(batch · log N), in pages of the file cache, not process memory);
keys added since wait in a small sorted array, merged into a new file at `DELTA_MAX` keys.
Anonymous memory stays at the batch plus the delta (16 MB), whatever the store's size.

`StoreKeys` keeps each set between runs in `STORE/cache/keys/`, with the list of shards it covers:
a run scans only the shards committed since (DuckDB sorts their keys, spilling beyond its memory
limit), so a new file costs itself, not a scan of the store. A set whose shards were removed
(`pipeline verify --repair`) is built again. Only the holder of the store's writer lock uses it.
"""

from __future__ import annotations

import binascii
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType

import duckdb
import numpy as np
import pyarrow as pa

from pipeline.store import catalog, duck
from pipeline.store.atomic import pid_alive, write_text
from pipeline.store.layout import Store

KEY = "S16"
KEY_BYTES = 16
DELTA_MAX = 1 << 20  # keys held in memory before they are merged into a file (16 MB)
DUCKDB_MEMORY = "512MB"  # the sort of newly scanned keys spills beyond this
CACHE_FORMAT = 1
_MERGE_BLOCK = 1 << 20


def key_sql(expression: str) -> str:
    """The SQL for one id's key: the MD5 of its text (any id, hex or not, gets 16 bytes)."""
    return f"unhex(md5({expression}))"


@dataclass(frozen=True)
class KeyQuery:
    """The ids of a dataset's shards (of one model, for embeddings): an SQL expression over a
    shard's columns, for the rows that pass `where`."""

    dataset: str
    expression: str
    where: str = "true"
    model_key: str | None = None

    def digest(self) -> str:
        text = json.dumps([CACHE_FORMAT, asdict(self)], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:24]


class KeySet:
    """Sorted keys in a memory-mapped file (never written once mapped) plus a sorted delta."""

    def __init__(self, base: Path | None, scratch: Path, name: str) -> None:
        self.path = base  # the file holding every key but the delta's (None: no keys yet)
        self._base = _map(base)
        self._delta = np.empty(0, KEY)
        self._scratch, self._name = scratch, name

    def __len__(self) -> int:
        return len(self._base) + len(self._delta)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """A mask: which of `keys` the set holds."""
        return _member(self._base, keys) | _member(self._delta, keys)

    def add(self, keys: np.ndarray) -> None:
        """Add keys (duplicates and keys already held are fine)."""
        fresh = _sorted_distinct(keys[~self.contains(keys)])  # the batch's size, not the set's
        if not len(fresh):
            return
        # one insertion into the sorted delta (a copy of at most DELTA_MAX keys), not a re-sort of it
        self._delta = np.insert(self._delta, np.searchsorted(self._delta, fresh), fresh)
        if len(self._delta) >= DELTA_MAX:
            self.flush()

    def flush(self) -> Path:
        """Merge the delta into a new file (block by block) and map it; returns the file."""
        if self.path is not None and not len(self._delta):
            return self.path
        base, delta = self._base, self._delta
        target_path = self._scratch / f"{self._name}.{uuid.uuid4().hex[:8]}.keys"
        target_path.touch()
        total = len(base) + len(delta)
        if total:
            target = np.memmap(target_path, KEY, "w+", shape=(total,))
            ins = np.searchsorted(base, delta)  # base keys before each delta key
            target[ins + np.arange(len(delta))] = delta
            for start in range(0, len(base), _MERGE_BLOCK):
                idx = np.arange(start, min(len(base), start + _MERGE_BLOCK))
                target[idx + np.searchsorted(ins, idx, side="right")] = base[start:idx[-1] + 1]
            target.flush()
            del target
        old = self.path
        self.path, self._base, self._delta = target_path, _map(target_path), np.empty(0, KEY)
        if old is not None and old.parent == self._scratch:
            old.unlink(missing_ok=True)  # a file of this run's; a cached one stays until replaced
        return target_path


@dataclass
class _Entry:
    keyset: KeySet
    covers: set[str]  # relative paths of the shards whose keys are all in the set
    cached: Path | None  # the cache file the set started from
    changed: bool = False


class StoreKeys:
    """Key sets of a store's datasets (name → `KeyQuery`), each opened on first use from the cache
    and brought up to date by scanning the shards it does not cover. A context manager: on a clean
    exit the sets are saved back to the cache. A set named in `maintained` is one the caller `add`s
    the keys of every shard it commits to (so it covers them all); any other covers what it scanned."""

    def __init__(self, store: Store, queries: dict[str, KeyQuery], maintained: Iterable[str] = ()) -> None:
        self.store, self.queries, self.maintained = store, queries, set(maintained)
        self.cache = store.root / "cache" / "keys"
        self._entries: dict[str, _Entry] = {}
        self._scratch: Path | None = None

    def get(self, name: str) -> KeySet:
        entry = self._entries.get(name)
        if entry is None:
            entry = self._entries[name] = self._open(name)
        return entry.keyset

    def add(self, name: str, keys: np.ndarray) -> None:
        """Add the keys of rows this run committed (to a maintained set: of every shard it commits)."""
        if name not in self.maintained:
            raise ValueError(f"key set {name!r} is not maintained: its cache would miss what is added")
        self.get(name).add(keys)
        self._entries[name].changed = True

    def __enter__(self) -> StoreKeys:
        # a shard damaged since its commit stops the writer here, as a query over the views would
        catalog.snapshot(self.store)  # stops with a sentence if a committed shard is damaged
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if kind is None:
                for name, entry in self._entries.items():
                    if entry.changed:
                        self._save(name, entry)
        finally:
            self._entries.clear()
            if self._scratch is not None:
                shutil.rmtree(self._scratch, ignore_errors=True)

    def _open(self, name: str) -> _Entry:
        query = self.queries[name]
        scratch = self._scratch_dir()
        paths = catalog.shard_paths(self.store, query.dataset, query.model_key)
        shards = {self.store.relative(p): p for p in paths}
        meta_path = self.cache / f"{query.digest()}.json"
        meta = _read_json(meta_path)
        cached = self.cache / meta["file"] if meta else None
        if meta is None or cached is None or not cached.exists() or not set(meta["covers"]) <= shards.keys():
            meta, cached = {"covers": []}, None  # none yet, or shards it covers are gone: build again
        new = [p for rel, p in sorted(shards.items()) if rel not in meta["covers"]]
        if cached is not None and new:
            scanned = _scan(query, new, scratch)
            if len(_map(scanned)) <= DELTA_MAX:  # a few new shards: their keys join the cached set
                keyset = KeySet(cached, scratch, name)
                keyset.add(np.array(_map(scanned)))
                scanned.unlink()
                return _Entry(keyset, set(shards), cached, changed=True)
            scanned.unlink()
            cached, new = None, list(shards.values())  # many: one sorted scan of all is cheaper than a merge
        if cached is not None:
            return _Entry(KeySet(cached, scratch, name), set(shards), cached)
        base = _scan(query, new, scratch) if new else None
        return _Entry(KeySet(base, scratch, name), set(shards), None, changed=True)

    def _save(self, name: str, entry: _Entry) -> None:
        """Move the set's file into the cache and point the query's entry at it (atomically)."""
        query = self.queries[name]
        self.cache.mkdir(parents=True, exist_ok=True)
        current = entry.keyset.flush()
        if current.parent != self.cache:
            final = self.cache / f"{query.digest()}.{uuid.uuid4().hex[:8]}.keys"
            os.replace(current, final)
        else:
            final = current
        covers = entry.covers
        if name in self.maintained:  # it holds the keys of every shard committed since it was opened
            covers |= {self.store.relative(p) for p in catalog.shard_paths(self.store, query.dataset, query.model_key)}
        write_text(self.cache / f"{query.digest()}.json", json.dumps(
            {"format": CACHE_FORMAT, "file": final.name, "covers": sorted(covers)}))
        if entry.cached is not None and entry.cached != final:
            entry.cached.unlink(missing_ok=True)

    def _scratch_dir(self) -> Path:
        if self._scratch is None:
            self._scratch = scratch_dir(self.store.root)
            self._sweep_cache()
        return self._scratch

    def _sweep_cache(self) -> None:
        """Key files no cache entry names: left by a writer killed while saving."""
        if not self.cache.exists():
            return
        named = {m["file"] for m in map(_read_json, self.cache.glob("*.json")) if m}
        for path in self.cache.glob("*.keys"):
            if path.name not in named:
                path.unlink(missing_ok=True)


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


def keys_of(ids: pa.Array | pa.ChunkedArray | pa.Table, expression: str = "id") -> np.ndarray:
    """The keys of ids (or of an SQL expression over a table's columns, such as a `KeyQuery`'s),
    computed by the same SQL the sets are built with."""
    if expression == "id" and not isinstance(ids, pa.Table) and pa.types.is_string(ids.type):
        return _md5_keys(ids)
    table = ids if isinstance(ids, pa.Table) else pa.table({"id": ids})
    with duckdb.connect() as con:
        con.execute("SET threads = 2")
        con.register("ids", table)
        out = con.sql(f"SELECT {key_sql(expression)} FROM ids").to_arrow_table().column(0).combine_chunks()
    return binary_keys(out)


def hex_keys(digests: list[bytes]) -> tuple[pa.Array, np.ndarray]:
    """Ids written as the hex of binary digests (SHA-256 ones, say), and their keys, made together:
    the ids as a string array built from one buffer, each key the MD5 of its id's text (as `keys_of`)."""
    if not digests:
        return pa.array([], pa.string()), np.empty(0, KEY)
    width = 2 * len(digests[0])
    text = binascii.hexlify(b"".join(digests))
    if len(text) != width * len(digests):
        raise ValueError("digests must be of one size")
    offsets = np.arange(0, len(text) + 1, width, dtype=np.int32)
    ids = pa.StringArray.from_buffers(len(digests), pa.py_buffer(offsets), pa.py_buffer(text))
    md5 = hashlib.md5
    keys = b"".join([md5(text[i:i + width]).digest() for i in range(0, len(text), width)])
    return ids, np.frombuffer(keys, KEY)


def first_occurrence(keys: np.ndarray) -> np.ndarray:
    """Which entries are the first of their value (a batch may repeat an id)."""
    first = np.zeros(len(keys), bool)
    if len(keys):
        order = np.argsort(keys, kind="stable")  # equal keys stay in their order: the first comes first
        ranked = keys[order]
        new = np.ones(len(keys), bool)
        new[1:] = ranked[1:] != ranked[:-1]
        first[order[new]] = True
    return first


def _sorted_distinct(keys: np.ndarray) -> np.ndarray:
    """The distinct keys, sorted (np.unique's answer, in a fraction of its time on byte strings)."""
    ranked = np.sort(keys)
    new = np.ones(len(ranked), bool)
    new[1:] = ranked[1:] != ranked[:-1]
    return ranked[new]


def _scan(query: KeyQuery, paths: list[Path], scratch: Path) -> Path:
    """The distinct keys of some shards, sorted by DuckDB within its memory limit, written to a
    file in `scratch`."""
    listed = ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths)
    out = scratch / f"scan.{uuid.uuid4().hex[:8]}.keys"
    with duckdb.connect() as con:
        duck.limit_memory(con, DUCKDB_MEMORY, scratch, threads=2)
        reader = con.sql(
            f"SELECT DISTINCT {key_sql(query.expression)} AS k FROM read_parquet([{listed}], union_by_name = true) "
            f"WHERE ({query.where}) AND ({query.expression}) IS NOT NULL ORDER BY k").to_arrow_reader(1 << 16)
        with open(out, "wb") as f:
            for batch in reader:
                f.write(binary_keys(batch.column(0)).tobytes())
    return out


def binary_keys(column: pa.Array) -> np.ndarray:
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


def _md5_keys(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """`keys_of` a string array, computed here rather than by DuckDB (the same MD5 of the same bytes)."""
    chunks = ids.chunks if isinstance(ids, pa.ChunkedArray) else [ids]
    md5, out = hashlib.md5, []
    for chunk in chunks:
        if chunk.null_count:
            raise ValueError("ids must not be NULL")
        if not len(chunk):
            continue
        offsets = np.frombuffer(chunk.buffers()[1], np.int32)[chunk.offset:chunk.offset + len(chunk) + 1]
        data = chunk.buffers()[2].to_pybytes()
        out.append(b"".join([md5(data[a:b]).digest() for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(),
                                                                   strict=True)]))
    return np.frombuffer(b"".join(out), KEY) if out else np.empty(0, KEY)


def _map(path: Path | None) -> np.ndarray:
    size = path.stat().st_size if path is not None and path.exists() else 0
    if path is None or size == 0:
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


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == CACHE_FORMAT else None
