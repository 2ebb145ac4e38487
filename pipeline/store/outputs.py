"""Files written for the user outside the store (`predict --output`): checked, streamed, published whole.

`check_output` refuses, before any work, a path inside the store, a directory, a symbolic link, a
device, FIFO or socket (writing to one could block or reach hardware), a folder that does not exist
or cannot be written, and a suffix other than .csv, .json or .parquet. `OutputStream` writes batch
after batch to a hidden temp file beside the target and renames it into place at the end (`finalize`):
memory is one batch, and a run that fails leaves no half-written file (nor a changed old one).

CSV and JSON hold lists as text: a list column (predict's `neighbours`) becomes a JSON string in CSV;
JSON is one array of row objects, written as the rows come.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.store.atomic import PARQUET_COMPRESSION, atomic_write, temp_path

FORMATS = {".csv": "csv", ".json": "json", ".parquet": "parquet"}


def check_output(path: Path, store_root: Path | None = None) -> str:
    """The format of `path` (from its suffix), or a sentence saying why it cannot be written."""
    target = Path(os.path.abspath(path.expanduser()))
    if store_root is not None:
        root = store_root.expanduser().resolve()
        real = target.parent.resolve() / target.name
        if real == root or root in real.parents:
            raise PipelineError(f"--output {path} is inside the store {store_root}; write it elsewhere.")
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise PipelineError(f"--output {path} cannot be checked ({exc.strerror or exc}).") from exc
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise PipelineError(f"--output {path} is a symbolic link; give the file itself.")
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise PipelineError(f"--output {path} is a directory; give a file name.")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise PipelineError(f"--output {path} is a device, FIFO or socket, not a file; give a file name.")
    if not target.parent.is_dir():
        raise PipelineError(f"--output {path}: the folder {target.parent} does not exist.")
    if not os.access(target.parent, os.W_OK):
        raise PipelineError(f"--output {path} cannot be written (permission denied).")
    fmt = FORMATS.get(target.suffix.lower())
    if fmt is None:
        raise PipelineError(f"--output {path} must end in .csv, .json or .parquet (the format follows the suffix).")
    return fmt


class OutputStream:
    """Rows of `schema` streamed to a temp file beside `path`, in `fmt`; `finalize` publishes it."""

    def __init__(self, path: Path, schema: pa.Schema, fmt: str) -> None:
        self.path, self.schema, self.fmt = path, schema, fmt
        self.tmp = temp_path(Path(os.path.abspath(path)))
        self.rows = 0
        self._file: BinaryIO | None = open(self.tmp, "wb")  # noqa: SIM115 - closed by finalize/discard
        self._writer: Any = None
        if fmt == "parquet":
            self._writer = pq.ParquetWriter(self._file, schema, compression=PARQUET_COMPRESSION)
        elif fmt == "csv":
            self._writer = pacsv.CSVWriter(self._file, _flat_schema(schema))
        else:
            self._file.write(b"[")

    def write(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        table = table.cast(self.schema)
        if self.fmt == "parquet":
            self._writer.write_table(table)
        elif self.fmt == "csv":
            self._writer.write_table(_flat(table))
        else:
            assert self._file is not None
            text = ",\n".join(json.dumps(row, default=str) for row in table.to_pylist())
            self._file.write((("\n" if not self.rows else ",\n") + text).encode("utf-8"))
        self.rows += table.num_rows

    def finalize(self) -> Path:
        """Finish the file and move it into place in one rename; returns the path."""
        self._close()
        atomic_write(Path(os.path.abspath(self.path)), lambda target: os.replace(self.tmp, target))
        return self.path

    def discard(self) -> None:
        self._close(finished=False)
        self.tmp.unlink(missing_ok=True)

    def _close(self, finished: bool = True) -> None:
        if self._file is None:
            return
        if self._writer is not None:
            self._writer.close()
        elif finished:
            self._file.write(b"\n]\n" if self.rows else b"]\n")
        self._file.close()
        self._file = None


def _flat_schema(schema: pa.Schema) -> pa.Schema:
    return pa.schema([f.with_type(pa.string()) if _nested(f.type) else f for f in schema])


def _flat(table: pa.Table) -> pa.Table:
    """CSV has no lists: a list or struct column becomes JSON text."""
    columns = []
    for col in table.columns:
        if _nested(col.type):
            col = pa.array([None if v is None else json.dumps(v) for v in col.to_pylist()], pa.string())
        columns.append(col)
    return pa.Table.from_arrays(columns, schema=_flat_schema(table.schema))


def _nested(kind: pa.DataType) -> bool:
    return pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind) or pa.types.is_struct(kind)
