"""Scores as they stream: where a scored batch goes, and the numbers metrics need from it.

A pass over a split hands each scored batch to every sink: `ScoreWriter` (the run's score shard,
streamed to disk), `ScoreCollector` (labels, scores, splits and generator codes as numbers: about
ten bytes a sample) and `GroupKeys` (each row's group key, ranked once the pass is over into the
codes the group bootstrap resamples). Nothing per row is kept as a Python object.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline.features.loader import FeatureLoader
from pipeline.store import catalog, duck
from pipeline.store.layout import Store
from pipeline.store.stream import ParquetStream
from schemas import SCORES, SPLITS
from trainer.fit import FitConfig, predict

DUCKDB_MEMORY = "256MB"  # queries over every sample or score of a run (counts, group codes) spill beyond this


class ScoreSink(Protocol):
    """Where scored batches go: `ScoreWriter`, `ScoreCollector`, `GroupKeys`."""

    def write(self, rows: pa.Table, scores: np.ndarray) -> None: ...


class ScoreWriter:
    """The one writer of score shards: scores/<run_id>[-<part>].parquet, streamed batch by batch
    (`store.stream.ParquetStream`); `publish` moves the file into place for the caller to commit under
    the writer lock, `discard` drops it."""

    def __init__(self, store: Store, run_id: str, part: str | None = None) -> None:
        self.run_id = run_id
        name = f"{run_id}-{part}.parquet" if part else f"{run_id}.parquet"
        self.stream = ParquetStream(store.dataset_dir("scores") / name, SCORES)

    @property
    def rows(self) -> int:
        return self.stream.rows

    def write(self, rows: pa.Table, scores: np.ndarray) -> None:
        """The scores of these rows (columns sample_id, split, label, generator; any others ignored)."""
        if rows.num_rows:
            self.stream.write({"run_id": pa.array([self.run_id] * rows.num_rows, pa.string()),
                               **{c: rows.column(c) for c in ("sample_id", "split", "label", "generator")},
                               "score": np.asarray(scores, np.float32)})

    def publish(self) -> Path:
        """Move the finished file into place; returns the shard's path, for `writes.commit`."""
        return self.stream.finalize()

    def discard(self) -> None:
        self.stream.discard()


class GroupKeys:
    """Takes the batches a `ScoreWriter` takes and keeps each row's group key, in a temp file beside
    the scores, for `codes`: the key (its own sample id when it has none) comes with the view's rows,
    so ranking the keys is one external sort, no join with the samples table. Rows without a
    `group_key` column (kNN's) keep their sample id, looked up in `samples` when ranked."""

    def __init__(self, store: Store, run_id: str) -> None:
        self.store = store
        self.lookup = False
        self.stream = ParquetStream(store.dataset_dir("scores") / f"{run_id}-groups.parquet", _KEYS)

    @property
    def rows(self) -> int:
        return self.stream.rows

    def write(self, rows: pa.Table, scores: np.ndarray) -> None:
        if not rows.num_rows:
            return
        if "group_key" in rows.column_names:
            self.stream.write({"key": pc.coalesce(rows.column("group_key"), rows.column("sample_id"))})
        else:
            self.lookup = True
            self.stream.write({"key": rows.column("sample_id")})

    def codes(self) -> np.ndarray:
        """`group_codes` of the rows written, in order; the temp file is gone afterwards."""
        try:
            if not self.rows:
                return np.zeros(0, np.int32)
            keys: dict[str, object] = {"keys": str(self.stream.close())}
            if self.lookup:
                return _ranked(self.store, self.rows, "SELECT f.file_row_number AS i, coalesce(k.group_key, f.key) "
                               "AS key FROM read_parquet($keys, file_row_number = true) f "
                               "LEFT JOIN samples k ON k.sample_id = f.key", params=keys)
            return _ranked(self.store, self.rows, "SELECT file_row_number AS i, key "
                           "FROM read_parquet($keys, file_row_number = true)", params=keys)
        finally:
            self.discard()

    def discard(self) -> None:
        self.stream.discard()


_KEYS = pa.schema([pa.field("key", pa.string(), nullable=False)])


@dataclass
class ScoreArrays:
    """Scores as numbers only, about ten bytes a sample: what metrics need, with no id or name per row."""

    label: np.ndarray  # int8: 1 generated
    score: np.ndarray  # float32: the probability of "generated"
    split: np.ndarray  # int8: index into SPLITS
    generator: np.ndarray  # int16: index into `generators`
    generators: tuple[str, ...]  # sorted
    excluded: np.ndarray  # bool: a leaking sample, left out of metrics
    group: np.ndarray | None = None  # int32: the rank of the sample's group key among all keys (`group_codes`)

    def of(self, split: str) -> np.ndarray:
        """The mask of this split's rows that count (leaking ones excluded)."""
        return (self.split == SPLITS.index(split)) & ~self.excluded


class ScoreCollector:
    """Takes the same batches as `ScoreWriter` and keeps only `ScoreArrays`' numbers of them.

    Leaking ids are looked up in an Arrow hash set and generator names become small codes: no Python
    object per row. The numbers go into arrays allocated for `capacity` rows up front (grown by
    doubling if more come): small arrays kept batch after batch pin the allocator's heap between
    the batches' large transient buffers (measured: about 2 KB a sample of resident memory, for
    the 9 bytes kept).
    """

    def __init__(self, capacity: int, excluded: set[str] | None = None) -> None:
        self._excluded = pa.array(sorted(excluded or ()), pa.string())
        self._names: list[str] = []
        self._arrays: dict[str, np.ndarray] = {k: np.zeros(max(capacity, 1), t) for k, t in _COLLECTED.items()}
        self.rows = 0

    def write(self, rows: pa.Table, scores: np.ndarray) -> None:
        n, at = rows.num_rows, self.rows
        if at + n > len(self._arrays["label"]):
            size = max(at + n, 2 * len(self._arrays["label"]))
            self._arrays = {k: np.concatenate([v[:at], np.zeros(size - at, v.dtype)]) for k, v in self._arrays.items()}
        generator = rows.column("generator")
        self._names += sorted(set(pc.unique(generator).to_pylist()) - set(self._names))
        columns = {
            "label": rows.column("label"),
            "score": scores,
            "split": pc.index_in(rows.column("split"), value_set=pa.array(SPLITS)),
            "generator": pc.index_in(generator, value_set=pa.array(self._names, pa.string())),
            "excluded": pc.is_in(rows.column("sample_id"), value_set=self._excluded),
        }
        for name, column in columns.items():
            values = column if isinstance(column, np.ndarray) else column.to_numpy(zero_copy_only=False)
            self._arrays[name][at:at + n] = values
        self.rows += n

    def arrays(self) -> ScoreArrays:
        """Everything written so far, generator codes renumbered in name order."""
        names = sorted(self._names)
        renumber = np.array([names.index(n) for n in self._names] or [0], np.int16)
        a = {name: v[:self.rows] for name, v in self._arrays.items()}
        return ScoreArrays(a["label"], a["score"], a["split"], renumber[a["generator"]], tuple(names), a["excluded"])


_COLLECTED = {"label": np.int8, "score": np.float32, "split": np.int8, "generator": np.int16, "excluded": np.bool_}


def group_codes(store: Store, ids: pa.Array | np.ndarray) -> np.ndarray:
    """Each sample's group as an int32 code, in order: the rank of its `group_key` among the keys of
    all of them (its own sample id when the samples table has none for it), so codes sort as the
    keys do and a metric's group bootstrap draws what it drew from the keys themselves. (A run's
    scores get theirs from `GroupKeys`, without the join.)"""
    column = ids if isinstance(ids, pa.Array | pa.ChunkedArray) else pa.array(ids, pa.string())
    return _ranked(store, len(column), "SELECT ids.i, coalesce(k.group_key, ids.sample_id) AS key FROM ids "
                   "LEFT JOIN samples k USING (sample_id)",
                   {"ids": pa.table({"sample_id": column.cast(pa.string()), "i": np.arange(len(column))})})


def _ranked(store: Store, n: int, rows_sql: str, tables: dict[str, pa.Table] | None = None,
            params: dict[str, object] | None = None) -> np.ndarray:
    """Dense ranks (0-based, int32) of `key` for rows `i` < n of a query with columns (i, key).

    DuckDB sorts by key within `DUCKDB_MEMORY` (an external sort: it spills, measured flat to 6M keys
    in 128 MB where a window or a join grew with rows); ranks are counted as the sorted keys stream
    back, a batch at a time with Arrow compute: no key becomes a Python object."""
    out = np.zeros(n, np.int32)
    with catalog.connect(store) as con:
        bound_memory(con, store)
        for name, table in (tables or {}).items():
            con.register(name, table)
        rel = con.sql(f"SELECT i, key FROM ({rows_sql}) ORDER BY key, i", params=params)
        rank, last, seen = -1, None, 0
        for batch in duck.batches(rel, 1 << 16):
            m = batch.num_rows
            seen += m
            if not m:
                continue
            keys = batch.column(1)
            new = np.empty(m, bool)
            new[0] = last is None or keys[0].as_py() != last
            new[1:] = pc.not_equal(keys.slice(1), keys.slice(0, m - 1)).to_numpy(zero_copy_only=False)
            codes = rank + np.cumsum(new)
            out[batch.column(0).to_numpy()] = codes
            rank, last = int(codes[-1]), keys[m - 1].as_py()
    if seen < n:
        raise RuntimeError(f"group keys of {seen} of {n} rows")
    return out


def bound_memory(con: duckdb.DuckDBPyConnection, store: Store) -> None:
    """Hold a DuckDB connection's sorts, joins and aggregates to `DUCKDB_MEMORY`, spilling to the store's cache."""
    duck.limit_memory(con, DUCKDB_MEMORY, store.root / "cache" / "duckdb-tmp")


def score_batches(model: torch.nn.Module, loader: FeatureLoader, fit_config: FitConfig, sinks: tuple[ScoreSink, ...],
           only: tuple[str, ...] | None = None) -> None:
    """Score every row of the loader's splits batch by batch, handing each batch to every sink (a
    `ScoreWriter`, a `ScoreCollector`); nothing per row is kept here. `only`: keep the rows `_seen` allows."""
    for b in loader.epoch(0):
        rows, probs = b.rows, predict(model, [b.x], fit_config)
        if only is not None:  # (the whole batch is scored: a batch's shape may change the last bits of a score)
            keep = seen_by(rows, only)
            rows, probs = rows.filter(pa.array(keep)), probs[keep]
        for sink in sinks:
            sink.write(rows, probs)


def seen_by(rows: pa.Table, only: tuple[str, ...]) -> np.ndarray:
    """Rows a run restricted to `only` may learn from: every real image and those generators' images."""
    real = pc.equal(rows.column("label"), 0)
    return pc.or_(real, pc.is_in(rows.column("generator"), value_set=pa.array(only, pa.string()))) \
        .to_numpy(zero_copy_only=False)
