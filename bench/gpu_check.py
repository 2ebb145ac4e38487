"""GPU check: one script, under 5 minutes on one NVIDIA GPU, that prints what the encode and the
trainer reach there. Without a CUDA GPU it stops with one sentence (exit code 2).

ViT-L-14 with random weights (the FLOPs of the real model), on 20k generated JPEGs:
1. forward-only images/s on ready tensors, fp16 and bf16 (the ceiling);
2. what feeds the model: JPEG decode + resize + crop images/s with PIL and with torchvision's
   decode_jpeg on N CPU worker processes, against nvJPEG (`decode_jpeg(device="cuda")`) in batches;
   how far the nvJPEG path's pictures differ from the pipeline's; and the model's images/s fed by each
   path (decoding overlapped with the forward pass): where the wall between one GPU and 4,000
   ViT-L-14 images a second stands;
3. end-to-end `pipeline encode` images/s (read, re-hash, decode in worker processes, forward,
   normalise, write and commit shards), fp16 and bf16, and its ratio to forward-only; with where the
   time went: the model's construction (outside the stage's own figure), the wait for the first
   decoded batch (worker start-up), the steady rate after it, and one process's decode rate (the
   decode ceiling is about that times the workers);
4. text encode/s (EncodeTexts, fp16);
5. trainer step samples/s, bf16 autocast, batch 2048, 1536-d, CVaR+AUC+SAM: ours (`train_step`) vs a
   loop written the way the reference code is (torch Dropout, λ by scipy's fminbound each step);
6. peak GPU memory of each part.

`--cpu-smoke` runs every part on the CPU at tiny sizes (Tiny-ViT-16, 64 images; nvJPEG replaced by
decode_jpeg on the CPU) to check the script itself in under a minute: its figures measure nothing.

    python bench/gpu_check.py [--images 20000] [--batch-size 256] [--workers N]
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

DEVICE, HALF, SMOKE = "cuda", "fp16", False  # --cpu-smoke: "cpu", "bf16", True
_NVJPEG = "nvJPEG on the GPU (decode_jpeg(device='cuda'), batched)"


def _sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _reset_peak() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: cores - 1)")
    parser.add_argument("--model", default="ViT-L-14")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run every part on the CPU with tiny sizes to check the script itself (no figures)")
    args = parser.parse_args()

    import torch

    if args.cpu_smoke:
        global DEVICE, HALF, SMOKE, _NVJPEG
        DEVICE, HALF, SMOKE = "cpu", "bf16", True
        _NVJPEG = "decode_jpeg on the CPU in one process (the smoke run's stand-in for nvJPEG)"
        args.images, args.batch_size, args.model = min(args.images, 64), min(args.batch_size, 16), "Tiny-ViT-16"
    elif not torch.cuda.is_available():
        print("gpu_check needs an NVIDIA GPU that torch can see (torch.cuda.is_available() is False here).",
              file=sys.stderr)
        return 2
    started = time.perf_counter()
    device = torch.device(DEVICE)
    workers = args.workers if args.workers is not None else max(1, min(15, (os.cpu_count() or 2) - 1))
    where = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "CPU SMOKE RUN (not a measurement)"
    print(f"{where}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"{os.cpu_count()} CPU cores; {args.model} RANDOM WEIGHTS; batch {args.batch_size}; "
          f"{workers} decoding workers")
    root = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        t = time.perf_counter()
        make_jpegs(root / "src", args.images, workers + 1)
        print(f"made {args.images} JPEGs (256², q90) in {time.perf_counter() - t:.1f} s")
        template = ingest_once(root, args)
        forward, info = forward_only(args, device)
        per_process = decode_rate(template, info, args)
        print(f"decode (read + re-hash + decode + resize), one process: {per_process:6.0f} img/s; "
              f"× {workers} workers ≈ {per_process * workers:6.0f} img/s ceiling")
        paths = sorted(str(p) for p in (root / "src" / "real").glob("*.jpg"))[: min(args.images, 10_000)]
        size = _picture_size(info)
        for name, rate in decode_paths(paths, size, args.batch_size, workers).items():
            print(f"decode + resize + crop to {size}², {name}: {rate:7.0f} img/s")
        mean_diff, max_diff = picture_agreement(paths[:32], size)
        print(f"pictures, PIL path against the {_NVJPEG.split(' (')[0]} path: mean |difference| {mean_diff:.2f}, "
              f"largest {max_diff:.0f} of 255 (a different decoder is a different model key)")
        fwd = forward[HALF][0]
        for name, rate in fed_forward(paths, info, args, workers, HALF).items():
            print(f"{HALF} {args.model} fed by {name}: {rate:7.0f} img/s ({rate / fwd:.2f} of forward-only)")
        for precision in (HALF, "bf16"):
            e2e, peak, clock = end_to_end(template, root, precision, args, workers)
            fwd, fwd_peak = forward[precision]
            print(f"{precision}: forward-only {fwd:7.0f} img/s (peak {fwd_peak:.1f} GiB) | end-to-end encode "
                  f"{e2e:7.0f} img/s (peak {peak:.1f} GiB) | e2e/forward {e2e / fwd:.2f}")
            print(f"{precision}:   run() {clock.wall:5.1f} s = model built {clock.before_start:5.1f} s + first batch "
                  f"after {clock.first_wait:5.1f} s + the rest; after the first batch {clock.steady:7.0f} img/s "
                  f"({clock.steady / fwd:.2f} of forward-only)")
        texts_per_s, peak = text_encode(args, device)
        print(f"text encode (EncodeTexts, fp16, batch 1024): {texts_per_s:7.0f} texts/s (peak {peak:.1f} GiB)")
        ours, ref, peak = trainer_steps(device)
        print(f"trainer step, bf16, batch 2048 × 1536-d, CVaR+AUC+SAM: ours {ours:9.0f} samples/s | "
              f"reference-style {ref:9.0f} samples/s | {ours / ref:.1f}× (peak {peak:.1f} GiB)")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"gpu_check took {time.perf_counter() - started:.0f} s")
    return 0


def make_jpegs(root: Path, n: int, processes: int) -> None:
    (root / "real").mkdir(parents=True)
    chunks = [(root / "real", start, min(n, start + 500)) for start in range(0, n, 500)]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pool.starmap(_jpeg_range, chunks)


def _jpeg_range(directory: Path, start: int, stop: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(start)
    ramp = np.linspace(0, 255, 256)[None, :, None]
    for i in range(start, stop):
        arr = np.clip(ramp * rng.uniform(0.2, 1.0, 3) + rng.normal(0, 25, (256, 256, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        (directory / f"{i:06d}.jpg").write_bytes(buf.getvalue())


def ingest_once(root: Path, args: argparse.Namespace) -> Any:
    from pipeline.stages.ingest import IngestConfig
    from pipeline.stages.ingest import run as ingest
    from pipeline.store.layout import Store

    t = time.perf_counter()
    store = Store(root / "template")
    ingest(IngestConfig(root / "src", "folder", store))
    print(f"ingested them in {time.perf_counter() - t:.1f} s")
    return store


def forward_only(args: argparse.Namespace, device: Any) -> tuple[dict[str, tuple[float, float]], dict[str, Any]]:
    import torch

    from pipeline.encoding.clip import ModelSpec, load
    from pipeline.encoding.units import Encoder, EncodeSpec

    t = time.perf_counter()
    loaded = load(ModelSpec(args.model), device)
    print(f"built {args.model} (random weights) on {DEVICE} in {time.perf_counter() - t:.1f} s")
    out = {}
    for precision in (HALF, "bf16"):
        encoder = Encoder(loaded, device, precision)
        h, w, _ = EncodeSpec.from_info(ModelSpec(args.model), loaded.info, "float16", 1).picture_shape
        pixels = torch.randn(args.batch_size, 3, h, w, device=device)
        for _ in range(3):  # warm-up: cuDNN/cuBLAS choose their kernels
            encoder.images(pixels)
        _sync()
        _reset_peak()
        n, t = 0, time.perf_counter()
        while n < min(args.images, 10_000):
            encoder.images(pixels)  # returns numpy: synchronises every batch, as the encode stage does
            n += args.batch_size
        out[precision] = (n / (time.perf_counter() - t), _peak_gib())
        del encoder, pixels
    info = loaded.info
    del loaded
    _sync()
    return out, info


def decode_rate(template: Any, info: dict[str, Any], args: argparse.Namespace, rows: int = 2048) -> float:
    """What one decoding process does per second: DecodeImages (read, re-hash, decode, resize, crop)."""
    import pyarrow as pa

    from pipeline.encoding.clip import ModelSpec
    from pipeline.encoding.units import DecodeImages, EncodeSpec
    from pipeline.sources.images import DEFAULT_MAX_PIXELS
    from pipeline.stages.encode import pending_images_sql
    from pipeline.store import catalog

    with catalog.connect(template) as con:
        pending = con.sql(pending_images_sql(False) + f" LIMIT {rows}", params={"key": info["model_key"]}).arrow()
    if isinstance(pending, pa.RecordBatchReader):
        pending = pending.read_all()
    decode = DecodeImages(EncodeSpec.from_info(ModelSpec(args.model), info, "float16", DEFAULT_MAX_PIXELS))
    decode(pending.slice(0, 64))  # warm-up: imports, the reader's caches
    t = time.perf_counter()
    for start in range(0, pending.num_rows, args.batch_size):
        decode(pending.slice(start, args.batch_size))
    return pending.num_rows / (time.perf_counter() - t)


class _Clock:
    """A Reporter that notes when the image task starts and when each batch lands."""

    def __init__(self) -> None:
        self.called = time.perf_counter()
        self.started: float | None = None
        self.batches: list[tuple[float, int]] = []
        self.wall = 0.0

    def start(self, task: str, total: int | None, unit: str) -> None:
        if task == "images":
            self.started = time.perf_counter()

    def advance(self, task: str, n: int) -> None:
        if task == "images":
            self.batches.append((time.perf_counter(), n))

    def note(self, message: str) -> None:
        pass

    def event(self, kind: str, data: dict[str, Any]) -> None:
        pass

    @property
    def before_start(self) -> float:
        return (self.started or self.called) - self.called

    @property
    def first_wait(self) -> float:
        return self.batches[0][0] - (self.started or self.called) if self.batches else float("nan")

    @property
    def steady(self) -> float:
        if len(self.batches) < 2:
            return float("nan")
        return sum(n for _, n in self.batches[1:]) / (self.batches[-1][0] - self.batches[0][0])


def end_to_end(template: Any, root: Path, precision: str, args: argparse.Namespace,
               workers: int) -> tuple[float, float, _Clock]:

    from pipeline.encoding.clip import ModelSpec
    from pipeline.stages.encode import EncodeConfig, run
    from pipeline.store.layout import Store

    store = Store(root / f"store-{precision}")
    shutil.copytree(template.root, store.root)
    _reset_peak()
    clock = _Clock()
    result = run(EncodeConfig(store, ModelSpec(args.model), device=DEVICE, precision=precision,  # type: ignore[arg-type]
                              batch_size=args.batch_size, workers=workers, shard_rows=8192), clock)
    clock.wall = time.perf_counter() - clock.called
    done = result.images_encoded + sum(result.quarantined.values())
    assert done == args.images, f"{done} of {args.images} images encoded: {dict(result.quarantined)}"
    shutil.rmtree(store.root)
    return result.images_per_second, _peak_gib(), clock


def text_encode(args: argparse.Namespace, device: Any) -> tuple[float, float]:
    import pyarrow as pa

    from pipeline.encoding.clip import ModelSpec, load
    from pipeline.encoding.units import EncodeSpec, EncodeTexts

    loaded = load(ModelSpec(args.model), device)
    spec = EncodeSpec.from_info(ModelSpec(args.model), loaded.info, "float16", 10**8)
    unit = EncodeTexts(replace(spec, device=DEVICE, precision=HALF), loaded)
    rng = np.random.default_rng(0)
    words = ["a", "photo", "of", "cat", "dog", "red", "city", "at", "night", "painting", "portrait", "sunset"]
    texts = [" ".join(rng.choice(words, 12)) for _ in range(2048 if SMOKE else 20_480)]
    batches = [pa.table({"text_hash": [str(i) for i in range(s, s + 1024)], "text": texts[s:s + 1024]})
               for s in range(0, len(texts), 1024)]
    unit(batches[0])  # warm-up
    _sync()
    _reset_peak()
    t = time.perf_counter()
    for batch in batches:
        unit(batch)
    rate = len(texts) / (time.perf_counter() - t)
    peak = _peak_gib()
    del loaded, unit
    _sync()
    return rate, peak


def trainer_steps(device: Any, steps: int = 60) -> tuple[float, float, float]:
    steps = 4 if SMOKE else steps
    import torch

    from trainer.fit import FitConfig, build_model, build_optimizer, train_step
    from trainer.model import Dropout

    batch, dim = (256, 64) if SMOKE else (2048, 1536)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(batch, dim, device=device, generator=gen)
    y = (torch.rand(batch, device=device, generator=gen) < 0.8).float()
    config = FitConfig(precision="bf16")
    _reset_peak()

    model = build_model(dim, config).to(device)
    optimizer = build_optimizer(model, config)
    for _ in range(5):
        train_step(model, optimizer, x, y, config)
    _sync()
    t = time.perf_counter()
    for _ in range(steps):
        train_step(model, optimizer, x, y, config)  # returns a float: one sync per step
    ours = steps * batch / (time.perf_counter() - t)

    ref_model = build_model(dim, config).to(device)
    for i, layer in enumerate(ref_model.body):  # the reference model uses torch's own nn.Dropout
        if isinstance(layer, Dropout):
            ref_model.body[i] = torch.nn.Dropout(layer.p)
    ref_opt = build_optimizer(ref_model, config)
    for _ in range(3):
        _reference_step(ref_model, ref_opt, x, y, config)
    _sync()
    ref_steps = max(5, steps // 4)
    t = time.perf_counter()
    for _ in range(ref_steps):
        _reference_step(ref_model, ref_opt, x, y, config)
    ref = ref_steps * batch / (time.perf_counter() - t)
    return ours, ref, _peak_gib()


def _reference_step(model: Any, optimizer: Any, x: Any, y: Any, config: Any) -> None:
    """The reference code's step: CVaR's λ by a bounded scalar search that reads the loss back to the
    host at every probe (scipy's fminbound there; a golden-section search here if scipy is missing)."""
    import torch

    from trainer.losses import auc_loss, bce
    from trainer.sam import running_stats

    alpha = config.cvar_alpha

    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        losses = bce(out.float(), target)
        def objective(lam: float) -> float:
            return lam + (1.0 / alpha) * torch.relu(losses - lam).mean().item()
        low, high = float(losses.detach().min()) - 1000.0, float(losses.detach().max())
        lam = _fminbound(objective, low, high)
        cvar = lam + (1.0 / alpha) * torch.relu(losses - lam).mean()
        return config.auc_gamma * cvar + (1 - config.auc_gamma) * auc_loss(
            out.float(), target, config.auc_eta, config.auc_p)

    model.train()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        running_stats(model, True)
        loss_fn(model.head(model.body(x)).squeeze(-1), y).backward()  # the modules, not the fused blocks
    optimizer.first_step(zero_grad=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        running_stats(model, False)
        loss_fn(model.head(model.body(x)).squeeze(-1), y).backward()
    optimizer.second_step(zero_grad=True)


def _fminbound(f: Any, low: float, high: float) -> float:
    try:
        from scipy import optimize

        return float(optimize.fminbound(f, low, high))
    except ImportError:
        ratio = (5 ** 0.5 - 1) / 2
        a, b = low, high
        for _ in range(40):
            c, d = b - ratio * (b - a), a + ratio * (b - a)
            if f(c) < f(d):
                b = d
            else:
                a = c
        return (a + b) / 2


# --- what feeds the model: JPEG decoding on CPU workers against nvJPEG on the GPU ------------------


def _picture_size(info: dict[str, Any]) -> int:
    size = info["preprocess"]["image_size"]
    return int(size if isinstance(size, int) else size[0])


def _feed_init() -> None:
    import warnings

    import torch

    torch.set_num_threads(1)  # one core per decoding process: the pool is the parallelism
    warnings.filterwarnings("ignore", module="torchvision")  # decode_jpeg's deprecation notice


def _decode_pil(paths: list[str], size: int) -> np.ndarray:
    """The pipeline's own decoding: PIL, then resize and centre-crop as open_clip's eval transform."""
    from pipeline.encoding.clip import picture_transform
    from pipeline.sources.images import decode_rgb

    to_picture = picture_transform({"size": size, "interpolation": "bicubic", "resize_mode": "shortest"})
    return np.stack([np.asarray(to_picture(decode_rgb(Path(p).read_bytes())), np.uint8) for p in paths])


def _decode_torchvision(paths: list[str], size: int) -> np.ndarray:
    """torchvision.io.decode_jpeg on the CPU (libjpeg-turbo), then the same resize and crop on tensors."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    pictures = [decode_jpeg(torch.frombuffer(bytearray(Path(p).read_bytes()), dtype=torch.uint8), ImageReadMode.RGB)
                for p in paths]
    return _resize_crop(pictures, size).permute(0, 2, 3, 1).numpy()


def _resize_crop(pictures: list[Any], size: int) -> Any:
    """C×H×W uint8 pictures → N×C×size×size uint8: shortest side to `size` (bicubic, antialiased), centre crop."""
    import torch
    from torchvision.transforms.v2 import functional as F

    out = [F.center_crop(F.resize(p, [size], interpolation=F.InterpolationMode.BICUBIC, antialias=True), [size])
           for p in pictures]
    return torch.stack(out)


class _GpuDecoder:
    """Files → N×C×H×W uint8 pictures on the device: bytes read by threads, decoded by nvJPEG in batches
    (`decode_jpeg(list, device="cuda")`), resized and cropped there. In the CPU smoke run the same
    calls decode on the CPU."""

    def __init__(self, size: int, threads: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.size = size
        self.pool = ThreadPoolExecutor(threads)

    def read(self, paths: list[str]) -> Any:
        return self.pool.submit(lambda: [Path(p).read_bytes() for p in paths])

    def decode(self, blobs: list[bytes]) -> Any:
        import warnings

        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
            pictures = decode_jpeg(data, ImageReadMode.RGB, device=DEVICE)
        return _resize_crop(pictures, self.size)

    def close(self) -> None:
        self.pool.shutdown()


def _batches(paths: list[str], batch: int) -> list[list[str]]:
    return [paths[i:i + batch] for i in range(0, len(paths), batch)]


def decode_paths(paths: list[str], size: int, batch: int, workers: int) -> dict[str, float]:
    """Images/s of each way to decode, resize and crop: PIL and torchvision on `workers` processes,
    nvJPEG on the GPU (one process, reads on threads)."""
    rates = {}
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_feed_init) as pool:
        for name, fn in (("PIL", _decode_pil), ("torchvision CPU", _decode_torchvision)):
            pool.starmap(fn, [(b, size) for b in _batches(paths[: workers * 4], 4)])  # warm-up: imports
            t = time.perf_counter()
            for _ in pool.starmap(fn, [(b, size) for b in _batches(paths, batch)], chunksize=1):
                pass
            rates[f"{name} × {workers} processes"] = len(paths) / (time.perf_counter() - t)
    gpu = _GpuDecoder(size, threads=4)
    try:
        gpu.decode(gpu.read(paths[:batch]).result())  # warm-up: nvJPEG's handles and buffers
        _sync()
        t = time.perf_counter()
        pending = gpu.read(paths[:batch])
        for next_batch in _batches(paths, batch)[1:] + [None]:
            blobs = pending.result()
            if next_batch is not None:
                pending = gpu.read(next_batch)
            gpu.decode(blobs)
        _sync()
        rates[_NVJPEG] = len(paths) / (time.perf_counter() - t)
    finally:
        gpu.close()
    return rates


def fed_forward(paths: list[str], info: dict[str, Any], args: argparse.Namespace, workers: int,
                precision: str) -> dict[str, float]:
    """Images/s of the model fed by each decoding path, decoding overlapped with the forward pass:
    worker processes decode the next batches while the model runs (PIL, torchvision CPU), or threads
    read the next batch's bytes while nvJPEG and the model share the GPU."""
    import torch

    from pipeline.encoding.clip import ModelSpec, load
    from pipeline.encoding.units import Encoder

    device = torch.device(DEVICE)
    encoder = Encoder(load(ModelSpec(args.model), device), device, precision)
    mean = torch.tensor(info["preprocess"].get("mean") or (0.48145466, 0.4578275, 0.40821073), device=device)
    std = torch.tensor(info["preprocess"].get("std") or (0.26862954, 0.26130258, 0.27577711), device=device)
    size = _picture_size(info)

    def forward(pictures: Any) -> None:  # N×C×H×W uint8 on the device
        encoder.images((pictures.float().div(255) - mean[:, None, None]) / std[:, None, None])

    rates = {}
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_feed_init) as pool:
        for name, fn in (("PIL", _decode_pil), ("torchvision CPU", _decode_torchvision)):
            pool.starmap(fn, [(b, size) for b in _batches(paths[: workers * 4], 4)])
            forward(torch.zeros(args.batch_size, 3, size, size, dtype=torch.uint8, device=device))
            _sync()
            t = time.perf_counter()
            for pictures in pool.imap(_decode_star, [(fn, b, size) for b in _batches(paths, args.batch_size)]):
                host = torch.from_numpy(pictures).permute(0, 3, 1, 2)
                forward(host.pin_memory().to(device, non_blocking=True) if DEVICE == "cuda" else host)
            rates[f"{name} × {workers} processes"] = len(paths) / (time.perf_counter() - t)
    gpu = _GpuDecoder(size, threads=4)
    try:
        forward(gpu.decode(gpu.read(paths[: args.batch_size]).result()))
        _sync()
        t = time.perf_counter()
        batches = _batches(paths, args.batch_size)
        pending = gpu.read(batches[0])
        for next_batch in batches[1:] + [None]:
            blobs = pending.result()
            if next_batch is not None:
                pending = gpu.read(next_batch)
            forward(gpu.decode(blobs))
        rates[_NVJPEG] = len(paths) / (time.perf_counter() - t)
    finally:
        gpu.close()
    return rates  # the model goes with this frame; main's next part empties the GPU cache


def _decode_star(job: tuple[Any, list[str], int]) -> np.ndarray:
    fn, paths, size = job
    return fn(paths, size)


def picture_agreement(paths: list[str], size: int) -> tuple[float, float]:
    """Mean and largest |difference| in pixel values between the pipeline's PIL pictures and the nvJPEG
    path's: decoders and resize kernels round differently, so a GPU path would be a new model key."""
    import torch

    ours = torch.from_numpy(_decode_pil(paths, size)).permute(0, 3, 1, 2).int()
    gpu = _GpuDecoder(size, threads=1)
    try:
        theirs = gpu.decode(gpu.read(paths).result()).cpu().int()
    finally:
        gpu.close()
    diff = (ours - theirs).abs().float()
    return float(diff.mean()), float(diff.max())


if __name__ == "__main__":
    sys.exit(main())
