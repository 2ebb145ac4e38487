"""What `pipeline predict` is given, as rows: image files, folders of any layout, webdataset tars,
and CSV or Parquet lists of paths (with an optional `caption` column).

`inputs(sources)` yields Arrow batches of `schemas.PREDICT_INPUTS` rows, a folder listing or a list
file's rows at a time (never every path at once). Nothing of an image is read here: its bytes are
read later, bounded (`pipeline.sources.reading`), by the unit that hashes and decodes them. What can
be known unreadable from its name alone (no such file, a device or a FIFO given by name, a damaged
tar, a list line over its cap) is a row with a reason, so predict answers every input.

Captions come from the list's `caption` column, a tar key's `KEY.txt`, or a sidecar `<stem>.txt`
(read bounded: a FIFO there is no caption); `default_caption` fills the rest.
"""

from __future__ import annotations

import csv
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.sources import reading
from pipeline.sources.common import (
    DamagedArchive,
    Returning,
    image_member,
    is_image,
    iter_tar_entries,
    tar_text,
)
from pipeline.sources.reading import NOT_REGULAR, UNREADABLE, CappedLines, kind, text_of, uri_of
from schemas import PREDICT_INPUTS, from_rows

BATCH_ROWS = 4096
LIST_SUFFIXES = (".csv", ".parquet")
MAX_LINE_BYTES = 1 << 20  # a list line over this is reported, not parsed
_TAR_SUFFIXES = (".tar",)


def inputs(sources: list[Path], default_caption: str | None = None) -> Iterator[pa.Table]:
    """Batches of input rows for every image the sources name, in the order given (folders in name order)."""
    rows: list[dict[str, Any]] = []
    for source in sources:
        for row in _rows_of(source):
            if row["caption"] is None and default_caption is not None and row["reason"] is None:
                row["caption"] = default_caption
            rows.append(row)
            if len(rows) >= BATCH_ROWS:
                yield from_rows(PREDICT_INPUTS, rows)
                rows = []
    if rows:
        yield from_rows(PREDICT_INPUTS, rows)


def _rows_of(source: Path) -> Iterator[dict[str, Any]]:
    try:
        st = os.stat(source)  # (a FIFO or a device is stat-ed, never opened)
    except OSError as exc:
        yield _problem(source, UNREADABLE, f"{text_of(source)}: {exc.strerror or exc}")
        return
    if stat.S_ISDIR(st.st_mode):
        yield from _folder(source)
    elif not stat.S_ISREG(st.st_mode):
        yield _problem(source, NOT_REGULAR, f"{text_of(source)} is a {kind(st.st_mode)}, not a regular file")
    elif source.suffix.lower() in _TAR_SUFFIXES:
        yield from _tar(source)
    elif source.suffix.lower() in LIST_SUFFIXES:
        yield from _list(source)
    else:  # named by the user: an image whatever its suffix (if it is none, decoding says so)
        yield _image(source)


def _folder(root: Path) -> Iterator[dict[str, Any]]:
    """Every image file under `root` (by suffix), one folder's listing at a time, in name order; links
    to folders are not followed (a loop would never end)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if is_image(name):
                yield _image(Path(dirpath) / name)


def _image(path: Path, caption: str | None = None) -> dict[str, Any]:
    if caption is None:
        text = reading.read_text(path.with_suffix(".txt"))  # bounded; a FIFO or a device there is no caption
        caption = None if text is None else text.strip() or None
    return {"path": text_of(path), "source_uri": uri_of(path), "source_member": None, "byte_offset": None,
            "byte_length": None, "caption": caption, "reason": None, "detail": None}


def _tar(path: Path) -> Iterator[dict[str, Any]]:
    entries = Returning(iter_tar_entries(path))
    try:
        for tf, entry in entries:
            member = image_member(entry)
            if member is None:
                continue
            yield {"path": f"{text_of(path)}::{text_of(member.name)}", "source_uri": uri_of(path),
                   "source_member": text_of(member.name), "byte_offset": member.offset_data,
                   "byte_length": member.size, "caption": tar_text(tf, entry, "txt") or None, "reason": None,
                   "detail": None}
    except DamagedArchive as exc:
        yield _problem(path, "unreadable_archive", str(exc).rstrip("."))


def _list(path: Path) -> Iterator[dict[str, Any]]:
    """A list's rows: `path` (relative to the list's folder unless absolute) and an optional `caption`."""
    folder = path.parent
    for row in (_parquet_rows(path) if path.suffix.lower() == ".parquet" else _csv_rows(path)):
        if "line" in row:  # a line over the cap: reported, its path unknown
            yield _problem(path, "line_too_long", f"{text_of(path.name)} line {row['line']} holds {row['bytes']} "
                           f"bytes, over the {MAX_LINE_BYTES}-byte limit of a list line; it was not read")
            continue
        if not row.get("path"):
            continue
        image = Path(str(row["path"]))
        found = _named(image if image.is_absolute() else folder / image)
        caption = row.get("caption")
        if caption is not None and str(caption).strip() and found["reason"] is None:
            found["caption"] = str(caption)
        yield found


def _named(path: Path) -> dict[str, Any]:
    """A file a list names, as an image (a list's rows never lead to another list, a tar or a folder)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return _problem(path, UNREADABLE, f"{text_of(path)}: {exc.strerror or exc}")
    if not stat.S_ISREG(st.st_mode):
        return _problem(path, NOT_REGULAR, f"{text_of(path)} is a {kind(st.st_mode)}, not a regular file")
    return _image(path)


def _csv_rows(path: Path) -> Iterator[dict[str, Any]]:
    try:
        with reading.opened(path, whole=False) as (raw, _):
            capped = CappedLines(raw, MAX_LINE_BYTES)
            reader = csv.DictReader(_lines(capped))
            if "path" not in (reader.fieldnames or []):
                raise PipelineError(f"The list {text_of(path)} needs a 'path' column (and may have 'caption').")
            yield from reader
            for line, size in capped.dropped:
                yield {"line": line, "bytes": size}
    except reading.Unreadable as exc:
        raise PipelineError(f"The list {exc.detail} ({exc.reason}).") from exc
    except csv.Error as exc:
        raise PipelineError(f"The list {text_of(path)} is not a readable CSV file ({exc}).") from exc


def _lines(capped: CappedLines) -> Iterator[str]:
    """The text lines of a capped stream, each with its newline (what `csv` reads)."""
    rest = b""
    while chunk := capped.read(reading.CHUNK):
        *lines, rest = (rest + chunk).split(b"\n")
        for line in lines:
            yield line.decode("utf-8", "replace") + "\n"
    if rest:
        yield rest.decode("utf-8", "replace")


def _parquet_rows(path: Path) -> Iterator[dict[str, Any]]:
    try:
        reading.ensure_regular(path)
        file = pq.ParquetFile(path)
    except (OSError, ValueError) as exc:
        raise PipelineError(f"The list {text_of(path)} is not a readable Parquet file ({exc}).") from exc
    names = file.schema_arrow.names
    if "path" not in names:
        raise PipelineError(f"The list {text_of(path)} needs a 'path' column (and may have 'caption').")
    columns = ["path"] + (["caption"] if "caption" in names else [])
    for batch in file.iter_batches(batch_size=BATCH_ROWS, columns=columns):
        yield from batch.to_pylist()


def _problem(path: Path, reason: str, detail: str) -> dict[str, Any]:
    return {"path": text_of(path), "source_uri": uri_of(path), "source_member": None, "byte_offset": None,
            "byte_length": None, "caption": None, "reason": reason, "detail": detail}
