"""A CSV or Parquet manifest: `path`, `caption`, `label`, `generator`, optional `split`, `group`.

Relative paths are resolved against the manifest's directory.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.sources.common import REAL, Candidate, Item, read_file
from pipeline.sources.webdataset import parse_label

REQUIRED = ("path", "caption", "label", "generator")
SPLITS = ("train", "val", "test")


def iter_manifest(path: Path) -> Iterator[Item]:
    if not path.is_file():
        raise PipelineError(f"Manifest {path} does not exist.")
    table = pq.read_table(path) if path.suffix == ".parquet" else pacsv.read_csv(path)
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise PipelineError(f"Manifest {path} lacks the column(s) {', '.join(missing)}.")
    for n, row in enumerate(table.to_pylist(), start=1):
        where = f"{path.name} line {n}"
        label = parse_label(row["label"], where)
        split = row.get("split") or None
        if split is not None and split not in SPLITS:
            raise PipelineError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}.")
        image = Path(str(row["path"]))
        read = read_file(image if image.is_absolute() else path.parent / image)
        if not isinstance(read, tuple):
            yield read
            continue
        data, loc = read
        yield Candidate(
            data=data,
            location=loc,
            label=label,
            generator=str(row["generator"] or (REAL if label == 0 else "generated")),
            group_key=f"group:{row['group']}" if row.get("group") else "",
            text=row["caption"],
            split=split,
        )
