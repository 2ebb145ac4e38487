"""Rows held twice: found by `verify` and `catalog rebuild`, undone by `verify --repair`.

Every writer keeps a sample id once in `samples` and a vector once per model, modality and content
hash. Only two writers at once can break that (the lock file removed under a holder, before the
holder checked it): `find` counts such rows with one grouped scan of the keys per table (bounded
memory, spilling; nothing is read when no key repeats but that scan), and `drop` keeps each key's
first row, in shard-name order (shards are named by the time they were written), rewriting each
shard that holds a later copy without it. Cost: one hash aggregate over a table's keys (D3: 11.5M
sample ids, 13.8M vector keys); a repair also reads the row numbers of the copies, 12 bytes each.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.store import duck
from pipeline.store.atomic import write_parquet
from pipeline.store.layout import Store
from pipeline.store.manifest import Manifest

# The key each table holds once (embeddings: within one model's folder).
KEYS: dict[str, tuple[str, ...]] = {"samples": ("sample_id",), "embeddings": ("modality", "content_hash")}
MEMORY = "1GB"  # the grouped scan spills beyond this


@dataclass(frozen=True)
class Doubled:
    dataset: str
    model_key: str | None
    rows: int  # rows whose key an earlier row of the table holds
    shards: tuple[str, ...]  # the shards holding those later copies (relative paths)

    @property
    def table(self) -> str:
        return self.dataset if self.model_key is None else f"{self.dataset} of {self.model_key}"


def find(store: Store, manifest: Manifest, skip: frozenset[str] = frozenset()) -> list[Doubled]:
    """The tables holding a key twice, with the shards holding the later copies. `skip`: shards not
    to read (missing or damaged: `verify` names them on their own)."""
    found = []
    with _duckdb() as con:
        for dataset, model_key, files in _groups(store, manifest, skip):
            keys = ", ".join(KEYS[dataset])
            extra = con.execute(f"SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM read_parquet($files) "
                                f"GROUP BY {keys} HAVING n > 1)", {"files": files}).fetchall()[0][0]
            if not extra:
                continue
            per_file = con.execute(f"SELECT DISTINCT filename FROM ({_copies(keys)})", {"files": files}).fetchall()
            shards = tuple(sorted(store.relative(Path(f)) for (f,) in per_file))
            found.append(Doubled(dataset, model_key, int(extra), shards))
    return found


def drop(store: Store, manifest: Manifest, doubled: list[Doubled]) -> tuple[list[Path], list[str]]:
    """Rewrite each shard holding later copies without them. Returns the new shards (to commit) and the
    replaced ones (to set aside and forget); the caller holds the writer lock and does both."""
    written: list[Path] = []
    replaced: list[str] = []
    with _duckdb() as con:
        for d in doubled:
            files = next(f for ds, m, f in _groups(store, manifest) if ds == d.dataset and m == d.model_key)
            keys = ", ".join(KEYS[d.dataset])
            copies = con.sql(f"SELECT list_position($files, filename)::INTEGER - 1 AS f, file_row_number AS r "
                             f"FROM ({_copies(keys)})", params={"files": files}).to_arrow_table()
            shard_of = copies.column("f").to_numpy()
            rows = copies.column("r").to_numpy()
            for i in np.unique(shard_of):
                path = Path(files[i])
                table = pq.read_table(path)
                keep = np.ones(table.num_rows, bool)
                keep[rows[shard_of == i]] = False
                if keep.any():
                    prefix = path.stem.split("-", 1)[0]
                    written.append(write_parquet(table.filter(pa.array(keep)), store.new_shard(path.parent, prefix)))
                replaced.append(store.relative(path))
    return written, replaced


def _copies(keys: str) -> str:
    """Every row after the first of its key (in shard-name order, then row order), with its file and row."""
    return (f"SELECT filename, file_row_number FROM (SELECT filename, file_row_number, row_number() OVER "
            f"(PARTITION BY {keys} ORDER BY filename, file_row_number) AS k FROM read_parquet($files, "
            "filename = true, file_row_number = true)) WHERE k > 1")


def _groups(store: Store, manifest: Manifest, skip: frozenset[str] = frozenset()
            ) -> Iterator[tuple[str, str | None, list[str]]]:
    """(dataset, model key, shard paths in name order) of each table that holds its key once."""
    for dataset in KEYS:
        models = sorted({s.model_key for s in manifest.of(dataset)}, key=lambda m: m or "")
        for model_key in models:
            files = [str(store.root / s.path) for s in manifest.of(dataset, model_key) if s.path not in skip
                     and s.num_rows > 0]
            if len(files) > 0:
                yield dataset, model_key, files


@contextmanager
def _duckdb() -> Iterator[duckdb.DuckDBPyConnection]:
    """A DuckDB connection with bounded memory, spilling to a temp folder of its own (removed after)."""
    spill = Path(tempfile.gettempdir()) / f"pipeline-doubled-{os.getpid()}"
    con = duckdb.connect()
    try:
        duck.limit_memory(con, MEMORY, spill)
        yield con
    finally:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)
