"""How deep a 4-bit PQ index must re-rank where its codes, not its lists, limit recall@10.

Vectors like bench_scale's D3 store: clusters of `--per-cluster` vectors around random centres with
isotropic noise, so a vector's ten neighbours are barely closer than the rest of its cluster. The
same IVF lists (two-level spherical k-means, as `pipeline index build`) hold full vectors, 4-bit
codes (`PQ{dim/2}x4`, what the planner picks at D3's size), the same codes packed for FAISS'
fast scan (`x4fs`, distances rounded to 8 bits) and 8-bit codes of the same bytes (`PQ{dim/4}x8`);
recall@10 against exact search (own row excluded) is printed for each breadth and re-rank depth,
then what the planner's tuning chooses (`build_in_memory`, target 0.95).

    python bench/index_rerank.py --rows 300000            # about 5 minutes on 2 cores

Measured (300k rows, clusters of 5,750 as at D3's 11.5M, 768-d, 200 queries, nprobe 16 of 292):
lists alone 1.0; 4-bit codes re-ranking 100 / 400 / 1,600: 0.78 / 0.97 / 1.0 (packed for fast-scan:
0.38 / 0.70 / 0.95); 8-bit codes: 0.83 / 0.98 / 1.0, built in 193 s against 5.8 s. The planner's
tuning chose nprobe 8 and 400 candidates: 0.958.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--per-cluster", type=int, default=5750, help="vectors per centre (D3 store: 5,750)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--no-8bit", action="store_true", help="skip the 8-bit codes (30× slower to build)")
    args = parser.parse_args()

    import faiss

    from pipeline.features.ann import build as ann_build
    from pipeline.features.ann import plan as ann_plan
    from pipeline.features.ann import search as ann_search
    from pipeline.features.ann.coarse import train_coarse
    from pipeline.store.layout import Store

    n, d = args.rows, args.dim
    rng = np.random.default_rng(0)
    centres = np.random.default_rng(97).normal(size=(max(1, n // args.per_cluster), d)).astype(np.float32) * 2
    x = (centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, d), np.float32))
    x = x.astype(np.float16).astype(np.float32)  # as the store keeps them
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    plan = ann_plan.plan_index(n, d, "ivf-pq", 2**34)
    assert plan.nlist is not None
    own = rng.choice(n, args.queries, replace=False)
    queries = x[own]
    truth = faiss.knn(queries, x, ann_search.RECALL_K + 1, faiss.METRIC_INNER_PRODUCT)[1]
    sample = x[rng.choice(n, min(n, plan.train_rows), replace=False)]
    centroids = train_coarse(sample, plan.nlist, 0, faiss).centroids
    gather = lambda rows: x[rows]  # noqa: E731
    breadths = sorted({b for b in (1, 4, 16, 64, plan.nlist // 4) if b <= plan.nlist})
    print(f"{n} vectors, {d}-d, {len(centres)} clusters, {plan.nlist} lists, {args.queries} queries")
    codecs = ["Flat", f"PQ{d // 2}x4", f"PQ{d // 2}x4fs"] + ([] if args.no_8bit else [f"PQ{d // 4}x8"])
    for codec in codecs:
        index = faiss.index_factory(d, f"IVF{plan.nlist},{codec}", faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        ivf.quantizer.add(centroids)
        if isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQ):
            faiss.downcast_index(ivf).do_polysemous_training = False
        started = time.perf_counter()
        index.train(sample)
        index.add(x)
        print(f"{codec}: built in {time.perf_counter() - started:.1f} s")
        depths = [None] if codec == "Flat" else [100, 400, 1600]
        for breadth in breadths:
            ivf.nprobe = breadth
            cells = []
            for depth in depths:
                if depth is None:
                    found = index.search(queries, ann_search.RECALL_K + 1)[1]
                else:
                    found = ann_search.reranked_search(index, queries, ann_search.RECALL_K + 1, depth, gather)[1]
                cells.append(f"{'lists' if depth is None else depth}: {ann_search.recall_at(found, truth, own):.3f}")
            print(f"  nprobe {breadth:5d}  " + "  ".join(cells))

    def sampled(count: int, r: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        rows = np.sort(r.choice(n, min(count, n), replace=False))
        return rows, x[rows]

    started = time.perf_counter()
    params = ann_build.build_in_memory(plan, d, lambda: (x[i:i + 32768] for i in range(0, n, 32768)), sampled, n,
                                ann_build.IndexConfig(Store(Path(".")), recall_queries=args.queries), exact=gather)[1]
    print(f"planner ({plan.factory}, {time.perf_counter() - started:.0f} s): nprobe {params['nprobe']}, "
          f"re-rank {params['rerank']}, recall@10 {params['recall_at_10']:.3f}; by breadth "
          f"{params['recall_by_breadth']}; by depth {params['recall_by_rerank']}")


if __name__ == "__main__":
    main()
