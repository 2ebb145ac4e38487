"""Streaming batches of cached features for training and scoring, in bounded memory.

Reads the feature table (see `features.py`) one row group at a time: row groups in a new random
order each epoch, rows mixed in a shuffle buffer of at most `buffer_rows`. Memory is the buffer
plus one row group, whatever the store's size. Vectors are float16 on disk, float32 in batches.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipeline.errors import PipelineError
from pipeline.features.vectors import matrix
from pipeline.features.view import FeatureTable

FEATURE_SETS = ("image", "text", "image+text")


@dataclass
class Batch:
    x: torch.Tensor  # float32 [n, d]
    y: torch.Tensor  # int64 [n]
    generator: np.ndarray
    sample_id: np.ndarray
    split: np.ndarray


@dataclass(frozen=True)
class LoaderConfig:
    features: str = "image+text"
    batch_size: int = 2048
    shuffle: bool = False
    buffer_rows: int = 65536
    seed: int = 0


class FeatureLoader:
    def __init__(self, table: FeatureTable, splits: tuple[str, ...], config: LoaderConfig) -> None:
        if config.features not in FEATURE_SETS:
            raise PipelineError(f"--features must be one of {', '.join(FEATURE_SETS)}.")
        self.table = table
        self.splits = splits
        self.config = config
        self.file = pq.ParquetFile(table.path)
        self.row_groups = self._row_groups_of(splits)
        self.max_buffered = 0  # the largest number of rows held at once (for tests and benchmarks)
        self.skipped_missing_text = 0

    @property
    def in_dim(self) -> int:
        return self.table.dim * (2 if self.config.features == "image+text" else 1)

    def epoch(self, epoch: int = 0) -> Iterator[Batch]:
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, epoch])
        order = rng.permutation(self.row_groups) if cfg.shuffle else self.row_groups
        buffer: list[pa.Table] = []
        buffered = 0
        self.skipped_missing_text = 0
        for group in order:
            part = self._read(int(group))
            if part.num_rows == 0:
                continue
            buffer.append(part)
            buffered += part.num_rows
            self.max_buffered = max(self.max_buffered, buffered)
            if not cfg.shuffle or buffered >= cfg.buffer_rows:
                rest = yield from self._drain(pa.concat_tables(buffer), rng, keep_tail=True)
                buffer, buffered = ([rest], rest.num_rows) if rest.num_rows else ([], 0)
        if buffer:
            yield from self._drain(pa.concat_tables(buffer), rng, keep_tail=False)

    def _drain(
        self, rows: pa.Table, rng: np.random.Generator, keep_tail: bool
    ) -> Generator[Batch, None, pa.Table]:
        if self.config.shuffle:
            rows = rows.take(pa.array(rng.permutation(rows.num_rows)))
        size = self.config.batch_size
        full = rows.num_rows - (rows.num_rows % size if keep_tail else 0)
        for start in range(0, full, size):
            yield self._batch(rows.slice(start, min(size, full - start)))
        return rows.slice(full)

    def _read(self, group: int) -> pa.Table:
        need_text = self.config.features != "image"
        cols = ["sample_id", "split", "label", "generator"] + (["image"] if self.config.features != "text" else [])
        cols += ["text"] if need_text else []
        part = self.file.read_row_group(group, columns=cols)
        mask = pc.is_in(part.column("split"), pa.array(self.splits))
        if need_text:
            has_text = part.column("text").is_valid()
            self.skipped_missing_text += int(pc.sum(pc.and_(mask, pc.invert(has_text))).as_py() or 0)
            mask = pc.and_(mask, has_text)
        return part.filter(mask)

    def _batch(self, rows: pa.Table) -> Batch:
        parts = [matrix(rows.column(c)) for c in ("image", "text") if c in rows.column_names]
        x = torch.from_numpy(np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0])
        return Batch(
            x=x,
            y=torch.from_numpy(rows.column("label").to_numpy().astype(np.int64)),
            generator=rows.column("generator").to_numpy(zero_copy_only=False),
            sample_id=rows.column("sample_id").to_numpy(zero_copy_only=False),
            split=rows.column("split").to_numpy(zero_copy_only=False),
        )

    def _row_groups_of(self, splits: tuple[str, ...]) -> list[int]:
        """Row groups that may hold rows of these splits (the file is sorted by split)."""
        meta = self.file.metadata
        index = self.file.schema_arrow.get_field_index("split")
        keep = []
        for g in range(meta.num_row_groups):
            stats = meta.row_group(g).column(index).statistics
            if stats is None or not stats.has_min_max or any(stats.min <= s <= stats.max for s in splits):
                keep.append(g)
        return keep
