"""Read an image's bytes from wherever ingest found them: a file, a tar member, a Parquet cell.

A location is the `source_*`/`byte_*` columns of a sample row. `LocationReader` keeps the last
Parquet row group it read, because pending rows arrive sorted by location.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq


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
    def __init__(self) -> None:
        self._cached_key: tuple[str, str, int] | None = None
        self._cached_cells: list[Any] = []
        self._row_group_starts: dict[str, list[int]] = {}

    def read(self, loc: Location) -> bytes:
        if loc.row is not None and loc.member is not None:
            return self._read_parquet_cell(loc.uri, loc.member, loc.row)
        with open(loc.uri, "rb") as f:
            if loc.offset is not None:
                f.seek(loc.offset)
                return f.read(loc.length if loc.length is not None else -1)
            return f.read()

    def _read_parquet_cell(self, uri: str, column: str, row: int) -> bytes:
        starts = self._row_group_starts.get(uri)
        if starts is None:
            meta = pq.read_metadata(uri)
            starts, total = [], 0
            for i in range(meta.num_row_groups):
                starts.append(total)
                total += meta.row_group(i).num_rows
            self._row_group_starts[uri] = starts
        group = bisect.bisect_right(starts, row) - 1
        key = (uri, column, group)
        if key != self._cached_key:
            table = pq.ParquetFile(uri).read_row_group(group, columns=[column])
            self._cached_cells = table.column(0).to_pylist()
            self._cached_key = key
        cell = self._cached_cells[row - starts[group]]
        if isinstance(cell, dict):  # Hugging Face image struct {bytes, path}
            if cell.get("bytes"):
                return bytes(cell["bytes"])
            if cell.get("path"):
                return (Path(uri).parent / cell["path"]).read_bytes()
            return b""
        return bytes(cell or b"")
