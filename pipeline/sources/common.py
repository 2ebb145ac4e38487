"""What every source adapter yields, and the helpers they share (tar scanning, resume points).
Every file is opened through `pipeline.sources.reading` (bounded, non-blocking, regular files only).

A source is read as *units* (a file: a Parquet file, a tar, an image; or a manifest row), each with
the facts that say whether it changed since it was ingested (size, modification time, and for
Parquet a digest of its footer). Ingest skips units it has already read with the same options and
reads only the rest. A unit yields *items*: candidates (an image, hashed while streamed, never held
whole) or problems (an input that cannot become a sample, with a reason code).

A file that only grows (a tar appended to, a CSV manifest with rows added) is read from where the
last read stopped: reading it returns a `Resume` (the end of its last complete tar member or CSV
line, and a digest of the bytes before it), the ledger keeps it, and the next ingest, when those
bytes are still there (`resume_holds`: one window read, never the prefix), starts from it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Generator, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from pipeline.errors import PipelineError
from pipeline.sources import reading
from pipeline.sources.locations import Location
from pipeline.sources.reading import DEFAULT_MAX_BYTES, TEXT_MAX_BYTES, Limits, Unreadable, opened, text_of

__all__ = ["DEFAULT_MAX_BYTES", "Limits"]  # defined in `reading`; adapters and ingest import them from here

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
REAL = "real"
RESUME_WINDOW = 64 * 1024  # bytes before a resume point whose digest says the file was not rewritten
_Y = TypeVar("_Y")
_R = TypeVar("_R")


@dataclass(frozen=True)
class Resume:
    """Where the next read of a growing file starts: the end of its last complete tar member (where
    `tar -r` writes the next header) or CSV line; `tail` digests the `RESUME_WINDOW` bytes before it."""

    offset: int
    tail: str
    rows: int = 0  # manifest rows before `offset` (line numbers in messages go on from there)


@dataclass(frozen=True)
class Unit:
    """One thing a source is read in: a file, or a row of a manifest naming a file."""

    path: Path
    size: int = -1  # -1: cannot be stat-ed (missing); such a unit is re-reported only if it changes
    mtime_ns: int = -1
    fingerprint: str | None = None  # Parquet footer digest: the same file even if its mtime changed
    extra: str | None = None  # must match too: a manifest row's values, an image's sidecar caption
    payload: Any = None  # the adapter's own data for this unit
    resume: Resume | None = None  # read from here: the bytes before it were read before

    @property
    def uri(self) -> str:
        return absolute(self.path)


@dataclass(frozen=True)
class Candidate:
    """One image found in a source: its content hash and size (computed while streaming it)."""

    sample_id: str  # sha256 of the bytes
    size: int
    location: Location
    label: int | None  # None: unlabelled (`ingest --unlabelled`)
    generator: str | None
    group_key: str
    text: str | None
    split: str | None = None  # a split declared by the source (used with --splits source)
    generator_original: str | None = None  # the name the source gave, before `canonical`


@dataclass(frozen=True)
class Problem:
    """An input that cannot become a sample; it is recorded in quarantine with its reason."""

    reason: str
    detail: str
    location: Location
    content_hash: str | None = None


@dataclass(frozen=True)
class Resolved:
    """A problem quarantined by an earlier run that no longer holds (a D3 row whose real image the
    folder now has). Quarantine is append-only, so it is recorded beside it as reason
    `RESOLVED + reason` at the same place; `pipeline status` counts the pair as neither."""

    reason: str  # the reason of the quarantine row it resolves
    detail: str
    location: Location  # that row's place (source_uri, source_member, source_row)


RESOLVED = "resolved:"  # the reason prefix of a quarantine row that resolves an earlier one
Item = Candidate | Problem
# What reading a unit yields; it returns where the next read of its file may start (None: from the
# beginning, as for any file that is not read as a growing one).
Items = Generator[Item, None, Resume | None]


class Returning(Generic[_Y, _R]):
    """Iterates a generator and keeps what it returns (`value`, once it is exhausted)."""

    def __init__(self, generator: Generator[_Y, None, _R]) -> None:
        self._generator = generator
        self.value: _R | None = None

    def __iter__(self) -> Iterator[_Y]:
        self.value = yield from self._generator


def stat_unit(path: Path, fingerprint: str | None = None, extra: str | None = None,
              payload: Any = None, resume: Resume | None = None) -> Unit:
    try:
        st = path.stat()
    except OSError:
        return Unit(path, -1, -1, fingerprint, extra, payload)
    return Unit(path, st.st_size, st.st_mtime_ns, fingerprint, extra, payload, resume)


def tail_digest(path: Path | str, end: int) -> str | None:
    """A digest of the `RESUME_WINDOW` bytes before `end` (and of `end`); None if the file is shorter."""
    start = max(0, end - RESUME_WINDOW)
    try:
        with opened(path, whole=False) as (f, _):
            f.seek(start)
            window = f.read(end - start)
    except OSError:
        return None
    if len(window) != end - start:
        return None
    return hashlib.sha256(window + end.to_bytes(8, "little")).hexdigest()


def resume_point(path: Path | str, end: int, rows: int = 0) -> Resume | None:
    tail = tail_digest(path, end)
    return None if tail is None else Resume(end, tail, rows)


def resume_holds(path: Path | str, resume: Resume) -> bool:
    """Are the bytes before `resume.offset` still those read then? Only the window before it is read:
    a file rewritten there (or shortened) fails; one appended to after it passes."""
    return tail_digest(path, resume.offset) == resume.tail


def absolute(path: Path | str) -> str:
    """An absolute, normalised path without resolving symlinks (`Path.resolve` costs an lstat per
    path component, which at one call per image dominated ingest); a name that is not UTF-8 becomes
    a `file://` URI of its bytes (`reading.uri_of`), which every reader opens."""
    return reading.uri_of(path)


def is_image(path: Path | str) -> bool:
    return str(path).lower().endswith(IMAGE_SUFFIXES)


def hash_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_file(path: Path, limits: Limits) -> tuple[str, int, Location] | Problem:
    """Hash a regular file by streaming it; anything else (device, FIFO, directory, too large,
    unreadable) becomes a problem without reading it."""
    loc = Location(uri=absolute(path))
    try:
        sample_id, size = reading.hash_file(path, limits)
    except Unreadable as exc:
        return Problem(exc.reason, exc.detail, loc)
    return sample_id, size, loc


def hash_location(loc: Location, limits: Limits) -> tuple[str, int] | Problem:
    """Hash the bytes at a file or tar-member location (offset and length) by streaming them."""
    try:
        if loc.offset is None:
            return reading.hash_file(loc.uri, limits)
        return reading.hash_range(loc.uri, loc.offset, loc.length or 0, limits, loc.member or "")
    except Unreadable as exc:
        return Problem(exc.reason, exc.detail, loc)


def parquet_fingerprint(path: Path) -> str | None:
    """A digest of a Parquet file's footer (schema, row groups, statistics): same digest, same file
    for ingest's purposes, even after a copy that changed its modification time."""
    try:
        with opened(path, whole=False) as (f, end):
            if end < 12:
                return None
            f.seek(end - 8)
            tail = f.read(8)
            if tail[4:] != b"PAR1":
                return None
            length = int.from_bytes(tail[:4], "little")
            f.seek(max(0, end - 8 - length))
            footer = f.read(length)
    except OSError:
        return None
    return hashlib.sha256(footer + end.to_bytes(8, "little")).hexdigest()


def row_fingerprint(row: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class TarEntry:
    """The members of one webdataset key: suffix ("jpg", "gen_0.jpg", "txt") → member."""

    key: str
    members: dict[str, tarfile.TarInfo] = field(default_factory=dict)


def split_key(name: str) -> tuple[str, str]:
    """webdataset convention: the key is the path up to the first dot of the file name."""
    head, _, base = text_of(name).rpartition("/")  # a member name that is not UTF-8: a key all the same
    stem, dot, suffix = base.partition(".")
    return (f"{head}/{stem}" if head else stem), suffix if dot else ""


class DamagedArchive(PipelineError):
    """A tar that cannot be opened or breaks off part way; adapters quarantine it and go on."""


def archive_problem(path: Path, exc: DamagedArchive) -> Problem:
    return Problem("unreadable_archive", str(exc).rstrip("."), Location(uri=absolute(path)))


def iter_tar_entries(path: Path, start: int = 0) -> Generator[tuple[tarfile.TarFile, TarEntry], None, Resume | None]:
    """Group a tar's members by key, in archive order, from the header at byte `start` (0: the whole
    archive; else where an earlier read stopped). Yields the open archive with each entry; returns
    where a read of the grown archive may start, None for a compressed one. Raises `DamagedArchive` if
    it is no tar, or where it breaks off (entries before it were yielded)."""
    with ExitStack() as stack:
        try:
            raw, _ = stack.enter_context(opened(path, whole=False))  # a FIFO named .tar never blocks
            raw.seek(start)
            tf = stack.enter_context(tarfile.open(fileobj=raw, mode="r:" if start else "r:*"))
        except (tarfile.TarError, OSError) as exc:
            raise DamagedArchive(f"{text_of(path)} is not a readable tar archive ({exc}).") from exc
        current: TarEntry | None = None
        try:
            for member in tf:
                if not member.isfile():
                    continue
                key, suffix = split_key(member.name)
                if current is None or key != current.key:
                    if current is not None:
                        yield tf, current
                    current = TarEntry(key)
                current.members[suffix.lower()] = member
        except (tarfile.TarError, OSError) as exc:
            raise DamagedArchive(f"{text_of(path)} is damaged after {current.key if current else 'its start'} "
                                 f"({exc}).") from exc
        if current is not None:
            yield tf, current
        # `offset` stands at the first block that is no header: the end-of-archive blocks `tar -r`
        # overwrites. A compressed archive's offsets are not the file's: it is read whole each time.
        return resume_point(path, tf.offset) if isinstance(tf.fileobj, io.BufferedReader) else None


def tar_member_hash(tf: tarfile.TarFile, member: tarfile.TarInfo, limits: Limits) -> tuple[str, int] | None:
    """Stream-hash a tar member; None if it is over the size limit (not read)."""
    if member.size > limits.max_bytes:
        return None
    f = tf.extractfile(member)
    if f is None:
        return hash_bytes(b""), 0
    return reading.sha256_stream(f, limits.max_bytes)


def tar_location(path: Path, member: tarfile.TarInfo) -> Location:
    return Location(
        uri=absolute(path), member=text_of(member.name), offset=member.offset_data, length=member.size
    )


def tar_text(tf: tarfile.TarFile, entry: TarEntry, suffix: str, limit: int = TEXT_MAX_BYTES) -> str | None:
    member = entry.members.get(suffix)
    if member is None:
        return None
    f = tf.extractfile(member)
    raw = f.read(limit) if f is not None else b""
    return raw.decode("utf-8", errors="replace").strip()


def image_member(entry: TarEntry, name: str = "") -> tarfile.TarInfo | None:
    """The image member called `name`.<ext> in an entry ("" for the bare KEY.jpg)."""
    for suffix, member in entry.members.items():
        base, _, ext = suffix.rpartition(".")
        if base == name and f".{ext}" in IMAGE_SUFFIXES:
            return member
    return None


def tar_candidate_or_problem(
    tar: Path, tf: tarfile.TarFile, member: tarfile.TarInfo, limits: Limits
) -> tuple[str, int, Location] | Problem:
    loc = tar_location(tar, member)
    hashed = tar_member_hash(tf, member, limits)
    if hashed is None:
        return Problem("too_large", f"{text_of(tar.name)} member {text_of(member.name)} holds {member.size} "
                       f"bytes, over --max-bytes {limits.max_bytes}", loc)
    return hashed[0], hashed[1], loc


def directory_fingerprint(root: Path) -> str:
    """A digest of a tree's file names, sizes and modification times (no file is read)."""
    digest = hashlib.sha256()
    if root.is_file():
        st = root.stat()
        digest.update(f"{root.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
        return digest.hexdigest()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            try:
                st = os.stat(os.path.join(dirpath, name))
            except OSError:
                continue
            digest.update(f"{dirpath}/{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()
