"""Key sets answer membership like a Python set, through the sorted file and the in-memory delta."""

import hashlib
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from pipeline.store import keys as module
from pipeline.store.keys import KeySet, keys_of, scratch_dir


def _ids(n: int, seed: int) -> list[str]:
    return [hashlib.sha256(f"{seed}:{i}".encode()).hexdigest() for i in range(n)]


def test_membership_matches_a_python_set_across_merges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(module, "DELTA_MAX", 50)  # force several merges of the delta into the file
    stored = _ids(300, 0) + ["not-hex", "x" * 70]  # any text is an id
    with duckdb.connect() as con:
        con.register("t", pa.table({"id": stored + [None]}))
        keyset = KeySet.from_query(con, "SELECT id FROM t", tmp_path / "a.keys", tmp_path)
    assert len(keyset) == 302
    truth = set(stored)
    rng = np.random.default_rng(0)
    for round_ in range(6):
        batch = list(rng.choice(stored, 20)) + _ids(40, round_ + 1)[: 10 + round_ * 5]
        mask = keyset.contains(keys_of(pa.array(batch)))
        assert mask.tolist() == [b in truth for b in batch]
        keyset.add(keys_of(pa.array(batch)))
        truth.update(batch)
        assert len(keyset) == len(truth)
    base = np.memmap(tmp_path / "a.keys", "S16", "r")
    assert (base[:-1] < base[1:]).all()  # the merged file stays sorted and distinct
    assert keyset.contains(keys_of(pa.array(sorted(truth)))).all()
    assert not keyset.contains(keys_of(pa.array(_ids(50, 99)))).any()


def test_an_empty_query_gives_an_empty_set(tmp_path: Path) -> None:
    with duckdb.connect() as con:
        keyset = KeySet.from_query(con, "SELECT NULL::VARCHAR WHERE false", tmp_path / "e.keys", tmp_path)
    assert len(keyset) == 0 and keyset.contains(keys_of(pa.array(["a"]))).tolist() == [False]
    keyset.add(keys_of(pa.array(["a", "a"])))
    assert len(keyset) == 1


def test_scratch_directories_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead = tmp_path / "cache" / "keys-999999999"
    dead.mkdir(parents=True)
    mine = scratch_dir(tmp_path)
    assert mine.is_dir() and not dead.exists()
