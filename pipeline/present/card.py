"""The model card (`README.md`) of an exported detector, as the Hugging Face Hub shows one: what the
detector is, how to use it, the data it learned from, its numbers per generator with their 95%
intervals (read back from the run's `RunMetrics`, never recomputed), the alarms that fired, its
calibration and out-of-distribution rule, and its limits."""

from __future__ import annotations

from typing import Any

from pipeline.evaluation.results import RunMetrics
from pipeline.present.html import estimate_text, short
from pipeline.present.names import metric_name

CARD_METRICS = ("auc", "ap", "eer", "tpr_at_fpr_1", "tpr_at_fpr_5")  # free of any threshold


def model_card(spec: Any, metrics: RunMetrics, run_id: str, config: dict[str, Any]) -> str:
    """Markdown, with the Hub's YAML header. `spec`: the exported `DetectorSpec`; `config`: the run's flat config."""
    clip = spec.clip
    weights = "random weights: a test of the pipeline, not a detector" if clip.get("random_weights") else \
        f"pretrained `{clip.get('pretrained')}`"
    test = metrics.test
    lines = [
        "---",
        "library_name: clipdetect-pipeline",
        "pipeline_tag: image-classification",
        "tags: [ai-generated-image-detection, clip, diffusion]",
        "---",
        "",
        f"# Detector of diffusion-generated images (run `{run_id}`)",
        "",
    ]
    if clip.get("random_weights"):
        lines += ["> **RANDOM-WEIGHT CLIP.** The features come from a CLIP with random weights: this folder tests "
                  "the pipeline; its scores say nothing about real images.", ""]
    lines += [
        f"An MLP over CLIP `{clip.get('architecture')}` ({weights}) **{spec.features}** features "
        f"({spec.input_norm} inputs), the detector of *Robust CLIP-Based Detector for Exposing Diffusion "
        "Model-Generated Images* (Santosh et al., 2024), trained with "
        f"{_objective(config)}. It outputs `score` = σ(s), the probability of *generated* as trained.",
        "",
        "## Use",
        "",
        "```bash",
        "pipeline predict photos/ --detector THIS_FOLDER --output predictions.csv",
        "```",
        "```python",
        "from pipeline import Detector",
        "table = Detector.load('THIS_FOLDER').predict(['photo.jpg'], captions=['a caption'])",
        "```",
        "",
        f"CLIP `{clip.get('model_key')}` is needed (open_clip {clip.get('open_clip_version')}; preprocessing digest "
        f"`{clip.get('preprocess_digest')}`): its weights are not in this folder. Files: `model.safetensors` (the "
        "MLP), `config.json` (everything else), `ood.safetensors` (the out-of-distribution sketch).",
    ]
    if spec.features != "image":
        lines += ["", "**It reads a caption with each image.** The paper's detector pairs a real photograph with its "
                  "caption and a generated image with its prompt; a deployed detector often has neither, and "
                  "captions written in another style than the training data's change its scores. Give a caption "
                  "per image (sidecar `.txt`, a list's `caption` column or `--caption`), or prefer an image-only "
                  "detector."]
    lines += ["", "## Data", ""] + _data(metrics, config)
    lines += ["", "## Results (test split, × 100, 95% group-bootstrap intervals)", ""] + _results(test)
    chosen = test.at_val_threshold
    lines += ["", "## Decision, calibration, out of distribution", "",
              f"- `generated` = score > **{spec.threshold:.4f}** ({spec.threshold_source})."
              + (f" Test balanced accuracy there: {estimate_text(chosen.metrics['balanced_acc'].as_dict())}."
                 if chosen and "balanced_acc" in chosen.metrics else "")]
    cal = spec.calibration
    ece = cal.ece("test") or cal.ece("val")
    lines.append(f"- `probability` = σ({cal.a:.4f}·s {'+' if cal.b >= 0 else '−'} {abs(cal.b):.4f}) where s is the "
                 f"logit of the score: Platt scaling fitted on {cal.n} validation "
                 "scores" + (f"; expected calibration error × 100 on test: {100 * ece[0]:.2f} before, "
                             f"{100 * ece[1]:.2f} after." if ece else "."))
    if spec.ood is not None:
        lines.append(f"- `ood` = the image's cosine similarity to the nearest of {spec.ood.centroids} centroids of "
                     f"the training images is below {spec.ood.threshold:.4f}, percentile {spec.ood.percentile:g} of "
                     f"{spec.ood.val} validation images' own: far from every training image, the score "
                     "is unreliable (a new generator looks like this from outside).")
    lines += ["", "## Alarms", ""]
    lines += [f"- **{a.kind}**: {a.sentence}" for a in metrics.alarms] or ["None fired when the run was trained."]
    lines += ["", "## Limits", "",
              "- It knows the generators it was trained on; `ood` marks images unlike every training image, but a "
              "new generator close to a known one is scored without warning.",
              "- The numbers above are on the test split of the same collection; other sources, formats, "
              "compression or resizing shift scores (`pipeline experiment robustness` measures it).",
              "- The threshold and the calibration were chosen on validation images of that collection: where "
              "generated images are rarer or commoner, the probability needs recalibrating.",
              f"- Exported from run `{run_id}` by clipdetect-pipeline; `config.json` holds the run's record."]
    return "\n".join(lines) + "\n"


def _objective(config: dict[str, Any]) -> str:
    parts = []
    if config.get("cvar"):
        parts.append(f"CVaR (α {config.get('cvar_alpha')})")
    if config.get("auc"):
        parts.append(f"AUC loss (γ {config.get('auc_gamma')})")
    parts = parts or ["cross-entropy"]
    return " + ".join(parts) + (f", SAM (ρ {config.get('sam_rho')})" if config.get("sam") else "")


def _data(metrics: RunMetrics, config: dict[str, Any]) -> list[str]:
    gens = sorted(set(metrics.test.generators) | set(metrics.train.generators))
    lines = [f"- {s}: {metrics.split(s).n} images" + (f" ({metrics.split(s).groups} groups)" if metrics.split(s).groups
                                                         else "") for s in ("train", "val", "test")]
    lines.append(f"- generators: {', '.join(short(g) for g in gens) or 'none recorded'}; text pairing "
                 f"{config.get('pairing')}" + (f"; learned from {', '.join(config['train_generators'])} only"
                                               if config.get("train_generators") else ""))
    return lines


def _results(test: Any) -> list[str]:
    if not test.intervals:
        return ["No test metrics were recorded."]
    names = [g for g in test.intervals if g != "all"] + ["all"]
    header = "| generator | n | " + " | ".join(metric_name(m) for m in CARD_METRICS) + " |"
    rows = [header, "|" + "---|" * (len(CARD_METRICS) + 2)]
    for g in names:
        cells = test.intervals.get(g, {})
        n = next((e.n for e in cells.values()), 0)
        rows.append(f"| {'overall' if g == 'all' else short(g)} | {n} | "
                    + " | ".join(estimate_text(cells[m].as_dict()) if m in cells else "–" for m in CARD_METRICS)
                    + " |")
    return rows
