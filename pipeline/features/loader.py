"""Streaming batches of cached features for training and scoring, in bounded memory.

Reads the training view (`features.view`) one row group of index rows at a time, row groups in a
new random order each epoch, index rows mixed in a shuffle buffer of at most `buffer_rows`; each
batch's vectors are then gathered from the memory-mapped matrices. The view's rows are already in
a pseudo-random order (a hash of the sample id), so every row group is a random draw of its
split with all classes mixed, and the buffer mixes sixteen of them at a time. Memory is the
buffer of index rows (~100 bytes each) plus one batch of vectors, whatever the store's size.
Vectors are float16 on disk, float32 in batches; `input_norm="raw"` scales each back by its norm.

A pass that reads every row once and in no particular order (scoring) asks for `order="rows"`: the
view's rows come sorted by the matrix row of their vectors (DuckDB sorts them, spilling beyond
`SORT_MEMORY`), so the vectors are read in file order. In the view's order a batch is a random
draw of rows, which is free while the vectors fit the page cache; beyond it (D3: 21 GB of vectors
on a 24 GB machine) every vector costs a read from disk: measured, 8,192 random rows take 1.2-1.4 s
to gather from disk, consecutive ones 0.025-0.07 s (`vectors.PREFETCH_FROM`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipeline.ahead import in_thread
from pipeline.choices import Features, InputNorm
from pipeline.config import Validated
from pipeline.errors import PipelineError
from pipeline.features.view import FeatureTable
from schemas import FEATURE_VIEW

# the view's columns, all nullable: parts written by DuckDB differ in which ones they declare non-null
_SCHEMA = pa.schema([f.with_nullable(True) for f in FEATURE_VIEW]).remove_metadata()
Order = Literal["view", "rows"]
# Batches made ahead of the one in use. Beyond the page cache (D3's 11.5M vectors evicted, shuffled
# 2048-row batches of image+text) a batch took 214-226 ms to gather against a SAM step's 94 ms; a
# step with its loading took 268-293 ms made in turn, 199-203 ms made ahead (the disk is the bound).
AHEAD = 2
# DuckDB's sort of the view's rows (order "rows") spills beyond this. At 1M samples the sort fits in 256 MB
# and so used it; at 5M it filled it: report's peak anon grew 1000 -> 1100 MB, train's 1050 -> 1163 MB.
# Under 128 MB (2 threads): report 904 -> 981 MB at the same CPU (11.5 / 51.0 s), train 973 -> 1021 MB;
# the sort alone of 5M rows: 323 -> 200 MB.
SORT_MEMORY = "128MB"
# Matrix rows a bucket of that sort covers, on a matrix of more: one sort of every row grew with them
# (DuckDB pins a block of each sorted run to merge them): at 11.5M samples it failed to pin one in 128 MB,
# where 5M fitted (bench_scale.py, train's scoring pass). Writing the buckets costs a pass: the order of
# 5M rows took 18 CPU-s in buckets against 9 in one sort; a matrix of up to this many rows (2M samples)
# keeps the one sort.
ORDER_BUCKET_ROWS = 1 << 21
# Rows the partitioned write of those buckets holds per thread before writing them out. DuckDB's default
# (524,288) did not fit in SORT_MEMORY at 11.5M samples; 65,536 and 16,384 both did.
PARTITION_FLUSH_ROWS = 65_536


@dataclass
class Batch:
    """One batch: features and labels as tensors; the index rows behind them as Arrow columns."""

    x: torch.Tensor  # float32 [n, d]
    y: torch.Tensor  # int64 [n]
    rows: pa.Table  # sample_id, split, label, generator, group_key, image_row, text_row

    def column(self, name: str) -> np.ndarray:
        return self.rows.column(name).to_numpy(zero_copy_only=False)

    @property
    def sample_id(self) -> np.ndarray:
        return self.column("sample_id")

    @property
    def generator(self) -> np.ndarray:
        return self.column("generator")

    @property
    def split(self) -> np.ndarray:
        return self.column("split")

    @property
    def group(self) -> np.ndarray:
        return self.column("group_key")


@dataclass(frozen=True)
class LoaderConfig(Validated):
    features: Features = "image+text"
    batch_size: int = 2048
    shuffle: bool = False
    buffer_rows: int = 65536
    seed: int = 0
    input_norm: InputNorm = "l2"  # l2: unit vectors as stored | raw: scaled back by each vector's norm
    order: Order = "view"  # view: the view's (shuffled if `shuffle`) | rows: by matrix row, for one pass over all

    def check(self) -> None:
        if self.order == "rows" and self.shuffle:
            raise PipelineError("A loader in matrix-row order does not shuffle.")


class FeatureLoader:
    def __init__(self, table: FeatureTable, splits: tuple[str, ...], config: LoaderConfig) -> None:
        if config.features != "image" and table.texts is None:
            raise PipelineError(f"The store has no text vectors for {table.model_key}: use --features image.")
        self.table = table
        self.splits = splits
        self.config = config
        self.files = [pq.ParquetFile(p) for p in table.parts]
        self.row_groups = self._row_groups_of(splits)
        self.max_buffered = 0  # the largest number of index rows held at once (for tests and benchmarks)
        self.skipped_missing_text = 0

    @property
    def in_dim(self) -> int:
        f = self.config.features
        return (self.table.dim if f != "text" else 0) + (self.table.text_dim if f != "image" else 0)

    def count(self) -> int:
        """Rows an epoch yields (reads the split and text-row columns only)."""
        total = 0
        for part, group in self.row_groups:
            rows = self.files[part].read_row_group(group, columns=["split", "text_row"])
            mask = pc.is_in(rows.column("split"), pa.array(self.splits))
            if self.config.features != "image":
                mask = pc.and_(mask, rows.column("text_row").is_valid())
            total += int(pc.sum(mask).as_py() or 0)
        return total

    def epoch(self, epoch: int = 0) -> Iterator[Batch]:
        """The batches of one epoch, made `AHEAD` batches ahead in a thread of their own, so that
        gathering vectors from disk overlaps the work done with the last batch."""
        return in_thread(self._epoch(epoch), AHEAD, "loader-ahead")

    def _epoch(self, epoch: int) -> Iterator[Batch]:
        cfg = self.config
        if cfg.order == "rows":
            yield from self._in_row_order()
            return
        rng = np.random.default_rng([cfg.seed, epoch])
        order = [self.row_groups[i] for i in rng.permutation(len(self.row_groups))] if cfg.shuffle \
            else self.row_groups
        buffer: list[pa.Table] = []
        buffered = 0
        self.skipped_missing_text = 0
        for part, group in order:
            rows = self._read(part, group)
            if rows.num_rows == 0:
                continue
            buffer.append(rows)
            buffered += rows.num_rows
            self.max_buffered = max(self.max_buffered, buffered)
            if buffered >= (cfg.buffer_rows if cfg.shuffle else cfg.batch_size):
                rest = yield from self._drain(pa.concat_tables(buffer), rng, keep_tail=True)
                buffer, buffered = ([rest], rest.num_rows) if rest.num_rows else ([], 0)
        if buffer:
            yield from self._drain(pa.concat_tables(buffer), rng, keep_tail=False)

    def _in_row_order(self) -> Iterator[Batch]:
        """Every row of the splits, sorted by the matrix row of its image (text: of its text), in batches.

        A matrix of more than ORDER_BUCKET_ROWS rows is sorted in buckets of that many matrix rows: the
        rows are written once partitioned by bucket, then each bucket is sorted alone, in order."""
        import duckdb

        from pipeline.store import duck

        key = "text_row" if self.config.features == "text" else "image_row"
        matrix = self.table.texts if key == "text_row" else self.table.images
        rows = f"FROM {self.table.parts_sql} WHERE split IN (SELECT unnest($splits))"
        splits = {"splits": list(self.splits)}
        columns = ", ".join(_SCHEMA.names)
        with _spill_directory(self.table.directory) as spill, duckdb.connect() as con:
            duck.limit_memory(con, SORT_MEMORY, Path(spill))
            self.skipped_missing_text = 0
            if self.config.features != "image":
                self.skipped_missing_text = int(
                    con.execute(f"SELECT count(*) {rows} AND text_row IS NULL", splits).fetchall()[0][0])
                rows += " AND text_row IS NOT NULL"
            order = f"ORDER BY {key}, sample_id"
            if matrix is None or matrix.rows <= ORDER_BUCKET_ROWS:
                sorts = [(f"SELECT {columns} {rows} {order}", splits)]
            else:
                buckets = Path(spill) / "buckets"
                con.execute(f"SET partitioned_write_flush_threshold = {PARTITION_FLUSH_ROWS}")
                con.execute(f"COPY (SELECT {columns}, coalesce({key} // {ORDER_BUCKET_ROWS}, 0) AS _bucket {rows}) "
                            f"TO {duck.literal(str(buckets))} (FORMAT parquet, PARTITION_BY (_bucket))", splits)
                folders = sorted(buckets.glob("_bucket=*"), key=lambda d: int(d.name.partition("=")[2]))
                sorts = [(f"SELECT {columns} FROM read_parquet($files, hive_partitioning = false) {order}",
                          {"files": sorted(str(f) for f in folder.glob("*.parquet"))}) for folder in folders]
            rest = _SCHEMA.empty_table()
            unused = np.random.default_rng(0)  # (_drain shuffles only when the config does: never here)
            for sql, params in sorts:
                for record in con.sql(sql, params=params).to_arrow_reader(self.config.batch_size):
                    rows_now = pa.concat_tables([rest, pa.Table.from_batches([record]).cast(_SCHEMA)])
                    rest = yield from self._drain(rows_now, unused, keep_tail=True)
            if rest.num_rows:
                yield from self._drain(rest, unused, keep_tail=False)

    def _drain(self, rows: pa.Table, rng: np.random.Generator, keep_tail: bool) -> Generator[Batch, None, pa.Table]:
        if self.config.shuffle:
            rows = rows.take(pa.array(rng.permutation(rows.num_rows)))
        size = self.config.batch_size
        full = rows.num_rows - (rows.num_rows % size if keep_tail else 0)
        for start in range(0, full, size):
            yield self._batch(rows.slice(start, min(size, full - start)))
        return rows.slice(full)

    def _read(self, part: int, group: int) -> pa.Table:
        rows = self.files[part].read_row_group(group, columns=_SCHEMA.names).cast(_SCHEMA)
        mask = pc.is_in(rows.column("split"), pa.array(self.splits))
        if self.config.features != "image":
            has_text = rows.column("text_row").is_valid()
            self.skipped_missing_text += int(pc.sum(pc.and_(mask, pc.invert(has_text))).as_py() or 0)
            mask = pc.and_(mask, has_text)
        return rows.filter(mask).combine_chunks()

    def batch_of(self, rows: pa.Table) -> Batch:
        """The batch of these view rows (any selection of them, e.g. the rows a run has not scored)."""
        return self._batch(rows.select(_SCHEMA.names).cast(_SCHEMA))

    def _batch(self, rows: pa.Table) -> Batch:
        raw = self.config.input_norm == "raw"
        parts = []
        if self.config.features != "text":
            parts.append(self.table.images.gather(rows.column("image_row").to_numpy(), raw))
        if self.config.features != "image":
            assert self.table.texts is not None
            parts.append(self.table.texts.gather(rows.column("text_row").to_numpy(), raw))
        x = torch.from_numpy(np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0])
        # -1: an unlabelled sample (split `unlabelled`), which only a scoring pass ever reads
        y = torch.from_numpy(pc.fill_null(rows.column("label"), -1).to_numpy().astype(np.int64))
        return Batch(x, y, rows)

    def _row_groups_of(self, splits: tuple[str, ...]) -> list[tuple[int, int]]:
        """(part, row group) pairs that may hold rows of these splits (each part is sorted by split)."""
        keep = []
        for p, file in enumerate(self.files):
            index = file.schema_arrow.get_field_index("split")
            for g in range(file.metadata.num_row_groups):
                stats = file.metadata.row_group(g).column(index).statistics
                if stats is None or not stats.has_min_max or any(stats.min <= s <= stats.max for s in splits):
                    keep.append((p, g))
        return keep


T = TypeVar("T")


def _spill_directory(directory: Path) -> tempfile.TemporaryDirectory[str]:
    """A directory for DuckDB's sort to spill into, removed after; those of killed processes go first."""
    from pipeline.store.atomic import pid_alive

    for old in directory.glob("sort-*-*"):
        pid = old.name.split("-")[1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return tempfile.TemporaryDirectory(prefix=f"sort-{os.getpid()}-", dir=directory)


