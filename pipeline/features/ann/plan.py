"""Which FAISS index to build for n vectors within a memory budget, and what it will hold.

Inner product on L2-normalised vectors (= cosine similarity). Like autofaiss does for
clip-retrieval, `auto` picks the most exact index whose build and search fit `max_memory`:
exact search (flat) below `EXACT_BELOW` vectors, then IVF over full vectors, IVF with 8-bit
scalar quantisation, IVF with product quantisation (the most sub-quantisers that fit). Product
codes have 4 bits a sub-quantiser (`PQ{m}x4`), which FAISS scans with SIMD shuffles held in
registers once they are packed in its fast-scan layout (`IndexIVFPQFastScan`): measured on 768-d
vectors (bench/index_d3.py), 10-30× the queries a second of 8-bit codes of the same bytes,
codebooks trained in a tenth of the time.

Time linear in rows: IVF lists hold about `LIST_ROWS` vectors whatever the store's size (up to the
lists a bounded training sample can place), so a query that scans a fixed number of lists costs
the same at 100k vectors as at 11.5M; from `HNSW_QUANTISER_FROM` lists on, the lists are found
through a graph over the centroids instead of a scan of them.

Memory bounded by the budget: `plan_index` estimates the peak of every phase of the build (the
training sample, the chunks in flight, the built index with a list number per vector) and of a
bulk search (a fast-scan copy); the plan must fit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, get_args

from pipeline.choices import IndexKind
from pipeline.errors import PipelineError

KINDS: tuple[str, ...] = get_args(IndexKind)
EXACT_BELOW = 100_000
DEFAULT_MAX_MEMORY = 4 * 2**30
ADD_ROWS = 32768  # most vectors converted to float32 and added at a time
LIST_ROWS = 1024  # vectors per IVF list aimed at: the work of scanning one list stays the same as rows grow
MAX_LISTS = 65536
MIN_TRAIN_PER_LIST = 32  # k-means rows per centroid at least (FAISS advises 39; the sample caps the lists)
TRAIN_PER_LIST = 64
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


# --- private -------------------------------------------------------------------------------


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


def _pq_sizes(dim: int) -> list[int]:
    """Sub-quantiser counts for PQ (8 bits each), largest first: divisors of dim, ≥ 2 values per sub-vector."""
    return [m for m in range(dim // 2, 0, -1) if dim % m == 0 and m in (1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48,
                                                                       56, 64, 96, 128, 192, 256, 384)]
