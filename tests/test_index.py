"""FAISS indexes, neighbours and split leaks on synthetic stores with planted duplicates."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.features.ann import build as ann_build
from pipeline.features.ann.build import PLATEAU, IndexConfig, open_index
from pipeline.features.ann.coarse import Coarse, train_coarse
from pipeline.features.ann.plan import LISTS_PER_ROOT, parse_memory, plan_index
from pipeline.features.ann.search import FAST_SCAN_FROM
from pipeline.features.leaks import leaking_ids
from pipeline.features.vectors import normalise, open_matrix
from pipeline.runs.config import TrainConfig
from pipeline.sources.ledger import assign_split
from pipeline.stages.encode import run as encode
from pipeline.stages.index import run as build_index
from pipeline.stages.ingest import IngestConfig
from pipeline.stages.ingest import run as ingest
from pipeline.stages.leaks import LeakConfig
from pipeline.stages.leaks import run as find_leaks
from pipeline.stages.neighbors import NeighborQuery
from pipeline.stages.neighbors import run as neighbors
from pipeline.store import catalog
from pipeline.store.layout import Store
from tests.conftest import encode_config, jpeg, planted_store
from tests.conftest import train_run as train

DIM = 32


def leaky_store(root: Path, rows: int = 300, leaks: int = 3, seed: int = 0,
                file_name: str = "0000.h5") -> tuple[Store, list[tuple[int, int]]]:
    """Reference-layout features whose test rows j copy (plus tiny noise) the real image of train rows i."""
    import h5py

    from pipeline.stages.import_features import ImportConfig
    from pipeline.stages.import_features import run as import_features

    rng = np.random.default_rng(seed)
    stem = Path(file_name).stem
    split = [assign_split(f"h5:{stem}:{i}", (0.8, 0.1, 0.1), "0") for i in range(rows)]
    train_rows = [i for i, s in enumerate(split) if s == "train"]
    test_rows = [i for i, s in enumerate(split) if s == "test"]
    pairs = list(zip(train_rows[:leaks], test_rows[:leaks], strict=True))
    real = rng.normal(size=(rows, DIM))
    for i, j in pairs:
        real[j] = real[i] + rng.normal(0, 1e-3, DIM)
    src = root / "h5"
    src.mkdir(parents=True, exist_ok=True)
    with h5py.File(src / file_name, "w") as f:
        f["real"] = real.astype(np.float32)
        for k in range(4):
            f[f"image_gen{k}"] = (rng.normal(size=(rows, DIM)) + 0.8).astype(np.float32)
        f["original_prompt"] = rng.normal(size=(rows, DIM)).astype(np.float32)
        f["positive_prompt"] = rng.normal(size=(rows, DIM)).astype(np.float32)
    store = Store(root / "store")
    import_features(ImportConfig(src / file_name, "h5", store, "leaky"))
    return store, pairs


def _real_id(store: Store, row: int) -> str:
    return catalog.query(store, "SELECT sample_id FROM samples WHERE label = 0 AND group_key = ?",
                         [f"h5:0000:{row}"]).column(0)[0].as_py()


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_recall_against_exact_search(tmp_path: Path, kind: str) -> None:
    store = planted_store(tmp_path, rows=800, dim=DIM)
    info = build_index(IndexConfig(store, kind=kind, target_recall=0.95, recall_queries=400))
    assert info.kind == kind and info.vectors == 4000
    assert info.recall_at_10 is not None and info.recall_at_10 >= 0.95
    # measure it independently, as it is used (neighbours of stored samples, themselves excluded):
    # approximate top-10 against numpy's exact top-10 for other sampled vectors
    index = open_index(store, None, kind=kind)
    matrix = normalise(open_matrix(store, info.model_key, "image").gather(np.arange(info.vectors)))
    own = np.random.default_rng(5).choice(len(matrix), 300, replace=False)
    exact = np.argsort(-(matrix[own] @ matrix.T), axis=1)[:, 1:11]
    found = index.search(matrix[own], 11)[1]  # index row r is matrix row r
    recall = np.mean([len(set(b) & (set(a) - {me})) / 10 for a, b, me in zip(found, exact, own, strict=True)])
    assert recall >= 0.9


def test_the_plan_fits_the_memory_budget() -> None:
    gib = 2**30
    n = 11_500_000
    d3 = plan_index(n, 768, "auto", 4 * gib)  # D3: 35 GB as flat float32 vectors, 8.9 GB as SQ8 codes
    assert d3.kind == "ivf-pq" and d3.build_bytes <= 0.85 * 4 * gib  # the rest: the interpreter and libraries
    m = int(re.search(r"PQ(\d+)x4$", d3.factory).group(1))  # type: ignore[union-attr]  # 4 bits, mappable
    assert 768 % m == 0 and m >= 192  # at least 48 bytes a vector: 4-bit codes of at most 4 values each
    assert d3.bytes >= n * (m // 2 + 8) and 1.15 * d3.bytes <= 0.7 * 4 * gib  # codes, ids; lists grow in steps
    assert d3.build_bytes >= 2 * d3.train_rows * 768 * 4 + 3 * d3.chunk_rows * 768 * 4
    # 4√n lists at most (found by a scan of the centroids), fewer where a sample of ≥ 32 rows a list must fit
    # beside its residuals
    assert d3.nlist is not None and d3.factory.startswith(f"IVF{d3.nlist},") and d3.nlist <= LISTS_PER_ROOT * n ** 0.5
    assert "_HNSW32" in plan_index(20_000_000, 768, "auto", 8 * gib).factory  # past HNSW_QUANTISER_FROM lists
    assert d3.train_rows >= 32 * d3.nlist and 2 * d3.train_rows * 768 * 4 <= 0.5 * 4 * gib
    assert plan_index(n, 768, "auto", 16 * gib).kind == "ivf-sq8"
    assert plan_index(1_000_000, 768, "auto", 8 * gib).kind == "ivf"
    assert plan_index(50_000, 768, "auto", 4 * gib).kind == "flat"
    with pytest.raises(PipelineError, match="--max-memory"):
        plan_index(n, 768, "flat", 4 * gib)
    assert parse_memory("4GB") == 4 * gib and parse_memory("512mb") == 512 * 2**20 and parse_memory("100") == 100
    with pytest.raises(PipelineError, match="--max-memory"):
        parse_memory("lots")


def test_lists_grow_like_the_root_of_the_rows_until_the_training_sample_caps_them() -> None:
    gib = 2**30
    lists = {rows: plan_index(rows, 768, "auto", 4 * gib).nlist for rows in (100_000, 400_000, 1_000_000, 5_000_000)}
    assert all(lists[rows] == round(LISTS_PER_ROOT * rows ** 0.5) for rows in lists), lists  # 1265 … 8944
    assert lists[400_000] == 2 * lists[100_000] and lists[1_000_000] == 4000  # four times the rows: twice the lists
    small = plan_index(11_500_000, 768, "auto", 2 * gib)  # half the sample: fewer, longer lists
    assert small.nlist is not None and small.train_rows >= 32 * small.nlist
    assert small.nlist < 0.5 * LISTS_PER_ROOT * 11_500_000 ** 0.5
    assert small.build_bytes <= 0.85 * 2 * gib
    assert plan_index(100_000, 768, "ivf", 4 * gib, nlist=300).nlist == 300  # asked for: kept


def test_two_level_k_means_places_centroids_about_as_well_as_one_level(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    centres = normalise(rng.normal(size=(400, DIM)))
    x = normalise(centres[rng.integers(0, 400, 20_000)] + rng.normal(0, 0.05, (20_000, DIM)))
    two = train_coarse(x, 400).centroids  # above TWO_LEVEL_FROM: two levels
    assert two.shape == (400, DIM) and np.allclose(np.linalg.norm(two, axis=1), 1, atol=1e-4)
    monkeypatch.setattr("pipeline.features.ann.coarse.TWO_LEVEL_FROM", 10_000)
    one = train_coarse(x, 400).centroids
    closest = {name: float(np.mean(np.max(x @ c.T, axis=1))) for name, c in (("two", two), ("one", one))}
    assert closest["two"] > 0.88 and closest["two"] >= closest["one"] - 0.03, closest  # truth: 0.96


def test_two_level_assignment_finds_nearly_every_vectors_nearest_lists() -> None:
    import faiss

    rng = np.random.default_rng(1)
    centres = normalise(rng.normal(size=(300, DIM)))
    x = normalise(centres[rng.integers(0, 300, 30_000)] + rng.normal(0, 0.1, (30_000, DIM)))
    coarse = train_coarse(x[:20_000], 1024)  # 32 groups of lists
    assert len(coarse.tops) == 32 and coarse.starts[-1] == 1024 and sum(coarse.sizes) == 1024
    exact_sims, exact = faiss.knn(x, coarse.centroids, 4, faiss.METRIC_INNER_PRODUCT)
    sims, lists = coarse.nearest(x, 4)
    assert (lists[:, 0] == exact[:, 0]).mean() > 0.97  # the lists of 3 groups of 32 hold nearly every nearest one
    assert (np.diff(sims, axis=1) <= 0).all()  # best first
    assert np.allclose(sims, np.einsum("nd,nkd->nk", x, coarse.centroids[lists]), atol=1e-5)  # true products
    # where a vector's nearest list lies outside its nearest groups, it mostly gets one nearly as near
    # (measured: mean shortfall 0.0014, 99% of vectors within 0.02)
    shortfall = exact_sims[:, 0] - sims[:, 0]
    assert shortfall.mean() < 0.005 and np.percentile(shortfall, 99) < 0.05
    one_group = Coarse.of(coarse.centroids)  # one group: a scan of every centroid, exact
    assert np.array_equal(one_group.nearest(x[:2000], 4)[1], exact[:2000])


def test_a_small_budget_builds_a_quantised_index_that_still_finds_neighbours(tmp_path: Path) -> None:
    store = planted_store(tmp_path, rows=800, dim=DIM)
    budget = 4000 * (DIM // 2 + 8) * 2  # too small for full vectors (4000 × 32 × 4 bytes), enough for codes
    info = build_index(IndexConfig(store, kind="auto", max_memory=max(budget, 2**24), nlist=16,
                                   recall_queries=300))
    assert info.kind == "flat"  # 4000 vectors: exact search fits 16MB
    quantised = build_index(IndexConfig(store, kind="ivf-pq", nlist=16, recall_queries=300, max_memory=2**24))
    assert quantised.kind == "ivf-pq" and quantised.params["factory"].endswith(f"PQ{DIM // 2}x4")
    # 4-bit codes, re-ranked exactly: recall@10 is that of the lists searched
    assert quantised.params["rerank"] > 10 and quantised.recall_at_10 is not None and quantised.recall_at_10 > 0.9
    index = open_index(store, None, kind="ivf-pq")  # the one just built over these vectors
    matrix = normalise(open_matrix(store, info.model_key, "image").gather(np.arange(20)))
    assert (index.search(matrix, 1)[1][:, 0] == np.arange(20)).mean() >= 0.9  # each vector finds itself


def test_re_ranking_orders_the_candidates_by_exact_similarity(tmp_path: Path) -> None:
    store = planted_store(tmp_path, rows=800, dim=DIM)
    info = build_index(IndexConfig(store, kind="ivf-pq", nlist=16, recall_queries=300))
    index = open_index(store, None, kind="ivf-pq")
    matrix = normalise(open_matrix(store, info.model_key, "image").gather(np.arange(info.vectors)))
    queries = matrix[::80]
    sims, rows = index.search(queries, 10)
    assert np.allclose(sims, np.einsum("qd,qkd->qk", queries, matrix[rows]), atol=1e-5)  # exact scores
    assert (np.diff(sims, axis=1) <= 1e-6).all()
    # the exact top 10 of the index's own top `rerank` candidates
    candidates = index.index.search(queries, info.params["rerank"])[1]
    for q, found, cand in zip(queries, rows, candidates, strict=True):
        assert set(found) == set(cand[np.argsort(-(matrix[cand] @ q), kind="stable")[:10]])
    coded_sims, coded_rows = index.search(queries, 10, rerank=False)  # the 4-bit codes' own scores
    assert not np.allclose(coded_sims, sims, atol=1e-3)
    # an index built before re-ranking (no "rerank" in its params) is searched as it was
    index.info.params.pop("rerank")
    assert np.array_equal(index.search(queries, 10)[1], coded_rows)


def noisy_clusters(n: int, dim: int, per_cluster: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around a few centres with isotropic noise: a vector's neighbours are barely closer
    than the rest of its cluster, so 4-bit codes rank them poorly (bench_scale's D3 store, scaled down)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(1, n // per_cluster), dim)).astype(np.float32) * 2
    x = centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, dim), np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def tuned(x: np.ndarray, nlist: int, target: float) -> dict[str, object]:
    plan = plan_index(len(x), x.shape[1], "ivf-pq", 2**28, nlist=nlist)

    def sample(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        rows = np.sort(rng.choice(len(x), min(count, len(x)), replace=False))
        return rows, x[rows]

    config = IndexConfig(Store(Path(".")), recall_queries=300, target_recall=target)
    return ann_build.build_in_memory(plan, x.shape[1], lambda: (x[i:i + 4096] for i in range(0, len(x), 4096)), sample,
                              len(x), config, exact=lambda rows: x[rows])[1]


def test_where_the_codes_limit_recall_the_tuning_re_ranks_deeper(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ann_build, "RERANKS", (10, 20, 40, 80, 160, 320))  # D3's depths, for 24k vectors
    params = tuned(noisy_clusters(24_000, 64, 3000), nlist=24, target=0.95)
    by_depth = {int(k): v for k, v in params["recall_by_rerank"].items()}  # type: ignore[attr-defined]
    assert by_depth[10] < 0.6  # the codes' own top 10 (measured 0.30): the shallowest re-rank misses most
    assert params["recall_at_10"] >= 0.95 and params["rerank"] > 80  # measured: 320 needed
    assert by_depth[params["rerank"]] == params["recall_at_10"]  # type: ignore[index]
    assert all(by_depth[d] < 0.95 for d in by_depth if d < params["rerank"])  # type: ignore[operator]


def test_where_no_breadth_reaches_the_target_the_tuning_stops_at_the_plateau(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ann_build, "RERANKS", (10, 20, 40, 80, 160, 320))
    params = tuned(noisy_clusters(24_000, 64, 3000), nlist=48, target=0.999)
    by_breadth: dict[int, float] = params["recall_by_breadth"]  # type: ignore[assignment]
    widest = max(ann_build._breadths("ivf-pq", {"nlist": 48}))
    assert max(by_breadth) < widest  # two doublings without gain: no wider breadth tried
    chosen = params["nprobe"]
    assert all(by_breadth[b] < by_breadth[chosen] + PLATEAU for b in by_breadth if b > chosen)  # type: ignore[index]
    assert all(by_breadth[b] < by_breadth[chosen] for b in by_breadth if b < chosen)  # type: ignore[index]
    assert params["recall_at_10"] < 0.999 and params["recall_at_10"] >= by_breadth[chosen] - PLATEAU  # type: ignore[index,operator]


def test_a_bulk_search_scans_a_fast_scan_copy_of_the_mapped_codes(tmp_path: Path) -> None:
    store = planted_store(tmp_path, rows=800, dim=DIM)
    info = build_index(IndexConfig(store, kind="ivf-pq", nlist=16, recall_queries=300))
    index = open_index(store, None, kind="ivf-pq")
    queries = normalise(open_matrix(store, info.model_key, "image").gather(np.arange(0, 4000, 25)))
    one_by_one = np.concatenate([index.search(q[None], 10)[1] for q in queries])
    assert index.fast is None  # a few queries scan the mapped codes
    bulk = index.search(queries, 10)[1]
    assert len(queries) >= FAST_SCAN_FROM and index.fast is not None
    assert index.fast.nprobe == info.params["nprobe"]
    same = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(one_by_one, bulk, strict=True)])
    assert same >= 0.95  # the same codes; fast-scan rounds the distances of the candidates to 8 bits
    index.set_breadth(1)
    import faiss

    assert index.fast.nprobe == 1 and faiss.extract_index_ivf(index.index).nprobe == 1


def test_flat_index_is_exact_and_rebuilt_only_when_embeddings_change(tmp_path: Path) -> None:
    store = planted_store(tmp_path, rows=100, dim=DIM)
    first = build_index(IndexConfig(store))
    assert first.kind == "flat" and first.recall_at_10 == 1.0 and first.built
    assert not build_index(IndexConfig(store)).built  # same embeddings: reused
    planted_store(tmp_path, rows=50, dim=DIM, seed=3, file_name="0001.h5")  # more vectors, same store
    second = build_index(IndexConfig(store))
    assert second.built and second.vectors == 750 and second.index_id != first.index_id
    assert not first.directory.exists()
    rows = catalog.query(store, "SELECT index_id, vectors, kind FROM indexes").to_pylist()
    assert rows == [{"index_id": second.index_id, "vectors": 750, "kind": "flat"}]


def test_neighbours_of_a_sample_put_its_planted_duplicate_first(tmp_path: Path) -> None:
    store, pairs = leaky_store(tmp_path)
    i, j = pairs[0]
    result = neighbors(NeighborQuery(store, sample_id=_real_id(store, j)[:12], k=5))
    top = result.rows.to_pylist()[0]
    assert top["sample_id"] == _real_id(store, i)
    assert top["split"] == "train" and top["similarity"] > 0.99
    assert result.rows.num_rows == 5 and _real_id(store, j) not in result.rows.column("sample_id").to_pylist()
    run = train(store, TrainConfig.from_dict({"epochs": 1, "batch_size": 256}))
    scored = neighbors(NeighborQuery(store, sample_id=_real_id(store, j), k=5, run_id=run.run_id)).rows
    assert scored.column("sample_id").to_pylist() == result.rows.column("sample_id").to_pylist()
    rows = catalog.query(store, "SELECT sample_id, score FROM scores WHERE run_id = ?", [run.run_id]).to_pylist()
    expected = {r["sample_id"]: r["score"] for r in rows}
    assert scored.column("score").to_pylist() == [expected[s] for s in scored.column("sample_id").to_pylist()]
    with pytest.raises(PipelineError, match="imported"):
        neighbors(NeighborQuery(store, image=tmp_path / "x.jpg"))
    with pytest.raises(PipelineError, match="exactly one"):
        neighbors(NeighborQuery(store))


def _indexed_store(tmp_path: Path, rows: int = 600) -> tuple[Store, list[tuple[int, int]]]:
    """A leaky store with an IVF-PQ index (re-ranked) and its lookup, as a large store would have."""
    store, pairs = leaky_store(tmp_path, rows=rows)
    info = build_index(IndexConfig(store, kind="ivf-pq", nlist=16, recall_queries=200))
    assert info.kind == "ivf-pq" and (info.directory / "lookup.json").exists()
    return store, pairs


def test_neighbours_through_the_index_lookup_read_no_table_of_the_store(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    store, pairs = _indexed_store(tmp_path)
    run = train(store, TrainConfig.from_dict({"epochs": 1, "batch_size": 256}))
    i, j = pairs[0]
    query, duplicate = _real_id(store, j), _real_id(store, i)
    by_sql = {}
    for run_id in (None, run.run_id):
        by_sql[run_id] = neighbors(NeighborQuery(store, sample_id=query[:10], k=5, run_id=run_id))
    # the same searches through the lookup, with every SQL query over samples or embeddings refused
    # (what a scan would need); only the run's own scores may still be read in SQL
    real_query = catalog.query

    def no_scans(store_: Store, sql: str, params: list[object] | None = None) -> object:
        assert "samples" not in sql and "embeddings" not in sql, sql
        return real_query(store_, sql, params)

    monkeypatch.setattr(catalog, "query", no_scans)
    monkeypatch.setattr(catalog, "query_with", lambda *a, **k: pytest.fail("query_with scans the samples"))
    for run_id in (None, run.run_id):
        result = neighbors(NeighborQuery(store, sample_id=query[:10], k=5, run_id=run_id))
        assert result.index_kind == "ivf-pq" and result.note is None
        assert result.rows.to_pylist()[0]["sample_id"] == duplicate  # the planted duplicate first
        assert result.rows.schema == by_sql[run_id].rows.schema
        assert result.rows.to_pylist() == by_sql[run_id].rows.to_pylist()
    monkeypatch.setattr(catalog, "query", real_query)  # a miss in the lookup asks SQL, to tell why
    with pytest.raises(PipelineError, match="No sample whose id starts with"):
        neighbors(NeighborQuery(store, sample_id="ffffffffffff0000"))


def test_the_sql_path_is_what_an_index_without_a_lookup_gets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, pairs = _indexed_store(tmp_path)
    query = _real_id(store, pairs[0][1])
    through_lookup = neighbors(NeighborQuery(store, sample_id=query, k=5)).rows
    (next((store.dataset_dir("indexes")).rglob("lookup.json"))).unlink()  # as an index of an older release
    assert neighbors(NeighborQuery(store, sample_id=query, k=5)).rows.to_pylist() == through_lookup.to_pylist()


def test_neighbours_search_an_index_older_than_the_vectors_and_say_what_it_misses(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, pairs = _indexed_store(tmp_path)
    leaky_store(tmp_path, rows=20, leaks=0, seed=4, file_name="0001.h5")  # 100 more images, not indexed
    monkeypatch.setattr("pipeline.stages.neighbors.EXACT_BELOW", 10)  # as if the store were large
    result = neighbors(NeighborQuery(store, sample_id=_real_id(store, pairs[0][1]), k=5))
    assert result.index_kind == "ivf-pq" and result.rows.to_pylist()[0]["sample_id"] == _real_id(store, pairs[0][0])
    assert result.note is not None and "3,000 of the 3,100 image vectors" in result.note
    bare, bare_pairs = leaky_store(tmp_path / "bare", rows=100)  # no index at all, and "large": a sentence
    with pytest.raises(PipelineError, match="No index over the image vectors .*`pipeline index build"):
        neighbors(NeighborQuery(bare, sample_id=_real_id(bare, bare_pairs[0][1]), k=5))


def test_neighbors_command_answers_while_another_process_holds_the_writer_lock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from typer.testing import CliRunner

    from pipeline.cli import app
    from tests.test_lock import _hold

    store, pairs = _indexed_store(tmp_path)
    holder = _hold(store, 600)  # an encode, say, that runs for minutes
    try:
        answered = threading.Event()
        out: dict[str, object] = {}

        def ask() -> None:
            out["result"] = CliRunner().invoke(app, ["neighbors", "--sample-id", _real_id(store, pairs[0][1])[:12],
                                                     "-k", "3", "--store", str(store.root)])
            answered.set()

        threading.Thread(target=ask, daemon=True).start()
        assert answered.wait(120), "pipeline neighbors waited for the writer"  # a guard against a hang, no timing
        result = out["result"]
        assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
        assert _real_id(store, pairs[0][0])[:16] in result.output  # type: ignore[attr-defined]
    finally:
        holder.kill()
        holder.communicate()


def test_neighbours_of_an_image_file_encode_it_with_the_store_model(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40), (20, 20, 20), (240, 240, 240)]
    for n, c in enumerate(colours):
        (root / "real").mkdir(parents=True, exist_ok=True)
        (root / "real" / f"{n}.png").write_bytes(jpeg(c, size=64, fmt="PNG"))
    store = Store(tmp_path / "store")
    ingest(IngestConfig(root, "folder", store))
    encode(encode_config(store, dtype="float32"))
    query = root / "real" / "3.png"
    result = neighbors(NeighborQuery(store, image=query, k=3))
    top = result.rows.to_pylist()[0]
    assert result.random_weights is True
    assert top["sample_id"] == __import__("hashlib").sha256(query.read_bytes()).hexdigest()
    assert top["similarity"] > 0.999


def test_leaks_finds_planted_cross_split_duplicates_and_none_in_a_clean_store(tmp_path: Path) -> None:
    store, pairs = leaky_store(tmp_path / "leaky")
    result = find_leaks(LeakConfig(store, threshold=0.95))
    found = {(r["sample_a"], r["sample_b"]) for r in result.pairs.to_pylist()}
    assert found == {(_real_id(store, i), _real_id(store, j)) for i, j in pairs}
    assert result.by_split_pair.to_pylist() == [
        {"split_a": "train", "split_b": "test", "kind": "near", "pairs": 3, "samples_b": 3}]
    assert catalog.query(store, "SELECT count(*) FROM leaks").column(0)[0].as_py() == 3
    find_leaks(LeakConfig(store, threshold=0.95))  # a re-scan replaces the previous one
    assert catalog.query(store, "SELECT count(*) FROM leaks").column(0)[0].as_py() == 3

    clean = planted_store(tmp_path / "clean", rows=300, dim=DIM)
    assert find_leaks(LeakConfig(clean, threshold=0.95)).pairs.num_rows == 0


def test_leaks_through_an_ivf_index_find_the_pairs_exact_search_finds(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    store, planted = leaky_store(tmp_path, rows=2000, leaks=20)
    monkeypatch.setattr("pipeline.features.ann.plan.EXACT_BELOW", 0)
    monkeypatch.setattr("pipeline.features.ann.plan.LISTS_PER_ROOT", 0.78)  # 78 lists over 10,000 images
    approx = find_leaks(LeakConfig(store, threshold=0.95))
    exact = find_leaks(LeakConfig(store, threshold=0.95, exact_search=True))
    assert (approx.index_kind, exact.index_kind) == ("ivf", "flat")

    def pairs(result: object) -> set[tuple[str, str]]:
        return {(r["sample_a"], r["sample_b"]) for r in result.pairs.to_pylist()}  # type: ignore[attr-defined]

    assert pairs(approx) == pairs(exact) == {(_real_id(store, i), _real_id(store, j)) for i, j in planted}
    assert approx.pair_count == 20  # each pair once, found from its test member


def test_leaks_through_a_pq_index_find_the_pairs_exact_search_finds_with_exact_similarities(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, planted = leaky_store(tmp_path, rows=2000, leaks=20)
    assert build_index(IndexConfig(store, kind="ivf-pq", nlist=16, recall_queries=200)).kind == "ivf-pq"
    approx = find_leaks(LeakConfig(store, threshold=0.95))  # through the PQ index, the one in the store
    exact = find_leaks(LeakConfig(store, threshold=0.95, exact_search=True))
    assert (approx.index_kind, exact.index_kind) == ("ivf-pq", "flat")

    def pairs(result: object) -> dict[tuple[str, str], float]:
        return {(r["sample_a"], r["sample_b"]): r["similarity"]
                for r in result.pairs.to_pylist()}  # type: ignore[attr-defined]

    assert pairs(approx).keys() == pairs(exact).keys() == {(_real_id(store, i), _real_id(store, j))
                                                           for i, j in planted}
    assert all(abs(pairs(approx)[p] - pairs(exact)[p]) < 1e-5 for p in pairs(exact))  # scored exactly


def test_exact_duplicates_pair_the_earliest_split_with_each_later_one(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from contextlib import contextmanager

    import duckdb

    from pipeline.stages import leaks

    con = duckdb.connect()  # a store written before ingest de-duplicated by image hash
    con.execute("CREATE TABLE samples AS SELECT * FROM (VALUES ('a', 'test'), ('a', 'train'), ('a', 'val'), "
                "('a', 'test'), ('b', 'val'), ('b', 'val'), ('c', 'train'), ('d', 'test'), ('d', 'val')) "
                "t(sample_id, split)")
    monkeypatch.setattr(catalog, "connect", contextmanager(lambda store: iter([con])))
    pairs = [r for t in leaks._exact_pairs(Store(tmp_path), "m", 0.9) for r in t.to_pylist()]
    assert sorted((r["sample_a"], r["split_a"], r["split_b"]) for r in pairs) == [
        ("a", "train", "test"), ("a", "train", "val"), ("d", "val", "test")]
    assert {(r["kind"], r["similarity"], r["model_key"]) for r in pairs} == {("exact", 1.0, "m")}


def test_training_can_exclude_leaking_test_samples(tmp_path: Path) -> None:
    store, pairs = leaky_store(tmp_path)
    config = {"epochs": 1, "batch_size": 256, "exclude_leaks": True}
    with pytest.raises(PipelineError, match="pipeline leaks"):
        train(store, TrainConfig.from_dict(config))
    find_leaks(LeakConfig(store, threshold=0.95))
    ids, _ = leaking_ids(store, "leaky", 0.95)
    assert ids == {_real_id(store, j) for _, j in pairs}
    kept = train(store, TrainConfig.from_dict({**config, "exclude_leaks": False}))
    dropped = train(store, TrainConfig.from_dict(config))
    assert dropped.metrics.excluded_leaks == {"val": 0, "test": 3}
    assert dropped.metrics.test.n == kept.metrics.test.n - 3
    assert dropped.config_hash != kept.config_hash
    # new embeddings make the scan stale: refuse rather than exclude the wrong samples
    leaky_store(tmp_path, rows=20, leaks=0, seed=4, file_name="0001.h5")
    with pytest.raises(PipelineError, match="changed since"):
        leaking_ids(store, "leaky", 0.95)


def test_text_index_finds_samples_sharing_a_prompt(tmp_path: Path) -> None:
    store = planted_store(tmp_path, rows=60, dim=DIM)
    info = build_index(IndexConfig(store, modality="text"))
    assert info.modality == "text" and info.vectors == 120  # 60 captions + 60 prompts
    generated = catalog.query(store, "SELECT sample_id, text_hash FROM samples WHERE label = 1 LIMIT 1").to_pylist()[0]
    result = neighbors(NeighborQuery(store, sample_id=generated["sample_id"], k=3, modality="text"))
    assert result.rows.num_rows == 3  # the query's own text is excluded, so its siblings' prompt is not listed
    hashes = catalog.query(store, "SELECT DISTINCT text_hash FROM samples WHERE sample_id IN (SELECT unnest(?))",
                           [result.rows.column("sample_id").to_pylist()]).column(0).to_pylist()
    assert generated["text_hash"] not in hashes
