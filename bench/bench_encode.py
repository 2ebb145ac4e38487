"""Benchmark: the CPU encoder against this machine's floor, and end-to-end `pipeline encode` against
the forward pass alone, all in one run.

A CLIP image tower with random weights (the FLOPs of the pretrained model), 224-px JPEGs. It measures,
in the same process:
- the floor: a large matrix product in fp32 and in bf16, and the model's own matrix products (its
  linear layers' shapes at this batch size) in each precision;
- forward-only on ready tensors for each variant: `fp32`; `bf16-autocast` (fp32 weights under
  autocast: the path before issue 20); `bf16` (what `Encoder` now does on a CPU with native bf16: a
  bf16 copy of the model); and with `--compile`, `bf16-compile` (that copy through `torch.compile`
  with inductor's freezing; its compile time and first batch are printed apart);
- end-to-end `pipeline encode` (read, decode, preprocess, forward, normalise, write shards) in fp32
  and bf16, and its ratio to forward-only.

Rates are per CPU-second of this process (and its reaped children) and per wall second: the box is
shared, and CPU seconds are what contention distorts least. Each variant is measured `--repeats`
times, alternating, keeping the best, so that drift between variants does not pass for a speed-up.

    python bench/bench_encode.py [--model ViT-B-32] [--images 128] [--batch-size 32] [--threads N] [--compile]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.encoding.clip import LoadedModel, ModelSpec, load
from pipeline.encoding.units import Encoder, bf16_copy, default_workers
from pipeline.stages.encode import EncodeConfig
from pipeline.stages.encode import run as encode
from pipeline.stages.ingest import IngestConfig
from pipeline.stages.ingest import run as ingest
from pipeline.store.layout import Store
from trainer.precision import BF16_EMULATED, cpu_bf16_native


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass(frozen=True)
class Rate:
    """Work per CPU-second and per wall second."""

    per_cpu: float
    per_wall: float

    @staticmethod
    def of(work: float, run: Callable[[], object]) -> Rate:
        cpu, wall = cpu_seconds(), time.perf_counter()
        run()
        return Rate(work / (cpu_seconds() - cpu), work / (time.perf_counter() - wall))

    def best(self, other: Rate) -> Rate:
        return Rate(max(self.per_cpu, other.per_cpu), max(self.per_wall, other.per_wall))


def matmul_rate(dtype: torch.dtype, shapes: list[tuple[int, int, int]], reps: int = 3) -> Rate:
    """GFLOP per CPU-second and per second of the products m×k @ k×n in `shapes`, after one warm-up."""
    pairs = [(torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)) for m, k, n in shapes]
    for a, b in pairs:
        a @ b

    def run() -> None:
        for _ in range(reps):
            for a, b in pairs:
                a @ b
    return Rate.of(sum(2 * m * k * n for m, k, n in shapes) * reps / 1e9, run)


def model_shapes(loaded: LoadedModel, batch: int) -> list[tuple[int, int, int]]:
    """(tokens, in, out) of the image tower's linear layers at this batch size, each shape once (every
    block repeats them: their rate is the rate of the whole)."""
    visual = loaded.model.visual
    size = loaded.info["preprocess"]["image_size"]
    size = size if isinstance(size, int) else size[0]
    patch = visual.conv1.kernel_size[0]
    tokens = batch * ((size // patch) ** 2 + 1)
    shapes = []
    for module in visual.transformer.modules():
        if isinstance(module, torch.nn.MultiheadAttention):
            shapes += [(tokens, module.embed_dim, 3 * module.embed_dim), (tokens, module.embed_dim, module.embed_dim)]
        elif isinstance(module, torch.nn.Linear) and not isinstance(module, torch.nn.modules.linear.
                                                                      NonDynamicallyQuantizableLinear):
            shapes.append((tokens, module.in_features, module.out_features))
    return sorted(set(shapes))


def gflop_per_image(loaded: LoadedModel, size: int) -> float:
    """Counted by torch (grad on, so that attention runs as countable matrix products)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loaded.model.encode_image(torch.randn(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def make_jpegs(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    (root / "real").mkdir(parents=True)
    for i in range(n):
        arr = rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        (root / "real" / f"{i:06d}.jpg").write_bytes(buf.getvalue())


def variant_forward(loaded: LoadedModel, variant: str) -> Callable[[torch.Tensor], object]:
    """One batch's forward pass, as `Encoder` runs it (numpy vectors back)."""
    cpu = torch.device("cpu")
    if variant == "fp32":
        return Encoder(loaded, cpu, "fp32").images
    if variant == "bf16-autocast":
        return Encoder(loaded, cpu, "bf16", bf16_weights=False).images
    if variant == "bf16":
        return Encoder(loaded, cpu, "bf16", bf16_weights=True).images
    if variant == "bf16-compile":
        import torch._inductor.config as inductor

        inductor.freezing = True  # constant weights: oneDNN prepacking and fused epilogues
        compiled = torch.compile(bf16_copy(loaded.model.visual))

        def forward(pixels: torch.Tensor) -> object:
            with torch.inference_mode():
                return compiled(pixels.to(torch.bfloat16)).float().numpy()
        return forward
    raise ValueError(variant)


def end_to_end(src: Path, model: str, precision: str, batch: int, workers: int) -> tuple[float, int]:
    """The encode stage's own images/s (wall clock, model load excluded) and how many it encoded."""
    store = Store(Path(tempfile.mkdtemp(prefix="bench-store-")))
    try:
        ingest(IngestConfig(src, "folder", store))
        result = encode(EncodeConfig(store, ModelSpec(model), precision=precision,  # type: ignore[arg-type]
                                     batch_size=batch, workers=workers, shard_rows=1024))
        return result.images_per_second, result.images_encoded
    finally:
        shutil.rmtree(store.root)


@contextlib.contextmanager
def decoding(mode: str) -> Iterator[None]:
    """With 0 workers, decode `inline` (between forward passes, as before) rather than in a thread."""
    from pipeline.engines import local

    threaded = local.in_thread
    if mode == "inline":
        local.in_thread = lambda source, depth=1, name="": source  # type: ignore[assignment,return-value]
    try:
        yield
    finally:
        local.in_thread = threaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--images", type=int, default=128, help="images per forward-only measurement and e2e run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: as encode)")
    parser.add_argument("--variants", default="fp32,bf16-autocast,bf16")
    parser.add_argument("--compile", action="store_true", help="also measure bf16-compile (minutes to compile)")
    parser.add_argument("--no-e2e", action="store_true", help="forward-only and floors only")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--inline-too", action="store_true",
                        help="with 0 workers, also measure end to end with decoding inline, between forward passes "
                             "(the path before decoding moved to a thread), alternating with the thread")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default torch's); on a shared box 1 thread shows what the kernels "
                             "do without other threads spinning at each operation's barrier")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = args.variants.split(",") + (["bf16-compile"] if args.compile else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.model} RANDOM WEIGHTS; "
          f"batch {args.batch_size}; rates per CPU-second (and per wall second)")
    if not cpu_bf16_native():
        print(f"bf16 variants skipped: {BF16_EMULATED}")
        variants = [v for v in variants if not v.startswith("bf16")]
    cpu = torch.device("cpu")
    loaded = load(ModelSpec(args.model), cpu)
    size = loaded.info["preprocess"]["image_size"]
    size = size if isinstance(size, int) else size[0]
    gflop = gflop_per_image(loaded, size)
    shapes = model_shapes(loaded, args.batch_size)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    used = {"fp32"} | ({"bf16"} if any(v.startswith("bf16") for v in variants) else set())
    big = {p: matmul_rate(dtypes[p], [(4096, 4096, 4096)], 2) for p in used}
    own = {p: matmul_rate(dtypes[p], shapes) for p in used}
    print(f"{gflop:.1f} GFLOP/image; floor, GFLOP per CPU-s (per s): " + "; ".join(
        f"{p} 4096² product {big[p].per_cpu:.0f} ({big[p].per_wall:.0f}), the model's own products "
        f"{own[p].per_cpu:.0f} ({own[p].per_wall:.0f})" for p in sorted(used)))

    pixels = torch.randn(args.batch_size, 3, size, size)
    forwards: dict[str, Callable[[torch.Tensor], object]] = {}
    for variant in variants:
        cpu0, wall0 = cpu_seconds(), time.perf_counter()
        forwards[variant] = variant_forward(loaded, variant)
        forwards[variant](pixels)  # the first batch: oneDNN primitives, or the compile
        print(f"{variant}: ready and first batch in {cpu_seconds() - cpu0:.1f} CPU-s "
              f"({time.perf_counter() - wall0:.1f} s)")
    batches = max(1, args.images // args.batch_size)
    best: dict[str, Rate] = {}
    for _ in range(args.repeats):
        for variant in variants:
            def run(forward: Callable[[torch.Tensor], object] = forwards[variant]) -> None:
                for _ in range(batches):
                    forward(pixels)
            rate = Rate.of(batches * args.batch_size, run)
            best[variant] = best[variant].best(rate) if variant in best else rate
    for variant, rate in best.items():
        floor = big["fp32" if variant == "fp32" else "bf16"]
        shape_floor = own["fp32" if variant == "fp32" else "bf16"]
        achieved = rate.per_cpu * gflop
        print(f"{variant:14s} forward-only {rate.per_cpu:6.2f} img/CPU-s ({rate.per_wall:6.2f} img/s) = "
              f"{achieved:5.0f} GFLOP/CPU-s: {achieved / floor.per_cpu:4.0%} of the 4096² product, "
              f"{achieved / shape_floor.per_cpu:4.0%} of the model's own products"
              + (f" | {rate.per_cpu / best['fp32'].per_cpu:.2f}× fp32" if "fp32" in best else ""))

    if args.no_e2e:
        return
    src = Path(tempfile.mkdtemp(prefix="bench-jpegs-"))
    make_jpegs(src, args.images)
    try:
        workers = default_workers(cpu) if args.workers is None else args.workers
        for precision in [p for p in ("fp32", "bf16") if p in best]:
            # alternate with forward-only and keep the best of each (wall clock: the stage's own figure)
            modes = ["thread", "inline"] if args.inline_too and workers == 0 else ["thread" if workers == 0 else ""]
            fwd, e2e = 0.0, dict.fromkeys(modes, 0.0)
            for _ in range(args.repeats):
                def run(forward: Callable[[torch.Tensor], object] = forwards[precision]) -> None:
                    for _ in range(batches):
                        forward(pixels)
                fwd = max(fwd, Rate.of(batches * args.batch_size, run).per_wall)
                for mode in modes:
                    with decoding(mode):
                        per_second, n = end_to_end(src, args.model, precision, args.batch_size, workers)
                    e2e[mode] = max(e2e[mode], per_second)
            for mode, per_second in e2e.items():
                how = f"{workers} workers" + (f", decoding in {'a thread' if mode == 'thread' else 'line'}"
                                              if mode else "")
                print(f"{precision}: end-to-end encode {per_second:6.2f} img/s ({n} images, {how}) against "
                      f"forward-only {fwd:6.2f} img/s: ratio {per_second / fwd:.2f}")
    finally:
        shutil.rmtree(src)


if __name__ == "__main__":
    main()
