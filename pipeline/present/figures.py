"""Figures as PNG files (matplotlib's object API, Agg canvas): ROC, bars, histograms, confusion.

Every PNG is 640 × 480; embeddings from random weights get a caption on the figure itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.present.html import pct, short
from pipeline.store.atomic import atomic_write
from trainer.metrics import roc_auc, roc_curve

FIG_SIZE = (6.4, 4.8)  # inches; at DPI 100 every PNG is 640 × 480 pixels
DPI = 100


def figure(title: str) -> tuple[Any, Any]:
    """A figure with one axes, made without pyplot: no backend switch, no global figure registry."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIG_SIZE, dpi=DPI)
    ax = fig.subplots()
    ax.set_title(title, fontsize=10)
    return fig, ax


def save_png(fig: Any, path: Path, random_weights: Any = False) -> Path:
    if fig.get_layout_engine() is None:
        fig.tight_layout(rect=(0, 0.03, 1, 1) if random_weights else None)
    if random_weights:
        fig.text(0.5, 0.005, "RANDOM-WEIGHT CLIP embeddings: tests the pipeline, not a result about CLIP",
                 ha="center", va="bottom", fontsize=7, color="darkred")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    return path


def roc(path: Path, y: np.ndarray, p: np.ndarray, gens: np.ndarray, split: str, random_weights: Any = False) -> Path:
    fig, ax = figure(f"ROC, {split} split")
    fpr, tpr = roc_curve(y, p)
    ax.plot(fpr, tpr, color="black", lw=2, label=f"overall (AUC {pct(roc_auc(y, p))})")
    for g in sorted(set(gens[y].tolist())):
        m = ~y | (gens == g)
        fpr, tpr = roc_curve(y[m], p[m])
        ax.plot(fpr, tpr, lw=1, label=f"{short(g)} ({pct(roc_auc(y[m], p[m]))})")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    ax.set_xlabel("false-positive rate (real called generated)")
    ax.set_ylabel("true-positive rate")
    ax.legend(fontsize=7, loc="lower right")
    return save_png(fig, path, random_weights)


def histograms(path: Path, y: np.ndarray, p: np.ndarray, gens: np.ndarray, split: str,
                random_weights: Any = False) -> Path:
    fig, ax = figure(f"Score distributions, {split} split")
    bins = np.linspace(0, 1, 41)
    ax.hist(p[~y], bins=bins, density=True, histtype="stepfilled", alpha=0.35, color="grey", label="real")
    for g in sorted(set(gens[y].tolist())):
        ax.hist(p[y & (gens == g)], bins=bins, density=True, histtype="step", lw=1.2, label=short(g))
    ax.set_xlabel("score (probability of generated)")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    return save_png(fig, path, random_weights)


def confusion(path: Path, matrix: np.ndarray, threshold: float, random_weights: Any = False) -> Path:
    fig, ax = figure(f"Confusion matrix at threshold {threshold}")
    ax.imshow(matrix, cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=14,
                color="white" if v > matrix.max() / 2 else "black")
    ax.set_xticks([0, 1], ["called real", "called generated"])
    ax.set_yticks([0, 1], ["real", "generated"])
    return save_png(fig, path, random_weights)


# --- figures with intervals ----------------------------------------------------------------------

Cell = Mapping[str, Any]  # {value, lo, hi, n}; lo/hi None when the run predates intervals


def auc_axis_limits(cells: Sequence[Cell | None]) -> tuple[float, float]:
    """A y-range that shows the differences: from a little below the lowest interval end to 1."""
    lows = [c["lo"] if c.get("lo") is not None else c["value"] for c in cells if c and c.get("value") is not None]
    if not lows:
        return 0.0, 1.0
    low = min(lows)
    bottom = max(0.0, np.floor((low - 0.05) * 20) / 20)  # a multiple of 0.05
    return (bottom if bottom < 0.95 else 0.9), 1.0


def grouped_bars_ci(path: Path, values: Mapping[str, Sequence[Cell | None]], columns: list[str], title: str,
                    random_weights: Any = False) -> Path:
    """One group of bars per column (generator), one bar per row (method), 95% intervals as error bars."""
    fig, ax = figure(title)
    width = 0.8 / max(1, len(values))
    x = np.arange(len(columns))
    for i, (label, cells) in enumerate(values.items()):
        v = np.array([c["value"] if c and c.get("value") is not None else np.nan for c in cells])
        lo = np.array([c["lo"] if c and c.get("lo") is not None else np.nan for c in cells])
        hi = np.array([c["hi"] if c and c.get("hi") is not None else np.nan for c in cells])
        err = np.nan_to_num(np.vstack([v - lo, hi - v]), nan=0.0).clip(min=0)
        ax.bar(x + i * width, np.nan_to_num(v), width, yerr=err, capsize=2, label=label,
               error_kw={"elinewidth": 0.8, "ecolor": "black"})
    ax.set_xticks(x + 0.4 - width / 2, [short(c) if c != "all" else "overall" for c in columns],
                  rotation=20, ha="right", fontsize=8)
    ax.set_ylim(*auc_axis_limits([c for cells in values.values() for c in cells]))
    ax.set_ylabel("test ROC AUC (bars: 95% interval)")
    ax.grid(axis="y", lw=0.4, alpha=0.5)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    return save_png(fig, path, random_weights)


def heatmap(path: Path, values: Mapping[str, Sequence[Cell | None]], columns: list[str], title: str,
            random_weights: Any = False) -> Path:
    """Rows x columns of AUC, each cell annotated with its value and interval."""
    fig, ax = figure(title)
    matrix = np.array([[c["value"] if c and c.get("value") is not None else np.nan for c in cells]
                       for cells in values.values()])
    image = ax.imshow(matrix, cmap="viridis", vmin=max(0.0, float(np.nanmin(matrix)) - 0.02) if matrix.size else 0,
                      vmax=1.0, aspect="auto")
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label="test ROC AUC")
    for (i, j), v in np.ndenumerate(matrix):
        if np.isnan(v):
            continue
        cell = list(values.values())[i][j] or {}
        text = f"{100 * v:.1f}"
        if cell.get("lo") is not None and cell.get("hi") is not None:
            text += f"\n[{100 * cell['lo']:.0f}, {100 * cell['hi']:.0f}]"
        bright = v > np.nanmin(matrix) + 0.6 * (1.0 - np.nanmin(matrix))
        ax.text(j, i, text, ha="center", va="center", fontsize=7, color="black" if bright else "white")
    ax.set_xticks(range(len(columns)), [short(c) if c != "all" else "overall" for c in columns],
                  rotation=20, ha="right", fontsize=8)
    ax.set_yticks(range(len(values)), [short(r) for r in values], fontsize=8)
    ax.set_xlabel("tested on")
    return save_png(fig, path, random_weights)


def robustness(path: Path, curves: Mapping[str, Mapping[str, Sequence[tuple[float, Cell]]]],
               random_weights: Any = False) -> Path:
    """A panel per operation: test AUC (with 95% intervals) against strength, a line per generator."""
    from matplotlib.figure import Figure

    ops = [op for op in curves if op != "none"]
    cols = min(3, max(1, len(ops)))
    rows = -(-max(1, len(ops)) // cols)
    fig = Figure(figsize=(10, 3.4 * rows + 0.6), dpi=DPI)
    axes = np.atleast_1d(fig.subplots(rows, cols, sharey=True)).ravel()
    for ax in axes[len(ops):]:
        ax.set_visible(False)
    clean = curves.get("none", {})
    cells = [c for op in curves.values() for pts in op.values() for _, c in pts]
    for ax, op in zip(axes, ops, strict=False):
        for gen, points in sorted(curves[op].items(), key=lambda kv: kv[0] != "all"):
            if gen in clean:  # the unperturbed test split is strength "identity" of every operation
                points = [*points, (IDENTITY[op], clean[gen][0][1])] if op in IDENTITY else points
            points = sorted(points, key=lambda p: p[0])
            xs = np.array([p[0] for p in points])
            v = np.array([p[1]["value"] if p[1]["value"] is not None else np.nan for p in points])
            lo = np.array([p[1]["lo"] if p[1].get("lo") is not None else np.nan for p in points])
            hi = np.array([p[1]["hi"] if p[1].get("hi") is not None else np.nan for p in points])
            style = {"color": "black", "lw": 2} if gen == "all" else {"lw": 1}
            ax.errorbar(xs, v, yerr=np.nan_to_num(np.vstack([v - lo, hi - v])).clip(min=0), marker="o", ms=3,
                        capsize=2, label="overall" if gen == "all" else short(gen), **style)
            if gen == "all" and "all" in clean:
                ax.axhline(clean["all"][0][1]["value"], color="grey", ls=":", lw=1, label="unperturbed")
        ax.set_title(op, fontsize=10)
        ax.set_xlabel({"jpeg": "JPEG quality", "resize": "scale", "blur": "sigma (px)", "crop": "kept fraction",
                       "noise": "sigma / 255"}.get(op, "strength"), fontsize=8)
        if op in ("jpeg", "resize", "crop"):
            ax.invert_xaxis()  # stronger to the right
        ax.grid(lw=0.4, alpha=0.5)
    for ax in axes[::cols]:
        ax.set_ylabel("test ROC AUC")
    axes[0].set_ylim(*auc_axis_limits(cells))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 0.02),
               ncol=min(6, len(labels)), frameon=False)
    fig.suptitle("Test AUC under perturbation (stronger to the right; unperturbed = identity strength)", fontsize=10)
    fig.set_layout_engine("tight", rect=(0, 0.08, 1, 0.97))
    return save_png(fig, path, random_weights)


IDENTITY = {"jpeg": 100.0, "resize": 1.0, "blur": 0.0, "crop": 1.0, "noise": 0.0}  # strength that changes nothing


def learning_curve(path: Path, history: list[dict[str, Any]], best_epoch: Any, random_weights: Any = False) -> Path:
    """Training loss and validation AUC per epoch; the kept epoch marked."""
    fig, ax = figure("Learning curve")
    epochs = [h.get("epoch") for h in history]
    ax.plot(epochs, [h.get("train_loss") for h in history], color="tab:red", marker="o", ms=3, label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss", color="tab:red")
    other = ax.twinx()
    val = [h.get("val_auc") for h in history]
    other.plot(epochs, [np.nan if v is None else v for v in val], color="tab:blue", marker="s", ms=3,
               label="val AUC")
    other.set_ylabel("val ROC AUC", color="tab:blue")
    if best_epoch is not None:
        ax.axvline(best_epoch, color="grey", ls=":", lw=1)
        ax.annotate("kept", (best_epoch, ax.get_ylim()[1]), fontsize=7, ha="left", va="top", color="grey")
    return save_png(fig, path, random_weights)


def thumbnail_png(data: bytes, size: int = 160) -> bytes:
    """A small PNG of an image's original bytes, for the error gallery."""
    import io

    from PIL import Image

    from pipeline.sources.images import decode_rgb

    image = decode_rgb(data)
    image.thumbnail((size, size), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def bars_ci(path: Path, cells: Mapping[str, Mapping[str, Any] | None], title: str, random_weights: Any = False) -> Path:
    """Horizontal AUC bars with 95% intervals, on an axis that starts near the lowest interval."""
    fig, ax = figure(title)
    names = list(cells)
    v = np.array([c["value"] if c and c.get("value") is not None else np.nan for c in cells.values()])
    lo = np.array([c["lo"] if c and c.get("lo") is not None else np.nan for c in cells.values()])
    hi = np.array([c["hi"] if c and c.get("hi") is not None else np.nan for c in cells.values()])
    left, right = auc_axis_limits(list(cells.values()))
    ax.barh([short(n) for n in names], np.nan_to_num(v - left), left=left, height=0.6,
            xerr=np.nan_to_num(np.vstack([v - lo, hi - v])).clip(min=0), capsize=3,
            color=["black" if n in ("all", "overall") else "tab:blue" for n in names],
            error_kw={"elinewidth": 1, "ecolor": "tab:orange"})
    for i, (value, low, high) in enumerate(zip(v, lo, hi, strict=True)):
        label = f"{value:.3f}" + (f" [{low:.3f}, {high:.3f}]" if not np.isnan(low) else "")
        ax.text(left + 0.005 * (right - left), i, label, va="center", ha="left", fontsize=7, color="white")
    ax.set_xlim(left, right)
    ax.invert_yaxis()
    ax.set_xlabel("ROC AUC (orange: 95% group-bootstrap interval)")
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="x", lw=0.4, alpha=0.5)
    return save_png(fig, path, random_weights)
