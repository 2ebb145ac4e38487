"""Figures as PNG files (matplotlib's object API, Agg canvas): ROC, bars, histograms, confusion.

Every PNG is 640 × 480; embeddings from random weights get a caption on the figure itself.
"""

from __future__ import annotations

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


def bars(path: Path, values: dict[str, float], title: str, random_weights: Any = False) -> Path:
    fig, ax = figure(title)
    names = list(values)
    bars = ax.barh([short(n) for n in names], [0 if v is None or np.isnan(v) else v for v in values.values()],
                   color=["black" if n == "overall" else "tab:blue" for n in names])
    ax.bar_label(bars, fmt="%.3f", label_type="center", color="white", fontsize=8)
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel("ROC AUC")
    ax.tick_params(axis="y", labelsize=7)
    return save_png(fig, path, random_weights)


def grouped_bars(path: Path, values: dict[str, list[float | None]], columns: list[str], title: str,
                  random_weights: Any = False) -> Path:
    fig, ax = figure(title)
    width = 0.8 / max(1, len(values))
    x = np.arange(len(columns))
    for i, (label, vals) in enumerate(values.items()):
        ax.bar(x + i * width, [0 if v is None else v for v in vals], width, label=label)
    ax.set_xticks(x + 0.4 - width / 2, [short(c) for c in columns], rotation=30, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("test ROC AUC")
    ax.legend(fontsize=6)
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
