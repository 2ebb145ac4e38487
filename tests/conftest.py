"""Shared fixtures: tiny synthetic stores built in tmp_path, encoded with a random-weight CLIP."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.clip import ModelSpec
from pipeline.encode import EncodeConfig
from pipeline.ingest import IngestConfig, ingest
from pipeline.store import Store
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
