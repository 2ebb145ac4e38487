"""Changing the store: the writer session (`writing`), commits, reconciliation and rebuilds.

Only the process holding the store's writer lock (`pipeline.store.lock`) changes the catalog.
`writing(store)` holds the lock while a stage changes the store; each time a process takes it
afresh, the manifest is reconciled with the files on disk: staged shards left by workers are
adopted, temp files of dead writers swept (never a live process's), scores of runs that never
committed swept, vanished files forgotten. When the lock is given back after the manifest changed,
`catalog.duckdb` (the copy for people's own DuckDB sessions) is rewritten beside and swapped in.
Stages that compute for long and write little (train) take it only to commit.

Distributed writers follow the same rule: workers write complete shards into STORE/staging/ and
only the lock holder moves them into place and commits them (`commit_staged`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.reporting import Reporter
from pipeline.store import catalog, lock
from pipeline.store.atomic import remove_stale_temps, write_parquet
from pipeline.store.layout import Store
from pipeline.store.manifest import (
    COUNTED,
    Manifest,
    count_rows,
    describe,
    footer,
    read_manifest,
    shard_files,
    stat_problem,
    write_manifest,
)


@contextmanager
def writing(store: Store, reporter: Reporter | None = None, wait: bool = True,
            reconcile: bool = True) -> Iterator[None]:
    """Hold the store's writer lock; reconcile the catalog when this process takes it afresh."""
    with lock.held(store, reporter, wait) as fresh:
        if not fresh:  # re-entrant: the outer session reconciles and rewrites the catalog copy
            yield
            return
        stamp = _manifest_stamp(store)
        if reconcile:
            _reconcile(store)
        catalog.forget_snapshot(store)  # a writer starts from what is on disk now, every shard checked again
        yield
        if _catalog_file_stale(store, stamp):
            catalog.write_catalog_file(store)  # on success only: a failing stage's error stays the one shown


def stage_shard(store: Store, final: Path, table: pa.Table) -> Path:
    """Write a complete shard under `STORE/staging/` (where a worker may write without the lock), to be
    moved to `final` and committed by the lock holder (`commit_staged`, or the next writer's reconcile)."""
    return write_parquet(table, store.staged(final))


COMMIT_EVERY_SHARDS = 8  # staged shards per catalog update …
COMMIT_EVERY_SECONDS = 10.0  # … or sooner, so that `status` follows a long run


class Committer:
    """Collects staged shards and commits them in batches (the lock holder only); `committed` lists
    the final paths of everything committed so far."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.staged: list[Path] = []
        self.committed: list[Path] = []
        self.last = time.monotonic()

    def add(self, staged: list[Path]) -> None:
        self.staged.extend(staged)
        if len(self.staged) >= COMMIT_EVERY_SHARDS or time.monotonic() - self.last > COMMIT_EVERY_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self.staged:
            self.committed.extend(commit_staged(self.store, self.staged))
        self.staged = []
        self.last = time.monotonic()


@dataclass(frozen=True)
class Reconciled:
    added: int
    dropped: int
    temps_removed: int
    adopted: int = 0
    swept: int = 0
    ignored: tuple[str, ...] = ()  # files on disk that are not valid shards (see `pipeline verify`)


def commit(store: Store, files: Iterable[Path]) -> None:
    """Record shard files already renamed into place, in one atomic manifest update. Idempotent.
    Only the holder of the store's writer lock may call it."""
    _require_lock(store)
    manifest = read_manifest(store)
    for path in (Path(f) for f in files):
        shard = describe(store, path)
        if isinstance(shard, str):
            raise PipelineError(shard)
        manifest.shards[shard.path] = shard
        manifest.damaged.pop(shard.path, None)
    write_manifest(store, manifest)


def commit_staged(store: Store, staged: Iterable[Path]) -> list[Path]:
    """Move complete shards written by workers under `STORE/staging/` (see `Store.staged`) into
    place and record them in one manifest update."""
    _require_lock(store)
    finals = [_unstage(store, Path(p)) for p in staged]
    commit(store, finals)
    return finals


def forget(store: Store, files: Iterable[Path | str]) -> None:
    """Drop shards from the manifest (files deleted, or moved aside by `pipeline verify --repair`)."""
    _require_lock(store)
    manifest = read_manifest(store)
    for f in files:
        rel = store.relative(Path(f)) if Path(f).is_absolute() else Path(f).as_posix()
        manifest.shards.pop(rel, None)
        manifest.damaged.pop(rel, None)
    write_manifest(store, manifest)


def set_aside(store: Store, rel: str) -> Path | None:
    """Move a shard (damaged, or made stale by a repair) to `STORE/damaged/<its path>`, never over an
    earlier one; the caller `forget`s it in the same session. None when the file was already gone."""
    _require_lock(store)
    source = store.root / rel
    if not source.exists():
        return None
    target = store.root / "damaged" / rel
    n = 1
    while target.exists():
        target = target.with_name(f"{target.stem}.{n}{target.suffix}")
        n += 1
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(source, target)
    return target


def reconcile(store: Store) -> Reconciled:
    """Make the manifest match the files: sweep dead writers' temps, adopt staged and orphan shards,
    drop vanished ones, sweep scores of runs that never committed. Runs when the lock is taken."""
    _require_lock(store)
    return _reconcile(store)


def rebuild(store: Store, reporter: Reporter | None = None, wait: bool = True) -> Reconciled:
    """Derive the manifest and `catalog.duckdb` again from the Parquet files, beside the old ones,
    and swap them in; damaged files are left out (and listed) so healthy tables stay queryable."""
    with writing(store, reporter, wait, reconcile=False):
        result = _reconcile(store, trust_manifest=False)
        catalog.write_catalog_file(store)
        return result


def _reconcile(store: Store, trust_manifest: bool = True) -> Reconciled:
    temps = remove_stale_temps(store.root)
    manifest = read_manifest(store) if trust_manifest else Manifest()
    adopted = 0
    for staged in _staged_files(store):
        final = store.root / staged.relative_to(store.staging_dir)
        if isinstance(footer(store, staged, store.relative(final)), str):
            continue  # left for `pipeline verify`, which lists it
        final.parent.mkdir(parents=True, exist_ok=True)
        if _without_committed_vectors(store, manifest, staged, final):
            os.replace(staged, final)
        adopted += 1
    swept = _sweep_uncommitted_runs(store, manifest)
    on_disk = {store.relative(p): p for p in shard_files(store)}
    gone = sorted(set(manifest.shards) - on_disk.keys())
    for rel in gone:
        del manifest.shards[rel]
    added = 0
    ignored: list[str] = []
    for rel, path in sorted(on_disk.items()):
        known = manifest.shards.get(rel)
        if known is not None and known.size >= 0 and not stat_problem(store, known, read_footer=False):
            if known.counts is None and known.dataset in COUNTED:  # a manifest from before the counts
                manifest.shards[rel] = replace(known, counts=count_rows(path, known.dataset))
            continue
        shard = describe(store, path)
        if isinstance(shard, str) or (known is not None and known.num_rows != shard.num_rows):
            # A committed shard that changed stays committed, so every reader names it until
            # `pipeline verify --repair`; a file never committed is left out of the views.
            if known is None:
                manifest.damaged[rel] = shard if isinstance(shard, str) else "row count changed"
                ignored.append(rel)
            continue
        manifest.damaged.pop(rel, None)
        if known is None:
            added += 1
        manifest.shards[rel] = shard
    for rel in list(manifest.damaged):
        if rel not in on_disk:
            del manifest.damaged[rel]
    write_manifest(store, manifest)
    return Reconciled(added=added, dropped=len(gone), temps_removed=temps, adopted=adopted,
                      swept=swept, ignored=tuple(ignored))


def _without_committed_vectors(store: Store, manifest: Manifest, staged: Path, final: Path) -> bool:
    """Drop from a staged embeddings shard the vectors already committed; False when none is left.

    A worker of a killed driver (a Ray task) may finish a staged shard after the next writer looked
    for pending work and encoded the same hashes again: adopting it whole would double those rows.
    Only adopted (orphaned) shards pass through here, so the extra read is rare.
    """
    if final.parent.parent != store.dataset_dir("embeddings"):
        return True
    committed = [store.root / s.path for s in manifest.of("embeddings", final.parent.name)]
    if not committed:
        return True
    table = pq.read_table(staged)
    with duckdb.connect() as con:
        con.register("staged", table.select(["modality", "content_hash"]))  # DuckDB reads no half floats
        have = con.execute(
            "SELECT DISTINCT c.modality, c.content_hash FROM read_parquet($files) c "
            "SEMI JOIN staged s ON s.content_hash = c.content_hash AND s.modality = c.modality",
            {"files": [str(p) for p in committed]}).fetchall()
    if not have:
        return True
    seen = {(m, h) for m, h in have}
    keep = [(m, h) not in seen for m, h in zip(table.column("modality").to_pylist(),
                                                  table.column("content_hash").to_pylist(), strict=True)]
    if any(keep):
        write_parquet(table.filter(pa.array(keep)), final)
    staged.unlink()
    return False


def _sweep_uncommitted_runs(store: Store, manifest: Manifest) -> int:
    """A run is committed when its `run.parquet` is (written last); score and metric shards
    (`scores|metrics/<run_id>[-<part>].parquet`) and folders of any other run are a killed writer's ghosts."""
    runs_dir = store.dataset_dir("runs")
    committed = {p.parent.name for p in runs_dir.glob("*/run.parquet")} if runs_dir.exists() else set()
    swept = 0
    for per_run in (store.dataset_dir("scores"), store.dataset_dir("metrics")):
        if not per_run.exists():
            continue
        for scores in per_run.glob("*.parquet"):
            stem = scores.stem
            prefixes = {stem} | {stem[:i] for i, ch in enumerate(stem) if ch == "-"}
            if not prefixes & committed:
                manifest.shards.pop(store.relative(scores), None)
                scores.unlink(missing_ok=True)
                swept += 1
    if runs_dir.exists():
        for run in runs_dir.iterdir():
            if run.is_dir() and run.name not in committed:
                shutil.rmtree(run, ignore_errors=True)
                swept += 1
    return swept


def _require_lock(store: Store) -> None:
    if not lock.holds(store):
        raise RuntimeError(f"catalog change outside the writer lock of {store.root}: wrap it in lock.writing(store)")


def _unstage(store: Store, staged: Path) -> Path:
    try:
        rel = staged.resolve().relative_to(store.staging_dir.resolve())
    except ValueError as exc:
        raise PipelineError(f"{staged} is not under {store.staging_dir}; only staged files can be committed.") from exc
    final = store.root / rel
    if not staged.exists() and final.exists():
        return final  # adopted already (a reconcile when the lock was taken afresh moved it)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, final)
    return final


def require_writable(store: Store, command: str, writes: str) -> None:
    """Refuse with a sentence, before anything is written, a store this process cannot write into (a
    read-only mount, another user's folder): `pipeline {command}` writes `writes` there."""
    if os.access(store.root, os.W_OK):  # false on a read-only filesystem too, for root as well
        return
    try:
        read_only = bool(os.statvfs(store.root).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    why = "is on a read-only filesystem" if read_only else "cannot be written by this user"
    raise PipelineError(f"The store {store.root} {why}, and `pipeline {command}` writes into it ({writes}): "
                        "run it on a copy of the store that you can write.")


def remove_empty_scratch(store: Store) -> None:
    """Remove the empty folders left under `STORE/staging/` and the lock holder's `STORE/.encode/` (each
    run makes its own); a folder with a file in it stays. The lock holder only: nobody else writes there."""
    _require_lock(store)
    for root in (store.staging_dir, store.work_dir):
        if not root.is_dir():
            continue
        for folder in sorted((p for p in root.rglob("*") if p.is_dir() and not p.is_symlink()),
                             key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):  # not empty
                folder.rmdir()
        with contextlib.suppress(OSError):
            root.rmdir()


def _staged_files(store: Store) -> list[Path]:
    if not store.staging_dir.exists():
        return []
    return sorted(p for p in store.staging_dir.rglob("*.parquet") if not p.name.startswith("."))


def _catalog_file_stale(store: Store, stamp_at_start: tuple[int, int] | None) -> bool:
    """Whether `catalog.duckdb` lags the manifest (changed now, or by a writer that failed before
    rewriting it)."""
    try:
        catalog_mtime = store.catalog_path.stat().st_mtime_ns
    except OSError:
        return store.manifest_path.exists()
    stamp = _manifest_stamp(store)
    return stamp is not None and (stamp != stamp_at_start or stamp[1] > catalog_mtime)


def _manifest_stamp(store: Store) -> tuple[int, int] | None:
    try:
        st = store.manifest_path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns
