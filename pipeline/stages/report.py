"""`pipeline report`: a run (or an experiment) as a static HTML page with PNG figures.

Run page: ROC curves (overall and per generator), AUC per generator as bars, score histograms
(real against each generator), the confusion matrix at the chosen threshold, the run's config
and metrics. Experiment page: the Table 1 / Table 2 table beside its bars. Everything is computed
from the `scores` and `runs` data in the store; the page references only files written beside it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast

import numpy as np

from pipeline.config import Validated, within
from pipeline.errors import PipelineError
from pipeline.present import figures, html
from pipeline.reporting import Reporter
from pipeline.runs import load_run_record
from pipeline.store import catalog
from pipeline.store.atomic import write_text
from pipeline.store.layout import Store
from trainer.metrics import confusion, summary


@dataclass
class ReportResult:
    directory: Path
    files: list[Path] = field(default_factory=list)

    @property
    def page(self) -> Path:
        return self.directory / "index.html"


@dataclass(frozen=True)
class ReportConfig(Validated):
    store: Store
    run_id: str
    output: Path | None = None  # default STORE/reports/run-RUN
    split: Literal["train", "val", "test"] = "test"
    threshold: float = 0.5
    exclude_leaks: bool = False

    def check(self) -> None:
        within(self, "threshold", 0, 1, low_open=True, high_open=True)


def run(cfg: ReportConfig, reporter: Reporter | None = None) -> ReportResult:
    store, run_id, output, split, threshold = cfg.store, cfg.run_id, cfg.output, cfg.split, cfg.threshold
    exclude_leaks = cfg.exclude_leaks
    config, metrics = load_run_record(store, run_id)
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
    result.files.append(figures.roc(directory / "roc.png", y, p, gens, split, rw))
    overall = {**per_gen, "overall": cast(float, stats["auc"])}
    result.files.append(figures.bars(directory / "auc_by_generator.png", overall,
                              f"{split} ROC AUC per generator (each against all real)", rw))
    result.files.append(figures.histograms(directory / "scores.png", y, p, gens, split, rw))
    result.files.append(figures.confusion(directory / "confusion.png", confusion(y, p, threshold), threshold, rw))
    body = [
        f"<h1>Run <code>{html.e(run_id)}</code></h1>",
        html.banner(metrics.get("random_weights")),
        f"<p>Model key <code>{html.e(metrics.get('model_key'))}</code>; detector {html.e(config.detector)}; "
        f"features {html.e(config.features)}; text pairing {html.e(config.pairing)}. Figures on the "
        f"<b>{html.e(split)}</b> split "
        f"({len(y)} samples). {html.e(excluded_note)}</p>",
        "<h2>Metrics</h2>",
        html.table(["split", "n", "ROC AUC", "AP", f"accuracy @ {threshold}"],
               [html.metric_row(s, metrics.get(s, {})) for s in ("train", "val", "test")]
               + [html.metric_row(f"{split} (this page)", stats)]),
        "<h2>Per generator</h2>",
        html.table(["generator", f"{split} ROC AUC"], [[g, html.pct(a)] for g, a in per_gen.items()]),
        '<div class="figs">' + "".join(f'<img src="{f.name}" alt="{f.stem}">' for f in result.files) + "</div>",
        "<h2>History</h2>" + html.history(metrics),
        "<h2>Config</h2>",
        f"<pre>{html.e(json.dumps(config.flat(), indent=2, default=str))}</pre>",
    ]
    write_text(result.page, html.page(f"run {run_id}", body))
    return result
