"""img2dataset output: `*.tar` shards holding `KEY.jpg|png|webp`, `KEY.txt`, `KEY.json`.

Label and generator come from `--generator NAME` (`real` → label 0) for the whole source, or from
a mapping file (CSV with columns `key`, `label`, `generator`), which wins where it names a key.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.sources.common import (
    REAL,
    Candidate,
    Item,
    Problem,
    image_member,
    iter_tar_entries,
    tar_location,
    tar_member_bytes,
    tar_text,
)
from pipeline.sources.locations import Location


def iter_webdataset(source: Path, generator: str | None, label_map: Path | None) -> Iterator[Item]:
    tars = [source] if source.is_file() else sorted(source.glob("**/*.tar"))
    if not tars:
        raise PipelineError(f"{source} holds no .tar shards.")
    mapping = _read_label_map(label_map) if label_map else {}
    if generator is None and not mapping:
        raise PipelineError("webdataset sources need --generator NAME (or 'real') or --label-map FILE.")
    for tar in tars:
        for tf, entry in iter_tar_entries(tar):
            member = image_member(entry)
            if member is None:
                continue  # a key with only metadata (img2dataset keeps failed downloads' json)
            short_key = entry.key.rpartition("/")[2]
            label_gen = mapping.get(short_key) or mapping.get(entry.key)
            if label_gen is None:
                if generator is None:
                    yield Problem(
                        "unlabelled",
                        f"key {entry.key} is not in the label map",
                        Location(uri=str(tar.resolve()), member=member.name),
                    )
                    continue
                label_gen = (0 if generator.lower() == REAL else 1, generator)
            label, gen = label_gen
            yield Candidate(
                data=tar_member_bytes(tf, member),
                location=tar_location(tar, member),
                label=label,
                generator=gen,
                group_key=f"key:{short_key}",
                text=tar_text(tf, entry, "txt"),
            )


def _read_label_map(path: Path) -> dict[str, tuple[int, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"key", "label"} <= set(reader.fieldnames or []):
            raise PipelineError(f"{path} needs columns key, label (and optionally generator).")
        out: dict[str, tuple[int, str]] = {}
        for row in reader:
            label = parse_label(row["label"], f"{path} key {row['key']}")
            out[row["key"]] = (label, row.get("generator") or (REAL if label == 0 else "generated"))
        return out


def parse_label(value: object, where: str) -> int:
    text = str(value).strip().lower()
    if text in ("0", "real", "false"):
        return 0
    if text in ("1", "fake", "generated", "true"):
        return 1
    raise PipelineError(f"{where}: label {value!r} is neither 0/real nor 1/generated.")
