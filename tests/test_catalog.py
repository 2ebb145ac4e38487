"""The catalog is derived from the Parquet files: rebuildable, self-healing, movable."""

import shutil
from pathlib import Path

from pipeline.stages.encode import run as encode
from pipeline.store import catalog
from pipeline.store.layout import Store
from tests.conftest import encode_config, locked

COUNTS = (
    "SELECT (SELECT count(*) FROM samples), (SELECT count(*) FROM embeddings), "
    "(SELECT count(*) FROM quarantine)"
)


def _counts(store: Store) -> tuple:
    return tuple(catalog.query(store, COUNTS).to_pylist()[0].values())


def test_rebuild_from_parquet_gives_the_same_views(d3_store: Store) -> None:
    encode(encode_config(d3_store))
    before = _counts(d3_store)
    assert all(before)
    catalog.rebuild(d3_store)  # takes the writer lock itself
    assert _counts(d3_store) == before


def test_orphan_shards_are_registered_and_temps_removed(d3_store: Store) -> None:
    encode(encode_config(d3_store))
    before = _counts(d3_store)
    orphan = catalog.shard_paths(d3_store, "samples")[0]
    copy = orphan.with_name("samples-orphan.parquet")
    shutil.copy(orphan, copy)  # as if renamed into place just before a crash
    stale = orphan.with_name(".samples-x.parquet.abcd.tmp")
    stale.write_bytes(b"half a file")
    with locked(d3_store):
        result = catalog.reconcile(d3_store)
    assert (result.added, result.temps_removed) == (1, 1)
    assert not stale.exists()
    assert _counts(d3_store)[0] == 2 * before[0]  # the views see the orphan's rows
    copy.unlink()
    with locked(d3_store):
        assert catalog.reconcile(d3_store).dropped == 1
    assert _counts(d3_store) == before


def test_store_can_be_moved(d3_store: Store, tmp_path: Path) -> None:
    encode(encode_config(d3_store))
    before = _counts(d3_store)
    moved = Store(tmp_path / "elsewhere" / "store")
    shutil.copytree(d3_store.root, moved.root)
    shutil.rmtree(d3_store.root)
    assert _counts(moved) == before


def test_empty_store_has_typed_empty_views(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    with locked(store):
        catalog.commit(store, [])
    table = catalog.query(store, "SELECT * FROM samples")
    assert table.num_rows == 0 and "sample_id" in table.column_names
    assert catalog.query(store, "SELECT * FROM scores").num_rows == 0
    assert "vector" in catalog.query(store, "SELECT * FROM embeddings").column_names
