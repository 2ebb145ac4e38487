"""Measure: how many IVF lists must `pipeline leaks` search to find the near-duplicates exact search finds?

Builds a D3-shaped store like bench_scale.py (clustered 768-d vectors, import-features) and plants
near-duplicates across splits: the real image of `--pairs` val/test groups is replaced by a copy of an
image (real or generated) of a training group, turned away from it by a random angle, uniform in
cosine similarity between 0.95 and 0.995. Then `pipeline leaks` runs once with exact search (the
truth: every pair at ≥ 0.95, planted or not) and once per --nprobe over the store's IVF index, and
prints the recall of the pairs and the scan time.

    python bench/leak_recall.py --rows 100000 --work /tmp/leak-100k
    python bench/leak_recall.py --rows 100000 --work /tmp/leak-100k --kind ivf-pq --nlist 98

With --kind ivf-pq it also prints how far the codes' scores of the true pairs fall from their exact
similarity (what LEAK_MARGIN must cover), and the scan's CPU seconds.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import FILE_ROWS, KEY, write_sources  # noqa: E402


def plant(h5_dir: Path, pairs: int, seed: int = 1) -> int:
    """Replace the real image of `pairs` val/test groups by a near-copy of a training group's image."""
    import h5py

    from pipeline.sources.ledger import assign_split

    rng = np.random.default_rng(seed)
    files = sorted(h5_dir.glob("*.h5"))
    where = [(f, i) for f in files for i in range(FILE_ROWS)]
    split = {(f, i): assign_split(f"h5:{f.stem}:{i}", (0.8, 0.1, 0.1), "0") for f, i in where}
    later = [w for w in where if split[w] != "train"]
    train = [w for w in where if split[w] == "train"]
    targets = [later[j] for j in rng.choice(len(later), min(pairs, len(later)), replace=False)]
    sources = [train[j] for j in rng.choice(len(train), len(targets), replace=False)]
    handles = {f: h5py.File(f, "r+") for f in files}
    try:
        for (tf, ti), (sf, si) in zip(targets, sources, strict=True):
            member = ["real", "image_gen0", "image_gen1", "image_gen2", "image_gen3"][rng.integers(0, 5)]
            original = handles[sf][member][si].astype(np.float64)
            u = original / np.linalg.norm(original)
            w = rng.normal(size=u.shape)
            w -= (w @ u) * u
            w /= np.linalg.norm(w)
            cos = rng.uniform(0.95, 0.995)
            turned = (cos * u + np.sqrt(1 - cos**2) * w) * np.linalg.norm(original)
            handles[tf]["real"][ti] = turned.astype(np.float16)
    finally:
        for h in handles.values():
            h.close()
    return len(targets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000, help="samples (a multiple of 5)")
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--kind", default="auto", help="index kind to build (auto, ivf, ivf-sq8, ivf-pq)")
    parser.add_argument("--nlist", type=int)
    args = parser.parse_args()

    from pipeline.features.ann.build import IndexConfig
    from pipeline.stages.import_features import ImportConfig
    from pipeline.stages.import_features import run as import_features
    from pipeline.stages.index import run as build_index
    from pipeline.stages.leaks import LeakConfig
    from pipeline.stages.leaks import run as leaks
    from pipeline.store.layout import Store

    store = Store(args.work / "store")
    if not (args.work / "store").exists():
        shutil.rmtree(args.work / "h5", ignore_errors=True)
        write_sources(args.work / "h5", args.rows // 5)
        planted = plant(args.work / "h5", args.pairs)
        import_features(ImportConfig(args.work / "h5", "h5", store, KEY))
        shutil.rmtree(args.work / "h5")
        print(f"{args.rows:,} samples, {planted} planted near-duplicates")
    info = build_index(IndexConfig(store, KEY, kind=args.kind, nlist=args.nlist))
    print(f"index {info.params['factory']}, {info.vectors / info.params.get('nlist', 1):.0f} vectors a list, "
          f"tuned nprobe {info.params.get('nprobe')} (recall@10 {info.recall_at_10:.3f})")
    found = {}
    for nprobe in args.nprobe:
        t, cpu = time.perf_counter(), time.process_time()
        result = leaks(LeakConfig(store, KEY, nprobe=nprobe))
        pairs = {(r["sample_a"], r["sample_b"]) for r in result.pairs.select(["sample_a", "sample_b"]).to_pylist()}
        found[nprobe] = (pairs, time.perf_counter() - t, time.process_time() - cpu)
    # last: with a flat index in the store, `auto` would pick it
    t = time.perf_counter()
    exact = leaks(LeakConfig(store, KEY, exact_search=True))
    truth = {(r["sample_a"], r["sample_b"]) for r in exact.pairs.select(["sample_a", "sample_b"]).to_pylist()}
    print(f"exact: {len(truth)} pairs in {time.perf_counter() - t:.1f} s (flat index built first)")
    print(f"{'nprobe':>6} {'recall':>7} {'missed':>6} {'extra':>5} {'seconds':>8} {'CPU s':>7}")
    for nprobe, (got, seconds, cpu) in found.items():
        recall = len(got & truth) / max(1, len(truth))
        print(f"{nprobe:>6} {recall:>7.4f} {len(truth - got):>6} {len(got - truth):>5} {seconds:>8.1f} {cpu:>7.1f}",
              flush=True)
    score_gap(store, KEY, args.kind, truth, max(args.nprobe))


def score_gap(store: object, key: str, kind: str, truth: set[tuple[str, str]], nprobe: int) -> None:
    """How far the index's own scores (codes, no re-scoring) of the true pairs are from their exact similarity."""
    import faiss

    from pipeline.features.ann.build import open_index
    from pipeline.features.ann.search import apply_breadth
    from pipeline.features.vectors import normalise

    index = open_index(store, key, "image", kind)  # type: ignore[arg-type]
    if index.matrix is None or not truth:
        return
    apply_breadth(index.index, index.info.kind, {**index.info.params, "nprobe": nprobe}, faiss)
    row_of = {h: r for r, h in enumerate(index.ids.to_pylist())}
    a = np.array([row_of[p[0]] for p in sorted(truth)])
    b = np.array([row_of[p[1]] for p in sorted(truth)])
    queries = normalise(index.matrix.gather(b))
    sims, hits = index.search(queries, 11, rerank=False)
    exact = np.einsum("ij,ij->i", normalise(index.matrix.gather(a)), queries)
    at = hits == a[:, None]
    listed = at.any(1)
    gap = sims[at] - exact[listed]
    print(f"{index.info.params['factory']}: codes' scores of the {listed.sum()} of {len(truth)} true pairs in the "
          f"top 11 at nprobe {nprobe}: minus exact similarity, min {gap.min():+.4f}, max {gap.max():+.4f}, "
          f"|gap| 99.9th percentile {np.quantile(np.abs(gap), 0.999):.4f}")


if __name__ == "__main__":
    main()
