"""Stage `verify`: read every shard of the store in full and say which are damaged; `--repair`
moves damaged shards to `STORE/damaged/` and makes what they held pending again.

Each committed shard is read row group by row group (footer, every page decompressed), and its
schema stamp, table name and row count are checked against what the manifest recorded when it was
committed. Files in the store's folders that were never committed (a stray copy, a shard of an
unknown schema version) are listed too. Repairing a shard drops it from the views and records it in
quarantine (`damaged_shard`); what it held comes back by rerunning the stage that made it:
embeddings → `pipeline encode` recomputes exactly the missing vectors; samples → `pipeline ingest`
re-reads its sources (the ingest ledger is reset so nothing is skipped); runs and scores → the run
is no longer committed and is swept; indexes, leak scans → build them again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.config import Validated
from pipeline.reporting import Reporter, Silent
from pipeline.store import doubled, writes
from pipeline.store import manifest as manifests
from pipeline.store.atomic import write_parquet
from pipeline.store.doubled import Doubled
from pipeline.store.layout import Store
from pipeline.store.writes import writing
from schemas import QUARANTINE, from_rows, schema_problem

AFTER_REPAIR = {
    "embeddings": "run `pipeline encode` to recompute its vectors",
    "samples": "run `pipeline ingest` on its source again to restore its samples",
    "quarantine": "rerun the stage that recorded it if you need its entries",
    "sources": "the next `pipeline ingest` re-reads its sources",
    "runs": "the run is no longer visible; train it again",
    "scores": "the run is no longer visible; train it again",
    "indexes": "run `pipeline index build` again",
    "leaks": "run `pipeline leaks` again",
}


@dataclass(frozen=True)
class VerifyConfig(Validated):
    store: Store
    repair: bool = False
    wait: bool = True


@dataclass(frozen=True)
class Damage:
    path: str  # relative to the store
    dataset: str
    committed: bool  # in the views until repaired
    problem: str
    rows: int | None  # rows the manifest recorded (None: never committed)
    remedy: str


@dataclass
class VerifyResult:
    shards_checked: int = 0
    rows_checked: int = 0
    damaged: list[Damage] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)  # relative paths moved to damaged/
    doubled: list[Doubled] = field(default_factory=list)  # tables holding a key twice (two writers at once)
    rewritten: list[str] = field(default_factory=list)  # new shards holding what doubled ones held once

    @property
    def healthy(self) -> bool:
        return not self.damaged and not self.doubled


def run(config: VerifyConfig, reporter: Reporter | None = None) -> VerifyResult:
    reporter = reporter or Silent()
    manifests.require_store(config.store)
    if not config.repair:
        return _check(config.store, reporter)
    with writing(config.store, reporter, config.wait):
        result = _check(config.store, reporter)
        _repair(config.store, result)
        return result


def check_shard(store: Store, path: Path, expected_rows: int | None) -> tuple[int, str | None]:
    """Read one shard fully; (rows read, problem or None)."""
    rel = store.relative(path)
    dataset = rel.split("/", 1)[0]
    try:
        pf = pq.ParquetFile(path, page_checksum_verification=True)
        problem = schema_problem(pf.schema_arrow.metadata, dataset, f"Shard {rel}")
        if problem:
            return 0, problem.removeprefix(f"Shard {rel} ").rstrip(".")
        rows = 0
        for i in range(pf.num_row_groups):
            rows += pf.read_row_group(i).num_rows
    except Exception as exc:  # noqa: BLE001 - whatever fails to read is damage to report
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
        return 0, f"it does not read: {first}"
    if rows != pf.metadata.num_rows:
        return rows, f"its pages hold {rows} rows but its footer says {pf.metadata.num_rows}"
    if expected_rows is not None and expected_rows >= 0 and rows != expected_rows:
        return rows, f"it holds {rows} rows, not the {expected_rows} committed"
    return rows, None


def _check(store: Store, reporter: Reporter) -> VerifyResult:
    result = VerifyResult()
    manifest = manifests.read_manifest(store)
    on_disk = {store.relative(p): p for p in manifests.shard_files(store)}
    reporter.start("verify", len(on_disk) + len(set(manifest.shards) - on_disk.keys()), "shard")
    for rel, shard in sorted(manifest.shards.items()):
        reporter.advance("verify", 1)
        if rel not in on_disk:
            result.damaged.append(Damage(rel, shard.dataset, True, "the file is missing", shard.num_rows,
                                         AFTER_REPAIR.get(shard.dataset, "")))
            continue
        rows, problem = check_shard(store, on_disk[rel], shard.num_rows)
        result.shards_checked += 1
        result.rows_checked += rows
        if problem:
            result.damaged.append(Damage(rel, shard.dataset, True, problem, shard.num_rows,
                                         AFTER_REPAIR.get(shard.dataset, "")))
    for rel, path in sorted(on_disk.items()):
        if rel in manifest.shards:
            continue
        reporter.advance("verify", 1)
        rows, problem = check_shard(store, path, None)
        why = manifest.damaged.get(rel)
        if problem or why:
            result.damaged.append(Damage(rel, rel.split("/", 1)[0], False, problem or _short(why),
                                         None, "not in any view; moved aside by --repair"))
    result.doubled = doubled.find(store, manifest, skip=frozenset(d.path for d in result.damaged))
    return result


def _repair(store: Store, result: VerifyResult) -> None:
    now = datetime.now(UTC)
    quarantined = []
    moved: list[str] = []
    reset_ledger = False
    for damage in result.damaged:
        writes.set_aside(store, damage.path)
        moved.append(damage.path)
        reset_ledger |= damage.committed and damage.dataset == "samples"
        if damage.committed:
            quarantined.append({
                "content_hash": None, "stage": "verify", "reason": "damaged_shard",
                "detail": f"{damage.path}: {damage.problem}; moved to damaged/ ({damage.remedy})",
                "source_uri": str((store.root / damage.path).resolve()), "source_member": None,
                "source_row": None, "recorded_at": now,
            })
    if reset_ledger:  # lost samples must come back: the next ingest may skip nothing
        for shard in manifests.read_manifest(store).of("sources"):
            writes.set_aside(store, shard.path)
            moved.append(shard.path)
    writes.forget(store, moved)
    if quarantined:
        path = write_parquet(from_rows(QUARANTINE, quarantined),
                             store.new_shard(store.dataset_dir("quarantine"), "verify"))
        writes.commit(store, [path])
    if result.doubled:  # each key's first row kept; the shards holding later copies rewritten without them
        written, replaced = doubled.drop(store, manifests.read_manifest(store), result.doubled)
        writes.swap(store, written, replaced)
        moved.extend(replaced)
        result.rewritten = [store.relative(p) for p in written]
    result.repaired = moved



def _short(why: str | None) -> str:
    return (why or "not a valid shard").removeprefix("Shard ").split(" (", 1)[-1].rstrip(".")
