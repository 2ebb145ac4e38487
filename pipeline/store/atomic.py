"""The one way files reach disk: write to a hidden temp file beside the target, fsync, rename.

Readers (and the catalog) only ever see complete files, whatever moment a process is killed at.
Temp names start with '.' and end in '.tmp', so no glob over '*.parquet' can pick them up.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PARQUET_COMPRESSION = "zstd"


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` then move `tmp` to `path` atomically; the temp file never survives a failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def write_parquet(table: pa.Table, path: Path) -> Path:
    """Write `table` (whose schema carries the pipeline stamp) as one Parquet file, atomically."""
    return atomic_write(
        path, lambda tmp: pq.write_table(table, tmp, compression=PARQUET_COMPRESSION)
    )


def write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_bytes(path: Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def remove_stale_temps(directory: Path) -> int:
    """Delete temp files left by a killed writer; returns how many were removed."""
    if not directory.exists():
        return 0
    stale = list(directory.rglob(".*.tmp"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return len(stale)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
