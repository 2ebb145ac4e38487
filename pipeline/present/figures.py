"""Figures as PNG files (matplotlib's object API, Agg canvas): ROC, bars, heat maps, curves, confusion.

Rates are shown × 100 as in the tables, every AUC on the same axis (0–100, a dashed line at 50 =
chance) on every page, so two figures can be compared at a glance and no whisker is cut off. Each
`draw_*` function returns the matplotlib Figure (tests read its axes); the function of the same name
without the prefix saves it atomically. A figure from random-weight embeddings carries that caption
on the figure itself, in space kept free for it. Report figures are 640 × 480 pixels.
"""

from __future__ import annotations

import textwrap
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.present.html import NOT_INFORMATIVE, estimate_text, interval, pct, short
from pipeline.store.atomic import atomic_write
from trainer.metrics import roc_auc, roc_curve

FIG_SIZE = (6.4, 4.8)  # inches; at DPI 100 every report PNG is 640 × 480 pixels
DPI = 100
# Shown at 640 px on a desktop and at ~400 px on a 420 px phone (× 0.62), where 11 pt is still ~9.5 px.
TITLE, LABEL, TICK, SMALL = 13.0, 12.0, 11.0, 10.0
AUC_LIMITS = (0.0, 104.0)  # 0–100, with room above 100 so whiskers and caps ending at 100 show whole
AUC_TICKS = tuple(range(0, 101, 10))
CHANCE = 50.0
RANDOM_CAPTION = "RANDOM-WEIGHT CLIP embeddings: tests the pipeline, not a result about CLIP"
CAPTION_INCHES = 0.3  # kept free at the bottom of a figure for the caption

Cell = Mapping[str, Any]  # {value, lo, hi, n} as fractions; lo/hi None when the run predates intervals


def figure(title: str) -> tuple[Any, Any]:
    """A figure with one axes, made without pyplot: no backend switch, no global figure registry."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIG_SIZE, dpi=DPI)
    ax = fig.subplots()
    ax.set_title(title, fontsize=TITLE)
    ax.tick_params(labelsize=TICK)
    return fig, ax


def save_png(fig: Any, path: Path, random_weights: Any = False) -> Path:
    """Lay the figure out (tight unless it chose an engine), caption it if its embeddings are random, write it."""
    if fig.get_layout_engine() is None:
        fig.set_layout_engine("tight")
    if random_weights:
        _keep_bottom_free(fig, CAPTION_INCHES / fig.get_figheight())
        fig.text(0.5, 0.06 / fig.get_figheight(), RANDOM_CAPTION, ha="center", va="bottom", fontsize=SMALL,
                 color="darkred")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    return path


def _keep_bottom_free(fig: Any, fraction: float) -> None:
    """Shrink the layout's rectangle so nothing it places comes below `fraction` of the figure's height."""
    engine = fig.get_layout_engine()
    rect = engine.get().get("rect") or (0, 0, 1, 1)
    if type(engine).__name__ == "ConstrainedLayoutEngine":  # (left, bottom, width, height)
        left, bottom, width, height = rect
        if bottom < fraction:
            engine.set(rect=(left, fraction, width, height - (fraction - bottom)))
    else:  # tight layout: (left, bottom, right, top)
        left, bottom, right, top = rect
        engine.set(rect=(left, max(bottom, fraction), right, top))


def auc_axis(ax: Any, axis: str = "y", label: str = "test ROC AUC × 100", colour: str = "grey") -> None:
    """The one AUC axis of every figure: 0–100 with room for whiskers, and chance (50) as a dashed line."""
    if axis == "y":
        ax.set_ylim(*AUC_LIMITS)
        ax.set_yticks(AUC_TICKS)
        ax.axhline(CHANCE, color=colour, ls="--", lw=1, zorder=3)
        ax.set_ylabel(label, fontsize=LABEL)
    else:
        ax.set_xlim(*AUC_LIMITS)
        ax.set_xticks(AUC_TICKS)
        ax.axvline(CHANCE, color=colour, ls="--", lw=1, zorder=3)
        ax.set_xlabel(label, fontsize=LABEL)


def _percent(cells: Sequence[Cell | None]) -> tuple[np.ndarray, np.ndarray]:
    """Values × 100 and their whiskers (below, above) × 100; NaN where a cell or its interval is missing."""
    def get(c: Cell | None, key: str) -> float:
        return np.nan if not c or c.get(key) is None else 100 * float(c[key])

    v = np.array([get(c, "value") for c in cells])
    lo, hi = np.array([get(c, "lo") for c in cells]), np.array([get(c, "hi") for c in cells])
    return v, np.nan_to_num(np.vstack([v - lo, hi - v]), nan=0.0).clip(min=0)


def _column_name(column: str) -> str:
    return "overall" if column == "all" else short(column)


# --- run report ------------------------------------------------------------------------------------------


def draw_roc(y: np.ndarray, p: np.ndarray, gens: np.ndarray, split: str) -> Any:
    fig, ax = figure(f"ROC, {split} split")
    fpr, tpr = roc_curve(y, p)
    ax.plot(100 * fpr, 100 * tpr, color="black", lw=2, label=f"overall (AUC {pct(roc_auc(y, p))})")
    for g in sorted(set(gens[y].tolist())):
        m = ~y | (gens == g)
        fpr, tpr = roc_curve(y[m], p[m])
        ax.plot(100 * fpr, 100 * tpr, lw=1, label=f"{short(g)} ({pct(roc_auc(y[m], p[m]))})")
    _percent_square(ax, "chance", "false-positive rate × 100 (real called generated)", "true-positive rate × 100",
                    "lower right")
    return fig


def _percent_square(ax: Any, diagonal: str, xlabel: str, ylabel: str, legend: str) -> None:
    """Axes from 0 to 100 on both sides, with the diagonal (chance, or perfect calibration) dotted."""
    ax.plot([0, 100], [0, 100], color="grey", ls=":", lw=1, label=diagonal)
    ax.set(xlim=(-2, 102), ylim=(-2, 102))
    ax.set_xlabel(xlabel, fontsize=LABEL)
    ax.set_ylabel(ylabel, fontsize=LABEL)
    ax.legend(fontsize=SMALL, loc=legend)


def roc(path: Path, y: np.ndarray, p: np.ndarray, gens: np.ndarray, split: str, random_weights: Any = False) -> Path:
    return save_png(draw_roc(y, p, gens, split), path, random_weights)


def draw_histograms(y: np.ndarray, p: np.ndarray, gens: np.ndarray, split: str) -> Any:
    fig, ax = figure(f"Score distributions, {split} split")
    bins = np.linspace(0, 1, 41)
    ax.hist(p[~y], bins=bins, density=True, histtype="stepfilled", alpha=0.35, color="grey", label="real")
    for g in sorted(set(gens[y].tolist())):
        ax.hist(p[y & (gens == g)], bins=bins, density=True, histtype="step", lw=1.2, label=short(g))
    ax.set_xlabel("score (probability of generated, 0–1)", fontsize=LABEL)
    ax.set_ylabel("density", fontsize=LABEL)
    ax.legend(fontsize=SMALL)
    return fig


def histograms(path: Path, y: np.ndarray, p: np.ndarray, gens: np.ndarray, split: str,
               random_weights: Any = False) -> Path:
    return save_png(draw_histograms(y, p, gens, split), path, random_weights)


def draw_confusion(matrix: np.ndarray, threshold: float) -> Any:
    fig, ax = figure(f"Confusion matrix at threshold {threshold}")
    ax.imshow(matrix, cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=16,
                color="white" if v > matrix.max() / 2 else "black")
    ax.set_xticks([0, 1], ["called real", "called generated"])
    ax.set_yticks([0, 1], ["real", "generated"])
    return fig


def confusion(path: Path, matrix: np.ndarray, threshold: float, random_weights: Any = False) -> Path:
    return save_png(draw_confusion(matrix, threshold), path, random_weights)


def draw_reliability(before: Any, after: Any, split: str) -> Any:
    """A reliability diagram (`evaluation.calibration.Reliability` before and after calibration): per bin,
    the fraction of generated images against the mean probability, × 100; the diagonal is perfect."""
    fig, ax = figure(f"Reliability, {split} split (ECE {100 * before.ece:.1f} → {100 * after.ece:.1f})")
    for rel, colour, name in ((before, "tab:red", "score σ(s)"), (after, "tab:blue", "calibrated")):
        conf, freq = np.array(rel.confidence) * 100, np.array(rel.frequency) * 100
        filled = np.array(rel.counts) > 0
        ax.plot(conf[filled], freq[filled], marker="o", ms=4, color=colour,
                label=f"{name}: ECE {100 * rel.ece:.1f}")
    _percent_square(ax, "perfectly calibrated", "mean predicted probability of generated × 100 (per bin)",
                    "fraction generated × 100", "upper left")
    return fig


def reliability(path: Path, before: Any, after: Any, split: str, random_weights: Any = False) -> Path:
    return save_png(draw_reliability(before, after, split), path, random_weights)


def draw_learning_curve(history: list[dict[str, Any]], best_epoch: Any) -> Any:
    """Training loss and validation AUC (× 100, on the AUC axis of every figure) per epoch; the kept epoch marked."""
    fig, ax = figure("Learning curve")
    epochs = [h.get("epoch") for h in history]
    ax.plot(epochs, [h.get("train_loss") for h in history], color="tab:red", marker="o", ms=3, label="train loss")
    ax.set_xlabel("epoch", fontsize=LABEL)
    ax.set_ylabel("train loss", color="tab:red", fontsize=LABEL)
    other = ax.twinx()
    other.tick_params(labelsize=TICK)
    val = [np.nan if h.get("val_auc") is None else 100 * h["val_auc"] for h in history]
    other.plot(epochs, val, color="tab:blue", marker="s", ms=3, label="val AUC")
    auc_axis(other, label="val ROC AUC × 100 (dashed: chance)", colour="tab:blue")
    other.yaxis.label.set_color("tab:blue")
    if best_epoch is not None:
        ax.axvline(best_epoch, color="grey", ls=":", lw=1)
        known = [e for e in epochs if e is not None]
        late = bool(known) and best_epoch > (min(known) + max(known)) / 2  # write it away from the right axis
        ax.annotate("kept " if late else " kept", (best_epoch, 0.99), xycoords=("data", "axes fraction"),
                    fontsize=SMALL, ha="right" if late else "left", va="top", color="grey")
    return fig


def learning_curve(path: Path, history: list[dict[str, Any]], best_epoch: Any, random_weights: Any = False) -> Path:
    return save_png(draw_learning_curve(history, best_epoch), path, random_weights)


def draw_bars_ci(cells: Mapping[str, Mapping[str, Any] | None], title: str) -> Any:
    """Horizontal AUC bars from 0 with 95% intervals; each bar's numbers beside its name, clear of every whisker."""
    fig, ax = figure(title)
    names = list(cells)
    v, err = _percent(list(cells.values()))
    ax.barh(range(len(names)), np.nan_to_num(v), height=0.6, xerr=err, capsize=4,
            color=["dimgrey" if n in ("all", "overall") else "tab:blue" for n in names],
            error_kw={"elinewidth": 1.6, "ecolor": "tab:orange", "capthick": 1.6})
    labels = [f"{_column_name(name)}\n{estimate_text(cell, 1)}" for name, cell in cells.items()]
    ax.set_yticks(range(len(names)), labels, fontsize=SMALL)
    ax.invert_yaxis()
    auc_axis(ax, "x", "ROC AUC × 100 (orange: 95% group-bootstrap interval)")
    ax.grid(axis="x", lw=0.4, alpha=0.5)
    # The bar names with their numbers take the left of the figure, so the axes are narrow: a title or
    # axis label centred on them ran off the figure's right edge. Ending both at the axes' right edge,
    # they run leftwards over the names' column, inside the figure.
    ax.set_title(title, fontsize=TITLE, loc="right")
    ax.set_title("", loc="center")
    ax.set_xlabel(ax.get_xlabel(), fontsize=LABEL, loc="right")
    return fig


def bars_ci(path: Path, cells: Mapping[str, Mapping[str, Any] | None], title: str, random_weights: Any = False) -> Path:
    return save_png(draw_bars_ci(cells, title), path, random_weights)


# --- experiments ------------------------------------------------------------------------------------------


def draw_grouped_bars_ci(values: Mapping[str, Sequence[Cell | None]], columns: list[str], title: str) -> Any:
    """One group of bars per column (generator), one bar per row (method), 95% intervals as whiskers."""
    from matplotlib.figure import Figure

    legend_rows = -(-len(values) // 2)
    fig = Figure(figsize=(FIG_SIZE[0], FIG_SIZE[1] + 0.22 * max(0, legend_rows - 3)), dpi=DPI)
    ax = fig.subplots()
    ax.set_title(title, fontsize=TITLE)
    ax.tick_params(labelsize=TICK)
    width = 0.8 / max(1, len(values))
    x = np.arange(len(columns))
    for i, (label, cells) in enumerate(values.items()):
        v, err = _percent(cells)
        ax.bar(x + i * width, np.nan_to_num(v), width, yerr=err, capsize=2, label=label,
               error_kw={"elinewidth": 0.9, "ecolor": "black"})
    ax.set_xticks(x + 0.4 - width / 2, [_column_name(c) for c in columns], rotation=20, ha="right")
    auc_axis(ax)  # the title says the whiskers are 95% intervals
    ax.grid(axis="y", lw=0.4, alpha=0.5)
    ax.legend(fontsize=SMALL, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    return fig


def grouped_bars_ci(path: Path, values: Mapping[str, Sequence[Cell | None]], columns: list[str], title: str,
                    random_weights: Any = False) -> Path:
    return save_png(draw_grouped_bars_ci(values, columns, title), path, random_weights)


def draw_heatmap(values: Mapping[str, Sequence[Cell | None]], columns: list[str], title: str,
                 trained: Mapping[str, Collection[str] | None] | None = None) -> Any:
    """Rows × columns of AUC on a fixed diverging scale centred on chance (50); each cell its value and
    interval; the cells of generators a row trained on outlined (`trained`: row -> generators, None = all)."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    rows = list(values)
    fig = Figure(figsize=(FIG_SIZE[0], 2.6 + 0.6 * len(rows)), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    ax.set_title(title, fontsize=TITLE)
    matrix = np.array([_percent(values[r])[0] for r in rows]).reshape(len(rows), len(columns))
    norm = TwoSlopeNorm(vcenter=CHANCE, vmin=0.0, vmax=100.0)
    image = ax.imshow(matrix, cmap="RdBu", norm=norm, aspect="auto")
    # below the matrix, not beside it: the cells keep the width their text needs
    bar = fig.colorbar(image, ax=ax, location="bottom", fraction=0.04, pad=0.02, aspect=40,
                       ticks=[0, 25, 50, 75, 100])
    bar.set_label("test ROC AUC × 100 (white: 50 = chance)", fontsize=LABEL)
    bar.ax.tick_params(labelsize=TICK)
    for (i, j), v in np.ndenumerate(matrix):
        if np.isnan(v):
            continue
        colour = "white" if abs(v - CHANCE) > 30 else "black"  # the ends of RdBu are dark
        cell = values[rows[i]][j] or {}
        bounds = interval(cell.get("lo"), cell.get("hi"), 0)
        ax.text(j, i - (0.14 if bounds else 0), f"{v:.1f}", ha="center", va="center", fontsize=LABEL + 1,
                fontweight="bold", color=colour)
        if bounds:
            flat = bounds == NOT_INFORMATIVE
            ax.text(j, i + 0.24, "not informative" if flat else bounds, ha="center", va="center",
                    fontsize=SMALL - 2 if flat else SMALL, fontstyle="italic" if flat else "normal", color=colour)
    for i, row in enumerate(rows):
        if trained is None or row not in trained:
            continue
        seen = trained[row]
        for j, column in enumerate(columns):
            if column != "all" and (seen is None or column in seen):  # black and white: seen on any colour
                for lw, colour in ((4.0, "black"), (1.6, "white")):
                    ax.add_patch(Rectangle((j - 0.44, i - 0.42), 0.88, 0.84, fill=False, lw=lw, edgecolor=colour))
    ax.xaxis.tick_top()  # the generator names above the matrix; the colour bar takes the bottom
    ax.set_xticks(range(len(columns)), [_column_name(c) for c in columns], fontsize=TICK)
    ax.set_yticks(range(len(rows)), [textwrap.fill(short(r), 14) for r in rows], fontsize=TICK)
    ax.tick_params(length=0)
    ax.set_ylabel("trained on", fontsize=LABEL)
    ax.set_xlabel(("outlined: a generator the row trained on\n" if trained else "")
                  + "not informative: every bootstrap replicate gave the same AUC", fontsize=SMALL)
    return fig


def heatmap(path: Path, values: Mapping[str, Sequence[Cell | None]], columns: list[str], title: str,
            random_weights: Any = False, trained: Mapping[str, Collection[str] | None] | None = None) -> Path:
    return save_png(draw_heatmap(values, columns, title, trained), path, random_weights)


OPERATIONS = {  # name: (axis label, strength that changes nothing, a larger strength is stronger)
    "jpeg": ("JPEG quality", 100.0, False), "resize": ("scale", 1.0, False), "blur": ("blur σ (px)", 0.0, True),
    "crop": ("kept fraction", 1.0, False), "noise": ("noise σ / 255", 0.0, True),
}
AS_INGESTED = "as ingested"  # the test images as stored: their own formats and qualities, not "quality 100"


def draw_robustness(curves: Mapping[str, Mapping[str, Sequence[tuple[float, Cell]]]]) -> Any:
    """A panel per operation, stacked (one column reads on a phone): test AUC with 95% intervals at each
    strength, weak to strong, after the test split as ingested; a line per generator, dodged sideways so
    intervals at one strength stand apart."""
    from matplotlib.figure import Figure

    ops = [op for op in curves if op != "none"] or ["none"]
    fig = Figure(figsize=(FIG_SIZE[0], 1.3 + 3.0 * len(ops)), dpi=DPI)
    axes = np.atleast_1d(fig.subplots(len(ops), 1, squeeze=False)).ravel()
    clean = curves.get("none", {})
    for ax, op in zip(axes, ops, strict=True):
        name, _, stronger_up = OPERATIONS.get(op, (op, None, True))
        strengths = sorted({s for points in curves.get(op, {}).values() for s, _ in points},
                           reverse=not stronger_up) if op != "none" else []
        ticks = [AS_INGESTED, *(f"{s:g}" for s in strengths)]
        gens = sorted(set(curves.get(op, {})) | set(clean), key=lambda g: (g != "all", g))
        offsets = (np.arange(len(gens)) - (len(gens) - 1) / 2) * min(0.12, 0.6 / max(1, len(gens)))
        for gen, dx in zip(gens, offsets, strict=True):
            by_strength = {s: c for s, c in curves.get(op, {}).get(gen, [])} if op != "none" else {}
            cells = [clean[gen][0][1] if gen in clean else None, *(by_strength.get(s) for s in strengths)]
            v, err = _percent(cells)
            style = {"color": "black", "lw": 2, "zorder": 4} if gen == "all" else {"lw": 1}
            ax.errorbar(np.arange(len(cells)) + dx, v, yerr=err, marker="o", ms=4, capsize=2.5,
                        label="overall" if gen == "all" else short(gen), **style)
        ax.set_xticks(range(len(ticks)), ticks, fontsize=TICK)
        ax.set_xlim(-0.5, len(ticks) - 0.5)
        ax.set_xlabel(f"{name}, weak to strong →" if strengths else "", fontsize=LABEL)
        ax.set_title(op, fontsize=LABEL, loc="left")
        ax.tick_params(labelsize=TICK)
        auc_axis(ax)
        ax.grid(axis="y", lw=0.4, alpha=0.5)
    axes[0].legend(fontsize=SMALL, loc="lower center", bbox_to_anchor=(0.5, 1.1), ncol=min(6, len(clean) or 3),
                   frameon=False)
    fig.suptitle("Test AUC under perturbation", fontsize=TITLE)
    return fig


def robustness(path: Path, curves: Mapping[str, Mapping[str, Sequence[tuple[float, Cell]]]],
               random_weights: Any = False) -> Path:
    return save_png(draw_robustness(curves), path, random_weights)


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
