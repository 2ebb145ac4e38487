"""Large buffers go back to the OS when freed: peak memory that follows the work, not its history.

glibc serves a block above its mmap threshold with a mapping of its own, returned to the OS on
free. But the threshold is dynamic: each time such a block is freed it rises to that block's size
(up to 32 MB), after which batch-sized buffers (a 2048 x 1536 float32 batch is 12 MB, gathered
and freed every step) come from the heap, which fragments and keeps growing. Measured on `train`
(50k -> 200k samples): peak anonymous memory 731 -> 1063 MB with the dynamic threshold, 670 -> 704
MB with it fixed at 4 MB, for the same user and system time. The CLI sets it once at start-up;
it is a process-wide setting, so library callers decide for themselves.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
import threading
from collections.abc import Iterator

M_MMAP_THRESHOLD = -3  # <malloc.h>
M_TRIM_THRESHOLD = -1  # <malloc.h>
THRESHOLD_BYTES = 4 << 20


def fix_mmap_threshold(threshold: int = THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold (which also stops it rising), and keep up to twice that free at the top
    of the heap (glibc's own rule while the thresholds move); False where there is no glibc.

    Fixing one threshold fixes both, and the trim threshold then stays at glibc's 128 KB: a block between
    128 KB and 4 MB freed at the top of the heap gave its pages back, and the next one faulted them in and
    zeroed them again. Measured: FAISS reading a 10,922-list index took 0.9 s and 372k page faults in
    the CLI (`neighbors` at 11.5M samples), 0.03 s and 7.6k with this."""
    libc = _glibc()
    return libc is not None and _fix(libc, threshold)


STEP_THRESHOLD_BYTES = 64 << 20


@contextlib.contextmanager
def step_buffers_reused(after: int = THRESHOLD_BYTES) -> Iterator[bool]:
    """Within: blocks up to 64 MB come from the heap and stay there when freed; after: the threshold
    is fixed at `after` (the CLI's) and the free heap goes back to the OS. Yields whether it applies.

    A training step allocates and frees the same few dozen batch-sized tensors every step (2048 x
    1536 floats: 12 MB each). Mapped afresh each time, their pages are faulted in and zeroed again:
    60k page faults a step, 0.1 CPU-s of a 0.5 CPU-s bf16 step (bench/bench_train.py). Reused from
    the heap they cost nothing, and the heap holds one step's working set, whatever the rows.
    """
    libc = _glibc()
    if libc is None:
        yield False
        return
    with _depth_lock:
        _depth[0] += 1
        if _depth[0] == 1:  # the outermost sets and puts back (a leak scan that builds its index: both use it)
            libc.mallopt(M_MMAP_THRESHOLD, STEP_THRESHOLD_BYTES)
            libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    try:
        yield True
    finally:
        with _depth_lock:
            _depth[0] -= 1
            if _depth[0] == 0:
                _fix(libc, after)
                libc.malloc_trim(0)


_depth = [0]  # step_buffers_reused contexts open in this process
_depth_lock = threading.Lock()


def _fix(libc: ctypes.CDLL, threshold: int) -> bool:
    """The mmap threshold at `threshold`, the trim threshold at twice it (see fix_mmap_threshold)."""
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2 * threshold))


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 (musl has neither)
        return libc
    except (OSError, AttributeError):
        return None
