"""Derived caches under `STORE/cache/` (training views, vector layouts): built by one process at a
time, and never deleted under a reader.

Caches are written without the store's writer lock (a trainer builds the view it reads while an
import commits shards), so they carry their own rules:
- `building(directory)` holds an exclusive lock on `directory/.lock` while a process brings the cache
  up to date; a second builder of the same cache waits, then finds the first one's work done.
- A reader pins each file it will read (`pin`): an open descriptor with a shared lock on the file,
  taken while it holds the directory lock, so no builder can remove the file between the reader's
  reading of the cache's manifest and its pinning.
- A builder removes a file its new manifest no longer names only when nobody pins it (`sweep`: an
  exclusive lock on the file, without waiting); a pinned one stays until a later build after its
  readers are gone.
Pins are released when their holder closes them, is garbage-collected, or its process ends.
`clear` empties a cache folder on the same terms (`pipeline clean --caches`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError


@contextmanager
def building(directory: Path) -> Iterator[None]:
    """Hold the cache's build lock (exclusive): one builder at a time, readers pin under it."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = _open(directory / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # (closing releases the lock)


class Pins:
    """Shared locks on the files a reader uses; `close` (or garbage collection) releases them."""

    def __init__(self, paths: Iterable[Path]) -> None:
        fds: list[int] = []
        try:
            for path in paths:
                fd = _open(path, os.O_RDONLY)
                fds.append(fd)
                fcntl.flock(fd, fcntl.LOCK_SH)
        except BaseException:
            _close(fds)
            raise
        self._release = weakref.finalize(self, _close, fds)

    def close(self) -> None:
        self._release()


def pin(paths: Iterable[Path]) -> Pins:
    return Pins(paths)


def sweep(candidates: Iterable[Path], keep: set[str]) -> int:
    """Remove the files among `candidates` whose name is not in `keep` and that nobody pins; return
    how many. Call it holding `building` of their directory."""
    removed = 0
    for path in candidates:
        if path.name in keep:
            continue
        try:
            fd = _open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a reader still uses it: a later build removes it
        else:
            path.unlink(missing_ok=True)
            removed += 1
        finally:
            os.close(fd)
    return removed


def clear(directory: Path, dry_run: bool = False) -> tuple[int, int] | None:
    """Remove every file of a cache folder but its `.lock` (a waiting builder holds it); return the files
    and bytes removed (`dry_run`: that would be), or None when a builder is at work (the build lock is
    tried, never waited for) or a reader pins any of its files. Holding the build lock, no new pin can
    be taken; each file is locked exclusively before anything is deleted, so the folder goes whole or
    stays whole. A folder without a `.lock` (a cache only the writer builds) is the writer-lock holder's
    to clear."""
    lock = directory / ".lock"
    held: list[int] = []
    try:
        if lock.exists():
            held.append(_open(lock, os.O_RDONLY))
            if not _try_exclusive(held[-1]):
                return None
        files = sorted(p for p in directory.rglob("*") if p != lock and (p.is_symlink() or p.is_file()))
        for path in files:
            try:
                held.append(_open(path, os.O_RDONLY))
            except (FileNotFoundError, PipelineError):  # gone, or a link: unlinking a link frees it alone
                continue
            if not _try_exclusive(held[-1]):
                return None
        freed = sum(p.lstat().st_size for p in files if p.exists() or p.is_symlink())
        if not dry_run:
            for path in files:
                path.unlink(missing_ok=True)
            for folder in sorted((p for p in directory.rglob("*") if p.is_dir()), reverse=True):
                if not any(folder.iterdir()):
                    folder.rmdir()
        return len(files), freed
    finally:
        _close(held)


def _try_exclusive(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _open(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PipelineError(f"{path} is a symbolic link; the store's caches never follow links.") from exc
        raise


def _close(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


def read_json(path: Path) -> dict[str, Any] | None:
    """A cache's JSON record (an object), or None where there is none or it does not parse: the cache
    is then rebuilt, never trusted half-written or from another version."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
