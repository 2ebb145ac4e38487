"""One writer per store: an advisory lock on STORE/.lock, taken by every stage that writes.

`writing(store)` holds the lock while a stage changes the store. It is re-entrant within a process
(nested stages take it once), and the catalog is reconciled with the files on disk each time the
lock is taken afresh — another process may have died since — but never again while it is held:
staged shards left by workers are adopted, temp files of dead writers swept, vanished files
forgotten. Stages that compute for long and write little (train) take it only to commit. A second
writer waits (saying so) or, with `wait=False`, stops with a sentence. Readers never take it.

Distributed writers follow the same rule: workers write complete shards into STORE/staging/ and
only the lock holder moves them into place and commits them (`catalog.commit_staged`).
"""

from __future__ import annotations

import fcntl
import os
import socket
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


# Locks this process holds, by store root: process-wide by nature (fcntl locks belong to the process).
_HELD: dict[Path, _Held] = {}


def owner() -> str:
    """This process as a lock or temp-file owner: host and pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


@contextmanager
def writing(store: Store, reporter: Reporter | None = None, wait: bool = True) -> Iterator[None]:
    """Hold the store's writer lock; reconcile the catalog when this process first takes it."""
    from pipeline.store import catalog  # catalog imports layout; the lock sits above both

    key = store.root.resolve() if store.root.exists() else store.root.absolute()
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
    store.root.mkdir(parents=True, exist_ok=True)
    fd = _acquire(store, reporter or Silent(), wait)
    _HELD[key] = _Held(fd, 1)
    try:
        catalog.reconcile(store)
        yield
    finally:
        del _HELD[key]
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def holds(store: Store) -> bool:
    """Whether this process holds the store's writer lock (commits require it)."""
    key = store.root.resolve() if store.root.exists() else store.root.absolute()
    return key in _HELD


def _acquire(store: Store, reporter: Reporter, wait: bool) -> int:
    path = store.lock_path
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(path)
        if not wait:
            os.close(fd)
            raise PipelineError(
                f"Another process ({holder}) is writing to {store.root}; wait for it, or run again "
                "with --wait to queue behind it."
            ) from None
        reporter.note(f"waiting for {holder} to finish writing to {store.root} (Ctrl-C to give up) …")
        fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.pwrite(fd, owner().encode(), 0)
    return fd


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return f"pid {text.rpartition(':')[2]} on {text.rpartition(':')[0]}" if text else "another process"
