"""Benchmark: the detector's training step against this machine's matrix-product floor, in one run.

The floor is a 4096² fp32 matrix product (and a bf16 one where the CPU has native bf16), in GFLOP
per CPU-second, measured between the steps it is compared with. The step is the paper's: SAM +
CVaR α 0.8 + AUC γ 0.5, batch 2048, 1536-d input, hidden 1536. Its FLOPs, per sample and pass:
forward 2 Σ d_in d_out over the four Linear layers, backward twice that less the first layer's
input gradient (nothing needs it), two passes for SAM: 32 d² + 12 d = 75.5 MFLOP per sample.

Variants (CPU seconds of this process, so a shared machine inflates wall time, not these):
- before: the step as `pipeline train` ran it until this change (autograd through the nn modules,
  BatchNorm's own kernel, one float drawn per dropout unit, the n₊ × n₋ AUC pairs, AdamW's
  per-parameter loop, SAM cloning w each step), under the CLI's 4 MB mmap threshold;
- after: fused blocks (trainer/fused.py), AUC by sorting, fused AdamW, step buffers reused from the
  heap (pipeline/allocator.py); also without the heap reuse, to show its share.
Then an epoch streamed from a Parquet store (our loader) against the reference code's loop shape
(per-sample tensors through a DataLoader, CVaR's λ by fminbound each step), and the loader alone.

    python bench/bench_train.py [--rows 8000] [--threads 1] [--steps 5] [--no-strict-gemm] [--compile]

--no-strict-gemm runs an MKL product before the trainer is imported, so MKL's thread-independent
mode cannot be switched on: the fp32 figures then show what that mode costs (or not).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

DIM = 768  # image and text halves: the input is 1536-d
BATCH = 2048
FLOOR_N = 4096


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8000, help="D3 rows (5 samples each) for the epoch figures")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU seconds are clean)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (after 2 warm-up steps)")
    parser.add_argument("--no-strict-gemm", action="store_true", help="leave MKL in its default mode")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the step")
    parser.add_argument("--skip-epochs", action="store_true", help="step figures only")
    return parser.parse_args()


ARGS = parse()
if ARGS.no_strict_gemm:
    torch.ones(8, 8) @ torch.ones(8, 8)  # MKL's first call: its reproducibility mode is now fixed

from pipeline.allocator import fix_mmap_threshold, step_buffers_reused  # noqa: E402
from trainer.fit import GEMM_THREAD_INDEPENDENT, FitConfig, build_model, build_optimizer, train_step  # noqa: E402
from trainer.losses import bce, cvar  # noqa: E402
from trainer.model import MLP  # noqa: E402
from trainer.precision import BF16_EMULATED, cpu_bf16_native  # noqa: E402
from trainer.products import BF16_PRODUCTS  # noqa: E402
from trainer.sam import SAM, running_stats  # noqa: E402


def step_flops(in_dim: int, hidden: int, depth: int = 3) -> int:
    """FLOPs of one SAM step per sample: two passes of forward + backward through the Linear layers."""
    layers = [(in_dim, hidden)] + [(hidden, hidden)] * (depth - 1) + [(hidden, 1)]
    forward = sum(2 * a * b for a, b in layers)
    backward = 2 * forward - 2 * layers[0][0] * layers[0][1]  # no gradient for the input features
    return 2 * (forward + backward)


def cpu_seconds(fn: Callable[[], Any]) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


class Floor:
    """A large matrix product, timed between steps: GFLOP per CPU-second."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.a = torch.randn(FLOOR_N, FLOOR_N).to(dtype)
        self.b = torch.randn(FLOOR_N, FLOOR_N).to(dtype)
        self.a @ self.b

    def rate(self) -> float:
        return 2 * FLOOR_N**3 / cpu_seconds(lambda: self.a @ self.b) / 1e9


# --- the step before this change (kept here so that the note can show both) ---------------------


class _RandDropout(torch.nn.Module):
    """The former dropout: one float drawn per unit."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = torch.rand(x.shape, device=x.device) >= self.p
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))


def _pairwise_auc(logits: torch.Tensor, labels: torch.Tensor, eta: float, p: float) -> torch.Tensor:
    pos, neg = logits[labels == 1], logits[labels == 0]
    if pos.numel() == 0 or neg.numel() == 0:
        return logits.sum() * 0.0
    return torch.clamp(eta - (pos[:, None] - neg[None, :]), min=0.0).pow(p).mean()


class _CloningSAM(SAM):
    """The former SAM: clones every parameter each step and adds its norms in any order."""

    @torch.no_grad()
    def first_step(self, zero_grad: bool = True) -> None:
        norm = torch.norm(torch.stack([p.grad.norm(p=2) for g in self.param_groups for p in g["params"]
                                       if p.grad is not None]), p=2)
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)
            for p in group["params"]:
                if p.grad is not None:
                    self.state[p]["old_p"] = p.detach().clone()
                    p.add_(p.grad * scale.to(p))
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if "old_p" in self.state[p]:
                    p.data.copy_(self.state[p].pop("old_p"))
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad(set_to_none=True)


def before_step(in_dim: int, bf16: bool) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """The former `train_step` on the former model (see the module docstring)."""
    config = FitConfig(precision="fp32")
    model = build_model(in_dim, config)
    for i, layer in enumerate(model.body):
        if layer.__class__.__name__ == "Dropout":
            model.body[i] = _RandDropout(layer.p)
    optimizer = _CloningSAM(model.parameters(), torch.optim.AdamW, rho=config.sam_rho, lr=config.lr,
                            betas=config.betas, weight_decay=config.weight_decay)
    model.train()

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
            s = model.head(model.body(x)).squeeze(-1).float()
        return 0.5 * cvar(bce(s, y), 0.8) + 0.5 * _pairwise_auc(s, y, 0.6, 2.0)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        running_stats(model, True)
        loss(x, y).backward()
        optimizer.first_step(zero_grad=True)
        running_stats(model, False)
        loss(x, y).backward()
        optimizer.second_step(zero_grad=True)
        running_stats(model, True)

    return step


def after_step(in_dim: int, bf16: bool) -> Callable[[torch.Tensor, torch.Tensor], None]:
    config = FitConfig(precision="bf16" if bf16 else "fp32")
    model = build_model(in_dim, config)
    optimizer = build_optimizer(model, config)
    model.train()
    return lambda x, y: train_step(model, optimizer, x, y, config)


def compiled_step(in_dim: int, bf16: bool) -> tuple[Callable[[torch.Tensor, torch.Tensor], None], float]:
    """The former model's forward + loss under torch.compile (inductor), SAM around it; compile seconds."""
    config = FitConfig(precision="fp32")
    model = build_model(in_dim, config)
    for i, layer in enumerate(model.body):
        if layer.__class__.__name__ == "Dropout":
            model.body[i] = _RandDropout(layer.p)
    optimizer = build_optimizer(model, config)
    model.train()

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
            s = model.head(model.body(x)).squeeze(-1).float()
        return 0.5 * cvar(bce(s, y), 0.8) + 0.5 * _pairwise_auc(s, y, 0.6, 2.0)

    compiled = torch.compile(loss)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        running_stats(model, True)
        compiled(x, y).backward()
        optimizer.first_step(zero_grad=True)  # type: ignore[attr-defined]
        running_stats(model, False)
        compiled(x, y).backward()
        optimizer.second_step(zero_grad=True)  # type: ignore[attr-defined]
        running_stats(model, True)

    x, y = torch.randn(BATCH, in_dim), torch.randint(0, 2, (BATCH,))
    start = time.perf_counter()
    step(x, y)
    return step, time.perf_counter() - start


def measure(step: Callable[[torch.Tensor, torch.Tensor], None], floor: Floor, flops: int,
            allocator: AbstractContextManager[Any]) -> tuple[float, float]:
    """Median CPU-seconds per step and median ratio of its GFLOP per CPU-second to the floor's."""
    x, y = torch.randn(BATCH, 2 * DIM), (torch.rand(BATCH) < 0.8).long()
    seconds, ratios = [], []
    with allocator:
        for _ in range(2):
            step(x, y)
        for _ in range(ARGS.steps):
            t = cpu_seconds(lambda: step(x, y))
            rate = flops * BATCH / t / 1e9
            seconds.append(t)
            ratios.append(rate / floor.rate())
    return statistics.median(seconds), statistics.median(ratios)


def step_table() -> None:
    flops = step_flops(2 * DIM, 2 * DIM)
    fp32, bf16 = Floor(torch.float32), Floor(torch.bfloat16) if cpu_bf16_native() else None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); step: batch {BATCH}, "
          f"{2 * DIM}-d, hidden {2 * DIM}, SAM + CVaR + AUC: {flops / 1e6:.1f} MFLOP per sample")
    print(f"MKL products thread-independent (strict CNR): {GEMM_THREAD_INDEPENDENT}; bf16 products: {BF16_PRODUCTS}")
    print(f"floor: fp32 {FLOOR_N}² product {fp32.rate():.0f} GFLOP/CPU-s"
          + (f", bf16 {bf16.rate():.0f}" if bf16 else f"; bf16: {BF16_EMULATED}"))
    fix_mmap_threshold()  # the CLI's setting; `after` lifts it for the steps, as the train stage does
    rows: list[tuple[str, Callable[..., Any], bool, AbstractContextManager[Any]]] = [
        ("before, fp32", before_step, False, nullcontext()),
        ("after, fp32, without heap reuse", after_step, False, nullcontext()),
        ("after, fp32", after_step, False, step_buffers_reused()),
    ]
    if bf16:
        rows += [("before, bf16 autocast", before_step, True, nullcontext()),
                 ("after, bf16, without heap reuse", after_step, True, nullcontext()),
                 ("after, bf16", after_step, True, step_buffers_reused())]
    print(f"{'':34} {'CPU-s/step':>10} {'samples/CPU-s':>13} {'GFLOP/CPU-s':>11} {'/ fp32 floor':>12}"
          + (f" {'/ bf16 floor':>12}" if bf16 else ""))
    results = {}
    for label, make, half, allocator in rows:
        torch.manual_seed(0)
        seconds, ratio = measure(make(2 * DIM, half), fp32, flops, allocator)
        rate = flops * BATCH / seconds / 1e9
        results[label] = seconds
        extra = f" {rate / bf16.rate():12.2f}" if bf16 else ""
        print(f"{label:34} {seconds:10.3f} {BATCH / seconds:13.0f} {rate:11.0f} {ratio:12.2f}{extra}", flush=True)
    for label in ("after, fp32", "after, bf16"):
        if label in results:  # the paper's defaults on D3: 32 epochs over its train split (80% of 11.5M)
            print(f"{label}: 32 epochs × 9.2M samples ≈ {32 * 9.2e6 * results[label] / BATCH / 3600:,.0f} CPU-hours "
                  "(steps only)")
    line = f"speed-up, fp32: {results['before, fp32'] / results['after, fp32']:.2f}×"
    if bf16:
        line += (f"; bf16: {results['before, bf16 autocast'] / results['after, bf16']:.2f}×; after bf16 against "
                 f"before fp32: {results['before, fp32'] / results['after, bf16']:.2f}×")
    print(line)
    if ARGS.compile:
        for half in (False, True) if bf16 else (False,):
            try:
                step, compile_s = compiled_step(2 * DIM, half)
            except Exception as exc:  # noqa: BLE001 (no compiler, an inductor bug: report and go on)
                print(f"torch.compile ({'bf16' if half else 'fp32'}): failed, {type(exc).__name__}: {exc}")
                continue
            seconds, ratio = measure(step, fp32, flops, step_buffers_reused())
            print(f"{'torch.compile, ' + ('bf16' if half else 'fp32'):34} {seconds:10.3f} {BATCH / seconds:13.0f} "
                  f"{flops * BATCH / seconds / 1e9:11.0f} {ratio:12.2f}  (first step, compiling: {compile_s:.0f} s)")


# --- an epoch from the store ---------------------------------------------------------------------


def make_store(root: Path, rows: int) -> Any:
    import h5py

    from pipeline.stages.import_features import ImportConfig
    from pipeline.stages.import_features import run as import_features
    from pipeline.store.layout import Store

    rng = np.random.default_rng(0)
    src = root / "0000.h5"
    with h5py.File(src, "w") as f:
        for name in ["real", "image_gen0", "image_gen1", "image_gen2", "image_gen3",
                     "original_prompt", "positive_prompt"]:
            shift = 0.3 if name.startswith("image_gen") else 0.0
            f[name] = (rng.normal(size=(rows, DIM)) + shift).astype(np.float32)
    store = Store(root / "store")
    import_features(ImportConfig(src, "h5", store, "bench", split_fractions=(1.0, 0.0, 0.0)))
    return store


def reference_epoch(image: np.ndarray, text: np.ndarray, labels: np.ndarray) -> float:
    """The reference code's loop shape: Dataset of per-sample tensors, fminbound for λ each step."""
    from scipy import optimize

    class PerSample(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(labels)

        def __getitem__(self, i: int):  # noqa: ANN204
            return torch.tensor(image[i]), torch.tensor(text[i]), torch.tensor(labels[i], dtype=torch.float32)

    loader = torch.utils.data.DataLoader(PerSample(), batch_size=BATCH, shuffle=True, num_workers=0)
    model = MLP(2 * DIM)
    for i, layer in enumerate(model.body):  # the reference model uses torch's own nn.Dropout
        if layer.__class__.__name__ == "Dropout":
            model.body[i] = torch.nn.Dropout(layer.p)
    optimizer = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-3, weight_decay=0.01)

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        losses = bce(out, y)
        search = lambda lam: lam + (1.0 / 0.8) * torch.relu(losses - lam).mean().item()  # noqa: E731
        arr = losses.detach().numpy()
        lam = optimize.fminbound(search, arr.min() - 1000.0, arr.max())
        cvar_term = lam + (1.0 / 0.8) * torch.relu(losses - lam).mean()
        return 0.5 * cvar_term + 0.5 * _pairwise_auc(out, y, 0.6, 2.0)

    model.train()
    seen, start = 0, time.process_time()
    for img, txt, y in loader:
        x = torch.cat([img, txt], dim=1)
        running_stats(model, True)
        loss_fn(model.head(model.body(x)).squeeze(-1), y).backward()
        optimizer.first_step(zero_grad=True)
        running_stats(model, False)
        loss_fn(model.head(model.body(x)).squeeze(-1), y).backward()
        optimizer.second_step(zero_grad=True)
        seen += len(y)
    return seen / (time.process_time() - start)


def our_epoch(loader: Any, precision: str) -> float:
    config = FitConfig(precision=precision)
    model = build_model(loader.in_dim, config)
    optimizer = build_optimizer(model, config)
    model.train()
    seen, start = 0, time.process_time()
    with step_buffers_reused():
        for batch in loader.epoch(0):
            train_step(model, optimizer, batch.x, batch.y, config)
            seen += batch.x.shape[0]
    return seen / (time.process_time() - start)


def epoch_table() -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        _epochs(make_store(root, ARGS.rows))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _epochs(store: Any) -> None:
    from pipeline.features.loader import FeatureLoader, LoaderConfig
    from pipeline.features.view import feature_table

    loader = FeatureLoader(feature_table(store, "bench"), ("train",), LoaderConfig("image+text", BATCH, shuffle=True))
    full = np.concatenate([b.x.numpy() for b in loader.epoch(0)])
    labels = np.concatenate([b.y.numpy() for b in loader.epoch(0)]).astype(np.float32)
    image, text = np.ascontiguousarray(full[:, :DIM]), np.ascontiguousarray(full[:, DIM:])
    print(f"\none epoch of {len(labels)} samples (samples per CPU-second):")
    torch.manual_seed(0)
    ref = reference_epoch(image, text, labels)
    print(f"  reference-style (DataLoader per sample, fminbound λ, nn.Dropout), fp32: {ref:8.0f}")
    best = 0.0
    for precision in ("fp32", "bf16") if cpu_bf16_native() else ("fp32",):
        rate = our_epoch(loader, precision)
        best = max(best, rate)
        print(f"  ours, Parquet stream, {precision}:{'':44} {rate:8.0f}  ({rate / ref:.2f}× the reference)")
    start, seen = time.process_time(), 0
    for batch in loader.epoch(0):
        seen += batch.x.shape[0]
    feed = seen / (time.process_time() - start)
    print(f"  loader alone (Parquet float16 → float32 batches):{'':21} {feed:8.0f}  "
          f"({feed / best:.1f}× the fastest step)")


def main() -> None:
    torch.set_num_threads(ARGS.threads)
    step_table()
    if not ARGS.skip_epochs:
        epoch_table()


if __name__ == "__main__":
    main()
