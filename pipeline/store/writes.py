"""Changing the store: the writer session (`writing`), commits, reconciliation and rebuilds.

Only the process holding the store's writer lock (`pipeline.store.lock`) changes the catalog.
`writing(store)` holds the lock while a stage changes the store; each time a process takes it
afresh, the manifest is reconciled with the files on disk: staged shards left by workers are
adopted, temp files of dead writers swept (never a live process's), scores of runs that never
committed swept, shards copied or touched since their commit checked and their new stat recorded;
a committed file that vanished stays named, as damage, until `pipeline verify --repair`. When the
lock is given back after the manifest changed, `catalog.duckdb` (the copy for people's own DuckDB
sessions) is rewritten beside and swapped in. Stages that compute for long and write little (train)
take it only to commit. Every change checks first that the lock is still held (`lock.check`: its
file was not removed or replaced), and only `ingest` and `import-features` may make a new store.

Distributed writers follow the same rule: workers write complete shards into STORE/staging/ and
only the lock holder moves them into place and commits them (`commit_staged`).

Committed files leave the store only through `remove`: one commit, finished or undone by the next
writer after a kill (its journal says which), so a removal is whole or absent, never half.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.reporting import Reporter
from pipeline.store import catalog, doubled, lock
from pipeline.store.atomic import remove_stale_temps, write_parquet, write_text
from pipeline.store.cleanup import Removed, delete, size_of
from pipeline.store.doubled import Doubled
from pipeline.store.layout import Store
from pipeline.store.manifest import (
    COUNTED,
    Manifest,
    Shard,
    count_rows,
    describe,
    footer,
    read_manifest,
    recognisable,
    require_store,
    shard_files,
    stat_problem,
    write_manifest,
)


@contextmanager
def writing(store: Store, reporter: Reporter | None = None, wait: bool = True,
            reconcile: bool = True, create: bool = False) -> Iterator[None]:
    """Hold the store's writer lock; reconcile the catalog when this process takes it afresh.
    `create`: the command may make a new store (ingest, import-features); for every other one a
    folder that is not a store (a mistyped --store) is refused before anything is written in it."""
    if not create and not lock.holds(store):
        require_store(store)
    with lock.held(store, reporter, wait, create) as fresh:
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
    missing: int  # committed shards whose file is gone: kept, as damage, until `pipeline verify --repair`
    temps_removed: int
    adopted: int = 0
    swept: int = 0
    ignored: tuple[str, ...] = ()  # files on disk that are not valid shards (see `pipeline verify`)
    doubled: tuple[Doubled, ...] = ()  # rows held twice (rebuild only: `pipeline verify --repair` undoes it)


def commit(store: Store, files: Iterable[Path]) -> None:
    """Record shard files already renamed into place, in one atomic manifest update. Idempotent.
    Only the holder of the store's writer lock may call it. If that lock was lost (its file removed
    or replaced: another writer may be at work), the files not yet committed are removed, so no later
    reconcile adopts rows the other writer may have written too, and the commit stops with a sentence."""
    files = [Path(f) for f in files]
    try:
        _require_lock(store)
    except PipelineError:
        committed = read_manifest(store).shards
        for path in files:
            if path.exists() and store.relative(path) not in committed:
                path.unlink()
        raise
    manifest = read_manifest(store)
    for path in files:
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


def swap(store: Store, added: Iterable[Path], removed: Iterable[str]) -> None:
    """Commit `added` and drop `removed` (relative paths) in one manifest update, then move the removed
    files to `STORE/damaged/`: readers see either the old shards or the new ones, never both."""
    _require_lock(store)
    removed = list(removed)
    manifest = read_manifest(store)
    for path in added:
        shard = describe(store, Path(path))
        if isinstance(shard, str):
            raise PipelineError(shard)
        manifest.shards[shard.path] = shard
    for rel in removed:
        manifest.shards.pop(rel, None)
        manifest.damaged.pop(rel, None)
    write_manifest(store, manifest)
    for rel in removed:
        set_aside(store, rel)


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


def remove(store: Store, shards: Iterable[Path | str], others: Iterable[Path | str] = ()) -> Removed:
    """Delete committed shards, and the files or folders of the store that go with them (`others`: a run's
    checkpoint and folder, its report), in ONE commit. Only the holder of the writer lock may call it.

    Atomic against a kill: a journal naming everything is written first (`STORE/.removing/`), then the
    manifest drops the shards in one atomic update (the commit: from then on no reader sees them), then
    the files go, the journal last. The next writer to take the lock finishes a journal whose commit
    happened (none of its shards left in the manifest) and drops one whose commit did not: the files
    stay whole or go whole. Cost: one manifest write, a rewrite of `catalog.duckdb`, and a stat and an
    unlink per file."""
    _require_lock(store)
    listed = {"shards": sorted({_rel(store, p) for p in shards}), "others": sorted({_rel(store, p) for p in others})}
    journal = write_text(store.root / REMOVING / f"{uuid.uuid4().hex}.json", json.dumps(listed))
    manifest = read_manifest(store)
    for rel in listed["shards"]:
        manifest.shards.pop(rel, None)
        manifest.damaged.pop(rel, None)
    write_manifest(store, manifest)
    catalog.write_catalog_file(store)  # before a file goes: no view, catalog.duckdb's included, names one gone
    removed = _delete_listed(store, listed)
    journal.unlink()
    _rmdir_if_empty(journal.parent)
    return removed


def delete_uncommitted(store: Store, paths: Iterable[Path]) -> Removed:
    """Delete files or folders of the store that no committed shard is (leftovers of dead processes,
    derived files nothing names): the writer lock excludes every process that could be writing them."""
    _require_lock(store)
    manifest = read_manifest(store)
    rels = sorted({_rel(store, p) for p in paths})
    committed = [r for r in rels if r in manifest.shards or any(s.startswith(r + "/") for s in manifest.shards)]
    if committed:
        raise RuntimeError(f"{committed[0]} is committed: remove it with writes.remove, in a commit")
    return _delete_listed(store, {"shards": [], "others": rels})


def reconcile(store: Store) -> Reconciled:
    """Make the manifest match the files: sweep dead writers' temps, adopt staged and orphan shards,
    drop vanished ones, sweep scores of runs that never committed. Runs when the lock is taken."""
    _require_lock(store)
    return _reconcile(store)


def rebuild(store: Store, reporter: Reporter | None = None, wait: bool = True) -> Reconciled:
    """Derive the manifest and `catalog.duckdb` again from the Parquet files, beside the old ones,
    and swap them in; damaged files are left out (and listed) so healthy tables stay queryable.
    Only a store is rebuilt (one whose manifest is lost still holds its stamped shards): a folder
    that is not one is refused, and nothing is written in it."""
    if not recognisable(store):
        raise PipelineError(f"{store.root} is not a store (no manifest.json, no catalog.duckdb, no shard of this "
                            "pipeline in a dataset folder): nothing to rebuild; check --store.")
    with writing(store, reporter, wait, reconcile=False, create=True):
        result = _reconcile(store, trust_manifest=False)
        catalog.write_catalog_file(store)
        return replace(result, doubled=tuple(doubled.find(store, read_manifest(store))))


def _reconcile(store: Store, trust_manifest: bool = True) -> Reconciled:
    _finish_removals(store)  # first: a finished removal's files must not be adopted back below
    temps = remove_stale_temps(store.root)
    manifest = read_manifest(store) if trust_manifest else Manifest(shards=_missing_of_old_manifest(store))
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
    # A committed shard whose file vanished stays in the manifest: every reader names it as damage until
    # `pipeline verify --repair` forgets it and makes its rows come back (ingest's ledger is reset).
    # Forgetting it here would lose its rows for good: the ledger still says its sources were read.
    missing = len(set(manifest.shards) - on_disk.keys())
    added = 0
    ignored: list[str] = []
    for rel, path in sorted(on_disk.items()):
        known = manifest.shards.get(rel)
        if known is not None and known.size >= 0:
            if not stat_problem(store, known, read_footer=False):
                manifest.shards[rel] = _filled_in(store, path, known)
                continue
            if stat_problem(store, known):  # changed since its commit: it stays committed, and damaged
                continue
            # intact after a copy or a change of its metadata: its new stat is recorded below
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
    return Reconciled(added=added, missing=missing, temps_removed=temps, adopted=adopted,
                      swept=swept, ignored=tuple(ignored))


def _filled_in(store: Store, path: Path, known: Shard) -> Shard:
    """A shard of an older manifest with what this version records: its counts, inode, change time and
    footer digest (read once, by the first writer after an upgrade)."""
    if known.counts is None and known.dataset in COUNTED:
        known = replace(known, counts=count_rows(path, known.dataset))
    if known.digest is None:
        found = footer(store, path)
        if isinstance(found, Shard):
            known = replace(known, inode=found.inode, ctime_ns=found.ctime_ns, digest=found.digest)
    return known


def _missing_of_old_manifest(store: Store) -> dict[str, Shard]:
    """For a rebuild: the committed shards of the old manifest whose file is gone (damage that the
    rebuilt manifest must keep naming). None when the old manifest does not read."""
    try:
        old = read_manifest(store)
    except PipelineError:
        return {}
    return {rel: s for rel, s in old.shards.items() if not (store.root / rel).exists()}


def _without_committed_vectors(store: Store, manifest: Manifest, staged: Path, final: Path) -> bool:
    """Drop from a staged embeddings shard the vectors already committed; False when none is left.

    A worker of a killed driver (a Ray task) may finish a staged shard after the next writer looked
    for pending work and encoded the same hashes again: adopting it whole would double those rows.
    Only adopted (orphaned) shards pass through here, so the extra read is rare.
    """
    if final.parent.parent != store.dataset_dir("embeddings"):
        return True
    committed = [p for p in (store.root / s.path for s in manifest.of("embeddings", final.parent.name))
                 if p.exists()]  # (a missing one is damage that `verify --repair` handles)
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


def uncommitted_run_files(store: Store) -> list[Path]:
    """Files of runs that never committed: a run is committed when its `run.parquet` is (written last);
    score and metric shards (`scores|metrics/<run_id>[-<part>].parquet`) and folders of any other run are
    a killed writer's ghosts. Cost: a listing of `runs/`, `scores/` and `metrics/`."""
    runs_dir = store.dataset_dir("runs")
    committed = {p.parent.name for p in runs_dir.glob("*/run.parquet")} if runs_dir.exists() else set()
    found: list[Path] = []
    for per_run in (store.dataset_dir("scores"), store.dataset_dir("metrics")):
        for shard in sorted(per_run.glob("*.parquet")) if per_run.exists() else ():
            stem = shard.stem
            if not ({stem} | {stem[:i] for i, ch in enumerate(stem) if ch == "-"}) & committed:
                found.append(shard)
    if runs_dir.exists():
        found.extend(run for run in sorted(runs_dir.iterdir()) if run.is_dir() and run.name not in committed)
    return found


def _sweep_uncommitted_runs(store: Store, manifest: Manifest) -> int:
    found = uncommitted_run_files(store)
    for path in found:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            manifest.shards.pop(store.relative(path), None)
            path.unlink(missing_ok=True)
    return len(found)


REMOVING = ".removing"  # journals of `remove`, in the store's root


def _finish_removals(store: Store) -> None:
    """Complete each removal a kill interrupted after its commit; forget those killed before it."""
    directory = store.root / REMOVING
    journals = sorted(directory.glob("*.json")) if directory.is_dir() else []
    if not journals:
        return
    try:
        committed = read_manifest(store).shards
    except PipelineError:
        committed = None  # unreadable (a rebuild follows): keep every file, as if no removal had committed
    for journal in journals:
        try:
            listed = json.loads(journal.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            listed = None  # a journal is written atomically: unreadable means not ours to act on
        if listed is not None and committed is not None and not any(r in committed for r in listed["shards"]):
            _delete_listed(store, listed)
        journal.unlink(missing_ok=True)
    _rmdir_if_empty(directory)


def _rmdir_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:
        pass  # not empty (another journal), or gone


def _delete_listed(store: Store, listed: dict[str, list[str]]) -> Removed:
    removed = Removed()
    root = store.root.resolve()
    for rel in [*listed["shards"], *listed["others"]]:
        path = store.root / rel
        if not path.parent.resolve().is_relative_to(root) or path.resolve() == root:
            continue  # (a journal names paths inside the store only; a link in it goes, never what it names)
        found = size_of(path)
        delete(path)
        if not (path.exists() or path.is_symlink()):
            removed += found
    return removed


def _rel(store: Store, path: Path | str) -> str:
    path = Path(path)
    if not path.is_absolute():
        return path.as_posix()
    try:
        return path.relative_to(store.root).as_posix()  # (lexical: a link inside the store is not followed)
    except ValueError:
        return store.relative(path)


def _require_lock(store: Store) -> None:
    if not lock.holds(store):
        raise RuntimeError(f"catalog change outside the writer lock of {store.root}: wrap it in lock.writing(store)")
    lock.check(store)  # still the file at STORE/.lock: else another writer may be in, and nothing is changed


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
