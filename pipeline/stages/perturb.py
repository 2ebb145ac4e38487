"""`pipeline perturb`: derive new samples from existing ones by JPEG, resize, blur, crop or noise.

A derived sample is an ordinary sample with its own `sample_id` (the SHA-256 of its new bytes),
`derived_from` (the source sample) and `perturbation` (e.g. `jpeg:75`); it keeps the source's label,
generator, group, split and text, so real and generated images are treated alike and `encode`
encodes only the new images (their texts are already encoded). The bytes live in
STORE/derived/<perturbation>/, written atomically. Operations are deterministic: a rerun adds nothing.
The training view leaves derived samples out; `experiment robustness` reads them one perturbation
at a time.
"""

from __future__ import annotations

import hashlib
import time
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.config import Validated, at_least
from pipeline.errors import PipelineError
from pipeline.reporting import Reporter, Silent
from pipeline.sources.images import UndecodableImage, decode_rgb
from pipeline.sources.locations import Location, LocationReader
from pipeline.sources.perturb import Perturbation, parse_ops
from pipeline.store import catalog
from pipeline.store.atomic import write_bytes, write_parquet
from pipeline.store.layout import Store, safe_name
from pipeline.store.lock import writing
from schemas import SAMPLES, SPLITS, from_rows

FLUSH_ROWS = 2000  # derived sample rows per samples shard


@dataclass(frozen=True)
class PerturbConfig(Validated):
    store: Store
    ops: tuple[str, ...]  # e.g. ("jpeg:90,75,50", "resize:0.5")
    splits: tuple[str, ...] = ("test",)  # every split: train and test then share one format
    limit: int | None = None  # at most this many source samples per split (a fixed hash order)
    wait: bool = True

    def check(self) -> None:
        unknown = sorted(set(self.splits) - set(SPLITS))
        if unknown or not self.splits:
            raise PipelineError(f"--splits takes {', '.join(SPLITS)}, not {', '.join(unknown) or 'nothing'}.")
        at_least(self, "limit", 1)
        parse_ops(self.ops)

    @staticmethod
    def ops_from_toml(path: Path) -> tuple[str, ...]:
        """A TOML file `[ops]` table: jpeg = [90, 75], blur = [1, 2] → ("jpeg:90,75", "blur:1,2")."""
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise PipelineError(f"Cannot read {path}: {exc}") from exc
        ops = data.get("ops", data)
        if not isinstance(ops, dict):
            raise PipelineError(f"{path} must hold an [ops] table such as jpeg = [90, 75].")
        values = {op: v if isinstance(v, list) else [v] for op, v in ops.items()}
        return tuple(f"{op}:{','.join(str(x) for x in v)}" for op, v in values.items())


@dataclass
class PerturbResult:
    derived: int = 0  # new samples written
    existing: int = 0  # (source, operation) pairs already derived earlier
    undecodable: int = 0  # sources whose bytes could not be read or decoded
    by_op: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def run(config: PerturbConfig, reporter: Reporter | None = None) -> PerturbResult:
    reporter = reporter or Silent()
    store = config.store
    if not store.exists():
        raise PipelineError(f"No store at {store.root}: run `pipeline ingest` first.")
    perturbations = parse_ops(config.ops)
    started = time.perf_counter()
    result = PerturbResult(by_op={p.name: 0 for p in perturbations})
    with writing(store, reporter, config.wait):
        sources = _sources(store, config)
        done = {(r["derived_from"], r["perturbation"]) for r in catalog.query(
            store, "SELECT derived_from, perturbation FROM samples WHERE derived_from IS NOT NULL").to_pylist()}
        known = set(catalog.query(store, "SELECT sample_id FROM samples").column(0).to_pylist())
        reader = LocationReader()
        now = datetime.now(UTC)
        pending: list[dict[str, Any]] = []
        reporter.start("perturb", len(sources), "images")
        for row in sources:
            todo = [p for p in perturbations if (row["sample_id"], p.name) not in done]
            result.existing += len(perturbations) - len(todo)
            if todo:
                try:
                    image = decode_rgb(reader.read(Location.from_row(row)))
                except (UndecodableImage, OSError):
                    result.undecodable += 1
                    todo = []
            for p in todo:
                derived = _derive(store, row, p, image, now)
                if derived["sample_id"] not in known:  # the same bytes from another source: one sample
                    known.add(derived["sample_id"])
                    pending.append(derived)
                    result.by_op[p.name] += 1
            if len(pending) >= FLUSH_ROWS:
                result.derived += _flush(store, pending)
            reporter.advance("perturb", 1)
        result.derived += _flush(store, pending)
    result.seconds = time.perf_counter() - started
    return result


def _sources(store: Store, config: PerturbConfig) -> list[dict[str, Any]]:
    """Original samples of the splits, in location order (Parquet row groups are read once)."""
    placeholders = ", ".join("?" for _ in config.splits)
    rows: list[dict[str, Any]] = []
    for split in config.splits:
        limit = f"ORDER BY hash(sample_id) LIMIT {int(config.limit)}" if config.limit else ""
        rows += catalog.query(store, f"SELECT * FROM samples WHERE derived_from IS NULL AND split = ? {limit}",
                              [split]).to_pylist()
    if not rows and not catalog.query(store, f"SELECT 1 FROM samples WHERE split IN ({placeholders}) LIMIT 1",
                                      list(config.splits)).num_rows:
        raise PipelineError(f"The store has no samples in {', '.join(config.splits)}.")
    return sorted(rows, key=lambda r: (r["source_uri"], r.get("source_member") or "", r.get("source_row") or 0,
                                       r.get("byte_offset") or 0))


def _derive(store: Store, row: dict[str, Any], p: Perturbation, image: Any, now: datetime) -> dict[str, Any]:
    data = p.apply(image, row["sample_id"].encode())
    sample_id = hashlib.sha256(data).hexdigest()
    path = store.root / "derived" / safe_name(p.name) / sample_id[:2] / f"{sample_id}.{p.suffix}"
    if not path.exists():
        write_bytes(path, data)
    derived = {name: row.get(name) for name in SAMPLES.names}
    derived.update({
        "sample_id": sample_id, "derived_from": row["sample_id"], "perturbation": p.name,
        "source_format": "derived", "source_uri": str(path.resolve()), "source_member": None,
        "source_row": None, "byte_offset": None, "byte_length": len(data), "ingested_at": now,
    })
    return derived


def _flush(store: Store, pending: list[dict[str, Any]]) -> int:
    if not pending:
        return 0
    shard = write_parquet(from_rows(SAMPLES, pending), store.new_shard(store.dataset_dir("samples"), "derived"))
    catalog.commit(store, [shard])
    n = len(pending)
    pending.clear()
    return n
