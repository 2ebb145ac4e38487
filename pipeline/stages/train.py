"""Stage `train`: fit the detector on cached features and record a run, its checkpoint and scores.

A run (see `pipeline.runs`) is its config and hash, per-epoch metrics, the weights of the best
validation epoch, test metrics and one score per sample of every split. It lands in
`runs/<run_id>/` and `scores/`, visible in the views. CLIP is never loaded here. Before it is
written, the shortcut probes of its own rows run and its alarms are computed (`evaluation.probes`,
`evaluation.alarms`): stored with it, never recomputed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch

from pipeline.allocator import step_buffers_reused
from pipeline.choices import TrainPrecision
from pipeline.config import Validated
from pipeline.errors import PipelineError
from pipeline.evaluation import alarms, probes
from pipeline.evaluation.bootstrap import summarise_splits, validation_summary
from pipeline.evaluation.calibration import calibrate
from pipeline.evaluation.loss import evaluation_loss, evaluation_set
from pipeline.evaluation.results import Compute, LeftOut, RunMetrics
from pipeline.evaluation.scores import (
    GroupKeys,
    ScoreCollector,
    ScoreSink,
    ScoreWriter,
    bound_memory,
    score_batches,
    seen_by,
)
from pipeline.features.loader import FeatureLoader, LoaderConfig
from pipeline.features.view import FeatureTable, feature_table, resolve_model_key
from pipeline.reporting import Reporter, Silent
from pipeline.runs.config import TrainConfig, config_hash
from pipeline.runs.record import existing_run, run_metrics, write_run
from pipeline.store import catalog
from pipeline.store.layout import Store
from pipeline.store.writes import require_writable, writing
from schemas import SPLITS, UNLABELLED
from trainer.fit import GEMM_THREAD_INDEPENDENT, build_model, fit
from trainer.precision import resolve_precision
from trainer.products import BF16_THREAD_INDEPENDENT
from trainer.threads import choose_threads, numbers_depend_on_threads

KNN_SLICE_ROWS = 65_536  # kNN scores reach the score sinks this many rows at a time


@dataclass(frozen=True)
class TrainJob(Validated):
    """One `train` invocation: which store, which run definition, and whether to reuse a finished run."""

    store: Store
    config: TrainConfig = field(default_factory=TrainConfig)
    skip_existing: bool = False  # a run with the same config hash is returned instead of trained again
    wait: bool = True  # wait for another writer of the store instead of stopping
    jobs: int = 1  # training jobs running side by side (a sweep's --jobs): they share the cores
    max_threads: int | None = None  # the CPUs a scheduler gave this job (Ray), if any


@dataclass
class TrainResult:
    run_id: str
    config_hash: str
    metrics: RunMetrics
    skipped: bool = False  # a run with the same config hash already existed
    alarms: list[str] = field(default_factory=list)  # the sentences of the run's stored alarms (`metrics.alarms`)
    warnings: list[str] = field(default_factory=list)  # sentences: how the run was made (e.g. emulated bf16)
    compute: Compute | None = None  # how this invocation would compute (None for a kNN run)

    @property
    def model_key(self) -> str:
        return self.metrics.model_key

    @property
    def random_weights(self) -> bool | None:
        return self.metrics.random_weights


def run(job: TrainJob, reporter: Reporter | None = None) -> TrainResult:
    """Train one run (or find it already trained); per-epoch records go to `reporter.event('epoch', …)`."""
    reporter = reporter or Silent()
    store, config = job.store, job.config
    if not store.exists():
        raise PipelineError(f"No store at {store.root}: run `pipeline ingest` and `pipeline encode` first.")
    require_writable(store, "train", "the run, its scores and the caches it trains from")
    model_key = resolve_model_key(store, config.model_key)
    _check_generators(store, config)
    if config.perturbation is not None and not catalog.query(
            store, "SELECT 1 FROM samples WHERE perturbation = ? LIMIT 1", [config.perturbation]).num_rows:
        raise PipelineError(f"No samples derived by {config.perturbation}: run `pipeline perturb --ops "
                            f"{config.perturbation} --splits train,val,test` and `pipeline encode` first.")
    table = feature_table(store, model_key, config.pairing, config.perturbation)
    excluded, leak_scan = _leaks(store, model_key, config)
    config, compute = _resolve_compute(config, job)
    chash = config_hash(config, model_key, table, leak_scan,
                        threads=compute.threads if compute and compute.thread_dependent else None)
    random_weights = store.model_info(model_key).get("random_weights")
    if job.skip_existing and (found := existing_run(store, chash)):
        return _result(store, config, found, chash, run_metrics(store, found), compute, table.retries, skipped=True)

    run_id = f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{chash[:8]}-{uuid.uuid4().hex[:4]}"
    # Scores stream to a temp file as they are computed; metrics see numbers only (`ScoreArrays`).
    writer, keys = ScoreWriter(store, run_id), GroupKeys(store, run_id)
    try:
        collector = ScoreCollector(table.rows, excluded)  # (at most one score per row of the view)
        sinks = (writer, collector, keys)
        if config.detector == "knn":
            extra, state = _fit_knn(table, config, excluded, sinks)
        else:
            assert compute is not None
            previous = torch.get_num_threads()
            torch.set_num_threads(compute.threads)
            try:
                extra, state = _fit_mlp(table, config, excluded, reporter, sinks)
            finally:
                torch.set_num_threads(previous)
            extra["compute"] = compute
        scores = collector.arrays()
        scores.group = keys.codes()
        splits = summarise_splits(scores, config.seed)
        calibration = calibrate({split: (scores.label[m], scores.score[m]) for split in ("val", "test")
                                 if (m := scores.of(split)).any()})
        excluded_counts = {split: int(np.sum((scores.split == SPLITS.index(split)) & scores.excluded))
                           for split in ("val", "test")} if config.exclude_leaks else None
        del scores, collector
        metrics = RunMetrics(model_key=model_key, random_weights=random_weights, detector=config.detector,
                             features=config.features, pairing=config.pairing, train=splits["train"],
                             val=splits["val"], test=splits["test"],
                             left_out=_left_out(store, table, config, writer.rows),
                             excluded_leaks=excluded_counts, calibration=calibration, **extra)
        checks = probes.checks(store, table, config.features, config.seed, config.input_norm)
        metrics = replace(metrics, checks=checks, alarms=alarms.run_alarms(metrics, checks))
        # Fitting needs no lock (it reads immutable files); committing does. A parallel sweep job may
        # have finished the same config meanwhile: then its run stands and this one is not written.
        with writing(store, reporter, job.wait):
            if job.skip_existing and (found := existing_run(store, chash)):
                return _result(store, config, found, chash, run_metrics(store, found), compute, table.retries,
                               skipped=True)
            write_run(store, run_id, chash, config, metrics, state, writer)
    finally:
        writer.discard()
        keys.discard()
    return _result(store, config, run_id, chash, metrics, compute, table.retries)


def _resolve_compute(config: TrainConfig, job: TrainJob) -> tuple[TrainConfig, Compute | None]:
    """The config with its precision resolved for this machine (`auto` → fp32 or bf16), and how the
    run will compute. The resolved precision is what the hash and the stored config say."""
    if config.detector != "mlp":
        return config, None
    precision, precision_why = resolve_precision(config.fit.precision, "cpu")
    # bf16 products are thread-independent only where they go to MKL (Intel: `trainer.products`)
    depends = numbers_depend_on_threads("cpu", GEMM_THREAD_INDEPENDENT and (precision != "bf16"
                                                                            or BF16_THREAD_INDEPENDENT))
    # torch's own count caps it: physical cores by default, or what OMP_NUM_THREADS (set by a user, or by
    # Ray for its workers) asked for
    limit = min(job.max_threads or torch.get_num_threads(), torch.get_num_threads())
    threads, threads_why = choose_threads(config.threads, job.jobs, depends, limit)
    used: TrainPrecision = "bf16" if precision == "bf16" else "fp32"
    resolved = dataclasses.replace(config, fit=dataclasses.replace(config.fit, precision=used))
    return resolved, Compute(precision, precision_why, threads, threads_why, depends)


def _result(store: Store, config: TrainConfig, run_id: str, chash: str, metrics: RunMetrics,
            compute: Compute | None, view_retries: tuple[str, ...] = (), skipped: bool = False) -> TrainResult:
    """The run with the alarms it stored beside its numbers, and how it computed (how its training view was
    built, where that took a retry under a larger memory bound)."""
    warnings = list(view_retries)
    if compute is not None and compute.precision == "bf16" and "no native bf16" in compute.precision_why:
        warnings.append(compute.precision_why + "; consider --precision fp32.")
    return TrainResult(run_id, chash, metrics, skipped, [a.sentence for a in metrics.alarms], warnings, compute)


def _left_out(store: Store, table: FeatureTable, config: TrainConfig, scored: int) -> LeftOut:
    """Samples of the store this run could not use, by why: no image vector for this model (not encoded
    yet, or quarantined at decode), or, for text and image+text features, no text vector (empty or
    missing caption, or the caption not encoded yet)."""
    which = "perturbation IS NULL" if config.perturbation is None else "perturbation = ?"
    params: list[object] = [] if config.perturbation is None else [config.perturbation]
    with catalog.connect(store) as con:
        bound_memory(con, store)  # (a count of distinct ids holds every id: let DuckDB spill)
        total = con.execute(f"SELECT count(DISTINCT sample_id) FROM samples WHERE {which} AND label IS NOT NULL",
                            params).fetchall()[0][0]
        # unlabelled samples are in the view (to be scored) but never in a run: not "left out"
        labelled = table.rows - con.execute(f"SELECT count(*) FROM {table.parts_sql} WHERE split = ?",
                                            [UNLABELLED]).fetchall()[0][0]
    return LeftOut(no_image_vector=max(0, int(total) - labelled),
                   no_text_vector=max(0, labelled - scored) if config.features != "image" else 0)


def _leaks(store: Store, model_key: str, config: TrainConfig) -> tuple[set[str], str | None]:
    """The val/test samples left out as leaks, and their digest for the config hash: which samples,
    not which scan file found them (the same data in another store gets the same hash)."""
    if not config.exclude_leaks:
        return set(), None
    from pipeline.features.leaks import leaking_ids

    ids, _ = leaking_ids(store, model_key, config.leak_threshold)
    return ids, hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]


def _fit_mlp(table: FeatureTable, config: TrainConfig, excluded: set[str], reporter: Reporter,
             sinks: tuple[ScoreSink, ...]) -> tuple[dict[str, Any], dict]:
    # Weights and dropout draw from torch's global generator: seed a forked copy, restore it after.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return _fit_mlp_seeded(table, config, excluded, reporter, sinks)


def _fit_mlp_seeded(table: FeatureTable, config: TrainConfig, excluded: set[str], reporter: Reporter,
                    sinks: tuple[ScoreSink, ...]) -> tuple[dict[str, Any], dict]:
    loaders = {
        split: FeatureLoader(table, (split,), LoaderConfig(
            config.features, config.batch_size, shuffle=split == "train", buffer_rows=config.shuffle_buffer,
            seed=config.seed, input_norm=config.input_norm, order="view" if split == "train" else "rows"))
        for split in SPLITS
    }
    model = build_model(loaders["train"].in_dim, config.fit)

    only = config.train_generators  # None: every generator

    def train_batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b in itertools.islice(loaders["train"].epoch(epoch), config.steps_per_epoch):
            if only is None:
                yield b.x, b.y
                continue
            keep = torch.from_numpy(seen_by(b.rows, only))
            if int(keep.sum()) >= 2:  # BatchNorm needs two rows
                yield b.x[keep], b.y[keep]

    val_rows = loaders["val"].count()

    def validate(m: torch.nn.Module) -> dict[str, Any]:
        collector = ScoreCollector(val_rows, excluded)
        score_batches(m, loaders["val"], config.fit, (collector,), only)
        return validation_summary(collector.arrays())

    reporter.start("epochs", config.fit.epochs, "epochs")

    def on_epoch(record: dict[str, Any]) -> None:  # record: the epoch's metrics, samples_per_s, seconds, eta
        reporter.event("epoch", record)
        reporter.advance("epochs", 1)

    with step_buffers_reused():  # a step's batch-sized tensors come back from the heap, not the kernel
        fitted = fit(model, train_batches, validate, config.fit, on_epoch)
    model.load_state_dict(fitted.best_state)
    all_splits = FeatureLoader(table, SPLITS, LoaderConfig(config.features, 8192, input_norm=config.input_norm,
                                                            order="rows"))  # vectors read in file order
    score_batches(model, all_splits, config.fit, sinks)
    x, y, eval_split = evaluation_set(table, config.features, config.input_norm)
    extra = {
        "best_epoch": fitted.best_epoch,
        "history": tuple(fitted.history),
        "timing": fitted.timing,
        "eval_loss": evaluation_loss(model, x, y, config.fit),
        "eval_set": {"split": eval_split, "rows": int(len(y))},
        "skipped_missing_text": all_splits.skipped_missing_text,
    }
    return extra, fitted.best_state


def _fit_knn(table: FeatureTable, config: TrainConfig, excluded: set[str],
             sinks: tuple[ScoreSink, ...]) -> tuple[dict[str, Any], None]:
    from pipeline.features.knn import knn_scores

    rows, fitted = knn_scores(table, config.features, SPLITS, excluded, config.seed, input_norm=config.input_norm)
    for start in range(0, rows.num_rows, KNN_SLICE_ROWS):  # (both memory-mapped: slices cost no copy)
        for sink in sinks:
            sink.write(rows.slice(start, KNN_SLICE_ROWS), fitted.scores[start:start + KNN_SLICE_ROWS])
    extra = {"k": fitted.k, "val_auc_by_k": {str(k): v for k, v in fitted.val_auc_by_k.items()},
             "index": fitted.index_params}
    return extra, None


def _check_generators(store: Store, config: TrainConfig) -> None:
    if config.train_generators is None:
        return
    if config.detector != "mlp":
        raise PipelineError("--train-generators works with the mlp detector only.")
    known = set(catalog.query(store, "SELECT DISTINCT generator FROM samples WHERE label = 1").column(0).to_pylist())
    unknown = sorted(set(config.train_generators) - known)
    if unknown or not config.train_generators:
        raise PipelineError(f"Unknown generator(s) {', '.join(unknown) or '(none given)'}; the store has: "
                            f"{', '.join(sorted(known))}.")
