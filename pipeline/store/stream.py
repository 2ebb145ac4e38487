"""The one streaming writer of the store: a Parquet file written batch by batch, published atomically.

Like Hugging Face datasets' `ArrowWriter` (`write_batch`, `finalize`): rows stream into a hidden
temp file beside the target, named for this process (`atomic.temp_path`), so a concurrent writer's
sweep leaves it alone and the next writer after a kill removes it. Batches are copied and buffered
into row groups of `group_rows`, so memory is one row group whatever the file's size. `finalize`
moves the finished file into place in one rename (the caller then commits it under the writer lock);
`discard` drops it. A stream that is never finalized leaves nothing behind.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.store.atomic import PARQUET_COMPRESSION, atomic_write, temp_path
from schemas import from_columns

GROUP_ROWS = 131_072  # rows per row group (batches are buffered up to this)

Columns = dict[str, pa.Array | pa.ChunkedArray | np.ndarray]


class ParquetStream:
    """Rows of `schema` (or of the first batch's schema) streamed to a temp file beside `path`."""

    def __init__(self, path: Path, schema: pa.Schema | None = None, group_rows: int = GROUP_ROWS,
                 compression: str = PARQUET_COMPRESSION) -> None:
        self.path, self.schema, self.tmp = path, schema, temp_path(path)
        self.group_rows, self.compression = group_rows, compression
        self.rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._pending: list[pa.Table] = []
        self._buffered = 0
        self._done = False  # closed: no more rows

    def write(self, batch: pa.Table | pa.RecordBatch | Columns) -> None:
        """Append rows: a table or batch (cast to the schema), or columns by name (built by `schema`).
        Copied: a batch is often a slice of a larger read (whose buffers a kept slice would keep
        whole), and numpy arrays kept from batch to batch would pin the C heap between larger buffers."""
        if isinstance(batch, dict):
            assert self.schema is not None, "columns by name need the stream's schema"
            copied = {k: pa.concat_arrays(v.chunks if isinstance(v, pa.ChunkedArray)
                                          else [v if isinstance(v, pa.Array) else pa.array(v)])
                      for k, v in batch.items()}
            table = from_columns(self.schema, copied)
        else:
            table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
            if self.schema is None:
                self.schema = table.schema
            table = table.cast(self.schema).combine_chunks()
        if not table.num_rows:
            return
        self._pending.append(table)
        self._buffered += table.num_rows
        self.rows += table.num_rows
        if self._buffered >= self.group_rows:
            self._flush()

    def close(self) -> Path:
        """Finish the temp file (no more rows) and return its path (a reader may read it before
        `finalize`, or instead of it: `GroupKeys`)."""
        if not self._done:
            self._flush()
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            self._done = True
        return self.tmp

    def finalize(self) -> Path:
        """Move the finished file into place atomically; returns the path, for `writes.commit`."""
        tmp = self.close()
        if not tmp.exists():  # no row was written: an empty file of the schema
            self._open()
            assert self._writer is not None
            self._writer.close()
            self._writer = None
        atomic_write(self.path, lambda target: os.replace(tmp, target))
        return self.path

    def discard(self) -> None:
        """Drop the temp file (a no-op once finalized)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._done = True
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> ParquetStream:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.discard()

    def _open(self) -> None:
        if self._writer is None:
            assert self.schema is not None, "a stream without a schema needs one batch first"
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self.tmp, self.schema, compression=self.compression,
                                            write_page_checksum=True)

    def _flush(self) -> None:
        if self._pending:
            self._open()
            assert self._writer is not None
            table = pa.concat_tables(self._pending)
            self._pending, self._buffered = [], 0
            self._writer.write_table(table, row_group_size=self.group_rows)
