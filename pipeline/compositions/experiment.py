"""`pipeline experiment`: the paper's tables and the evaluations the field expects, as ordinary runs.

- table1: Baseline 1 (image features, BCE), Baseline 2 (image+text, BCE), the method (image+text,
  CVaR + AUC + SAM), a text-only row that exposes caption/prompt shortcuts and a kNN-vote row (a
  cheap baseline the paper lacks).
- table2: every combination of CVaR, AUC loss and SAM on image+text.
- generalization: train on one generator's images (with every real image), test on each generator;
  then leave one generator out. A matrix of test AUC with intervals and a heat map.
- robustness: a trained run scores the perturbed copies of its test samples (`pipeline perturb`),
  AUC per perturbation x generator with intervals, and a figure of AUC against strength.

Cells are test ROC AUC (each generator against all real test images, and overall) with the 95%
group-bootstrap interval of the run; with `seeds` > 1 the mean ± sd over seeds leads the cell. Runs
that already exist are reused. Every table shows the alarms its runs stored when they were trained
(shortcuts, a small test split, numbers on too few images), each once with the rows that raised it;
nothing here recomputes an alarm or an interval.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.choices import Experiment
from pipeline.config import Validated, at_least
from pipeline.errors import PipelineError
from pipeline.evaluation import alarms, bootstrap
from pipeline.evaluation.numbers import estimate_text
from pipeline.evaluation.scores import GroupKeys, ScoreCollector, score_batches
from pipeline.features.loader import FeatureLoader, LoaderConfig
from pipeline.features.view import feature_table
from pipeline.present import figures, html
from pipeline.reporting import Reporter, Silent
from pipeline.runs.config import TrainConfig
from pipeline.runs.record import load_run
from pipeline.stages import train
from pipeline.stages.report import ReportResult
from pipeline.stages.train import TrainJob, TrainResult
from pipeline.store import catalog
from pipeline.store.atomic import write_text
from pipeline.store.layout import Store
from trainer.metrics import Estimate

BCE_ONLY = {"cvar": False, "auc": False, "sam": False}
ALARMS_STORED = 3  # the RunMetrics version from which runs store their alarms and checks
KIND_ORDER = ("text_shortcut", "text_undecided", "format_shortcut", "small_test", "too_few")  # shown in this order
TABLES = ("table1", "table2", "generalization", "robustness")
TEXT_ROW = "Text only, BCE (shortcut check)"
METHOD_ROW = "Method: image+text, CVaR+AUC+SAM"
Cell = dict[str, Any]  # {value, lo, hi, n}


@dataclass
class ExperimentResult:
    table: str
    rows: list[tuple[str, TrainResult]] = field(default_factory=list)  # first seed's run of each row
    seed_runs: dict[str, list[TrainResult]] = field(default_factory=dict)  # every seed's run of each row
    columns: list[str] = field(default_factory=list)
    cells: dict[str, list[Cell | None]] = field(default_factory=dict)  # row -> a cell per column
    curves: dict[str, dict[str, list[tuple[float, Cell]]]] = field(default_factory=dict)  # robustness
    trained: dict[str, tuple[str, ...] | None] = field(default_factory=dict)  # generalization: row -> its generators
    alarms: list[str] = field(default_factory=list)  # shortcuts: the runs' stored ones, each once (rows raising it)
    warnings: list[str] = field(default_factory=list)  # the runs' stored small-test / too-few alarms, each once
    notes: list[str] = field(default_factory=list)  # other sentences (format probe, what is missing)
    seconds: float = 0.0
    markdown: str = ""
    path: Any = None  # the Markdown table
    page: Any = None  # the HTML page with the table beside its figure


def rows_for(table: str) -> list[tuple[str, dict[str, Any]]]:
    if table == "table1":
        return [
            ("Baseline 1: image, BCE", {"features": "image", **BCE_ONLY}),
            ("Baseline 2: image+text, BCE", {"features": "image+text", **BCE_ONLY}),
            (METHOD_ROW, {"features": "image+text", "cvar": True, "auc": True, "sam": True}),
            (TEXT_ROW, {"features": "text", **BCE_ONLY}),
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
    table: Experiment
    base: dict[str, Any] = field(default_factory=dict)  # training options every row shares
    seeds: int = 1  # table1/table2/generalization: runs per row with seeds base, base+1, …
    run_id: str | None = None  # robustness: the trained run that scores the perturbed samples

    def check(self) -> None:
        at_least(self, "seeds", 1)
        if self.table == "robustness" and not self.run_id:
            raise PipelineError("experiment robustness needs --run RUN (the detector to test).")


def run(config: ExperimentConfig, reporter: Reporter | None = None) -> ExperimentResult:
    """Train (or reuse) every row's runs, then write the table as Markdown and an HTML page."""
    reporter = reporter or Silent()
    started = time.perf_counter()
    if config.table == "robustness":
        result = _robustness(config, reporter)
    elif config.table == "generalization":
        result = _generalization(config, reporter)
    else:
        result = _paper_table(config, reporter)
    result.seconds = time.perf_counter() - started
    stored = _stored_alarms(result)
    result.alarms = [*result.alarms, *stored[0]]  # (this experiment's own first: robustness and the text)
    result.warnings = [*result.warnings, *stored[1]]
    result.markdown = to_markdown(result)
    stamp = f"{datetime.now(UTC):%Y%m%d-%H%M%S}"
    key = result.rows[0][1].model_key if result.rows else (config.run_id or "none")
    directory = config.store.root / "reports" / f"{config.table}-{key}-{stamp}"
    result.path = write_text(directory / "table.md", result.markdown)
    result.page = _page(result, directory).page
    html.index_reports(config.store.root / "reports", result.page, config.table, config.run_id, key)
    return result


# --- table1 / table2 -------------------------------------------------------------------------


def _paper_table(config: ExperimentConfig, reporter: Reporter) -> ExperimentResult:
    result = ExperimentResult(config.table)
    for label, options in rows_for(config.table):
        result.seed_runs[label] = _train_seeds(config, {**options, "name": f"{config.table}: {label}"},
                                               label, reporter)
        result.rows.append((label, result.seed_runs[label][0]))
    result.columns = [*_generators(result), "all"]
    for label, run in result.rows:
        result.cells[label] = [_auc(run, g) for g in result.columns]
    probed = next((run.metrics.checks["format"] for _, run in result.rows if "format" in run.metrics.checks), None)
    if (summary := alarms.format_summary(probed)) is not None:
        result.notes.append(summary)
    return result


def _stored_alarms(result: ExperimentResult) -> tuple[list[str], list[str]]:
    """The alarms the table's runs stored, each kind once: its first sentence, then the rows that raised it
    (each row's own numbers differ; the sentence quotes the first one's). Shortcuts, then warnings (runs
    from before alarms were stored are named among the warnings)."""
    if result.table == "robustness":  # every row is the one run
        runs = {label: [run] for label, run in result.rows[:1]}
    else:
        runs = result.seed_runs
    by_kind: dict[str, tuple[str, list[str]]] = {}
    unchecked: list[str] = []
    for label, seeded in runs.items():
        for run in seeded:
            if run.metrics.version < ALARMS_STORED and label not in unchecked:
                unchecked.append(label)
            for a in run.metrics.alarms:
                raised = by_kind.setdefault(a.kind, (a.sentence, []))[1]
                if label not in raised:
                    raised.append(label)
    kinds = sorted(by_kind, key=lambda k: KIND_ORDER.index(k) if k in KIND_ORDER else len(KIND_ORDER))
    out: tuple[list[str], list[str]] = ([], [])
    for kind in kinds:
        sentence, rows = by_kind[kind]
        if result.table != "robustness":
            who = "every row" if len(rows) == len(runs) > 1 else "; ".join(rows)
            # (a text alarm quotes its run's own AUC: say whose; the other kinds' numbers are the rows' common data)
            quoted = f"; the run AUC quoted is {rows[0]}'s" if len(rows) > 1 and kind.startswith("text_") else ""
            sentence += f" (Raised by {who}{quoted}.)"
        out[0 if kind in alarms.SHORTCUT_KINDS else 1].append(sentence)
    if unchecked:
        out[1].append(f"Not checked for shortcuts: {'; '.join(unchecked)} (trained before runs stored their alarms; "
                      "train again to check).")
    return out


def _train_seeds(config: ExperimentConfig, options: dict[str, Any], label: str,
                 reporter: Reporter) -> list[TrainResult]:
    first = int(config.base.get("seed", 0))
    runs = []
    for seed in range(first, first + config.seeds):
        train_config = TrainConfig.from_dict({**config.base, **options, "seed": seed})
        trained = train.run(TrainJob(config.store, train_config, skip_existing=True), reporter)
        reporter.event("row", {"label": f"{label} (seed {seed})" if config.seeds > 1 else label,
                               "run_id": trained.run_id, "skipped": trained.skipped})
        runs.append(trained)
    return runs


# --- generalization ----------------------------------------------------------------------------


def _generalization(config: ExperimentConfig, reporter: Reporter) -> ExperimentResult:
    """Rows: trained on one generator; trained on all but one; trained on all. Columns: test generator."""
    result = ExperimentResult("generalization")
    gens = sorted(catalog.query(config.store, "SELECT DISTINCT generator FROM samples WHERE label = 1")
                  .column(0).to_pylist())
    if len(gens) < 2:
        raise PipelineError(f"Generalisation needs at least two generators; the store has {len(gens)}.")
    plan: list[tuple[str, tuple[str, ...] | None]] = [(f"train on {html.short(g)}", (g,)) for g in gens]
    if len(gens) > 2:
        plan += [(f"all but {html.short(g)}", tuple(h for h in gens if h != g)) for g in gens]
    plan.append(("all generators", None))
    base = {"features": "image", **config.base}  # the question is about images; text may carry a shortcut
    for label, only in plan:
        options = {"train_generators": list(only) if only else None, "name": f"generalization: {label}"}
        result.seed_runs[label] = _train_seeds(config, {**base, **options}, label, reporter)
        result.rows.append((label, result.seed_runs[label][0]))
        result.trained[label] = only
    result.columns = [*gens, "all"]
    for label, run in result.rows:
        result.cells[label] = [_auc(run, g) for g in result.columns]
    result.notes.append("Rows name the generators a run was trained on (always with every real image); "
                        "cells are test AUC of each generator against all real test images. "
                        "Cells of generators a row never saw show how far the detector generalises.")
    return result


# --- robustness ----------------------------------------------------------------------------------


def _robustness(config: ExperimentConfig, reporter: Reporter) -> ExperimentResult:
    """The run scores each perturbation's derived test samples; AUC with intervals. The row `none` (the
    test split as ingested) is the run's own stored numbers, as its report and the `metrics` view show."""
    store, run_id = config.store, config.run_id or ""
    train_config, model, metrics = load_run(store, run_id)
    model_key = metrics.model_key
    counts = catalog.query(store, (
        "SELECT s.perturbation, count(*) AS n, count(e.content_hash) AS encoded FROM samples s "
        "LEFT JOIN (SELECT DISTINCT content_hash FROM embeddings WHERE model_key = ? AND modality = 'image') e "
        "ON e.content_hash = s.sample_id WHERE s.split = 'test' AND s.perturbation IS NOT NULL "
        "GROUP BY 1 ORDER BY 1"), [model_key]).to_pylist()
    if not counts:
        raise PipelineError("No perturbed test samples: run `pipeline perturb --splits test --ops jpeg:90,75,50 "
                            "resize:0.5` and then `pipeline encode` first.")
    result = ExperimentResult("robustness")
    missing = [f"{c['perturbation']} ({c['n'] - c['encoded']} of {c['n']})" for c in counts if c["encoded"] < c["n"]]
    if missing:
        result.notes.append("Derived samples not encoded yet are left out: " + ", ".join(missing)
                            + "; run `pipeline encode` (it encodes only the new images).")
    run = TrainResult(run_id, "", metrics, skipped=True)
    names = sorted((c["perturbation"] for c in counts if c["encoded"]), key=_weak_to_strong)
    evaluated: dict[str, dict[str, Cell]] = {}
    if metrics.test.n:
        evaluated["none"] = {g: c for g in [*metrics.test.generators, "all"]
                             if (c := _cell(metrics.test.estimate("auc", g))) is not None}
    reporter.start("robustness", len(names), "perturbations")
    for name in names:
        table = feature_table(store, model_key, train_config.pairing, name, reporter=reporter)
        loader_config = LoaderConfig(train_config.features, 8192, input_norm=train_config.input_norm, order="rows")
        # scored batch by batch like a run's scores: numbers and group keys kept, no vector or id per row
        collected, groups = ScoreCollector(1 << 16), GroupKeys(store, f"{run_id}-robustness")
        try:
            score_batches(model, FeatureLoader(table, ("test",), loader_config), train_config.fit,
                          (collected, groups))
            codes = groups.codes() if collected.rows else None
        finally:
            groups.discard()
        reporter.advance("robustness", 1)
        if codes is None:
            continue
        s = collected.arrays()
        by_gen = bootstrap.by_generator(s.label, s.score, s.generator, codes, train_config.seed, "test",
                                        names=s.generators)
        evaluated[name] = {g: c for g, d in by_gen.items() if (c := _cell(d["auc"])) is not None}
    result.columns = sorted({g for cells in evaluated.values() for g in cells} - {"all"}) + ["all"]
    for label, cells in evaluated.items():
        result.rows.append((label, run))
        result.cells[label] = [cells.get(g) for g in result.columns]
    for label, cells in evaluated.items():
        if label == "none":
            continue
        op, _, strength = label.partition(":")
        for g, cell in cells.items():
            result.curves.setdefault(op, {}).setdefault(g, []).append((float(strength), cell))
    if "none" in evaluated:
        result.curves["none"] = {g: [(0.0, c)] for g, c in evaluated["none"].items()}
    result.notes.append(f"Run `{run_id}` ({train_config.features}, pairing {train_config.pairing}) scores the "
                        "test split as ingested (row none: the run's own numbers) and each perturbation's copies "
                        "of it; AUC × 100 [95% group-bootstrap interval].")
    if train_config.features != "image":
        result.alarms.append(
            f"This run reads text ({train_config.features}), and the perturbations change only the images, not the "
            "captions and prompts it reads: where the text carries the decision, AUC stays flat under every "
            "perturbation, which says nothing about how robust its image evidence is. Test an image-only run "
            "(--features image) for robustness.")
    return result


def _weak_to_strong(name: str) -> tuple[str, float]:
    op, _, strength = name.partition(":")
    value = float(strength)
    return op, -value if op in ("jpeg", "resize", "crop") else value  # lower quality/scale/kept = stronger


# --- rendering -----------------------------------------------------------------------------------


def _generators(result: ExperimentResult) -> list[str]:
    gens: set[str] = set()
    for _, run in result.rows:
        gens.update(run.metrics.test.generators)
    return sorted(gens)


def _auc(run: TrainResult, generator: str) -> Cell | None:
    return _cell(run.metrics.test.estimate("auc", generator))


def _cell(estimate: Estimate | None) -> Cell | None:
    """A table cell {value, lo, hi, n} (None where a number is undefined on the data)."""
    if estimate is None or np.isnan(estimate.value):
        return None
    return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in estimate.as_dict().items()}


def seed_spread(result: ExperimentResult, label: str, column: int) -> tuple[float, float] | None:
    """Mean and sample sd over seeds of one cell (None with a single seed)."""
    runs = result.seed_runs.get(label, [])
    if len(runs) < 2:
        return None
    values = [c["value"] for r in runs if (c := _auc(r, result.columns[column])) and c["value"] is not None]
    if len(values) < 2:
        return None
    return float(np.mean(values)), float(np.std(values, ddof=1))


def cell_text(result: ExperimentResult, label: str, column: int) -> str:
    """A Markdown cell: the value and its interval ('interval not informative' when the bootstrap could not
    vary it: `evaluation.numbers`, the rule pages use); with seeds, the mean ± sd first, in bold."""
    cell = result.cells[label][column]
    if cell is None or cell.get("value") is None:
        return "–"
    text = estimate_text(cell)
    spread = seed_spread(result, label, column)
    if spread:
        text = f"**{_pct(spread[0])} ± {_pct(spread[1])}**; first seed {text}"
    return text


def _cell_html(result: ExperimentResult, label: str, column: int) -> str:
    cell = result.cells[label][column]
    if cell is None or cell.get("value") is None:
        return "–"
    return html.estimate(cell["value"], cell.get("lo"), cell.get("hi"), seed_spread(result, label, column))


def to_markdown(result: ExperimentResult) -> str:
    random = any(run.random_weights for _, run in result.rows)
    seeds = max((len(v) for v in result.seed_runs.values()), default=1)
    lines = [f"# {result.table}: test ROC AUC per generator and overall", ""]
    if random:
        lines += ["**Embeddings from a CLIP with RANDOM weights: these numbers test the pipeline, "
                  "they are not results about CLIP.**", ""]
    lines += [line for a in result.alarms for line in (f"**{a}**", "")]  # (a paragraph each)
    lines += [line for w in result.warnings for line in (f"Warning: {w}", "")]
    if result.rows:
        run0 = result.rows[0][1]
        lines += [f"Model key `{run0.model_key}`, text pairing `{run0.metrics.pairing}`. Cells: AUC × 100 "
                  + (f"as mean ± sd over {seeds} seeds, then the first seed's value [95% group-bootstrap interval]."
                     if seeds > 1 else "[95% group-bootstrap interval]."), ""]
        excluded = run0.metrics.excluded_leaks
        if excluded:
            lines += [f"Leaking samples left out of the metrics (near-duplicates of an earlier split): "
                      f"{excluded.get('val', 0)} val, {excluded.get('test', 0)} test.", ""]
    lines += [n for note in result.notes for n in (note, "")]
    columns = [html.short(c) if c != "all" else "Overall" for c in result.columns]
    lines.append("| Method | " + " | ".join(columns) + " | run |")
    lines.append("|---|" + "---:|" * len(columns) + "---|")
    for label, run in result.rows:
        cells = [cell_text(result, label, i) for i in range(len(result.columns))]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | `{run.run_id}` |")
    lines += ["", f"Took {result.seconds:.1f} s{_work_done(result)}."]
    return "\n".join(lines) + "\n"


def _work_done(result: ExperimentResult) -> str:
    """What the time went on: runs trained, and runs found by their config hash (same config, same data)."""
    if result.table == "robustness":
        return ""
    runs = [run for runs in result.seed_runs.values() for run in runs]
    reused = sum(run.skipped for run in runs)
    if not runs:
        return ""
    if reused == len(runs):
        return f": all {reused} runs reused (found by their config hash: the same config on the same rows)"
    return f": {len(runs) - reused} runs trained, {reused} reused (found by their config hash)"


def _page(result: ExperimentResult, directory: Path) -> ReportResult:
    out = ReportResult(directory)
    random = any(run.random_weights for _, run in result.rows)
    values = {label: result.cells[label] for label, _ in result.rows}
    if result.table == "generalization":
        out.files.append(figures.heatmap(directory / "matrix.png", values, result.columns,
                                         "Test AUC: rows trained on, columns tested on", random, result.trained))
    elif result.table == "robustness":
        out.files.append(figures.robustness(directory / "robustness.png", result.curves, random))
    else:
        out.files.append(figures.grouped_bars_ci(directory / "auc.png", values, result.columns,
                                                 f"{result.table}: test ROC AUC (95% intervals)", random))
    rows = [[html.e(label), *(_cell_html(result, label, i) for i in range(len(result.columns))),
             f"<code class='run'>{html.e(run.run_id)}</code>"] for label, run in result.rows]
    columns = [html.short(c) if c != "all" else "overall" for c in result.columns]
    body = [
        f"<h1>{html.e(result.table)}</h1>", html.banner(random),
        *(f'<p class="alarm">{html.e(a)}</p>' for a in result.alarms),
        *(f'<p class="warn">{html.e(w)}</p>' for w in result.warnings),
        *(f"<p>{html.e(n.replace('`', ''))}</p>" for n in result.notes),
        ("<p>Cells: test ROC AUC × 100 as the mean ± sd over seeds (bold, blue); below it the first seed's value "
         "and its 95% group-bootstrap interval.</p>" if any(len(v) > 1 for v in result.seed_runs.values()) else
         "<p>Cells: test ROC AUC × 100; below it the 95% group-bootstrap interval.</p>"),
        html.raw_table(["method" if result.table != "robustness" else "perturbation", *columns, "run"], rows),
        *(f'<img class="wide{" broad" if f.stem == "robustness" else ""}" src="{f.name}" alt="{f.stem}">'
          for f in out.files),
        f"<p>Took {result.seconds:.1f} s{html.e(_work_done(result))}.</p>",
    ]
    write_text(out.page, html.page(result.table, body))
    return out


def _pct(value: Any) -> str:
    return html.pct(value)
