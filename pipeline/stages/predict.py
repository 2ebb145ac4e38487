"""`pipeline predict SOURCE… --run RUN | --detector DIR`: score new images with a trained detector.

Predict is a reader. It never adds labelled samples, splits or conflicts: the store's training data
is the same after it. The sources (files, folders of any layout, webdataset tars, CSV/Parquet lists)
are listed into a work file outside the store (`sources.inputs`), then read in batches through the
local engine's decoding workers: each image is read bounded, hashed, looked up in the store's cache
of the run's CLIP model (`features.rowkeys`: no scan) and decoded only if it is not there; the rest
is encoded in this process with encode's units, options and speed (`runs.predicting.PredictBatch`).
Every row gets a score, the decision at the threshold, the calibrated probability and the
out-of-distribution flag, or the reason it has none. Rows stream to `--output` batch by batch;
the result keeps a preview (the Python API: every row).

`--keep` (a run's store only) also stores what it computed, under the writer lock: the new image and
caption vectors, and the images as unlabelled samples (split `unlabelled`, never trained on), so a
second predict of them is a lookup. An image+text detector needs a caption per image; without one,
predict stops before any work, naming an image-only run of the store if there is one.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
import time
from collections import Counter
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.choices import Device, Precision
from pipeline.config import Validated, at_least, within
from pipeline.errors import PipelineError
from pipeline.features.ood import OodSpec
from pipeline.reporting import Reporter, Silent
from pipeline.runs.detector import Detector, from_folder, from_run
from pipeline.runs.predicting import PredictBatch, Predicted, PredictOptions
from pipeline.sources.images import DEFAULT_MAX_PIXELS
from pipeline.sources.inputs import inputs
from pipeline.sources.reading import DEFAULT_MAX_BYTES
from pipeline.store import catalog
from pipeline.store.keys import KeyQuery, StoreKeys, first_occurrence, keys_of
from pipeline.store.layout import Store
from pipeline.store.outputs import OutputStream, check_output, output_format
from pipeline.store.stream import ParquetStream
from pipeline.store.writes import Committer, require_writable, stage_shard, writing
from schemas import PREDICT_INPUTS, PREDICTIONS

PREVIEW_ROWS = 50
SHARD_ROWS = 4096  # --keep: rows per staged shard (as encode's default)


# rows per row group of the listed inputs (read back in batches of --batch-size): a footer entry per
# batch grew memory with the inputs
INPUT_ROW_GROUP = 1024


@dataclass(frozen=True)
class PredictConfig(Validated):
    sources: tuple[Path, ...]
    store: Store | None = None
    run_id: str | None = None
    detector: Path | None = None  # an exported detector folder (needs no store)
    output: Path | None = None  # .csv | .json | .parquet, outside the store
    threshold: float | None = None  # on the score; None: the detector's, chosen on val
    caption: str | None = None  # the caption of every image that has none of its own
    explain: int = 0  # nearest training images per row
    keep: bool = False  # store the new vectors and the images as unlabelled samples
    device: Device = "auto"
    precision: Precision = "fp32"
    batch_size: int = 64
    workers: int | None = None  # decoding processes; None: as encode chooses
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    preview_rows: int = PREVIEW_ROWS  # rows the result keeps (for the terminal)
    collect: bool = False  # the result keeps every row (the Python API)
    wait: bool = True

    def check(self) -> None:
        if not self.sources:
            raise PipelineError("Give at least one image, folder, tar or list to predict.")
        if (self.run_id is None) == (self.detector is None):
            raise PipelineError("Give exactly one of --run RUN (a run in the store) or --detector DIR (an exported "
                                "detector).")
        if self.run_id is not None and self.store is None:
            raise PipelineError("--run needs the store that holds the run (--store).")
        if self.keep and self.run_id is None:
            raise PipelineError("--keep stores vectors in the run's store: use it with --run.")
        if self.explain and self.run_id is None:
            raise PipelineError("--explain shows the nearest training images, which only a run's store holds: "
                                "predict with --run RUN.")
        if self.threshold is not None:
            within(self, "threshold", 0, 1)
        for name in ("batch_size", "max_bytes", "max_pixels"):
            at_least(self, name, 1)
        at_least(self, "explain", 0)
        at_least(self, "preview_rows", 0)
        if self.workers is not None and self.workers < 0:
            raise PipelineError("--workers must be 0 (decode in this process) or more.")
        if self.output is not None:
            check_output(self.store if self.run_id else None, self.output)  # outside the store, new or regular
            output_format(self.output)


@dataclass
class PredictResult:
    source: str  # "run RUN" or the detector folder
    model_key: str
    random_weights: bool | None
    threshold: float
    ood: OodSpec | None
    inputs: int = 0
    scored: int = 0
    generated: int = 0
    flagged: int = 0  # out of distribution
    cached: int = 0  # vectors found in the store
    encoded: int = 0  # forward passes of CLIP, one per image
    reasons: Counter[str] = field(default_factory=Counter)  # why rows have no score
    rows: pa.Table = field(default_factory=PREDICTIONS.empty_table)  # the first rows (or all, when collected)
    output: Path | None = None
    kept: dict[str, int] | None = None  # --keep: samples, image and text vectors stored
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.inputs / self.seconds if self.seconds else 0.0


def run(config: PredictConfig, reporter: Reporter | None = None) -> PredictResult:
    """Predict every image of the sources; see the module docstring."""
    reporter = reporter or Silent()
    detector = _detector(config, reporter)
    work = Path(tempfile.mkdtemp(prefix="pipeline-predict-"))
    try:
        pending, count = _list_inputs(config, detector, work)
        return _predict(config, detector, pending, count, reporter)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def image_only_runs(store: Store, model_key: str) -> list[str]:
    """Runs of the store that read image features only (newest first): what a captionless image can use."""
    if not catalog.shard_paths(store, "runs"):
        return []
    return catalog.query(store, "SELECT run_id FROM runs WHERE features = 'image' ORDER BY model_key = ? DESC, "
                         "created_at DESC", [model_key]).column(0).to_pylist()


# --- private -------------------------------------------------------------------------------


def _detector(config: PredictConfig, reporter: Reporter) -> Detector:
    if config.detector is not None:
        return from_folder(config.detector)
    assert config.store is not None and config.run_id is not None
    catalog.snapshot(config.store)  # (no store there: one sentence, before anything else)
    require_writable(config.store, "predict --run", "the caches it looks vectors and neighbours up in, and with "
                     "--keep the new vectors; `pipeline export` makes a detector that needs no store")
    return from_run(config.store, config.run_id, wait=config.wait, reporter=reporter)


def _list_inputs(config: PredictConfig, detector: Detector, work: Path) -> tuple[Path, int]:
    """The inputs, listed into a work file; an image+text detector stops at the first image without a
    caption (before any image is read)."""
    path = work / "inputs.parquet"
    with ParquetStream(path, PREDICT_INPUTS, group_rows=max(config.batch_size, INPUT_ROW_GROUP)) as stream:
        for batch in inputs(list(config.sources), config.caption):
            if detector.spec.needs_text:
                missing = pc.and_(pc.is_null(batch.column("caption")), pc.is_null(batch.column("reason")))
                if pc.any(missing).as_py():
                    first = batch.filter(missing).column("path")[0].as_py()
                    raise PipelineError(_no_caption(config, detector, first))
            stream.write(batch)
        count = stream.rows
        stream.finalize()
    return path, count


def _no_caption(config: PredictConfig, detector: Detector, path: str) -> str:
    others = image_only_runs(config.store, detector.spec.model_key) if config.store is not None else []
    instead = (f"predict with an image-only run of this store instead, e.g. --run {others[0]}" if others else
               "or use an image-only detector (`pipeline train --features image` makes one)")
    return (f"The detector of {detector.source} reads image+text features (the paper's), and {path} has no caption "
            f"(no sidecar .txt, list column or --caption): give captions, {instead}.")


def _predict(config: PredictConfig, detector: Detector, pending: Path, count: int,
             reporter: Reporter) -> PredictResult:
    from pipeline.encoding.units import default_workers, resolve_device
    from pipeline.engines.local import decoded_batches, model_threads

    spec = detector.spec
    options = PredictOptions(config.device, config.precision, config.max_bytes, config.max_pixels, config.threshold,
                             config.explain)
    unit = PredictBatch(detector, options)
    result = PredictResult(detector.source, spec.model_key, spec.clip.get("random_weights"),
                           config.threshold if config.threshold is not None else spec.threshold, spec.ood,
                           output=config.output)
    device = resolve_device(config.device)
    workers = default_workers(device) if config.workers is None else config.workers
    if config.precision == "bf16" and device.type == "cpu":
        from trainer.precision import BF16_EMULATED, cpu_bf16_native

        if not cpu_bf16_native():
            result.warnings.append(f"{BF16_EMULATED}; consider --precision fp32.")
    shown: list[pa.Table] = []
    with ExitStack() as stack:
        out = None
        if config.output is not None:
            out = OutputStream(config.output, PREDICTIONS, output_format(config.output))
            stack.callback(out.discard)
        keeper = _Keeper(stack, config, unit, reporter) if config.keep else None
        reporter.start("predict", count, "img")
        started_at = time.perf_counter()
        batches = stack.enter_context(closing(decoded_batches(pending, config.batch_size, unit.identify, workers,
                                                               pin=device.type == "cuda")))  # ends the workers
        stack.enter_context(model_threads(config.device))  # the cores others leave free, as encode
        waiting = None
        now = datetime.now(UTC)
        for decoded in itertools.chain(batches, [None]):  # (None: read back the last batch)
            started = unit.start(decoded) if decoded is not None else None
            if waiting is not None:
                done = unit.finish(waiting, keep=keeper is not None, now=now)
                _tally(result, done, shown, config)
                if out is not None:
                    out.write(done.rows)
                if keeper is not None:
                    keeper.add(done)
                reporter.advance("predict", done.rows.num_rows)
            waiting = started
        if keeper is not None:
            result.kept = keeper.finish()
        if out is not None:
            out.finalize()
        result.seconds = time.perf_counter() - started_at
    result.rows = pa.concat_tables(shown) if shown else PREDICTIONS.empty_table()
    return result


def _tally(result: PredictResult, done: Predicted, shown: list[pa.Table], config: PredictConfig) -> None:
    rows = done.rows
    result.inputs += rows.num_rows
    scored = rows.column("score").is_valid()
    result.scored += int(pc.sum(scored).as_py() or 0)
    result.generated += int(pc.sum(pc.fill_null(rows.column("generated"), False)).as_py() or 0)
    result.flagged += int(pc.sum(pc.fill_null(rows.column("ood"), False)).as_py() or 0)
    result.cached += done.cached
    result.encoded += done.encoded
    result.reasons.update(r for r in rows.column("reason").to_pylist() if r is not None)
    held = sum(t.num_rows for t in shown)
    if config.collect:
        shown.append(rows)
    elif held < config.preview_rows:
        shown.append(rows.slice(0, config.preview_rows - held))


class _Keeper:
    """`--keep`: under the writer lock for the whole run, stage the new vectors and unlabelled samples (those
    the store lacks: key sets, no scan) in shards of `SHARD_ROWS`, and commit them a few shards at a time."""

    def __init__(self, stack: ExitStack, config: PredictConfig, unit: PredictBatch, reporter: Reporter) -> None:
        assert config.store is not None
        self.store, self.spec = config.store, unit.spec
        stack.enter_context(writing(self.store, reporter, config.wait))
        key = unit.spec.model_key
        self.known = stack.enter_context(StoreKeys(self.store, {
            "samples": KeyQuery("samples", "sample_id"),
            "image": KeyQuery("embeddings", "content_hash", "modality = 'image'", key),
            "text": KeyQuery("embeddings", "content_hash", "modality = 'text'", key),
        }, maintained=("samples", "image", "text")))
        self.committer = Committer(self.store)
        self.kept = Counter({"samples": 0, "images": 0, "texts": 0})
        self.waiting: dict[str, list[pa.Table]] = {"image": [], "text": [], "samples": []}

    def add(self, done: Predicted) -> None:
        for name, table, column in (("image", done.images, "content_hash"), ("text", done.texts, "content_hash"),
                                    ("samples", done.samples, "sample_id")):
            fresh = self._fresh(name, table, column)
            if fresh is not None:
                self.waiting[name].append(fresh)
                if sum(t.num_rows for t in self.waiting[name]) >= SHARD_ROWS:
                    self._stage(name)

    def finish(self) -> dict[str, int]:
        for name in self.waiting:
            self._stage(name)
        self.committer.flush()
        return dict(self.kept)

    def _stage(self, name: str) -> None:
        from pipeline.encoding.jobs import stage_encoded

        if not self.waiting[name]:
            return
        table = pa.concat_tables(self.waiting[name])
        self.waiting[name] = []
        if name == "samples":
            final = self.store.new_shard(self.store.dataset_dir("samples"), "predict")
            self.committer.add([stage_shard(self.store, final, table)])
        else:
            self.committer.add(stage_encoded(self.store, self.spec, table))
        self.kept["samples" if name == "samples" else f"{name}s"] += table.num_rows

    def _fresh(self, name: str, table: pa.Table | None, column: str) -> pa.Table | None:
        """The rows whose id the store (and this run so far) lacks, each once; their keys join the set."""
        if table is None or not table.num_rows:
            return None
        keys = keys_of(table.column(column).combine_chunks())
        fresh = first_occurrence(keys) & ~self.known.get(name).contains(keys)
        if not fresh.any():
            return None
        self.known.add(name, keys[fresh])
        return table.filter(pa.array(fresh))
