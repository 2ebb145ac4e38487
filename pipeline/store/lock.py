"""One writer per store: an advisory lock on STORE/.lock, taken by every stage that writes.

`held(store)` is re-entrant within a process (an experiment that trains five runs may hold it
around all of them). A second writer waits (saying who holds it) or, with `wait=False`, stops with
a sentence. Readers never take it: they read the manifest, which the holder replaces atomically.
What a writer does once it holds the lock (reconcile, commit) is `pipeline.store.commit`'s.
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


# Locks this process holds, by store root: process-wide by nature (an fcntl lock belongs to the
# open file of this process), so the registry that makes the lock re-entrant is too.
_HELD: dict[Path, _Held] = {}


def owner() -> str:
    """This process as a lock or temp-file owner: host and pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


@contextmanager
def held(store: Store, reporter: Reporter | None = None, wait: bool = True) -> Iterator[bool]:
    """Hold the store's writer lock; yields True when this call took it afresh, False when this
    process already held it (the lock is re-entrant within a process)."""
    key = _key(store)
    outer = _HELD.get(key)
    if outer is not None:
        outer.depth += 1
        try:
            yield False
        finally:
            outer.depth -= 1
        return
    if store.root.exists() and not store.root.is_dir():
        raise PipelineError(f"--store {store.root} is a file, not a store directory.")
    try:
        store.root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PipelineError(f"Cannot create the store {store.root} ({exc.strerror or exc}).") from exc
    fd = _acquire(store, reporter or Silent(), wait)
    _HELD[_key(store)] = _Held(fd, 1)
    try:
        yield True
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


