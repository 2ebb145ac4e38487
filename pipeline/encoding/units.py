"""The units of work of `encode`: Arrow rows in, Arrow rows out, one model per instance.

`DecodeImages(spec)` reads, re-hashes and decodes pending sample rows; it needs no model, so it
runs in decoding processes or Ray tasks. `EncodeImages(spec)` and
`EncodeTexts(...)` load the model once, in their constructor, and return rows of
`schemas.encoded_schema`: a vector and its norm, or the reason there is none. Both engines
(`pipeline/engines/`) call exactly these; only where they run differs. Each model unit also splits
its call in two, `start(batch)` then `finish(started)`, so that a caller can queue the next batch on
a GPU before reading the last one back.
"""

from __future__ import annotations

import copy
import itertools
import os
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline.encoding.clip import LoadedModel, ModelSpec, load, picture_transform, split_transform
from pipeline.errors import PipelineError
from pipeline.features.vectors import normalise
from pipeline.sources.images import DEFAULT_MAX_PIXELS, UndecodableImage, decode_rgb
from pipeline.sources.locations import Location, LocationReader
from pipeline.sources.reading import DEFAULT_MAX_BYTES, Expected, Limits, Unreadable
from schemas import QUARANTINE, embeddings_schema, encoded_schema, from_columns
from trainer.precision import cpu_bf16_native

PIXELS = "pixels"  # the column DecodeImages adds: the picture after resize/crop, uint8 H×W×3
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class EncodeSpec:
    """What a worker needs to rebuild the model and its preprocessing: plain data, picklable."""

    model: ModelSpec
    model_key: str
    dim: int
    preprocess: dict[str, Any] = field(default_factory=dict)  # as model.json records it
    dtype: str = "float16"
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES  # the most read of one image (a file, tar member or Parquet cell)
    device: str = "auto"  # where the model runs: auto | cpu | cuda | mps
    precision: str = "fp32"  # fp32 | bf16 | fp16

    @staticmethod
    def from_info(model: ModelSpec, info: dict[str, Any], dtype: str, max_pixels: int,
                  max_bytes: int = DEFAULT_MAX_BYTES, device: str = "auto", precision: str = "fp32") -> EncodeSpec:
        return EncodeSpec(model, info["model_key"], int(info["dim"]), dict(info["preprocess"]), dtype, max_pixels,
                          max_bytes, device, precision)

    @property
    def schema(self) -> pa.Schema:
        return encoded_schema(self.dim, self.dtype)

    @property
    def picture_shape(self) -> tuple[int, int, int]:
        size: Any = self.preprocess.get("size") or self.preprocess.get("image_size") or 224  # what the crop makes
        h, w = (size, size) if isinstance(size, int) else size
        return int(h), int(w), 3


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError("--device cuda was asked for, but torch sees no CUDA GPU here.")
    return torch.device(name)


def default_workers(device: torch.device) -> int:
    """Decoding processes that overlap the model without starving it.

    On a GPU the CPU cores are free: use most of them. On the CPU the model already keeps every
    core busy and decoding costs ~1 ms of a ~28 ms ViT-B-32 image, so on a small machine a worker
    process only oversubscribes the cores (measured on 2 cores: 0.90 of forward-only with one worker,
    0.99 decoding in the main process; bench/bench_encode.py). With 0 workers decoding runs in a
    thread, one batch ahead (`pipeline.ahead.in_thread`): bf16 on 2 cores, 0.90-0.93 of
    forward-only against 0.81-0.84 decoding between the forward passes.
    """
    cores = os.cpu_count() or 2
    if device.type == "cpu":
        return 0 if cores <= 4 else min(4, cores // 8)
    return max(1, min(8, cores - 1))


InFlight = tuple[torch.Tensor, Any]  # features (on the host once the event has passed), a CUDA event or None


class Encoder:
    """A loaded CLIP model on a device at a precision; returns unit vectors and their norms.

    bf16 on a CPU that computes it natively runs a bf16 copy of the model (weights and activations in
    bf16, every product accumulating in fp32) rather than fp32 weights under autocast: autocast casts
    every weight on every batch, keeps LayerNorm and the residual stream in fp32 (a cast back and
    forth around every block) and turns off torch's fused attention, which held ViT-B-32 to 23% of
    the bf16 matrix-product rate. bench/bench_encode.py measures both: ViT-B-32 on 2 AMX cores,
    46-52 against 8.4 images per CPU-second (fp32: 10.7), 49-61% of a 4096² bf16 product; vectors
    within a cosine of 0.9999 of fp32's. Elsewhere (a GPU, or a CPU that emulates bf16)
    bf16 stays autocast. `bf16_weights` forces the choice (the bench keeps the old path measurable).
    `shared=False` says nobody else uses `loaded`: its model is then cast in place, not copied.
    """

    def __init__(self, loaded: LoadedModel, device: torch.device, precision: str,
                 bf16_weights: bool | None = None, shared: bool = True) -> None:
        if precision not in PRECISIONS:
            raise PipelineError(f"--precision must be one of {', '.join(PRECISIONS)}.")
        if precision == "fp16" and device.type == "cpu":
            raise PipelineError("--precision fp16 needs a GPU; on the CPU use bf16 or fp32.")
        self.loaded = loaded
        self.device = device
        self.precision = precision
        if bf16_weights is None:
            bf16_weights = precision == "bf16" and device.type == "cpu" and cpu_bf16_native()
        self.bf16_weights = bf16_weights and precision == "bf16"
        self.model = loaded.model
        if self.bf16_weights:  # a copy when shared: other encoders of the caller's model still see fp32
            self.model = bf16_copy(loaded.model) if shared else loaded.model.to(torch.bfloat16)
        self.image_forward_passes = 0
        self.text_forward_passes = 0

    @property
    def transform(self) -> Any:
        return self.loaded.preprocess

    def images(self, pixels: torch.Tensor) -> np.ndarray:
        """Unit vectors of a batch of preprocessed images."""
        return self.images_and_norms(pixels)[0]

    def texts(self, texts: list[str]) -> np.ndarray:
        """Unit vectors of a batch of texts."""
        return self.texts_and_norms(texts)[0]

    def images_and_norms(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return self.finish(self.start_images(pixels))

    def texts_and_norms(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return self.finish(self.start_texts(texts))

    def start_images(self, pixels: torch.Tensor) -> InFlight:
        """Queue the forward pass of a batch of preprocessed images and the copy of its features back
        to the host; on a GPU this returns before either is done."""
        self.image_forward_passes += 1
        dtype = torch.bfloat16 if self.bf16_weights else None
        with torch.inference_mode(), self._autocast():
            return _read_back(self.model.encode_image(pixels.to(self.device, dtype, non_blocking=True)))

    def start_texts(self, texts: list[str]) -> InFlight:
        self.text_forward_passes += 1
        tokens = self.loaded.tokenizer(texts).to(self.device)
        with torch.inference_mode(), self._autocast():
            return _read_back(self.model.encode_text(tokens))

    def finish(self, started: InFlight) -> tuple[np.ndarray, np.ndarray]:
        """Wait for a started batch; its unit vectors and their norms."""
        features, copied = started
        if copied is not None:
            copied.synchronize()
        return _unit_and_norm(features)

    def _autocast(self) -> Any:
        if self.precision == "fp32" or self.bf16_weights:
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)


@dataclass(frozen=True)
class Decoded:
    """A decoded batch: encoded-schema rows without vectors, and every row's picture (zeros where
    `ok` is False). The local engine passes this between processes (the pictures as a tensor in
    shared memory); `as_table`/`from_table` give the Arrow form that the Ray engine passes."""

    rows: pa.Table
    pictures: np.ndarray | torch.Tensor  # uint8 N×H×W×3
    ok: np.ndarray  # bool N: decoded

    def as_table(self) -> pa.Table:
        pictures = np.asarray(self.pictures)
        flat = pa.array(pictures.reshape(-1))  # no copy
        column = pa.FixedSizeListArray.from_arrays(flat, int(np.prod(pictures.shape[1:])), mask=pa.array(~self.ok))
        return self.rows.append_column(PIXELS, column)

    @staticmethod
    def from_table(rows: pa.Table, shape: tuple[int, int, int]) -> Decoded:
        """The inverse of `as_table`, without copying the pictures (read-only)."""
        pixels = rows.column(PIXELS).combine_chunks()
        ok = pc.is_valid(pixels).to_numpy(zero_copy_only=False)
        size = int(np.prod(shape))
        values = pixels.values.slice(pixels.offset * size, len(pixels) * size)
        pictures = values.to_numpy(zero_copy_only=False).reshape(-1, *shape)
        return Decoded(rows.drop_columns([PIXELS]), pictures, ok)

    def pin_memory(self) -> Decoded:
        """Page-locked pictures (DataLoader's pin-memory thread calls this): their copy to the GPU can
        then run while this process does other work."""
        return Decoded(self.rows, _as_tensor(self.pictures).pin_memory(), self.ok)


class DecodeImages:
    """Pending sample rows → encoded-schema rows without vectors, plus a `pixels` column.

    Reads are bounded (`pipeline.sources.reading`: regular files only, non-blocking opens, at most
    `spec.max_bytes`) and checked against what ingest recorded: a file replaced since (another size,
    seen before a byte is read; or other bytes, which no longer match its `sample_id`) is
    quarantined as `changed_since_ingest` rather than encoded under it.
    """

    def __init__(self, spec: EncodeSpec) -> None:
        self.spec = spec
        self.to_picture = picture_transform(spec.preprocess)  # PIL only: no open_clip import here
        self.reader: LocationReader | None = None  # made on first use: it caches per process

    def __call__(self, rows: pa.Table) -> pa.Table:
        return self.decode(rows).as_table()

    def decode(self, rows: pa.Table) -> Decoded:
        self.reader = self.reader or LocationReader(Limits(self.spec.max_bytes))
        shape = self.spec.picture_shape
        pictures = np.zeros((rows.num_rows, *shape), np.uint8)
        ok = np.zeros(rows.num_rows, bool)
        reasons: list[str | None] = []
        details: list[str | None] = []
        for i, row in enumerate(rows.to_pylist()):
            picture, reason, detail = self._decode(row, shape)
            if picture is not None:
                pictures[i], ok[i] = picture, True
            reasons.append(reason)
            details.append(detail)
        return Decoded(encoded_rows(self.spec, "image", rows, reasons, details), pictures, ok)

    def _decode(self, row: dict[str, Any], shape: tuple[int, ...]) -> tuple[np.ndarray | None, str | None, str | None]:
        assert self.reader is not None
        try:
            data = self.reader.read(Location.from_row(row), Expected.of(row))
        except Unreadable as exc:
            return None, exc.reason, exc.detail
        except OSError as exc:  # not one of the reader's own: an I/O error in the middle of a read
            return None, "unreadable", str(exc) or type(exc).__name__
        try:
            picture = np.asarray(self.to_picture(decode_rgb(data, self.spec.max_pixels)), np.uint8)
        except UndecodableImage as exc:
            return None, exc.reason, exc.detail
        if picture.shape != shape:
            raise PipelineError(f"Preprocessing gave a {picture.shape} picture, not {shape}: unsupported resize mode.")
        return picture, None, None


class EncodeImages:
    """Pending or decoded sample rows → encoded-schema image rows. Loads the model once, here."""

    def __init__(self, spec: EncodeSpec, loaded: LoadedModel | None = None) -> None:
        self.spec = spec
        self.encoder = _encoder(spec, loaded)
        _, self.to_tensor = split_transform(spec.preprocess)
        self.scale = _plain_normalise(self.to_tensor)  # (mean, std), or None: apply the steps per picture
        self._mean_std = None if self.scale is None else tuple(
            torch.tensor(v, dtype=torch.float32, device=self.encoder.device)[:, None, None] for v in self.scale)
        self._decode: DecodeImages | None = None

    def __call__(self, rows: pa.Table) -> pa.Table:
        return self.finish(self.start(rows))

    def start(self, batch: pa.Table | Decoded) -> Started:
        """Queue a batch's forward pass (rows with or without `pixels`, or a `Decoded`); `finish` gives
        its rows. On a GPU this returns before the pass is done."""
        if isinstance(batch, pa.Table):
            if PIXELS in batch.column_names:
                batch = Decoded.from_table(batch, self.spec.picture_shape)
            else:  # not decoded by a worker: decode here
                self._decode = self._decode or DecodeImages(self.spec)
                batch = self._decode.decode(batch)
        ok = batch.ok
        if not ok.any():
            return Started(batch.rows, ok, None)
        pictures = _as_tensor(batch.pictures)
        if not ok.all():  # the failed rows' zeros stay behind; no copy when every picture decoded
            pictures = pictures[torch.from_numpy(ok)]
        return Started(batch.rows, ok, self.encoder.start_images(self._tensors(pictures)))

    def finish(self, started: Started) -> pa.Table:
        n = started.rows.num_rows
        vectors = np.zeros((n, self.spec.dim), np.float32)
        norms = np.full(n, np.nan, np.float32)
        if started.in_flight is not None:
            vectors[started.ok], norms[started.ok] = self.encoder.finish(started.in_flight)
        return _with_vectors(started.rows, self.spec, vectors, norms, started.ok)

    def _tensors(self, pictures: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 N×H×W×3 → the model's input. When the tail of the transform is ToTensor + Normalize,
        do both on the whole batch on the device (uint8 crosses the bus, 4× less): the same float32
        operations as torchvision's, so the same numbers."""
        if self._mean_std is None:
            return torch.stack([self.to_tensor(p) for p in np.asarray(pictures)])
        mean, std = self._mean_std
        batch = _as_tensor(pictures).to(self.encoder.device, non_blocking=True)  # async from pinned memory
        return (batch.permute(0, 3, 1, 2).float().div(255) - mean) / std


class EncodeTexts:
    """Rows with `text_hash` and `text` → encoded-schema text rows. Loads the model once, here."""

    def __init__(self, spec: EncodeSpec, loaded: LoadedModel | None = None) -> None:
        self.spec = spec
        self.encoder = _encoder(spec, loaded)

    def __call__(self, rows: pa.Table) -> pa.Table:
        return self.finish(self.start(rows))

    def start(self, rows: pa.Table) -> Started:
        n = rows.num_rows
        table = encoded_rows(self.spec, "text", rows, [None] * n, [None] * n)
        if not n:
            return Started(table, np.zeros(0, bool), None)
        return Started(table, np.ones(n, bool), self.encoder.start_texts(rows.column("text").to_pylist()))

    def finish(self, started: Started) -> pa.Table:
        if started.in_flight is None:
            return started.rows
        vectors, norms = self.encoder.finish(started.in_flight)
        return _with_vectors(started.rows, self.spec, vectors, norms, started.ok)


@dataclass(frozen=True)
class Started:
    """A batch whose forward pass is queued: its rows so far, which of them get a vector, the pass."""

    rows: pa.Table
    ok: np.ndarray
    in_flight: InFlight | None


def split_encoded(encoded: pa.Table, spec: EncodeSpec, now: datetime) -> tuple[pa.Table, pa.Table]:
    """Encoded rows → (embeddings rows, quarantine rows), each in its stored schema."""
    stored = embeddings_schema(spec.dim, spec.dtype)
    embeddings = encoded.filter(pc.is_valid(encoded.column("vector"))).select(stored.names).cast(stored)
    failed = encoded.filter(pc.is_valid(encoded.column("reason")))
    n = failed.num_rows
    quarantine = from_columns(QUARANTINE, {
        **{name: failed.column(name) for name in QUARANTINE.names if name in failed.column_names},
        "stage": ["decode"] * n,
        "recorded_at": [now] * n,
    })
    return embeddings, quarantine


def bf16_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose floating-point parameters and buffers are bf16; the original is left
    as it was. The fp32 tensors are never duplicated: each is cast straight into the copy, which costs
    half the fp32 model's memory."""
    memo: dict[int, Any] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.is_floating_point() and id(tensor) not in memo:
            cast = tensor.detach().to(torch.bfloat16)
            memo[id(tensor)] = torch.nn.Parameter(cast, requires_grad=False) \
                if isinstance(tensor, torch.nn.Parameter) else cast
    return copy.deepcopy(model, memo)


# --- private -------------------------------------------------------------------------------


def _plain_normalise(tail: Any) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    steps = list(getattr(tail, "transforms", []))
    names = [type(t).__name__ for t in steps]
    if len(steps) == 2 and names[0].endswith("ToTensor") and names[1] == "Normalize" and not steps[1].inplace:
        return tuple(map(float, steps[1].mean)), tuple(map(float, steps[1].std))
    return None


def _encoder(spec: EncodeSpec, loaded: LoadedModel | None) -> Encoder:
    where = resolve_device(spec.device)
    # a model loaded here is this unit's alone: bf16 casts it in place (no second copy in memory)
    encoder = Encoder(loaded or load(spec.model, where), where, spec.precision, shared=loaded is not None)
    if encoder.loaded.model_key != spec.model_key:
        raise PipelineError(
            f"{spec.model.name} now loads as {encoder.loaded.model_key}, not {spec.model_key} as the store "
            "records (open_clip changed its preprocessing?); encode into a new store."
        )
    return encoder


def encoded_rows(
    spec: EncodeSpec, modality: str, rows: pa.Table, reasons: list[str | None], details: list[str | None]
) -> pa.Table:
    """Encoded-schema rows with no vectors yet: identity, location and any failure reason."""
    n = rows.num_rows
    located = {name: rows.column(name) for name in ("source_uri", "source_member", "source_row")
               if name in rows.column_names}
    return from_columns(spec.schema, {
        "model_key": [spec.model_key] * n,
        "modality": [modality] * n,
        "content_hash": rows.column("sample_id" if modality == "image" else "text_hash"),
        "reason": reasons,
        "detail": details,
        **located,
    })


def _with_vectors(
    table: pa.Table, spec: EncodeSpec, vectors: np.ndarray, norms: np.ndarray, ok: np.ndarray
) -> pa.Table:
    vector_type = spec.schema.field("vector").type
    flat = pa.array(vectors.astype(vector_type.value_type.to_pandas_dtype(), copy=False).reshape(-1))
    column = pa.FixedSizeListArray.from_arrays(flat, spec.dim, mask=pa.array(~ok))
    table = table.set_column(table.schema.get_field_index("vector"), spec.schema.field("vector"), column)
    norm = pa.array(norms, pa.float32(), mask=~ok)
    return table.set_column(table.schema.get_field_index("norm"), spec.schema.field("norm"), norm)


def _as_tensor(pictures: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(pictures, torch.Tensor):
        return pictures
    with warnings.catch_warnings():  # a read-only view of Arrow's buffer: only ever read
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.from_numpy(pictures)


def _read_back(features: torch.Tensor) -> InFlight:
    """Features as float32, their copy to page-locked host memory queued behind the forward pass on
    a GPU (with an event to wait for), or as they are elsewhere."""
    features = features.float()
    if features.device.type != "cuda":
        return features, None
    host = torch.empty(features.shape, dtype=features.dtype, pin_memory=True)
    host.copy_(features, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return host, copied


def _unit_and_norm(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors (what the cache stores) and the norm each had (what `--input-norm raw` needs)."""
    raw = features.float().cpu().numpy()
    return normalise(raw), np.linalg.norm(raw, axis=1).astype(np.float32)
