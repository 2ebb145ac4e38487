"""Stage `ingest`: turn a source (D3, folder, webdataset, manifest) into sample rows.

`sample_id` is the SHA-256 of the image bytes, so re-ingesting adds nothing. The split comes from
hashing the group key, so related images (a real photo and the images generated from its caption)
always share one. Inputs that cannot become samples are written to quarantine with a reason.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, get_args

from pipeline.config import Validated, at_least
from pipeline.errors import PipelineError
from pipeline.reporting import Reporter, Silent
from pipeline.sources.common import Candidate, Item, Problem
from pipeline.sources.d3 import DEFAULT_GENERATORS, iter_d3
from pipeline.sources.folder import iter_folder
from pipeline.sources.manifest import iter_manifest
from pipeline.sources.webdataset import iter_webdataset
from pipeline.store import catalog
from pipeline.store.atomic import write_parquet
from pipeline.store.layout import Store
from pipeline.store.lock import writing
from schemas import QUARANTINE, SAMPLES, SPLITS, from_rows

Format = Literal["d3", "folder", "webdataset", "manifest"]
FORMATS: tuple[str, ...] = get_args(Format)


@dataclass(frozen=True)
class IngestConfig(Validated):
    source: Path
    format: Format
    store: Store
    real_images: Path | None = None
    generator: str | None = None
    label_map: Path | None = None
    generators: tuple[str, ...] = DEFAULT_GENERATORS
    group_by: Literal["stem", "image"] = "stem"
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    split_seed: str = "0"
    shard_rows: int = 50_000
    wait: bool = True  # wait for another writer of the store instead of stopping

    def check(self) -> None:
        if not self.source.exists():
            raise PipelineError(f"Source {self.source} does not exist.")
        fractions = self.split_fractions
        if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
            raise PipelineError("--splits needs three non-negative fractions (train,val,test) summing to 1.")
        at_least(self, "shard_rows", 1)


@dataclass
class IngestResult:
    added: int = 0
    already_in_store: int = 0
    duplicates_in_source: int = 0
    problems: Counter[str] = field(default_factory=Counter)
    shards: list[Path] = field(default_factory=list)
    by_split: Counter[str] = field(default_factory=Counter)


def run(config: IngestConfig, reporter: Reporter | None = None) -> IngestResult:
    """Read the source, add samples the store lacks, quarantine what cannot be read."""
    reporter = reporter or Silent()
    with writing(config.store, reporter, config.wait):
        return _ingest(config, reporter)


def _ingest(config: IngestConfig, reporter: Reporter) -> IngestResult:
    reporter.start("ingest", None, "img")
    seen = _existing_ids(config.store)
    known_problems = _existing_problems(config.store)
    result = IngestResult()
    samples: list[dict] = []
    problems: list[dict] = []
    now = datetime.now(UTC)
    for item in _items(config):
        reporter.advance("ingest", 1)
        if isinstance(item, Problem):
            result.problems[item.reason] += 1
            key = _problem_key(item.reason, item.location.uri, item.location.member, item.location.row)
            if key not in known_problems:
                known_problems.add(key)
                problems.append(_problem_row(item, now))
        else:
            row = _sample_row(item, config, now)
            if row["sample_id"] in seen:
                if seen[row["sample_id"]]:
                    result.already_in_store += 1
                else:
                    result.duplicates_in_source += 1
                continue
            seen[row["sample_id"]] = False
            samples.append(row)
            result.by_split[row["split"]] += 1
        if len(samples) >= config.shard_rows:
            _flush(config.store, samples, problems, result)
    _flush(config.store, samples, problems, result)
    result.added = sum(result.by_split.values())
    return result


def assign_split(group_key: str, fractions: tuple[float, ...], seed: str) -> str:
    """Deterministic split from a hash of the group key: same key, same split, on any machine."""
    digest = hashlib.sha256(f"{seed}\x00{group_key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    edge = 0.0
    for name, fraction in zip(SPLITS, fractions, strict=True):
        edge += fraction
        if u < edge:
            return name
    return SPLITS[-1]


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _items(config: IngestConfig) -> Iterator[Item]:
    if config.format == "d3":
        return iter_d3(config.source, config.real_images, config.generators)
    if config.format == "folder":
        return iter_folder(config.source, config.group_by)
    if config.format == "webdataset":
        return iter_webdataset(config.source, config.generator, config.label_map)
    return iter_manifest(config.source)


def _existing_ids(store: Store) -> dict[str, bool]:
    """sample_id → True for samples already in the store (False marks ones seen in this run)."""
    if not catalog.shard_paths(store, "samples"):
        return {}
    ids = catalog.query(store, "SELECT sample_id FROM samples").column(0).to_pylist()
    return dict.fromkeys(ids, True)


def _existing_problems(store: Store) -> set[tuple]:
    if not catalog.shard_paths(store, "quarantine"):
        return set()
    rows = catalog.query(
        store,
        "SELECT reason, source_uri, source_member, source_row FROM quarantine WHERE stage = 'ingest'",
    ).to_pylist()
    return {_problem_key(*r.values()) for r in rows}


def _problem_key(reason: str, uri: str, member: str | None, row: int | None) -> tuple:
    return (reason, uri, member, row)


def _sample_row(item: Candidate, config: IngestConfig, now: datetime) -> dict:
    sample_id = hashlib.sha256(item.data).hexdigest()
    group = item.group_key or f"image:{sample_id}"
    loc = item.location
    return {
        "sample_id": sample_id,
        "label": item.label,
        "generator": item.generator,
        "split": item.split or assign_split(group, config.split_fractions, config.split_seed),
        "group_key": group,
        "text": item.text,
        "text_hash": text_hash(item.text) if item.text else None,
        "source_format": config.format,
        "source_uri": loc.uri,
        "source_member": loc.member,
        "source_row": loc.row,
        "byte_offset": loc.offset,
        "byte_length": loc.length if loc.length is not None else len(item.data),
        "ingested_at": now,
    }


def _problem_row(problem: Problem, now: datetime) -> dict:
    loc = problem.location
    return {
        "content_hash": None,
        "stage": "ingest",
        "reason": problem.reason,
        "detail": problem.detail,
        "source_uri": loc.uri,
        "source_member": loc.member,
        "source_row": loc.row,
        "recorded_at": now,
    }


def _flush(store: Store, samples: list[dict], problems: list[dict], result: IngestResult) -> None:
    written = []
    if problems:
        table = from_rows(QUARANTINE, problems)
        written.append(write_parquet(table, store.new_shard(store.dataset_dir("quarantine"), "ingest")))
    if samples:
        table = from_rows(SAMPLES, samples)
        written.append(write_parquet(table, store.new_shard(store.dataset_dir("samples"), "samples")))
    catalog.commit(store, written)
    result.shards.extend(written)
    samples.clear()
    problems.clear()
