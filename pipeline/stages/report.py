"""`pipeline report`: a run (or an experiment) as a static HTML page with PNG figures.

Run page: ROC curves (overall and per generator), AUC per generator as bars, score histograms
(real against each generator), the confusion matrix at the chosen threshold, the run's config
and metrics. Experiment page: the Table 1 / Table 2 table beside its bars. Everything is computed
from the `scores` and `runs` data in the store; the page references only files written beside it.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from pipeline.store import catalog
from pipeline.store.atomic import atomic_write, write_text
from pipeline.errors import PipelineError
from pipeline.store.layout import Store
from pipeline.stages.train import load_run_record
from trainer.metrics import confusion, roc_auc, roc_curve, summary

if TYPE_CHECKING:
    from pipeline.stages.experiment import ExperimentResult

FIG_SIZE = (6.4, 4.8)  # inches; at DPI 100 every PNG is 640 × 480 pixels
DPI = 100
RANDOM_NOTE = ("Embeddings from a CLIP with RANDOM weights (and, in the demo, synthetic images): these "
               "figures test the pipeline; they are not results about CLIP.")


@dataclass
class ReportResult:
    directory: Path
    files: list[Path] = field(default_factory=list)

    @property
    def page(self) -> Path:
        return self.directory / "index.html"


def run_report(store: Store, run_id: str, output: Path | None = None, split: str = "test",
               threshold: float = 0.5, exclude_leaks: bool = False) -> ReportResult:
    config, metrics = load_run_record(store, run_id)
    if not 0 < threshold < 1:
        raise PipelineError("--threshold must lie in (0, 1).")
    scores = catalog.query(
        store, "SELECT sample_id, label, generator, score FROM scores WHERE run_id = ? AND split = ?",
        [run_id, split])
    if scores.num_rows == 0:
        raise PipelineError(f"Run {run_id} has no scores in the {split!r} split.")
    excluded_note = ""
    if exclude_leaks:
        from pipeline.stages.leaks import leaking_ids

        leaking, _ = leaking_ids(store, metrics["model_key"], config.leak_threshold)
        keep = ~np.isin(scores.column("sample_id").to_numpy(zero_copy_only=False), list(leaking))
        excluded_note = f"{int((~keep).sum())} leaking {split} samples excluded (similarity ≥ {config.leak_threshold})."
        scores = scores.filter(keep)
    y = scores.column("label").to_numpy().astype(bool)
    p = scores.column("score").to_numpy().astype(np.float64)
    gens = scores.column("generator").to_numpy(zero_copy_only=False)
    directory = output or store.root / "reports" / f"run-{run_id}"
    result = ReportResult(directory)
    rw = metrics.get("random_weights")
    stats = summary(y, p, gens, threshold)
    per_gen = cast(dict[str, float], stats["auc_by_generator"])
    result.files.append(_roc(directory / "roc.png", y, p, gens, split, rw))
    result.files.append(_bars(directory / "auc_by_generator.png", {**per_gen, "overall": cast(float, stats["auc"])},
                              f"{split} ROC AUC per generator (each against all real)", rw))
    result.files.append(_histograms(directory / "scores.png", y, p, gens, split, rw))
    result.files.append(_confusion(directory / "confusion.png", confusion(y, p, threshold), threshold, rw))
    body = [
        f"<h1>Run <code>{_e(run_id)}</code></h1>",
        _banner(metrics.get("random_weights")),
        f"<p>Model key <code>{_e(metrics.get('model_key'))}</code>; detector {_e(config.detector)}; features "
        f"{_e(config.features)}; text pairing {_e(config.pairing)}. Figures on the <b>{_e(split)}</b> split "
        f"({len(y)} samples). {_e(excluded_note)}</p>",
        "<h2>Metrics</h2>",
        _table(["split", "n", "ROC AUC", "AP", f"accuracy @ {threshold}"],
               [_metric_row(s, metrics.get(s, {})) for s in ("train", "val", "test")]
               + [_metric_row(f"{split} (this page)", stats)]),
        "<h2>Per generator</h2>",
        _table(["generator", f"{split} ROC AUC"], [[g, _pct(a)] for g, a in per_gen.items()]),
        '<div class="figs">' + "".join(f'<img src="{f.name}" alt="{f.stem}">' for f in result.files) + "</div>",
        "<h2>History</h2>" + _history(metrics),
        "<h2>Config</h2>",
        f"<pre>{_e(json.dumps(config.flat(), indent=2, default=str))}</pre>",
    ]
    write_text(result.page, _page(f"run {run_id}", body))
    return result


def experiment_report(result: ExperimentResult, directory: Path) -> ReportResult:
    from pipeline.stages.experiment import generator_columns

    gens = generator_columns(result)
    out = ReportResult(directory)
    values = {
        label: [run.metrics.get("test", {}).get("auc_by_generator", {}).get(g) for g in gens]
        + [run.metrics.get("test", {}).get("auc")]
        for label, run in result.rows
    }
    random = any(run.random_weights for _, run in result.rows)
    out.files.append(_grouped_bars(directory / "auc.png", values, [*gens, "overall"], f"{result.table}: test ROC AUC",
                                   random))
    rows = [[label, *(_pct(v) for v in values[label]), f"<code>{_e(run.run_id)}</code>"] for label, run in result.rows]
    body = [
        f"<h1>{_e(result.table)}</h1>", _banner(random),
        '<div class="side">' + _table(["method", *gens, "overall", "run"], rows, escape_last=False)
        + f'<img src="{out.files[0].name}" alt="bars"></div>',
    ]
    write_text(out.page, _page(result.table, body))
    return out


# --- figures -------------------------------------------------------------------------------


def figure(title: str) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=FIG_SIZE, dpi=DPI)
    ax.set_title(title, fontsize=10)
    return fig, ax


def save_png(fig: Any, path: Path, random_weights: Any = False) -> Path:
    import matplotlib.pyplot as plt

    if fig.get_layout_engine() is None:
        fig.tight_layout(rect=(0, 0.03, 1, 1) if random_weights else None)
    if random_weights:
        fig.text(0.5, 0.005, "RANDOM-WEIGHT CLIP embeddings: tests the pipeline, not a result about CLIP",
                 ha="center", va="bottom", fontsize=7, color="darkred")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    plt.close(fig)
    return path


def _roc(path: Path, y: np.ndarray, p: np.ndarray, gens: np.ndarray, split: str, random_weights: Any = False) -> Path:
    fig, ax = figure(f"ROC, {split} split")
    fpr, tpr = roc_curve(y, p)
    ax.plot(fpr, tpr, color="black", lw=2, label=f"overall (AUC {_pct(roc_auc(y, p))})")
    for g in sorted(set(gens[y].tolist())):
        m = ~y | (gens == g)
        fpr, tpr = roc_curve(y[m], p[m])
        ax.plot(fpr, tpr, lw=1, label=f"{_short(g)} ({_pct(roc_auc(y[m], p[m]))})")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    ax.set_xlabel("false-positive rate (real called generated)")
    ax.set_ylabel("true-positive rate")
    ax.legend(fontsize=7, loc="lower right")
    return save_png(fig, path, random_weights)


def _bars(path: Path, values: dict[str, float], title: str, random_weights: Any = False) -> Path:
    fig, ax = figure(title)
    names = list(values)
    bars = ax.barh([_short(n) for n in names], [0 if v is None or np.isnan(v) else v for v in values.values()],
                   color=["black" if n == "overall" else "tab:blue" for n in names])
    ax.bar_label(bars, fmt="%.3f", label_type="center", color="white", fontsize=8)
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel("ROC AUC")
    ax.tick_params(axis="y", labelsize=7)
    return save_png(fig, path, random_weights)


def _grouped_bars(path: Path, values: dict[str, list[float | None]], columns: list[str], title: str,
                  random_weights: Any = False) -> Path:
    fig, ax = figure(title)
    width = 0.8 / max(1, len(values))
    x = np.arange(len(columns))
    for i, (label, vals) in enumerate(values.items()):
        ax.bar(x + i * width, [0 if v is None else v for v in vals], width, label=label)
    ax.set_xticks(x + 0.4 - width / 2, [_short(c) for c in columns], rotation=30, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("test ROC AUC")
    ax.legend(fontsize=6)
    return save_png(fig, path, random_weights)


def _histograms(path: Path, y: np.ndarray, p: np.ndarray, gens: np.ndarray, split: str,
                random_weights: Any = False) -> Path:
    fig, ax = figure(f"Score distributions, {split} split")
    bins = np.linspace(0, 1, 41)
    ax.hist(p[~y], bins=bins, density=True, histtype="stepfilled", alpha=0.35, color="grey", label="real")
    for g in sorted(set(gens[y].tolist())):
        ax.hist(p[y & (gens == g)], bins=bins, density=True, histtype="step", lw=1.2, label=_short(g))
    ax.set_xlabel("score (probability of generated)")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    return save_png(fig, path, random_weights)


def _confusion(path: Path, matrix: np.ndarray, threshold: float, random_weights: Any = False) -> Path:
    fig, ax = figure(f"Confusion matrix at threshold {threshold}")
    ax.imshow(matrix, cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=14,
                color="white" if v > matrix.max() / 2 else "black")
    ax.set_xticks([0, 1], ["called real", "called generated"])
    ax.set_yticks([0, 1], ["real", "generated"])
    return save_png(fig, path, random_weights)


# --- html ----------------------------------------------------------------------------------


_CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child{text-align:left}.warn{background:#fff3cd;border:1px solid #e0c060;padding:.6em}
.figs img{width:48%;margin:1%}.side{display:flex;gap:1em;align-items:flex-start}.side img{width:50%}
pre{background:#f7f7f7;padding:.6em;overflow:auto}"""


def _page(title: str, body: list[str]) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _banner(random_weights: Any) -> str:
    return f'<p class="warn">{RANDOM_NOTE}</p>' if random_weights else ""


def _table(header: list[str], rows: list[list[Any]], escape_last: bool = True) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{v if (not escape_last and i == len(r) - 1) else _e(v)}</td>" for i, v in enumerate(r))
        + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _metric_row(name: str, m: dict[str, Any]) -> list[Any]:
    return [name, m.get("n"), _pct(m.get("auc")), _pct(m.get("ap")), _pct(m.get("accuracy"))]


def _history(metrics: dict[str, Any]) -> str:
    history = metrics.get("history") or []
    if not history:
        by_k = metrics.get("val_auc_by_k")
        return _table(["k", "val AUC"], [[k, _pct(v)] for k, v in by_k.items()]) if by_k else "<p>none</p>"
    cols = [c for c in ("epoch", "train_loss", "lr", "val_auc", "val_ap") if c in history[0]]
    return _table(cols, [[_num(h.get(c)) for c in cols] for h in history])


def _e(value: Any) -> str:
    return html.escape("–" if value is None else str(value))


def _pct(value: Any) -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{100 * float(value):.2f}"


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else _e(value)


def _short(name: str) -> str:
    return name.split("/")[-1][:28]
