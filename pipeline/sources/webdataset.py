"""img2dataset output: `*.tar` shards holding `KEY.jpg|png|webp`, `KEY.txt`, `KEY.json`.

Label and generator come from `--generator NAME` (`real` → label 0) for the whole source, or from
a mapping file (CSV with columns `key`, `label`, `generator`), which wins where it names a key;
or there are none (`ingest --unlabelled`).
Each tar is one unit; a tar appended to (`tar -r`) is read from where the last read stopped.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterator, Mapping
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.sources.common import (
    REAL,
    Candidate,
    DamagedArchive,
    Items,
    Limits,
    Problem,
    Resume,
    Returning,
    Unit,
    absolute,
    archive_problem,
    image_member,
    iter_tar_entries,
    stat_unit,
    tar_candidate_or_problem,
    tar_text,
)
from pipeline.sources.generators import canonical
from pipeline.sources.locations import Location
from pipeline.sources.reading import ensure_regular


class WebdatasetSource:
    def __init__(self, source: Path, generator: str | None, label_map: Path | None, limits: Limits,
                 unlabelled: bool = False) -> None:
        self.tars = [source] if source.is_file() else sorted(source.glob("**/*.tar"))
        if not self.tars:
            raise PipelineError(f"{source} holds no .tar shards.")
        if unlabelled and (generator is not None or label_map is not None):
            raise PipelineError("--unlabelled records images without labels: leave out --generator and --label-map.")
        self.mapping = _read_label_map(label_map) if label_map else {}
        if generator is None and not self.mapping and not unlabelled:
            raise PipelineError("webdataset sources need --generator NAME (or 'real') or --label-map FILE "
                                "(or --unlabelled).")
        self.generator, self.label_map, self.limits, self.unlabelled = generator, label_map, limits, unlabelled

    def options(self) -> dict[str, object]:
        digest = hashlib.sha256(self.label_map.read_bytes()).hexdigest() if self.label_map else None
        return {"generator": self.generator, "label_map": digest, **({"unlabelled": True} if self.unlabelled else {})}

    def growing(self) -> list[Path]:
        return self.tars

    def units(self, resume: Mapping[str, Resume]) -> Iterator[Unit]:
        for tar in self.tars:
            yield stat_unit(tar, resume=resume.get(absolute(tar)))

    def items(self, unit: Unit) -> Items:
        try:
            return (yield from self._entries(unit.path, unit.resume.offset if unit.resume else 0))
        except DamagedArchive as exc:
            yield archive_problem(unit.path, exc)
            return None

    def _entries(self, tar: Path, start: int) -> Items:
        entries = Returning(iter_tar_entries(tar, start))
        for tf, entry in entries:
            member = image_member(entry)
            if member is None:
                continue  # a key with only metadata (img2dataset keeps failed downloads' json)
            short_key = entry.key.rpartition("/")[2]
            label_gen: tuple[int | None, str | None] | None = self.mapping.get(short_key) or self.mapping.get(entry.key)
            if self.unlabelled:
                label_gen = (None, None)
            elif label_gen is None:
                if self.generator is None:
                    yield Problem(
                        "unlabelled",
                        f"key {entry.key} is not in the label map",
                        Location(uri=absolute(tar), member=member.name),
                    )
                    continue
                label_gen = (0 if self.generator.lower() == REAL else 1, self.generator)
            label, gen = label_gen
            got = tar_candidate_or_problem(tar, tf, member, self.limits)
            if isinstance(got, Problem):
                yield got
                continue
            sample_id, size, loc = got
            if label is None:
                yield Candidate(sample_id, size, loc, None, None, "", tar_text(tf, entry, "txt"))
                continue
            yield Candidate(sample_id, size, loc, label, REAL if label == 0 else canonical(gen or ""),
                            f"key:{short_key}", tar_text(tf, entry, "txt"), None,
                            None if label == 0 else gen)
        return entries.value


def _read_label_map(path: Path) -> dict[str, tuple[int, str]]:
    try:
        ensure_regular(path)  # a FIFO there would block the open below
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not {"key", "label"} <= set(reader.fieldnames or []):
                raise PipelineError(f"{path} needs columns key, label (and optionally generator).")
            out: dict[str, tuple[int, str]] = {}
            for row in reader:
                label = parse_label(row["label"], f"{path} key {row['key']}")
                out[row["key"]] = (label, row.get("generator") or (REAL if label == 0 else "generated"))
            return out
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise PipelineError(f"--label-map {path} is not a readable UTF-8 CSV file ({exc}).") from exc


def parse_label(value: object, where: str) -> int:
    text = str(value).strip().lower()
    if text in ("0", "real", "false"):
        return 0
    if text in ("1", "fake", "generated", "true"):
        return 1
    raise PipelineError(f"{where}: label {value!r} is neither 0/real nor 1/generated.")
