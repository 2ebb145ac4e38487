from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.stages import verify
from pipeline.store import catalog, writes
from pipeline.store.layout import Store
from schemas import SAMPLES, embeddings_schema, schema_problem, version_of
from tests.conftest import locked


def test_every_written_shard_carries_table_and_version(d3_store: Store) -> None:
    for path in catalog.shard_paths(d3_store, "samples"):
        meta = pq.read_schema(path).metadata
        assert meta[b"pipeline.table"] == b"samples"
        assert meta[b"pipeline.schema_version"] == str(version_of("samples")).encode()
        assert pq.read_schema(path).names == SAMPLES.names


def test_reader_refuses_an_unknown_schema_version(d3_store: Store, tmp_path: Path) -> None:
    shard = catalog.shard_paths(d3_store, "samples")[0]
    table = pq.read_table(shard)
    meta = dict(table.schema.metadata)
    meta[b"pipeline.schema_version"] = b"99"
    future = d3_store.dataset_dir("samples") / "future.parquet"
    pq.write_table(table.replace_schema_metadata(meta), future)
    before = catalog.query(d3_store, "SELECT count(*) FROM samples").column(0)[0].as_py()
    with locked(d3_store):
        result = writes.reconcile(d3_store)
    # a file of a newer schema is never registered: the views keep reading the known shards
    assert result.ignored == (d3_store.relative(future),)
    assert catalog.query(d3_store, "SELECT count(*) FROM samples").column(0)[0].as_py() == before
    (damage,) = verify.run(verify.VerifyConfig(d3_store)).damaged
    assert "schema version 99 of 'samples'" in damage.problem and "reads version 3" in damage.problem


def test_schema_problem_names_foreign_files() -> None:
    assert "no pipeline schema stamp" in schema_problem(None, "samples", "x.parquet")
    assert schema_problem(SAMPLES.metadata, "samples", "x") is None


def test_embeddings_schema_is_fixed_size_list_of_the_chosen_type() -> None:
    schema = embeddings_schema(768, "float16")
    assert schema.field("vector").type == pa.list_(pa.float16(), 768)
    assert embeddings_schema(4, "float32").field("vector").type == pa.list_(pa.float32(), 4)
    with pytest.raises(ValueError):
        embeddings_schema(4, "int8")
