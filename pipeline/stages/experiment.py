"""`pipeline experiment table1|table2`: the paper's tables as ordinary runs on any store.

Table 1: Baseline 1 (image features, BCE), Baseline 2 (image+text, BCE), the method (image+text,
CVaR + AUC + SAM), plus a text-only row that exposes caption/prompt shortcuts and a kNN-vote
row (a cheap baseline the paper lacks). Table 2: every
combination of CVaR, AUC loss and SAM on image+text. Cells are test ROC AUC per generator (each
generator against all real test images) and overall. Runs that already exist are reused.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pipeline.store.atomic import write_text
from pipeline.stages.report import experiment_report
from pipeline.store.layout import Store
from pipeline.stages.train import TrainConfig, TrainResult, train

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


def run_experiment(
    store: Store,
    table: str,
    base: dict[str, Any],
    on_row: Callable[[str, TrainResult], None] | None = None,
) -> ExperimentResult:
    result = ExperimentResult(table)
    for label, options in rows_for(table):
        config = TrainConfig.from_dict({**base, **options, "name": f"{table}: {label}"})
        run = train(store, config, skip_existing=True)
        result.rows.append((label, run))
        if on_row:
            on_row(label, run)
    result.markdown = to_markdown(result)
    stamp = f"{datetime.now(UTC):%Y%m%d-%H%M%S}"
    key = result.rows[0][1].model_key if result.rows else "none"
    directory = store.root / "reports" / f"{table}-{key}-{stamp}"
    result.path = write_text(directory / "table.md", result.markdown)
    result.page = experiment_report(result, directory).page
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
