"""Benchmark: FAISS index build time, queries/s and recall on a store of synthetic 768-d vectors.

A store of `--rows` (default 1M) L2-normalised vectors, clustered like embeddings (1000 centres
plus Gaussian noise), written as ordinary float16 embedding shards; then, through the same code
path as `pipeline index build`: flat (exact), IVF and HNSW, each tuned to recall@10 ≥ 0.95 on
stored vectors. Queries are 1000 new vectors near stored ones (as a newly encoded image would
be); their recall@10 is measured against the flat index in the same run, and flat search's
GFLOP/s against the machine's fp32 matrix-product rate measured here too.

    python bench/bench_index.py [--rows 1000000] [--kinds flat,ivf,hnsw] [--noise 0.03]
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.features.ann.build import IndexConfig, open_index
from pipeline.features.ann.search import recall_at
from pipeline.stages.index import run as build_index
from pipeline.store import writes
from pipeline.store.atomic import write_parquet
from pipeline.store.layout import Store
from pipeline.store.writes import writing
from pipeline.synthetic import embeddings_table

DIM = 768
KEY = "synthetic-768"


def make_store(root: Path, rows: int, noise: float = 0.03, seed: int = 0) -> tuple[Store, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(1000, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    store = Store(root / "store")
    directory = store.embeddings_dir(KEY)
    shards = []
    for start in range(0, rows, 100_000):
        n = min(100_000, rows - start)
        x = centres[rng.integers(0, len(centres), n)] + rng.normal(0, noise, (n, DIM)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        hashes = [f"{i:064x}" for i in range(start, start + n)]
        shards.append(write_parquet(embeddings_table(KEY, "image", hashes, x, "float16"),
                                    store.new_shard(directory, "image")))
    with writing(store):
        writes.commit(store, shards)
    queries = centres[rng.integers(0, len(centres), 1000)] + rng.normal(0, noise, (1000, DIM)).astype(np.float32)
    return store, queries / np.linalg.norm(queries, axis=1, keepdims=True)


def matmul_gflops(n: int = 4096) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(3):
        a @ b
    return 3 * 2 * n**3 / (time.perf_counter() - t) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--kinds", default="flat,ivf,hnsw")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--noise", type=float, default=0.03,
                        help="σ around the 1000 centres: larger means overlapping clusters, a harder index")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    peak = matmul_gflops()
    print(f"fp32 matrix product, 4096²: {peak:.0f} GFLOP/s ({torch.get_num_threads()} threads)")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        store, queries = make_store(Path(tmp), args.rows, args.noise)
        print(f"store: {args.rows:,} × {DIM} float16 vectors (noise σ {args.noise}) written in "
              f"{time.perf_counter() - t:.1f} s")
        truth = None
        print(f"{'kind':<5} {'build s':>8} {'params':<44} {'recall@10 stored':>16} "
              f"{'recall@10 new':>13} {'queries/s':>10}")
        for kind in args.kinds.split(","):
            info = build_index(IndexConfig(store, KEY, kind=kind, recall_queries=1000))
            with writing(store):  # reuses the index just built
                index = open_index(store, KEY, kind=kind)
            index.search(queries[:10], args.k)  # warm
            t = time.perf_counter()
            _, found = index.search(queries, args.k)
            qps = len(queries) / (time.perf_counter() - t)
            if kind == "flat":
                truth = found
                gflops = qps * 2 * args.rows * DIM / 1e9
                extra = f"  (flat search: {gflops:.0f} GFLOP/s = {gflops / peak:.0%} of the matmul rate)"
            else:
                extra = ""
            recall_new = recall_at(found, truth, np.full(len(found), -1), args.k) if truth is not None else float("nan")
            params = {k: v for k, v in info.params.items() if k != "metric"}
            print(f"{kind:<5} {info.build_seconds:>8.1f} {str(params):<44} {info.recall_at_10:>16.3f} "
                  f"{recall_new:>13.3f} {qps:>10.0f}{extra}")
            del index
            gc.collect()


if __name__ == "__main__":
    main()
