"""Shortcut alarms: evidence that something other than the image tells real from generated.

Text shortcut: when a detector that sees only the text (caption for real images, prompt for
generated ones) reaches a high test AUC, or one whose interval overlaps the image+text method's,
the image+text numbers measure caption style. Format shortcut: when file format, JPEG quality and
image size alone predict the label. Both are sentences for people, computed from what the store holds.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from pipeline.evaluation.results import RunMetrics, SplitMetrics
from pipeline.sources.locations import Location, LocationReader
from pipeline.sources.reading import Expected
from pipeline.store import catalog
from pipeline.store.layout import Store
from trainer.metrics import Estimate, evaluate

TEXT_AUC_ALARM = 0.9  # a text-only test AUC at or above this is a shortcut whatever the method does
PROBE_AUC_ALARM = 0.9
PROBE_SAMPLES = 4000  # per split: the probe reads file headers only, but of this many files at most


def text_alarm(text_test: SplitMetrics, method_test: SplitMetrics | None = None) -> str | None:
    """One sentence when the text-only row's test AUC says the captions alone separate the classes."""
    text = text_test.estimate("auc")
    if text is None or math.isnan(text.value):
        return None
    method = method_test.estimate("auc") if method_test is not None else None
    high = text.value >= TEXT_AUC_ALARM
    overlap = (method is not None and not math.isnan(text.lo) and not math.isnan(method.lo)
               and text.lo > 0.5 and text.hi >= method.lo)
    if not (high or overlap):
        return None
    why = (f"text-only test AUC {_fmt(text)}" + (f" against the image+text method's {_fmt(method)}"
                                                  if method is not None else ""))
    return (f"Shortcut: the captions alone separate the classes ({why}), so image+text numbers measure "
            "caption style rather than images; rerun with --pairing shared, which gives a real image and "
            "its generated siblings the same text.")


def text_alarm_for(store: Store, features: str, pairing: str, metrics: RunMetrics) -> str | None:
    """The shortcut sentence of a run: from its own test numbers if it is text-only, else from the
    newest text-only run on the same embeddings and pairing, against this run's."""
    if features == "text":
        return text_alarm(metrics.test)
    found = text_only_summary(store, metrics.model_key, pairing)
    return text_alarm(found[1], metrics.test) if found else None


MIN_GROUPS = 30  # fewer independent groups than this in test: the intervals cannot be trusted


def small_sample_note(test: SplitMetrics) -> str | None:
    """A warning sentence when the test split is too small for its numbers (or intervals) to mean much."""
    n, groups = test.n, test.groups
    if not n:
        return None
    if groups is not None and groups < MIN_GROUPS:
        return (f"Small test split: {n} images in {groups} groups (a real image and its generated siblings are one "
                f"group). Intervals from fewer than {MIN_GROUPS} groups are unreliable, and an AUC of 100.00 here is "
                "not a result; ingest more data before reading these numbers.")
    return None


def text_only_summary(store: Store, model_key: str, pairing: str) -> tuple[str, SplitMetrics] | None:
    """The newest text-only run on these embeddings and pairing: (run_id, its test numbers)."""
    if not catalog.shard_paths(store, "runs"):
        return None
    rows = catalog.query(store, "SELECT run_id, metrics_json FROM runs WHERE model_key = ? AND features = 'text' "
                                "ORDER BY created_at DESC", [model_key]).to_pylist()
    for row in rows:
        metrics = RunMetrics.from_json(json.loads(row["metrics_json"]))
        if metrics.pairing == pairing and metrics.test.n:
            return row["run_id"], metrics.test
    return None


@dataclass(frozen=True)
class FormatProbe:
    """How well file format, JPEG quality and size alone predict the label on the test split."""

    auc: Estimate | None  # of the lookup probe; None when no bytes were readable
    bytes_per_pixel_auc: float | None  # the best single continuous cue, either direction
    read: int
    unreadable: int
    alarm: str | None

    def sentence(self) -> str:
        if self.auc is None:
            return ("Format probe not run: the store holds no readable image bytes of both classes in train and "
                    f"test (imported features carry none; {self.unreadable} files unreadable).")
        head = (f"Format probe (file format, JPEG quality and image size alone, looked up from train): test AUC "
                f"{_fmt(self.auc)}; bytes per pixel alone {_pct(self.bytes_per_pixel_auc)}.")
        return f"{head} {self.alarm}" if self.alarm else head


def format_probe(store: Store, seed: int = 0, per_split: int = PROBE_SAMPLES) -> FormatProbe:
    """Fit a lookup table (format, JPEG quality, width, height) → rate of generated on train; score test.

    Reads only image headers (PIL opens lazily) of at most `per_split` samples of each split, picked by
    a fixed hash order. Samples whose bytes cannot be read are counted, not guessed.
    """
    rows = {split: catalog.query(store, (
        "SELECT sample_id, label, group_key, source_uri, source_member, source_row, byte_offset, byte_length "
        "FROM samples WHERE split = ? AND derived_from IS NULL AND source_format NOT LIKE 'features:%' "
        "ORDER BY hash(sample_id) LIMIT ?"), [split, per_split]).to_pylist()
        for split in ("train", "test")}
    reader = LocationReader()
    feats: dict[str, list[tuple[Any, ...] | None]] = {}
    unreadable = 0
    for split, items in rows.items():
        feats[split] = []
        for row in items:
            f = _header_features(reader, row)
            unreadable += f is None
            feats[split].append(f)
    train = [(f, r["label"]) for f, r in zip(feats["train"], rows["train"], strict=True) if f is not None]
    test = [(f, r) for f, r in zip(feats["test"], rows["test"], strict=True) if f is not None]
    read = len(train) + len(test)
    if not train or not test or len({label for _, label in train}) < 2:
        return FormatProbe(None, None, read, unreadable, None)
    table: dict[tuple[Any, ...], list[int]] = {}
    for f, label in train:
        table.setdefault(f[:4], [0, 0])[label] += 1
    prior = np.mean([label for _, label in train])
    labels = np.array([r["label"] for _, r in test])
    scores = np.array([(c[1] + prior) / (c[0] + c[1] + 1) if (c := table.get(f[:4])) else prior for f, _ in test])
    groups = np.array([r["group_key"] for _, r in test])
    auc = evaluate(labels, scores, groups, rng=np.random.default_rng(seed), n_boot=500)["auc"]
    bpp_auc = evaluate(labels, np.array([f[4] for f, _ in test]))["auc"].value
    bpp = None if np.isnan(bpp_auc) else max(bpp_auc, 1 - bpp_auc)
    alarm = None
    if not math.isnan(auc.value) and auc.value >= PROBE_AUC_ALARM:
        alarm = ("Shortcut: file format, JPEG quality or size alone separate the classes, so a detector may "
                 "learn the container instead of the image; re-encode every split alike "
                 "(e.g. `pipeline perturb --ops jpeg:95 --splits train,val,test`).")
    return FormatProbe(auc, bpp, read, unreadable, alarm)


def _header_features(reader: LocationReader, row: dict[str, Any]) -> tuple[Any, ...] | None:
    """(format, JPEG quality estimate, width, height, bytes per pixel) from the file header."""
    try:
        data = reader.read(Location.from_row(row), Expected.of(row, digest=False))  # bounded; the size checked
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            return img.format, _jpeg_quality(img), width, height, len(data) / max(1, width * height)
    except Exception:  # noqa: BLE001 - any unreadable file is counted as such, whatever the reason
        return None


def _jpeg_quality(img: Image.Image) -> int | None:
    """libjpeg's quality from the first quantisation table (standard tables scaled); None if not JPEG."""
    tables = getattr(img, "quantization", None)
    if not tables:
        return None
    luma = np.asarray(tables[0], dtype=np.float64)
    scale = 100.0 * luma.mean() / _STD_LUMA_MEAN
    quality = (200 - scale) / 2 if scale <= 100 else 5000 / scale
    return int(np.clip(round(quality), 1, 100))


_STD_LUMA_MEAN = 57.625  # mean of the JPEG standard luminance table (Annex K), quality 50


def _fmt(cell: Estimate | None) -> str:
    if cell is None:
        return "–"
    if math.isnan(cell.lo) or math.isnan(cell.hi):
        return _pct(cell.value)
    return f"{_pct(cell.value)} [{_pct(cell.lo)}, {_pct(cell.hi)}]"


def _pct(value: Any) -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{100 * float(value):.1f}"
