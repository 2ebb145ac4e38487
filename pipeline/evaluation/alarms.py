"""Alarms: sentences that say a run's numbers mislead, with the evidence, computed once when it is trained.

`run_alarms(metrics, checks)` turns a run's own test numbers and the probes of its own rows
(`evaluation.probes`) into `Alarm`s, stored with the run (`RunMetrics.alarms`, the `alarms` view) and
shown wherever its numbers are. The rules, as coded here (README "Results you can trust" states them):

- text_shortcut: the text alone separates the classes. The text's test AUC (a text-only run's own; for
  an image+text run, the linear probe of the text it reads) is at least `TEXT_AUC_ALARM`, or its
  interval lies above chance (lower bound > 0.5) and reaches the run's own (its upper bound is at
  least the run's lower bound).
- text_undecided: the text's interval includes chance yet reaches the run's own interval (a text-only
  run: reaches `TEXT_AUC_ALARM`): the test split is too small to rule a caption shortcut in or out.
- format_shortcut: one cue of the image file alone (format, JPEG quality, size, bytes per pixel, file
  size, or format, quality and size together) reaches a test AUC of at least `FORMAT_AUC_ALARM`.
- small_test: the test split holds fewer than `MIN_GROUPS` groups.
- too_few: a number rests on too few images: TPR at x% FPR from fewer than 1/x real images (one false
  positive is more than x%), or fewer than `MIN_PER_CLASS` real or generated test images behind it.

Advice fits the data: `--pairing shared` is advised only when at least `MIXED_FOR_SHARED` of the
groups hold both a real and a generated image (only then can one text serve both classes);
otherwise the sentence says why not and points to `--features image`.
"""

from __future__ import annotations

import math
from typing import Any

from pipeline.evaluation.numbers import estimate_text
from pipeline.evaluation.results import Alarm, RunMetrics, SplitMetrics, estimate_from_json, estimate_json
from trainer.metrics import Estimate

TEXT_AUC_ALARM = 0.9  # a text's test AUC at or above this is a shortcut whatever the run does
FORMAT_AUC_ALARM = 0.9  # a single file cue's test AUC at or above this is a shortcut
MIN_GROUPS = 30  # fewer independent test groups than this: the intervals cannot be trusted
MIN_PER_CLASS = 10  # fewer real (or generated) test images than this behind a number: it means little
MIXED_FOR_SHARED = 0.5  # advise --pairing shared when at least this share of groups holds both classes
LOW_FPR = {"tpr_at_fpr_1": 0.01, "tpr_at_fpr_5": 0.05}
# Kinds that say the numbers measure something else than the images (shown as alarms); the others say how far
# the numbers can be read (small_test, too_few: shown as warnings).
SHORTCUT_KINDS = ("text_shortcut", "text_undecided", "format_shortcut")


def run_alarms(metrics: RunMetrics, checks: dict[str, Any]) -> tuple[Alarm, ...]:
    """Every alarm a run's numbers need, from its own test numbers and the probes of its own rows."""
    found = [text_alarm(metrics, checks.get("text")), format_alarm(checks.get("format")),
             small_test_alarm(metrics.test), too_few_alarm(metrics.test)]
    return tuple(a for a in found if a is not None)


# --- text ----------------------------------------------------------------------------------------------


def text_alarm(metrics: RunMetrics, probe: dict[str, Any] | None) -> Alarm | None:
    """The caption-shortcut alarm of a run that reads text (None for an image-only run)."""
    if metrics.features == "image":
        return None
    probe = probe or {}
    mixed = probe.get("mixed_groups")
    advice = pairing_advice(metrics.pairing, mixed)
    if metrics.features == "text":  # the run is the text-only detector: its own numbers are the evidence
        text, method = metrics.test.estimate("auc"), None
        who = "this text-only run"
    elif probe.get("ran"):
        text, method = estimate_from_json(probe["auc"]), metrics.test.estimate("auc")
        who = f"a linear probe on the text this run reads, {probe['test_rows']} test rows"
    else:
        return None
    kind = text_verdict(text, method)
    if kind is None or text is None:
        return None
    against = f" against this run's {estimate_text(_as_dict(method))}" if method is not None else ""
    evidence = {"text_auc": estimate_json(text), "run_auc": estimate_json(method) if method else None,
                "source": "run" if method is None else "probe", "pairing": metrics.pairing,
                "mixed_groups": mixed, "rule": _rule(kind)}
    if kind == "text_shortcut":
        reads = ("image+text numbers on this data" if metrics.features == "text" else "this run's numbers")
        sentence = (f"Shortcut: the captions alone separate the classes ({who}: test AUC "
                    f"{estimate_text(_as_dict(text))}{against}), so {reads} measure caption style as much as "
                    f"images; {advice}")
    else:
        sentence = (f"Caption shortcut not ruled out: {who} reaches test AUC {estimate_text(_as_dict(text))}"
                    f"{against}, an interval too wide to tell chance from a shortcut (the test split has "
                    f"{metrics.test.groups or '?'} groups); {advice}")
    return Alarm(kind, sentence, evidence)


def text_verdict(text: Estimate | None, method: Estimate | None) -> str | None:
    """`text_shortcut`, `text_undecided` or None, by the rules in the module's docstring."""
    if text is None or math.isnan(text.value):
        return None
    if text.value >= TEXT_AUC_ALARM:
        return "text_shortcut"
    if math.isnan(text.lo) or math.isnan(text.hi):
        return None
    if method is None:
        reaches = text.hi >= TEXT_AUC_ALARM
    else:
        reaches = not math.isnan(method.lo) and text.hi >= method.lo
    if not reaches:
        return None
    return "text_shortcut" if text.lo > 0.5 else "text_undecided"


def pairing_advice(pairing: str, mixed: float | None) -> str:
    """What removes a caption shortcut on this data: shared pairing only where groups hold both classes."""
    if mixed is None:
        return ("--pairing shared removes it where a real image and its generated siblings share a group; "
                "--features image leaves text out.")
    share = f"{100 * mixed:.0f}% of groups"
    if pairing == "shared":
        return (f"--pairing shared is already on ({share} hold both a real and a generated image); "
                "--features image leaves text out.")
    if mixed >= MIXED_FOR_SHARED:
        return (f"rerun with --pairing shared, which gives a real image and its generated siblings the same text "
                f"({share} hold both), or with --features image.")
    if mixed > 0:
        return (f"--pairing shared would change only the {share} that hold both a real and a generated image; "
                "--features image leaves text out.")
    return ("--pairing shared cannot help here: no group holds both a real and a generated image (each text "
            "belongs to one class), so use --features image.")


def _rule(kind: str) -> str:
    if kind == "text_shortcut":
        return (f"text AUC >= {TEXT_AUC_ALARM}, or its interval above 0.5 and reaching the run's "
                "(text upper bound >= the run's lower bound)")
    return f"text interval includes 0.5 yet reaches the run's (a text-only run: reaches {TEXT_AUC_ALARM})"


# --- format --------------------------------------------------------------------------------------------


def format_alarm(probe: dict[str, Any] | None) -> Alarm | None:
    """The container-shortcut alarm: any single file cue (or format, quality and size together) that
    reaches `FORMAT_AUC_ALARM` on test."""
    if not probe or not probe.get("ran"):
        return None
    cues = {name: estimate_from_json(e) for name, e in probe["cues"].items()}
    firing = {name: e for name, e in cues.items() if not math.isnan(e.value) and e.value >= FORMAT_AUC_ALARM}
    if not firing:
        return None
    named = "; ".join(f"{name} alone {estimate_text(_as_dict(e))}" for name, e in firing.items())
    sentence = (f"Shortcut: the image file alone separates the classes (test AUC, each cue looked up on train: "
                f"{named}), so a detector may learn the container instead of the image; re-encode every split "
                "alike (`pipeline perturb --ops jpeg:95 --splits train,val,test`, `pipeline encode`, then train with "
                "`perturbation = \"jpeg:95\"` in its --config file).")
    return Alarm("format_shortcut", sentence, {"cues": probe["cues"], "read": probe.get("read"),
                                                "test_rows": probe.get("test_rows"),
                                                "rule": f"any cue's test AUC >= {FORMAT_AUC_ALARM}"})


def format_summary(probe: dict[str, Any] | None) -> str | None:
    """One sentence of what the format probe found, alarm or not (None when it was not run)."""
    if not probe:
        return None
    if not probe.get("ran"):
        return f"Format probe not run: {probe.get('why', 'no image bytes')}."
    cues = ", ".join(f"{name} {estimate_text(_as_dict(estimate_from_json(e)))}"
                     for name, e in probe["cues"].items())
    return (f"Format probe ({probe['read']} files of train and test; each cue alone looked up on train, "
            f"test AUC × 100): {cues}.")


# --- how much the test split can say ---------------------------------------------------------------------


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


def small_test_alarm(test: SplitMetrics) -> Alarm | None:
    sentence = small_sample_note(test)
    return None if sentence is None else Alarm("small_test", sentence, {
        "n": test.n, "groups": test.groups, "rule": f"test groups < {MIN_GROUPS}"})


def unresolved(metric: str, e: Estimate) -> str | None:
    """Why a TPR at a low FPR cannot be read off these real images (one false positive is already more
    than that FPR), or None."""
    fpr = LOW_FPR.get(metric)
    if fpr is None or e.n_real is None or math.isnan(e.value) or e.n_real * fpr >= 1:
        return None
    return (f"from {e.n_real} real images one false positive is already {100 / max(1, e.n_real):.0f}% FPR, "
            f"so {fpr:.0%} FPR cannot be resolved")


def caveat(metric: str, e: Estimate) -> str | None:
    """Why one number rests on too few images to mean much, or None (also None when the run did not
    record its class counts): `unresolved`, or fewer than `MIN_PER_CLASS` real or generated images."""
    if e.n_real is None or e.n_fake is None or math.isnan(e.value):
        return None
    if (why := unresolved(metric, e)) is not None:
        return why
    if e.n_real < MIN_PER_CLASS or e.n_fake < MIN_PER_CLASS:
        return f"rests on {e.n_real} real and {e.n_fake} generated images"
    return None


def too_few_alarm(test: SplitMetrics) -> Alarm | None:
    """One sentence for the test numbers that rest on too few images (`caveat`), with the counts."""
    overall = test.intervals.get("all", {})
    parts: list[str] = []
    evidence: dict[str, Any] = {}
    unresolved = [m for m in LOW_FPR if (e := overall.get(m)) is not None and e.n_real is not None
                  and LOW_FPR[m] * e.n_real < 1]
    if unresolved:
        n_real = overall[unresolved[0]].n_real or 0
        rates = " and ".join(f"{100 * LOW_FPR[m]:.0f}%" for m in unresolved)
        parts.append(f"TPR at {rates} FPR rest{'s' if len(unresolved) == 1 else ''} on {n_real} real images "
                     f"(one false positive is already {100 / max(1, n_real):.0f}% FPR)")
        evidence.update({m: estimate_json(overall[m]) for m in unresolved})
    auc = overall.get("auc")
    fakes = {g: d["auc"].n_fake for g, d in test.intervals.items() if g != "all" and "auc" in d}
    if auc is not None and auc.n_real is not None and auc.n_real < MIN_PER_CLASS:
        parts.append(f"every number rests on {auc.n_real} real test images")
    elif fakes and (fewest := min((n for n in fakes.values() if n is not None), default=None)) is not None \
            and fewest < MIN_PER_CLASS:
        parts.append(f"per-generator numbers rest on as few as {fewest} generated images")
    if not parts:
        return None
    evidence.update({"n_real": auc.n_real if auc else None, "n_fake": auc.n_fake if auc else None,
                     "fake_by_generator": fakes,
                     "rule": f"TPR at x% FPR needs >= 1/x real images; every number >= {MIN_PER_CLASS} of each class"})
    return Alarm("too_few", "Too few test images for some numbers: " + "; ".join(parts) + ".", evidence)


def _as_dict(e: Estimate | None) -> dict[str, Any] | None:
    return None if e is None else {"value": e.value, "lo": e.lo, "hi": e.hi}
