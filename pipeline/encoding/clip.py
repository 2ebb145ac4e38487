"""Loading an open_clip model the normal way, and naming what it produces (the model key).

`--pretrained` takes an open_clip tag (`openai`, `laion2b_s34b_b79k`, …), a local checkpoint
file, or nothing: then the weights are random (seeded) and every output says so. Small configs
shipped in `model_configs/` (e.g. `Tiny-ViT-16`) are registered with open_clip on first use.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import PipelineError
from pipeline.store.layout import safe_name

if TYPE_CHECKING:
    import torch

_CONFIG_DIR = Path(__file__).parent / "model_configs"
RANDOM = "random"


@dataclass(frozen=True)
class ModelSpec:
    name: str  # open_clip architecture (or hf-hub:org/repo)
    pretrained: str | None = None  # tag, checkpoint path, or None for random weights
    seed: int = 0  # initialises random weights

    @property
    def random_weights(self) -> bool:
        return not self.pretrained


@dataclass
class LoadedModel:
    model: Any
    preprocess: Any
    tokenizer: Any
    model_key: str
    info: dict[str, Any]  # what model.json records: architecture, weights, preprocessing, dim


def register_configs() -> None:
    import open_clip

    if "Tiny-ViT-16" not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_DIR)


def known_models() -> dict[str, list[str]]:
    """Every open_clip architecture known here (ours included) with its pretrained tags."""
    import open_clip

    register_configs()
    tags: dict[str, list[str]] = {}
    for name, tag in open_clip.list_pretrained():
        tags.setdefault(name, []).append(tag)
    return {name: tags.get(name, []) for name in open_clip.list_models()}


def load(spec: ModelSpec, device: torch.device) -> LoadedModel:
    """Create the model, its eval transform and tokenizer; compute the model key."""
    import open_clip
    import torch

    register_configs()
    known = spec.name.startswith(("hf-hub:", "local-dir:")) or spec.name in open_clip.list_models()
    if not known:
        raise PipelineError(
            f"Unknown open_clip model {spec.name!r}; `pipeline models` lists the architectures."
        )
    weights = weights_id(spec)
    pretrained = spec.pretrained
    if pretrained and Path(pretrained).expanduser().is_file():
        pretrained = str(Path(pretrained).expanduser())
    try:
        # random weights come from torch's global generator: seed a forked copy, restored after
        with torch.random.fork_rng(devices=[]), _quiet_open_clip():
            torch.manual_seed(spec.seed)
            model, _, preprocess = open_clip.create_model_and_transforms(
                spec.name, pretrained=pretrained, device=device
            )
    except RuntimeError as exc:
        raise PipelineError(f"Could not load {spec.name} weights {spec.pretrained!r}: {exc}") from exc
    except Exception as exc:  # hub/network failures come in many types; all mean the same here
        if "hf" in type(exc).__module__ or "connect" in str(exc).lower() or "url" in str(exc).lower():
            raise PipelineError(
                f"Could not fetch pretrained weights {spec.pretrained!r} for {spec.name} "
                f"(no network or hub?): give a local checkpoint file with --pretrained PATH."
            ) from exc
        if pretrained and Path(pretrained).is_file():  # a file, but not a state dict open_clip can load
            raise PipelineError(
                f"--pretrained {spec.pretrained} is not a {spec.name} checkpoint open_clip can load "
                f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else 'unreadable'})."
            ) from exc
        raise
    model.eval()
    tokenizer = open_clip.get_tokenizer(spec.name)
    pp = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    pp["image_size"] = _image_size(model)
    dim = _embed_dim(model, device)
    pp_digest = hashlib.sha256(json.dumps(pp, sort_keys=True, default=str).encode()).hexdigest()[:8]
    model_key = safe_name(f"{spec.name}__{weights}__pp{pp_digest}")
    info = {
        "model_key": model_key,
        "architecture": spec.name,
        "pretrained": spec.pretrained,
        "weights": weights,
        "random_weights": spec.random_weights,
        "seed": spec.seed if spec.random_weights else None,
        "preprocess": pp,
        "dim": dim,
        "open_clip_version": open_clip.__version__,
        "checkpoint_stat": checkpoint_stat(spec),  # lets a no-op run skip re-hashing the checkpoint
    }
    return LoadedModel(model, preprocess, tokenizer, model_key, info)


class _DropRandomInitWarning(logging.Filter):
    """open_clip warns through the root logger that no weights were loaded; we label random weights ourselves."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pretrained weights" not in record.getMessage().lower()


@contextmanager
def _quiet_open_clip() -> Iterator[None]:
    # A filter on the root logger for the duration of model creation only; its level is untouched.
    root = logging.getLogger()
    drop = _DropRandomInitWarning()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def recorded_info(infos: list[dict[str, Any]], spec: ModelSpec) -> dict[str, Any] | None:
    """The one model.json among `infos` that `spec` would write again, or None.

    This is how `encode` knows its model key without loading any weights: the key is a function of
    the architecture, the weights id and the preprocessing, and model.json records all three. Two
    candidates (open_clip changed a model's preprocessing between runs) mean: load and see.
    """
    usable = [i for i in infos if i.get("architecture") == spec.name and "preprocess" in i and "dim" in i
              and "model_key" in i]
    stat = checkpoint_stat(spec)
    if stat is not None:  # the same checkpoint file, unchanged since it was hashed: no need to hash it again
        same = [i for i in usable if i.get("pretrained") == spec.pretrained and i.get("checkpoint_stat") == stat]
        if len(same) == 1:
            return same[0]
    weights = weights_id(spec)
    found = [i for i in usable if i.get("weights") == weights]
    return found[0] if len(found) == 1 else None


def checkpoint_stat(spec: ModelSpec) -> list[int] | None:
    """Size and modification time (ns) of a local checkpoint file; None for tags and random weights."""
    if not spec.pretrained:
        return None
    path = Path(spec.pretrained).expanduser()
    if not path.is_file():
        return None
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def split_transform(preprocess: dict[str, Any]) -> tuple[Any, Any]:
    """A model's eval transform rebuilt from model.json's `preprocess`, cut in two where the picture
    becomes a tensor: (PIL image → resized, cropped PIL image, H×W×3 uint8 array → normalised tensor).

    Decoding workers run the first half and ship uint8 pictures (4× smaller than float tensors);
    the model's process runs the second.
    """
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from torchvision.transforms import Compose

    known = PreprocessCfg.__dataclass_fields__
    cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in preprocess.items() if k in known}
    steps = list(image_transform_v2(PreprocessCfg(**cfg), is_train=False).transforms)
    cut = next((i for i, s in enumerate(steps) if type(s).__name__.endswith("ToTensor")), None)
    if cut is None:
        raise PipelineError(f"The preprocessing {preprocess} has no ToTensor step; this encoder cannot split it.")
    return Compose(steps[:cut]), Compose(steps[cut:])


def picture_transform(preprocess: dict[str, Any]) -> Any:
    """The first half of `split_transform` (PIL image → resized, cropped RGB PIL image) for the usual
    eval preprocessing, built on PIL alone: importing open_clip pulls in transformers and timm (~9 s
    per decoding process, measured with 15 of them starting at once). Other resize modes fall back
    to open_clip's own steps. tests/test_encode.py checks the pixels equal open_clip's."""
    cfg = {k: v for k, v in preprocess.items() if v is not None}
    size = cfg.get("size", 224)
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    resize_mode = cfg.get("resize_mode") or "shortest"
    interpolation = cfg.get("interpolation") or "bicubic"
    if cfg.get("mode", "RGB") != "RGB" or interpolation not in ("bicubic", "bilinear", "random"):
        return split_transform(preprocess)[0]
    if resize_mode == "squash" or (resize_mode == "shortest" and h == w):
        return _ResizeCrop(h, w, resize_mode == "squash", "bilinear" if interpolation == "bilinear" else "bicubic")
    return split_transform(preprocess)[0]


@dataclass(frozen=True)
class _ResizeCrop:
    """torchvision's Resize(h or (h, w)) + CenterCrop((h, w)) on a PIL image, as open_clip's eval
    transform composes them, then open_clip's MaybeConvertMode('RGB'); the same PIL calls."""

    height: int
    width: int
    squash: bool  # resize to (h, w) exactly; else the shorter side to h, then crop the centre
    interpolation: str

    def __call__(self, img: Any) -> Any:
        from PIL import Image

        resample = Image.Resampling.BILINEAR if self.interpolation == "bilinear" else Image.Resampling.BICUBIC
        w, h = img.size
        if self.squash:
            size = (self.width, self.height)
        else:  # torchvision's _compute_resized_output_size for an int size
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.height, int(self.height * long / short)
            size = (new_short, new_long) if w <= h else (new_long, new_short)
        if size != (w, h):
            img = img.resize(size, resample)
        w, h = img.size
        if (w, h) != (self.width, self.height):  # never larger than the image here: no padding
            top, left = int(round((h - self.height) / 2.0)), int(round((w - self.width) / 2.0))
            img = img.crop((left, top, left + self.width, top + self.height))
        return img if img.mode == "RGB" else img.convert("RGB")


def weights_id(spec: ModelSpec) -> str:
    if not spec.pretrained:
        return f"{RANDOM}-seed{spec.seed}"
    path = Path(spec.pretrained).expanduser()
    if path.is_file():
        return f"ckpt-{_file_digest(path)[:12]}"
    if spec.pretrained.startswith(("/", ".", "~")) or spec.pretrained.endswith((".pt", ".bin", ".safetensors")):
        raise PipelineError(f"Checkpoint file {spec.pretrained} does not exist.")
    return spec.pretrained


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _image_size(model: Any) -> Any:
    size = getattr(model.visual, "image_size", None)
    return list(size) if isinstance(size, (tuple, list)) else size


def _embed_dim(model: Any, device: torch.device) -> int:
    import torch

    dim = getattr(model.visual, "output_dim", None)
    if isinstance(dim, int):
        return dim
    with torch.no_grad():
        return int(model.encode_text(torch.zeros(1, 77, dtype=torch.long, device=device)).shape[-1])
