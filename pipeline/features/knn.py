"""A k-nearest-neighbour detector: the similarity-weighted vote of the k closest training samples.

A strong, cheap baseline the paper does not have: no training, one FAISS index over the training
split's features (image, text or both, L2-normalised after concatenation). Each sample's score is
Σ w·y / Σ w over its k nearest training neighbours (itself excluded), w = exp((cos − 1)/τ), the
weighting of Wu et al. (2018); k is chosen by validation AUC.

Bounded memory, whatever the number of rows: the index is planned by `pipeline index build`'s
memory budget (exact, IVF, SQ8 or 4-bit PQ scanned in a fast-scan copy, with 4√n lists searched at
most KNN_NPROBE wide, each query's found in two levels: its cost grows like √n, `ann.plan`) and
filled in chunks from the feature stream; the
validation split is searched first to choose k (its labels and a score per k stay in memory: what
its AUC needs); then every split is searched a chunk at a time and each row's identity and chosen
score stream to a temporary Arrow file (scores to a raw one), both returned memory-mapped. What
grows with rows is a label byte per training row, and (compressed index) its matrix rows.

A compressed index (PQ, SQ8) only proposes neighbours: its best `2 (k + 1)` candidates are scored
again by exact inner product with the training features, gathered from the memory-mapped matrices
by the matrix rows each index row came from (8 bytes a training row), so votes weigh exact
similarities (the weight exp((cos − 1)/τ) magnifies a code's error of 0.03 by 1.5).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.choices import Features, InputNorm
from pipeline.features.ann.build import IndexConfig, build_in_memory
from pipeline.features.ann.plan import DEFAULT_MAX_MEMORY, plan_index
from pipeline.features.ann.search import Bulk, exact_scores
from pipeline.features.loader import Batch, FeatureLoader, LoaderConfig
from pipeline.features.vectors import normalise
from pipeline.features.view import FeatureTable
from pipeline.store.layout import Store
from trainer.metrics import roc_auc

KS = (1, 5, 10, 25, 50)
TAU = 0.07
# IVF lists searched per sample at most: every sample is a query, so the breadth sets the cost of the
# whole detector. Measured on bench_scale's 100k store (image+text, 1536-d, 78 lists): recall@10 0.67
# at 8 (0.97 needs 64, nearly every list), test AUC 0.525 against exact search's 0.537 (nprobe 1:
# 0.521), at 2.7 ms a sample, about what exact search of 80k training rows costs.
KNN_NPROBE = 8
# Cost of a sample at D3 size (9.2M training rows, 10,922 lists, fast-scan codes), measured in parts
# on 2 shared cores: finding its 8 lists ~0.26 ms of CPU (a scan of the centroids), scanning them
# ~0.1 ms, re-scoring 102 candidates ~0.75 ms (gathering float16 rows and converting them dominates).
COLUMNS = ("sample_id", "split", "label", "generator")
_ROWS_SCHEMA = pa.schema([("sample_id", pa.string()), ("split", pa.string()), ("label", pa.int8()),
                          ("generator", pa.string())])


@dataclass
class KnnFit:
    k: int
    scores: np.ndarray  # per row of the returned table, for the chosen k (memory-mapped)
    val_auc_by_k: dict[int, float]
    index_params: dict[str, Any]


def knn_scores(table: FeatureTable, features: Features, splits: tuple[str, ...], exclude: set[str],
               seed: int = 0, ks: tuple[int, ...] = KS, input_norm: InputNorm = "l2",
               max_memory: int = DEFAULT_MAX_MEMORY) -> tuple[pa.Table, KnnFit]:
    """Columns (sample_id, split, label, generator) of every row of `splits`, split by split, and the
    fitted vote. The table is memory-mapped from a file already unlinked: it costs page cache, not
    the process' own memory, and vanishes with its last reference."""
    probe = FeatureLoader(table, ("train",), LoaderConfig(features, input_norm=input_norm))
    n_train, in_dim = probe.count(), probe.in_dim
    plan = plan_index(n_train, in_dim, "auto", max_memory, in_memory=True)

    def loader(split: str) -> FeatureLoader:
        return FeatureLoader(table, (split,), LoaderConfig(features, plan.chunk_rows, input_norm=input_norm))

    labels = np.zeros(n_train, np.int8)  # of each index row: the training stream's order
    compressed = "PQ" in plan.factory or "SQ" in plan.factory
    # matrix rows of each index row (compressed index: to re-score candidates exactly)
    image_rows = np.zeros(n_train if compressed and features != "text" else 0, np.int64)
    text_rows = np.zeros(n_train if compressed and features != "image" else 0, np.int64)

    def chunks() -> Iterator[np.ndarray]:
        at = 0
        for b in loader("train").epoch(0):
            labels[at:at + len(b.y)] = b.y.numpy()
            if len(image_rows):
                image_rows[at:at + len(b.y)] = b.column("image_row")
            if len(text_rows):
                text_rows[at:at + len(b.y)] = b.column("text_row")
            at += len(b.y)
            yield b.x.numpy()

    def gather(index_rows: np.ndarray) -> np.ndarray:
        """The features of these index rows, as the loader gives them."""
        raw = input_norm == "raw"
        parts = [m.gather(r[index_rows], raw) for m, r in ((table.images, image_rows), (table.texts, text_rows))
                 if m is not None and len(r)]
        return normalise(np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0])

    def sample(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        # the stream is in a fixed pseudo-random order (the view's), so its first rows are a random sample
        taken, got = [], 0
        for x in chunks():
            taken.append(x[: count - got])
            got += len(taken[-1])
            if got >= count:
                break
        return np.arange(got), np.concatenate(taken)

    index, params = build_in_memory(plan, in_dim, chunks, sample, n_train,
                                    IndexConfig(Store(Path(".")), seed=seed, max_memory=max_memory),
                                    max_breadth=KNN_NPROBE, exact=gather if compressed else None)
    bulk = Bulk(index, params)  # every sample is a query: lists found in two levels, codes packed for fast scan
    k_max = max(1, min(max(ks), n_train - 1))
    candidates = sorted({min(k, k_max) for k in ks})

    def search(queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not compressed:
            sims, found = bulk.search(queries, k_max + 1)
            return sims, found
        found = bulk.search(queries, min(n_train, 2 * (k_max + 1)))[1]
        sims = exact_scores(queries, found, gather)
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k_max + 1]
        sims, found = np.take_along_axis(sims, order, 1), np.take_along_axis(found, order, 1)
        found[~np.isfinite(sims)] = -1
        return sims, found

    def votes(split: str, ks: list[int]) -> Iterator[tuple[Batch, dict[int, np.ndarray]]]:
        position = 0  # a training row's own index row: the stream above met it at this position
        for b in loader(split).epoch(0):
            sims, found = search(normalise(b.x.numpy()))
            own = np.arange(position, position + len(b.y))[:, None] if split == "train" else None
            position += len(b.y)
            yield b, _votes(sims, found, labels, own, ks)

    val_auc = _val_auc(votes("val", candidates), candidates, exclude)
    best = max(val_auc, key=lambda k: (-np.inf if np.isnan(val_auc[k]) else val_auc[k], -k))
    params.pop("recall_by_breadth", None)
    rows, scores = _stream_to_mapped_files(
        (b.rows, by_k[best]) for split in splits for b, by_k in votes(split, [best]))
    return rows, KnnFit(best, scores, val_auc, params)


def _val_auc(batches: Iterator[tuple[Batch, dict[int, np.ndarray]]], ks: list[int],
             exclude: set[str]) -> dict[int, float]:
    """Validation AUC of each k (excluded samples left out)."""
    left_out = pa.array(sorted(exclude), pa.string())
    labels, by_k = [], {k: [] for k in ks}  # type: ignore[var-annotated]
    for b, scores in batches:
        keep = ~pc.is_in(b.rows.column("sample_id"), value_set=left_out).to_numpy(zero_copy_only=False)
        labels.append(b.y.numpy()[keep].astype(np.int8))
        for k in ks:
            by_k[k].append(scores[k][keep])
    if not labels or not sum(len(y) for y in labels):
        return {k: float("nan") for k in ks}
    y = np.concatenate(labels)
    return {k: roc_auc(y, np.concatenate(by_k[k])) for k in ks}


def _stream_to_mapped_files(parts: Iterator[tuple[pa.Table, np.ndarray]]) -> tuple[pa.Table, np.ndarray]:
    """Rows (COLUMNS) to an uncompressed Arrow file and scores to a raw float32 file, batch by batch;
    both mapped back, and unlinked (the mappings outlive the files' names)."""
    with tempfile.TemporaryDirectory(prefix="pipeline-knn-") as tmp:
        rows_path, scores_path = Path(tmp) / "rows.arrow", Path(tmp) / "scores.f32"
        with pa.OSFile(str(rows_path), "wb") as sink, pa.ipc.new_file(sink, _ROWS_SCHEMA) as writer, \
                open(scores_path, "wb") as scores_out:
            for rows, scores in parts:
                writer.write_table(pa.Table.from_arrays(
                    [rows.column(c).cast(_ROWS_SCHEMA.field(c).type) for c in COLUMNS], schema=_ROWS_SCHEMA))
                scores_out.write(np.ascontiguousarray(scores, np.float32).tobytes())
        mapped = pa.ipc.open_file(pa.memory_map(str(rows_path))).read_all()
        empty = scores_path.stat().st_size == 0
        scores = np.zeros(0, np.float32) if empty else np.memmap(scores_path, np.float32, mode="r")
    return mapped, scores


def _votes(sims: np.ndarray, found: np.ndarray, labels: np.ndarray, own: np.ndarray | None,
           ks: list[int]) -> dict[int, np.ndarray]:
    """Σ w·y / Σ w over the first k valid neighbours (own row excluded) of each query, for each k."""
    valid = found >= 0
    if own is not None:
        valid &= found != own
    rank = np.cumsum(valid, axis=1) - 1
    weights = np.where(valid, np.exp((sims - 1.0) / TAU), 0.0)
    votes = np.where(valid, labels[np.maximum(found, 0)], 0)
    out = {}
    for k in ks:
        w = np.where(rank < k, weights, 0.0)
        out[k] = ((w * votes).sum(1) / np.maximum(w.sum(1), 1e-30)).astype(np.float32)
    return out
