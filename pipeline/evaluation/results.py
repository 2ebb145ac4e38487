"""A run's numbers as types: what training measured, with every interval, and a versioned JSON form.

A run's `metrics.json` (and the `metrics_json` column of `runs`) holds `RunMetrics.to_json()`: the
shape it always had, plus `"version"`. `RunMetrics.from_json` reads every version written (version 1
had no key). Every page and table reads these stored numbers back through `SplitMetrics.estimate`;
nothing recomputes an interval a run already has (`pipeline.evaluation.bootstrap` computes them once).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.evaluation.calibration import Calibration
from trainer.metrics import Estimate

METRICS_VERSION = 3  # 3: `n` per metric (real_acc: real images; fake_acc, TPR: generated), n_real, n_fake; checks
NAN = float("nan")


@dataclass(frozen=True)
class Bootstrap:
    """How a split's intervals were drawn: replicates, level, the resampled unit, the generator's seed."""

    replicates: int
    level: float = 0.95
    unit: str = "group_key"
    seed: tuple[int, ...] = ()


@dataclass(frozen=True)
class AtThreshold:
    """Test metrics at the threshold chosen on val (balanced accuracy)."""

    threshold: float
    metrics: dict[str, Estimate]


@dataclass(frozen=True)
class SplitMetrics:
    """One split's numbers: point values, and per generator (`"all"` too) every metric's estimate."""

    n: int = 0
    auc: float | None = None
    ap: float | None = None
    accuracy: float | None = None
    auc_by_generator: dict[str, float] = field(default_factory=dict)
    intervals: dict[str, dict[str, Estimate]] = field(default_factory=dict)  # generator -> metric -> estimate
    bootstrap: Bootstrap | None = None
    groups: int | None = None  # independent groups (a real image and its generated siblings are one)
    at_val_threshold: AtThreshold | None = None

    @property
    def generators(self) -> list[str]:
        return sorted(self.auc_by_generator)

    def estimate(self, metric: str = "auc", generator: str = "all") -> Estimate | None:
        """The stored estimate of `metric` on `generator`'s samples (and every real one); for a run from
        before intervals, the value alone (NaN bounds); None when the split has no such number."""
        found = self.intervals.get(generator, {}).get(metric)
        if found is not None:
            return found
        point = {"auc": self.auc, "ap": self.ap, "acc": self.accuracy}.get(metric) if generator == "all" else (
            self.auc_by_generator.get(generator) if metric == "auc" else None)
        return None if point is None else Estimate(point, NAN, NAN, self.n)

    def to_json(self) -> dict[str, Any]:
        if not self.n:
            return {"n": 0}
        out: dict[str, Any] = {"auc": _num(self.auc), "ap": _num(self.ap), "accuracy": _num(self.accuracy),
                               "n": self.n, "auc_by_generator": {g: _num(v) for g, v in self.auc_by_generator.items()}}
        if self.intervals:
            out["intervals"] = {g: {m: estimate_json(e) for m, e in d.items()} for g, d in self.intervals.items()}
        if self.bootstrap is not None:
            b = self.bootstrap
            out["bootstrap"] = {"replicates": b.replicates, "level": b.level, "unit": b.unit, "seed": list(b.seed)}
        if self.groups is not None:
            out["groups"] = self.groups
        if self.at_val_threshold is not None:
            out["at_val_threshold"] = {"threshold": self.at_val_threshold.threshold, "metrics": {
                m: estimate_json(e) for m, e in self.at_val_threshold.metrics.items()}}
        return out

    @staticmethod
    def from_json(data: dict[str, Any] | None) -> SplitMetrics:
        data = data or {}
        boot = data.get("bootstrap")
        chosen = data.get("at_val_threshold")
        return SplitMetrics(
            n=int(data.get("n") or 0),
            auc=_float(data.get("auc")), ap=_float(data.get("ap")), accuracy=_float(data.get("accuracy")),
            auc_by_generator={g: _nan(v) for g, v in (data.get("auc_by_generator") or {}).items()},
            intervals={g: {m: estimate_from_json(e) for m, e in d.items()}
                       for g, d in (data.get("intervals") or {}).items()},
            bootstrap=None if boot is None else Bootstrap(int(boot["replicates"]), float(boot.get("level", 0.95)),
                                                          str(boot.get("unit", "group_key")),
                                                          tuple(int(s) for s in boot.get("seed") or ())),
            groups=None if data.get("groups") is None else int(data["groups"]),
            at_val_threshold=_at_threshold(chosen),
        )


def _at_threshold(chosen: dict[str, Any] | None) -> AtThreshold | None:
    """The test metrics at val's threshold; None where a run stored none (one recorded with a non-finite
    setting, before those were refused, has `threshold: null`)."""
    if not chosen or chosen.get("threshold") is None:
        return None
    return AtThreshold(float(chosen["threshold"]), {
        m: estimate_from_json(e) for m, e in (chosen.get("metrics") or {}).items()})


@dataclass(frozen=True)
class Alarm:
    """A sentence that says a run's numbers mislead, with the evidence behind it (stored with the run,
    shown wherever its numbers are)."""

    kind: str  # text_shortcut, text_undecided, format_shortcut, small_test, too_few (`evaluation.alarms`)
    sentence: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "sentence": self.sentence, "evidence": self.evidence}

    @staticmethod
    def from_json(data: dict[str, Any]) -> Alarm:
        return Alarm(str(data["kind"]), str(data["sentence"]), dict(data.get("evidence") or {}))


@dataclass(frozen=True)
class Compute:
    """How a run computed: precision and threads as resolved, each with the sentence saying why."""

    precision: str  # fp32 | bf16
    precision_why: str
    threads: int
    threads_why: str
    thread_dependent: bool  # the numbers depend on the thread count (no MKL strict mode): the hash includes it

    def to_json(self) -> dict[str, Any]:
        return {"precision": self.precision, "precision_why": self.precision_why, "threads": self.threads,
                "threads_why": self.threads_why, "thread_dependent": self.thread_dependent}

    @staticmethod
    def from_json(data: dict[str, Any]) -> Compute:
        return Compute(str(data["precision"]), str(data.get("precision_why", "")), int(data["threads"]),
                       str(data.get("threads_why", "")), bool(data.get("thread_dependent", False)))


@dataclass(frozen=True)
class LeftOut:
    """Samples of the store a run could not use, by why."""

    no_image_vector: int = 0  # not encoded yet for this model, or quarantined at decode
    no_text_vector: int = 0  # text features: an empty or missing caption, or one not encoded yet


@dataclass(frozen=True)
class RunMetrics:
    """Everything a run measured. MLP runs fill the training fields, kNN runs the `k` ones."""

    model_key: str
    random_weights: bool | None
    detector: str
    features: str
    pairing: str
    train: SplitMetrics
    val: SplitMetrics
    test: SplitMetrics
    left_out: LeftOut = field(default_factory=LeftOut)
    excluded_leaks: dict[str, int] | None = None  # leaking val/test samples left out of the metrics
    # mlp
    best_epoch: int | None = None
    history: tuple[dict[str, Any], ...] = ()  # one record per epoch: epoch, train_loss, lr, val_* …
    eval_loss: float | None = None  # the objective on the fixed evaluation set (`evaluation.loss`)
    eval_set: dict[str, Any] | None = None  # {"split", "rows"}
    skipped_missing_text: int | None = None
    compute: Compute | None = None  # precision and threads as resolved
    timing: dict[str, Any] | None = None  # seconds and samples/s of the fit
    # knn
    k: int | None = None
    val_auc_by_k: dict[str, float] | None = None
    index: dict[str, Any] | None = None
    alarms: tuple[Alarm, ...] = ()  # computed once, when the run was trained
    calibration: Calibration | None = None  # fitted on val when trained (None: a run from before it)
    # what the shortcut checks measured on the run's data, alarm or not (`evaluation.probes`): "text", "format"
    checks: dict[str, Any] = field(default_factory=dict)
    version: int = METRICS_VERSION

    def split(self, name: str) -> SplitMetrics:
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    @property
    def chosen(self) -> str:
        """What the fit chose, in words: the kNN's k or the best validation epoch."""
        return f"k = {self.k}" if self.k is not None else f"best epoch {self.best_epoch}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version, "model_key": self.model_key,
                               "random_weights": self.random_weights, "detector": self.detector,
                               "features": self.features, "pairing": self.pairing}
        if self.k is not None:
            out.update({"k": self.k, "val_auc_by_k": self.val_auc_by_k, "index": self.index})
        else:
            out.update({"best_epoch": self.best_epoch, "history": [jsonable(r) for r in self.history],
                        "eval_loss": _num(self.eval_loss), "eval_set": self.eval_set,
                        "skipped_missing_text": self.skipped_missing_text,
                        "compute": self.compute.to_json() if self.compute else None, "timing": self.timing})
        out.update({"train": self.train.to_json(), "val": self.val.to_json(), "test": self.test.to_json(),
                    "left_out": {"no_image_vector": self.left_out.no_image_vector,
                                 "no_text_vector": self.left_out.no_text_vector},
                    "excluded_leaks": self.excluded_leaks})
        if self.alarms:
            out["alarms"] = [a.to_json() for a in self.alarms]
        if self.calibration is not None:
            out["calibration"] = self.calibration.to_json()
        if self.checks:
            out["checks"] = self.checks
        return jsonable(out)

    @staticmethod
    def from_json(data: dict[str, Any]) -> RunMetrics:
        left = data.get("left_out") or {}
        by_k = data.get("val_auc_by_k")
        return RunMetrics(
            model_key=data["model_key"], random_weights=data.get("random_weights"),
            detector=data.get("detector", "mlp"), features=data.get("features", "image+text"),
            pairing=data.get("pairing", "as-ingested"),
            train=SplitMetrics.from_json(data.get("train")), val=SplitMetrics.from_json(data.get("val")),
            test=SplitMetrics.from_json(data.get("test")),
            left_out=LeftOut(int(left.get("no_image_vector") or 0), int(left.get("no_text_vector") or 0)),
            excluded_leaks=data.get("excluded_leaks"),
            best_epoch=data.get("best_epoch"), history=tuple(data.get("history") or ()),
            eval_loss=_float(data.get("eval_loss")), eval_set=data.get("eval_set"),
            skipped_missing_text=data.get("skipped_missing_text"),
            compute=Compute.from_json(data["compute"]) if data.get("compute") else None, timing=data.get("timing"),
            k=data.get("k"), val_auc_by_k=None if by_k is None else {str(k): v for k, v in by_k.items()},
            index=data.get("index"), alarms=tuple(Alarm.from_json(a) for a in data.get("alarms") or ()),
            calibration=Calibration.from_json(data["calibration"]) if data.get("calibration") else None,
            checks=dict(data.get("checks") or {}), version=int(data.get("version", 1)),
        )


def estimate_from_json(data: dict[str, Any]) -> Estimate:
    return Estimate(_nan(data.get("value")), _nan(data.get("lo")), _nan(data.get("hi")), int(data.get("n") or 0),
                    _count(data.get("n_real")), _count(data.get("n_fake")))


def estimate_json(e: Estimate) -> dict[str, Any]:
    """An estimate as JSON (NaN as null), as metrics.json, the `metrics` view and alarms' evidence hold it."""
    return {"value": _num(e.value), "lo": _num(e.lo), "hi": _num(e.hi), "n": e.n, "n_real": e.n_real,
            "n_fake": e.n_fake}


def _count(value: Any) -> int | None:
    return None if value is None else int(value)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _nan(value: Any) -> float:
    return NAN if value is None else float(value)


def _num(value: Any) -> float | None:
    """A number for JSON: NaN (undefined on the data) becomes null."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, np.generic):
        return jsonable(value.item())
    return value
