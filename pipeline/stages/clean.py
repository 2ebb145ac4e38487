"""`pipeline clean`: free the space a store holds beyond what it needs, and say how much.

By default only what nothing needs: leftovers of dead processes (temp files and scratch folders named
with their pid, a killed encode's pending lists), files of runs that never committed, index folders no
committed index names, indexes built over embeddings that changed since, reports whose runs are all
gone, and caches of models the store no longer holds. `--caches` adds every derived cache (rebuilt
when next needed: the cost is time, not data) and `--reports` every report (`pipeline report` and
`experiment` write them again from the stored numbers). `--dry-run` measures and touches nothing.

Never under a live process: cleaning holds the writer lock (no writer runs meanwhile); a cache folder
is emptied under its build lock and only when no reader pins a file of it; a temp or scratch name is
removed only when its owner's pid is dead. Staged shards are not garbage: taking the lock adopts them.
Cost: a walk of the store's folder names and a stat per file removed; no shard is read.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import Validated
from pipeline.errors import PipelineError
from pipeline.features.vectors import fingerprint, shards_of
from pipeline.present import html
from pipeline.reporting import Reporter
from pipeline.store import catalog, cleanup, lock, writes
from pipeline.store import manifest as manifests
from pipeline.store.cleanup import Removed
from pipeline.store.layout import Store
from pipeline.store.writes import writing

STALE_CACHES = "caches of models or runs no longer in the store"


@dataclass(frozen=True)
class CleanConfig(Validated):
    store: Store
    dry_run: bool = False  # measure only
    caches: bool = False  # every derived cache under STORE/cache, not only those of models gone
    reports: bool = False  # every report under STORE/reports, not only those whose runs are gone
    wait: bool = True

    def check(self) -> None:
        manifests.require_store(self.store)


@dataclass(frozen=True)
class Freed:
    """One kind of file: how many, how big, and whether they went."""

    what: str
    files: int
    bytes: int
    paths: tuple[str, ...] = ()  # relative to the store (a folder is one path)
    note: str | None = None  # why it stays, for what is kept


@dataclass
class CleanResult:
    dry_run: bool
    freed: list[Freed] = field(default_factory=list)  # removed (dry run: would be)
    kept: list[Freed] = field(default_factory=list)  # not asked for, in use, or the user's to judge
    adopted: int = 0  # staged shards committed when the lock was taken (dry run: waiting to be)

    @property
    def files(self) -> int:
        return sum(f.files for f in self.freed)

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.freed)


@dataclass
class _Plan:
    """What goes, by kind: uncommitted paths, committed indexes, cache folders; and what is kept."""

    paths: dict[str, list[Path]] = field(default_factory=dict)
    indexes: list[Path] = field(default_factory=list)  # folders of committed, stale indexes
    caches: dict[str, list[Path]] = field(default_factory=dict)
    kept: list[Freed] = field(default_factory=list)


def run(config: CleanConfig, reporter: Reporter | None = None) -> CleanResult:
    store = config.store
    if config.dry_run:  # a reader: no lock, nothing changed
        plan = _plan(store, config, writer_free=lock.holder(store) is None)
        staged = sum(1 for _ in store.staging_dir.rglob("*.parquet")) if store.staging_dir.is_dir() else 0
        return _measure(store, plan, staged)
    with writing(store, reporter, config.wait, reconcile=False):
        plan = _plan(store, config, writer_free=True)  # measured before the reconcile sweeps its share
        sizes = {what: [(p, cleanup.size_of(p)) for p in paths] for what, paths in plan.paths.items()}
        adopted = writes.reconcile(store).adopted
        writes.delete_uncommitted(store, [p for paths in plan.paths.values() for p in paths if p.exists()])
        for folder in cleanup.empty_folders(store.staging_dir):
            folder.rmdir()
        stale = _stale_index_sizes(store, plan.indexes)
        if plan.indexes:
            writes.remove(store, [d / "index.parquet" for d in plan.indexes], plan.indexes)
        result = CleanResult(False, adopted=adopted, kept=list(plan.kept))
        for what, measured in sizes.items():
            gone = [(p, r) for p, r in measured if not (p.exists() or p.is_symlink())]
            _add(result.freed, store, what, gone)
        _add(result.freed, store, "stale indexes", stale)
        _clear(store, plan, result, dry_run=False)
        if any(p.is_relative_to(store.reports_dir) for paths in plan.paths.values() for p in paths):
            html.index_reports(store.reports_dir)  # the index lists what is left
        return result


def _measure(store: Store, plan: _Plan, staged: int) -> CleanResult:
    result = CleanResult(True, adopted=staged, kept=list(plan.kept))
    for what, paths in plan.paths.items():
        _add(result.freed, store, what, [(p, cleanup.size_of(p)) for p in paths])
    _add(result.freed, store, "stale indexes", _stale_index_sizes(store, plan.indexes))
    _clear(store, plan, result, dry_run=True)
    return result


def _plan(store: Store, config: CleanConfig, writer_free: bool) -> _Plan:
    plan = _Plan()
    manifest = catalog.snapshot(store).manifest
    plan.paths["leftovers of dead processes"] = cleanup.dead_leftovers(store, writer_free)
    plan.paths["files of runs that never committed"] = writes.uncommitted_run_files(store)
    plan.paths["index folders no committed index names"] = _orphan_index_folders(store, manifest) if writer_free else []
    plan.indexes = _stale_indexes(store)
    runs = {s.path.split("/")[1] for s in manifest.of("runs")}
    reports = html.report_entries(store.reports_dir)
    old = [e for e in reports if e.runs and not set(e.runs) & runs]
    chosen = reports if config.reports else old
    plan.paths["reports" if config.reports else "reports whose runs are gone"] = [
        p for e in chosen for p in html.report_files(store.reports_dir, e)]
    if not config.reports:
        rest = [p for e in reports if e not in old for p in html.report_files(store.reports_dir, e)]
        plan.kept.append(_kept("other reports", rest, "pass --reports to remove them", store))
    stale = cleanup.stale_cache_units(store, set(catalog.model_keys(store)), runs)
    plan.caches[STALE_CACHES] = stale
    others = [u for u in cleanup.cache_units(store) if u not in stale]
    if config.caches:
        plan.caches["caches (rebuilt when next needed)"] = others
    else:
        measured = [m for m in (cleanup.clear_cache(u, dry_run=True) for u in others) if m is not None]
        total = sum(measured, Removed())
        plan.kept.append(Freed("caches (rebuilt when next needed)", total.files, total.bytes,
                               tuple(_rel(store, u) for u in others), "pass --caches to remove them"))
    damaged = store.root / "damaged"
    if damaged.is_dir():
        plan.kept.append(_kept("damaged shards set aside by verify --repair", [damaged],
                               "delete the folder yourself once you no longer need them", store))
    return plan


def _orphan_index_folders(store: Store, manifest: manifests.Manifest) -> list[Path]:
    """Folders under `indexes/<model>/` that hold no committed shard and no Parquet file (which the next
    writer would adopt): a build killed before its record was written."""
    root = store.dataset_dir("indexes")
    committed = {str(Path(s.path).parent) for s in manifest.of("indexes")}
    models = [m for m in sorted(root.iterdir()) if m.is_dir()] if root.is_dir() else []
    return [d for model in models for d in sorted(model.iterdir())
            if d.is_dir() and _rel(store, d) not in committed and not any(d.rglob("*.parquet"))]


def _stale_indexes(store: Store) -> list[Path]:
    """Folders of committed indexes built over other embeddings than the model's current ones."""
    if not catalog.shard_paths(store, "indexes"):
        return []
    stale = []
    current: dict[tuple[str, str], str | None] = {}
    for row in catalog.query(store, "SELECT model_key, modality, fingerprint, path FROM indexes").to_pylist():
        key = (row["model_key"], row["modality"])
        if key not in current:
            try:
                current[key] = fingerprint(store, shards_of(store, *key), row["modality"])
            except PipelineError:  # the model has no such vectors any more
                current[key] = None
        if row["fingerprint"] != current[key]:
            stale.append((store.root / row["path"]).parent)
    return stale


def _stale_index_sizes(store: Store, folders: list[Path]) -> list[tuple[Path, Removed]]:
    return [(d, cleanup.size_of(d)) for d in folders]


def _clear(store: Store, plan: _Plan, result: CleanResult, dry_run: bool) -> None:
    busy: list[Path] = []
    for what, units in plan.caches.items():
        cleared = []
        for unit in units:
            found = cleanup.clear_cache(unit, dry_run)
            if found is None:
                busy.append(unit)
                continue
            cleared.append((unit, found))
            if not dry_run and what == STALE_CACHES:
                # A model the store no longer holds has no reader and no builder (cleared above, unpinned,
                # its build lock free): its folder goes, lock file included.
                cleanup.delete(unit)
        _add(result.freed, store, what, cleared)
    if not dry_run:
        for folder in cleanup.empty_folders(store.root / "cache"):
            folder.rmdir()
    if busy:
        result.kept.append(_kept("caches in use (a reader pins them, or a build is running)", busy,
                                 "run clean again when they are free", store))


def _add(into: list[Freed], store: Store, what: str, measured: Iterable[tuple[Path, Removed]]) -> None:
    measured = list(measured)
    total = sum((r for _, r in measured), Removed())
    if measured and total.files:
        into.append(Freed(what, total.files, total.bytes, tuple(_rel(store, p) for p, _ in measured)))


def _kept(what: str, paths: list[Path], note: str, store: Store) -> Freed:
    total = cleanup.sizes(paths)
    return Freed(what, total.files, total.bytes, tuple(_rel(store, p) for p in paths), note)


def _rel(store: Store, path: Path) -> str:
    return path.relative_to(store.root).as_posix()  # (every path here was found under the root)
