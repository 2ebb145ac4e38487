"""Read an image's bytes from wherever ingest found them: a file, a tar member, a Parquet cell.

A location is the `source_*`/`byte_*` columns of a sample row. `LocationReader` reads through
`pipeline.sources.reading`, so every read is bounded (regular files only, non-blocking opens, at most
`max_bytes`) and, given what the store recorded (`Expected`), checked to be those bytes; a failure
raises `reading.Unreadable` with its reason code. It keeps the last Parquet row group it read,
because pending rows arrive sorted by location.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq

from pipeline.sources import reading
from pipeline.sources.reading import (
    CHANGED,
    DEFAULT_LIMITS,
    TOO_LARGE,
    UNREADABLE,
    Expected,
    Limits,
    Unreadable,
    text_of,
)


@dataclass(frozen=True)
class Location:
    uri: str
    member: str | None = None  # tar member name, or the Parquet image column
    row: int | None = None  # row inside a Parquet source
    offset: int | None = None  # byte offset inside a tar
    length: int | None = None

    @staticmethod
    def from_row(row: dict[str, Any]) -> Location:
        return Location(
            uri=row["source_uri"],
            member=row.get("source_member"),
            row=row.get("source_row"),
            offset=row.get("byte_offset"),
            length=row.get("byte_length"),
        )


class LocationReader:
    """Bounded reads of locations: `limits.max_bytes` caps a file, a tar member or a Parquet cell."""

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._cached_key: tuple[str, str, int] | None = None
        self._cached_cells: list[Any] = []
        self._row_group_starts: dict[str, list[int]] = {}

    def read(self, loc: Location, expect: Expected | None = None) -> bytes:
        """The bytes at `loc`; with `expect`, only if they are what the store recorded. Raises `Unreadable`."""
        if loc.row is not None and loc.member is not None:
            return self._read_parquet_cell(loc.uri, loc.member, loc.row, expect)
        if loc.offset is not None:
            return reading.read_range(loc.uri, loc.offset, loc.length if loc.length is not None else 0, self.limits,
                                      expect, loc.member or "")
        return reading.read_file(loc.uri, self.limits, expect)

    def _read_parquet_cell(self, uri: str, column: str, row: int, expect: Expected | None) -> bytes:
        where = f"{text_of(reading.path_of(uri))} [{column}] row {row}"
        try:
            cell = self._cell(uri, column, row)
        except Unreadable:  # an OSError too: its own reason stands
            raise
        except (OSError, ValueError, IndexError, KeyError) as exc:  # pyarrow's errors are ValueError/OSError kinds
            raise Unreadable(CHANGED if expect is not None else UNREADABLE, f"{where}: {exc}") from exc
        if isinstance(cell, dict):  # Hugging Face image struct {bytes, path}
            if cell.get("bytes"):
                cell = cell["bytes"]
            elif cell.get("path"):  # a file beside the Parquet file: never one outside its folder
                folder = os.path.dirname(reading.path_of(uri))
                limits = Limits.within([folder], self.limits.max_bytes)
                return reading.read_file(os.path.join(folder, cell["path"]), limits, expect)
            else:
                cell = b""
        data = bytes(cell or b"")
        if len(data) > self.limits.max_bytes:
            raise Unreadable(TOO_LARGE, f"{where} holds {len(data)} bytes, over --max-bytes {self.limits.max_bytes}")
        if expect is not None and expect.size is not None and len(data) != expect.size:
            raise Unreadable(CHANGED, f"{where} holds {len(data)} bytes; {expect.size} were recorded at ingest")
        reading.check_digest(data, expect, where)
        return data

    def _cell(self, uri: str, column: str, row: int) -> Any:
        path = reading.path_of(uri)
        starts = self._row_group_starts.get(uri)
        if starts is None:
            reading.ensure_regular(path)  # pyarrow opens it by name: a FIFO must not get that far
            meta = pq.read_metadata(path)
            starts, total = [], 0
            for i in range(meta.num_row_groups):
                starts.append(total)
                total += meta.row_group(i).num_rows
            self._row_group_starts[uri] = starts
        group = bisect.bisect_right(starts, row) - 1
        key = (uri, column, group)
        if key != self._cached_key:
            table = pq.ParquetFile(path).read_row_group(group, columns=[column])
            self._cached_cells = table.column(0).to_pylist()
            self._cached_key = key
        return self._cached_cells[row - starts[group]]
