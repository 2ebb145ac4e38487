"""Benchmark: `encode --engine ray` against `--engine local` on the same cores, side by side in one run.

The same JPEGs are ingested once; each engine encodes its own copy of that store with the same model
(random weights: the FLOPs of the real one). A recording reporter timestamps every completed batch,
so for each engine it prints:
- startup: seconds from the call until the first encoded batch is back (Ray: starting the local
  instance, the probe of the store, actors importing torch and loading the model; local: the model),
- steady state: images/s after the first 20% of the images (the pipeline is full by then),
- wall: the whole call;
and the ratios ray/local. Each engine runs `--repeats` times, alternating; the best of each is kept.

    python bench/bench_ray.py [--images 384] [--model ViT-B-32] [--batch-size 32] [--repeats 1]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.encoding.clip import ModelSpec, load
from pipeline.stages.encode import EncodeConfig, run
from pipeline.stages.ingest import IngestConfig
from pipeline.stages.ingest import run as ingest
from pipeline.store.layout import Store


class Clock:
    """A Reporter that records (seconds since start, images done) at every advance."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.marks: list[tuple[float, int]] = []

    def start(self, task: str, total: int | None, unit: str) -> None:
        pass

    def advance(self, task: str, n: int) -> None:
        done = (self.marks[-1][1] if self.marks else 0) + n
        self.marks.append((time.perf_counter() - self.t0, done))

    def note(self, message: str) -> None:
        pass

    def event(self, kind: str, data: dict[str, Any]) -> None:
        pass


def make_jpegs(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    (root / "real").mkdir(parents=True)
    ramp = np.linspace(0, 255, 224)[None, :, None]
    for i in range(n):
        arr = np.clip(ramp * rng.uniform(0.2, 1.0, 3) + rng.normal(0, 20, (224, 224, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        (root / "real" / f"{i:06d}.jpg").write_bytes(buf.getvalue())


def measure(template: Store, engine: str, args: argparse.Namespace) -> dict[str, float]:
    store = Store(Path(tempfile.mkdtemp(prefix=f"bench-{engine}-")) / "store")
    shutil.copytree(template.root, store.root)
    config = EncodeConfig(store, ModelSpec(args.model), batch_size=args.batch_size, shard_rows=args.batch_size,
                          engine=engine)  # type: ignore[arg-type]
    clock = Clock()
    result = run(config, clock)
    wall = time.perf_counter() - clock.t0
    shutil.rmtree(store.root.parent)
    total = result.images_encoded + sum(result.quarantined.values())
    assert clock.marks and clock.marks[-1][1] == total, "every image must be reported"
    first = clock.marks[0][0]
    warm = next((t, n) for t, n in clock.marks if n >= 0.2 * total)
    end_t, end_n = clock.marks[-1]
    steady = (end_n - warm[1]) / (end_t - warm[0]) if end_t > warm[0] else float("nan")
    return {"startup": first, "steady": steady, "wall": wall, "images": total, "device": result.device}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    try:
        make_jpegs(root / "src", args.images)
        template = Store(root / "store")
        ingest(IngestConfig(root / "src", "folder", template))
        # record model.json once, so that both engines load the model only where they encode with it
        loaded = load(ModelSpec(args.model), torch.device("cpu"))
        template.record_model(loaded.model_key, {**loaded.info, "dtype": "float16"})
        del loaded
        runs: dict[str, list[dict[str, float]]] = {"local": [], "ray": []}
        for _ in range(args.repeats):
            for engine in ("local", "ray"):
                runs[engine].append(measure(template, engine, args))
        best = {e: max(r, key=lambda m: m["steady"]) for e, r in runs.items()}
        print(f"{args.images} JPEGs 224², {args.model} random weights, batch {args.batch_size}, "
              f"{os.cpu_count()} cores, fp32 CPU")
        for engine, m in best.items():
            print(f"{engine:>5} ({m['device']}): startup {m['startup']:6.1f} s | steady {m['steady']:6.1f} img/s "
                  f"| wall {m['wall']:6.1f} s for {int(m['images'])} images")
        lo, ra = best["local"], best["ray"]
        print(f"ray/local: steady-state {ra['steady'] / lo['steady']:.2f}×, "
              f"startup +{ra['startup'] - lo['startup']:.1f} s, wall {ra['wall'] / lo['wall']:.2f}×")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
