"""The one way files reach disk: write to a hidden temp file beside the target, fsync, rename.

Readers (and the catalog) only ever see complete files, whatever moment a process is killed at.
Temp names start with '.' and end in '.tmp', so no glob over '*.parquet' can pick them up, and
they carry their owner (host and pid): `remove_stale_temps` deletes only those of dead processes,
never a file another live process is still writing.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.children import alive as pid_alive
from pipeline.errors import PipelineError
from pipeline.store import parquet_vectors

PARQUET_COMPRESSION = "zstd"
VECTOR_GROUP_ROWS = 16384
# A temp file of a process on another host cannot be checked for life; after this long it is dead.
FOREIGN_TEMP_MAX_AGE_S = 24 * 3600.0
_TEMP = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9-]*)~(?P<pid>\d+)~[0-9a-f]{8}\.tmp(\.wal)?$")


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` then move `tmp` to `path` atomically; the temp file never survives a failure.
    Only a regular file (or nothing) at `path` is replaced: a device, FIFO, socket, link or directory
    there stops the write with a sentence, checked before writing and again just before the rename."""
    refuse_non_regular(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        refuse_non_regular(path)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def refuse_non_regular(path: Path) -> None:
    """Stop with a sentence if something other than a regular file sits at `path` (a rename would
    replace a device node, a FIFO or a symbolic link itself, and fail on a directory)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        raise PipelineError(f"{path} is {not_regular(mode)}; the pipeline replaces only regular files, so it "
                            "writes nothing there.")


def not_regular(mode: int) -> str:
    """What a non-regular file is, as a noun phrase ("a FIFO")."""
    for test, what in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "not a regular file"


def temp_path(path: Path) -> Path:
    """A hidden temp name beside `path` carrying its owner (this host and pid), so the next writer's
    sweep keeps it while this process lives. For a file written over a long time (a stream of
    batches): write it here, then move it into place with `atomic_write(path, lambda t: os.replace(tmp, t))`."""
    return path.with_name(f".{path.name}.{_host()}~{os.getpid()}~{uuid.uuid4().hex[:8]}.tmp")


def write_parquet(table: pa.Table, path: Path) -> Path:
    """Write `table` (whose schema carries the pipeline stamp) as one Parquet file, atomically.
    Pages carry CRC checksums, so `pipeline verify` finds a flipped bit even in uncompressed data.

    Vector (list) columns are written to be memory-mapped where they lie (`features.vectors`):
    PLAIN, uncompressed, one data page per row group of VECTOR_GROUP_ROWS, so each row group's
    vectors are its column chunk's last bytes, row-major. Dictionary encoding measured 3-6x slower
    to write and read for files 0.3% smaller, and zstd saves under a tenth on float16 unit vectors:
    both would force a second, decoded copy of every vector for training.

    A table of fixed-size vectors with no NULL (embeddings) is written by `parquet_vectors`, the
    same layout at the speed of its bytes (pyarrow's writer measured 100 MB/s on its vectors)."""
    vectors = {f.name for f in table.schema if pa.types.is_list(f.type) or pa.types.is_fixed_size_list(f.type)}
    if not vectors:
        return atomic_write(path, lambda tmp: pq.write_table(
            table, tmp, compression=PARQUET_COMPRESSION, write_page_checksum=True))
    if parquet_vectors.supported(table):
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as out:
                parquet_vectors.write(table, out, VECTOR_GROUP_ROWS, PARQUET_COMPRESSION)

        return atomic_write(path, write)
    others = [f.name for f in table.schema if f.name not in vectors]
    compression = {name: PARQUET_COMPRESSION for name in others} | {name: "none" for name in vectors}
    return atomic_write(path, lambda tmp: pq.write_table(
        table, tmp, compression=compression, write_page_checksum=True, use_dictionary=others,
        write_statistics=others, row_group_size=VECTOR_GROUP_ROWS, data_page_size=1 << 30,
        max_rows_per_page=VECTOR_GROUP_ROWS))


def write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_bytes(path: Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def remove_stale_temps(directory: Path, recursive: bool = True, strict: bool = True) -> int:
    """Delete temp files (and temp folders) left by dead writers under `directory`; returns how many were
    removed.

    A temp of a live process on this host is kept; one of another host is kept for a day;
    an untagged one (written before temps carried owners) is a dead writer's. `strict=False` (a
    reader sweeping): a temp it may not remove (a read-only store) is left for a writer.
    """
    removed = 0
    for tmp in stale_temps(directory, recursive):
        try:
            if tmp.is_dir() and not tmp.is_symlink():  # a temp folder (the training view's buckets)
                shutil.rmtree(tmp)
            else:
                tmp.unlink(missing_ok=True)
        except OSError:
            if strict:
                raise
            continue
        removed += 1
    return removed


def remove_stale_temps_of(path: Path) -> int:
    """Delete the temps of `path` alone (beside it) that dead writers left: a killed `--output` file's,
    in a folder of the user's where nothing else may be swept."""
    prefix = f".{path.name}."
    stale = [t for t in stale_temps(path.parent, recursive=False) if t.name.startswith(prefix)]
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return len(stale)


def stale_temps(directory: Path, recursive: bool = True) -> list[Path]:
    """The temp files under `directory` (or in it only) whose owner is dead (see `remove_stale_temps`)."""
    if not directory.exists():
        return []
    walk = directory.rglob if recursive else directory.glob
    found = (*walk(".*.tmp"), *walk(".*.tmp.wal"))  # (.wal: a DuckDB temp's log)
    return [tmp for tmp in found if not temp_owner_alive(tmp)]


def temp_owner_alive(tmp: Path) -> bool:
    """Whether the process that named this temp file may still be writing it."""
    match = _TEMP.match(tmp.name)
    if match is None:
        return False
    if match["host"] != _host():
        try:
            return time.time() - tmp.stat().st_mtime < FOREIGN_TEMP_MAX_AGE_S
        except OSError:
            return False
    return pid_alive(int(match["pid"]))


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40]


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
