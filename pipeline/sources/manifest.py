"""A CSV or Parquet manifest: `path`, `caption`, `label`, `generator`, optional `split`, `group`.

Relative paths are resolved against the manifest's directory. Each row is one unit (its image file
plus the row's own values), so a rewritten manifest costs only its new or changed rows. A CSV
manifest is a unit too, read last: its ledger row says where its last complete line ended, so rows
appended after it are read without parsing the rows before (a CSV rewritten there is read whole
again; its unchanged rows are skipped as units). The manifest is streamed in batches: a manifest of
millions of rows is never held whole. A CSV line over `MAX_LINE_BYTES` (a runaway caption) is not
parsed: it is quarantined as `line_too_long` and the other rows are read.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.sources.common import (
    REAL,
    Candidate,
    Items,
    Limits,
    Problem,
    Resume,
    Unit,
    absolute,
    hash_file,
    resume_point,
    row_fingerprint,
    stat_unit,
)
from pipeline.sources.generators import canonical
from pipeline.sources.locations import Location
from pipeline.sources.reading import CappedLines, opened
from pipeline.sources.webdataset import parse_label

REQUIRED = ("path", "caption", "label", "generator")
SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"validation": "val", "valid": "val"}
_BATCH_ROWS = 65_536
MAX_LINE_BYTES = 2 << 20  # a CSV line over this is quarantined unread (CLIP reads 77 tokens of a caption)
_BLOCK_BYTES = 2 * MAX_LINE_BYTES  # pyarrow's CSV block: a line within it always parses


class ManifestSource:
    def __init__(self, path: Path, limits: Limits) -> None:
        if not path.is_file():
            raise PipelineError(f"Manifest {path} does not exist or is not a file.")
        self.path, self.limits = path, limits
        missing = [c for c in REQUIRED if c not in _columns(path)]
        if missing:
            raise PipelineError(f"Manifest {path} lacks the column(s) {', '.join(missing)}.")

    def options(self) -> dict[str, object]:
        return {}

    def growing(self) -> list[Path]:
        return [] if self.path.suffix == ".parquet" else [self.path]

    def units(self, resume: Mapping[str, Resume]) -> Iterator[Unit]:
        itself = stat_unit(self.path)  # before reading: a line appended meanwhile is read again next time
        start = resume.get(itself.uri) if self.path.suffix != ".parquet" else None
        n = start.rows if start else 0
        dropped: list[tuple[int, int]] = []  # CSV lines over MAX_LINE_BYTES: (line number, bytes)
        if not start or start.offset < itself.size:
            for batch in _batches(self.path, start.offset if start else 0, n, dropped):
                for row in batch.to_pylist():
                    n += 1
                    image = Path(str(row["path"]))
                    image = image if image.is_absolute() else self.path.parent / image
                    yield stat_unit(image, extra=row_fingerprint(row), payload=(n, row))
        if self.path.suffix != ".parquet":
            yield Unit(itself.path, itself.size, itself.mtime_ns, payload=_End(self._end(itself.size, n), dropped),
                       resume=start)

    def _end(self, size: int, rows: int) -> Resume | None:
        """Where the next read starts: the end of the file as stat-ed, if a line ends there (a last
        line without its newline may be one half written)."""
        try:
            with opened(self.path, whole=False) as (f, _):
                f.seek(max(0, size - 1))
                ends_line = f.read(1) == b"\n"
        except OSError:
            return None
        return resume_point(self.path, size, rows) if ends_line else None

    def items(self, unit: Unit) -> Items:
        if isinstance(unit.payload, _End):  # the manifest itself: its rows were the units before it
            for line, size in unit.payload.dropped:
                yield Problem("line_too_long", f"{self.path.name} line {line} holds {size} bytes, over the "
                              f"{MAX_LINE_BYTES}-byte limit of a manifest line; it was not read",
                              Location(uri=absolute(self.path), row=line))
            return unit.payload.resume
        n, row = unit.payload
        where = f"{self.path.name} line {n}"
        label = parse_label(row["label"], where)
        split = str(row.get("split") or "").strip().lower() or None
        split = _SPLIT_ALIASES.get(split, split) if split else None
        if split is not None and split not in SPLITS:
            raise PipelineError(f"{where}: split {row.get('split')!r} is not one of {', '.join(SPLITS)}.")
        hashed = hash_file(unit.path, self.limits)
        if not isinstance(hashed, tuple):
            yield hashed
            return None
        sample_id, size, loc = hashed
        original = str(row["generator"] or (REAL if label == 0 else "generated"))
        caption = row["caption"]
        yield Candidate(
            sample_id, size, loc, label,
            REAL if label == 0 else canonical(original),
            f"group:{row['group']}" if row.get("group") else "",
            None if caption is None else str(caption),
            split,
            None if label == 0 else original,
        )
        return None


@dataclass(frozen=True)
class _End:
    """The payload of a CSV manifest's own unit: where its next read starts, and the lines dropped."""

    resume: Resume | None
    dropped: list[tuple[int, int]] = field(default_factory=list)


def _columns(path: Path) -> list[str]:
    try:
        if path.suffix == ".parquet":
            return pq.read_schema(path).names
        with ExitStack() as stack, _csv(stack, path) as reader:
            return reader.schema.names
    except (pa.ArrowInvalid, pa.ArrowException, OSError, UnicodeDecodeError) as exc:
        _unreadable(path, exc)


def _batches(path: Path, start: int = 0, rows: int = 0,
             dropped: list[tuple[int, int]] | None = None) -> Iterator[pa.RecordBatch]:
    """The manifest's rows, a batch at a time; of a CSV, those from byte `start` (a line's start,
    after `rows` rows), its lines over `MAX_LINE_BYTES` noted in `dropped`, not parsed."""
    try:
        if path.suffix == ".parquet":
            yield from pq.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS)
            return
        names = _columns(path) if start else None
        with ExitStack() as stack, _csv(stack, path, start, names, rows + 2, dropped) as reader:
            yield from reader
    except (pa.ArrowInvalid, pa.ArrowException, OSError, UnicodeDecodeError) as exc:
        _unreadable(path, exc)


def _csv(stack: ExitStack, path: Path, start: int = 0, names: list[str] | None = None, first_line: int = 1,
         dropped: list[tuple[int, int]] | None = None) -> pacsv.CSVStreamingReader:
    """A streaming reader of the CSV from byte `start` (with the header's `names` when not from the
    top), through `CappedLines`: a line over the cap is dropped (noted in `dropped`), never handed to
    pyarrow, which would refuse the whole file over it."""
    raw, _ = stack.enter_context(opened(path, whole=False))  # a FIFO named .csv never blocks
    raw.seek(start)
    capped = CappedLines(raw, MAX_LINE_BYTES, first_line if start else 1)
    if dropped is not None:
        capped.dropped = dropped
    read = pacsv.ReadOptions(block_size=_BLOCK_BYTES, column_names=names)
    convert = pacsv.ConvertOptions(column_types={c: pa.string() for c in ("path", "caption", "generator",
                                                                           "split", "group", "label")})
    return pacsv.open_csv(capped, read_options=read, convert_options=convert)


def _unreadable(path: Path, exc: BaseException) -> NoReturn:
    what = "Parquet" if path.suffix == ".parquet" else "CSV"
    reason = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
    raise PipelineError(f"Manifest {path} is not a readable {what} file ({reason}).") from exc
