"""A CSV or Parquet manifest: `path`, `caption`, `label`, `generator`, optional `split`, `group`.

Relative paths are resolved against the manifest's directory. Each row is one unit (its image file
plus the row's own values), so a grown manifest costs only its new or changed rows. The manifest is
streamed in batches: a manifest of millions of rows is never held whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.sources.common import REAL, Candidate, Item, Limits, Unit, hash_file, row_fingerprint, stat_unit
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

    def units(self) -> Iterator[Unit]:
        n = 0
        for batch in _batches(self.path):
            for row in batch.to_pylist():
                n += 1
                image = Path(str(row["path"]))
                image = image if image.is_absolute() else self.path.parent / image
                yield stat_unit(image, extra=row_fingerprint(row), payload=(n, row))

    def items(self, unit: Unit) -> Iterator[Item]:
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
            return
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


def _columns(path: Path) -> list[str]:
    try:
        if path.suffix == ".parquet":
            return pq.read_schema(path).names
        with _csv(path) as reader:
            return reader.schema.names
    except (pa.ArrowInvalid, pa.ArrowException, OSError, UnicodeDecodeError) as exc:
        _unreadable(path, exc)


def _batches(path: Path) -> Iterator[pa.RecordBatch]:
    """The manifest's rows, a batch at a time."""
    try:
        if path.suffix == ".parquet":
            yield from pq.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS)
            return
        with _csv(path) as reader:
            yield from reader
    except (pa.ArrowInvalid, pa.ArrowException, OSError, UnicodeDecodeError) as exc:
        _unreadable(path, exc)


def _csv(path: Path) -> pacsv.CSVStreamingReader:
    options = pacsv.ConvertOptions(column_types={c: pa.string() for c in ("path", "caption", "generator",
                                                                           "split", "group", "label")})
    return pacsv.open_csv(path, convert_options=options)


def _unreadable(path: Path, exc: BaseException) -> NoReturn:
    what = "Parquet" if path.suffix == ".parquet" else "CSV"
    reason = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
    raise PipelineError(f"Manifest {path} is not a readable {what} file ({reason}).") from exc
