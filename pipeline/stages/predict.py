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

`--output DIR/` (a folder: a name without a suffix, or a folder that exists) takes any number of
inputs: the ordered inputs are cut into units of `shard_rows`, each written as one Parquet part
(`store.parts.PartsFolder`: atomic, keyed by a digest of the unit's inputs). A rerun of the same
command skips the units whose part is there, so a killed run resumes with no row lost or doubled;
another command into the same folder is refused unless `--force`. Units run here (`--engine local`,
the loop above) or on a Ray actor pool (`--engine ray`: each actor loads the detector and CLIP once,
`runs.predicting.PredictWorker`; this process writes every part). Memory: one unit per actor in
flight, and a key per unit.
"""

from __future__ import annotations

import hashlib
import itertools
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.choices import Device, Engine, Precision
from pipeline.config import Validated, at_least, within
from pipeline.errors import PipelineError
from pipeline.features.ood import OodSpec
from pipeline.reporting import Reporter, Silent
from pipeline.runs.detector import Detector, from_folder, from_run
from pipeline.runs.predicting import PredictBatch, Predicted, PredictOptions, PredictWorker
from pipeline.sources.images import DEFAULT_MAX_PIXELS
from pipeline.sources.inputs import inputs
from pipeline.sources.reading import DEFAULT_MAX_BYTES
from pipeline.store import catalog
from pipeline.store.keys import KeyQuery, StoreKeys, first_occurrence, keys_of
from pipeline.store.layout import Store
from pipeline.store.outputs import FORMATS, OutputStream, check_output, output_format
from pipeline.store.parts import PartsFolder, unit_key
from pipeline.store.stream import ParquetStream
from pipeline.store.writes import Committer, require_writable, stage_shard, writing
from schemas import PREDICT_INPUTS, PREDICTIONS

PREVIEW_ROWS = 50
SHARD_ROWS = 4096  # --keep: rows per staged shard (as encode's default); --output DIR/: inputs per part
UNIT_COLUMNS = ("path", "source_uri", "source_member", "byte_offset", "byte_length", "caption")  # a unit's key


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
    engine: Engine = "local"  # ray: units of --output DIR/ mapped over a Ray actor pool
    ray_address: str | None = None  # None: start a local Ray instance; "auto" or HOST:PORT
    actors: int | None = None  # None: one per GPU, else one per 4 CPUs of the cluster
    shard_rows: int = SHARD_ROWS  # --output DIR/: inputs per part (the unit of resuming)
    force: bool = False  # --output DIR/ of another command: replace its parts

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
        for name in ("batch_size", "max_bytes", "max_pixels", "shard_rows"):
            at_least(self, name, 1)
        at_least(self, "explain", 0)
        at_least(self, "preview_rows", 0)
        if self.workers is not None and self.workers < 0:
            raise PipelineError("--workers must be 0 (decode in this process) or more.")
        if self.actors is not None:
            at_least(self, "actors", 1)
        if self.engine == "local" and (self.ray_address or self.actors):
            raise PipelineError("--ray-address and --actors need --engine ray.")
        if self.engine == "ray":
            if not self.directory:
                raise PipelineError("--engine ray writes Parquet parts into a folder: give --output DIR/ (the "
                                    "terminal and a single file are for --engine local).")
            if self.keep:
                raise PipelineError("--keep cannot go with --engine ray: the new vectors would be computed in the "
                                    "actors, while only this process holds the store's writer lock and its key sets "
                                    "(what keeps kept rows once); ingest the images with `pipeline ingest "
                                    "--unlabelled` and `pipeline encode --engine ray` instead, then predict reads "
                                    "every vector from the store.")
        if self.output is not None:  # outside the store, new or regular (a folder: new or a folder)
            store = self.store if self.run_id else None
            if self.directory:
                check_output(store, self.output, kind="directory", instead="give a file ending in .csv, .json or "
                             ".parquet, or a folder (DIR/) for Parquet parts")
            else:
                check_output(store, self.output)
                if self.output.suffix.lower() not in FORMATS:  # e.g. `scores.d/`: the shell's `/` does not reach us
                    raise PipelineError(
                        f"--output {self.output}: {self.output.suffix} is not a file format (.csv, .json, .parquet) "
                        "and no folder of that name exists; for a folder of Parquet parts, give a name without a "
                        "suffix or create the folder first.")

    @property
    def directory(self) -> bool:
        """--output names a folder of parts: a name without a suffix (`DIR/`), or a folder that exists. A name
        with a file format's suffix is a file, always (a folder there is refused, as any path not a file)."""
        if self.output is None or self.output.suffix.lower() in FORMATS:
            return False
        return not self.output.suffix or self.output.is_dir()


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
    engine: str = "local"  # local | ray:Nxdevice
    parts: int = 0  # --output DIR/: parts the folder holds now (one per unit of shard_rows inputs)
    resumed: int = 0  # --output DIR/: inputs already in parts of an earlier run of the command (skipped)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.inputs / self.seconds if self.seconds else 0.0


def run(config: PredictConfig, reporter: Reporter | None = None) -> PredictResult:
    """Predict every image of the sources; see the module docstring."""
    reporter = reporter or Silent()
    if config.engine == "ray" and config.ray_address:  # before loading anything: a dead address is said at once
        from pipeline.engines.ray import check_address

        check_address(config.ray_address)
    detector = _detector(config, reporter)
    work = Path(tempfile.mkdtemp(prefix="pipeline-predict-"))
    try:
        pending, count = _list_inputs(config, detector, work)
        if config.directory:
            return _predict_parts(config, detector, pending, work, reporter)
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


def _predict(config: PredictConfig, detector: Detector, pending: Path, count: int, reporter: Reporter,
             sink: _Units | None = None) -> PredictResult:
    """Predict the rows of `pending` here, streaming them to `--output FILE`, or to `sink`'s parts."""
    from pipeline.encoding.units import default_workers, resolve_device
    from pipeline.engines.local import decoded_batches, model_threads

    result, options = _begin(config, detector)
    unit = PredictBatch(detector, options)
    device = resolve_device(config.device)
    workers = default_workers(device) if config.workers is None else config.workers
    if config.precision == "bf16" and device.type == "cpu":
        from trainer.precision import BF16_EMULATED, cpu_bf16_native

        if not cpu_bf16_native():
            result.warnings.append(f"{BF16_EMULATED}; consider --precision fp32.")
    shown: list[pa.Table] = []
    with ExitStack() as stack:
        out: OutputStream | _Units | None = sink
        if config.output is not None and sink is None:
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


def _predict_parts(config: PredictConfig, detector: Detector, pending: Path, work: Path,
                   reporter: Reporter) -> PredictResult:
    """`--output DIR/`: the inputs cut into units of `shard_rows`; the units without a part of the same key
    (all, the first time) are listed into a work file and run by the engine; each becomes one part."""
    assert config.output is not None
    with PartsFolder(config.output, PREDICTIONS, _command(config, detector), config.force) as parts:
        return _fill(config, detector, pending, work, parts, reporter)


def _fill(config: PredictConfig, detector: Detector, pending: Path, work: Path, parts: PartsFolder,
          reporter: Reporter) -> PredictResult:
    todo = work / "todo.parquet"
    units: list[tuple[int, str, int]] = []
    count = resumed = total = 0
    with ParquetStream(todo, PREDICT_INPUTS, group_rows=max(config.batch_size, INPUT_ROW_GROUP)) as stream:
        for index, rows in enumerate(_units_of(pending, config.shard_rows)):
            key, total, count = unit_key(rows, UNIT_COLUMNS), index + 1, count + rows.num_rows
            if parts.is_done(index, key):
                resumed += rows.num_rows
            else:
                units.append((index, key, rows.num_rows))
                stream.write(rows)
        todo_rows = stream.rows
        stream.finalize()
    sink = _Units(parts, units)
    if config.engine == "ray":
        result = _predict_ray(config, detector, todo, sink, reporter)
    else:
        result = _predict(config, detector, todo, todo_rows, reporter, sink)
    sink.finalize()
    result.parts = len(parts.finish(total, count))
    result.resumed = resumed
    return result


def _begin(config: PredictConfig, detector: Detector) -> tuple[PredictResult, PredictOptions]:
    """The result a run fills in (threshold: --threshold, else the detector's) and the options each batch takes."""
    spec = detector.spec
    result = PredictResult(detector.source, spec.model_key, spec.clip.get("random_weights"),
                           config.threshold if config.threshold is not None else spec.threshold, spec.ood,
                           output=config.output)
    options = PredictOptions(config.device, config.precision, config.max_bytes, config.max_pixels, config.threshold,
                             config.explain)
    return result, options


def _predict_ray(config: PredictConfig, detector: Detector, todo: Path, sink: _Units,
                 reporter: Reporter) -> PredictResult:
    """The units of `todo` on a Ray actor pool; this process writes each part as its unit comes back."""
    from pipeline.engines.ray import RayOptions, TablePool

    result, options = _begin(config, detector)
    worker = PredictWorker(None if config.run_id is None or config.store is None else str(config.store.root.resolve()),
                           config.run_id, None if config.detector is None else str(config.detector.resolve()),
                           options, config.batch_size)
    tagged = zip((index for index, _, _ in sink.pending), _units_of(todo, config.shard_rows), strict=False)
    shown: list[pa.Table] = []
    with TablePool(worker, RayOptions(config.ray_address, config.actors),
                   config.store if config.run_id is not None else None) as pool:
        result.engine = pool.described
        if not pool.gpus and config.device == "cuda":
            raise PipelineError("--device cuda was asked for, but the Ray cluster has no GPUs.")
        if not pool.gpus and config.precision == "fp16":
            raise PipelineError("--precision fp16 needs GPU actors; on CPU actors use bf16 or fp32.")
        reporter.start("predict", sum(n for _, _, n in sink.pending), "img")
        started_at = time.perf_counter()
        for index, done in pool.map(tagged):
            sink.commit(index, done.rows)
            _tally(result, done, shown, config)
            reporter.advance("predict", done.rows.num_rows)
        result.seconds = time.perf_counter() - started_at
    result.rows = pa.concat_tables(shown) if shown else PREDICTIONS.empty_table()
    return result


def _units_of(path: Path, size: int) -> Iterator[pa.Table]:
    """The rows of a Parquet file in tables of exactly `size` rows (the last may be shorter)."""
    held: list[pa.Table] = []
    count = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=size):
        table = pa.Table.from_batches([batch])
        while table.num_rows:
            take = min(size - count, table.num_rows)
            held.append(table.slice(0, take))
            count, table = count + take, table.slice(take)
            if count == size:
                yield pa.concat_tables(held)
                held, count = [], 0
    if held:
        yield pa.concat_tables(held)


def _command(config: PredictConfig, detector: Detector) -> dict[str, Any]:
    """What the rows of `--output DIR/` depend on: a rerun with the same resumes, another is refused. The
    engine, device, batch size and workers change how fast, not what (they may differ between runs)."""
    if config.detector is not None:
        made = hashlib.sha256((config.detector / "config.json").read_bytes()).hexdigest()[:16]
        where = {"detector": str(config.detector.resolve()), "config_digest": made}
    else:
        assert config.store is not None
        where = {"detector": f"run {config.run_id}", "store": str(config.store.root.resolve())}
    return {"command": "predict", **where, "model_key": detector.spec.model_key,
            "sources": [str(Path(p).resolve()) for p in config.sources], "threshold": config.threshold,
            "caption": config.caption, "explain": config.explain, "precision": config.precision,
            "max_bytes": config.max_bytes, "max_pixels": config.max_pixels, "shard_rows": config.shard_rows}


class _Units:
    """The parts still to write, in input order: rows streamed in that order (`write`, the local loop) are
    cut at unit boundaries; a whole unit's rows (`commit`, from an actor) go straight to its part."""

    def __init__(self, parts: PartsFolder, pending: list[tuple[int, str, int]]) -> None:
        self.parts, self.pending = parts, pending
        self.left = {index: (key, rows) for index, key, rows in pending}
        self.stream = iter(pending)
        self.current: tuple[int, str, int] | None = None
        self.held: list[pa.Table] = []
        self.count = 0

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            if self.current is None:
                self.current = next(self.stream)
            index, _, rows = self.current
            take = min(rows - self.count, table.num_rows)
            self.held.append(table.slice(0, take))
            self.count, table = self.count + take, table.slice(take)
            if self.count == rows:
                self.commit(index, pa.concat_tables(self.held))
                self.current, self.held, self.count = None, [], 0

    def commit(self, index: int, rows: pa.Table) -> None:
        key, expected = self.left.pop(index)
        if rows.num_rows != expected:  # one prediction per input, always: anything else is a bug, not a part
            raise PipelineError(f"Unit {index} came back with {rows.num_rows} rows for {expected} inputs; its part "
                                "was not written.")
        self.parts.commit(index, key, rows)

    def finalize(self) -> None:
        if self.left:
            raise PipelineError(f"{len(self.left)} units of the run were not written (the first: unit "
                                f"{min(self.left)}); rerun the command to finish them.")

    def discard(self) -> None:
        """Nothing to undo: the parts written are whole, and a rerun skips them."""


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
