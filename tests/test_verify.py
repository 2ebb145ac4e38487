"""`pipeline verify`: every shard read in full; damage named in one sentence everywhere;
`--repair` moves damaged shards aside and the next encode recomputes exactly what was lost."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import PipelineError
from pipeline.stages import encode, verify
from pipeline.store import catalog, writes
from pipeline.store.layout import Store
from schemas import version_of
from tests.conftest import encode_config


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path: Path, at: float = 0.3) -> None:
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i : i + 64] = bytes(b ^ 0xFF for b in data[i : i + 64])
    path.write_bytes(bytes(data))


def _restamp(path: Path, table: str | None = None, version: int | None = None) -> None:
    t = pq.read_table(path)
    meta = dict(t.schema.metadata)
    if table is not None:
        meta[b"pipeline.table"] = table.encode()
    if version is not None:
        meta[b"pipeline.schema_version"] = str(version).encode()
    pq.write_table(t.replace_schema_metadata(meta), path)


def _vectors(store: Store) -> dict[str, list[float]]:
    rows = catalog.query(store, "SELECT modality || content_hash AS k, vector FROM embeddings").to_pylist()
    return {r["k"]: r["vector"] for r in rows}


def test_healthy_store_verifies(d3_store: Store) -> None:
    encode.run(encode_config(d3_store))
    result = verify.run(verify.VerifyConfig(d3_store))
    assert result.healthy and result.shards_checked >= 3
    assert result.rows_checked >= 59


@pytest.mark.parametrize("damage", [_truncate, _flip])
def test_damaged_embedding_shard_is_named_and_repair_recomputes_exactly_it(d3_store: Store, damage) -> None:
    encode.run(encode_config(d3_store))
    before = _vectors(d3_store)
    shard = catalog.shard_paths(d3_store, "embeddings")[0]
    rel = d3_store.relative(shard)
    damage(shard)
    if damage is _truncate:  # readers meet it (a flipped bit in a page only a checksum finds: verify)
        with pytest.raises(PipelineError, match=rf"Shard {rel} is damaged .*pipeline verify --repair"):
            catalog.query(Store(d3_store.root), "SELECT count(*) FROM embeddings")  # (a new command)
    result = verify.run(verify.VerifyConfig(d3_store))
    assert [d.path for d in result.damaged] == [rel]
    repaired = verify.run(verify.VerifyConfig(d3_store, repair=True))
    assert rel in repaired.repaired and (d3_store.root / "damaged" / rel).exists()
    assert verify.run(verify.VerifyConfig(d3_store)).healthy
    lost = len(before) - len(_vectors(d3_store))
    assert lost > 0
    again = encode.run(encode_config(d3_store))
    assert again.images_encoded + again.texts_encoded == lost
    assert _vectors(d3_store) == before  # bit-identical, nothing doubled
    reasons = catalog.query(d3_store, "SELECT reason FROM quarantine WHERE stage = 'verify'").column(0).to_pylist()
    assert reasons == ["damaged_shard"]


def test_shard_of_another_schema_version_is_named(d3_store: Store) -> None:
    shard = catalog.shard_paths(d3_store, "samples")[0]
    _restamp(shard, version=version_of("samples") + 1)
    with pytest.raises(PipelineError, match=r"schema version .*pipeline verify --repair"):
        catalog.query(Store(d3_store.root), "SELECT count(*) FROM samples")  # (a new command)
    damaged = verify.run(verify.VerifyConfig(d3_store)).damaged
    assert len(damaged) == 1 and "version" in damaged[0].problem


def test_rebuild_with_a_bad_shard_keeps_views_over_the_healthy_ones(d3_store: Store) -> None:
    encode.run(encode_config(d3_store))
    n_embeddings = catalog.query(d3_store, "SELECT count(*) FROM embeddings").column(0)[0].as_py()
    bad = catalog.shard_paths(d3_store, "samples")[0]
    _truncate(bad)
    result = writes.rebuild(d3_store)
    assert d3_store.relative(bad) in result.ignored
    # samples of the bad shard are gone from the views, every other table reads
    assert catalog.query(d3_store, "SELECT count(*) FROM samples").column(0)[0].as_py() == 0
    assert catalog.query(d3_store, "SELECT count(*) FROM embeddings").column(0)[0].as_py() == n_embeddings
    listed = verify.run(verify.VerifyConfig(d3_store)).damaged
    assert [d.path for d in listed] == [d3_store.relative(bad)] and not listed[0].committed


def test_a_file_stamped_as_another_table_is_not_registered(d3_store: Store) -> None:
    shard = catalog.shard_paths(d3_store, "quarantine")[0]
    stray = d3_store.dataset_dir("samples") / "stray.parquet"
    stray.write_bytes(shard.read_bytes())  # a quarantine shard dropped among the samples
    result = writes.rebuild(d3_store)
    assert "samples/stray.parquet" in result.ignored
    assert catalog.query(d3_store, "SELECT count(*) FROM samples").column(0)[0].as_py() == 59


def test_a_foreign_file_in_samples_blocks_nothing(d3_store: Store) -> None:
    (d3_store.dataset_dir("samples") / "notes.parquet").write_bytes(b"not parquet at all")
    pa.table({"x": [1]})  # (readers and writers alike go on)
    with catalog_writer(d3_store):
        pass
    assert catalog.query(d3_store, "SELECT count(*) FROM samples").column(0)[0].as_py() == 59


def catalog_writer(store: Store):  # noqa: ANN201 - small helper
    from pipeline.store.writes import writing

    return writing(store)


def test_repairing_a_samples_shard_lets_the_next_ingest_restore_exactly_it(tmp_path: Path) -> None:
    from pipeline.stages.ingest import IngestConfig
    from pipeline.stages.ingest import run as ingest
    from pipeline.synthetic import make_d3

    data = make_d3(tmp_path / "src", rows=8, size=32)
    store = Store(tmp_path / "store")
    config = IngestConfig(data.parquet, "d3", store, real_images=data.real_images, shard_rows=10)
    ingest(config)
    before = catalog.query(store, "SELECT sample_id FROM samples ORDER BY 1").column(0).to_pylist()
    shard = catalog.shard_paths(store, "samples")[1]
    _truncate(shard)
    with pytest.raises(PipelineError, match=r"pipeline verify --repair"):
        ingest(config)
    verify.run(verify.VerifyConfig(store, repair=True))
    assert len(catalog.query(store, "SELECT sample_id FROM samples").column(0)) < len(before)
    again = ingest(config)  # the ledger was reset with the repair: the source is read again
    assert again.units_read == 1 and again.added == 10
    assert catalog.query(store, "SELECT sample_id FROM samples ORDER BY 1").column(0).to_pylist() == before
