"""Time every evaluation on the demo store: Table 1 (with intervals, alarms, seeds), generalisation,
perturb + encode of the derived images, robustness, and the run report; then the metrics bootstrap
alone on a million synthetic scores.

    python bench/bench_evaluation.py --root /tmp/eval-demo [--rows 100] [--seeds 2] [--epochs 8]

Prints the Markdown of each experiment and one line of seconds per step. The demo's CLIP has
random weights and its images are synthetic: the numbers test the pipeline, not CLIP.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

from pipeline.compositions import experiment
from pipeline.compositions.demo import DEMO_MODEL
from pipeline.compositions.experiment import ExperimentConfig
from pipeline.encoding.clip import ModelSpec
from pipeline.runs.config import TrainConfig
from pipeline.stages import encode, ingest, perturb, report, train
from pipeline.stages.encode import EncodeConfig
from pipeline.stages.ingest import IngestConfig
from pipeline.stages.perturb import PerturbConfig
from pipeline.stages.report import ReportConfig
from pipeline.stages.train import TrainJob
from pipeline.store.layout import Store
from pipeline.synthetic import make_d3
from trainer.metrics import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=Path("/tmp/eval-demo"))
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--million", type=int, default=1_000_000, help="scores for the bootstrap timing (0: skip)")
    args = parser.parse_args()
    timings: list[tuple[str, float]] = []

    def timed(name: str, fn):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        out = fn()
        timings.append((name, time.perf_counter() - started))
        return out

    if args.root.exists():
        shutil.rmtree(args.root)
    data = make_d3(args.root / "source", rows=args.rows)
    store = Store(args.root / "store")
    encode_config = EncodeConfig(store, ModelSpec(DEMO_MODEL), batch_size=32)
    timed("ingest", lambda: ingest.run(IngestConfig(data.parquet, "d3", store, real_images=data.real_images)))
    timed("encode", lambda: encode.run(encode_config))
    base = {"epochs": args.epochs, "batch_size": 64, "lr": 1e-2}
    t1 = timed(f"experiment table1 --seeds {args.seeds}",
               lambda: experiment.run(ExperimentConfig(store, "table1", base, seeds=args.seeds)))
    print(t1.markdown)
    t1_shared = timed("experiment table1 --pairing shared",
                      lambda: experiment.run(ExperimentConfig(store, "table1", {**base, "pairing": "shared"})))
    print(t1_shared.markdown)
    gen = timed("experiment generalization", lambda: experiment.run(ExperimentConfig(store, "generalization", base)))
    print(gen.markdown)
    ops = ("jpeg:90,75,50", "resize:0.5,0.25", "blur:1,2", "crop:0.8", "noise:0.02")
    done = timed("perturb (test split, 8 operations)", lambda: perturb.run(PerturbConfig(store, ops)))
    print(f"perturb: {done.derived} derived samples, {done.undecodable} undecodable sources")
    timed("encode (derived images only)", lambda: encode.run(encode_config))
    method = train.run(TrainJob(store, TrainConfig.from_dict({**base, "features": "image"}), skip_existing=True))
    rob = timed("experiment robustness", lambda: experiment.run(
        ExperimentConfig(store, "robustness", run_id=method.run_id)))
    print(rob.markdown)
    page = timed("report (run page with gallery)", lambda: report.run(ReportConfig(store, t1.rows[2][1].run_id)))
    print(f"pages: {t1.page} {t1_shared.page} {gen.page} {rob.page} {page.page}")
    if args.million:
        rng = np.random.default_rng(0)
        labels = rng.integers(0, 2, args.million)
        scores = (rng.normal(size=args.million) + labels).astype(np.float32)
        groups = np.arange(args.million) // 5
        timed(f"bootstrap of every metric, {args.million} scores, 200 replicates",
              lambda: evaluate(labels, scores, groups, rng=np.random.default_rng(1), n_boot=200))
    for name, seconds in timings:
        print(f"{seconds:8.1f} s  {name}")


if __name__ == "__main__":
    main()
