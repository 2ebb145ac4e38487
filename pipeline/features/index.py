"""`pipeline index build`: a FAISS index over one model's cached vectors, within a memory budget.

Inner product on L2-normalised vectors (= cosine similarity). Like autofaiss does for
clip-retrieval, `auto` picks the most exact index whose build and search fit `max_memory`:
exact search (flat) below `EXACT_BELOW` vectors, then IVF over full vectors, IVF with 8-bit
scalar quantisation, IVF with product quantisation (the most sub-quantisers that fit). Product
codes have 4 bits a sub-quantiser (`PQ{m}x4`), which FAISS scans with SIMD shuffles held in
registers once they are packed in its fast-scan layout (`IndexIVFPQFastScan`): measured on 768-d
vectors (bench/index_d3.py), 10-30× the queries a second of 8-bit codes of the same bytes,
codebooks trained in a tenth of the time. What 4-bit codes lose in ranking, re-ranking gives
back: a store's index scores its best `params["rerank"]` candidates again by exact inner product
with the vectors themselves (memory-mapped, `features.vectors`). How deep is tuned with the
breadth: where the codes are what limits recall@10, deeper (`RERANKS`).

Written as a plain IVF-PQ index, whose lists FAISS maps instead of reading, so a short-lived
process that searches a few vectors (`pipeline neighbors`) holds only the lists it scans; a search
of many vectors at once (leaks) packs a fast-scan copy in memory first (`FAST_SCAN_FROM`), which
takes seconds at D3's size.

Time linear in rows: IVF lists hold about `LIST_ROWS` vectors whatever the store's size (up to the
lists a bounded training sample can place), so a query that scans a fixed number of lists costs
the same at 100k vectors as at 11.5M; from `HNSW_QUANTISER_FROM` lists on, the lists are found
through a graph over the centroids instead of a scan of them. The centroids come from spherical
k-means in two levels (√nlist clusters, then each split up), which costs rows × 2√nlist × dim
instead of rows × nlist × dim, on a random sample of at most half the budget.

Memory bounded by the budget: vectors are streamed from the memory-mapped matrix
(`features.vectors`) in chunks, twice. The first pass finds each vector's list (4 bytes a vector)
and the exact neighbours of the recall queries; the lists are then sized exactly once, so the
second pass adds every vector without the doubling growth of a vector that is appended to (a third
more memory, measured). `plan_index` estimates the peak of every phase; the plan must fit.
Searches map the index file (`open_index`), so they hold only what they touch, as page cache
(a fast-scan copy is the index's size, which the plan keeps within the budget).
Approximate indexes tune their search breadth (IVF `nprobe`, HNSW `efSearch`) up to
`target_recall` and report the recall@10 they reach against exact search on sampled queries,
excluding each query's own vector. Where no breadth reaches the target, the tuning stops where a
wider search stops adding recall, and the index is built all the same: its recall is reported
(and shown by `pipeline status`), for the user to judge.

Row r of the index is row r of the model's vector matrix. On disk:
`indexes/<model_key>/<index_id>/` holds `index.faiss`, `ids.arrow` (content hash of each row,
uncompressed Arrow so readers map it instead of loading it) and `index.parquet` (its row in the
`indexes` view), written in that order, each atomically. The index id carries a fingerprint of
the embedding shards, so an index is rebuilt exactly when the embeddings change.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import Validated, at_least, within
from pipeline.errors import PipelineError
from pipeline.features.vectors import VectorMatrix, fingerprint, open_matrix, shards_of
from pipeline.features.view import resolve_model_key
from pipeline.reporting import Reporter, Silent
from pipeline.store import writes
from pipeline.store.atomic import atomic_write, write_parquet
from pipeline.store.layout import Store
from schemas import INDEX_IDS, INDEXES, from_rows

Kind = Literal["auto", "flat", "ivf", "ivf-sq8", "ivf-pq", "hnsw"]
KINDS: tuple[str, ...] = get_args(Kind)
EXACT_BELOW = 100_000
RECALL_K = 10
DEFAULT_MAX_MEMORY = 4 * 2**30
ADD_ROWS = 32768  # most vectors converted to float32 and added at a time
LIST_ROWS = 1024  # vectors per IVF list aimed at: the work of scanning one list stays the same as rows grow
MAX_LISTS = 65536
MIN_TRAIN_PER_LIST = 32  # k-means rows per centroid at least (FAISS advises 39; the sample caps the lists)
TRAIN_PER_LIST = 64
CODEC_TRAIN_ROWS = 65536  # PQ codebooks need 256 rows per code at least: train on this many whatever nlist
TWO_LEVEL_FROM = 256  # lists: above this many, k-means in two levels
KMEANS_ITERATIONS = 20
# lists: from this many a graph finds a vector's lists instead of a scan of every centroid. Measured
# (768-d unit queries near 10,922 random unit centroids, batches of 4,000, 2 shared cores): to add, a
# vector's one list costs ~250 µs of CPU either way; to search, 8 lists cost 257 µs by the scan (exact)
# against 815 µs by an HNSW32 graph at efSearch 64 (what apply_breadth sets), which found 61% of them
# (ef 16: 254 µs, 35%). With fast-scan codes the lists cost less to scan than to find: the scan up to
# D3's 10,922 lists, a graph only beyond 16,384 (not measured there).
HNSW_QUANTISER_FROM = 16384
# candidates a store's PQ index may re-score exactly (from the memory-mapped vectors) for each query; the
# tuning keeps the fewest that reach the recall of the deepest. On clustered vectors (bench/index_d3.py)
# 100 reach the recall of exact scores over the same lists. On clusters of 5,750 vectors around a centre
# with isotropic noise (bench_scale's D3 store: neighbours barely closer than the rest of their cluster;
# bench/index_rerank.py, 300k vectors, 16 of 292 lists, which held every neighbour) 4-bit codes need
# more: recall@10 0.78 / 0.97 / 1.0 re-ranking 100 / 400 / 1,600 (8-bit codes of the same bytes, 33×
# longer to build: 0.83 / 0.98 / 1.0). The tuning chose nprobe 8, 400 candidates: 0.958. The same codes
# packed for fast-scan, whose distances are rounded to 8 bits, rank worse: 0.38 / 0.70 / 0.95.
RERANKS = (100, 200, 400, 800, 1600, 3200)
# queries in one search from which a 4-bit PQ index is searched through a fast-scan copy, packed in
# memory once (0.03 s for 200k vectors); fewer scan the mapped codes (~0.3 µs a code: 0.5 s for 1,365
# lists of D3's index), without reading the whole index for a few queries. Fast-scan ranks worse (above):
# its one bulk user, the leak scan, scores every hit again exactly, and near-duplicates stand far apart.
FAST_SCAN_FROM = 64
PLATEAU = 0.002  # recall@10 gained by doubling the breadth below which a wider search is not tried
_HNSW_LINK_BYTES = 32 * 2 * 4 + 64  # per centroid in an HNSW32 graph: level-0 links, upper levels, bookkeeping
# shares of the budget: the built index and one list number per vector; the chunks in flight (a float32
# chunk, its unit copy, FAISS' residuals); the training sample and its residuals (before any vector is added).
# What is left (15%) is the interpreter and the libraries.
_INDEX_SHARE = 0.7
_CHUNK_SHARE = 0.1
_TRAIN_SHARE = 0.5
_USABLE = _INDEX_SHARE + _CHUNK_SHARE + 0.05


@dataclass(frozen=True)
class IndexConfig(Validated):
    store: Store
    model_key: str | None = None
    kind: Kind = "auto"
    modality: Literal["image", "text"] = "image"
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


@dataclass(frozen=True)
class Plan:
    """Which index to build for n vectors of dim values, and what building and searching it will hold."""

    kind: str
    factory: str  # FAISS index_factory description
    nlist: int | None
    train_rows: int
    bytes: int  # estimated size of the built index (what a search maps or, fast-scan, reads)
    build_bytes: int  # estimated peak of the build: the index, a list number per vector, a chunk or the sample
    chunk_rows: int  # vectors added at a time

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {"metric": "inner_product", "factory": self.factory, "estimated_bytes": self.bytes,
                               "estimated_build_bytes": self.build_bytes}
        if self.nlist:
            out.update(nlist=self.nlist, trained_on=self.train_rows)
        return out


@dataclass
class IndexInfo:
    index_id: str
    model_key: str
    modality: str
    kind: str
    params: dict[str, Any]
    vectors: int
    dim: int
    fingerprint: str
    recall_at_10: float | None
    build_seconds: float
    directory: Path
    built: bool = True  # False: an index of these embeddings existed and was reused
    recall_by_breadth: dict[int, float] = field(default_factory=dict)


@dataclass
class OpenIndex:
    info: IndexInfo
    index: Any  # faiss.Index
    ids: pa.ChunkedArray  # content hash of each row, memory-mapped
    matrix: VectorMatrix | None = None  # the vectors of the rows (same layout), for exact scores
    fast: Any = None  # a fast-scan copy of a 4-bit PQ index, packed at its first search of many queries

    def search(self, queries: np.ndarray, k: int, rerank: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Similarities and row numbers of the k nearest rows ([-1] where fewer exist). An index built
        to re-rank (`params["rerank"]`) scores that many candidates again exactly, unless `rerank` is False."""
        k = max(1, min(k, self.index.ntotal))
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        index = self._searcher(len(queries))
        candidates = self.info.params.get("rerank") if rerank and self.matrix is not None else None
        if candidates:
            assert self.matrix is not None
            return reranked_search(index, queries, k, candidates, self.matrix.gather)
        sims, rows = index.search(queries, k)
        return sims, rows

    def set_breadth(self, breadth: int) -> None:
        """Search this many IVF lists (HNSW: candidates) from now on."""
        import faiss

        name = "nprobe" if self.info.kind.startswith("ivf") else "efSearch"
        for index in (self.index, self.fast):
            if index is not None:
                apply_breadth(index, self.info.kind, {**self.info.params, name: breadth}, faiss)

    def similarities(self, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact inner products of queries[i] with the vectors of rows[i, j] (-inf where rows < 0)."""
        if self.matrix is None:
            raise PipelineError("The vectors of this index are not open; rebuild it with `pipeline index build`.")
        return exact_scores(np.ascontiguousarray(queries, np.float32), rows, self.matrix.gather)

    def hashes(self, rows: np.ndarray) -> list[str]:
        return self.ids.take(pa.array(np.asarray(rows, np.int64))).to_pylist()

    def _searcher(self, queries: int) -> Any:
        if queries >= FAST_SCAN_FROM and self.fast is None:
            self.fast = fast_scan_copy(self.index)
        return self.fast if queries >= FAST_SCAN_FROM and self.fast is not None else self.index


def fast_scan_copy(index: Any) -> Any:
    """A fast-scan copy (codes packed in memory) of a 4-bit IVF-PQ index, searched as wide; None for
    any other index. The copy shares the original's coarse quantiser: keep the original."""
    import faiss

    pq_index = faiss.downcast_index(index)
    if not isinstance(pq_index, faiss.IndexIVFPQ) or pq_index.pq.nbits != 4:
        return None
    fast = faiss.IndexIVFPQFastScan(pq_index)
    fast.nprobe = pq_index.nprobe
    return fast


def parse_memory(text: str) -> int:
    """'4GB', '512MB', '2.5GiB' or a number of bytes → bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*", text.upper())
    if not match:
        raise PipelineError(f"--max-memory must look like 4GB or 512MB, not {text!r}.")
    number, unit = float(match.group(1)), match.group(2)
    return int(number * 1024 ** " KMGT".index(unit or " "))


def plan_index(n: int, dim: int, kind: str = "auto", max_memory: int = DEFAULT_MAX_MEMORY,
               nlist: int | None = None, hnsw_m: int = 32, mappable: bool = True) -> Plan:
    """The index for n vectors within `max_memory`: the requested kind, or (auto) the most exact that fits.
    PQ codes are in FAISS' fast-scan layout unless the index is to be written and mapped (`mappable`):
    then in the plain layout, and packed when searched in bulk (`OpenIndex`)."""
    chunk = _chunk_rows(dim, max_memory)
    buffers = 3 * chunk * dim * 4  # a float32 chunk, its unit copy, FAISS' residuals of it
    if kind == "flat" or (kind == "auto" and n < EXACT_BELOW and 2 * n * dim * 4 <= max_memory * _INDEX_SHARE):
        size = n * dim * 4  # appended chunk by chunk, so up to twice that while it grows
        return _fits(Plan("flat", "Flat", None, 0, size, 2 * size + buffers, chunk), max_memory)
    if kind == "hnsw":
        size = n * (dim * 4 + hnsw_m * 2 * 4 + 16)
        return _fits(Plan("hnsw", f"HNSW{hnsw_m},Flat", None, 0, size, 2 * size + buffers, chunk), max_memory)
    lists, train_rows = _lists(n, dim, max_memory, nlist)
    graph = lists >= HNSW_QUANTISER_FROM
    quantiser = f"IVF{lists}_HNSW32" if graph else f"IVF{lists}"
    centroids = lists * (dim * 4 + (_HNSW_LINK_BYTES if graph else 0))
    training = 2 * train_rows * dim * 4 + centroids  # the sample and FAISS' residuals of it
    codecs = [("ivf", "Flat", dim * 4), ("ivf-sq8", "SQ8", dim)]
    # 4 bits a sub-quantiser, so m sub-quantisers take m / 2 bytes
    codecs += [("ivf-pq", f"PQ{m}x4" + ("" if mappable else "fs"), (m + 1) // 2) for m in _pq_sizes(dim)]
    wanted = [c for c in codecs if kind in ("auto", c[0])]
    plans = []
    for name, codec, per_vector in wanted:
        # codes and 8-byte ids in the lists, the centroids; fast-scan lists hold blocks of 32 codes
        fast_scan = codec.endswith("fs")
        size = n * (per_vector + 8) + centroids + (lists * 32 * per_vector if fast_scan else 0)
        # two passes hold the list number of every vector; fast-scan lists, appended to in one pass,
        # grow in steps (measured: 15% above their codes)
        held = int(1.15 * size) if fast_scan else size + n * 4
        # a bulk search of a written 4-bit index holds its fast-scan copy: blocks of 32 codes, ids
        searched = int(1.15 * (size + lists * 32 * per_vector)) if codec.endswith("x4") else size
        build = max(training, held + buffers)
        plans.append(Plan(name, f"{quantiser},{codec}", lists, train_rows, size, build, chunk))
        if build <= max_memory * _USABLE and max(held, searched) <= max_memory * _INDEX_SHARE:
            return plans[-1]
    return _fits(plans[-1], max_memory)


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
    if directory.exists():
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
Gather = Callable[[np.ndarray], np.ndarray]  # row numbers → their unit vectors (float32)


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
        _train(index, plan, _unit(sample(plan.train_rows, np.random.default_rng(config.seed))[1]), config.seed, faiss)
    if plan.kind == "hnsw":
        index.hnsw.efConstruction = max(40, 2 * config.hnsw_m)
        params.update(M=config.hnsw_m, efConstruction=index.hnsw.efConstruction)
    truth = None
    if plan.kind != "flat":
        # exact search costs queries × n × dim: fewer queries on big stores keep it to a minute at D3 size
        count = min(n, config.recall_queries, max(200, int(2e11 / max(1, n * dim))))
        own, queries = sample(count, np.random.default_rng(config.seed + 1))
        truth = TopK(_unit(queries), RECALL_K + 1, faiss)
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


def open_index(store: Store, model_key: str | None, modality: str = "image", kind: str = "auto",
               reporter: Reporter | None = None, max_memory: int = DEFAULT_MAX_MEMORY,
               force: bool = False) -> OpenIndex:
    """The index of the current embeddings: one already built over them (of this kind; `auto`: of any kind),
    else one built now within `max_memory`. The index file is memory-mapped, not read: a search holds
    only the lists it scans, as page cache the kernel may drop.

    Building needs the store's writer lock: the caller holds it."""
    import faiss

    found = None if force else _current(store, model_key, modality, kind)
    info = found or build_index(IndexConfig(store, model_key, kind=kind, modality=modality,  # type: ignore[arg-type]
                                            max_memory=max_memory, force=force), reporter)
    index = faiss.read_index(str(info.directory / "index.faiss"), faiss.IO_FLAG_MMAP_IFC)
    apply_breadth(index, info.kind, info.params, faiss)
    # chunks left as written: combining them would copy every hash into the process' memory
    ids = pa.ipc.open_file(pa.memory_map(str(info.directory / "ids.arrow"))).read_all().column(0)
    matrix = open_matrix(store, info.model_key, modality)
    # rows laid out anew since the build: row r of the matrix is no longer row r of the index
    return OpenIndex(info, index, ids, matrix if info.params.get("matrix") == matrix.generation else None)


def exact_scores(queries: np.ndarray, rows: np.ndarray, gather: Gather, block: int = 256) -> np.ndarray:
    """Inner products of queries[i] with the vectors of rows[i, j] (-inf where rows < 0), `block`
    queries at a time (each row read once a block, in ascending order: page-cache friendly)."""
    out = np.full(rows.shape, -np.inf, np.float32)
    block = max(1, min(block, 2**16 // max(1, rows.shape[1])))  # at most 65,536 vectors gathered at a time
    for lo in range(0, len(rows), block):
        part = rows[lo:lo + block]
        valid = part >= 0
        if not valid.any():
            continue
        unique, where = np.unique(part[valid], return_inverse=True)
        vectors = _unit(gather(unique))  # as the index holds them: float16 rounding leaves norms ≠ 1
        query_of = np.nonzero(valid)[0] + lo
        scores = np.einsum("ij,ij->i", vectors[where], queries[query_of])
        block_out = out[lo:lo + block]
        block_out[valid] = scores
    return out


def reranked_search(index: Any, queries: np.ndarray, k: int, candidates: int,
                    gather: Gather) -> tuple[np.ndarray, np.ndarray]:
    """The k best of the index's `candidates` nearest rows, by exact inner product."""
    rows = index.search(queries, max(k, min(candidates, index.ntotal)))[1]
    sims = exact_scores(queries, rows, gather)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    sims, rows = np.take_along_axis(sims, order, 1), np.take_along_axis(rows, order, 1)
    rows[~np.isfinite(sims)] = -1
    return sims, rows


def read_info(path: Path) -> IndexInfo:
    row = pq.read_table(path).to_pylist()[0]
    return IndexInfo(row["index_id"], row["model_key"], row["modality"], row["kind"],
                     json.loads(row["params_json"]), row["vectors"], row["dim"], row["fingerprint"],
                     row["recall_at_10"], row["build_seconds"], path.parent)


class TopK:
    """The exact k nearest rows (inner product) of fixed queries, over rows met chunk by chunk.

    Memory is the queries and k results each (FAISS' brute-force search works in small blocks)."""

    def __init__(self, queries: np.ndarray, k: int, faiss: Any = None) -> None:
        if faiss is None:
            import faiss
        self.faiss = faiss
        self.queries = np.ascontiguousarray(queries, np.float32)
        self.k = k
        self.sims = np.full((len(queries), 0), -np.inf, np.float32)
        self.rows = np.zeros((len(queries), 0), np.int64)

    def update(self, chunk: np.ndarray, start: int) -> None:
        """Take in rows start, start + 1, … (the vectors of `chunk`)."""
        keep = min(self.k, len(chunk))
        if not len(self.queries) or not keep:
            return
        sims, rows = self.faiss.knn(self.queries, np.ascontiguousarray(chunk, np.float32), keep,
                                    self.faiss.METRIC_INNER_PRODUCT)
        sims = np.concatenate([self.sims, sims], 1)
        rows = np.concatenate([self.rows, rows + start], 1)
        order = np.argsort(-sims, axis=1, kind="stable")[:, :self.k]
        self.sims, self.rows = np.take_along_axis(sims, order, 1), np.take_along_axis(rows, order, 1)


def exact_neighbours(chunks: Iterator[np.ndarray], queries: np.ndarray, k: int) -> np.ndarray:
    """Row numbers of the exact k nearest rows by inner product, over rows given in chunks."""
    top = TopK(queries, k)
    start = 0
    for chunk in chunks:
        top.update(chunk, start)
        start += len(chunk)
    return top.rows


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


def recall_at(approx: np.ndarray, exact: np.ndarray, own: np.ndarray, k: int = RECALL_K) -> float:
    """Mean fraction of each query's exact top-k (its own row excluded) found in the approximate top-k."""
    hits = []
    for a, e, me in zip(approx, exact, own, strict=True):
        truth = [r for r in e if r != me and r >= 0][:k]
        found = [r for r in a if r != me and r >= 0][:k]
        if truth:
            hits.append(len(set(truth) & set(found)) / len(truth))
    return float(np.mean(hits)) if hits else 1.0


def apply_breadth(index: Any, kind: str, params: dict[str, Any], faiss: Any) -> None:
    if kind.startswith("ivf"):
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = params["nprobe"]
        quantiser = faiss.downcast_index(ivf.quantizer)
        if hasattr(quantiser, "hnsw"):
            quantiser.hnsw.efSearch = max(64, 2 * params["nprobe"])
    elif kind == "hnsw":
        index.hnsw.efSearch = params["efSearch"]


# --- private -------------------------------------------------------------------------------


def _current(store: Store, model_key: str | None, modality: str, kind: str) -> IndexInfo | None:
    """An index of this kind (`auto`: any) over exactly the current vectors of this modality, if one was built."""
    key = resolve_model_key(store, model_key)
    fp = fingerprint(store, shards_of(store, key, modality), modality)
    for record in sorted((store.dataset_dir("indexes") / key).glob(f"{modality}-*/index.parquet")):
        info = read_info(record)
        if info.fingerprint == fp and kind in ("auto", info.kind) and (record.parent / "ids.arrow").exists():
            info.built = False
            return info
    return None


def _fits(plan: Plan, max_memory: int) -> Plan:
    if plan.build_bytes > max_memory * _USABLE:
        need = plan.build_bytes / _USABLE / 2**30
        raise PipelineError(f"A {plan.kind} index of these vectors needs about {need:.1f} GB to build; raise "
                            "--max-memory or choose --kind auto.")
    return plan


def _lists(n: int, dim: int, max_memory: int, nlist: int | None) -> tuple[int, int]:
    """IVF list count and training-sample size: about LIST_ROWS vectors a list, as long as the sample
    (≥ MIN_TRAIN_PER_LIST rows a list, with its residuals) fits its share of the budget."""
    fit_rows = max(1, int(max_memory * _TRAIN_SHARE) // (2 * dim * 4))
    lists = nlist or min(MAX_LISTS, max(1, n // LIST_ROWS))
    lists = max(1, min(lists, n // MIN_TRAIN_PER_LIST or 1, fit_rows // MIN_TRAIN_PER_LIST or 1))
    return lists, min(n, fit_rows, max(TRAIN_PER_LIST * lists, CODEC_TRAIN_ROWS))


def _chunk_rows(dim: int, max_memory: int) -> int:
    return max(1024, min(ADD_ROWS, int(max_memory * _CHUNK_SHARE) // (3 * dim * 4)))


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


def _unit(x: np.ndarray) -> np.ndarray:
    """x as float32 with rows scaled to unit norm, in place when x is already float32."""
    x = np.asarray(x, np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(x)


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
        x = _unit(chunk)
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
        x = _unit(chunk)
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
        x = _unit(chunk)
        assigned = np.ascontiguousarray(lists[at:at + len(x)], np.int64)
        ivf.add_core(len(x), faiss.swig_ptr(x), None, faiss.swig_ptr(assigned))  # ids: row numbers
        at += len(x)
        reporter.advance("index: add", len(x))


def _pq_sizes(dim: int) -> list[int]:
    """Sub-quantiser counts for PQ (8 bits each), largest first: divisors of dim, ≥ 2 values per sub-vector."""
    return [m for m in range(dim // 2, 0, -1) if dim % m == 0 and m in (1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48,
                                                                       56, 64, 96, 128, 192, 256, 384)]


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
    queries = _unit(queries)
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


def _drop_superseded(store: Store, current: Path, modality: str, kind: str, fp: str) -> None:
    """Indexes of the same modality and kind, or of older embeddings, leave the store and the catalog."""
    stale = []
    for d in current.parent.iterdir():
        if d == current or not d.is_dir() or not d.name.startswith(f"{modality}-"):
            continue
        record = d / "index.parquet"
        if d.name.startswith(f"{modality}-{kind}-") or not record.exists() or read_info(record).fingerprint != fp:
            stale.append(d)
    if stale:
        writes.forget(store, [d / "index.parquet" for d in stale])
    for d in stale:
        (d / "index.parquet").unlink(missing_ok=True)  # first, so a crash leaves no visible record
        shutil.rmtree(d)
