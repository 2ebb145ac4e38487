"""A CSV or Parquet manifest: `path`, `caption`, `label`, `generator`, optional `split`, `group`.

Relative paths are resolved against the manifest's directory. Each row is one unit (its image file
plus the row's own values), so a rewritten manifest costs only its new or changed rows. A CSV
manifest is a unit too, read last: its ledger row says where its last complete line ended, so rows
appended after it are read without parsing the rows before (a CSV rewritten there is read whole
again; its unchanged rows are skipped as units). The manifest is streamed in batches: a manifest of
millions of rows is never held whole.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NoReturn

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.sources.common import (
    REAL,
    Candidate,
    Items,
    Limits,
    Resume,
    Unit,
    hash_file,
    resume_point,
    row_fingerprint,
    stat_unit,
)
from pipeline.sources.generators import canonical
from pipeline.sources.webdataset import parse_label

REQUIRED = ("path", "caption", "label", "generator")
SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"validation": "val", "valid": "val"}
_BATCH_ROWS = 65_536


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
        if not start or start.offset < itself.size:
            for batch in _batches(self.path, start.offset if start else 0):
                for row in batch.to_pylist():
                    n += 1
                    image = Path(str(row["path"]))
                    image = image if image.is_absolute() else self.path.parent / image
                    yield stat_unit(image, extra=row_fingerprint(row), payload=(n, row))
        if self.path.suffix != ".parquet":
            yield Unit(itself.path, itself.size, itself.mtime_ns, payload=_End(self._end(itself.size, n)), resume=start)

    def _end(self, size: int, rows: int) -> Resume | None:
        """Where the next read starts: the end of the file as stat-ed, if a line ends there (a last
        line without its newline may be one half written)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(max(0, size - 1))
                ends_line = f.read(1) == b"\n"
        except OSError:
            return None
        return resume_point(self.path, size, rows) if ends_line else None

    def items(self, unit: Unit) -> Items:
        if isinstance(unit.payload, _End):
            return unit.payload.resume  # the manifest itself: its rows were the units before it
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
    """The payload of a CSV manifest's own unit: where its next read starts."""

    resume: Resume | None


def _columns(path: Path) -> list[str]:
    try:
        if path.suffix == ".parquet":
            return pq.read_schema(path).names
        with _csv(path) as reader:
            return reader.schema.names
    except (pa.ArrowInvalid, pa.ArrowException, OSError, UnicodeDecodeError) as exc:
        _unreadable(path, exc)


def _batches(path: Path, start: int = 0) -> Iterator[pa.RecordBatch]:
    """The manifest's rows, a batch at a time; of a CSV, those from byte `start` (a line's start)."""
    try:
        if path.suffix == ".parquet":
            yield from pq.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS)
            return
        if not start:
            with _csv(path) as reader:
                yield from reader
            return
        names = _columns(path)
        with open(path, "rb") as f:
            f.seek(start)
            with _csv(f, pacsv.ReadOptions(column_names=names)) as reader:
                yield from reader
    except (pa.ArrowInvalid, pa.ArrowException, OSError, UnicodeDecodeError) as exc:
        _unreadable(path, exc)


def _csv(source: Path | BinaryIO, read: pacsv.ReadOptions | None = None) -> pacsv.CSVStreamingReader:
    options = pacsv.ConvertOptions(column_types={c: pa.string() for c in ("path", "caption", "generator",
                                                                           "split", "group", "label")})
    return pacsv.open_csv(source, read_options=read, convert_options=options)


def _unreadable(path: Path, exc: BaseException) -> NoReturn:
    what = "Parquet" if path.suffix == ".parquet" else "CSV"
    reason = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
    raise PipelineError(f"Manifest {path} is not a readable {what} file ({reason}).") from exc
