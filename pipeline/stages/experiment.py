"""`pipeline experiment table1|table2`: the paper's tables as ordinary runs on any store.

Table 1: Baseline 1 (image features, BCE), Baseline 2 (image+text, BCE), the method (image+text,
CVaR + AUC + SAM), plus a text-only row that exposes caption/prompt shortcuts and a kNN-vote
row (a cheap baseline the paper lacks). Table 2: every
combination of CVaR, AUC loss and SAM on image+text. Cells are test ROC AUC per generator (each
generator against all real test images) and overall. Runs that already exist are reused.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pipeline.config import Validated
from pipeline.present import figures, html
from pipeline.reporting import Reporter, Silent
from pipeline.runs import TrainConfig
from pipeline.stages import train
from pipeline.stages.report import ReportResult
from pipeline.stages.train import TrainJob, TrainResult
from pipeline.store.atomic import write_text
from pipeline.store.layout import Store

BCE_ONLY = {"cvar": False, "auc": False, "sam": False}
TABLES = ("table1", "table2")


@dataclass
class ExperimentResult:
    table: str
    rows: list[tuple[str, TrainResult]] = field(default_factory=list)
    markdown: str = ""
    path: Any = None  # the Markdown table
    page: Any = None  # the HTML page with the table beside its bars


def rows_for(table: str) -> list[tuple[str, dict[str, Any]]]:
    if table == "table1":
        return [
            ("Baseline 1: image, BCE", {"features": "image", **BCE_ONLY}),
            ("Baseline 2: image+text, BCE", {"features": "image+text", **BCE_ONLY}),
            ("Method: image+text, CVaR+AUC+SAM", {"features": "image+text", "cvar": True, "auc": True, "sam": True}),
            ("Text only, BCE (shortcut check)", {"features": "text", **BCE_ONLY}),
            ("kNN vote: image+text (extra baseline)", {"features": "image+text", "detector": "knn"}),
        ]
    rows = []
    for cvar, auc, sam in itertools.product([False, True], repeat=3):
        parts = ["BCE"] + [n for n, on in (("CVaR", cvar), ("AUC", auc), ("SAM", sam)) if on]
        rows.append((" + ".join(parts), {"features": "image+text", "cvar": cvar, "auc": auc, "sam": sam}))
    return rows


@dataclass(frozen=True)
class ExperimentConfig(Validated):
    store: Store
    table: Literal["table1", "table2"]
    base: dict[str, Any] = field(default_factory=dict)  # training options every row shares


def run(config: ExperimentConfig, reporter: Reporter | None = None) -> ExperimentResult:
    """Train (or reuse) every row's run, then write the table as Markdown and HTML."""
    reporter = reporter or Silent()
    store, table = config.store, config.table
    result = ExperimentResult(table)
    rows = rows_for(table)
    reporter.start(table, len(rows), "runs")
    for label, options in rows:
        train_config = TrainConfig.from_dict({**config.base, **options, "name": f"{table}: {label}"})
        trained = train.run(TrainJob(store, train_config, skip_existing=True), reporter)
        result.rows.append((label, trained))
        reporter.event("row", {"label": label, "run_id": trained.run_id, "skipped": trained.skipped})
        reporter.advance(table, 1)
    result.markdown = to_markdown(result)
    stamp = f"{datetime.now(UTC):%Y%m%d-%H%M%S}"
    key = result.rows[0][1].model_key if result.rows else "none"
    directory = store.root / "reports" / f"{table}-{key}-{stamp}"
    result.path = write_text(directory / "table.md", result.markdown)
    result.page = _page(result, directory).page
    return result


def generator_columns(result: ExperimentResult) -> list[str]:
    gens: set[str] = set()
    for _, run in result.rows:
        gens.update(run.metrics.get("test", {}).get("auc_by_generator", {}))
    return sorted(gens)


def to_markdown(result: ExperimentResult) -> str:
    gens = generator_columns(result)
    random = any(run.random_weights for _, run in result.rows)
    lines = [f"# {result.table}: test ROC AUC per generator and overall", ""]
    if random:
        lines += ["**Embeddings from a CLIP with RANDOM weights: these numbers test the pipeline, "
                  "they are not results about CLIP.**", ""]
    if result.rows:
        run0 = result.rows[0][1]
        lines += [f"Model key `{run0.model_key}`, text pairing `{run0.metrics.get('pairing')}`.", ""]
        excluded = run0.metrics.get("excluded_leaks")
        if excluded:
            lines += [f"Leaking samples left out of the metrics (near-duplicates of an earlier split): "
                      f"{excluded.get('val', 0)} val, {excluded.get('test', 0)} test.", ""]
    lines.append("| Method | " + " | ".join(gens) + " | Overall | run |")
    lines.append("|---|" + "---:|" * (len(gens) + 1) + "---|")
    for label, run in result.rows:
        test = run.metrics.get("test", {})
        cells = [_fmt(test.get("auc_by_generator", {}).get(g)) for g in gens]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_fmt(test.get('auc'))} | `{run.run_id}` |")
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{100 * float(value):.2f}"


def _page(result: ExperimentResult, directory: Path) -> ReportResult:
    gens = generator_columns(result)
    out = ReportResult(directory)
    values = {
        label: [run.metrics.get("test", {}).get("auc_by_generator", {}).get(g) for g in gens]
        + [run.metrics.get("test", {}).get("auc")]
        for label, run in result.rows
    }
    random = any(run.random_weights for _, run in result.rows)
    out.files.append(figures.grouped_bars(directory / "auc.png", values, [*gens, "overall"],
                                          f"{result.table}: test ROC AUC", random))
    rows = [[label, *(html.pct(v) for v in values[label]), f"<code>{html.e(run.run_id)}</code>"]
            for label, run in result.rows]
    body = [
        f"<h1>{html.e(result.table)}</h1>", html.banner(random),
        '<div class="side">' + html.table(["method", *gens, "overall", "run"], rows, escape_last=False)
        + f'<img src="{out.files[0].name}" alt="bars"></div>',
    ]
    write_text(out.page, html.page(result.table, body))
    return out
