"""The vector matrix maps the embedding shards where they lie, and copies only what it cannot map."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.features.vectors as vectors
from pipeline.features.vectors import mappable_pieces, open_matrix
from pipeline.store import writes
from pipeline.store.writes import writing
from tests.conftest import planted_store


def _stored(store, modality: str) -> tuple[np.ndarray, np.ndarray]:
    """Every vector of the model in shard order (the matrix's row order), and its norm."""
    shards = vectors.shards_of(store, "planted", modality)
    table = pa.concat_tables(pq.read_table(p, columns=["vector", "norm"]) for p in shards)
    dim = table.schema.field("vector").type.list_size
    flat = table.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(-1, dim).astype(np.float32), table.column("norm").to_numpy()


def _layout(store, modality: str = "image") -> dict:
    return json.loads((store.root / "cache/vectors/planted" / modality / "layout.json").read_text())


def test_shards_are_mapped_in_place_not_copied(tmp_path: Path) -> None:
    store = planted_store(tmp_path, rows=300, dim=12)
    matrix = open_matrix(store, "planted", "image")
    expected, norms = _stored(store, "image")
    assert matrix.rows == len(expected) == 1500
    rows = np.random.default_rng(0).permutation(matrix.rows)[:700]
    assert np.array_equal(matrix.gather(rows), expected[rows])
    assert np.allclose(matrix.gather(rows, raw=True), expected[rows] * norms[rows, None], rtol=1e-6)
    got = np.concatenate([c for _, c in matrix.chunks(size=97)])
    assert np.array_equal(got, expected)
    assert {s["kind"] for s in _layout(store)["segments"]} == {"parquet"}
    cache = store.root / "cache/vectors/planted/image"
    # only the norms (4 bytes a row plus a header per shard): no second copy of any vector
    assert not list(cache.glob("*[!s].npy"))
    assert sum(f.stat().st_size for f in cache.iterdir()) < 1500 * 4 + 4096


def test_a_large_gather_runs_in_parts_in_threads_with_the_same_result(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    store = planted_store(tmp_path, rows=300, dim=12)
    matrix = open_matrix(store, "planted", "image")
    expected, norms = _stored(store, "image")
    monkeypatch.setattr(vectors, "GATHER_PARALLEL_FROM", 64)
    monkeypatch.setattr(vectors, "MAX_OPEN_MAPS", 2)  # threads map and let go of files under each other
    rows = np.random.default_rng(1).integers(0, matrix.rows, 5000)  # repeats too
    assert np.array_equal(matrix.gather(rows), expected[rows])
    assert np.allclose(matrix.gather(rows, raw=True), expected[rows] * norms[rows, None], rtol=1e-6)
    assert matrix.gather(np.zeros(0, np.int64)).shape == (0, 12)


def test_a_shard_that_cannot_be_mapped_is_copied_and_rows_keep_their_order(tmp_path: Path) -> None:
    store = planted_store(tmp_path, rows=100, dim=8)
    shard = vectors.shards_of(store, "planted", "image")[0]
    # rewrite the shard the way an older version did: zstd, so its vectors are not where they lie
    old = pq.read_table(shard)
    pq.write_table(old, shard, compression="zstd")
    assert mappable_pieces(shard, 8) is None
    writes.rebuild(store)  # (a shard changed in place is damage until the catalog is derived again)
    planted_store(tmp_path, rows=60, dim=8, seed=1, file_name="0001.h5")  # a second, mappable shard
    matrix = open_matrix(store, "planted", "image")
    assert [s["kind"] for s in _layout(store)["segments"]] == ["npy", "parquet"]
    expected, _ = _stored(store, "image")
    assert matrix.rows == 800
    assert np.array_equal(matrix.gather(np.arange(800)[::-1]), expected[::-1])


def test_a_layout_with_several_pages_per_row_group_is_refused(tmp_path: Path) -> None:
    dim, n = 4, 1000
    values = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float16)
    table = pa.table({"content_hash": [f"{i:064x}" for i in range(n)],
                      "vector": pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), dim)})
    path = tmp_path / "multi.parquet"
    pq.write_table(table, path, compression="none", use_dictionary=False, max_rows_per_page=100)
    assert mappable_pieces(path, dim) is None  # the tail of the chunk is not the vectors: never mapped
    pq.write_table(table, path, compression="none", use_dictionary=False, data_page_size=1 << 30,
                   max_rows_per_page=n)
    pieces = mappable_pieces(path, dim)
    assert pieces is not None and sum(r for _, r in pieces) == n


def test_many_shards_past_the_open_map_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vectors, "MAX_OPEN_MAPS", 2)  # each mapping holds a file descriptor
    store = planted_store(tmp_path, rows=20, dim=6)
    for k in range(1, 5):
        planted_store(tmp_path, rows=20, dim=6, seed=k, file_name=f"{k:04d}.h5")
    matrix = open_matrix(store, "planted", "image")
    expected, _ = _stored(store, "image")
    rows = np.random.default_rng(1).permutation(matrix.rows)
    assert np.array_equal(matrix.gather(rows), expected[rows])
    assert len(matrix._maps) <= 2


def test_a_vanished_shard_rebuilds_the_layout(tmp_path: Path) -> None:
    store = planted_store(tmp_path, rows=40, dim=6)
    planted_store(tmp_path, rows=40, dim=6, seed=1, file_name="0001.h5")
    first = open_matrix(store, "planted", "image")
    gone = vectors.shards_of(store, "planted", "image")[0]
    with writing(store):
        writes.forget(store, [gone])
    gone.unlink()
    second = open_matrix(store, "planted", "image")
    assert second.generation != first.generation and second.rows == 200
    expected, _ = _stored(store, "image")
    assert np.array_equal(second.gather(np.arange(200)), expected)


def test_float32_cast_equals_numpy_for_every_half() -> None:
    from pipeline.features.vectors import TORCH_CAST_MIN, as_float32

    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16)  # every bit pattern, NaNs included
    assert halves.size >= TORCH_CAST_MIN  # the vectorised path
    got, want = as_float32(halves.reshape(-1, 256)), halves.astype(np.float32).reshape(-1, 256)
    finite = ~np.isnan(want)
    assert got.dtype == np.float32 and np.array_equal(got[finite].view(np.uint32), want[finite].view(np.uint32))
    assert np.isnan(got[~finite]).all()
    small = halves[:100]
    assert np.array_equal(as_float32(small).view(np.uint32), small.astype(np.float32).view(np.uint32))


class _Advice:
    """Stands in for a mapping's mmap: records what is asked for ahead."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def madvise(self, option: int, start: int, length: int) -> None:
        import mmap

        assert option == mmap.MADV_WILLNEED and start % mmap.PAGESIZE == 0 and length % mmap.PAGESIZE == 0
        self.calls.append((start, length))


def test_rows_close_together_are_asked_for_ahead_and_scattered_rows_are_not(tmp_path: Path) -> None:
    import mmap

    dim, header = 384, 1000  # 768-byte rows from byte 1000: rows straddle pages
    path = tmp_path / "v.bin"
    path.write_bytes(b"\0" * (header + 20000 * dim * 2))
    mapped = np.memmap(path, np.uint8, mode="r")
    advice = _Advice()
    mapped._mmap = advice  # type: ignore[attr-defined]
    array = np.ndarray((20000, dim), np.float16, buffer=mapped, offset=header)
    dense = np.arange(5000, 5600)
    vectors._prefetch(mapped, array, dense)
    assert len(advice.calls) == 1  # one run of pages
    start, length = advice.calls[0]
    assert start <= header + 5000 * dim * 2 and start + length >= header + 5600 * dim * 2
    advice.calls.clear()
    vectors._prefetch(mapped, array, np.sort(np.random.default_rng(0).choice(20000, 600, replace=False)))
    assert advice.calls == []  # scattered: left to the page faults
    advice.calls.clear()
    two = np.r_[np.arange(100, 400), np.arange(15000, 15300)]
    vectors._prefetch(mapped, array, two)
    covered = [(s, s + n) for s, n in advice.calls]
    assert len(covered) == 2 and all(any(s <= header + r * dim * 2 and header + (r + 1) * dim * 2 <= e
                                         for s, e in covered) for r in two)
    assert sum(n for _, n in advice.calls) <= (600 * dim * 2 // mmap.PAGESIZE + 4) * mmap.PAGESIZE


def test_laying_out_a_matrix_hands_pyarrows_pooled_memory_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pyarrow's pool keeps what the layout's reads freed (about 320 MB after 1M vectors), under the training
    view's DuckDB build that follows: a layout hands it back; a matrix found laid out has nothing to hand."""
    store = planted_store(tmp_path, rows=40, dim=8)
    released: list[str] = []
    pool = pa.default_memory_pool()

    class Pool:
        def release_unused(self) -> None:
            released.append("released")
            pool.release_unused()

        def __getattr__(self, name: str) -> object:
            return getattr(pool, name)

    monkeypatch.setattr(vectors.pa, "default_memory_pool", lambda: Pool())
    matrix = open_matrix(store, "planted", "image")
    assert matrix.rows == 200 and released == ["released"]
    assert open_matrix(store, "planted", "image").rows == 200 and released == ["released"]  # found: nothing laid out
