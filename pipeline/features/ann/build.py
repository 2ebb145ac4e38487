"""`pipeline index build`: a FAISS index over one model's cached vectors, trained, filled, tuned and
written within the memory budget its plan (`ann.plan`) fits.

The centroids come from spherical k-means in two levels (√nlist groups, then each split up,
`ann.coarse`), on a random sample of at most half the budget, and each vector finds its list
among the lists of its nearest groups: both cost about 2√nlist products a vector, not nlist.

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
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.allocator import step_buffers_reused
from pipeline.choices import IndexKind, Modality
from pipeline.config import Validated, at_least, within
from pipeline.errors import PipelineError
from pipeline.features.ann.coarse import Coarse, faiss_threads, train_coarse
from pipeline.features.ann.lookup import write_lookup
from pipeline.features.ann.plan import CODEC_TRAIN_ROWS, DEFAULT_MAX_MEMORY, Plan, plan_index
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
from pipeline.store import catalog, writes
from pipeline.store.atomic import atomic_write, write_parquet
from pipeline.store.layout import Store
from schemas import INDEX_IDS, INDEXES, from_rows

# candidates a store's PQ index may re-score exactly (from the memory-mapped vectors) for each query; the
# tuning keeps the fewest that reach the recall of the deepest. On clustered vectors (bench/index_d3.py)
# 100 reach the recall of exact scores over the same lists. On clusters of 5,750 vectors around a centre
# with isotropic noise (bench_scale's D3 store: neighbours barely closer than the rest of their cluster;
# bench/index_rerank.py, 300k vectors, 16 of 292 lists, which held every neighbour) 4-bit codes need
# more: recall@10 0.78 / 0.97 / 1.0 re-ranking 100 / 400 / 1,600 (8-bit codes of the same bytes, 33×
# longer to build: 0.83 / 0.98 / 1.0). The tuning chose nprobe 8, 400 candidates: 0.958. The same codes
# packed for fast-scan, whose distances are rounded to 8 bits, rank worse: 0.38 / 0.70 / 0.95.
RERANKS = (100, 200, 400, 800, 1600, 3200)
# 8-bit codes rank almost as exact scores do: on bench_scale's stores (1M and 2M vectors) re-ranking 100
# candidates reached the recall@10 of 3,200. Tuning with 400 at most spares the gathers of the deeper ones.
SQ8_RERANK = 400
PLATEAU = 0.002  # recall@10 gained by doubling the breadth below which a wider search is not tried


@dataclass(frozen=True)
class IndexConfig(Validated):
    store: Store
    model_key: str | None = None
    kind: IndexKind = "auto"
    modality: Modality = "image"
    nlist: int | None = None  # IVF lists; default 4√n (plan.LISTS_PER_ROOT), fewer if the sample must be smaller
    hnsw_m: int = 32
    target_recall: float = 0.95
    recall_queries: int = 1000
    force: bool = False  # rebuild even if an index of these embeddings exists
    seed: int = 0
    max_memory: int = DEFAULT_MAX_MEMORY  # bytes the build and the search may hold
    wait: bool = True  # wait for another writer of the store instead of stopping
    threads: int | None = None  # FAISS threads for the big products; None: the cores free now (free_cores)

    def check(self) -> None:
        within(self, "target_recall", 0, 1, low_open=True)
        at_least(self, "nlist", 1)
        at_least(self, "recall_queries", 1)
        at_least(self, "threads", 1)
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
    atomic_write(directory / "index.faiss", partial(_write_index, index=index, faiss=faiss))
    del index  # written: its memory goes back before the lookup sorts its keys
    atomic_write(directory / "ids.arrow", lambda tmp: _write_ids(matrix, store, tmp))
    reporter.start("index: lookup", None, "")
    ids = pa.ipc.open_file(pa.memory_map(str(directory / "ids.arrow"))).read_all().column(0)
    write_lookup(store, directory, ids, config.modality, catalog.shard_paths(store, "samples"))
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
    """An index over n vectors given in row order as chunks (streamed twice at most).

    `sample(count, rng)` gives `count` random rows: their row numbers and vectors (to train on, and
    to query for the recall estimate). The search breadth is tuned up to `max_breadth` at most.
    Given `exact` (the vectors of any rows), a compressed index (PQ, SQ8) re-ranks its best
    `params["rerank"]` candidates by exact inner product, in tuning as in searches (`OpenIndex.search`);
    how many is tuned.

    Returns the index (search breadth tuned) and its params, with `recall_at_10` and
    `recall_by_breadth` added. Vectors are L2-normalised as they are added.
    """
    if faiss is None:
        import faiss
    # chunk-sized buffers (a float32 chunk, FAISS' residuals and product blocks) are freed and made again
    # for every chunk: kept on the heap, not mapped and zeroed afresh each time (see `allocator`)
    with faiss_threads(faiss, config.threads or free_cores()), step_buffers_reused():
        return _build(plan, dim, chunks, sample, n, config, reporter or Silent(), faiss, max_breadth, exact)


def free_cores() -> int:
    """Cores not busy now (the count less the last minute's load average), at least one: FAISS'
    threads on a core another process holds wait for each other spinning (see `coarse.faiss_threads`)."""
    import os

    return max(1, (os.cpu_count() or 1) - round(os.getloadavg()[0]))


def _build(plan: Plan, dim: int, chunks: Callable[[], Iterator[np.ndarray]], sample: Sampler, n: int,
           config: IndexConfig, reporter: Reporter, faiss: Any, max_breadth: int | None,
           exact: Gather | None) -> tuple[Any, dict[str, Any]]:
    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    params = plan.params()
    coarse = None
    if plan.train_rows:
        training = unit_rows(sample(plan.train_rows, np.random.default_rng(config.seed))[1])
        coarse = _train(index, plan, training, config.seed, faiss)
        del training
        if len(coarse.sizes) > 1:
            params["groups"] = coarse.sizes  # where each group of lists starts (ann.coarse)
    if plan.kind == "hnsw":
        index.hnsw.efConstruction = max(40, 2 * config.hnsw_m)
        params.update(M=config.hnsw_m, efConstruction=index.hnsw.efConstruction)
    truth = None
    if plan.kind != "flat":
        # exact search costs queries × n × dim: fewer queries on big stores keep it to a minute at D3 size
        count = min(n, config.recall_queries, max(200, int(2e11 / max(1, n * dim))))
        own, queries = sample(count, np.random.default_rng(config.seed + 1))
        truth = TopK(unit_rows(queries), RECALL_K + 1, faiss)
    if plan.kind in ("ivf-pq", "ivf-sq8") and exact is not None:
        # the tuning keeps the fewest that do as well as the deepest
        params["rerank"] = RERANKS[-1] if plan.kind == "ivf-pq" else SQ8_RERANK
    if coarse is not None:
        _add_in_two_passes(index, coarse, chunks, n, truth, reporter, faiss)
    else:  # flat, or a graph
        _add_appending(index, chunks, n, truth, reporter)
    if truth is None:
        params.update(recall_at_10=1.0, recall_by_breadth={})
        return index, params
    reporter.start("index: tune search breadth", None, "")
    recall, by_breadth = _tune(index, plan, queries, own, truth.rows, config, params, faiss, max_breadth, exact)
    params.update(recall_at_10=recall, recall_by_breadth=by_breadth)
    return index, params


# --- private -------------------------------------------------------------------------------


def _train(index: Any, plan: Plan, sample: np.ndarray, seed: int, faiss: Any) -> Coarse:
    """Centroids from the sample (in two levels) into the coarse quantiser; then the codec (SQ ranges,
    PQ codebooks) trains on the residuals of CODEC_TRAIN_ROWS rows of the sample to their lists."""
    assert plan.nlist is not None
    ivf = faiss.extract_index_ivf(index)
    coarse = train_coarse(sample, plan.nlist, seed, faiss)
    ivf.quantizer.add(coarse.centroids)
    codec = faiss.downcast_index(ivf)
    if isinstance(codec, faiss.IndexIVFPQ):
        codec.do_polysemous_training = False  # FAISS' default, for Hamming filtering we never do: 5× the time
    # the codec's ranges or codebooks from residuals to lists found in two levels: FAISS' own `train`
    # would find them by a scan of every centroid, for every row of the sample
    rows = np.ascontiguousarray(sample[np.linspace(0, len(sample) - 1, min(len(sample), CODEC_TRAIN_ROWS)).astype(int)])
    assign = np.ascontiguousarray(coarse.nearest(rows, 1, faiss)[1][:, 0])
    if ivf.by_residual:
        rows = rows - coarse.centroids[assign]
    ivf.train_encoder(len(rows), faiss.swig_ptr(rows), faiss.swig_ptr(assign) if ivf.by_residual else None)
    ivf.is_trained = True
    index.is_trained = True
    if isinstance(codec, faiss.IndexIVFPQ):
        # codebooks laid out per code as well: encoding 768-d vectors into 384 4-bit codes, what adding
        # costs (FAISS: 18 µs a vector, 102 of the 209 CPU-s of a 5M build), takes a quarter less
        codec.pq.sync_transposed_centroids()
    return coarse


def _add_appending(index: Any, chunks: Callable[[], Iterator[np.ndarray]], n: int, truth: TopK | None,
                   reporter: Reporter) -> None:
    """One pass (flat, HNSW): each chunk's vectors join the index (ids: row numbers), and the recall
    queries' exact neighbours are updated."""
    reporter.start("index: add", n, "vectors")
    at = 0
    for chunk in chunks():
        x = unit_rows(chunk)
        index.add(x)
        if truth is not None:
            truth.update(x, at)
        at += len(x)
        reporter.advance("index: add", len(x))


def _add_in_two_passes(index: Any, coarse: Coarse, chunks: Callable[[], Iterator[np.ndarray]], n: int,
                       truth: TopK | None, reporter: Reporter, faiss: Any) -> None:
    """Find every vector's list in two levels (and the recall queries' exact neighbours), size each
    list once, then add.

    Appending chunk after chunk grows each list by doubling: measured, a third more memory than
    the codes. Sized first, the lists hold exactly their codes; the price is a second read of the
    vectors and 4 bytes a vector for the list numbers."""
    ivf = faiss.extract_index_ivf(index)
    lists = np.empty(n, np.int32)
    reporter.start("index: find lists", n, "vectors")
    at = 0
    for chunk in chunks():
        x = unit_rows(chunk)
        lists[at:at + len(x)] = coarse.nearest(x, 1, faiss)[1][:, 0]
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


def _write_index(tmp: Path, index: Any, faiss: Any) -> None:
    faiss.write_index(index, str(tmp))


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
