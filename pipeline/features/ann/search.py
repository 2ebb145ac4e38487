"""Searching a built FAISS index: the file mapped, candidates re-ranked exactly, recall measured.

Written as a plain IVF-PQ index, whose lists FAISS maps instead of reading, so a short-lived
process that searches a few vectors (`pipeline neighbors`) holds only the lists it scans; a search
of many vectors at once (leaks) packs a fast-scan copy in memory first (`FAST_SCAN_FROM`), which
takes seconds at D3's size. A store's PQ index scores its best `params["rerank"]` candidates again
by exact inner product with the vectors themselves (memory-mapped, `features.vectors`).

Row r of the index is row r of the model's vector matrix; `ids.arrow` (uncompressed, mapped) holds
the content hash of each row, and the lookup beside it (`ann.lookup`) finds rows and samples by id.
Writers open an index with `build.open_index`, which builds one where none is current; readers
with `open_for_reading`, which never builds, and takes an index that misses vectors added since.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.features.ann.coarse import Coarse
from pipeline.features.ann.lookup import Lookup, open_lookup
from pipeline.features.vectors import VectorMatrix, fingerprint, open_matrix, shards_of
from pipeline.features.view import resolve_model_key
from pipeline.store.layout import Store

RECALL_K = 10
# queries in one search from which an IVF index is searched in bulk (`Bulk`): lists found in two levels,
# 4-bit PQ codes scanned in a fast-scan copy packed in memory once (0.03 s for 200k vectors); fewer scan
# the mapped codes (~0.3 µs a code: 0.5 s for 1,365 lists of D3's index), without reading the whole index
# for a few queries. Fast-scan ranks worse (build.RERANKS): its bulk users, the leak scan and the kNN
# detector, score every hit again exactly.
FAST_SCAN_FROM = 64

Gather = Callable[[np.ndarray], np.ndarray]  # row numbers → their unit vectors (float32)


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
class Bulk:
    """Searches of many queries at once. Through an IVF index, each query's lists are found in two
    levels (`ann.coarse`: about 2√lists products, where a scan of every centroid costs as much as
    adding the vector did), and 4-bit PQ codes are scanned in a fast-scan copy, packed at the first
    search (0.03 s for 200k vectors). Any other index is searched as it is."""

    index: Any  # faiss.Index
    params: dict[str, Any]
    fast: Any = None  # the fast-scan copy of 4-bit PQ codes, once packed
    coarse: Coarse | None = None

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Similarities and row numbers of the k nearest rows of each query (by the codes)."""
        import faiss

        queries = np.ascontiguousarray(queries, np.float32)
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is None:
            return self.index.search(queries, k)
        if self.coarse is None:
            self.fast = fast_scan_copy(self.index)
            self.coarse = Coarse.of_index(self.index, self.params, faiss)
        sims, lists = self.coarse.nearest(queries, ivf.nprobe, faiss)
        return (self.fast or self.index).search_preassigned(queries, k, lists, sims)


@dataclass
class OpenIndex:
    info: IndexInfo
    index: Any  # faiss.Index
    ids: pa.ChunkedArray  # content hash of each row, memory-mapped
    matrix: VectorMatrix | None = None  # the vectors of the rows (same layout), for exact scores
    lookup: Lookup | None = None  # rows by id (ann.lookup), where the index has one
    bulk: Bulk = field(init=False)  # how searches of FAST_SCAN_FROM queries or more go

    def __post_init__(self) -> None:
        self.bulk = Bulk(self.index, self.info.params)

    @property
    def fast(self) -> Any:
        """The fast-scan copy of a 4-bit PQ index, packed at its first search of many queries (else None)."""
        return self.bulk.fast

    def search(self, queries: np.ndarray, k: int, rerank: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Similarities and row numbers of the k nearest rows ([-1] where fewer exist). An index built
        to re-rank (`params["rerank"]`) scores that many candidates again exactly, unless `rerank` is False."""
        k = max(1, min(k, self.index.ntotal))
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        searcher = self.bulk if len(queries) >= FAST_SCAN_FROM else self.index
        candidates = self.info.params.get("rerank") if rerank and self.matrix is not None else None
        if candidates:
            assert self.matrix is not None
            return reranked_search(searcher, queries, k, candidates, self.matrix.gather)
        sims, rows = searcher.search(queries, k)
        return sims, rows

    def search_among(self, queries: np.ndarray, k: int, selector: Any) -> tuple[np.ndarray, np.ndarray]:
        """`search`, among the rows a FAISS `IDSelector` lets through only (exact rows, not approximately
        filtered after: the index skips the others while it scans), at the index's tuned breadth."""
        import faiss

        k = max(1, min(k, self.index.ntotal))
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        params = _selecting(self.index, self.info, selector, faiss)
        candidates = self.info.params.get("rerank") if self.matrix is not None else None
        if candidates:
            assert self.matrix is not None
            return reranked_search(self.index, queries, k, candidates, self.matrix.gather, params)
        sims, rows = self.index.search(queries, k, params=params)
        return sims, rows

    def set_breadth(self, breadth: int) -> None:
        """Search this many IVF lists (HNSW: candidates) from now on."""
        import faiss

        name = "nprobe" if self.info.kind.startswith("ivf") else "efSearch"
        for index in (self.index, self.bulk.fast):
            if index is not None:
                apply_breadth(index, self.info.kind, {**self.info.params, name: breadth}, faiss)

    def similarities(self, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact inner products of queries[i] with the vectors of rows[i, j] (-inf where rows < 0)."""
        if self.matrix is None:
            raise PipelineError("The vectors of this index are not open; rebuild it with `pipeline index build`.")
        return exact_scores(np.ascontiguousarray(queries, np.float32), rows, self.matrix.gather)

    def hashes(self, rows: np.ndarray) -> list[str]:
        """The content hash of each row. Few rows are taken from their chunks one by one: a `take`
        across the chunks of the mapped file would first copy every hash (measured: 0.07 s at 2M)."""
        rows = np.asarray(rows, np.int64)
        if len(rows) > FAST_SCAN_FROM:
            return self.ids.take(pa.array(rows)).to_pylist()
        starts = np.cumsum([0] + [len(c) for c in self.ids.chunks])
        chunk = np.searchsorted(starts, rows, "right") - 1
        return [self.ids.chunks[c][r - starts[c]].as_py() for r, c in zip(rows.tolist(), chunk.tolist(), strict=True)]


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


def open_built(store: Store, info: IndexInfo, modality: str, matrix: VectorMatrix | None = None) -> OpenIndex:
    """An index already built, ready to search, with its lookup (`ann.lookup`) where it has one. The index
    file is memory-mapped, not read: a search holds only the lists it scans, as page cache the kernel may
    drop. `matrix`: the vectors' matrix, if the caller has it open."""
    import faiss

    index = faiss.read_index(str(info.directory / "index.faiss"), faiss.IO_FLAG_MMAP_IFC)
    apply_breadth(index, info.kind, info.params, faiss)
    # chunks left as written: combining them would copy every hash into the process' memory
    ids = pa.ipc.open_file(pa.memory_map(str(info.directory / "ids.arrow"))).read_all().column(0)
    matrix = matrix or open_matrix(store, info.model_key, modality)
    # rows laid out anew since the build: row r of the matrix is no longer row r of the index
    same = info.params.get("matrix") == matrix.generation
    return OpenIndex(info, index, ids, matrix if same else None, open_lookup(store, info.directory))


def open_for_reading(store: Store, model_key: str, modality: str, matrix: VectorMatrix) -> OpenIndex | None:
    """The index a reader searches, never building one: the one over exactly the current vectors,
    else the one over the most of them whose rows are still the first rows of `matrix` (vectors
    were added since, by an encode that may still be running); None if there is neither."""
    found = current(store, model_key, modality, "auto")
    if found is None:
        older = [info for info in _infos(store, model_key, modality)
                 if info.params.get("matrix") == matrix.generation and info.vectors <= matrix.rows]
        found = max(older, key=lambda info: info.vectors, default=None)
    elif found.params.get("matrix") != matrix.generation:
        found = None
    return None if found is None else open_built(store, found, modality, matrix)


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
        vectors = unit_rows(gather(unique))  # as the index holds them: float16 rounding leaves norms ≠ 1
        query_of = np.nonzero(valid)[0] + lo
        scores = np.einsum("ij,ij->i", vectors[where], queries[query_of])
        block_out = out[lo:lo + block]
        block_out[valid] = scores
    return out


def reranked_search(index: Any, queries: np.ndarray, k: int, candidates: int,
                    gather: Gather, params: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """The k best of the index's `candidates` nearest rows, by exact inner product (`index`: a FAISS
    index, or anything with its `search` and `ntotal`, such as `Bulk`; `params`: FAISS search
    parameters, such as an `IDSelector` restriction)."""
    n = max(k, min(candidates, index.ntotal))
    rows = (index.search(queries, n) if params is None else index.search(queries, n, params=params))[1]
    sims = exact_scores(queries, rows, gather)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    sims, rows = np.take_along_axis(sims, order, 1), np.take_along_axis(rows, order, 1)
    rows[~np.isfinite(sims)] = -1
    return sims, rows


def read_info(path: Path) -> IndexInfo:
    # not read_table (it imports pyarrow.dataset), nor created_at (a zoned time to Python imports pandas)
    columns = ["index_id", "model_key", "modality", "kind", "params_json", "vectors", "dim", "fingerprint",
               "recall_at_10", "build_seconds"]
    row = pq.ParquetFile(path).read(columns=columns).to_pylist()[0]
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


def _selecting(index: Any, info: IndexInfo, selector: Any, faiss: Any) -> Any:
    """Search parameters of this kind of index that restrict it to `selector`'s rows, at its tuned breadth."""
    if info.kind.startswith("ivf"):
        return faiss.SearchParametersIVF(sel=selector, nprobe=int(info.params["nprobe"]))
    if info.kind == "hnsw":
        return faiss.SearchParametersHNSW(sel=selector, efSearch=int(info.params["efSearch"]))
    return faiss.SearchParameters(sel=selector)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """x as contiguous float32 with rows scaled to unit norm (zero rows stay zero), in place when x is
    already that. By FAISS in one pass: a third of numpy's `linalg.norm` and division (measured)."""
    import faiss

    x = np.ascontiguousarray(x, np.float32)
    faiss.normalize_L2(x)
    return x


# --- private -------------------------------------------------------------------------------


def current(store: Store, model_key: str | None, modality: str, kind: str) -> IndexInfo | None:
    """An index of this kind (`auto`: any) over exactly the current vectors of this modality, if one was built."""
    key = resolve_model_key(store, model_key)
    fp = fingerprint(store, shards_of(store, key, modality), modality)
    for info in _infos(store, key, modality):
        if info.fingerprint == fp and kind in ("auto", info.kind):
            return info
    return None


def _infos(store: Store, model_key: str, modality: str) -> list[IndexInfo]:
    """Every complete index of this model and modality in the store (found, not built: `built` False)."""
    infos = []
    for record in sorted((store.dataset_dir("indexes") / model_key).glob(f"{modality}-*/index.parquet")):
        if (record.parent / "ids.arrow").exists():
            info = read_info(record)
            info.built = False
            infos.append(info)
    return infos
