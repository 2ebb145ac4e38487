"""Image bytes → RGB picture, with every odd mode handled and every hostile input named.

`decode_rgb` either returns an RGB `PIL.Image` or raises `UndecodableImage` with a short reason
code (`empty`, `not_an_image`, `truncated`, `corrupt`, `too_many_pixels`) that lands in the
quarantine table.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000  # ~8000 x 8000; larger inputs are quarantined, not decoded
_WHITE = (255, 255, 255)


class UndecodableImage(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `data` to an RGB image, or raise `UndecodableImage` naming why it cannot be."""
    if not data:
        raise UndecodableImage("empty", "zero bytes")
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # a process-wide PIL switch someone else turned on
        raise UndecodableImage("corrupt", "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on in this process; "
                               "truncated files would decode half-grey, so nothing is decoded")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise UndecodableImage(
                    "too_many_pixels", f"{width}x{height} exceeds the limit of {max_pixels} pixels"
                )
            img.load()
    except UndecodableImage:
        raise
    except UnidentifiedImageError as exc:  # PIL's own message names its BytesIO object, not the input
        raise UndecodableImage("not_an_image", f"{len(data)} bytes in no image format PIL reads "
                               f"(they begin {data[:8].hex(' ')})") from exc
    except Image.DecompressionBombError as exc:
        raise UndecodableImage("too_many_pixels", str(exc)) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = "truncated" if "truncated" in str(exc).lower() else "corrupt"
        raise UndecodableImage(reason, str(exc) or type(exc).__name__) from exc
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Orient by EXIF, scale deep modes to 8 bits, composite transparency on white."""
    img = ImageOps.exif_transpose(img) or img
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _deep_grey_to_rgb(img)
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    elif mode == "L" and "transparency" in img.info:
        img = img.convert("LA")
    if img.mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # CMYK (via its ICC-less transform), YCbCr, LAB, 1-bit, P, L


def _deep_grey_to_rgb(img: Image.Image) -> Image.Image:
    arr = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        arr = (arr - lo) / (hi - lo or 1.0) * 255.0
    else:
        arr = arr / 257.0  # 0..65535 → 0..255; PIL's own convert would clip at 255 instead
    grey = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    return grey.convert("RGB")
