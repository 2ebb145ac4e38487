"""Stage `encode`: CLIP image and text vectors for every sample the store lacks, for one model.

The unit of work is pure: `encode_rows(rows, encoder)` turns a batch of sample rows into an
embedding table and a quarantine table, so a distributed engine could map it over a cluster.
`encode` is the local runner: it finds what is pending (by content hash, for this model key),
decodes in DataLoader worker processes while the model runs, and writes one shard per
`shard_rows` vectors atomically before recording it in the catalog. A killed run loses at most
the unwritten buffer; the next run starts from what is on disk.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import pyarrow as pa
import torch

from pipeline.config import Validated, at_least
from pipeline.encoding.clip import LoadedModel, ModelSpec, load
from pipeline.errors import PipelineError
from pipeline.features.vectors import normalise
from pipeline.reporting import Reporter, Silent
from pipeline.sources.images import DEFAULT_MAX_PIXELS, UndecodableImage, decode_rgb
from pipeline.sources.locations import Location, LocationReader
from pipeline.store import catalog
from pipeline.store.atomic import write_parquet
from pipeline.store.layout import Store
from pipeline.store.lock import writing
from schemas import QUARANTINE, embeddings_schema, from_rows

Precision = Literal["fp32", "bf16", "fp16"]
Device = Literal["auto", "cpu", "cuda", "mps"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
DEVICES: tuple[str, ...] = get_args(Device)
_LOCATION_COLUMNS = "source_uri, source_member, source_row, byte_offset, byte_length"


def default_workers(device: torch.device) -> int:
    """Decoding processes that overlap the model without starving it.

    On a GPU the CPU cores are free: use most of them. On the CPU the model already keeps every
    core busy and decoding costs ~1 ms of a ~28 ms ViT-B-32 image, so on a small machine a worker
    process only oversubscribes the cores (measured on 2 cores: 0.90 of forward-only with one worker,
    0.99 decoding in the main process; bench/bench_encode.py).
    """
    cores = os.cpu_count() or 2
    if device.type == "cpu":
        return 0 if cores <= 4 else min(4, cores // 8)
    return max(1, min(8, cores - 1))


@dataclass(frozen=True)
class EncodeConfig(Validated):
    store: Store
    model: ModelSpec
    device: Device = "auto"
    precision: Precision = "fp32"
    batch_size: int = 64
    workers: int | None = None  # None: default_workers(device)
    dtype: Literal["float16", "float32"] = "float16"
    shard_rows: int = 4096
    max_pixels: int = DEFAULT_MAX_PIXELS
    text_batch_size: int = 256
    retry_quarantined: bool = False
    wait: bool = True  # wait for another writer of the store instead of stopping

    def check(self) -> None:
        for name in ("batch_size", "shard_rows", "text_batch_size", "max_pixels"):
            at_least(self, name, 1)
        if self.workers is not None and self.workers < 0:
            raise PipelineError("--workers must be 0 (decode in the main process) or more.")


@dataclass
class EncodeResult:
    model_key: str
    random_weights: bool
    device: str
    images_encoded: int = 0
    texts_encoded: int = 0
    quarantined: Counter[str] = field(default_factory=Counter)
    image_forward_passes: int = 0
    text_forward_passes: int = 0
    shards: list[Path] = field(default_factory=list)
    image_seconds: float = 0.0

    @property
    def nothing_to_do(self) -> bool:
        return not (self.images_encoded or self.texts_encoded or self.quarantined)

    @property
    def images_per_second(self) -> float:
        done = self.images_encoded + sum(self.quarantined.values())
        return done / self.image_seconds if self.image_seconds else 0.0


class Encoder:
    """A loaded CLIP model on a device at a precision; counts its forward passes."""

    def __init__(self, loaded: LoadedModel, device: torch.device, precision: str) -> None:
        self.loaded = loaded
        self.device = device
        self.precision = precision
        self.image_forward_passes = 0
        self.text_forward_passes = 0
        if precision == "fp16" and device.type == "cpu":
            raise PipelineError("--precision fp16 needs a GPU; on the CPU use bf16 or fp32.")

    @property
    def transform(self) -> Any:
        return self.loaded.preprocess

    def images(self, pixels: torch.Tensor) -> np.ndarray:
        self.image_forward_passes += 1
        with torch.inference_mode(), self._autocast():
            out = self.loaded.model.encode_image(pixels.to(self.device, non_blocking=True))
        return _normalised(out)

    def texts(self, texts: list[str]) -> np.ndarray:
        self.text_forward_passes += 1
        tokens = self.loaded.tokenizer(texts).to(self.device)
        with torch.inference_mode(), self._autocast():
            out = self.loaded.model.encode_text(tokens)
        return _normalised(out)

    def _autocast(self) -> Any:
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)


@dataclass
class DecodedBatch:
    pixels: torch.Tensor | None
    hashes: list[str]
    failures: list[dict[str, Any]]


def decode_batch(
    rows: list[dict[str, Any]], transform: Any, reader: LocationReader, max_pixels: int
) -> DecodedBatch:
    """Read and preprocess a batch of sample rows; undecodable ones become quarantine rows."""
    tensors, hashes, failures = [], [], []
    now = datetime.now(UTC)
    for row in rows:
        loc = Location.from_row(row)
        try:
            data = reader.read(loc)
            tensors.append(transform(decode_rgb(data, max_pixels)))
            hashes.append(row["sample_id"])
        except UndecodableImage as exc:
            failures.append(_quarantine_row(row, exc.reason, exc.detail, now))
        except OSError as exc:
            failures.append(_quarantine_row(row, "unreadable", str(exc), now))
    pixels = torch.stack(tensors) if tensors else None
    return DecodedBatch(pixels, hashes, failures)


def embeddings_table(
    model_key: str, modality: str, hashes: list[str], vectors: np.ndarray, dtype: str
) -> pa.Table:
    schema = embeddings_schema(vectors.shape[1], dtype)
    flat = pa.array(vectors.astype(dtype, copy=False).ravel())
    return pa.Table.from_arrays(
        [
            pa.array([model_key] * len(hashes), pa.string()),
            pa.array([modality] * len(hashes), pa.string()),
            pa.array(hashes, pa.string()),
            pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]),
        ],
        schema=schema,
    )


def encode_rows(
    rows: list[dict[str, Any]], encoder: Encoder, dtype: str = "float16", max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[pa.Table, pa.Table]:
    """The unit of work: sample rows → (image embedding table, quarantine table)."""
    batch = decode_batch(rows, encoder.transform, LocationReader(), max_pixels)
    vectors = (
        encoder.images(batch.pixels)
        if batch.pixels is not None
        else np.zeros((0, encoder.loaded.info["dim"]), np.float32)
    )
    table = embeddings_table(encoder.loaded.model_key, "image", batch.hashes, vectors, dtype)
    return table, from_rows(QUARANTINE, batch.failures)


def run(config: EncodeConfig, reporter: Reporter | None = None) -> EncodeResult:
    """Encode every pending text and image of the store with one model; return what was done."""
    reporter = reporter or Silent()
    store = config.store
    if not store.exists():
        raise PipelineError(f"No store at {store.root}: run `pipeline ingest` first.")
    with writing(store, reporter, config.wait):
        return _encode(config, reporter)


def _encode(config: EncodeConfig, reporter: Reporter) -> EncodeResult:
    store = config.store
    device = resolve_device(config.device)
    loaded = load(config.model, device)
    encoder = Encoder(loaded, device, config.precision)
    store.record_model(loaded.model_key, {**loaded.info, "dtype": config.dtype})
    result = EncodeResult(loaded.model_key, config.model.random_weights, str(device))
    _encode_texts(config, encoder, result, reporter)
    _encode_images(config, encoder, result, reporter)
    result.image_forward_passes = encoder.image_forward_passes
    result.text_forward_passes = encoder.text_forward_passes
    return result


def cpu_bf16_native() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX).

    Without it torch emulates bf16 and a matrix product runs ~70× slower than in fp32 (measured
    on an AVX2-only EPYC: 0.9 against 67 GFLOP/s), so bf16 there is a trap, not a speed-up.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


BF16_EMULATED = ("this CPU has no native bf16 (AVX512-BF16/AMX): torch emulates it, and bf16 runs far "
                 "slower than fp32 here")


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


def pending_texts(store: Store, model_key: str) -> list[tuple[str, str]]:
    sql = """
        SELECT text_hash, any_value(text) FROM samples
        WHERE text_hash IS NOT NULL AND text_hash NOT IN (
            SELECT content_hash FROM embeddings WHERE model_key = ? AND modality = 'text')
        GROUP BY text_hash ORDER BY text_hash
    """
    return [tuple(r.values()) for r in catalog.query(store, sql, [model_key]).to_pylist()]  # type: ignore[misc]


def pending_images(store: Store, model_key: str, retry_quarantined: bool = False) -> list[dict[str, Any]]:
    skip_quarantined = (
        "" if retry_quarantined else
        "AND sample_id NOT IN (SELECT content_hash FROM quarantine "
        "WHERE stage = 'decode' AND content_hash IS NOT NULL)"
    )
    sql = f"""
        SELECT DISTINCT ON (sample_id) sample_id, {_LOCATION_COLUMNS} FROM samples
        WHERE source_format NOT LIKE 'features:%'
          AND sample_id NOT IN (
            SELECT content_hash FROM embeddings WHERE model_key = ? AND modality = 'image')
          {skip_quarantined}
        ORDER BY sample_id
    """
    rows = catalog.query(store, sql, [model_key]).to_pylist()
    # Locality: rows of one file / row group / tar next to each other.
    rows.sort(key=lambda r: (r["source_uri"], r["source_member"] or "", r["source_row"] or 0, r["byte_offset"] or 0))
    return rows


# --- the runner ------------------------------------------------------------------------------


def _encode_texts(config: EncodeConfig, encoder: Encoder, result: EncodeResult, reporter: Reporter) -> None:
    pending = pending_texts(config.store, encoder.loaded.model_key)
    if not pending:
        return
    reporter.start("texts", len(pending), "texts")
    writer = _ShardWriter(config, encoder.loaded.model_key, "text", result)
    for start in range(0, len(pending), config.text_batch_size):
        chunk = pending[start : start + config.text_batch_size]
        vectors = encoder.texts([text for _, text in chunk])
        writer.add([h for h, _ in chunk], vectors, [])
        result.texts_encoded += len(chunk)
        reporter.advance("texts", len(chunk))
    writer.flush()


def _encode_images(config: EncodeConfig, encoder: Encoder, result: EncodeResult, reporter: Reporter) -> None:
    pending = pending_images(config.store, encoder.loaded.model_key, config.retry_quarantined)
    if not pending:
        return
    reporter.start("images", len(pending), "img")
    writer = _ShardWriter(config, encoder.loaded.model_key, "image", result)
    started = time.perf_counter()
    for batch in _decoded_batches(pending, encoder, config):
        vectors = encoder.images(batch.pixels) if batch.pixels is not None else None
        writer.add(batch.hashes, vectors, batch.failures)
        result.images_encoded += len(batch.hashes)
        result.quarantined.update(f["reason"] for f in batch.failures)
        reporter.advance("images", len(batch.hashes) + len(batch.failures))
    writer.flush()
    result.image_seconds = time.perf_counter() - started


class _RowBatches(torch.utils.data.Dataset):
    """Item i is the i-th batch of pending rows, decoded and preprocessed (run in a worker)."""

    def __init__(self, rows: list[dict[str, Any]], batch_size: int, transform: Any, max_pixels: int):
        self.batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
        self.transform = transform
        self.max_pixels = max_pixels
        self.reader: LocationReader | None = None

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> DecodedBatch:
        if self.reader is None:
            self.reader = LocationReader()
        return decode_batch(self.batches[i], self.transform, self.reader, self.max_pixels)


def _decoded_batches(rows: list[dict[str, Any]], encoder: Encoder, config: EncodeConfig) -> Iterator[DecodedBatch]:
    dataset = _RowBatches(rows, config.batch_size, encoder.transform, config.max_pixels)
    workers = default_workers(encoder.device) if config.workers is None else config.workers
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
        pin_memory=encoder.device.type == "cuda",
        worker_init_fn=_single_threaded_worker,
        collate_fn=_identity,
    )
    yield from loader


def _identity(batch: Any) -> Any:
    return batch


def _single_threaded_worker(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not compete with the model's threads


class _ShardWriter:
    """Buffers vectors and quarantine rows; each flush is one atomic shard plus a catalog commit."""

    def __init__(self, config: EncodeConfig, model_key: str, modality: str, result: EncodeResult):
        self.config = config
        self.model_key = model_key
        self.modality = modality
        self.result = result
        self.hashes: list[str] = []
        self.vectors: list[np.ndarray] = []
        self.failures: list[dict[str, Any]] = []

    def add(self, hashes: list[str], vectors: np.ndarray | None, failures: list[dict[str, Any]]) -> None:
        self.hashes.extend(hashes)
        if vectors is not None:
            self.vectors.append(vectors)
        self.failures.extend(failures)
        if len(self.hashes) >= self.config.shard_rows:
            self.flush()

    def flush(self) -> None:
        store = self.config.store
        written: list[Path] = []
        if self.failures:  # first: a kill after this leaves them skipped, not lost
            table = from_rows(QUARANTINE, self.failures)
            written.append(write_parquet(table, store.new_shard(store.dataset_dir("quarantine"), "decode")))
        if self.hashes:
            vectors = np.concatenate(self.vectors)
            table = embeddings_table(self.model_key, self.modality, self.hashes, vectors, self.config.dtype)
            shard = store.new_shard(store.embeddings_dir(self.model_key), self.modality)
            written.append(write_parquet(table, shard))
        if written:
            catalog.commit(store, written)
            self.result.shards.extend(written)
        self.hashes, self.vectors, self.failures = [], [], []


def _normalised(features: torch.Tensor) -> np.ndarray:
    return normalise(features.float().cpu().numpy())


def _quarantine_row(row: dict[str, Any], reason: str, detail: str, now: datetime) -> dict[str, Any]:
    return {
        "content_hash": row["sample_id"],
        "stage": "decode",
        "reason": reason,
        "detail": detail,
        "source_uri": row["source_uri"],
        "source_member": row["source_member"],
        "source_row": row["source_row"],
        "recorded_at": now,
    }
