"""Shared fixtures: tiny synthetic stores built in tmp_path, encoded with a random-weight CLIP."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.encoding.clip import ModelSpec
from pipeline.stages.encode import EncodeConfig
from pipeline.stages.ingest import IngestConfig
from pipeline.stages.ingest import run as ingest
from pipeline.store.layout import Store
from pipeline.synthetic import SyntheticD3, make_d3

TINY = "Tiny-ViT-16"  # small open_clip config, random weights


def jpeg(color: tuple[int, int, int] = (200, 30, 30), size: int = 32, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(sum(color))
    arr = np.clip(np.array(color) + rng.normal(0, 10, (size, size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def encode_config(store: Store, **kw: object) -> EncodeConfig:
    defaults: dict = {"workers": 0, "batch_size": 16, "shard_rows": 64}
    defaults.update(kw)
    return EncodeConfig(store, ModelSpec(TINY), **defaults)


@pytest.fixture
def d3(tmp_path: Path) -> SyntheticD3:
    return make_d3(tmp_path / "src", rows=12, size=48)


@pytest.fixture
def d3_store(tmp_path: Path, d3: SyntheticD3) -> Store:
    store = Store(tmp_path / "store")
    ingest(IngestConfig(d3.parquet, "d3", store, real_images=d3.real_images))
    return store


def planted_store(
    root: Path,
    rows: int = 400,
    dim: int = 16,
    signal: float = 1.0,
    shuffle_labels: bool = False,
    text_shortcut: float = 0.0,
    seed: int = 0,
    file_name: str = "0000.h5",
) -> Store:
    """A store of imported features (reference HDF5 layout) with a planted image signal.

    Generated image vectors are shifted by `signal` along a fixed direction; `shuffle_labels`
    redistributes all image vectors at random over real/generated (no signal left);
    `text_shortcut` shifts the prompts' vectors away from the captions'.
    """
    import h5py

    from pipeline.stages.import_features import ImportConfig
    from pipeline.stages.import_features import run as import_features

    rng = np.random.default_rng(seed)
    direction = np.random.default_rng(99).normal(size=dim)
    direction /= np.linalg.norm(direction)
    real = rng.normal(size=(rows, dim))
    gens = [rng.normal(size=(rows, dim)) + signal * direction for _ in range(4)]
    if shuffle_labels:
        pool = np.concatenate([real, *gens])[rng.permutation(5 * rows)]
        real, gens = pool[:rows], [pool[(k + 1) * rows:(k + 2) * rows] for k in range(4)]
    src = root / "h5"
    src.mkdir(parents=True, exist_ok=True)
    with h5py.File(src / file_name, "w") as f:
        f["real"] = real.astype(np.float32)
        for k, g in enumerate(gens):
            f[f"image_gen{k}"] = g.astype(np.float32)
        f["original_prompt"] = rng.normal(size=(rows, dim)).astype(np.float32)
        f["positive_prompt"] = (rng.normal(size=(rows, dim)) + text_shortcut * direction[::-1]).astype(np.float32)
    store = Store(root / "store")
    import_features(ImportConfig(src / file_name, "h5", store, "planted"))
    return store


# --- the stages as tests call them: positional store + config, as before the stage contract ---


def train_run(store: Store, config: object, skip_existing: bool = False) -> object:
    from pipeline.stages import train
    from pipeline.stages.train import TrainJob

    return train.run(TrainJob(store, config, skip_existing))  # type: ignore[arg-type]


def locked(store: Store) -> object:
    """The store's writer lock, for tests that change the catalog directly (may make a new store)."""
    from pipeline.store.writes import writing

    return writing(store, create=True)


def kill_when(proc: object, ready: object, timeout: float) -> bool:
    """Poll `ready()` until it holds (or `proc` ends, or `timeout` passes), then SIGKILL `proc`.

    Returns whether the process was still running when killed, so a test can insist that the kill
    landed mid-run."""
    import signal
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:  # type: ignore[attr-defined]
        if ready():  # type: ignore[operator]
            break
        time.sleep(0.02)
    alive = proc.poll() is None  # type: ignore[attr-defined]
    proc.send_signal(signal.SIGKILL)  # type: ignore[attr-defined]
    proc.wait()  # type: ignore[attr-defined]
    return alive
