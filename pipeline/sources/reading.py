"""Bounded reading: the one way the pipeline opens a file whose bytes come from outside the store.

Ingest's adapters, encode (`LocationReader`), import-features (`image_path`), neighbors (`--image`),
the report's thumbnails, the format probe, perturb and predict all read through here, so every
input is bounded alike:

- A special file is refused on `stat`, before any open (opening some devices has effects). The
  open itself is non-blocking (`O_NONBLOCK`: a FIFO swapped in after the `stat` still cannot block)
  and is checked again with `fstat` on the open descriptor: a regular file, within `max_bytes`.
- Reads go in chunks with a hard cap: never more than `max_bytes + 1` bytes (or the recorded size
  + 1), whatever the file claims, so a file that grows while read is caught, not swallowed.
- Where the store recorded the bytes (`Expected`: size and SHA-256), what is read must be them
  (`changed_since_ingest`); a size that differs is seen on `fstat`, and nothing is read.
- Where a path comes from a data file (a features file's `image_path`, a Parquet image cell's
  `path`), it must lie inside the folders `Limits.roots` names, symlinks resolved; the resolved
  path is opened with `O_NOFOLLOW`, so a link swapped in meanwhile is refused, not followed.

A file that cannot be read raises `Unreadable` with a reason code (below), which the caller turns
into a quarantine row (ingest, encode, import-features) or a row of predict's output: never an error
of the run. It subclasses `OSError`, so callers that catch I/O errors catch it too.

Names the OS gives as bytes that are not UTF-8 (Python's surrogate-escaped `str`) cannot be Parquet
strings. `uri_of` keeps such a path losslessly as a `file://` URI (its bytes percent-encoded);
`path_of` turns it back, and every open here takes either form. `text_of` shows any name as text.

`CappedLines` bounds line-oriented text (CSV manifests, predict's lists): a line over its cap is
dropped and reported, so one absurd line never makes a parser refuse the whole file.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import quote_from_bytes, unquote_to_bytes

DEFAULT_MAX_BYTES = 64 * 1024 * 1024  # far above any real image; a 6 GB "image" is a mistake
TEXT_MAX_BYTES = 1 << 20  # a sidecar caption or a tar's text member: read at most this much
CHUNK = 1 << 20

# Reason codes (quarantine's `reason`, predict's rows)
UNREADABLE = "unreadable"  # missing, no permission, an I/O error
NOT_REGULAR = "not_a_regular_file"  # a directory, device, FIFO or socket
TOO_LARGE = "too_large"  # over --max-bytes
OUTSIDE = "outside_source"  # a path named by a data file that leads outside the folders allowed
CHANGED = "changed_since_ingest"  # not the bytes the store recorded

_URI = "file://"
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class Readable(Protocol):
    """What the readers below take: a file object, a tar member, a bounded part of either."""

    def read(self, n: int = -1, /) -> bytes: ...


class Unreadable(OSError):
    """An input that cannot be read as asked; `reason` is one of the codes above."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return self.detail


@dataclass(frozen=True)
class Limits:
    """What a read may take: at most `max_bytes` from one file (or member, or cell); and, when `roots`
    is set, only files inside those folders (real paths, made by `Limits.within`)."""

    max_bytes: int = DEFAULT_MAX_BYTES
    roots: tuple[str, ...] | None = None

    @staticmethod
    def within(folders: Sequence[str | Path], max_bytes: int = DEFAULT_MAX_BYTES) -> Limits:
        return Limits(max_bytes, tuple(os.path.realpath(path_of(f)) for f in folders))


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Expected:
    """What the store recorded about the bytes at a location (None: not known)."""

    size: int | None = None
    sha256: str | None = None

    @staticmethod
    def of(row: dict[str, object], digest: bool = True) -> Expected:
        """From a sample row (`byte_length`, `sample_id`); `digest=False`: the size only."""
        size = row.get("byte_length")
        sha = row.get("sample_id") if digest else None
        return Expected(int(size) if isinstance(size, int) else None, sha if isinstance(sha, str) else None)


# --- names ---------------------------------------------------------------------------------


def text_of(name: str | Path) -> str:
    """A path or name as valid UTF-8 text: bytes that are not UTF-8 shown as \\xNN (for messages and
    keys that need not lead back to the file)."""
    text = str(name)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def uri_of(path: str | Path) -> str:
    """An absolute, normalised path without resolving symlinks (`Path.resolve` costs an lstat per
    component); a path that is not valid UTF-8 becomes a `file://` URI of its bytes, losslessly."""
    absolute = os.path.abspath(path)
    try:
        absolute.encode("utf-8")
        return absolute
    except UnicodeEncodeError:
        return _URI + quote_from_bytes(os.fsencode(absolute))


def path_of(uri: str | Path) -> str:
    """The file system path of what `uri_of` gave (a plain path stays as it is)."""
    text = str(uri)
    return os.fsdecode(unquote_to_bytes(text[len(_URI):])) if text.startswith(_URI) else text


# --- opening -------------------------------------------------------------------------------


def open_regular(path: str | Path, limits: Limits = DEFAULT_LIMITS, whole: bool = True) -> tuple[BinaryIO, int]:
    """A regular file open for reading (the caller closes it: `with f:`), and its size as `fstat`
    gives it. `whole`: the file itself is what will be read, so its size must be within
    `limits.max_bytes` (a tar or Parquet file that holds the bytes is not bounded by it). Raises
    `Unreadable`."""
    fd, size = _open_fd(path, limits, whole)
    try:
        return open(fd, "rb"), size  # noqa: SIM115 - the caller closes it
    except BaseException:
        os.close(fd)
        raise


def _open_fd(path: str | Path, limits: Limits, whole: bool) -> tuple[int, int]:
    """`open_regular`'s descriptor. Messages are made only on failure: this runs once per image."""
    name = path_of(path)
    target = name if limits.roots is None else _confined(name, limits.roots)
    try:
        st = os.stat(target)  # a special file is refused before any open
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(name, st.st_mode)
        fd = os.open(target, _OPEN_FLAGS if limits.roots is None else _OPEN_FLAGS | _NOFOLLOW)
    except Unreadable:
        raise
    except OSError as exc:
        raise Unreadable(UNREADABLE, f"{text_of(name)}: {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)  # what was opened, whatever the name leads to now
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(name, st.st_mode)
        if whole and st.st_size > limits.max_bytes:
            raise Unreadable(TOO_LARGE, f"{text_of(name)} holds {st.st_size} bytes, over --max-bytes "
                             f"{limits.max_bytes}")
        return fd, st.st_size
    except BaseException:
        os.close(fd)
        raise


@contextmanager
def opened(path: str | Path, limits: Limits = DEFAULT_LIMITS, whole: bool = True) -> Iterator[tuple[BinaryIO, int]]:
    """`open_regular` as a context manager: the file is closed on leaving."""
    f, size = open_regular(path, limits, whole)
    with f:
        yield f, size


def ensure_regular(path: str | Path) -> None:
    """Raise `Unreadable` unless `path` is a regular file that opens (checked without blocking); for a
    file a library then opens by name (a Parquet or HDF5 file, a CSV manifest)."""
    with opened(path, whole=False):
        pass


# --- reading -------------------------------------------------------------------------------


def read_file(path: str | Path, limits: Limits = DEFAULT_LIMITS, expect: Expected | None = None) -> bytes:
    """The bytes of a whole file, read in chunks up to the cap, checked against `expect`."""
    known = expect.size if expect is not None else None
    fd, size = _open_fd(path, limits, whole=False)
    try:
        if known is not None and size != known:  # seen on fstat: nothing is read
            raise Unreadable(CHANGED, f"{_shown(path)} holds {size} bytes; {known} were recorded at ingest")
        if size > limits.max_bytes:
            raise Unreadable(TOO_LARGE, f"{_shown(path)} holds {size} bytes, over --max-bytes {limits.max_bytes}")
        data = read_capped(_Descriptor(fd), min(known, limits.max_bytes) if known is not None else limits.max_bytes)
    finally:
        os.close(fd)
    if data is None:
        if known is not None:
            raise Unreadable(CHANGED, f"{_shown(path)} grew past the {known} bytes recorded at ingest while read")
        raise Unreadable(TOO_LARGE, f"{_shown(path)} grew over --max-bytes {limits.max_bytes} while read")
    check_digest(data, expect, path)
    return data


def read_range(path: str | Path, offset: int, length: int, limits: Limits = DEFAULT_LIMITS,
               expect: Expected | None = None, what: str = "") -> bytes:
    """`length` bytes at `offset` of a file (a tar member), checked against `expect`; `what` names
    the part in messages."""
    if length > limits.max_bytes:
        raise Unreadable(TOO_LARGE, f"{_shown(path, what)} holds {length} bytes, over --max-bytes {limits.max_bytes}")
    f, size = open_regular(path, limits, whole=False)
    with f:
        if offset < 0 or offset + length > size:
            reason = CHANGED if expect is not None else UNREADABLE
            raise Unreadable(reason, f"{_shown(path, what)} lies at bytes {offset}..{offset + length}, past the "
                                     f"file's end ({size})")
        f.seek(offset)
        data = read_capped(_Bounded(f, length), length) or b""  # the member's bytes, not those after it
    if len(data) != length:
        raise Unreadable(CHANGED if expect is not None else UNREADABLE,
                         f"{_shown(path, what)}: {len(data)} of its {length} bytes could be read")
    check_digest(data, expect, path, what)
    return data


def read_capped(f: Readable, cap: int) -> bytes | None:
    """At most `cap` bytes of a stream, in chunks; None if it holds more (at most `cap + 1` read)."""
    parts, got = [], 0
    while got <= cap and (chunk := f.read(min(CHUNK, cap + 1 - got))):
        parts.append(chunk)
        got += len(chunk)
    return None if got > cap else b"".join(parts)


def sha256_stream(f: Readable, limit: int) -> tuple[str, int] | None:
    """Hash a stream chunk by chunk, never holding it; None if it holds more than `limit` bytes."""
    digest = hashlib.sha256()
    size = 0
    while chunk := f.read(min(CHUNK, limit + 1 - size)):
        size += len(chunk)
        if size > limit:
            return None
        digest.update(chunk)
    return digest.hexdigest(), size


def hash_file(path: str | Path, limits: Limits = DEFAULT_LIMITS) -> tuple[str, int]:
    """SHA-256 and size of a whole file, streamed (ingest: the bytes are never held). Raises `Unreadable`."""
    fd, _ = _open_fd(path, limits, whole=True)
    try:
        hashed = sha256_stream(_Descriptor(fd), limits.max_bytes)
    finally:
        os.close(fd)
    if hashed is None:
        raise Unreadable(TOO_LARGE, f"{_shown(path)} grew over --max-bytes {limits.max_bytes} while read")
    return hashed


def hash_range(path: str | Path, offset: int, length: int, limits: Limits = DEFAULT_LIMITS,
               what: str = "") -> tuple[str, int]:
    """SHA-256 of `length` bytes at `offset` (a tar member), streamed. Raises `Unreadable`."""
    if length > limits.max_bytes:
        raise Unreadable(TOO_LARGE, f"{_shown(path, what)} holds {length} bytes, over --max-bytes {limits.max_bytes}")
    f, size = open_regular(path, limits, whole=False)
    with f:
        if offset < 0 or offset + length > size:
            raise Unreadable(UNREADABLE, f"{_shown(path, what)} lies at bytes {offset}..{offset + length}, past the "
                             f"file's end ({size})")
        f.seek(offset)
        hashed = sha256_stream(_Bounded(f, length), length)
    if hashed is None or hashed[1] != length:
        raise Unreadable(UNREADABLE, f"{_shown(path, what)}: the file ends inside it")
    return hashed


def read_text(path: str | Path, cap: int = TEXT_MAX_BYTES) -> str | None:
    """The first `cap` bytes of a text file as text (bad UTF-8 replaced); None when there is no
    regular file to read (missing, a FIFO, …): a sidecar caption is optional."""
    try:
        with opened(path, whole=False) as (f, _):
            raw = f.read(cap)
    except Unreadable:
        return None
    return raw.decode("utf-8", errors="replace")


def head_digest(path: str | Path, cap: int = TEXT_MAX_BYTES) -> str | None:
    """SHA-256 of a file's first `cap` bytes; None when there is no regular file to read."""
    try:
        with opened(path, whole=False) as (f, _):
            return hashlib.sha256(f.read(cap)).hexdigest()
    except Unreadable:
        return None


# --- lines ---------------------------------------------------------------------------------


class CappedLines:
    """A binary stream that passes a text file through, less every line longer than `cap` bytes (its
    newline not counted; each noted in `dropped` as (line number, bytes)); at most `cap` bytes of a
    line are held.
    `first_line` is the number of the first line read (1 for a file read from its start). Reads go
    in chunks no larger than the cap, so only a chunk's first and last lines can be over it: the
    lines between pass in one slice."""

    def __init__(self, raw: BinaryIO, cap: int, first_line: int = 1) -> None:
        self._raw, self._cap, self._chunk = raw, cap, max(1, min(CHUNK, cap))
        self._line = first_line  # the number of the line `_tail` belongs to
        self._tail = b""  # the current line's bytes so far (no newline yet), at most `cap`
        self._skipping = 0  # bytes of an over-long line seen so far (0: not in one)
        self._out = bytearray()  # passed bytes not yet returned
        self._eof = False
        self.dropped: list[tuple[int, int]] = []
        self.closed = False

    def read(self, n: int = -1) -> bytes:
        while not self._eof and (n < 0 or len(self._out) < n):
            chunk = self._raw.read(self._chunk)
            if chunk:
                self._feed(chunk)
                continue
            self._eof = True
            if self._skipping:
                self.dropped.append((self._line, self._skipping))
            else:
                self._out += self._tail  # a last line without its newline
            self._tail, self._skipping = b"", 0
        n = len(self._out) if n < 0 else min(n, len(self._out))
        data = bytes(self._out[:n])
        del self._out[:n]
        return data

    def _feed(self, chunk: bytes) -> None:
        first = chunk.find(b"\n")
        if first < 0:
            self._extend(chunk)
            return
        self._extend(chunk[:first])  # the end of the line in progress
        if self._skipping:
            self.dropped.append((self._line, self._skipping))
        else:
            self._out += self._tail
            self._out += b"\n"
        self._tail, self._skipping = b"", 0
        self._line += 1
        last = chunk.rfind(b"\n")
        if last > first:  # whole lines, each within the cap (as the chunk is)
            middle = chunk[first + 1:last + 1]
            self._out += middle
            self._line += middle.count(b"\n")
        self._extend(chunk[last + 1:])

    def _extend(self, rest: bytes) -> None:
        """Bytes of a line not ended yet."""
        if self._skipping:
            self._skipping += len(rest)
        elif len(self._tail) + len(rest) > self._cap:
            self._skipping = len(self._tail) + len(rest)
            self._tail = b""
        else:
            self._tail += rest

    # what pyarrow's readers ask of a Python file object
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True


# --- private -------------------------------------------------------------------------------


class _Descriptor:
    """`read` on a descriptor: a stream without a file object's buffer (ingest hashes one per image)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def read(self, n: int = -1, /) -> bytes:
        return os.read(self._fd, n if n >= 0 else CHUNK)


class _Bounded:
    """At most `length` bytes of a file object, read from where it stands."""

    def __init__(self, f: Readable, length: int) -> None:
        self._f, self._left = f, length

    def read(self, n: int = -1, /) -> bytes:
        if self._left <= 0:
            return b""
        n = self._left if n < 0 else min(n, self._left)
        data = self._f.read(n)
        self._left -= len(data)
        return data


def _shown(path: str | Path, what: str = "") -> str:
    """A path (and the part of it read) as text for a message."""
    return text_of(path_of(path)) + (f" member {text_of(what)}" if what else "")


def _confined(name: str, roots: tuple[str, ...]) -> str:
    """The real path of `name`, if that lies inside one of the `roots`."""
    real = os.path.realpath(name)
    if not any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in roots):
        raise Unreadable(OUTSIDE, f"{text_of(name)} leads outside the folders it may be read from "
                         f"({', '.join(roots)})")
    return real


def _not_regular(name: str, mode: int) -> Unreadable:
    return Unreadable(NOT_REGULAR, f"{text_of(name)} is a {kind(mode)}, not a regular file")


def check_digest(data: bytes, expect: Expected | None, where: str | Path, what: str = "") -> None:
    """Raise `Unreadable` (`changed_since_ingest`) unless `data` has the SHA-256 `expect` names;
    `where` (a path, and the `what` part of it) names it in the message."""
    if expect is not None and expect.sha256 is not None and hashlib.sha256(data).hexdigest() != expect.sha256:
        raise Unreadable(CHANGED, f"{_shown(where, what)}: the bytes no longer match the sha256 recorded at ingest")


def kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISLNK, "symbolic link")):
        if test(mode):
            return name
    return "special file"
