"""`root/<class>/…`: class `real` → label 0, any other class name → label 1 with that generator.
Unlabelled (`ingest --unlabelled`): a folder of any layout, every image under it, with no label.

Captions come from a sidecar `.txt` with the image's stem, or from `root/captions.csv`
(columns `path` relative to root, or `file`/`filename`, and `caption`). Group key: the file stem
(`--group-by stem`, so `real/0001.jpg` and `sdxl/0001.png` share a split) or the image itself.
Each image file is one unit: a grown folder costs only its new files. A file name that is not
UTF-8 is kept as the OS gives it (its `source_uri` a `file://` URI of its bytes; its group key and
class name shown with \\xNN escapes), so such a file is ingested like any other.
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.sources import reading
from pipeline.sources.common import REAL, Candidate, Items, Limits, Resume, Unit, hash_file, is_image, stat_unit
from pipeline.sources.generators import canonical
from pipeline.sources.reading import Unreadable, text_of

GROUP_BY = ("stem", "image")


class FolderSource:
    def __init__(self, root: Path, group_by: str, limits: Limits, unlabelled: bool = False) -> None:
        if not root.is_dir():
            raise PipelineError(f"{root} is not a directory of class folders (real/, <generator>/).")
        self.unlabelled = unlabelled
        self.classes = [root] if unlabelled else sorted(p for p in root.iterdir() if p.is_dir())
        if not self.classes:
            raise PipelineError(f"{root} has no class folders; expected real/ and one per generator "
                                "(or --unlabelled for images without labels, in any layout).")
        self.root, self.group_by, self.limits = root, group_by, limits
        self.captions = _captions_csv(root)

    def options(self) -> dict[str, object]:
        csv_path = self.root / "captions.csv"
        try:
            digest = reading.hash_file(csv_path, Limits(sys.maxsize))[0] if csv_path.exists() else None
        except Unreadable as exc:
            raise PipelineError(f"{exc.detail}: captions.csv must be a readable file.") from exc
        # (the key only when set: folders ingested before the option keep their ledger rows)
        return {"group_by": self.group_by, "captions_csv": digest, **({"unlabelled": True} if self.unlabelled else {})}

    def growing(self) -> list[Path]:
        return []  # each image is a unit: a grown folder costs its new files already

    def units(self, resume: Mapping[str, Resume]) -> Iterator[Unit]:
        for class_dir in self.classes:
            for path in _images(class_dir):
                txt = path.with_suffix(".txt")
                yield stat_unit(path, extra=_sidecar_digest(txt), payload=class_dir.name)

    def items(self, unit: Unit) -> Items:
        class_name = text_of(unit.payload)
        hashed = hash_file(unit.path, self.limits)
        if not isinstance(hashed, tuple):
            yield hashed
            return None
        sample_id, size, loc = hashed
        rel = unit.path.relative_to(self.root).as_posix()
        text = self.captions.get(rel) or self.captions.get(unit.path.name) or _sidecar(unit.path)
        if self.unlabelled:  # no class, no group: an unlabelled image splits nothing
            yield Candidate(sample_id, size, loc, None, None, "", text)
            return None
        label = 0 if class_name.lower() == REAL else 1
        group = f"stem:{text_of(unit.path.stem)}" if self.group_by == "stem" else ""
        generator = REAL if label == 0 else canonical(class_name)
        yield Candidate(sample_id, size, loc, label, generator, group, text, None,
                        None if label == 0 else class_name)
        return None


def _images(root: Path) -> Iterator[Path]:
    """The image files under `root`, folder by folder in name order: one folder's listing in memory
    at a time, not every path of a million-image tree."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if is_image(name):
                yield Path(dirpath) / name


def _sidecar(path: Path) -> str | None:
    """The caption in `<stem>.txt` (its first MiB: a bounded read; a FIFO or device there is no caption)."""
    text = reading.read_text(path.with_suffix(".txt"))
    return None if text is None else text.strip()


def _sidecar_digest(txt: Path) -> str | None:
    """A changed sidecar caption makes its image a changed unit."""
    return reading.head_digest(txt)


def _captions_csv(root: Path) -> dict[str, str]:
    path = root / "captions.csv"
    if not path.exists():
        return {}
    try:
        reading.ensure_regular(path)  # a FIFO there would block the open below
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = set(reader.fieldnames or [])
            key = next((k for k in ("path", "file", "filename") if k in fields), None)
            if key is None or "caption" not in fields:
                raise PipelineError(f"{path} needs a 'caption' column and one of path, file, filename.")
            return {row[key]: row["caption"] for row in reader}
    except (UnicodeDecodeError, csv.Error, OSError) as exc:
        raise PipelineError(f"{path} is not a readable UTF-8 CSV file ({exc}).") from exc
