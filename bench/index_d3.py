"""Measure: the index plan for D3 (11.5M × 768-d, 4 GB), built for real over fewer vectors.

`plan_index` chooses lists, codec and training sample for D3 size; this builds exactly that index
(same lists, same codec, same training sample size) over `--rows` clustered synthetic vectors
(like bench_scale's), timing each phase and sampling the process' anonymous memory, so the D3
build can be extrapolated from measured per-vector rates and the memory estimate checked:

    python bench/index_d3.py --rows 1000000
    python bench/index_d3.py --rows 1000000 --factory IVF10922_HNSW32,PQ192np   # the 8-bit codes before

The vectors are drawn once into a float16 file under --work (page cache, as the store's are), so
re-ranking reads them like `OpenIndex.search` reads the store's. After the build it times searches
(`--queries` fresh vectors, k=10, with and without re-ranking) at the tuned breadth and at others.
`--plan-rows N` plans for N vectors instead of D3 (lists of D3's size at N: a query's work as at D3).
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

D3_ROWS = 11_500_000
DIM = 768


def anon_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--max-memory", type=int, default=4 * 2**30)
    parser.add_argument("--factory", help="build this FAISS factory instead of the plan's (same lists, sample)")
    parser.add_argument("--plan-rows", type=int, default=D3_ROWS, help="plan the index for this many vectors")
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--nprobe", type=int, nargs="*", default=[8, 16, 32, 64])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()

    import faiss

    from pipeline.features.ann import build as ann_build
    from pipeline.features.ann import plan as ann_plan
    from pipeline.features.ann import search as ann_search
    from pipeline.features.ann.coarse import train_coarse
    from pipeline.reporting import Silent
    from pipeline.store.layout import Store

    plan = ann_plan.plan_index(args.plan_rows, DIM, "auto", args.max_memory)
    if args.factory:
        plan = dataclasses.replace(plan, factory=args.factory, kind="ivf-pq" if "PQ" in args.factory else plan.kind)
    print(f"plan for {args.plan_rows:,}: {plan.factory}, {args.plan_rows / (plan.nlist or 1):.0f} vectors a list, "
          f"trained on "
          f"{plan.train_rows:,}; index {plan.bytes / 2**30:.2f} GiB, build peak {plan.build_bytes / 2**30:.2f} GiB "
          f"of {args.max_memory / 2**30:.1f} GiB")
    n = args.rows
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20_000, DIM)).astype(np.float32) * 2.0

    def rows(start: int, count: int) -> np.ndarray:
        r = np.random.default_rng(start)
        return centres[r.integers(0, len(centres), count)] + r.standard_normal((count, DIM), np.float32)

    store_file = args.work / f"index_d3-{n}.f16"
    if not store_file.exists() or store_file.stat().st_size != n * DIM * 2:
        out = np.lib.format.open_memmap(store_file.with_suffix(".tmp.npy"), "w+", np.float16, (n, DIM))
        for start in range(0, n, 65536):
            out[start:start + 65536] = ann_search.unit_rows(rows(start, min(65536, n - start)))
        out.flush()
        del out
        store_file.with_suffix(".tmp.npy").rename(store_file)
    vectors = np.load(store_file, mmap_mode="r")

    def chunks() -> Iterator[np.ndarray]:
        for start in range(0, n, plan.chunk_rows):
            yield np.asarray(vectors[start:start + plan.chunk_rows], np.float32)

    def gather(r: np.ndarray) -> np.ndarray:
        return np.asarray(vectors[np.sort(r)][np.argsort(np.argsort(r))], np.float32)

    def sample(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        # fresh draws of the same distribution, not rows of the index: no own row to exclude (-1)
        return np.full(count, -1), rows(10**9 + int(rng.integers(1 << 30)), count)

    peak = [anon_mb()]
    base = peak[0]

    def watch() -> None:
        while True:
            peak[0] = max(peak[0], anon_mb())
            time.sleep(0.01)

    threading.Thread(target=watch, daemon=True).start()
    marks: dict[str, float] = {}

    class Timer(Silent):
        def start(self, task: str, total: int | None = None, unit: str = "") -> None:
            marks[task] = time.perf_counter()

    t = time.perf_counter()
    x = ann_search.unit_rows(sample(plan.train_rows, rng)[1])
    t_sample = time.perf_counter() - t
    t = time.perf_counter()
    centroids = train_coarse(x, plan.nlist or 1, 0, faiss).centroids
    t_kmeans = time.perf_counter() - t
    del x, centroids
    started = time.perf_counter()
    config = ann_build.IndexConfig(Store(Path(".")), recall_queries=200)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    index, params = ann_build.build_in_memory(dataclasses.replace(plan), DIM, chunks, sample, n, config, Timer(), faiss,
                                       exact=gather)
    total = time.perf_counter() - started
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    build_cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    add_at = marks["index: add"]
    lists_at = marks.get("index: find lists", add_at)  # fast-scan: one pass, no list-finding pass
    train_s = lists_at - started
    tune_at = marks.get("index: tune search breadth", started + total)
    pass1, pass2 = add_at - lists_at, tune_at - add_at
    tuning = total - (tune_at - started)
    print(f"k-means alone (two-level, {plan.nlist} lists, {plan.train_rows:,} rows): {t_kmeans:.1f} s "
          f"(sample drawn in {t_sample:.1f} s)")
    print(f"{n:,} vectors: training {train_s:.1f} s, pass 1 (lists + exact recall truth) {pass1:.1f} s, "
          f"pass 2 (add) {pass2:.1f} s, tuning {tuning:.1f} s; recall@10 {params['recall_at_10']:.3f} "
          f"at nprobe {params['nprobe']}")
    per_vector = (pass1 + pass2) / n
    print(f"extrapolated D3 build: {train_s + per_vector * D3_ROWS + tuning:.0f} s wall (+ reading 17.7 GB of float16 "
          "vectors once, fast-scan, or twice)")
    codes = n * (plan.bytes - (plan.nlist or 0) * (DIM * 4 + 320)) / D3_ROWS
    print(f"build CPU {build_cpu:.0f} s (wall {total:.0f} s; the machine may be shared)")
    # fresh draws, as the recall queries
    queries = ann_search.unit_rows(sample(args.queries, np.random.default_rng(7))[1])
    search(index, params, n, gather, queries, args, faiss)
    print(f"peak anon {peak[0]:.0f} MB (baseline {base:.0f} MB); the plan's estimate at this size: "
          f"{(codes + n * 4 + 3 * plan.chunk_rows * DIM * 4) / 2**20:.0f} MB + centroids, training peak "
          f"{2 * plan.train_rows * DIM * 4 / 2**20:.0f} MB")


def search(index: object, params: dict, n: int, gather: object, queries: np.ndarray, args: argparse.Namespace,
           faiss: object) -> None:
    """Queries a CPU second and recall@10 (against exact search over the file) at several breadths."""
    from pipeline.features.ann import search as ann_search

    vectors = np.load(args.work / f"index_d3-{n}.f16", mmap_mode="r")
    truth = exact_neighbours((np.asarray(vectors[s:s + 65536], np.float32) for s in range(0, n, 65536)),
                             queries, ann_search.RECALL_K)
    own = np.full(len(queries), -1)
    breadths = sorted(set(args.nprobe) | {params["nprobe"]})
    for nprobe in breadths:
        ann_search.apply_breadth(index, "ivf-pq", {**params, "nprobe": nprobe}, faiss)
        line = f"nprobe {nprobe:>4}:"
        for rerank in sorted({0, params.get("rerank") or 0}):  # the codes' own ranking, then the tuned re-ranking
            c0, t0 = time.process_time(), time.perf_counter()
            if rerank:
                found = ann_search.reranked_search(index, queries, ann_search.RECALL_K, rerank, gather)[1]
            else:
                found = index.search(queries, ann_search.RECALL_K)[1]  # type: ignore[attr-defined]
            cpu, wall = time.process_time() - c0, time.perf_counter() - t0
            line += (f"  rerank {rerank:>3}: recall@10 {ann_search.recall_at(found, truth, own):.3f}, "
                     f"{len(queries) / cpu:,.0f} q per CPU s ({len(queries) / wall:,.0f} q/s wall)")
        print(line, flush=True)


def exact_neighbours(chunks: Iterator[np.ndarray], queries: np.ndarray, k: int) -> np.ndarray:
    """Row numbers of the exact k nearest rows by inner product, over rows given in chunks."""
    from pipeline.features.ann.search import TopK

    top = TopK(queries, k)
    start = 0
    for chunk in chunks:
        top.update(chunk, start)
        start += len(chunk)
    return top.rows


if __name__ == "__main__":
    main()
