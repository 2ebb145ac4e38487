"""Where a command may write what the user asked for (`--output`): the one check every output path passes.

The store touches only itself: an output named by the user lies outside the store, or inside the
store's own `reports/` folder where a command allows it (`own="reports"`), never on a file the store
holds (its manifest, a shard, a dataset folder). And it replaces only a regular file: a device, a
FIFO, a socket, a symbolic link or a directory at the path is refused, so `--output /dev/null` run as
root leaves /dev/null a device. `atomic.atomic_write` refuses the same things at the moment it
renames, so a path that changed after this check is still never replaced by a file.

`output_format` names the format a file output's suffix asks for (.csv, .json or .parquet), and
`OutputStream` writes batch after batch to a hidden temp file beside the target and renames it into
place at the end (`finalize`): memory is one batch, and a run that fails leaves no half-written file
(nor a changed old one). CSV and JSON hold lists as text: a list column (predict's `neighbours`)
becomes a JSON string in CSV; JSON is one array of row objects, written as the rows come.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO, Literal

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.store.atomic import PARQUET_COMPRESSION, atomic_write, not_regular, remove_stale_temps_of, temp_path
from pipeline.store.layout import Store

# Names the store writes itself inside a folder that takes outputs: an output never replaces them.
_OWN_NAMES = {"reports": ("index.html",)}


def check_output(store: Store | None, path: Path, kind: Literal["file", "directory"] = "file",
                 own: str | None = None, flag: str = "--output", beside: Iterable[Path] = (),
                 instead: str = "give a folder to write into") -> Path:
    """Refuse `path` as an output with one sentence, or return it as an absolute path.

    `kind`: a file the command writes (its folder must exist), or a directory it writes files into
    (created if missing). `own`: the store folder (e.g. "reports") that may take the output; elsewhere
    inside `store` is refused. `beside`: other files the command writes next to `path` (landscape's
    JSON), checked the same way. `store` None: a command without a store (a detector folder). `instead`:
    what to give, where a directory is asked for and `path` is something else."""
    target = _absolute(path)
    for checked in (target, *(_absolute(p) for p in beside)):
        shown = path if checked == target else checked  # (a file beside is named as it is)
        _refuse_inside(store, checked, shown, own, flag)
        _refuse_special(checked, shown, kind if checked == target else "file", flag, instead)
    if kind == "file":
        parent = target.parent
        if not parent.is_dir():
            raise PipelineError(f"{flag} {path}: the folder {parent} does not exist.")
        if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
            raise PipelineError(f"{flag} {path} cannot be written (permission denied).")
    else:
        existing = next((p for p in (target, *target.parents) if os.path.lexists(p)), None)
        if existing is not None and not existing.is_dir():
            raise PipelineError(f"{flag} {path}: {existing} is not a directory.")
        if existing is not None and not os.access(existing, os.W_OK):
            raise PipelineError(f"{flag} {path} cannot be written (permission denied).")
    return target


def _absolute(path: Path) -> Path:
    """The path with its folder resolved (links followed) but its last name kept as given, so a link
    at the path itself is seen and refused rather than followed."""
    path = Path(os.path.abspath(Path(path).expanduser()))
    return path.parent.resolve() / path.name if path.name else path


def _refuse_inside(store: Store | None, target: Path, given: Path, own: str | None, flag: str) -> None:
    if store is None:
        return
    root = store.root.expanduser().resolve()
    if target != root and root not in target.parents:
        return
    if own is not None:
        folder = root / own
        inside = target.relative_to(folder).parts if folder in target.parents else ()
        if inside and not (len(inside) == 1 and inside[0] in _OWN_NAMES.get(own, ())):
            return
        raise PipelineError(f"{flag} {given} is inside the store {store.root}: write it outside the store, "
                            f"or under {store.root / own}/ in a name of your own.")
    raise PipelineError(f"{flag} {given} is inside the store {store.root}; the store holds only its own "
                        "files: write it elsewhere.")


def _refuse_special(target: Path, given: Path, kind: str, flag: str, instead: str) -> None:
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return
    except NotADirectoryError as exc:  # a folder on the way is something else (/dev/null/x.csv)
        blocking = next(p for p in target.parents if os.path.lexists(p))  # (the root, at worst)
        raise PipelineError(f"{flag} {given}: {blocking} is {_noun(os.lstat(blocking).st_mode)}, not a folder "
                            "to write into.") from exc
    except OSError as exc:
        raise PipelineError(f"{flag} {given} cannot be checked ({exc.strerror or exc}).") from exc
    if kind == "directory":
        if stat.S_ISDIR(st.st_mode):
            return
        raise PipelineError(f"{flag} {given} is {_noun(st.st_mode)}, not a directory; {instead}.")
    if stat.S_ISREG(st.st_mode):
        return
    if stat.S_ISDIR(st.st_mode):
        raise PipelineError(f"{flag} {given} is a directory; give a file name.")
    raise PipelineError(f"{flag} {given} is {not_regular(st.st_mode)}; the pipeline replaces only a regular "
                        "file: give the name of a new or regular file.")


def _noun(mode: int) -> str:
    """What a file of this mode is, as a noun phrase ("a file", "a character device")."""
    return "a file" if stat.S_ISREG(mode) else not_regular(mode)


FORMATS = {".csv": "csv", ".json": "json", ".parquet": "parquet"}
OUTPUT_GROUP_ROWS = 65_536  # rows per row group of a Parquet output


def output_format(path: Path, flag: str = "--output") -> str:
    """The format `path`'s suffix names, or a sentence saying which suffixes are known."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise PipelineError(f"{flag} {path} must end in .csv, .json or .parquet (the format follows the suffix).")
    return fmt


class OutputStream:
    """Rows of `schema` streamed to a temp file beside `path`, in `fmt`; `finalize` publishes it."""

    def __init__(self, path: Path, schema: pa.Schema, fmt: str) -> None:
        self.path, self.schema, self.fmt = path, schema, fmt
        remove_stale_temps_of(Path(os.path.abspath(path)))  # a killed predict's, into this same file
        self.tmp = temp_path(Path(os.path.abspath(path)))
        self.rows = 0
        self._file: BinaryIO | None = open(self.tmp, "wb")  # noqa: SIM115 - closed by finalize/discard
        self._writer: Any = None
        self._pending: list[pa.Table] = []  # parquet: rows buffered up to a row group
        self._buffered = 0
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
        if self.fmt == "parquet":  # in row groups of OUTPUT_GROUP_ROWS: a footer entry per 64-row batch
            self._pending.append(table)  # grew memory by ~300 bytes a row (125 MB at 300k) and slowed readers
            self._buffered += table.num_rows
            if self._buffered >= OUTPUT_GROUP_ROWS:
                self._flush()
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
            if finished:
                self._flush()
            self._writer.close()
        elif finished:
            self._file.write(b"\n]\n" if self.rows else b"]\n")
        self._file.close()
        self._file = None


    def _flush(self) -> None:
        if self._pending:
            self._writer.write_table(pa.concat_tables(self._pending).combine_chunks())
        self._pending, self._buffered = [], 0


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
