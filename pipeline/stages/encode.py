"""Stage `encode`: CLIP image and text vectors for every sample the store lacks, for one model.

It first decides what is pending, without importing torch or loading any weights: the model key
follows from the arguments and the store's model.json, and pending rows are an anti-join in DuckDB,
streamed to a Parquet file in chunks (never a Python list of every row). With nothing pending it
stops there, in about a second. Otherwise it hands one `EncodeJob` per modality
(`pipeline.encoding.jobs`) to an engine: `local` in this process with decoding workers, `ray`
across a Ray cluster. Workers write staged shards; this process, holding the writer lock, commits.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pipeline.choices import Device, Engine, Precision, VectorDtype
from pipeline.config import Validated, at_least
from pipeline.encoding.clip import LoadedModel, ModelSpec, recorded_info
from pipeline.errors import PipelineError
from pipeline.reporting import Reporter, Silent
from pipeline.sources.images import DEFAULT_MAX_PIXELS
from pipeline.sources.reading import DEFAULT_MAX_BYTES
from pipeline.store import catalog, duck
from pipeline.store.layout import Store
from pipeline.store.stream import ParquetStream
from pipeline.store.writes import remove_empty_scratch, writing

if TYPE_CHECKING:
    from pipeline.encoding.jobs import JobResult

_PENDING_CHUNK = 65536  # rows per Arrow batch while streaming the pending set to disk
_PENDING_ROW_GROUP = 1024  # rows per row group of the pending file: the Ray engine's unit of reading
PENDING_MEMORY = "512MB"  # DuckDB's budget while finding pending work, whatever the store's size
_LOCATION = ("sample_id", "source_uri", "source_member", "source_row", "byte_offset", "byte_length")


@dataclass(frozen=True)
class EncodeConfig(Validated):
    store: Store
    model: ModelSpec | None  # None: the one model the store's vectors were encoded with
    device: Device = "auto"
    precision: Precision = "fp32"
    batch_size: int = 64
    workers: int | None = None  # None: default_workers(device)
    dtype: VectorDtype = "float16"
    shard_rows: int = 4096
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES  # the most read of one image; more: quarantined as too_large
    text_batch_size: int = 256
    retry_quarantined: bool = False
    wait: bool = True  # wait for another writer of the store instead of stopping
    engine: Engine = "local"
    ray_address: str | None = None  # None: start a local Ray instance; "auto" or HOST:PORT
    actors: int | None = None  # Ray encode actors (None: one per GPU, else one per node's spare cores)
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0

    @property
    def spec(self) -> ModelSpec:
        """The model to encode with (`run` puts in the store's own where none was named)."""
        if self.model is None:
            raise RuntimeError("EncodeConfig.model is filled in by encode.run before it is used")
        return self.model

    def check(self) -> None:
        for name in ("batch_size", "shard_rows", "text_batch_size", "max_pixels", "max_bytes", "actors"):
            at_least(self, name, 1)
        at_least(self, "gpus_per_actor", 0)
        if self.workers is not None and self.workers < 0:
            raise PipelineError("--workers must be 0 (decode in the main process) or more.")
        if self.engine == "local" and (self.ray_address or self.actors or self.gpus_per_actor is not None):
            raise PipelineError("--ray-address, --actors and --gpus-per-actor need --engine ray.")


@dataclass
class EncodeResult:
    model_key: str
    random_weights: bool
    device: str
    engine: str = "local"
    model_loaded: bool = False  # False: the pending work was found without loading any weights
    images: JobResult | None = None  # what the image job did (None: nothing was pending)
    texts: JobResult | None = None
    warnings: list[str] = field(default_factory=list)  # sentences for the user (e.g. emulated bf16)

    @property
    def images_encoded(self) -> int:
        return self.images.encoded if self.images else 0

    @property
    def texts_encoded(self) -> int:
        return self.texts.encoded if self.texts else 0

    @property
    def image_forward_passes(self) -> int:
        return self.images.forward_passes if self.images else 0

    @property
    def text_forward_passes(self) -> int:
        return self.texts.forward_passes if self.texts else 0

    @property
    def quarantined(self) -> Counter[str]:
        return sum((job.quarantined for job in (self.texts, self.images) if job), Counter())

    @property
    def shards(self) -> list[Path]:
        return [s for job in (self.texts, self.images) if job for s in job.shards]

    @property
    def nothing_to_do(self) -> bool:
        return not (self.images_encoded or self.texts_encoded or self.quarantined)

    @property
    def images_per_second(self) -> float:
        if not self.images or not self.images.seconds:
            return 0.0
        return self.images.items / self.images.seconds


def run(config: EncodeConfig, reporter: Reporter | None = None) -> EncodeResult:
    """Encode every pending text and image of the store with one model; return what was done."""
    reporter = reporter or Silent()
    store = config.store
    if not store.exists():
        raise PipelineError(f"No store at {store.root}: run `pipeline ingest` first.")
    if config.model is None:
        config = replace(config, model=store_model(store))
    if config.engine == "ray" and config.ray_address:  # before loading a model: a dead address is said at once
        from pipeline.engines.ray import check_address

        check_address(config.ray_address)
    info = recorded_info(_model_infos(store), config.spec)
    if info is not None:  # a model encoded before: whether anything is pending needs no lock and no weights
        store.record_model(info["model_key"], {**info, "dtype": config.dtype})  # (compares: refuses a new dtype)
        if not _anything_pending(store, config, info["model_key"]):
            return EncodeResult(info["model_key"], config.spec.random_weights, config.device, engine=config.engine)
    with writing(store, reporter, config.wait):
        try:
            return _encode(config, reporter)
        finally:
            remove_empty_scratch(store)  # the staging/ and .encode/ folders this run made and emptied


def store_model(store: Store) -> ModelSpec:
    """The model the store's vectors were encoded with, as model.json recorded it (architecture, weights tag
    or checkpoint, seed), when there is exactly one: `encode` after `ingest` or `perturb` needs no --model.
    Imported features name no model that could encode, so they do not count."""
    encoded = [i for i in _model_infos(store) if i.get("architecture")]
    if len(encoded) == 1:
        info = encoded[0]
        return ModelSpec(info["architecture"], info.get("pretrained"), int(info.get("seed") or 0))
    if not encoded:
        raise PipelineError("No model has encoded this store yet: give --model (an open_clip architecture, e.g. "
                            "ViT-L-14) and --pretrained (e.g. openai).")
    named = "; ".join(f"--model {i['architecture']}" + (f" --pretrained {i['pretrained']}" if i.get("pretrained")
                                                        else f" --seed {i.get('seed') or 0}") for i in encoded)
    raise PipelineError(f"The store holds vectors of {len(encoded)} models: say which to encode with ({named}).")


def pending_texts_sql() -> str:
    # imported features carry a text hash but no text (`features:*` samples): nothing to encode
    return """
        SELECT text_hash, any_value(text) AS text FROM samples
        WHERE text_hash IS NOT NULL AND text IS NOT NULL AND text_hash NOT IN (
            SELECT content_hash FROM embeddings WHERE model_key = $key AND modality = 'text')
        GROUP BY text_hash ORDER BY text_hash
    """


def pending_images_sql(retry_quarantined: bool) -> str:
    skip_quarantined = "" if retry_quarantined else (
        "AND sample_id NOT IN (SELECT content_hash FROM quarantine "
        "WHERE stage = 'decode' AND content_hash IS NOT NULL)"
    )
    columns = ", ".join(_LOCATION)
    # one row per image hash; sorted by location so a reader meets each file / row group / tar once
    return f"""
        SELECT {columns} FROM samples
        WHERE source_format NOT LIKE 'features:%'
          AND sample_id NOT IN (SELECT content_hash FROM embeddings WHERE model_key = $key AND modality = 'image')
          {skip_quarantined}
        QUALIFY row_number() OVER (PARTITION BY sample_id ORDER BY source_uri, source_member, source_row) = 1
        ORDER BY source_uri, source_member NULLS FIRST, source_row NULLS FIRST, byte_offset NULLS FIRST, sample_id
    """


def write_pending(con: Any, sql: str, model_key: str, path: Path) -> int:
    """Stream the rows of `sql` (on a catalog connection) into a Parquet file in chunks; return the count
    (no file when there are none)."""
    rows = duck.batches(con.sql(sql, params={"key": model_key}), _PENDING_CHUNK)
    group = min(_PENDING_ROW_GROUP, _PENDING_CHUNK)
    with ParquetStream(path, rows.schema, group_rows=group, compression="zstd") as stream:
        for batch in rows:
            stream.write(batch)
        if stream.rows:
            stream.finalize()
        return stream.rows


def pending_dir(store: Store) -> Path:
    """Where pending-row files live while a run uses them (see `Store.work_dir`)."""
    return store.work_dir / "pending"


# --- private -------------------------------------------------------------------------------


def _encode(config: EncodeConfig, reporter: Reporter) -> EncodeResult:
    store = config.store
    _sweep_pending(store)  # we hold the lock: any pending file left is a dead run's
    info = recorded_info(_model_infos(store), config.spec)
    jobs: dict[str, tuple[Path, int]] = {}
    loaded: LoadedModel | None = None
    if info is not None:
        store.record_model(info["model_key"], {**info, "dtype": config.dtype})  # refuses a dtype change
        jobs = _pending(store, config, info["model_key"])
        if not any(n for _, n in jobs.values()):
            return EncodeResult(info["model_key"], config.spec.random_weights, config.device, engine=config.engine)
    try:
        if info is None:  # first encode with this model: load it once to learn its key
            loaded = _load(config)
            info = loaded.info
            jobs = _pending(store, config, info["model_key"])
        store.record_model(info["model_key"], {**info, "dtype": config.dtype})
        return _run_jobs(config, info, jobs, loaded, reporter)
    finally:
        _sweep_pending(store)


def _run_jobs(
    config: EncodeConfig, info: dict[str, Any], jobs: dict[str, tuple[Path, int]], loaded: LoadedModel | None,
    reporter: Reporter,
) -> EncodeResult:
    from pipeline.encoding.jobs import EncodeJob
    from pipeline.encoding.units import EncodeSpec, resolve_device
    from pipeline.engines.local import LocalEngine
    from trainer.precision import BF16_EMULATED, cpu_bf16_native

    spec = EncodeSpec.from_info(config.spec, info, config.dtype, config.max_pixels, config.max_bytes,
                                config.device, config.precision)
    result = EncodeResult(info["model_key"], config.spec.random_weights, config.device,
                          engine=config.engine, model_loaded=True)
    if config.precision == "bf16" and config.engine == "local" and resolve_device(config.device).type == "cpu" \
            and not cpu_bf16_native():
        result.warnings.append(f"{BF16_EMULATED}; consider --precision fp32.")
    engine: Any
    if config.engine == "ray":
        from pipeline.engines.ray import RayEngine, RayOptions

        engine = RayEngine(RayOptions(config.ray_address, config.actors, config.gpus_per_actor))
    else:
        engine = LocalEngine(config.workers, loaded)
    def run_job(modality: Literal["image", "text"], batch_size: int) -> JobResult | None:
        path, rows = jobs[modality]
        if not rows:
            return None
        done: JobResult = engine.run(EncodeJob(config.store, spec, modality, path, rows, batch_size,
                                               config.shard_rows), reporter)
        # the bar then shows this job's rate as the summary does: the same count over the same seconds
        reporter.event("finished", {"task": f"{modality}s", "items": done.items, "seconds": done.seconds})
        result.device = done.device or result.device
        return done

    try:
        result.texts = run_job("text", config.text_batch_size)
        result.images = run_job("image", config.batch_size)
    finally:
        engine.close()
    return result


def _pending(store: Store, config: EncodeConfig, model_key: str) -> dict[str, tuple[Path, int]]:
    run_id = f"{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:8]}"
    out = {}
    spill = store.work_dir / "duckdb-tmp"
    try:
        with catalog.connect(store) as con:
            # the anti-joins, the per-image dedup and the sort spill beyond this. Measured peak RSS of the
            # pending-images query: unbounded 404 MB at 1M rows, 1050 MB at 4M; bounded 369 MB at 1M, 705 at 8M
            duck.limit_memory(con, PENDING_MEMORY, spill)
            queries = (("text", pending_texts_sql()), ("image", pending_images_sql(config.retry_quarantined)))
            for modality, sql in queries:
                path = pending_dir(store) / f"{modality}-{run_id}.parquet"
                out[modality] = (path, write_pending(con, sql, model_key, path))
    finally:
        shutil.rmtree(spill, ignore_errors=True)
    return out


def _anything_pending(store: Store, config: EncodeConfig, model_key: str) -> bool:
    """Whether the committed catalog has a text or an image this model has not encoded: a reader's question
    (nothing written, no lock taken, so a no-op never waits behind another writer)."""
    spill = Path(tempfile.mkdtemp(prefix="pipeline-encode-"))
    try:
        with catalog.connect(store) as con:
            duck.limit_memory(con, PENDING_MEMORY, spill)
            return any(bool(con.execute(f"SELECT EXISTS ({sql})", {"key": model_key}).fetchall()[0][0])
                       for sql in (pending_texts_sql(), pending_images_sql(config.retry_quarantined)))
    finally:
        shutil.rmtree(spill, ignore_errors=True)


def _model_infos(store: Store) -> list[dict[str, Any]]:
    root = store.dataset_dir("embeddings")
    if not root.exists():
        return []
    return [store.model_info(d.name) for d in sorted(root.iterdir()) if (d / "model.json").is_file()]


def _load(config: EncodeConfig) -> LoadedModel:
    from pipeline.encoding.clip import load
    from pipeline.encoding.units import resolve_device

    # the Ray driver only needs the key: load on the CPU and leave the devices to the actors
    device = resolve_device("cpu" if config.engine == "ray" else config.device)
    return load(config.spec, device)


def _sweep_pending(store: Store) -> None:
    directory = pending_dir(store)
    if directory.exists():
        for leftover in directory.iterdir():
            leftover.unlink(missing_ok=True)
