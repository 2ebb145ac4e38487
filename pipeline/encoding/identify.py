"""`IdentifyImages`: images known only by where they are → their SHA-256, their cached vector's row,
and a decoded picture for those the cache lacks. The first half of `predict`'s unit of work.

Like `DecodeImages` (which it extends) it needs no model, so it runs in decoding processes: every
read is bounded (`pipeline.sources.reading`: regular files only, non-blocking opens, `max_bytes`),
every decode goes through `decode_rgb` (`max_pixels`), and every failure becomes the row's `reason`,
never an error of the run. Bytes already encoded with the model (found by their hash in `RowKeys`)
are not decoded at all: a second predict of the same images reads and hashes them, nothing more.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.encoding.units import Decoded, DecodeImages, EncodeSpec, encoded_rows
from pipeline.features.rowkeys import RowKeys
from pipeline.sources.images import UndecodableImage, decode_rgb
from pipeline.sources.locations import Location, LocationReader
from pipeline.sources.reading import Limits, Unreadable

CACHED_ROW = "cached_row"  # the column IdentifyImages adds: the matrix row of a cached vector, or -1
CARRIED = ("path", "caption", "byte_offset", "byte_length")  # columns of the input it returns too


class IdentifyImages(DecodeImages):
    """Input rows (`schemas.PREDICT_INPUTS`) → encoded-schema image rows keyed by the bytes' SHA-256,
    with `cached_row` and the carried columns, and a picture where one is needed (`Decoded`)."""

    def __init__(self, spec: EncodeSpec, known: RowKeys | None = None) -> None:
        super().__init__(spec)
        self.known = known

    def decode(self, rows: pa.Table) -> Decoded:
        self.reader = self.reader or LocationReader(Limits(self.spec.max_bytes))
        n = rows.num_rows
        hashes: list[str | None] = [None] * n
        reasons: list[str | None] = rows.column("reason").to_pylist()
        details: list[str | None] = rows.column("detail").to_pylist()
        data: list[bytes | None] = [None] * n
        for i, row in enumerate(rows.to_pylist()):
            if reasons[i] is not None:
                continue
            try:
                data[i] = self.reader.read(Location.from_row(row))
            except Unreadable as exc:
                reasons[i], details[i] = exc.reason, exc.detail
                continue
            except OSError as exc:  # an I/O error in the middle of a read
                reasons[i], details[i] = "unreadable", str(exc) or type(exc).__name__
                continue
            hashes[i] = hashlib.sha256(data[i]).hexdigest()  # type: ignore[arg-type]
        ids = pa.array(hashes, pa.string())
        cached = self.known.find(ids) if self.known is not None else np.full(n, -1, np.int64)
        shape = self.spec.picture_shape
        pictures = np.zeros((n, *shape), np.uint8)
        ok = np.zeros(n, bool)
        for i in range(n):
            if data[i] is None or cached[i] >= 0:
                continue
            picture, reasons[i], details[i] = self._picture(data[i], shape)  # type: ignore[arg-type]
            if picture is not None:
                pictures[i], ok[i] = picture, True
        sizes = pa.array([None if d is None else len(d) for d in data], pa.int64())  # what was read: the bytes
        data.clear()
        located = rows.select(["source_uri", "source_member"]).append_column("sample_id", ids)
        table = encoded_rows(self.spec, "image", located, reasons, details)
        for name in CARRIED:
            table = table.append_column(name, sizes if name == "byte_length" else rows.column(name))
        return Decoded(table.append_column(CACHED_ROW, pa.array(cached, pa.int64())), pictures, ok)

    def _picture(self, data: bytes, shape: tuple[int, ...]) -> tuple[Any, str | None, str | None]:
        try:
            picture = np.asarray(self.to_picture(decode_rgb(data, self.spec.max_pixels)), np.uint8)
        except UndecodableImage as exc:
            return None, exc.reason, exc.detail
        return (picture, None, None) if picture.shape == shape else \
            (None, "unsupported_preprocessing", f"the preprocessing gave a {picture.shape} picture, not {shape}")
