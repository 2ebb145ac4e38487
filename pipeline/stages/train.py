"""Stage `train`: fit the detector on cached features and record a run, its checkpoint and scores.

A run (see `pipeline.runs`) is its config and hash, per-epoch metrics, the weights of the best
validation epoch, test metrics and one score per sample of every split. It lands in
`runs/<run_id>/` and `scores/`, visible in the views. CLIP is never loaded here.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.config import Validated
from pipeline.errors import PipelineError
from pipeline.features.loader import FeatureLoader, LoaderConfig
from pipeline.features.view import FeatureTable, feature_table, resolve_model_key
from pipeline.reporting import Reporter, Silent
from pipeline.runs import (
    Scores,
    TrainConfig,
    config_hash,
    evaluation_loss,
    evaluation_set,
    existing_run,
    run_metrics,
    write_run,
)
from pipeline.store import catalog
from pipeline.store.layout import Store
from pipeline.store.lock import writing
from schemas import SPLITS
from trainer.fit import FitConfig, build_model, fit, predict
from trainer.metrics import choose_threshold, evaluate, evaluate_by_generator, summary


@dataclass(frozen=True)
class TrainJob(Validated):
    """One `train` invocation: which store, which run definition, and whether to reuse a finished run."""

    store: Store
    config: TrainConfig = field(default_factory=TrainConfig)
    skip_existing: bool = False  # a run with the same config hash is returned instead of trained again
    wait: bool = True  # wait for another writer of the store instead of stopping


@dataclass
class TrainResult:
    run_id: str
    config_hash: str
    model_key: str
    random_weights: bool | None
    metrics: dict[str, Any]
    skipped: bool = False  # a run with the same config hash already existed


def run(job: TrainJob, reporter: Reporter | None = None) -> TrainResult:
    """Train one run (or find it already trained); per-epoch records go to `reporter.event('epoch', …)`."""
    reporter = reporter or Silent()
    store, config = job.store, job.config
    if not store.exists():
        raise PipelineError(f"No store at {store.root}: run `pipeline ingest` and `pipeline encode` first.")
    model_key = resolve_model_key(store, config.model_key)
    _check_generators(store, config)
    if config.perturbation is not None and not catalog.query(
            store, "SELECT 1 FROM samples WHERE perturbation = ? LIMIT 1", [config.perturbation]).num_rows:
        raise PipelineError(f"No samples derived by {config.perturbation}: run `pipeline perturb --ops "
                            f"{config.perturbation} --splits train,val,test` and `pipeline encode` first.")
    table = feature_table(store, model_key, config.pairing, config.perturbation)
    excluded, leak_scan = _leaks(store, model_key, config)
    chash = config_hash(config, model_key, table, leak_scan)
    random_weights = store.model_info(model_key).get("random_weights")
    if job.skip_existing and (found := existing_run(store, chash)):
        return TrainResult(found, chash, model_key, random_weights, run_metrics(store, found), skipped=True)

    if config.detector == "knn":
        scores, extra, state = _fit_knn(table, config, excluded)
    else:
        scores, extra, state = _fit_mlp(table, config, excluded, reporter)
    metrics = {
        "model_key": model_key,
        "random_weights": random_weights,
        "detector": config.detector,
        "features": config.features,
        "pairing": config.pairing,
        **extra,
        **_summaries(store, scores, excluded, config.seed),
        "left_out": _left_out(store, table, config, len(scores.score)),
        "excluded_leaks": {split: int(np.sum((scores.split == split) & np.isin(scores.sample_id, list(excluded))))
                           for split in ("val", "test")} if config.exclude_leaks else None,
    }
    run_id = f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{chash[:8]}-{uuid.uuid4().hex[:4]}"
    # Fitting needs no lock (it reads immutable files); committing does. A parallel sweep job may
    # have finished the same config meanwhile: then its run stands and this one is not written.
    with writing(store, reporter, job.wait):
        if job.skip_existing and (found := existing_run(store, chash)):
            return TrainResult(found, chash, model_key, random_weights, run_metrics(store, found), skipped=True)
        write_run(store, run_id, chash, config, model_key, metrics, state, scores)
    return TrainResult(run_id, chash, model_key, random_weights, metrics)


def _left_out(store: Store, table: FeatureTable, config: TrainConfig, scored: int) -> dict[str, int]:
    """Samples of the store this run could not use, by why: no image vector for this model (not encoded
    yet, or quarantined at decode), or, for text and image+text features, no text vector (empty or
    missing caption, or the caption not encoded yet)."""
    which = "perturbation IS NULL" if config.perturbation is None else "perturbation = ?"
    params: list[object] = [] if config.perturbation is None else [config.perturbation]
    total = catalog.query(store, f"SELECT count(DISTINCT sample_id) FROM samples WHERE {which}", params)
    return {"no_image_vector": max(0, int(total.column(0)[0].as_py()) - table.rows),
            "no_text_vector": max(0, table.rows - scored) if config.features != "image" else 0}


def _leaks(store: Store, model_key: str, config: TrainConfig) -> tuple[set[str], str | None]:
    if not config.exclude_leaks:
        return set(), None
    from pipeline.stages.leaks import leaking_ids

    return leaking_ids(store, model_key, config.leak_threshold)


def _fit_mlp(table: FeatureTable, config: TrainConfig, excluded: set[str],
             reporter: Reporter) -> tuple[Scores, dict[str, Any], dict]:
    # Weights and dropout draw from torch's global generator: seed a forked copy, restore it after.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return _fit_mlp_seeded(table, config, excluded, reporter)


def _fit_mlp_seeded(table: FeatureTable, config: TrainConfig, excluded: set[str],
                    reporter: Reporter) -> tuple[Scores, dict[str, Any], dict]:
    loaders = {
        split: FeatureLoader(table, (split,), LoaderConfig(
            config.features, config.batch_size, shuffle=split == "train",
            buffer_rows=config.shuffle_buffer, seed=config.seed, input_norm=config.input_norm))
        for split in SPLITS
    }
    model = build_model(loaders["train"].in_dim, config.fit)

    only = config.train_generators  # None: every generator

    def train_batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b in itertools.islice(loaders["train"].epoch(epoch), config.steps_per_epoch):
            if only is None:
                yield b.x, b.y
                continue
            keep = torch.from_numpy(_seen(b.y.numpy(), b.generator, only))
            if int(keep.sum()) >= 2:  # BatchNorm needs two rows
                yield b.x[keep], b.y[keep]

    def validate(m: torch.nn.Module) -> dict[str, Any]:
        s = _scores(m, loaders["val"], config.fit)
        if only is not None:
            s = _subset(s, _seen(s.label, s.generator, only))
        return _summarise(s, "val", excluded) if s.label.size else {"auc": float("nan"), "n": 0}

    reporter.start("epochs", config.fit.epochs, "epochs")

    def on_epoch(record: dict[str, Any]) -> None:
        reporter.event("epoch", record)
        reporter.advance("epochs", 1)

    fitted = fit(model, train_batches, validate, config.fit, on_epoch)
    model.load_state_dict(fitted.best_state)
    all_splits = FeatureLoader(table, SPLITS, LoaderConfig(config.features, 8192, input_norm=config.input_norm))
    scores = _scores(model, all_splits, config.fit)
    x, y, eval_split = evaluation_set(table, config.features, config.input_norm)
    extra = {
        "best_epoch": fitted.best_epoch,
        "history": fitted.history,
        "eval_loss": evaluation_loss(model, x, y, config.fit),
        "eval_set": {"split": eval_split, "rows": int(len(y))},
        "skipped_missing_text": all_splits.skipped_missing_text,
    }
    return scores, extra, fitted.best_state


def _fit_knn(table: FeatureTable, config: TrainConfig, excluded: set[str]) -> tuple[Scores, dict[str, Any], None]:
    from pipeline.features.knn import knn_scores

    cols, fitted = knn_scores(table, config.features, SPLITS, excluded, config.seed, input_norm=config.input_norm)
    scores = Scores(cols["sample_id"], cols["split"], cols["label"], cols["generator"], fitted.scores)
    extra = {"k": fitted.k, "val_auc_by_k": fitted.val_auc_by_k, "index": fitted.index_params}
    return scores, extra, None


def _scores(model: torch.nn.Module, loader: FeatureLoader, fit_config: FitConfig) -> Scores:
    """One score per row of the loader's splits, batch by batch: only ids, labels and scores are kept
    (about 150 bytes a sample), never the feature batches."""
    ids, splits, labels, generators, probs = [], [], [], [], []
    for b in loader.epoch(0):
        probs.append(predict(model, [b.x], fit_config))
        ids.append(b.rows.column("sample_id"))
        splits.append(b.rows.column("split"))
        generators.append(b.rows.column("generator"))
        labels.append(b.y.numpy().astype(np.int8))
    if not probs:
        empty = np.zeros(0, object)
        return Scores(empty, empty, np.zeros(0, np.int8), empty, np.zeros(0, np.float32))
    return Scores(pa.chunked_array(ids).to_numpy(), _shared_strings(splits), np.concatenate(labels),
                  _shared_strings(generators), np.concatenate(probs))


def _shared_strings(chunks: list[pa.Array]) -> np.ndarray:
    """A column of few distinct strings as an object array whose rows share one str each (8 bytes a row)."""
    encoded = pa.chunked_array(chunks).combine_chunks().dictionary_encode()
    values = np.array(encoded.dictionary.to_pylist() + [""], dtype=object)
    return values[encoded.indices.fill_null(len(values) - 1).to_numpy()]


def _seen(labels: np.ndarray, generators: np.ndarray, only: tuple[str, ...]) -> np.ndarray:
    """Rows a run restricted to `only` may learn from: every real image and those generators' images."""
    return (np.asarray(labels) == 0) | np.isin(np.asarray(generators).astype(str), list(only))


def _subset(s: Scores, mask: np.ndarray) -> Scores:
    return Scores(s.sample_id[mask], s.split[mask], s.label[mask], s.generator[mask], s.score[mask])


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


def _summarise(s: Scores, split: str, excluded: set[str] | None = None) -> dict[str, Any]:
    mask = _split_mask(s, split, excluded)
    if not mask.any():
        return {"n": 0}
    return summary(s.label[mask], s.score[mask], s.generator[mask])


N_BOOT = 1000  # bootstrap replicates per interval ...
BOOT_CELLS = 200_000_000  # ... fewer (down to MIN_BOOT) when replicates x samples would pass this
MIN_BOOT = 200


def _summaries(store: Store, s: Scores, excluded: set[str], seed: int) -> dict[str, dict[str, Any]]:
    """Each split's summary plus every metric per generator with a 95% group-bootstrap interval.

    Groups come from the samples' `group_key` (a real image and the images generated from its
    caption are resampled together). The train split gets values without intervals (it is not a
    result, and it is the largest). A threshold chosen on val (Youden's J) is applied to test.
    """
    groups = group_keys(store, s.sample_id)
    out: dict[str, dict[str, Any]] = {}
    for i, split in enumerate(SPLITS):
        mask = _split_mask(s, split, excluded)
        if not mask.any():
            out[split] = {"n": 0}
            continue
        y, p, g, grp = s.label[mask], s.score[mask], s.generator[mask], groups[mask]
        n_boot = 0 if split == "train" else max(MIN_BOOT, min(N_BOOT, BOOT_CELLS // int(mask.sum())))
        rng = np.random.default_rng([seed, i])
        out[split] = summary(y, p, g)
        by_gen = evaluate_by_generator(y, p, g, grp, 0.5, rng, n_boot)
        out[split]["intervals"] = {gen: {m: e.as_dict() for m, e in d.items()} for gen, d in by_gen.items()}
        out[split]["bootstrap"] = {"replicates": n_boot, "level": 0.95, "unit": "group_key", "seed": [seed, i]}
        out[split]["groups"] = int(len(np.unique(grp)))
    val, test = _split_mask(s, "val", excluded), _split_mask(s, "test", excluded)
    if val.any() and test.any():
        threshold = choose_threshold(s.label[val], s.score[val])
        chosen = evaluate(s.label[test], s.score[test], groups[test], threshold,
                          np.random.default_rng([seed, len(SPLITS)]), out["test"]["bootstrap"]["replicates"])
        out["test"]["at_val_threshold"] = {
            "threshold": threshold,
            "metrics": {m: chosen[m].as_dict() for m in ("acc", "real_acc", "fake_acc", "balanced_acc")}}
    return out


def _split_mask(s: Scores, split: str, excluded: set[str] | None) -> np.ndarray:
    mask = s.split == split
    if excluded:
        mask &= ~np.isin(s.sample_id, list(excluded))
    return mask


def group_keys(store: Store, sample_ids: np.ndarray) -> np.ndarray:
    """Each sample's `group_key` (its own id when the samples table has none for it)."""
    import pyarrow as pa

    ids = pa.table({"sample_id": pa.array(sample_ids if sample_ids.dtype == object else sample_ids.astype(str),
                                          pa.string()),
                    "i": pa.array(np.arange(len(sample_ids)))})
    found = catalog.query_with(
        store, "SELECT ids.i, samples.group_key FROM ids JOIN samples USING (sample_id)", {"ids": ids})
    groups = sample_ids.astype(object).copy()
    if found.num_rows:
        groups[found.column("i").to_numpy()] = found.column("group_key").to_numpy(zero_copy_only=False)
    return groups.astype(str)


