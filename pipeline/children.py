"""Children die with their parent: a worker process ends when the process it works for ends.

A process killed with SIGKILL runs no cleanup, so its workers must notice by themselves, or they run
on holding memory (a sweep's trainers, encode's decoders and their forkserver). `die_with(pid)` is
called first thing in a worker, with the pid of the process it works for:
- on Linux, when that process is the worker's parent, the kernel sends the worker SIGKILL as the
  parent ends (prctl PR_SET_PDEATHSIG), and the parent is checked again after the call in case it
  ended before;
- otherwise (a DataLoader worker is forked by multiprocessing's forkserver, but works for the
  process that started the server; or a system without prctl) a daemon thread waits for that process
  to end (a pidfd on Linux, a check each second elsewhere) and ends this one.
multiprocessing's forkserver then ends by itself: it exits when the last holder of its "alive" pipe
(the process that started it, and every worker it forked) is gone.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1
POLL_SECONDS = 1.0


def die_with(pid: int) -> None:
    """End this process (SIGKILL) when process `pid` ends; a no-op for `pid` of this process."""
    if pid == os.getpid():
        return
    if pid == os.getppid() and _parent_death_signal():
        if os.getppid() != pid:  # the parent ended before the kernel was asked
            _end()
        return
    threading.Thread(target=_wait_then_end, args=(pid,), name=f"die-with-{pid}", daemon=True).start()


def _parent_death_signal() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _wait_then_end(pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)  # Linux 5.3+: readable once the process has ended
    except ProcessLookupError:
        _end()
        return
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        select.select([fd], [], [])
        _end()
    while alive(pid):
        time.sleep(POLL_SECONDS)
    _end()


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, ended but not yet reaped, does not)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] != b"Z"
    except OSError:
        return True


def descendants(pid: int) -> set[int]:
    """The pids of every process below `pid` now (children, theirs...): from /proc, empty elsewhere."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    parent = int(f.read().rpartition(b")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _end() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
