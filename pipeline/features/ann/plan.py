"""Which FAISS index to build for n vectors within a memory budget, and what it will hold.

Inner product on L2-normalised vectors (= cosine similarity). Like autofaiss does for
clip-retrieval, `auto` picks the most exact index whose build and search fit `max_memory`:
exact search (flat) below `EXACT_BELOW` vectors, then IVF over full vectors, IVF with 8-bit
scalar quantisation, IVF with product quantisation (the most sub-quantisers that fit). Product
codes have 4 bits a sub-quantiser (`PQ{m}x4`), which FAISS scans with SIMD shuffles held in
registers once they are packed in its fast-scan layout (`IndexIVFPQFastScan`): measured on 768-d
vectors (bench/index_d3.py), 10-30× the queries a second of 8-bit codes of the same bytes,
codebooks trained in a tenth of the time.

Lists grow like √n: `LISTS_PER_ROOT`·√n of them (the low end of FAISS' guidance, 4√n to 16√n),
up to what a bounded training sample can place. A search scans the centroids and a few lists of
√n / 4 vectors, so its cost grows like √n. A build finds each vector's list among the lists of its
nearest groups of lists (`ann.coarse`: about 2·√lists products, not one per list), so it costs
about rows × n^¼: with a list per 1,024 vectors, found by a scan of every centroid, as before, a
build cost rows × rows / 1,024. From `HNSW_QUANTISER_FROM` lists on (16.7M vectors), a single
query finds its lists through a graph over the centroids instead of a scan of them.

Memory bounded by the budget: `plan_index` estimates the peak of every phase of the build (the
training sample, the chunks in flight, the built index with a list number per vector) and of a
bulk search (a fast-scan copy); the plan must fit.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, get_args

from pipeline.choices import IndexKind
from pipeline.errors import PipelineError

KINDS: tuple[str, ...] = get_args(IndexKind)
EXACT_BELOW = 100_000
DEFAULT_MAX_MEMORY = 4 * 2**30
# most vectors converted to float32 and added at a time: at 768-d a 48 MB chunk, under the 64 MB up to which
# the build keeps freed buffers on the heap (`allocator.step_buffers_reused`), so chunk after chunk reuses
# them instead of mapping and zeroing new pages (32,768 rows and pages mapped afresh: 70 / 231 CPU-s at
# 2M / 5M; 16,384 and reused: 52 / 163, bench_scale `index rebuild`)
ADD_ROWS = 16384
LISTS_PER_ROOT = 4.0  # IVF lists per √n: 4,000 lists of 250 vectors at 1M, 13,565 of 848 at 11.5M
MAX_LISTS = 65536
MIN_TRAIN_PER_LIST = 32  # k-means rows per centroid at least (FAISS advises 39; the sample caps the lists)
TRAIN_PER_LIST = 40  # k-means rows per centroid aimed at (FAISS warns below 39)
CODEC_TRAIN_ROWS = 65536  # PQ codebooks need 256 rows per code at least: train on this many whatever nlist
# lists: from this many a graph finds a vector's lists instead of a scan of every centroid. Measured
# (768-d unit queries near 10,922 random unit centroids, batches of 4,000, 2 shared cores): to add, a
# vector's one list costs ~250 µs of CPU either way; to search, 8 lists cost 257 µs by the scan (exact)
# against 815 µs by an HNSW32 graph at efSearch 64 (what apply_breadth sets), which found 61% of them
# (ef 16: 254 µs, 35%). With fast-scan codes the lists cost less to scan than to find: the scan up to
# D3's 10,922 lists, a graph only beyond 16,384 (not measured there).
HNSW_QUANTISER_FROM = 16384
_HNSW_LINK_BYTES = 32 * 2 * 4 + 64  # per centroid in an HNSW32 graph: level-0 links, upper levels, bookkeeping
# shares of the budget: the built index and one list number per vector; the chunks in flight (a float32
# chunk, its unit copy, FAISS' residuals); the training sample and its residuals (before any vector is added).
# What is left (15%) is the interpreter and the libraries.
_INDEX_SHARE = 0.7
_CHUNK_SHARE = 0.1
_TRAIN_SHARE = 0.5
_USABLE = _INDEX_SHARE + _CHUNK_SHARE + 0.05


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


def parse_memory(text: str) -> int:
    """'4GB', '512MB', '2.5GiB' or a number of bytes → bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*", text.upper())
    if not match:
        raise PipelineError(f"--max-memory must look like 4GB or 512MB, not {text!r}.")
    number, unit = float(match.group(1)), match.group(2)
    return int(number * 1024 ** " KMGT".index(unit or " "))


def plan_index(n: int, dim: int, kind: str = "auto", max_memory: int = DEFAULT_MAX_MEMORY,
               nlist: int | None = None, hnsw_m: int = 32, in_memory: bool = False) -> Plan:
    """The index for n vectors within `max_memory`: the requested kind, or (auto) the most exact that fits.

    4-bit PQ codes are built in the plain layout, which a written index maps, and packed in FAISS'
    fast-scan layout when searched in bulk (`search.Bulk`). An index kept `in_memory` by its
    builder (the kNN detector) holds both at once, so both count."""
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
    codecs += [("ivf-pq", f"PQ{m}x4", (m + 1) // 2) for m in _pq_sizes(dim)]
    wanted = [c for c in codecs if kind in ("auto", c[0])]
    plans = []
    for name, codec, per_vector in wanted:
        size = n * (per_vector + 8) + centroids  # codes and 8-byte ids in the lists, the centroids
        held = size + n * 4  # two passes hold the list number of every vector
        # a bulk search of 4-bit codes holds their fast-scan copy: blocks of 32 codes, ids
        searched = int(1.15 * (size + lists * 32 * per_vector)) if codec.endswith("x4") else size
        if in_memory and codec.endswith("x4"):
            searched += size  # beside the plain codes it was packed from
        build = max(training, held + buffers, searched if in_memory else 0)
        plans.append(Plan(name, f"{quantiser},{codec}", lists, train_rows, size, build, chunk))
        if build <= max_memory * _USABLE and max(held, searched) <= max_memory * _INDEX_SHARE:
            return plans[-1]
    return _fits(plans[-1], max_memory)


# --- private -------------------------------------------------------------------------------


def _fits(plan: Plan, max_memory: int) -> Plan:
    if plan.build_bytes > max_memory * _USABLE:
        need = plan.build_bytes / _USABLE / 2**30
        raise PipelineError(f"A {plan.kind} index of these vectors needs about {need:.1f} GB to build; raise "
                            "--max-memory or choose --kind auto.")
    return plan


def _lists(n: int, dim: int, max_memory: int, nlist: int | None) -> tuple[int, int]:
    """IVF list count and training-sample size: LISTS_PER_ROOT·√n lists, as long as the sample
    (≥ MIN_TRAIN_PER_LIST rows a list, with its residuals) fits its share of the budget."""
    fit_rows = max(1, int(max_memory * _TRAIN_SHARE) // (2 * dim * 4))
    lists = nlist or min(MAX_LISTS, max(1, round(LISTS_PER_ROOT * math.sqrt(n))))
    lists = max(1, min(lists, n // MIN_TRAIN_PER_LIST or 1, fit_rows // MIN_TRAIN_PER_LIST or 1))
    return lists, min(n, fit_rows, max(TRAIN_PER_LIST * lists, CODEC_TRAIN_ROWS))


def _chunk_rows(dim: int, max_memory: int) -> int:
    return max(1024, min(ADD_ROWS, int(max_memory * _CHUNK_SHARE) // (3 * dim * 4)))


def _pq_sizes(dim: int) -> list[int]:
    """Sub-quantiser counts for PQ (8 bits each), largest first: divisors of dim, ≥ 2 values per sub-vector."""
    return [m for m in range(dim // 2, 0, -1) if dim % m == 0 and m in (1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48,
                                                                       56, 64, 96, 128, 192, 256, 384)]
