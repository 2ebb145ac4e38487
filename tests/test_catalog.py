"""The catalog is derived from the Parquet files: rebuildable, self-healing, movable."""

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.errors import PipelineError
from pipeline.stages.encode import run as encode
from pipeline.store import catalog, writes
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
    writes.rebuild(d3_store)  # takes the writer lock itself
    assert _counts(d3_store) == before


def test_orphan_shards_are_registered_and_temps_removed(d3_store: Store) -> None:
    encode(encode_config(d3_store))
    before = _counts(d3_store)
    orphan = catalog.shard_paths(d3_store, "samples")[0]
    copy = orphan.with_name("samples-orphan.parquet")
    stale = orphan.with_name(".samples-x.parquet.abcd.tmp")
    with locked(d3_store):  # (taking the lock reconciles too: plant the files after it)
        shutil.copy(orphan, copy)  # as if renamed into place just before a crash
        stale.write_bytes(b"half a file")  # an untagged temp: a writer from before temps had owners
        result = writes.reconcile(d3_store)
    assert (result.added, result.temps_removed) == (1, 1)
    assert not stale.exists()
    assert _counts(d3_store)[0] == 2 * before[0]  # the views see the orphan's rows
    with locked(d3_store):
        copy.unlink()  # a committed shard deleted behind the pipeline's back: damage, not forgotten
        assert writes.reconcile(d3_store).missing == 1
    with pytest.raises(PipelineError, match="samples-orphan.parquet is damaged .the file is missing.*verify --repair"):
        _counts(Store(d3_store.root))
    with locked(d3_store):
        writes.forget(d3_store, [copy])
    assert _counts(d3_store) == before


def test_store_can_be_moved(d3_store: Store, tmp_path: Path) -> None:
    encode(encode_config(d3_store))
    before = _counts(d3_store)
    moved = Store(tmp_path / "elsewhere" / "store")
    shutil.copytree(d3_store.root, moved.root)
    shutil.rmtree(d3_store.root)
    assert _counts(moved) == before


def _own_duckdb(path: str, cwd: Path) -> tuple:
    """The counts as a person's own DuckDB session reads them from `catalog.duckdb`, run in `cwd`."""
    import subprocess
    import sys

    code = f"import duckdb; print(duckdb.connect({path!r}, read_only=True).sql({COUNTS!r}).fetchall()[0])"
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return tuple(int(n) for n in done.stdout.strip("()\n").split(","))


def test_catalog_file_opens_from_any_folder_and_after_the_store_moved(d3_store: Store, tmp_path: Path) -> None:
    """The issue's case: `duckdb.connect("data/store/catalog.duckdb")` from the project root failed with
    "No files found that match the pattern samples/...parquet" (the views held store-relative paths)."""
    encode(encode_config(d3_store))
    before = _counts(d3_store)
    project = d3_store.root.parent  # the store is `project/store`
    assert _own_duckdb("store/catalog.duckdb", cwd=project) == before  # a relative path, from above
    assert _own_duckdb(str(d3_store.catalog_path), cwd=Path("/")) == before  # absolute, from elsewhere
    assert _own_duckdb("catalog.duckdb", cwd=d3_store.root) == before  # from inside the store
    moved = tmp_path / "elsewhere" / "store"
    moved.parent.mkdir()
    d3_store.root.rename(moved)  # no pipeline command runs after the move
    assert _own_duckdb(str(moved / "catalog.duckdb"), cwd=Path("/")) == before
    assert _own_duckdb("store/catalog.duckdb", cwd=moved.parent) == before


def test_catalog_file_attached_elsewhere_reads_the_store_the_variable_names(d3_store: Store) -> None:
    import duckdb

    con = duckdb.connect()
    con.execute(f"ATTACH '{d3_store.catalog_path}' AS store (READ_ONLY)")
    con.execute("SET VARIABLE pipeline_store = ?", [str(d3_store.root)])
    assert con.sql("SELECT count(*) FROM store.samples").fetchall()[0][0] == _counts(d3_store)[0]


def test_empty_store_has_typed_empty_views(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    with locked(store):
        writes.commit(store, [])
    table = catalog.query(store, "SELECT * FROM samples")
    assert table.num_rows == 0 and "sample_id" in table.column_names
    assert catalog.query(store, "SELECT * FROM scores").num_rows == 0
    assert "vector" in catalog.query(store, "SELECT * FROM embeddings").column_names


def test_scores_of_a_run_that_never_committed_are_swept(d3_store: Store) -> None:
    import pyarrow as pa

    from schemas import SCORES

    ghost = d3_store.dataset_dir("scores") / "20260101-000000-deadbeef-0000.parquet"
    ghost.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"run_id": ["20260101-000000-deadbeef-0000"], "sample_id": ["x"], "split": ["test"],
                             "label": pa.array([1], pa.int8()), "generator": ["g"],
                             "score": pa.array([0.5], pa.float32())}, schema=SCORES), ghost)
    half_run = d3_store.run_dir("20260101-000000-deadbeef-0000")
    half_run.mkdir(parents=True)
    (half_run / "config.json").write_text("{}")  # killed before run.parquet
    with locked(d3_store):  # the next writer, whatever it is, sweeps them when it takes the lock
        pass
    assert not ghost.exists() and not half_run.exists()
    assert catalog.query(d3_store, "SELECT count(*) FROM scores").column(0)[0].as_py() == 0


def test_a_rebuild_killed_half_way_leaves_the_old_catalog_readable(d3_store: Store, monkeypatch) -> None:
    before = catalog.query(d3_store, "SELECT count(*) FROM samples").column(0)[0].as_py()

    def die(*args: object) -> None:
        raise KeyboardInterrupt  # as a SIGKILL would stop it: after deriving, before the swap

    monkeypatch.setattr(writes, "write_manifest", die)
    with pytest.raises(KeyboardInterrupt):
        writes.rebuild(d3_store)
    monkeypatch.undo()
    assert catalog.query(d3_store, "SELECT count(*) FROM samples").column(0)[0].as_py() == before


def test_readers_need_only_the_manifest_and_old_stores_still_read(d3_store: Store) -> None:
    before = _counts(d3_store)
    d3_store.catalog_path.unlink()  # readers never open catalog.duckdb
    assert _counts(d3_store) == before
    writes.rebuild(d3_store)
    assert d3_store.catalog_path.exists()
    d3_store.manifest_path.unlink()  # a store from before manifests: its catalog.duckdb is read
    assert _counts(d3_store) == before
    with locked(d3_store):  # the first writer writes the manifest
        pass
    assert d3_store.manifest_path.exists() and _counts(d3_store) == before


def test_a_late_staged_shard_of_vectors_already_committed_is_not_adopted_twice(d3_store: Store) -> None:
    """A killed driver's worker may stage a shard after the next run encoded the same hashes."""
    encode(encode_config(d3_store))
    before = _counts(d3_store)
    committed = [p for p in catalog.shard_paths(d3_store, "embeddings") if p.name.startswith("image-")][0]
    late = d3_store.staged(committed.with_name("image-late.parquet"))
    late.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(committed, late)
    with locked(d3_store):  # the next writer adopts staged files
        pass
    assert not late.exists()
    assert _counts(d3_store) == before  # nothing doubled
    assert not committed.with_name("image-late.parquet").exists()
