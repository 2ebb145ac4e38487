"""Parquet files with fixed-size vector columns, written at the speed of their bytes.

pyarrow's writer spends per-value work on a `fixed_size_list<float16>` column (repetition and
definition levels for every value, each float16 handled as a 2-byte FIXED_LEN_BYTE_ARRAY): about
100 MB/s on a disk that takes 350. Here the same file is written directly: each row group's vector
column chunk is one PLAIN, uncompressed data page whose levels are the same few bytes repeated
(every list full, no value NULL) followed by the vectors' own buffer, row-major, written as is; the
other columns are PLAIN pages compressed whole (zstd), with min/max statistics for strings and
integers. The footer carries the Arrow schema (`ARROW:schema`, with the table's metadata), so
pyarrow reads back the table's exact types, and every page a CRC, as `write_parquet` promises.

Only tables `supported` says yes to are written here (string, integer and float columns, vector
columns with no NULL); `atomic.write_parquet` gives anything else to pyarrow.
"""

from __future__ import annotations

import base64
import zlib
from typing import BinaryIO

import numpy as np
import pyarrow as pa

_I32, _I64, _BIN, _LIST, _STRUCT, _BOOL = 5, 6, 8, 9, 12, 1  # Thrift compact types
_INT32, _INT64, _FLOAT, _DOUBLE, _BYTE_ARRAY, _FLBA = 1, 2, 4, 5, 6, 7  # Parquet physical types
_PLAIN, _RLE = 0, 3
_REQUIRED, _OPTIONAL, _REPEATED = 0, 1, 2
_UNCOMPRESSED, _ZSTD = 0, 6
CREATED_BY = "clipdetect-pipeline parquet_vectors 1"
_NUMBERS = {pa.int32(): (_INT32, "<i4"), pa.int64(): (_INT64, "<i8"), pa.float32(): (_FLOAT, "<f4"),
            pa.float64(): (_DOUBLE, "<f8")}
_VALUES: dict[pa.DataType, tuple[str, dict[int, list]]] = {pa.float16(): ("<f2", {15: []}), pa.float32(): ("<f4", {})}


def supported(table: pa.Table) -> bool:
    """Whether this writer can write `table` (and has a reason to: a vector column)."""
    vectors = 0
    for column, field in zip(table.columns, table.schema, strict=True):
        t = field.type
        if pa.types.is_fixed_size_list(t):
            if t.value_type not in _VALUES or t.list_size < 1 or column.null_count:
                return False
            if any(chunk.flatten().null_count for chunk in column.chunks):
                return False
            vectors += 1
        elif not (pa.types.is_string(t) or t in _NUMBERS):
            return False
    return vectors > 0


def write(table: pa.Table, out: BinaryIO, row_group_rows: int, codec: str = "zstd") -> None:
    """Write `table` (see `supported`) as Parquet to a binary file, `row_group_rows` rows a group."""
    compress = pa.Codec(codec) if codec != "none" else None
    code = {"zstd": _ZSTD, "none": _UNCOMPRESSED}[codec]
    out.write(b"PAR1")
    at = 4
    groups: list[list] = []
    for start in range(0, table.num_rows, row_group_rows):
        rows = min(row_group_rows, table.num_rows - start)
        part = table.slice(start, rows)
        chunks, first, raw_total, stored_total = [], at, 0, 0
        for field, column in zip(table.schema, part.columns, strict=True):
            array = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
            if pa.types.is_fixed_size_list(field.type):
                meta, written, raw = _vector_chunk(out, at, field, array)
            else:
                meta, written, raw = _column_chunk(out, at, field, array, compress, code)
            chunks.append([(2, _I64, 0), (3, _STRUCT, meta)])
            at, raw_total, stored_total = at + written, raw_total + raw, stored_total + written
        groups.append([(1, _LIST, (_STRUCT, chunks)), (2, _I64, raw_total), (3, _I64, rows),
                       (5, _I64, first), (6, _I64, stored_total), (7, _I32, len(groups))])
    footer = _struct([
        (1, _I32, 2),
        (2, _LIST, (_STRUCT, _schema(table.schema))),
        (3, _I64, table.num_rows),
        (4, _LIST, (_STRUCT, groups)),
        (5, _LIST, (_STRUCT, _key_values(table.schema))),
        (6, _BIN, CREATED_BY.encode()),
        (7, _LIST, (_STRUCT, [[(1, _STRUCT, [])]] * _leaves(table.schema))),
    ])
    out.write(footer)
    out.write(len(footer).to_bytes(4, "little"))
    out.write(b"PAR1")


# --- column chunks --------------------------------------------------------------------------


def _vector_chunk(out: BinaryIO, at: int, field: pa.Field, array: pa.Array) -> tuple[list, int, int]:
    """One PLAIN, uncompressed page: repetition levels (0 then 1s, per row), definition levels
    (all at the maximum: every list full, no value NULL), then the values' buffer as it lies."""
    t = field.type
    rows, dim = len(array), t.list_size
    values = array.flatten()
    dtype = _VALUES[t.value_type][0]
    data = np.frombuffer(values.buffers()[1], dtype)[values.offset:values.offset + len(values)] if rows else \
        np.empty(0, dtype)
    max_def = int(field.nullable) + 1 + int(t.value_field.nullable)
    row_levels = _rle_run(1, 0, 1) + (_rle_run(dim - 1, 1, 1) if dim > 1 else b"")
    rep = _block(row_levels * rows)
    defs = _block(_rle_run(rows * dim, max_def, max_def.bit_length()) if rows else b"")
    levels = rep + defs
    payload = data.view(np.uint8).data
    size = len(levels) + len(payload)
    crc = zlib.crc32(payload, zlib.crc32(levels))
    header = _page_header(rows * dim, size, size, crc)
    out.write(header)
    out.write(levels)
    out.write(payload)
    written = len(header) + size
    meta = [(1, _I32, _FLBA if dtype == "<f2" else _FLOAT), (2, _LIST, (_I32, [_PLAIN, _RLE])),
            (3, _LIST, (_BIN, [field.name.encode(), b"list", b"element"])), (4, _I32, _UNCOMPRESSED),
            (5, _I64, rows * dim), (6, _I64, written), (7, _I64, written), (9, _I64, at)]
    return meta, written, written


def _column_chunk(out: BinaryIO, at: int, field: pa.Field, array: pa.Array, compress: pa.Codec | None,
                  code: int) -> tuple[list, int, int]:
    """One PLAIN page of a string or number column (definition levels if the field may be NULL),
    compressed whole, with its statistics."""
    n = len(array)
    present = array.drop_null() if array.null_count else array
    levels = b""
    if field.nullable:
        if array.null_count:
            valid = np.packbits(array.is_valid().to_numpy(zero_copy_only=False), bitorder="little")
            levels = _block(_varint(len(valid) << 1 | 1) + valid.tobytes())
        else:
            levels = _block(_rle_run(n, 1, 1) if n else b"")
    stats: list = [(3, _I64, array.null_count)]
    if pa.types.is_string(field.type):
        physical = _BYTE_ARRAY
        values = _plain_strings(present)
        if len(present):
            low, high = _string_range(present)
            stats += [(5, _BIN, high), (6, _BIN, low), (7, _BOOL, True), (8, _BOOL, True)]
    else:
        physical, dtype = _NUMBERS[field.type]
        numbers = present.to_numpy(zero_copy_only=False).astype(dtype)
        values = numbers.tobytes()
        if len(numbers) and physical in (_INT32, _INT64):
            stats += [(5, _BIN, numbers.max().tobytes()), (6, _BIN, numbers.min().tobytes()),
                      (7, _BOOL, True), (8, _BOOL, True)]
    raw = levels + values
    stored = compress.compress(raw, asbytes=True) if compress is not None else raw
    header = _page_header(n, len(raw), len(stored), zlib.crc32(stored))
    out.write(header)
    out.write(stored)
    meta = [(1, _I32, physical), (2, _LIST, (_I32, [_PLAIN, _RLE])), (3, _LIST, (_BIN, [field.name.encode()])),
            (4, _I32, code), (5, _I64, n), (6, _I64, len(header) + len(raw)),
            (7, _I64, len(header) + len(stored)), (9, _I64, at), (12, _STRUCT, stats)]
    return meta, len(header) + len(stored), len(header) + len(raw)


def _plain_strings(array: pa.Array) -> bytes:
    """PLAIN BYTE_ARRAY: each value's length (4 bytes, little-endian), then its bytes."""
    n = len(array)
    if not n:
        return b""
    offsets = np.frombuffer(array.buffers()[1], np.int32)[array.offset:array.offset + n + 1]
    data = np.frombuffer(array.buffers()[2], np.uint8)[offsets[0]:offsets[-1]] if offsets[-1] > offsets[0] else \
        np.empty(0, np.uint8)
    lengths = np.diff(offsets).astype("<i4")
    out = np.empty(len(data) + 4 * n, np.uint8)
    prefix = (offsets[:-1] - offsets[0] + 4 * np.arange(n))[:, None] + np.arange(4)
    out[prefix] = lengths.view(np.uint8).reshape(n, 4)
    body = np.ones(len(out), bool)
    body[prefix.ravel()] = False
    out[body] = data
    return out.tobytes()


def _string_range(array: pa.Array) -> tuple[bytes, bytes]:
    """Min and max of non-NULL strings by their bytes (Parquet's order for UTF-8)."""
    import pyarrow.compute as pc

    binary = array.cast(pa.binary())
    found = pc.min_max(binary)
    return found["min"].as_py(), found["max"].as_py()


# --- the footer -----------------------------------------------------------------------------


def _schema(schema: pa.Schema) -> list:
    elements = [[(4, _BIN, b"schema"), (5, _I32, len(schema))]]
    for field in schema:
        t = field.type
        repetition = _OPTIONAL if field.nullable else _REQUIRED
        name = field.name.encode()
        if pa.types.is_fixed_size_list(t):
            _, logical = _VALUES[t.value_type]
            leaf: list = [(1, _I32, _FLBA), (2, _I32, 2)] if t.value_type == pa.float16() else [(1, _I32, _FLOAT)]
            elements += [
                [(3, _I32, repetition), (4, _BIN, name), (5, _I32, 1), (6, _I32, 3), (10, _STRUCT, [(3, _STRUCT, [])])],
                [(3, _I32, _REPEATED), (4, _BIN, b"list"), (5, _I32, 1)],
                leaf + [(3, _I32, _OPTIONAL if t.value_field.nullable else _REQUIRED), (4, _BIN, b"element")]
                + [(10, _STRUCT, [(k, _STRUCT, v) for k, v in logical.items()])] * bool(logical),
            ]
        elif pa.types.is_string(t):
            elements.append([(1, _I32, _BYTE_ARRAY), (3, _I32, repetition), (4, _BIN, name), (6, _I32, 0),
                             (10, _STRUCT, [(1, _STRUCT, [])])])
        else:
            elements.append([(1, _I32, _NUMBERS[t][0]), (3, _I32, repetition), (4, _BIN, name)])
    return elements


def _leaves(schema: pa.Schema) -> int:
    return len(schema)  # one leaf per column: vectors are one list of one primitive


def _key_values(schema: pa.Schema) -> list:
    pairs = [[(1, _BIN, k), (2, _BIN, v)] for k, v in (schema.metadata or {}).items()]
    arrow = base64.b64encode(schema.serialize().to_pybytes())
    return pairs + [[(1, _BIN, b"ARROW:schema"), (2, _BIN, arrow)]]


def _page_header(values: int, raw: int, stored: int, crc: int) -> bytes:
    signed = crc - (1 << 32) if crc >= 1 << 31 else crc
    return _struct([(1, _I32, 0), (2, _I32, raw), (3, _I32, stored), (4, _I32, signed),
                    (5, _STRUCT, [(1, _I32, values), (2, _I32, _PLAIN), (3, _I32, _RLE), (4, _I32, _RLE)])])


# --- encodings ------------------------------------------------------------------------------


def _rle_run(count: int, value: int, bit_width: int) -> bytes:
    """One run of the RLE / bit-packing hybrid: `count` copies of `value`."""
    return _varint(count << 1) + value.to_bytes((bit_width + 7) // 8, "little")


def _block(levels: bytes) -> bytes:
    """Levels of a version 1 data page: their length (4 bytes, little-endian), then them."""
    return len(levels).to_bytes(4, "little") + levels


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _struct(fields: list) -> bytes:
    """Thrift compact protocol: a struct of (field id, type, value), in increasing id order."""
    out = bytearray()
    last = 0
    for fid, kind, value in fields:
        ctype = (1 if value else 2) if kind == _BOOL else kind
        delta = fid - last
        out += bytes([delta << 4 | ctype]) if 0 < delta <= 15 else bytes([ctype]) + _varint(_zigzag(fid))
        last = fid
        if kind != _BOOL:
            out += _value(kind, value)
    out.append(0)
    return bytes(out)


def _value(kind: int, value: object) -> bytes:
    if kind in (_I32, _I64):
        assert isinstance(value, int)
        return _varint(_zigzag(value))
    if kind == _BIN:
        assert isinstance(value, bytes)
        return _varint(len(value)) + value
    if kind == _STRUCT:
        assert isinstance(value, list)
        return _struct(value)
    assert isinstance(value, tuple)
    element, items = value
    head = bytes([len(items) << 4 | element]) if len(items) < 15 else bytes([0xF0 | element]) + _varint(len(items))
    return head + b"".join(_value(element, item) for item in items)


def _zigzag(value: int) -> int:
    return (value << 1) ^ (value >> 63)
