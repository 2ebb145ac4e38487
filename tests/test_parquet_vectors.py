"""Vector tables written by `parquet_vectors` read back as pyarrow's own files do, mappable in place."""

from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.features.vectors import mappable_pieces
from pipeline.store import parquet_vectors
from pipeline.store.atomic import write_parquet
from pipeline.store.manifest import count_rows
from schemas import embeddings_schema


def _table(n: int, dim: int, dtype: str, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    schema = embeddings_schema(dim, dtype)
    vectors = rng.standard_normal((n, dim)).astype(dtype)
    hashes = [f"{i:064x}" for i in rng.permutation(n)]
    norms = pa.array(rng.random(n).astype(np.float32), mask=rng.random(n) < 0.3)  # some NULL, as encode's may be
    table = pa.Table.from_arrays([
        pa.array(["m"] * n), pa.array(["text"] * n), pa.array(hashes),
        pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), type=schema.field("vector").type), norms,
    ], schema=schema)
    return pa.concat_tables([table.slice(0, n // 3), table.slice(n // 3)])  # two chunks: groups straddle them


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_a_vector_table_reads_back_as_pyarrow_writes_it(tmp_path: Path, dtype: str) -> None:
    table = _table(1000, 12, dtype)
    assert parquet_vectors.supported(table)
    ours, theirs = tmp_path / "ours.parquet", tmp_path / "theirs.parquet"
    with open(ours, "wb") as f:
        parquet_vectors.write(table, f, 256)
    pq.write_table(table, theirs)
    back = pq.ParquetFile(ours, page_checksum_verification=True).read()
    assert back.schema.equals(pq.read_table(theirs).schema, check_metadata=True)
    assert back.equals(pq.read_table(theirs))
    assert [pq.ParquetFile(ours).metadata.row_group(g).num_rows for g in range(4)] == [256, 256, 256, 232]
    pieces = mappable_pieces(ours, 12)  # decodes the first and last groups and compares them with the bytes
    assert pieces is not None and [rows for _, rows in pieces] == [256, 256, 256, 232]
    sql = "SELECT count(*), count(norm), sum(norm), min(content_hash), sum(list_sum(vector::DOUBLE[])) FROM '{}'"
    with duckdb.connect() as con:
        assert con.sql(sql.format(ours)).fetchall() == con.sql(sql.format(theirs)).fetchall()
    assert count_rows(ours, "embeddings") == (("text", 1000),)  # from the footer's statistics


def test_a_flipped_bit_in_a_vector_is_caught_by_the_page_checksum(tmp_path: Path) -> None:
    path = write_parquet(_table(300, 8, "float16"), tmp_path / "e.parquet")
    offset, _ = mappable_pieces(path, 8)[0]
    data = bytearray(path.read_bytes())
    data[offset + 5] ^= 0x10
    path.write_bytes(bytes(data))
    pq.read_table(path)  # unchecked, the damage reads as a vector
    with pytest.raises(OSError, match="CRC"):
        pq.ParquetFile(path, page_checksum_verification=True).read()


def test_tables_it_cannot_write_go_to_pyarrow(tmp_path: Path) -> None:
    table = _table(20, 4, "float16")
    vectors = table.column("vector").combine_chunks()
    holed = pa.FixedSizeListArray.from_arrays(pa.array([None] + [0.5] * 79, pa.float16()), type=vectors.type)
    with_null = table.set_column(3, table.schema.field("vector"), holed)
    assert not parquet_vectors.supported(with_null)
    assert not parquet_vectors.supported(table.select(["model_key", "norm"]))  # no vector column
    assert pq.read_table(write_parquet(with_null, tmp_path / "n.parquet")).equals(with_null)
    empty = table.slice(0, 0)
    assert parquet_vectors.supported(empty)
    pq.write_table(empty, tmp_path / "theirs.parquet")
    back = pq.read_table(write_parquet(empty, tmp_path / "e.parquet"))
    assert back.num_rows == 0 and back.schema.equals(pq.read_schema(tmp_path / "theirs.parquet"), check_metadata=True)
