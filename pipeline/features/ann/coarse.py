"""The coarse quantiser in two levels: which IVF lists a vector falls in, for about 2√lists products.

An index with many lists trains its centroids by spherical k-means in two levels (`train_coarse`,
as FAISS' `two_level_clustering`): √lists groups of the training sample, then the rows of each
group split among its share of the lists. The lists of a group are contiguous, so the group sizes
(`params["groups"]`) say where each group starts. A vector's nearest lists are then looked for
among the lists of its `TOP_GROUPS` nearest groups (`Coarse.nearest`): groups + TOP_GROUPS × lists
per group inner products instead of one per list, each set of them a matrix product (BLAS).

Why two levels and not a graph over the centroids (FAISS' `IVF…_HNSW32`): a graph search is many
small dot products, about as costly as a matrix-product scan of every centroid up to tens of
thousands of lists (measured on 768-d vectors, 10,922 lists: ~250 µs a vector either way), while
two levels cost a few hundred centroids' worth of the same matrix products. The price is that a
vector near the border of its group may be given its second-nearest list; the build measures
recall@10 as searched, so what that costs is in the recall it reports.

A group's own centroid is the normalised mean of its lists' centroids, recomputed from the index
file: nothing is stored beyond the group sizes. An index with one group (few lists) is scanned whole.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

TWO_LEVEL_FROM = 256  # lists: above this many, k-means and assignment in two levels
KMEANS_ITERATIONS = 20
TOP_GROUPS = 3  # groups whose lists are searched for a vector's nearest lists
_BLOCK = 16384  # vectors whose group products are held at a time


@dataclass(frozen=True)
class Coarse:
    """Unit centroids of the lists [lists, dim], in groups of contiguous lists (`starts`: where each
    group starts, and the end), with each group's centroid [groups, dim]."""

    centroids: np.ndarray
    starts: np.ndarray
    tops: np.ndarray

    @classmethod
    def of(cls, centroids: np.ndarray, sizes: list[int] | np.ndarray | None = None) -> Coarse:
        """The coarse quantiser of these centroids in groups of `sizes` lists (None: one group)."""
        centroids = np.ascontiguousarray(centroids, np.float32)
        sizes = np.asarray([len(centroids)] if sizes is None else sizes, np.int64)
        if sizes.sum() != len(centroids) or (sizes < 1).any():
            raise ValueError("the group sizes must add up to the number of centroids")
        starts = np.concatenate([[0], np.cumsum(sizes)])
        tops = np.stack([centroids[a:b].mean(axis=0) for a, b in zip(starts[:-1], starts[1:], strict=True)])
        tops /= np.maximum(np.linalg.norm(tops, axis=1, keepdims=True), 1e-12)
        return cls(centroids, starts, np.ascontiguousarray(tops, np.float32))

    @classmethod
    def of_index(cls, index: Any, params: dict[str, Any], faiss: Any) -> Coarse:
        """The coarse quantiser of a built IVF index (its centroids read back from its quantiser)."""
        ivf = faiss.extract_index_ivf(index)
        centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
        return cls.of(centroids, params.get("groups"))

    @property
    def sizes(self) -> list[int]:
        return np.diff(self.starts).tolist()

    def nearest(self, x: np.ndarray, k: int = 1, faiss: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Inner products and numbers of the k nearest lists of each unit row of x (best first),
        among the lists of its TOP_GROUPS nearest groups (every list, with one group)."""
        if faiss is None:
            import faiss
        x = np.ascontiguousarray(x, np.float32)
        k = min(k, len(self.centroids))
        if len(self.tops) == 1:
            return faiss.knn(x, self.centroids, k, faiss.METRIC_INNER_PRODUCT)
        sims = np.full((len(x), k), -np.inf, np.float32)
        lists = np.full((len(x), k), -1, np.int64)
        with faiss_threads(faiss, 1):  # small products (see faiss_threads)
            for lo in range(0, len(x), _BLOCK):
                block = x[lo:lo + _BLOCK]
                sims[lo:lo + len(block)], lists[lo:lo + len(block)] = self._nearest(block, k, faiss)
        return sims, lists

    def _nearest(self, x: np.ndarray, k: int, faiss: Any) -> tuple[np.ndarray, np.ndarray]:
        groups = len(self.tops)
        # enough groups that their lists hold k at least
        near = min(groups, max(TOP_GROUPS, math.ceil(k / int(np.diff(self.starts).min()))))
        chosen = faiss.knn(x, self.tops, near, faiss.METRIC_INNER_PRODUCT)[1]
        # rows by group, so each group's lists meet all the rows that look at them in one product
        flat = chosen.ravel()
        order = np.argsort(flat, kind="stable")
        bounds = np.searchsorted(flat[order], np.arange(groups + 1))
        best_s = np.full((len(x), k), -np.inf, np.float32)
        best_i = np.full((len(x), k), -1, np.int64)
        for g in range(groups):
            rows = order[bounds[g]:bounds[g + 1]] // near
            if not len(rows):
                continue
            a, b = self.starts[g], self.starts[g + 1]
            s, i = faiss.knn(x[rows], self.centroids[a:b], min(k, b - a), faiss.METRIC_INNER_PRODUCT)
            if k == 1:  # the common case (adding vectors): a comparison, not a merge
                better = s[:, 0] > best_s[rows, 0]
                best_s[rows[better], 0], best_i[rows[better], 0] = s[better, 0], i[better, 0] + a
                continue
            both_s = np.concatenate([best_s[rows], s], axis=1)
            both_i = np.concatenate([best_i[rows], i + a], axis=1)
            pick = np.argsort(-both_s, axis=1, kind="stable")[:, :k]
            best_s[rows] = np.take_along_axis(both_s, pick, 1)
            best_i[rows] = np.take_along_axis(both_i, pick, 1)
        return best_s, best_i


def train_coarse(x: np.ndarray, nlist: int, seed: int = 0, faiss: Any = None) -> Coarse:
    """`nlist` unit centroids of the unit rows of x by spherical k-means, in groups.

    Above TWO_LEVEL_FROM lists, in two levels: √nlist centroids, then the rows of each split among
    that many centroids as it has rows (largest remainders). An iteration then costs rows × 2√nlist ×
    dim instead of rows × nlist × dim: ten thousand lists train in seconds, not hours."""
    if faiss is None:
        import faiss
    dim = x.shape[1]

    def kmeans(rows: np.ndarray, k: int, s: int) -> np.ndarray:
        km = faiss.Kmeans(dim, k, niter=KMEANS_ITERATIONS, spherical=True, seed=s,
                          max_points_per_centroid=256, min_points_per_centroid=1)
        km.train(np.ascontiguousarray(rows))
        return np.asarray(km.centroids, np.float32)

    with faiss_threads(faiss, 1):  # small products (see faiss_threads)
        if nlist <= TWO_LEVEL_FROM:
            return Coarse.of(kmeans(x, nlist, seed))
        top = kmeans(x, round(math.sqrt(nlist)), seed)
        group = faiss.knn(x, top, 1, faiss.METRIC_INNER_PRODUCT)[1][:, 0]
        shares = _shares(nlist, np.bincount(group, minlength=len(top)))
        parts = [(kmeans(x[group == g], int(k), seed + 1 + g), int(k)) for g, k in enumerate(shares) if k]
    return Coarse.of(np.concatenate([c for c, _ in parts]), [k for _, k in parts])


@contextmanager
def faiss_threads(faiss: Any, threads: int) -> Iterator[None]:
    """FAISS' OpenMP threads set to `threads` inside, put back after.

    Products of a few hundred rows by a few dozen centroids (a group's k-means, a block's lists) are
    too small for FAISS' threads, which wait for each other spinning: measured on this 2-core machine,
    shared, the same products took 2.7 CPU-s in one thread and 10.7 in two (k-means in two levels of
    160k rows into 4,000 lists), 0.86 against 3.9 (exact top-11 of 260 queries over 262k rows)."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, threads))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


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
