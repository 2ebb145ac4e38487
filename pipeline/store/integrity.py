"""Is a shard still the file that was committed? What a reader checks before it uses one.

At commit the manifest records each shard's inode, size, modification and change times and a
digest of its Parquet footer (`footer_digest`). A stat that matches all of them means the file was
not written through the filesystem since: any write moves the change time, and so does a `touch`
that puts the modification time back, and no user can set the change time. Then nothing is read.
Otherwise (`manifest.stat_problem`):
- another inode (the store copied or restored, or the file replaced by a rename): its footer must
  be the committed one (digest, rows, size);
- the same inode with a new change time (written in place, or chmod, chown, touch): its footer as
  above, and every page's bytes against the CRC its header carries (`page_crc_problem`; pages are
  not decoded: 8x faster than reading the table), since a flipped bit in a data page leaves the
  footer as it was.
A shard that passes is remembered in STORE/cache/checked.json by its stat (`Checked`), so the next
command reads nothing for it again; the next writer records its new stat in the manifest.
Left uncovered: a change below the filesystem (a disk's bit rot, a raw write to the device) that
leaves the inode's times alone, and a file replaced by a rename with a copy whose footer is intact
but whose pages differ; `pipeline verify` reads every page of every shard and finds both.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.errors import first_line
from pipeline.store import cache
from pipeline.store.atomic import write_text
from pipeline.store.layout import Store

_MAGIC = b"PAR1"


def footer_digest(path: Path) -> str:
    """SHA-256 (128 bits, hex) of a Parquet file's footer: its metadata, length and magic number.
    Raises OSError or ValueError when the file has no Parquet footer."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size < 12:
            raise ValueError("too short for a Parquet file")
        f.seek(size - 8)
        tail = f.read(8)
        length = int.from_bytes(tail[:4], "little")
        if tail[4:] != _MAGIC or length > size - 12:
            raise ValueError("no Parquet footer at its end")
        f.seek(size - 8 - length)
        return hashlib.sha256(f.read(length) + tail).hexdigest()[:32]


def read_pages(path: Path) -> tuple[int, str | None]:
    """Read every page of a shard, each checked against its CRC; (rows read, a clause saying why it
    does not read, or None). Memory: one row group."""
    try:
        pf = pq.ParquetFile(path, page_checksum_verification=True)
        rows = 0
        for i in range(pf.num_row_groups):
            rows += pf.read_row_group(i).num_rows
    except Exception as exc:  # noqa: BLE001 - whatever fails to read is damage to report
        return 0, f"it does not read: {first_line(exc)}"
    if rows != pf.metadata.num_rows:
        return rows, f"its pages hold {rows} rows but its footer says {pf.metadata.num_rows}"
    return rows, None


def page_crc_problem(path: Path) -> str | None:
    """Check every page of a shard against the CRC in its header, without decoding it; a clause saying
    what is wrong, or None. A file with a page that carries no CRC (written by another tool) is read
    in full instead (`read_pages`). Memory: one column chunk."""
    try:
        meta = pq.read_metadata(path)
        uncovered = False
        with open(path, "rb") as f:
            for g in range(meta.num_row_groups):
                group = meta.row_group(g)
                for c in range(group.num_columns):
                    column = group.column(c)
                    start = column.data_page_offset
                    if column.has_dictionary_page and column.dictionary_page_offset:
                        start = min(start, column.dictionary_page_offset)
                    f.seek(start)
                    chunk = memoryview(f.read(column.total_compressed_size))
                    at = 0
                    while at < len(chunk):
                        size, crc, at = _page_header(chunk, at)
                        if at + size > len(chunk):
                            return f"a page of column {column.path_in_schema} runs past its column chunk"
                        if crc is None:
                            uncovered = True
                        elif zlib.crc32(chunk[at:at + size]) != crc & 0xFFFFFFFF:
                            return (f"a page of column {column.path_in_schema} in row group {g} fails its CRC "
                                    "checksum")
                        at += size
    except Exception as exc:  # noqa: BLE001 - whatever fails to parse is damage to report
        return f"it does not read: {first_line(exc)}"
    return read_pages(path)[1] if uncovered else None


def _page_header(data: memoryview, at: int) -> tuple[int, int | None, int]:
    """A Parquet PageHeader (Thrift compact) at `at`: (compressed page size, CRC or None, where the
    page's bytes start)."""
    size, crc = -1, None
    field = 0
    while True:
        byte = data[at]
        at += 1
        kind = byte & 0x0F
        if kind == 0:
            break
        delta = byte >> 4
        if delta:
            field += delta
        else:
            value, at = _varint(data, at)
            field = _unzigzag(value)
        if field in (3, 4) and kind == 5:
            value, at = _varint(data, at)
            if field == 3:
                size = _unzigzag(value)
            else:
                crc = _unzigzag(value)
        else:
            at = _skip(data, at, kind)
    if size < 0:
        raise ValueError("a page header without its size")
    return size, crc, at


def _skip(data: memoryview, at: int, kind: int) -> int:
    """Past one Thrift compact value of type `kind`."""
    if kind in (1, 2):  # booleans live in the field header
        return at
    if kind == 3:
        return at + 1
    if kind in (4, 5, 6):
        return _varint(data, at)[1]
    if kind == 7:
        return at + 8
    if kind == 8:
        length, at = _varint(data, at)
        return at + length
    if kind in (9, 10):
        head = data[at]
        at += 1
        count, element = head >> 4, head & 0x0F
        if count == 15:
            count, at = _varint(data, at)
        for _ in range(count):
            at = at + 1 if element in (1, 2) else _skip(data, at, element)
        return at
    if kind == 11:
        count, at = _varint(data, at)
        if count:
            types = data[at]
            at += 1
            for _ in range(count):
                at = _skip(data, _skip(data, at, types >> 4), types & 0x0F)
        return at
    if kind == 12:
        while True:
            byte = data[at]
            at += 1
            if byte & 0x0F == 0:
                return at
            if not byte >> 4:
                at = _varint(data, at)[1]
            at = _skip(data, at, byte & 0x0F)
    raise ValueError(f"an unknown Thrift type {kind} in a page header")


def _varint(data: memoryview, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7


def _unzigzag(value: int) -> int:
    return (value >> 1) ^ -(value & 1)


Stat = tuple[int, int, int, int]  # inode, size, mtime_ns, ctime_ns


def stat_of(st: os.stat_result) -> Stat:
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class Checked:
    """Shards found intact after their stat changed since commit: relative path -> (digest, stat)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.path = store.root / "cache" / "checked" / "checked.json"
        self._known: dict[str, list[object]] | None = None
        self.found: dict[str, list[object]] = {}

    def holds(self, rel: str, digest: str | None, stat: Stat) -> bool:
        if self._known is None:
            self._known = self._read()
        return self._known.get(rel) == [digest, *stat]

    def inode(self, rel: str, digest: str | None) -> int | None:
        """The inode on which `rel` was last found intact with this footer digest (a copied store's new one)."""
        if self._known is None:
            self._known = self._read()
        known = self._known.get(rel)
        if not (isinstance(known, list) and len(known) == 5 and known[0] == digest):
            return None
        return known[1] if isinstance(known[1], int) else None

    def add(self, rel: str, digest: str | None, stat: Stat) -> None:
        self.found[rel] = [digest, *stat]

    def save(self, committed: set[str]) -> None:
        """Remember what was found (entries of shards no longer committed are dropped). A store this
        process cannot write keeps no memory: the next command checks again."""
        if not self.found:
            return
        try:
            with cache.building(self.path.parent):
                known = {k: v for k, v in self._read().items() if k in committed}
                write_text(self.path, json.dumps(known | self.found))
        except OSError:
            pass  # (a read-only store: correct, only slower next time)

    def _read(self) -> dict[str, list[object]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}
