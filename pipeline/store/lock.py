"""One writer per store: an advisory lock on STORE/.lock, taken by every stage that writes.

`writing(store)` holds the lock while a stage changes the store. It is re-entrant within a process
(an experiment that trains five runs may hold it around all of them). Each time a process takes it
afresh, the catalog is reconciled with the files on disk: staged shards left by workers are
adopted, temp files of dead writers swept (never a live process's), scores of runs that never
committed swept, vanished files forgotten. When the lock is given back after the manifest changed,
`catalog.duckdb` (the copy for people's own DuckDB sessions) is rewritten beside and swapped in.
Stages that compute for long and write little (train) take it only to commit. A second writer
waits (saying who holds it) or, with `wait=False`, stops with a sentence. Readers never take it:
they read the manifest, which the holder replaces atomically.

Distributed writers follow the same rule: workers write complete shards into STORE/staging/ and
only the lock holder moves them into place and commits them (`catalog.commit_staged`).
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.reporting import Reporter, Silent
from pipeline.store.layout import Store


@dataclass
class _Held:
    fd: int
    depth: int
    manifest_stamp: tuple[int, int] | None


# Locks this process holds, by store root: process-wide by nature (an fcntl lock belongs to the
# open file of this process), so the registry that makes the lock re-entrant is too.
_HELD: dict[Path, _Held] = {}


def owner() -> str:
    """This process as a lock or temp-file owner: host and pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


@contextmanager
def writing(store: Store, reporter: Reporter | None = None, wait: bool = True,
            reconcile: bool = True) -> Iterator[None]:
    """Hold the store's writer lock; reconcile the catalog when this process takes it afresh."""
    from pipeline.store import catalog  # catalog imports layout; the lock sits above both

    key = _key(store)
    held = _HELD.get(key)
    if held is not None:
        held.depth += 1
        try:
            yield
        finally:
            held.depth -= 1
        return
    if store.root.exists() and not store.root.is_dir():
        raise PipelineError(f"--store {store.root} is a file, not a store directory.")
    try:
        store.root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PipelineError(f"Cannot create the store {store.root} ({exc.strerror or exc}).") from exc
    fd = _acquire(store, reporter or Silent(), wait)
    _HELD[_key(store)] = held = _Held(fd, 1, _manifest_stamp(store))
    try:
        if reconcile:
            catalog.reconcile(store)
        yield
        if _catalog_file_stale(store, held.manifest_stamp):
            catalog.write_catalog_file(store)  # on success only: a failing stage's error stays the one shown
    finally:
        del _HELD[_key(store)]
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def holds(store: Store) -> bool:
    """Whether this process holds the store's writer lock (commits require it)."""
    return _key(store) in _HELD


def holder(store: Store) -> str | None:
    """Who holds the store's lock now (as it wrote itself into the lock file), or None if free."""
    path = store.lock_path
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _describe(path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _key(store: Store) -> Path:
    return store.root.resolve() if store.root.exists() else store.root.absolute()


def _acquire(store: Store, reporter: Reporter, wait: bool) -> int:
    path = store.lock_path
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise PipelineError(f"Cannot write to the store {store.root} ({exc.strerror or exc}).") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        who = _describe(path)
        if not wait:
            os.close(fd)
            raise PipelineError(
                f"Another process ({who}) is writing to {store.root}; wait for it, or run again "
                "with --wait to queue behind it."
            ) from None
        reporter.note(f"waiting for {who} to finish writing to {store.root} (Ctrl-C to give up) …")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
    os.ftruncate(fd, 0)
    command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv[:4]))
    os.pwrite(fd, f"{owner()}\n{time.strftime('%Y-%m-%dT%H:%M:%S')}\n{command}\n".encode(), 0)
    return fd


def _describe(path: Path) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        lines = []
    if not lines or ":" not in lines[0]:
        return "another process"
    host, _, pid = lines[0].rpartition(":")
    since = f", since {lines[1]}" if len(lines) > 1 and lines[1] else ""
    command = f", `{lines[2]}`" if len(lines) > 2 and lines[2] else ""
    return f"pid {pid} on {host}{command}{since}"


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
