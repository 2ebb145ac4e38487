"""Image perturbations for robustness tests: JPEG, resize, blur, crop, noise, as pure functions.

Each operation maps (RGB image, strength, seed bytes) to new encoded bytes, deterministically: the
same image and operation always give the same bytes, so a derived sample's id (the hash of its bytes)
is stable and a rerun adds nothing. JPEG output for `jpeg`, lossless PNG for the rest (the
perturbation, not a new compression, is what is measured).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from pipeline.errors import PipelineError


@dataclass(frozen=True)
class Perturbation:
    """One operation at one strength, e.g. jpeg:75. `name` is what the samples table records."""

    op: str
    strength: float

    @property
    def name(self) -> str:
        return f"{self.op}:{self.strength:g}"

    @property
    def suffix(self) -> str:
        return "jpg" if self.op == "jpeg" else "png"

    def apply(self, image: Image.Image, seed: bytes) -> bytes:
        return _OPS[self.op][0](image, self.strength, seed)


def _jpeg(image: Image.Image, quality: float, seed: bytes) -> bytes:
    return _encode(image, "JPEG", quality=int(quality), subsampling=2, optimize=False)


def _resize(image: Image.Image, scale: float, seed: bytes) -> bytes:
    w, h = image.size
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return _encode(image.resize(size, Image.Resampling.BICUBIC), "PNG")


def _blur(image: Image.Image, sigma: float, seed: bytes) -> bytes:
    return _encode(image.filter(ImageFilter.GaussianBlur(sigma)), "PNG")


def _crop(image: Image.Image, keep: float, seed: bytes) -> bytes:
    """The central `keep` fraction of each side."""
    w, h = image.size
    cw, ch = max(1, round(w * keep)), max(1, round(h * keep))
    left, top = (w - cw) // 2, (h - ch) // 2
    return _encode(image.crop((left, top, left + cw, top + ch)), "PNG")


def _noise(image: Image.Image, sigma: float, seed: bytes) -> bytes:
    """Additive Gaussian noise, sigma a fraction of the 0..255 range; the seed comes from the sample."""
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(seed + b"noise").digest()[:8], "little"))
    pixels = np.asarray(image, dtype=np.float32)
    noisy = np.clip(pixels + rng.normal(0.0, sigma * 255.0, pixels.shape), 0, 255).round().astype(np.uint8)
    return _encode(Image.fromarray(noisy, "RGB"), "PNG")


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


# op -> (function, allowed strengths as a predicate, what the strength means)
_OPS: dict[str, tuple[Callable[[Image.Image, float, bytes], bytes], Callable[[float], bool], str]] = {
    "jpeg": (_jpeg, lambda v: 1 <= v <= 100 and v == int(v), "a JPEG quality from 1 to 100"),
    "resize": (_resize, lambda v: 0 < v <= 4, "a scale factor in (0, 4]"),
    "blur": (_blur, lambda v: 0 < v <= 50, "a Gaussian sigma in pixels in (0, 50]"),
    "crop": (_crop, lambda v: 0 < v <= 1, "the kept fraction of each side in (0, 1]"),
    "noise": (_noise, lambda v: 0 < v <= 1, "a noise sigma as a fraction of 255 in (0, 1]"),
}
OPS = tuple(_OPS)


def parse_ops(specs: list[str] | tuple[str, ...]) -> tuple[Perturbation, ...]:
    """`["jpeg:90,75", "blur:1"]` -> jpeg:90, jpeg:75, blur:1; a sentence on any mistake."""
    out: list[Perturbation] = []
    for spec in specs:
        op, _, values = spec.partition(":")
        if op not in _OPS:
            raise PipelineError(f"Unknown perturbation {op!r}; choose from {', '.join(OPS)} (e.g. jpeg:90,75).")
        if not values:
            raise PipelineError(f"Perturbation {op!r} needs strengths, e.g. {op}:{_example(op)}.")
        for text in values.split(","):
            try:
                value = float(text)
            except ValueError:
                raise PipelineError(f"{op}:{values}: {text!r} is not a number.") from None
            if not _OPS[op][1](value):
                raise PipelineError(f"{op}:{text} is out of range: the strength is {_OPS[op][2]}.")
            p = Perturbation(op, value)
            if p not in out:
                out.append(p)
    if not out:
        raise PipelineError("Give at least one perturbation, e.g. --ops jpeg:90,75.")
    return tuple(out)


def _example(op: str) -> str:
    return {"jpeg": "90,75", "resize": "0.5", "blur": "1,2", "crop": "0.8", "noise": "0.02"}[op]
