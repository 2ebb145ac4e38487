"""One writer per store: an advisory lock on STORE/.lock, taken by every stage that writes.

`held(store)` is re-entrant within a process (an experiment that trains five runs may hold it
around all of them). A second writer waits (saying who holds it) or, with `wait=False`, stops with
a sentence. Readers never take it: they read the manifest, which the holder replaces atomically.
What a writer does once it holds the lock (reconcile, commit) is `pipeline.store.writes`'.

The lock file is opened without following a link (a store received as a tar, or a shared folder,
may hold `.lock -> ~/.bashrc`) and only if it is a regular file. An flock belongs to the file, not
to its name: if `.lock` is removed or replaced, a second writer creates and locks a new file while
the first still holds the old one. So the holder checks, after locking and again before every
commit (`check`), that the file at STORE/.lock is the one it locked (device and inode), and stops
with a sentence when it is not.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
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
    identity: tuple[int, int]  # (device, inode) of the file locked


# Locks this process holds, by store root: process-wide by nature (an fcntl lock belongs to the
# open file of this process), so the registry that makes the lock re-entrant is too.
_HELD: dict[Path, _Held] = {}


def owner() -> str:
    """This process as a lock or temp-file owner: host and pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


@contextmanager
def held(store: Store, reporter: Reporter | None = None, wait: bool = True, create: bool = False) -> Iterator[bool]:
    """Hold the store's writer lock; yields True when this call took it afresh, False when this
    process already held it (the lock is re-entrant within a process). `create`: the store's folder
    may be made (ingest's first run); otherwise it must exist."""
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
    if not create and not store.root.is_dir():
        raise PipelineError(f"No store at {store.root}: run `pipeline ingest` first, or point --store at a store.")
    try:
        store.root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PipelineError(f"Cannot create the store {store.root} ({exc.strerror or exc}).") from exc
    fd, identity = _acquire(store, reporter or Silent(), wait)
    _HELD[_key(store)] = _Held(fd, 1, identity)
    try:
        yield True
    finally:
        del _HELD[_key(store)]
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def holds(store: Store) -> bool:
    """Whether this process holds the store's writer lock (commits require it)."""
    return _key(store) in _HELD


def check(store: Store) -> None:
    """Stop with a sentence if the lock this process holds is no longer the file at STORE/.lock
    (removed or replaced since it was taken: another writer may have taken a new one)."""
    held_now = _HELD.get(_key(store))
    if held_now is None:
        return
    try:
        st = os.lstat(store.lock_path)
        now: tuple[int, int] | None = (st.st_dev, st.st_ino)
    except FileNotFoundError:
        now = None
    if now != held_now.identity:
        what = "removed" if now is None else "replaced"
        raise PipelineError(
            f"The store's lock file {store.lock_path} was {what} while this process held it, so another "
            "writer may be changing the store: this command stops without committing more. What it "
            "committed before is kept; run it again to finish."
        )


def holder(store: Store) -> str | None:
    """Who holds the store's lock now (as it wrote itself into the lock file), or None if free."""
    try:
        fd = _open(store.lock_path, os.O_RDONLY | os.O_NONBLOCK)
    except (FileNotFoundError, PipelineError):
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _describe(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _key(store: Store) -> Path:
    return store.root.resolve() if store.root.exists() else store.root.absolute()


def _acquire(store: Store, reporter: Reporter, wait: bool) -> tuple[int, tuple[int, int]]:
    """Lock STORE/.lock; return its descriptor and (device, inode). Retried when the file was
    removed or replaced between opening and locking it (the lock would be on a file nobody sees)."""
    path = store.lock_path
    while True:
        try:
            fd = _open(path, os.O_RDWR | os.O_CREAT)
        except OSError as exc:
            raise PipelineError(f"Cannot write to the store {store.root} ({exc.strerror or exc}).") from exc
        try:
            _lock(fd, store, reporter, wait)
            st = os.fstat(fd)
            try:
                there = os.lstat(path)
            except FileNotFoundError:
                there = None
        except BaseException:
            os.close(fd)
            raise
        if there is not None and (there.st_dev, there.st_ino) == (st.st_dev, st.st_ino):
            break
        os.close(fd)  # the file we locked left its name while we waited: lock the one there now
    os.ftruncate(fd, 0)
    command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv[:4]))
    os.pwrite(fd, f"{owner()}\n{time.strftime('%Y-%m-%dT%H:%M:%S')}\n{command}\n".encode(), 0)
    return fd, (st.st_dev, st.st_ino)


def _lock(fd: int, store: Store, reporter: Reporter, wait: bool) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        who = _describe(fd)
        if not wait:
            raise PipelineError(
                f"Another process ({who}) is writing to {store.root}; wait for it, or run again "
                "with --wait to queue behind it."
            ) from None
        reporter.note(f"waiting for {who} to finish writing to {store.root} (Ctrl-C to give up) …")
        fcntl.flock(fd, fcntl.LOCK_EX)


def _open(path: Path, flags: int) -> int:
    """Open the lock file itself: never through a link, and only a regular file."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PipelineError(f"The store's lock file {path} is a symbolic link; the pipeline never writes "
                                "through one: remove it (a writer makes a new one).") from exc
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise PipelineError(f"The store's lock file {path} is not a regular file; remove it (a writer makes "
                            "a new one).")
    return fd


def _describe(fd: int) -> str:
    """Who holds the lock, as the holder wrote itself into the file (read from our descriptor: the
    name may point elsewhere by now)."""
    try:
        lines = os.pread(fd, 4096, 0).decode("utf-8", errors="replace").splitlines()
    except OSError:
        lines = []
    if not lines or ":" not in lines[0]:
        return "another process"
    host, _, pid = lines[0].rpartition(":")
    since = f", since {lines[1]}" if len(lines) > 1 and lines[1] else ""
    command = f", `{lines[2]}`" if len(lines) > 2 and lines[2] else ""
    return f"pid {pid} on {host}{command}{since}"


