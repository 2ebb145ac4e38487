"""Which row of a model's vector matrix holds a content hash: a sorted key file, memory-mapped.

`predict` hashes every image it reads and asks, per batch, which of those bytes the store already
encoded with the run's model. Scanning the embedding shards' hashes per batch costs the store's size
each time; this is a derived cache built once (DuckDB sorts the keys out of core, spilling) and
extended as shards arrive: per part, `keys-<n>.npy` (the 16-byte MD5 of each content hash, sorted:
`store.keys.keys_of`) and `rows-<n>.npy` (its matrix row, int64). A lookup is a binary search per
part: O(batch · log N) over pages of the file cache, whatever the store's size. 24 bytes a vector
(D3: 276 MB on disk, none of it in process memory).

In `cache/rowkeys/<model_key>/<modality>/`, beside `rowkeys.json` (the matrix generation it indexes,
the rows it covers, its parts). New shards add a part; a rebuilt matrix (rows moved), or more than
`MAX_PARTS` parts, rebuilds it whole. Files are written atomically under `store.cache.building`, and
a reader pins the parts it maps.
"""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.features.vectors import VectorMatrix
from pipeline.store import cache, duck
from pipeline.store.atomic import atomic_write, write_text
from pipeline.store.keys import KEY, binary_keys, key_sql, keys_of
from pipeline.store.layout import Store

MAX_PARTS = 8
DUCKDB_MEMORY = "512MB"  # the sort of a part's keys spills beyond this
_BATCH = 1 << 16


@dataclass(frozen=True)
class RowKeys:
    """Content hash → matrix row, for one model and modality: plain paths, so a worker process can
    map them itself (nothing is mapped until the first lookup)."""

    parts: tuple[tuple[str, str], ...]  # (keys file, rows file) of each part
    rows: int  # matrix rows covered
    pins: cache.Pins | None = field(default=None, compare=False, repr=False)

    def __reduce__(self) -> tuple[object, ...]:
        return (RowKeys, (self.parts, self.rows))  # (a worker's copy pins nothing: the caller's pins hold)

    def find(self, hashes: pa.Array | pa.ChunkedArray | list[str]) -> np.ndarray:
        """The matrix row of each content hash (-1: not in the matrix); NULL hashes are not found."""
        column = hashes if isinstance(hashes, pa.Array | pa.ChunkedArray) else pa.array(hashes, pa.string())
        out = np.full(len(column), -1, np.int64)
        present = np.asarray(column.is_valid().to_numpy(zero_copy_only=False), bool)
        if not present.any():
            return out
        keys = keys_of(column.filter(pa.array(present)) if not present.all() else column)
        found = np.full(len(keys), -1, np.int64)
        for keys_file, rows_file in self.parts:
            sorted_keys, rows = _maps(keys_file, rows_file)
            if not len(sorted_keys):
                continue
            at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
            hit = (sorted_keys[at] == keys) & (found < 0)
            found[hit] = rows[at[hit]]
        out[present] = found
        return out


def open_rowkeys(store: Store, matrix: VectorMatrix, modality: str) -> RowKeys:
    """The row keys of this matrix, extended (or rebuilt) first if shards arrived since."""
    directory = store.root / "cache" / "rowkeys" / matrix.directory.parent.name / modality
    with cache.building(directory):
        meta = _read(directory)
        if meta is None or not _extendable(meta, matrix, directory):
            meta = {"generation": matrix.generation, "rows": 0, "parts": []}
        if meta["rows"] < matrix.rows:
            meta["parts"].append(_build_part(store, directory, matrix, meta["rows"]))
            meta["rows"] = matrix.rows
            write_text(directory / "rowkeys.json", json.dumps(meta))
        files = [directory / f for part in meta["parts"] for f in part]
        pins = cache.pin(files)
        cache.sweep([*directory.glob("keys-*.npy"), *directory.glob("rows-*.npy")], {f.name for f in files})
    parts = tuple((str(directory / k), str(directory / r)) for k, r in meta["parts"])
    return RowKeys(parts, meta["rows"], pins)


# --- private -------------------------------------------------------------------------------


def _build_part(store: Store, directory: Path, matrix: VectorMatrix, start: int) -> list[str]:
    """The keys of matrix rows from `start` on (the shards laid out after it), sorted, with their rows."""
    import duckdb

    offsets = matrix.shard_offsets()
    offsets = offsets.filter(pc.greater_equal(offsets.column("offset"), start))
    count = matrix.rows - start
    name = uuid.uuid4().hex[:12]
    keys_path, rows_path = directory / f"keys-{name}.npy", directory / f"rows-{name}.npy"
    root = str(store.root.resolve()) + "/"
    spill = directory / f".sort-{name}"
    with duckdb.connect() as con:
        duck.limit_memory(con, DUCKDB_MEMORY, spill, threads=2)
        con.register("offsets", offsets)
        reader = duck.batches(con.sql(
            f"SELECT {key_sql('v.content_hash')} AS k, v.file_row_number + o.offset AS row "
            "FROM read_parquet($files, filename = true, file_row_number = true) v "
            "JOIN offsets o ON v.filename = $root || o.path ORDER BY k",
            params={"files": [root + p for p in offsets.column("path").to_pylist()], "root": root}), _BATCH)

        def write(keys_tmp: Path) -> None:
            keys = np.lib.format.open_memmap(keys_tmp, "w+", np.dtype(KEY), (count,))
            rows = np.lib.format.open_memmap(rows_tmp, "w+", np.int64, (count,))
            at = 0
            for batch in reader:
                n = batch.num_rows
                keys[at:at + n] = binary_keys(batch.column(0))
                rows[at:at + n] = batch.column(1).to_numpy()
                at += n
            if at != count:
                raise RuntimeError(f"row keys: {at} keys for {count} rows")
            keys.flush()
            rows.flush()
            del keys, rows

        rows_tmp = directory / f".rows-{name}.tmp.npy"
        try:
            atomic_write(keys_path, write)
            atomic_write(rows_path, lambda tmp: rows_tmp.replace(tmp))
        finally:
            rows_tmp.unlink(missing_ok=True)
            shutil.rmtree(spill, ignore_errors=True)
    return [keys_path.name, rows_path.name]


def _extendable(meta: dict | None, matrix: VectorMatrix, directory: Path) -> bool:
    """Whether the parts there still say where each row is (the matrix only grew since) and may take one more."""
    return (meta is not None and meta["generation"] == matrix.generation and meta["rows"] <= matrix.rows
            and len(meta["parts"]) < MAX_PARTS and all((directory / f).exists() for p in meta["parts"] for f in p))


def _maps(keys_file: str, rows_file: str) -> tuple[np.ndarray, np.ndarray]:
    return np.load(keys_file, mmap_mode="r"), np.load(rows_file, mmap_mode="r")


def _read(directory: Path) -> dict | None:
    try:
        return json.loads((directory / "rowkeys.json").read_text())
    except (OSError, ValueError):
        return None
