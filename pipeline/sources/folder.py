"""`root/<class>/…`: class `real` → label 0, any other class name → label 1 with that generator.

Captions come from a sidecar `.txt` with the image's stem, or from `root/captions.csv`
(columns `path` relative to root, or `file`/`filename`, and `caption`). Group key: the file stem
(`--group-by stem`, so `real/0001.jpg` and `sdxl/0001.png` share a split) or the image itself.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.sources.common import REAL, Candidate, Item, is_image, read_file

GROUP_BY = ("stem", "image")


def iter_folder(root: Path, group_by: str = "stem") -> Iterator[Item]:
    if not root.is_dir():
        raise PipelineError(f"{root} is not a directory of class folders (real/, <generator>/).")
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    if not classes:
        raise PipelineError(f"{root} has no class folders; expected real/ and one per generator.")
    captions = _captions_csv(root)
    for class_dir in classes:
        label = 0 if class_dir.name.lower() == REAL else 1
        generator = REAL if label == 0 else class_dir.name
        for path in sorted(p for p in class_dir.rglob("*") if p.is_file() and is_image(p)):
            read = read_file(path)
            if not isinstance(read, tuple):
                yield read
                continue
            data, loc = read
            rel = path.relative_to(root).as_posix()
            text = captions.get(rel) or captions.get(path.name) or _sidecar(path)
            group = f"stem:{path.stem}" if group_by == "stem" else ""
            yield Candidate(data, loc, label, generator, group, text)


def _sidecar(path: Path) -> str | None:
    txt = path.with_suffix(".txt")
    return txt.read_text(encoding="utf-8", errors="replace").strip() if txt.exists() else None


def _captions_csv(root: Path) -> dict[str, str]:
    path = root / "captions.csv"
    if not path.exists():
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = set(reader.fieldnames or [])
        key = next((k for k in ("path", "file", "filename") if k in fields), None)
        if key is None or "caption" not in fields:
            raise PipelineError(f"{path} needs a 'caption' column and one of path, file, filename.")
        return {row[key]: row["caption"] for row in reader}
