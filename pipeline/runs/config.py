"""What defines a run: `TrainConfig` (every field but `name` enters the hash) and `config_hash`.

A run's identity is its config plus a fingerprint of the data it read, so the same config on the
same data is found again (`record.existing_run`) instead of trained twice. The fingerprint names the
rows the run reads by their content (`FeatureTable.data_fingerprint`), never the store's files: the
same data in another store gets the same hash, and samples the run does not read (those `perturb`
derives) leave it unchanged. An image-only run reads no text, so its text pairing is not part of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from pipeline.choices import Detector, Features, InputNorm, Pairing
from pipeline.config import Validated, at_least, within
from pipeline.errors import PipelineError
from pipeline.features.view import FeatureTable
from trainer.fit import ARITHMETIC, FitConfig
from trainer.precision import PRECISIONS


@dataclass(frozen=True)
class TrainConfig(Validated):
    """Everything that defines a run. `name` is a label only; every other field enters the hash."""

    model_key: str | None = None
    features: Features = "image+text"
    pairing: Pairing = "as-ingested"
    batch_size: int = 2048
    shuffle_buffer: int = 65536
    seed: int = 0
    detector: Detector = "mlp"  # mlp: the paper's detector | knn: vote of the nearest training samples
    exclude_leaks: bool = False  # drop val/test samples with a near-duplicate in an earlier split
    leak_threshold: float = 0.95  # cosine similarity that counts as a near-duplicate
    # l2: the unit vectors as stored | raw: each scaled back by its stored norm (the reference code's inputs)
    input_norm: InputNorm = "l2"
    steps_per_epoch: int | None = None  # stop each epoch after this many batches (None: the whole split)
    # fit (and pick the epoch) on the real images and these generators' only; score every sample
    train_generators: tuple[str, ...] | None = None
    # train, pick and score on the samples `pipeline perturb` derived by this operation (e.g. jpeg:95 applied
    # to every split, so that train and test share one format) instead of the samples as ingested
    perturbation: str | None = None
    fit: FitConfig = field(default_factory=FitConfig)
    name: str | None = None
    # torch threads (None: `trainer.threads.choose_threads` decides). Not in the hash as asked: the
    # count used enters it where the numbers depend on it (no MKL strict mode), see `config_hash`
    threads: int | None = None

    def check(self) -> None:
        within(self, "leak_threshold", 0, 1, low_open=True)
        if self.batch_size < 2:
            raise PipelineError("--batch-size must be at least 2 (BatchNorm needs two samples).")
        at_least(self, "shuffle_buffer", 1)
        at_least(self, "steps_per_epoch", 1)
        at_least(self, "threads", 1)
        fit = self.fit
        if fit.precision not in PRECISIONS:
            raise PipelineError(f"--precision must be one of {', '.join(PRECISIONS)}, not {fit.precision!r}.")
        at_least(fit, "epochs", 1)
        within(fit, "cvar_alpha", 0, 1, low_open=True)
        within(fit, "auc_gamma", 0, 1)
        within(fit, "auc_eta", 0, 1, low_open=True)
        if fit.auc_p <= 1:
            raise PipelineError(f"--auc-p must be above 1, not {fit.auc_p}.")
        if fit.lr <= 0:
            raise PipelineError(f"--lr must be above 0, not {fit.lr}.")
        at_least(fit, "weight_decay", 0)
        at_least(fit, "sam_rho", 0)
        within(fit, "dropout", 0, 1, high_open=True)
        at_least(fit, "depth", 0)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> TrainConfig:
        """Flat keys (as in TOML): TrainConfig fields and FitConfig fields side by side. The former
        `bf16 = true/false` reads as `precision = "bf16"/"fp32"`."""
        if "bf16" in data and "precision" not in data:
            data = {**{k: v for k, v in data.items() if k != "bf16"},
                    "precision": "bf16" if data["bf16"] else "fp32"}
        own = {f.name for f in dataclasses.fields(TrainConfig)} - {"fit"}
        fit_fields = {f.name for f in dataclasses.fields(FitConfig)}
        unknown = sorted(set(data) - own - fit_fields)
        if unknown:
            raise PipelineError(f"Unknown training option(s): {', '.join(unknown)}.")
        fit_kwargs: dict[str, Any] = {
            k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in fit_fields
        }
        _check_types(data)
        own_kwargs: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in own}
        return TrainConfig(fit=FitConfig(**fit_kwargs), **own_kwargs)


    def flat(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "fit"}
        out.update(dataclasses.asdict(self.fit))
        return out


def config_hash(config: TrainConfig, model_key: str, table: FeatureTable, leak_scan: str | None = None,
                threads: int | None = None) -> str:
    """What determines a run's numbers: its config (less `name`, less `pairing` for image features, and
    precision as resolved, not `auto`), the trainer's arithmetic version, the model key, the content
    fingerprint of the rows it reads and, with --exclude-leaks, of the samples it leaves out, and
    `threads` where the numbers depend on the thread count (no MKL strict mode; none otherwise)."""
    flat = config.flat()
    flat.pop("name")
    flat.pop("threads")
    if config.features == "image":  # the pairing changes which text a row gets: an image-only run reads none
        flat.pop("pairing")
    flat["arithmetic"] = ARITHMETIC
    if threads is not None:
        flat["threads"] = threads
    for optional in ("train_generators", "perturbation"):  # absent: runs made before the option keep their hash
        if flat.get(optional) is None:
            flat.pop(optional, None)
    if flat.get("input_norm") == "l2":  # the default: runs made before the option keep their hash
        flat.pop("input_norm", None)
    if flat.get("steps_per_epoch") is None:
        flat.pop("steps_per_epoch", None)
    flat["model_key"] = model_key
    flat["data"] = table.data_fingerprint(config.features)
    if leak_scan:
        flat["leak_scan"] = leak_scan
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()


def _check_types(data: dict[str, Any]) -> None:
    """TOML values of the wrong type get a sentence, not a TypeError deep in the trainer."""
    defaults = {**TrainConfig().flat()}
    for key, value in data.items():
        default = defaults.get(key)
        if default is None or value is None:
            continue
        want: tuple[type, ...] = (int, float) if isinstance(default, float) else (type(default),)
        if isinstance(default, tuple):
            want = (list, tuple)
        if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, want):
            raise PipelineError(f"Training option {key} must be {type(default).__name__}, not {value!r}.")
