"""Measure: the index plan for D3 (11.5M × 768-d, 4 GB), built for real over fewer vectors.

`plan_index` chooses lists, codec and training sample for D3 size; this builds exactly that index
(same lists, same codec, same training sample size) over `--rows` clustered synthetic vectors
(like bench_scale's), timing each phase and sampling the process' anonymous memory, so the D3
build can be extrapolated from measured per-vector rates and the memory estimate checked:

    python bench/index_d3.py --rows 1000000
"""

from __future__ import annotations

import argparse
import dataclasses
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
    args = parser.parse_args()

    import faiss

    from pipeline.features import index as ix
    from pipeline.reporting import Silent
    from pipeline.store.layout import Store

    plan = ix.plan_index(D3_ROWS, DIM, "auto", args.max_memory)
    print(f"D3 plan: {plan.factory}, {D3_ROWS / (plan.nlist or 1):.0f} vectors a list, trained on "
          f"{plan.train_rows:,}; index {plan.bytes / 2**30:.2f} GiB, build peak {plan.build_bytes / 2**30:.2f} GiB "
          f"of {args.max_memory / 2**30:.1f} GiB")
    n = args.rows
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20_000, DIM)).astype(np.float32) * 2.0

    def rows(start: int, count: int) -> np.ndarray:
        r = np.random.default_rng(start)
        return centres[r.integers(0, len(centres), count)] + r.standard_normal((count, DIM), np.float32)

    def chunks() -> Iterator[np.ndarray]:
        for start in range(0, n, plan.chunk_rows):
            yield rows(start, min(plan.chunk_rows, n - start))

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
    x = ix._unit(sample(plan.train_rows, rng)[1])
    t_sample = time.perf_counter() - t
    t = time.perf_counter()
    centroids = ix.coarse_centroids(x, plan.nlist or 1, 0, faiss)
    t_kmeans = time.perf_counter() - t
    del x, centroids
    started = time.perf_counter()
    config = ix.IndexConfig(Store(Path(".")), recall_queries=200)
    _, params = ix.build_in_memory(dataclasses.replace(plan), DIM, chunks, sample, n, config, Timer(), faiss)
    total = time.perf_counter() - started
    lists_at, add_at = marks["index: find lists"], marks["index: add"]
    train_s = lists_at - started
    pass1, pass2 = add_at - lists_at, total - (add_at - started)  # pass 2 includes the recall tuning
    print(f"k-means alone (two-level, {plan.nlist} lists, {plan.train_rows:,} rows): {t_kmeans:.1f} s "
          f"(sample drawn in {t_sample:.1f} s)")
    print(f"{n:,} vectors: training {train_s:.1f} s, pass 1 (lists + exact recall truth) {pass1:.1f} s, "
          f"pass 2 (add) + tuning {pass2:.1f} s; recall@10 {params['recall_at_10']:.3f} at nprobe {params['nprobe']}")
    per_vector = (pass1 + pass2) / n
    print(f"extrapolated D3 build: {train_s + per_vector * D3_ROWS:.0f} s (+ reading 17.7 GB of float16 vectors twice)")
    codes = n * (plan.bytes - (plan.nlist or 0) * (DIM * 4 + 320)) / D3_ROWS
    print(f"peak anon {peak[0]:.0f} MB (baseline {base:.0f} MB); the plan's estimate at this size: "
          f"{(codes + n * 4 + 3 * plan.chunk_rows * DIM * 4) / 2**20:.0f} MB + centroids, training peak "
          f"{2 * plan.train_rows * DIM * 4 / 2**20:.0f} MB")


if __name__ == "__main__":
    main()
