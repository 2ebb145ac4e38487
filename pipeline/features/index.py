"""`pipeline index build`: a FAISS index over one model's cached vectors, kept in the store.

Inner product on L2-normalised vectors (= cosine similarity). `auto` picks exact search (flat)
below `EXACT_BELOW` vectors and an IVF index above. Approximate indexes tune their search
breadth (IVF `nprobe`, HNSW `efSearch`) up to `target_recall` and report the recall@10 they
reach against exact search on sampled queries, excluding each query's own vector.

On disk: `indexes/<model_key>/<index_id>/` holds `index.faiss`, `ids.arrow` (content hash of
each row) and `index.parquet` (its row in the `indexes` view), written in that order, each
atomically. The index id carries a fingerprint of the embedding shards, so an index is rebuilt
exactly when the embeddings change.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import pyarrow.feather as feather
import pyarrow.parquet as pq

from pipeline.config import Validated, at_least, within
from pipeline.errors import PipelineError
from pipeline.features.vectors import Vectors, count_rows, fingerprint, load_vectors, shards_of
from pipeline.features.view import resolve_model_key
from pipeline.reporting import Reporter, Silent
from pipeline.store import catalog
from pipeline.store.atomic import atomic_write, write_parquet
from pipeline.store.layout import Store
from schemas import INDEX_IDS, INDEXES, from_columns, from_rows

Kind = Literal["auto", "flat", "ivf", "hnsw"]
KINDS: tuple[str, ...] = get_args(Kind)
EXACT_BELOW = 100_000
RECALL_K = 10


@dataclass(frozen=True)
class IndexConfig(Validated):
    store: Store
    model_key: str | None = None
    kind: Kind = "auto"
    modality: Literal["image", "text"] = "image"
    nlist: int | None = None  # IVF lists; default ≈ 4·√n
    hnsw_m: int = 32
    target_recall: float = 0.95
    recall_queries: int = 1000
    force: bool = False  # rebuild even if an index of these embeddings exists
    seed: int = 0
    wait: bool = True  # wait for another writer of the store instead of stopping

    def check(self) -> None:
        within(self, "target_recall", 0, 1, low_open=True)
        at_least(self, "nlist", 1)
        at_least(self, "recall_queries", 1)


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
    ids: np.ndarray

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Similarities and row numbers of the k nearest rows ([-1] where fewer exist)."""
        k = max(1, min(k, self.index.ntotal))
        sims, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return sims, rows


def resolve_kind(kind: str, n: int) -> str:
    if kind not in KINDS:
        raise PipelineError(f"--kind must be one of {', '.join(KINDS)}.")
    if kind == "auto":
        return "flat" if n < EXACT_BELOW else "ivf"
    return kind


def build_index(config: IndexConfig, reporter: Reporter | None = None, vectors: Vectors | None = None) -> IndexInfo:
    """Build (or find up to date) the index; `vectors`, if the caller already loaded them, saves a read.

    The caller holds the store's writer lock (`pipeline.store.lock.writing`)."""
    import faiss

    reporter = reporter or Silent()
    store = config.store
    model_key = resolve_model_key(store, config.model_key)
    shards = shards_of(store, model_key, config.modality)
    kind = resolve_kind(config.kind, count_rows(shards))
    fp = fingerprint(store, shards, config.modality, kind, config.nlist, config.hnsw_m, config.target_recall)
    index_id = f"{config.modality}-{kind}-{fp}"
    directory = store.dataset_dir("indexes") / model_key / index_id
    if (directory / "index.parquet").exists() and not config.force:
        info = read_info(directory / "index.parquet")
        info.built = False
        return info

    started = time.perf_counter()
    vecs = vectors if vectors is not None and vectors.source == tuple(shards) else load_vectors(shards)
    n, dim = vecs.matrix.shape
    reporter.start("index", n, "vectors")
    index, params = _make(kind, vecs.matrix, config, faiss)
    _add(index, vecs.matrix, reporter)
    recall: float | None = None
    by_breadth: dict[int, float] = {}
    if kind == "flat":
        recall = 1.0
    else:
        recall, by_breadth = _tune(index, kind, vecs, config, params, faiss)
    seconds = time.perf_counter() - started

    if directory.exists():
        shutil.rmtree(directory)
    atomic_write(directory / "index.faiss", lambda tmp: faiss.write_index(index, str(tmp)))
    ids = from_columns(INDEX_IDS, {"content_hash": vecs.ids.astype(str)})
    atomic_write(directory / "ids.arrow", lambda tmp: feather.write_feather(ids, str(tmp)))
    info = IndexInfo(index_id, model_key, config.modality, kind, params, n, dim, fp, recall, seconds,
                     directory, True, by_breadth)
    record = from_rows(INDEXES, [{
        "index_id": index_id, "model_key": model_key, "modality": config.modality, "kind": kind,
        "params_json": json.dumps(params), "vectors": n, "dim": dim, "fingerprint": fp,
        "recall_at_10": recall, "build_seconds": seconds, "path": store.relative(directory / "index.faiss"),
        "created_at": datetime.now(UTC),
    }])
    catalog.commit(store, [write_parquet(record, directory / "index.parquet")])
    _drop_superseded(store, directory, f"{config.modality}-{kind}-")
    return info


def open_index(store: Store, model_key: str | None, modality: str = "image", kind: str = "auto",
               reporter: Reporter | None = None, vectors: Vectors | None = None) -> OpenIndex:
    """The index of the current embeddings (built first if there is none)."""
    import faiss

    info = build_index(IndexConfig(store, model_key, kind=kind, modality=modality), reporter, vectors)
    index = faiss.read_index(str(info.directory / "index.faiss"))
    _apply_breadth(index, info.kind, info.params, faiss)
    ids = feather.read_table(str(info.directory / "ids.arrow")).column(0).to_numpy(zero_copy_only=False)
    return OpenIndex(info, index, ids)


def in_memory_index(matrix: np.ndarray, kind: str = "auto", seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """An index over `matrix` held in memory only (e.g. the kNN detector's training vectors)."""
    import faiss

    kind = resolve_kind(kind, matrix.shape[0])
    config = IndexConfig(Store(Path(".")), kind=kind, seed=seed)  # type: ignore[arg-type]
    index, params = _make(kind, matrix, config, faiss)
    _add(index, matrix, Silent())
    if kind != "flat":
        params["recall_at_10"] = _tune(index, kind, Vectors(np.arange(matrix.shape[0]), matrix), config, params,
                                       faiss)[0]
    return index, params


def read_info(path: Path) -> IndexInfo:
    row = pq.read_table(path).to_pylist()[0]
    return IndexInfo(row["index_id"], row["model_key"], row["modality"], row["kind"],
                     json.loads(row["params_json"]), row["vectors"], row["dim"], row["fingerprint"],
                     row["recall_at_10"], row["build_seconds"], path.parent)


def exact_neighbours(matrix: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Row numbers of the exact k nearest rows by inner product (FAISS flat search)."""
    import faiss

    flat = faiss.IndexFlatIP(matrix.shape[1])
    flat.add(matrix)
    return flat.search(np.ascontiguousarray(queries), min(k, matrix.shape[0]))[1]


def recall_at(approx: np.ndarray, exact: np.ndarray, own: np.ndarray, k: int = RECALL_K) -> float:
    """Mean fraction of each query's exact top-k (its own row excluded) found in the approximate top-k."""
    hits = []
    for a, e, me in zip(approx, exact, own, strict=True):
        truth = [r for r in e if r != me and r >= 0][:k]
        found = [r for r in a if r != me and r >= 0][:k]
        if truth:
            hits.append(len(set(truth) & set(found)) / len(truth))
    return float(np.mean(hits)) if hits else 1.0


# --- private -------------------------------------------------------------------------------


def _make(kind: str, matrix: np.ndarray, config: IndexConfig, faiss: Any) -> tuple[Any, dict[str, Any]]:
    n, dim = matrix.shape
    if kind == "flat":
        return faiss.IndexFlatIP(dim), {"metric": "inner_product"}
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = max(40, 2 * config.hnsw_m)
        return index, {"metric": "inner_product", "M": config.hnsw_m, "efConstruction": index.hnsw.efConstruction}
    nlist = config.nlist or int(min(65536, max(1, 4 * math.sqrt(n))))
    nlist = max(1, min(nlist, n // 39 or 1))  # FAISS wants ≥ 39 training points per list
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(config.seed)
    train_rows = min(n, 64 * nlist)
    sample = matrix[np.sort(rng.choice(n, train_rows, replace=False))] if train_rows < n else matrix
    index.train(sample)
    return index, {"metric": "inner_product", "nlist": nlist, "trained_on": int(train_rows)}


def _add(index: Any, matrix: np.ndarray, reporter: Reporter, chunk: int = 65536) -> None:
    for start in range(0, matrix.shape[0], chunk):
        part = matrix[start:start + chunk]
        index.add(part)
        reporter.advance("index", part.shape[0])


def _drop_superseded(store: Store, current: Path, prefix: str) -> None:
    """Indexes of older embeddings (same modality and kind) leave the store and the catalog."""
    stale = [d for d in current.parent.iterdir() if d.is_dir() and d.name.startswith(prefix) and d != current]
    if stale:
        catalog.forget(store, [d / "index.parquet" for d in stale])
    for d in stale:
        (d / "index.parquet").unlink(missing_ok=True)  # first, so a crash leaves no visible record
        shutil.rmtree(d)


def _breadths(kind: str, params: dict[str, Any]) -> list[int]:
    if kind == "ivf":
        nlist = params["nlist"]
        return sorted({min(nlist, 2**i) for i in range(0, 17) if 2 ** (i - 1) < nlist})
    return [16, 32, 64, 128, 256, 512, 1024]


def _apply_breadth(index: Any, kind: str, params: dict[str, Any], faiss: Any) -> None:
    if kind == "ivf":
        faiss.extract_index_ivf(index).nprobe = params["nprobe"]
    elif kind == "hnsw":
        index.hnsw.efSearch = params["efSearch"]


def _tune(index: Any, kind: str, vecs: Vectors, config: IndexConfig, params: dict[str, Any],
          faiss: Any) -> tuple[float, dict[int, float]]:
    """Smallest search breadth reaching the target recall@10 (or the widest tried); its recall."""
    n = vecs.matrix.shape[0]
    rng = np.random.default_rng(config.seed + 1)
    own = np.sort(rng.choice(n, min(n, config.recall_queries), replace=False))
    queries = vecs.matrix[own]
    exact = exact_neighbours(vecs.matrix, queries, RECALL_K + 1)
    name = "nprobe" if kind == "ivf" else "efSearch"
    by_breadth: dict[int, float] = {}
    for breadth in _breadths(kind, params):
        params[name] = breadth
        _apply_breadth(index, kind, params, faiss)
        approx = index.search(queries, RECALL_K + 1)[1]
        by_breadth[breadth] = recall_at(approx, exact, own)
        if by_breadth[breadth] >= config.target_recall:
            break
    return by_breadth[params[name]], by_breadth
