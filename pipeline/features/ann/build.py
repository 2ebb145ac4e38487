"""`pipeline index build`: a FAISS index over one model's cached vectors, trained, filled, tuned and
written within the memory budget its plan (`ann.plan`) fits.

The centroids come from spherical k-means in two levels (√nlist clusters, then each split up),
which costs rows × 2√nlist × dim instead of rows × nlist × dim, on a random sample of at most half
the budget.

Memory bounded by the budget: vectors are streamed from the memory-mapped matrix
(`features.vectors`) in chunks, twice. The first pass finds each vector's list (4 bytes a vector)
and the exact neighbours of the recall queries; the lists are then sized exactly once, so the
second pass adds every vector without the doubling growth of a vector that is appended to (a third
more memory, measured).

Approximate indexes tune their search breadth (IVF `nprobe`, HNSW `efSearch`) up to
`target_recall` and report the recall@10 they reach against exact search on sampled queries,
excluding each query's own vector. What 4-bit codes lose in ranking, re-ranking gives back: how
many candidates a search re-scores exactly is tuned with the breadth: where the codes are what
limits recall@10, deeper (`RERANKS`). Where no breadth reaches the target, the tuning stops where a
wider search stops adding recall, and the index is built all the same: its recall is reported
(and shown by `pipeline status`), for the user to judge.

On disk: `indexes/<model_key>/<index_id>/` holds `index.faiss`, `ids.arrow` (content hash of each
row, uncompressed Arrow so readers map it instead of loading it) and `index.parquet` (its row in
the `indexes` view), written in that order, each atomically. The index id carries a fingerprint of
the embedding shards, so an index is rebuilt exactly when the embeddings change.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.choices import IndexKind, Modality
from pipeline.config import Validated, at_least, within
from pipeline.errors import PipelineError
from pipeline.features.ann.plan import DEFAULT_MAX_MEMORY, Plan, plan_index
from pipeline.features.ann.search import (
    RECALL_K,
    Gather,
    IndexInfo,
    OpenIndex,
    TopK,
    apply_breadth,
    current,
    open_built,
    read_info,
    recall_at,
    reranked_search,
    unit_rows,
)
from pipeline.features.vectors import VectorMatrix, fingerprint, open_matrix, shards_of
from pipeline.features.view import resolve_model_key
from pipeline.reporting import Reporter, Silent
from pipeline.store import writes
from pipeline.store.atomic import atomic_write, write_parquet
from pipeline.store.layout import Store
from schemas import INDEX_IDS, INDEXES, from_rows

TWO_LEVEL_FROM = 256  # lists: above this many, k-means in two levels
KMEANS_ITERATIONS = 20
# candidates a store's PQ index may re-score exactly (from the memory-mapped vectors) for each query; the
# tuning keeps the fewest that reach the recall of the deepest. On clustered vectors (bench/index_d3.py)
# 100 reach the recall of exact scores over the same lists. On clusters of 5,750 vectors around a centre
# with isotropic noise (bench_scale's D3 store: neighbours barely closer than the rest of their cluster;
# bench/index_rerank.py, 300k vectors, 16 of 292 lists, which held every neighbour) 4-bit codes need
# more: recall@10 0.78 / 0.97 / 1.0 re-ranking 100 / 400 / 1,600 (8-bit codes of the same bytes, 33×
# longer to build: 0.83 / 0.98 / 1.0). The tuning chose nprobe 8, 400 candidates: 0.958. The same codes
# packed for fast-scan, whose distances are rounded to 8 bits, rank worse: 0.38 / 0.70 / 0.95.
RERANKS = (100, 200, 400, 800, 1600, 3200)
PLATEAU = 0.002  # recall@10 gained by doubling the breadth below which a wider search is not tried


@dataclass(frozen=True)
class IndexConfig(Validated):
    store: Store
    model_key: str | None = None
    kind: IndexKind = "auto"
    modality: Modality = "image"
    nlist: int | None = None  # IVF lists; default n / LIST_ROWS, fewer if the training sample must be smaller
    hnsw_m: int = 32
    target_recall: float = 0.95
    recall_queries: int = 1000
    force: bool = False  # rebuild even if an index of these embeddings exists
    seed: int = 0
    max_memory: int = DEFAULT_MAX_MEMORY  # bytes the build and the search may hold
    wait: bool = True  # wait for another writer of the store instead of stopping

    def check(self) -> None:
        within(self, "target_recall", 0, 1, low_open=True)
        at_least(self, "nlist", 1)
        at_least(self, "recall_queries", 1)
        if self.max_memory < 2**24:
            raise PipelineError("--max-memory must be at least 16MB.")


def build_index(config: IndexConfig, reporter: Reporter | None = None) -> IndexInfo:
    """Build (or find up to date) the index of this model's vectors of one modality.

    The caller holds the store's writer lock (`pipeline.store.lock.writing`)."""
    import faiss

    reporter = reporter or Silent()
    store = config.store
    model_key = resolve_model_key(store, config.model_key)
    shards = shards_of(store, model_key, config.modality)
    matrix = open_matrix(store, model_key, config.modality, reporter)
    plan = plan_index(matrix.rows, matrix.dim, config.kind, config.max_memory, config.nlist, config.hnsw_m)
    fp = fingerprint(store, shards, config.modality)  # of the data: shared by every kind of index over it
    index_id = f"{config.modality}-{plan.kind}-{fingerprint(store, shards, config.modality, plan.factory)}"
    directory = store.dataset_dir("indexes") / model_key / index_id
    if (directory / "index.parquet").exists() and not config.force:
        info = read_info(directory / "index.parquet")
        info.built = False
        return info

    started = time.perf_counter()
    def sample(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        rows = np.sort(rng.choice(matrix.rows, min(count, matrix.rows), replace=False))
        return rows, matrix.gather(rows)

    index, params = build_in_memory(plan, matrix.dim, lambda: (c for _, c in matrix.chunks(plan.chunk_rows)),
                                    sample, matrix.rows, config, reporter, faiss, exact=matrix.gather)
    seconds = time.perf_counter() - started
    if directory.exists():  # (--force): its record leaves the catalog first, so no reader meets a missing shard
        writes.forget(store, [directory / "index.parquet"])
        shutil.rmtree(directory)
    atomic_write(directory / "index.faiss", lambda tmp: faiss.write_index(index, str(tmp)))
    atomic_write(directory / "ids.arrow", lambda tmp: _write_ids(matrix, store, tmp))
    params["matrix"] = matrix.generation  # row r of the index is row r of this layout of the vectors
    recall = params.pop("recall_at_10")
    by_breadth = params.pop("recall_by_breadth")
    info = IndexInfo(index_id, model_key, config.modality, plan.kind, params, matrix.rows, matrix.dim, fp, recall,
                     seconds, directory, True, by_breadth)
    record = from_rows(INDEXES, [{
        "index_id": index_id, "model_key": model_key, "modality": config.modality, "kind": plan.kind,
        "params_json": json.dumps(params), "vectors": matrix.rows, "dim": matrix.dim, "fingerprint": fp,
        "recall_at_10": recall, "build_seconds": seconds, "path": store.relative(directory / "index.faiss"),
        "created_at": datetime.now(UTC),
    }])
    writes.commit(store, [write_parquet(record, directory / "index.parquet")])
    _drop_superseded(store, directory, config.modality, plan.kind, fp)
    return info


Sampler = Callable[[int, np.random.Generator], tuple[np.ndarray, np.ndarray]]


def open_index(store: Store, model_key: str | None, modality: Modality = "image", kind: IndexKind = "auto",
               reporter: Reporter | None = None, max_memory: int = DEFAULT_MAX_MEMORY,
               force: bool = False) -> OpenIndex:
    """The index of the current embeddings: one already built over them (of this kind; `auto`: of any
    kind), else one built now within `max_memory` (the caller holds the store's writer lock)."""
    found = None if force else current(store, model_key, modality, kind)
    info = found or build_index(IndexConfig(store, model_key, kind=kind, modality=modality,
                                            max_memory=max_memory, force=force), reporter)
    return open_built(store, info, modality)


def build_in_memory(plan: Plan, dim: int, chunks: Callable[[], Iterator[np.ndarray]], sample: Sampler, n: int,
                    config: IndexConfig, reporter: Reporter | None = None, faiss: Any = None,
                    max_breadth: int | None = None, exact: Gather | None = None) -> tuple[Any, dict[str, Any]]:
    """An index over n vectors given in row order as chunks (streamed twice at most; fast-scan: once).

    `sample(count, rng)` gives `count` random rows: their row numbers and vectors (to train on, and
    to query for the recall estimate). The search breadth is tuned up to `max_breadth` at most.
    Given `exact` (the vectors of any rows), a PQ index re-ranks its best `params["rerank"]` candidates
    by exact inner product, in tuning as in searches (`OpenIndex.search`); how many is tuned.

    Returns the index (search breadth tuned) and its params, with `recall_at_10` and
    `recall_by_breadth` added. Vectors are L2-normalised as they are added.
    """
    if faiss is None:
        import faiss
    reporter = reporter or Silent()
    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    params = plan.params()
    if plan.train_rows:
        training = unit_rows(sample(plan.train_rows, np.random.default_rng(config.seed))[1])
        _train(index, plan, training, config.seed, faiss)
    if plan.kind == "hnsw":
        index.hnsw.efConstruction = max(40, 2 * config.hnsw_m)
        params.update(M=config.hnsw_m, efConstruction=index.hnsw.efConstruction)
    truth = None
    if plan.kind != "flat":
        # exact search costs queries × n × dim: fewer queries on big stores keep it to a minute at D3 size
        count = min(n, config.recall_queries, max(200, int(2e11 / max(1, n * dim))))
        own, queries = sample(count, np.random.default_rng(config.seed + 1))
        truth = TopK(unit_rows(queries), RECALL_K + 1, faiss)
    if plan.kind == "ivf-pq" and exact is not None:
        params["rerank"] = RERANKS[-1]  # the tuning keeps the fewest that do as well
    if plan.kind.startswith("ivf") and not plan.factory.endswith("fs"):
        _add_in_two_passes(index, chunks, n, truth, reporter, faiss)
    else:  # flat, or fast-scan lists (which two passes would break)
        _add_appending(index, chunks, n, truth, reporter)
    if truth is None:
        params.update(recall_at_10=1.0, recall_by_breadth={})
        return index, params
    reporter.start("index: tune search breadth", None, "")
    recall, by_breadth = _tune(index, plan, queries, own, truth.rows, config, params, faiss, max_breadth, exact)
    params.update(recall_at_10=recall, recall_by_breadth=by_breadth)
    return index, params


def coarse_centroids(x: np.ndarray, nlist: int, seed: int = 0, faiss: Any = None) -> np.ndarray:
    """`nlist` unit centroids of the unit rows of x by spherical k-means (float32 [nlist, dim]).

    Above TWO_LEVEL_FROM lists, in two levels (as FAISS' `two_level_clustering`): √nlist centroids,
    then the rows of each split among that many centroids as it has rows. An iteration then costs
    rows × 2√nlist × dim instead of rows × nlist × dim: ten thousand lists train in seconds, not hours."""
    if faiss is None:
        import faiss
    dim = x.shape[1]

    def kmeans(rows: np.ndarray, k: int, s: int) -> np.ndarray:
        km = faiss.Kmeans(dim, k, niter=KMEANS_ITERATIONS, spherical=True, seed=s,
                          max_points_per_centroid=256, min_points_per_centroid=1)
        km.train(np.ascontiguousarray(rows))
        return np.asarray(km.centroids, np.float32)

    if nlist <= TWO_LEVEL_FROM:
        return kmeans(x, nlist, seed)
    top = kmeans(x, round(math.sqrt(nlist)), seed)
    group = faiss.knn(x, top, 1, faiss.METRIC_INNER_PRODUCT)[1][:, 0]
    shares = _shares(nlist, np.bincount(group, minlength=len(top)))
    return np.concatenate([kmeans(x[group == g], int(k), seed + 1 + g) for g, k in enumerate(shares) if k])


# --- private -------------------------------------------------------------------------------


def _shares(total: int, sizes: np.ndarray) -> np.ndarray:
    """`total` split among groups in proportion to their sizes (largest remainders), none above its size."""
    exact = total * sizes / max(1, sizes.sum())
    shares = np.minimum(np.floor(exact).astype(np.int64), sizes)
    while shares.sum() < total:
        room = sizes - shares
        ahead = np.argsort(-np.where(room > 0, exact - shares, -np.inf), kind="stable")
        ahead = ahead[room[ahead] > 0][: total - shares.sum()]
        shares[ahead] += 1
    return shares


def _train(index: Any, plan: Plan, sample: np.ndarray, seed: int, faiss: Any) -> None:
    """Centroids from the sample into the coarse quantiser; then FAISS trains the codec (SQ ranges, PQ
    codebooks) on the sample's residuals, and finds the quantiser already full."""
    assert plan.nlist is not None
    ivf = faiss.extract_index_ivf(index)
    ivf.quantizer.add(coarse_centroids(sample, plan.nlist, seed, faiss))
    codec = faiss.downcast_index(ivf)
    if isinstance(codec, faiss.IndexIVFPQ):
        codec.do_polysemous_training = False  # FAISS' default, for Hamming filtering we never do: 5× the time
    index.train(sample)


def _add_appending(index: Any, chunks: Callable[[], Iterator[np.ndarray]], n: int, truth: TopK | None,
                   reporter: Reporter) -> None:
    """One pass: each chunk's vectors join their lists (ids: row numbers), and the recall queries'
    exact neighbours are updated. Fast-scan lists grow by whole blocks (measured: 15% above the codes)."""
    reporter.start("index: add", n, "vectors")
    at = 0
    for chunk in chunks():
        x = unit_rows(chunk)
        index.add(x)
        if truth is not None:
            truth.update(x, at)
        at += len(x)
        reporter.advance("index: add", len(x))


def _add_in_two_passes(index: Any, chunks: Callable[[], Iterator[np.ndarray]], n: int, truth: TopK | None,
                       reporter: Reporter, faiss: Any) -> None:
    """Find every vector's list (and the recall queries' exact neighbours), size each list once, then add.

    Appending chunk after chunk grows each list by doubling: measured, a third more memory than
    the codes. Sized first, the lists hold exactly their codes; the price is a second read of the
    vectors and 4 bytes a vector for the list numbers."""
    ivf = faiss.extract_index_ivf(index)
    lists = np.empty(n, np.int32)
    reporter.start("index: find lists", n, "vectors")
    at = 0
    for chunk in chunks():
        x = unit_rows(chunk)
        lists[at:at + len(x)] = ivf.quantizer.search(x, 1)[1][:, 0]
        if truth is not None:
            truth.update(x, at)
        at += len(x)
        reporter.advance("index: find lists", len(x))
    invlists = faiss.downcast_InvertedLists(ivf.invlists)
    counts = np.bincount(lists, minlength=ivf.nlist)
    for number in np.nonzero(counts)[0].tolist():
        invlists.resize(number, int(counts[number]))  # allocates exactly this many entries;
        invlists.resize(number, 0)  # emptied, the list keeps them: adding fills them in place
    reporter.start("index: add", n, "vectors")
    at = 0
    for chunk in chunks():
        x = unit_rows(chunk)
        assigned = np.ascontiguousarray(lists[at:at + len(x)], np.int64)
        ivf.add_core(len(x), faiss.swig_ptr(x), None, faiss.swig_ptr(assigned))  # ids: row numbers
        at += len(x)
        reporter.advance("index: add", len(x))


def _breadths(kind: str, params: dict[str, Any]) -> list[int]:
    """Search breadths to try, narrowest first. IVF: up to an eighth of the lists (at least 64): wider,
    a query scans most of the index, and where the codes limit recall (PQ) trying costs minutes at D3 size."""
    if kind.startswith("ivf"):
        widest = min(params["nlist"], max(64, params["nlist"] // 8))
        return sorted({min(widest, 2**i) for i in range(0, 17) if 2 ** (i - 1) < widest})
    return [16, 32, 64, 128, 256, 512, 1024]


def _tune(index: Any, plan: Plan, queries: np.ndarray, own: np.ndarray, exact: np.ndarray, config: IndexConfig,
          params: dict[str, Any], faiss: Any, max_breadth: int | None = None,
          gather: Gather | None = None) -> tuple[float, dict[int, float]]:
    """Smallest search breadth reaching the target recall@10, or else the narrowest beyond which a
    wider search adds less than PLATEAU (or the widest tried); then, where the index re-ranks
    (`params["rerank"]`, set to the deepest), the fewest candidates that reach the target, or do as
    well as the deepest. Returns the recall at what was chosen, and the recall by breadth (at the
    deepest re-rank); `params["recall_by_rerank"]` holds the recall by depth at the chosen breadth.

    Stopping at the plateau matters where nothing reaches the target: at D3's size every wider
    breadth costs minutes to try and doubles what every later search scans, for nothing."""
    queries = unit_rows(queries)
    name = "nprobe" if plan.kind.startswith("ivf") else "efSearch"
    deepest = params.get("rerank") if gather is not None else None

    def recall(breadth: int, depth: int | None) -> float:
        # the index as built (a fast-scan copy would double the memory): bulk searches of a written
        # index scan the same codes packed, whose distances FAISS rounds to 8 bits before re-ranking
        params[name] = breadth
        apply_breadth(index, plan.kind, params, faiss)
        if depth:
            assert gather is not None
            approx = reranked_search(index, queries, RECALL_K + 1, depth, gather)[1]
        else:
            approx = index.search(queries, RECALL_K + 1)[1]
        return recall_at(approx, exact, own)

    by_breadth: dict[int, float] = {}
    breadths = _breadths(plan.kind, params)
    if max_breadth:
        breadths = [b for b in breadths if b <= max_breadth] or breadths[:1]
    chosen = breadths[0]  # the narrowest with the best recall so far
    for breadth in breadths:
        by_breadth[breadth] = recall(breadth, deepest)
        if by_breadth[breadth] >= config.target_recall:
            chosen = breadth
            break
        if by_breadth[breadth] >= by_breadth[chosen] + PLATEAU:
            chosen = breadth
        elif len([b for b in by_breadth if b > chosen]) >= 2:  # two doublings gained nothing: a plateau
            break
    params[name] = chosen
    best = by_breadth[chosen]
    if deepest:
        by_depth = {}
        for depth in [d for d in RERANKS if d < deepest]:
            by_depth[depth] = recall(chosen, depth)
            if by_depth[depth] >= min(config.target_recall, best - PLATEAU):
                break
        else:
            depth = deepest
        by_depth[deepest] = best
        params["rerank"] = depth
        params["recall_by_rerank"] = {str(d): r for d, r in sorted(by_depth.items())}
        best = by_depth[depth]
    apply_breadth(index, plan.kind, params, faiss)
    return best, by_breadth


def _write_ids(matrix: VectorMatrix, store: Store, tmp: Path) -> None:
    """Content hashes in matrix row order, streamed shard by shard into an uncompressed Arrow file."""
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, INDEX_IDS) as writer:
        for path in matrix.shard_offsets().column("path").to_pylist():
            file = pq.ParquetFile(store.root / path)
            for batch in (file.read_row_group(g, columns=["content_hash"]) for g in range(file.num_row_groups)):
                writer.write_table(pa.table([batch.column(0).cast(pa.string())], schema=INDEX_IDS))


def _drop_superseded(store: Store, kept: Path, modality: str, kind: str, fp: str) -> None:
    """Indexes of the same modality and kind, or of older embeddings, leave the store and the catalog."""
    stale = []
    for d in kept.parent.iterdir():
        if d == kept or not d.is_dir() or not d.name.startswith(f"{modality}-"):
            continue
        record = d / "index.parquet"
        if d.name.startswith(f"{modality}-{kind}-") or not record.exists() or read_info(record).fingerprint != fp:
            stale.append(d)
    if stale:
        writes.forget(store, [d / "index.parquet" for d in stale])
    for d in stale:
        (d / "index.parquet").unlink(missing_ok=True)  # first, so a crash leaves no visible record
        shutil.rmtree(d)
