"""Rows found by id without a scan: sorted 64-bit keys of hex ids, memory-mapped beside an index.

An index answers "which rows are nearest"; a user asks about a sample id (or a unique prefix of
one) and wants the samples behind the rows found. Both ways are binary searches here, in files
written with the index by the writer that builds it (readers only map them):

- `hashes`: the index's content hashes (row r's is in `ids.arrow`), sorted: content hash → index row;
- `samples`: the store's samples by sample id, and beside a text index `texts`, by text hash:
  id → the sample's place in the samples dataset (`SampleRows`: its shard and row), whose few rows
  are then read from their Parquet row groups.

A key is the first 16 hex digits of an id read as a number (ids are SHA-256 hex), so keys sort as
the ids do and a prefix of up to 16 digits is a range of keys; a longer prefix or a whole id is
checked against the id itself. 16 bytes a row on disk (key, row); sorting them holds 32 bytes a
row for a moment (368 MB at D3's 11.5M samples). Where an id is not hex (none this pipeline
writes) no lookup is written, and a search joins in SQL instead.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.store.atomic import atomic_write, write_text
from pipeline.store.layout import Store

LOOKUP_VERSION = 1
KEY_DIGITS = 16
_NIBBLE = np.full(256, 255, np.uint8)  # ASCII → hex digit value; 255: not a lowercase hex digit
_NIBBLE[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint8)


def hex_keys(ids: pa.Array | pa.ChunkedArray) -> np.ndarray | None:
    """The key of each id (its first 16 hex digits as a uint64), or None where an id is NULL,
    shorter than 16 characters or not lowercase hex."""
    chunks = ids.chunks if isinstance(ids, pa.ChunkedArray) else [ids]
    out = []
    for chunk in chunks:
        if not len(chunk):
            continue
        if chunk.null_count:
            return None
        heads = pc.utf8_slice_codeunits(chunk.cast(pa.string()), 0, KEY_DIGITS)
        offsets = np.frombuffer(heads.buffers()[1], np.int32)[heads.offset:heads.offset + len(heads) + 1]
        if not (np.diff(offsets) == KEY_DIGITS).all():
            return None
        data = np.frombuffer(heads.buffers()[2], np.uint8)[offsets[0]:offsets[-1]].reshape(-1, KEY_DIGITS)
        digits = _NIBBLE[data]
        if (digits == 255).any():
            return None
        key = np.zeros(len(digits), np.uint64)
        for column in range(KEY_DIGITS):
            key = (key << np.uint64(4)) | digits[:, column].astype(np.uint64)
        out.append(key)
    return np.concatenate(out) if out else np.zeros(0, np.uint64)


def prefix_range(prefix: str) -> tuple[int, int] | None:
    """The smallest and largest key of ids starting with `prefix` (lowercase hex), or None if it is not hex."""
    head = prefix[:KEY_DIGITS]
    if not head or any(c not in "0123456789abcdef" for c in head):
        return None
    return int(head.ljust(KEY_DIGITS, "0"), 16), int(head.ljust(KEY_DIGITS, "f"), 16)


class KeyMap:
    """Sorted keys and the row of each (memory-mapped): the rows of an id, or of ids with a prefix."""

    def __init__(self, directory: Path, name: str) -> None:
        self.keys = np.load(directory / f"{name}.keys.npy", mmap_mode="r")
        self.rows = np.load(directory / f"{name}.rows.npy", mmap_mode="r")

    def with_prefix(self, prefix: str, limit: int = 64) -> np.ndarray:
        """Rows (at most `limit`) whose id may start with `prefix`: those of its range of keys. Ids
        longer than 16 digits must be checked by the caller against the ids themselves."""
        bounds = prefix_range(prefix)
        if bounds is None:
            return np.zeros(0, np.int64)
        lo = int(np.searchsorted(self.keys, np.uint64(bounds[0]), "left"))
        hi = int(np.searchsorted(self.keys, np.uint64(bounds[1]), "right"))
        return np.asarray(self.rows[lo:min(hi, lo + limit)], np.int64)

    def of(self, ids: Iterable[str]) -> list[np.ndarray]:
        """For each id, the rows whose key is its key (usually one; check the id itself)."""
        return [self.with_prefix(i[:KEY_DIGITS]) if len(i) >= KEY_DIGITS else np.zeros(0, np.int64) for i in ids]


def write_map(directory: Path, name: str, keys: np.ndarray, rows: np.ndarray) -> None:
    """`name.keys.npy` (sorted keys) and `name.rows.npy` (the row of each), atomically."""
    order = np.argsort(keys, kind="stable")
    for suffix, values in (("keys", keys[order]), ("rows", np.asarray(rows, np.int64)[order])):
        atomic_write(directory / f"{name}.{suffix}.npy", partial(_save, array=values))


@dataclass(frozen=True)
class SampleRows:
    """The samples dataset as a lookup saw it: its shards in order, with their row counts and sizes.
    Row p of the dataset is row p − start of the shard it falls in."""

    root: Path
    shards: tuple[str, ...]
    rows: tuple[int, ...]
    sizes: tuple[int, ...]

    @classmethod
    def of(cls, store: Store, paths: list[Path]) -> SampleRows:
        rows = tuple(pq.read_metadata(p).num_rows for p in paths)
        return cls(store.root, tuple(store.relative(p) for p in paths), rows, tuple(p.stat().st_size for p in paths))

    def unchanged(self) -> bool:
        """Every shard still there, of the same size (shards are immutable; `verify --repair` replaces them)."""
        for rel, size in zip(self.shards, self.sizes, strict=True):
            path = self.root / rel
            if not path.exists() or path.stat().st_size != size:
                return False
        return True

    def places(self, positions: np.ndarray) -> list[tuple[str, int]]:
        """(path of its shard, row in that shard) of each position."""
        starts = np.concatenate([[0], np.cumsum(self.rows)]).astype(np.int64)
        shard_of = np.searchsorted(starts, positions, "right") - 1
        return [(str(self.root / self.shards[s]), int(p - starts[s]))
                for p, s in zip(np.asarray(positions).tolist(), shard_of.tolist(), strict=True)]

    def read(self, positions: np.ndarray, columns: list[str]) -> list[dict[str, object]]:
        """The rows at these positions (in this order). DuckDB reads only the row groups and pages
        that hold them (measured: 5 ms a row, against 45 ms for pyarrow's read of its row group)."""
        places = self.places(positions)
        if not places:
            return []
        found = {(file, row): values for file, row, *values in select_rows(places, columns)}
        return [dict(zip(columns, found[p], strict=True)) for p in places if p in found]

    def to_json(self) -> dict[str, object]:
        return {"shards": list(self.shards), "rows": list(self.rows), "sizes": list(self.sizes)}


@dataclass
class Lookup:
    """An index's lookup, opened: content hash → index row, and sample id (text hash) → sample."""

    hashes: KeyMap
    samples: KeyMap
    texts: KeyMap | None
    sample_rows: SampleRows


def select_rows(places: list[tuple[str, int]], columns: list[str]) -> list[tuple[object, ...]]:
    """(file, row, *columns) of these rows of Parquet files, by DuckDB with the row numbers pushed
    down (no pass over the files); no Arrow array is built in Python (pyarrow's first one imports pandas)."""
    import duckdb

    files = sorted({f for f, _ in places})
    rows = sorted({r for _, r in places})
    listed = ", ".join("?" for _ in files)
    wanted = ", ".join("?" for _ in rows)
    sql = (f"SELECT filename, file_row_number, {', '.join(columns)} FROM read_parquet([{listed}], filename = true, "
           f"file_row_number = true) WHERE file_row_number IN ({wanted})")
    asked = set(places)
    with duckdb.connect() as con:
        return [r for r in con.execute(sql, [*files, *rows]).fetchall() if (r[0], r[1]) in asked]


def write_lookup(store: Store, directory: Path, ids: pa.ChunkedArray, modality: str,
                 sample_shards: list[Path]) -> bool:
    """The lookup of an index whose row r has content hash ids[r], over the samples in `sample_shards`;
    False (nothing written) where an id is not hex. `lookup.json` is written last: it makes the rest valid."""
    keys = hex_keys(ids)
    if keys is None:
        return False
    write_map(directory, "hashes", keys, np.arange(len(keys)))
    del keys
    columns = {"samples": "sample_id"} | ({"texts": "text_hash"} if modality == "text" else {})
    for name, column in columns.items():
        found = _sample_keys(sample_shards, column)
        if found is None:
            return False
        write_map(directory, name, *found)
    meta = {"version": LOOKUP_VERSION, "maps": ["hashes", *columns],
            "samples": SampleRows.of(store, sample_shards).to_json()}
    write_text(directory / "lookup.json", json.dumps(meta))
    return True


def open_lookup(store: Store, directory: Path) -> Lookup | None:
    """The lookup beside an index, if one was written (indexes of older releases have none) and the
    samples it places are still the store's."""
    try:
        meta = json.loads((directory / "lookup.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if meta.get("version") != LOOKUP_VERSION:
        return None
    s = meta["samples"]
    rows = SampleRows(store.root, tuple(s["shards"]), tuple(s["rows"]), tuple(s["sizes"]))
    if not rows.unchanged():
        return None
    texts = KeyMap(directory, "texts") if "texts" in meta["maps"] else None
    return Lookup(KeyMap(directory, "hashes"), KeyMap(directory, "samples"), texts, rows)


# --- private -------------------------------------------------------------------------------


def _sample_keys(shards: list[Path], column: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Keys of `column` of every sample row with one (positions counted across the shards in order)."""
    keys, positions = [], []
    for position, values in _column(shards, column):
        valid = values.is_valid().to_numpy(zero_copy_only=False)
        got = hex_keys(values.filter(pa.array(valid)))
        if got is None:
            return None
        keys.append(got)
        positions.append(position + np.nonzero(valid)[0])
    if not keys:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    return np.concatenate(keys), np.concatenate(positions)


def _column(shards: list[Path], column: str) -> Iterator[tuple[int, pa.Array]]:
    """(position of its first row, values) of each row group of the shards, in order."""
    at = 0
    for path in shards:
        file = pq.ParquetFile(path)
        for g in range(file.num_row_groups):
            values = file.read_row_group(g, columns=[column]).column(0).combine_chunks()
            yield at, values
            at += len(values)


def _save(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as out:
        np.save(out, array)
