"""Synthetic data in real layouts (D3 Parquet + LAION folder), for the demo, tests and benchmarks.

No downloads, no committed binaries: images are drawn with numpy. Real "photographs" are noisy
textures; each generator paints smooth patterns in its own palette. Captions and prompts differ in
style the way D3's do, so a text-only detector can find the shortcut.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from schemas import embeddings_schema, from_columns

# model_gen0..3 in D3's own column order (its record 1275001022128), which the default --generators of
# the webdataset form and h5 imports assume: synthetic rows of any form name each column as D3 does
GENERATORS = (
    "DeepFloyd/IF-I-M-v1.0",
    "stabilityai/stable-diffusion-2-1-base",
    "stabilityai/stable-diffusion-xl-base-1.0",
    "CompVis/stable-diffusion-v1-4",
)
_OBJECTS = ("a red bicycle", "two cats", "an old lighthouse", "a bowl of ramen", "a mountain lake",
            "a vintage car", "a wooden cabin", "a city street", "a sunflower field", "a sailing boat")
_PLACES = ("at dawn", "in the rain", "on a beach", "in a forest", "at night", "in winter")


@dataclass(frozen=True)
class SyntheticD3:
    parquet: Path
    real_images: Path
    rows: int
    missing_real: int
    broken_generated: int


def make_d3(
    root: Path,
    rows: int = 40,
    size: int = 96,
    seed: int = 0,
    missing_real: int = 1,
    broken_generated: int = 1,
    row_group_size: int = 16,
) -> SyntheticD3:
    """Write `root/d3.parquet` (D3 layout) and `root/laion/<id>.jpg` (the real images).

    The last `missing_real` rows get no real image; the first `broken_generated` rows have a
    truncated image_gen0 and, for variety, a CMYK JPEG as image_gen1.
    """
    rng = np.random.default_rng(seed)
    laion = root / "laion"
    laion.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(rows):
        row_id = f"{i:06d}"
        subject = f"{_OBJECTS[i % len(_OBJECTS)]} {_PLACES[(i // len(_OBJECTS)) % len(_PLACES)]}"
        record: dict[str, Any] = {
            "id": row_id,
            "original_prompt": f"Photo of {subject}, taken by user {int(rng.integers(1000, 9999))}",
            "positive_prompt": f"{subject}, highly detailed, trending on artstation, 8k",
            "url": f"https://example.invalid/laion/{row_id}.jpg",
        }
        for k, name in enumerate(GENERATORS):
            img = generated_image(rng, k, size)
            mode = "CMYK" if (k == 1 and i < broken_generated) else "RGB"
            data = encode_image(img.convert(mode), "JPEG" if k % 2 else "PNG")
            if k == 0 and i < broken_generated:
                data = data[: len(data) // 2]  # truncated
            record[f"image_gen{k}"] = {"bytes": data, "path": f"{row_id}_gen{k}.png"}
            record[f"model_gen{k}"] = name
        records.append(record)
        if i < rows - missing_real:
            real_image(rng, size).save(laion / f"{row_id}.jpg", quality=90)
    parquet = root / "d3.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet, row_group_size=row_group_size)
    return SyntheticD3(parquet, laion, rows, missing_real, broken_generated)


def real_image(rng: np.random.Generator, size: int) -> Image.Image:
    """High-frequency texture with sensor-like noise."""
    base = rng.integers(40, 215, size=3)
    noise = rng.normal(0, 38, size=(size, size, 3))
    yy, xx = np.mgrid[0:size, 0:size]
    stripes = 25 * np.sin(xx * rng.uniform(0.2, 0.9))[..., None]
    return Image.fromarray(np.clip(base + noise + stripes, 0, 255).astype(np.uint8), "RGB")


def generated_image(rng: np.random.Generator, generator: int, size: int) -> Image.Image:
    """Smooth gradients in a palette that depends on the generator."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    phase = rng.uniform(0, 2 * np.pi)
    palette = np.array([[230, 90, 60], [60, 160, 230], [120, 220, 90], [200, 90, 220]][generator])
    wave = (np.sin(6 * xx + phase) * np.cos(4 * yy + phase) + 1) / 2
    img = palette * wave[..., None] + (255 - palette) * (1 - wave[..., None]) * 0.4
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def encode_image(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def embeddings_table(model_key: str, modality: str, hashes: list[str], vectors: np.ndarray, dtype: str,
                     norms: np.ndarray | None = None) -> pa.Table:
    """Embedding rows of one model and modality from unit vectors (and their norms, when known): for
    benchmarks and tests that need a store of vectors without encoding anything."""
    schema = embeddings_schema(vectors.shape[1], dtype)
    flat = pa.array(vectors.astype(dtype, copy=False).ravel())
    return from_columns(schema, {
        "model_key": [model_key] * len(hashes),
        "modality": [modality] * len(hashes),
        "content_hash": hashes,
        "vector": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]),
        "norm": None if norms is None else pa.array(np.asarray(norms, np.float32)),
    })
