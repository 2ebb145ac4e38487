"""Key sets answer membership like a Python set (file, delta and merges), and are kept between runs."""

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.store import catalog, keys, writes
from pipeline.store.atomic import write_parquet
from pipeline.store.keys import KeyQuery, KeySet, StoreKeys, keys_of, scratch_dir
from pipeline.store.layout import Store
from pipeline.store.writes import writing
from schemas import SAMPLES, from_rows


def _ids(n: int, seed: int) -> list[str]:
    return [hashlib.sha256(f"{seed}:{i}".encode()).hexdigest() for i in range(n)]


def test_membership_matches_a_python_set_across_merges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keys, "DELTA_MAX", 50)  # force several merges of the delta into new files
    keyset = KeySet(None, tmp_path, "t")
    truth: set[str] = set()
    rng = np.random.default_rng(0)
    stored = _ids(300, 0) + ["not-hex", "x" * 70]  # any text is an id
    keyset.add(keys_of(pa.array(stored)))
    truth.update(stored)
    for round_ in range(6):
        batch = list(rng.choice(sorted(truth), 20)) + _ids(40, round_ + 1)[: 10 + round_ * 5]
        mask = keyset.contains(keys_of(pa.array(batch)))
        assert mask.tolist() == [b in truth for b in batch]
        keyset.add(keys_of(pa.array(batch)))
        truth.update(batch)
        assert len(keyset) == len(truth)
    path = keyset.flush()
    base = np.memmap(path, "S16", "r")
    assert len(base) == len(truth) and (base[:-1] < base[1:]).all()  # sorted and distinct
    assert len(list(tmp_path.glob("*.keys"))) == 1  # merged files replace each other
    assert keyset.contains(keys_of(pa.array(sorted(truth)))).all()
    assert not keyset.contains(keys_of(pa.array(_ids(50, 99)))).any()


def _commit_samples(store: Store, ids: list[str]) -> None:
    now = datetime.now(UTC)
    rows = [{"sample_id": i, "label": 0, "generator": "real", "split": "train", "group_key": i,
             "source_format": "folder", "source_uri": "/x", "ingested_at": now} for i in ids]
    with writing(store, create=True):
        writes.commit(store, [write_parquet(from_rows(SAMPLES, rows),
                                             store.new_shard(store.dataset_dir("samples"), "t"))])


def test_sets_are_kept_between_runs_and_only_new_shards_scanned(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path / "store")
    _commit_samples(store, _ids(30, 0))
    scanned: list[Path] = []
    real = keys._scan
    monkeypatch.setattr(keys, "_scan", lambda q, paths, scratch: scanned.extend(paths) or real(q, paths, scratch))
    queries = {"ids": KeyQuery("samples", "sample_id")}
    with writing(store), StoreKeys(store, queries) as known:
        assert known.get("ids").contains(keys_of(pa.array(_ids(30, 0)))).all()
    assert len(scanned) == 1
    _commit_samples(store, _ids(5, 1))
    scanned.clear()
    with writing(store), StoreKeys(store, queries) as known:
        assert known.get("ids").contains(keys_of(pa.array(_ids(30, 0) + _ids(5, 1)))).all()
    assert [p.name for p in scanned] == [catalog.shard_paths(store, "samples")[-1].name]  # only the new one
    scanned.clear()
    with writing(store), StoreKeys(store, queries) as known:
        assert len(known.get("ids")) == 35
    assert scanned == []  # nothing new: nothing read
    # a shard gone (set aside by verify --repair): the set is built again without its ids
    gone = catalog.shard_paths(store, "samples")[0]
    with writing(store):
        writes.forget(store, [gone])
    gone.unlink()
    with writing(store), StoreKeys(store, queries) as known:
        held = known.get("ids")
        assert len(held) == 5 and not held.contains(keys_of(pa.array(_ids(30, 0)))).any()
    # a set the caller maintains covers the shards committed while it was open, without reading them
    scanned.clear()
    with writing(store), StoreKeys(store, queries, maintained=("ids",)) as known:
        known.get("ids")
        _commit_samples(store, _ids(7, 2))
        known.add("ids", keys_of(pa.array(_ids(7, 2))))
    with writing(store), StoreKeys(store, queries) as known:
        assert len(known.get("ids")) == 12
    assert scanned == []
    files = sorted(p.name for p in (store.root / "cache" / "keys").iterdir())
    assert len(files) == 2 and not list((store.root / "cache").glob("keys-*"))  # one set, one entry


def test_a_run_that_fails_keeps_the_cache_as_it_was(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    _commit_samples(store, _ids(10, 0))
    queries = {"ids": KeyQuery("samples", "sample_id")}
    with pytest.raises(RuntimeError), writing(store), StoreKeys(store, queries, maintained=("ids",)) as known:
        known.add("ids", keys_of(pa.array(_ids(3, 5))))  # rows never committed
        raise RuntimeError("killed")
    with writing(store), StoreKeys(store, queries) as known:
        assert len(known.get("ids")) == 10


def test_scratch_directories_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead = tmp_path / "cache" / "keys-999999999"
    dead.mkdir(parents=True)
    mine = scratch_dir(tmp_path)
    assert mine.is_dir() and not dead.exists()


def test_keys_made_in_python_are_the_keys_duckdb_makes(tmp_path: Path) -> None:
    ids = pa.array(_ids(50, 7) + ["é", "", "x" * 300])
    by_sql = keys_of(pa.table({"id": ids}), "id")  # a table: DuckDB's md5
    assert (keys_of(ids) == by_sql).all()  # a string array: hashlib's
    assert (keys_of(pa.chunked_array([ids[:10], ids[10:]])) == by_sql).all()
    assert (keys_of(ids.slice(5, 20)) == by_sql[5:25]).all()
    digests = [hashlib.sha256(f"{i}".encode()).digest() for i in range(30)]
    hexes, made = keys.hex_keys(digests)
    assert hexes.to_pylist() == [d.hex() for d in digests]
    assert (made == keys_of(pa.table({"id": hexes}), "id")).all()
    with pytest.raises(ValueError, match="NULL"):
        keys_of(pa.array(["a", None]))


def test_first_occurrence_marks_the_first_of_each_key() -> None:
    made = keys_of(pa.array(_ids(40, 3)))
    batch = made[np.random.default_rng(0).integers(0, 40, 200)]  # repeats, in no order
    first = keys.first_occurrence(batch)
    assert (np.flatnonzero(first) == np.sort(np.unique(batch, return_index=True)[1])).all()
    assert (keys._sorted_distinct(batch) == np.unique(batch)).all()
