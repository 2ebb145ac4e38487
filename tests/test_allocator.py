"""`step_buffers_reused` keeps batch-sized buffers on the heap until its outermost context ends."""

from __future__ import annotations

import ctypes
import platform

import numpy as np
import pytest

from pipeline.allocator import _glibc, fix_mmap_threshold, step_buffers_reused


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mapped_blocks() -> int:
    """Blocks glibc serves with a mapping of their own (mallinfo2's hblks)."""
    libc = _glibc()
    assert libc is not None
    libc.mallinfo2.restype = _MallInfo2
    return int(libc.mallinfo2().hblks)


@pytest.fixture
def glibc() -> None:
    libc = _glibc()
    if platform.system() != "Linux" or libc is None or not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc 2.33 or later only")
    fix_mmap_threshold()  # as the CLI runs


def test_an_inner_context_leaves_the_outer_one_in_force(glibc: None) -> None:
    size = 16 << 20  # above the CLI's 4 MB threshold, below the 64 MB the contexts allow on the heap
    before = _mapped_blocks()
    held = np.empty(size, np.uint8)  # outside: a mapping of its own
    assert _mapped_blocks() == before + 1
    del held
    with step_buffers_reused():
        with step_buffers_reused():  # (the index build inside a leak scan)
            pass
        held = np.empty(size, np.uint8)  # still inside the outer one: from the heap
        assert _mapped_blocks() == before
        del held
    held = np.empty(size, np.uint8)  # after the outermost: mapped again
    assert _mapped_blocks() == before + 1 and held.nbytes == size


def test_a_medium_buffer_freed_and_taken_again_is_not_faulted_in_afresh(glibc: None) -> None:
    import resource

    size = 1 << 20  # between glibc's 128 KB trim threshold and the CLI's 4 MB mmap threshold: from the heap
    pages = size // 4096

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    np.ones(size, np.uint8)
    before = faults()
    for _ in range(100):  # as FAISS reading an index list after list: allocate, fill, free
        np.ones(size, np.uint8)
    # with the heap's top given back on every free (trim threshold 128 KB), each round faulted its pages in
    assert faults() - before < 10 * pages
