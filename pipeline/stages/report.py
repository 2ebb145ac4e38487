"""`pipeline report`: a run (or an experiment) as a static HTML page with PNG figures.

Run page: the alarms the run stored when it was trained (shortcuts, a small test split, numbers on
too few images) and what its shortcut probes measured, every metric with its 95% group-bootstrap
interval (a number resting on too few images marked, with why), ROC curves, AUC per generator as bars with
intervals, score histograms, the confusion matrix, the learning curve, an error gallery (thumbnails
of the top false positives and false negatives at the val-chosen threshold, from the original
bytes, with caption, generator, score and nearest training neighbour), the run's config. Everything
is computed from the store; the page references only files written beside it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.allocator import step_buffers_reused
from pipeline.choices import Split
from pipeline.config import Validated, within
from pipeline.errors import PipelineError
from pipeline.evaluation import alarms, bootstrap
from pipeline.evaluation.calibration import Calibration, calibration_of
from pipeline.evaluation.results import RunMetrics
from pipeline.evaluation.scores import GroupKeys, ScoreArrays, ScoreCollector
from pipeline.features.ann.coarse import faiss_threads
from pipeline.features.ann.search import TopK, unit_rows
from pipeline.features.leaks import leaking_ids
from pipeline.features.loader import FeatureLoader, LoaderConfig
from pipeline.features.view import FeatureTable, feature_table
from pipeline.present import figures, html
from pipeline.reporting import Reporter
from pipeline.runs.record import load_run_record
from pipeline.sources.locations import Location, LocationReader
from pipeline.sources.reading import Expected
from pipeline.store import catalog, duck
from pipeline.store.atomic import write_bytes, write_text
from pipeline.store.layout import Store
from pipeline.store.outputs import check_output
from pipeline.store.writes import require_writable
from trainer.metrics import METRICS, Estimate, confusion

GALLERY = 6  # false positives and as many false negatives
# A gallery sample's nearest training image: its most similar rows kept from one pass over the image
# vectors, in chunks of NEAREST_CHUNK_ROWS (48 MB of float32 at 768-d, reused from the heap). At 5M
# samples the two passes this replaced (one sorted by matrix row) took 58 of the report's 66 s.
NEAREST_CANDIDATES = 64
NEAREST_CHUNK_ROWS = 16384


@dataclass
class ReportResult:
    directory: Path
    files: list[Path] = field(default_factory=list)
    alarms: list[str] = field(default_factory=list)  # the run's stored shortcut alarms (sentences)
    warnings: list[str] = field(default_factory=list)  # its other stored alarms: small test, too few images
    intervals: dict[str, dict[str, Estimate]] = field(default_factory=dict)  # shown: generator -> metric -> estimate

    @property
    def page(self) -> Path:
        return self.directory / "index.html"


@dataclass(frozen=True)
class ReportConfig(Validated):
    store: Store
    run_id: str
    output: Path | None = None  # default STORE/reports/run-RUN
    split: Split = "test"
    threshold: float = 0.5
    exclude_leaks: bool = False

    def check(self) -> None:
        within(self, "threshold", 0, 1, low_open=True, high_open=True)
        if self.output is not None:  # outside the store, or a folder of its own under STORE/reports/
            check_output(self.store, self.output, "directory", own="reports")


def run(cfg: ReportConfig, reporter: Reporter | None = None) -> ReportResult:
    store, run_id, output, split, threshold = cfg.store, cfg.run_id, cfg.output, cfg.split, cfg.threshold
    config, metrics = load_run_record(store, run_id)
    require_writable(store, "report", "a temp file of the score groups, its caches, and the page unless --output "
                     "names another folder")
    leaking: set[str] = set()
    if cfg.exclude_leaks:
        leaking, _ = leaking_ids(store, metrics.model_key, config.leak_threshold)
    read = _read_scores(store, run_id, split, leaking)
    if read is None:
        raise PipelineError(f"Run {run_id} has no scores in the {split!r} split.")
    s, groups, fp, fn = read
    keep = ~s.excluded
    y = s.label[keep].astype(bool)
    p = s.score[keep].astype(np.float64)
    gens = np.array(s.generators, object)[s.generator[keep]]  # one name object per generator, not per row
    groups = groups[keep]
    stored = metrics.split(split)
    recomputed = cfg.exclude_leaks and not config.exclude_leaks
    if recomputed:  # the run kept its leaking samples: these numbers are new ones, drawn by the same policy
        intervals = bootstrap.by_generator(y, p, gens, groups, config.seed, split)
        n_boot = bootstrap.bootstrap_replicates(len(y))
        basis = (f"recomputed without the {int(s.excluded.sum())} leaking {split} samples (similarity ≥ "
                 f"{config.leak_threshold}); the run's stored numbers include them")
    else:  # the run's own numbers, as stored: the `metrics` view shows the same
        intervals = stored.intervals
        n_boot = stored.bootstrap.replicates if stored.bootstrap else 0
        basis = f"as the run recorded them (n = {stored.n} {split} samples when it was trained)"
    directory = output or store.run_report_dir(run_id)
    result = ReportResult(directory, intervals=intervals)
    rw = metrics.random_weights
    result.files.append(figures.roc(directory / "roc.png", y, p, gens, split, rw))
    names = [g for g in intervals if g != "all"]
    cells = {g: intervals[g]["auc"].as_dict() for g in [*names, "all"] if "auc" in intervals.get(g, {})}
    result.files.append(figures.bars_ci(directory / "auc_by_generator.png", cells,
                                        f"{split} ROC AUC per generator (each against all real)", rw))
    result.files.append(figures.histograms(directory / "scores.png", y, p, gens, split, rw))
    result.files.append(figures.confusion(directory / "confusion.png", confusion(y, p, threshold), threshold, rw))
    if metrics.history:
        result.files.append(figures.learning_curve(directory / "learning_curve.png", list(metrics.history),
                                                   metrics.best_epoch, rw))
    calibration = calibration_of(store, run_id, metrics.calibration)
    shown = next((s for s in ("test", "val") if (calibration.reliability or {}).get(s)), None)
    if shown is not None:
        before, after = (calibration.reliability or {})[shown]
        result.files.append(figures.reliability(directory / "reliability.png", before, after, shown, rw))
    chosen_at = metrics.test.at_val_threshold
    chosen = chosen_at.threshold if chosen_at else threshold
    result.alarms = [a.sentence for a in metrics.alarms if a.kind in alarms.SHORTCUT_KINDS]
    result.warnings = [a.sentence for a in metrics.alarms if a.kind not in alarms.SHORTCUT_KINDS]
    n_fp, n_fn = int(np.sum(~y & (p > chosen))), int(np.sum(y & (p <= chosen)))
    gallery = _gallery(store, config, metrics, fp + fn, len(fp), (n_fp, n_fn), directory, chosen)
    then = stored.n  # the split's samples when the run was trained
    overall = intervals.get("all", {})
    notes: list[str] = []  # why a marked number rests on too few images (`alarms.caveat`), numbered
    body = [
        f"<h1>Run <code>{html.e(run_id)}</code></h1>",
        html.banner(metrics.random_weights),
        *(f'<p class="alarm">{html.e(sentence)}</p>' for sentence in result.alarms),
        *(f'<p class="warn">{html.e(sentence)}</p>' for sentence in result.warnings),
        _unchecked(metrics),
        f"<p>Model key <code>{html.e(metrics.model_key)}</code>; detector {html.e(config.detector)}; "
        f"features {html.e(config.features)}; text pairing {html.e(config.pairing)}. Figures on the "
        f"<b>{html.e(split)}</b> split ({len(y)} samples).</p>",
        "<h2>Metrics</h2>",
        f"<p>× 100, with 95% group-bootstrap intervals ({n_boot} replicates; a real image and the images "
        f"generated from its caption are resampled together), {html.e(basis)}. Thresholded metrics at 0.5; "
        f"the confusion matrix at {threshold}.</p>",
        html.table(["metric", f"{split}", "n"],
                   [[html.metric_name(m), _marked(m, overall[m], notes), overall[m].n]
                    for m in METRICS if m in overall]),
        _threshold_note(metrics),
        _calibration_note(calibration, metrics.calibration is None),
        f"<p>The figures also count the {len(y) - then} {html.e(split)} samples scored since by "
        "<code>pipeline score</code>; the tables do not.</p>" if 0 < then < len(y) and not recomputed else "",
        html.table(["split", "n", "ROC AUC", "AP", "accuracy @ 0.5"],
                   [html.metric_row(name, metrics.split(name)) for name in ("train", "val", "test")]),
        "<h2>Per generator</h2>",
        html.table(["generator", "n", f"{split} ROC AUC", "AP", "EER", "TPR @ 1% FPR"],
                   [[g, intervals[g]["auc"].n, *(_marked(m, intervals[g][m], notes)
                                                 for m in ("auc", "ap", "eer", "tpr_at_fpr_1"))]
                    for g in [*names, "all"] if g in intervals]),
        _notes(notes),
        '<div class="figs">' + "".join(f'<img src="{f.name}" alt="{f.stem}">' for f in result.files) + "</div>",
        "<h2>Shortcut checks</h2>" + _checks(metrics),
        "<h2>Errors</h2>" + gallery,
        "<h2>History</h2>" + html.history(metrics),
        "<h2>Config</h2>",
        f"<pre>{html.e(json.dumps(config.flat(), indent=2, default=str))}</pre>",
    ]
    write_text(result.page, html.page(f"run {run_id}", body))
    html.index_reports(store.root / "reports", result.page, "run report", run_id, metrics.model_key)
    return result


def _cell(cell: dict[str, Any]) -> str:
    return html.estimate_text(cell)


def _calibration_note(calibration: Calibration, fitted_now: bool) -> str:
    """Calibration's ECE before and after, as the run stored it (or, for a run from before, as fitted now)."""
    pairs = calibration.reliability or {}
    rows = [[split, before.n, f"{100 * before.ece:.2f}", f"{100 * after.ece:.2f}"]
            for split, (before, after) in sorted(pairs.items(), key=lambda kv: kv[0] != "val")]
    if not rows:
        return ""
    when = "fitted now from the run's stored val scores (it was trained before calibration was kept)" \
        if fitted_now else "fitted on val when the run was trained"
    sign = "+" if calibration.b >= 0 else "−"
    return (f"<p>Calibration (Platt scaling, p̂ = σ({calibration.a:.3f}·s {sign} {abs(calibration.b):.3f}) where s is "
            f"the logit of the score, {when}): "
            "expected calibration error × 100 in 15 equal-width bins, before and after; test never saw the "
            "fit. Predict and exported detectors report p̂ as <code>probability</code>.</p>"
            + html.table(["split", "n", "ECE before", "ECE after"], rows))


def _marked(metric: str, e: Estimate, notes: list[str]) -> str:
    """The cell of an estimate, with a numbered mark when its operating point cannot be resolved on these
    real images (`alarms.unresolved`; numbers on few images of a class are said once, by the warning and
    the n columns, not on every cell)."""
    why = alarms.unresolved(metric, e)
    if why is None:
        return _cell(e.as_dict())
    text = f"{html.metric_name(metric)}: {why}"
    if text not in notes:
        notes.append(text)
    return f"{_cell(e.as_dict())} ({notes.index(text) + 1})"


def _notes(notes: list[str]) -> str:
    if not notes:
        return ""
    return ("<p>Marked numbers cannot be read at the rate they name:</p><ol>"
            + "".join(f"<li>{html.e(n)}</li>" for n in notes) + "</ol>")


def _unchecked(metrics: RunMetrics) -> str:
    if metrics.checks or metrics.alarms:
        return ""
    return ('<p class="warn">This run was trained before runs stored their shortcut checks and alarms: none '
            "are shown. Train it again (the same config) to check it.</p>")


def _checks(metrics: RunMetrics) -> str:
    """What the probes of the run's rows measured, alarm or not (stored with the run)."""
    text = metrics.checks.get("text")
    lines = []
    if text and text.get("ran"):
        lines.append(f"Text alone ({html.e(text['method'])}, {text['test_rows']} test rows of "
                     f"{text['test_groups']} groups): test AUC {_cell(text['auc'])}; "
                     f"{100 * text['mixed_groups']:.0f}% of sampled groups hold both a real and a generated image.")
    elif text:
        lines.append(f"Text probe not run: {html.e(text.get('why'))}.")
    if (summary := alarms.format_summary(metrics.checks.get("format"))) is not None:
        lines.append(html.e(summary))
    return "".join(f"<p>{line}</p>" for line in lines) or "<p>none stored</p>"


def _threshold_note(metrics: RunMetrics) -> str:
    chosen = metrics.test.at_val_threshold
    if not chosen:
        return ""
    rows = [[html.metric_name(m), _cell(c.as_dict())] for m, c in chosen.metrics.items()]
    return (f"<p>At the threshold chosen on val (balanced accuracy, t = {chosen.threshold:.3f}) and applied "
            "to test:</p>" + html.table(["metric", "test"], rows))


def _read_scores(store: Store, run_id: str, split: str, leaking: set[str]
                 ) -> tuple[ScoreArrays, np.ndarray, list[Pick], list[Pick]] | None:
    """The split's scores as numbers (`ScoreArrays`, leaking rows marked excluded), their group codes,
    and the gallery's picks: the real samples scored most generated and the generated scored most
    real, `GALLERY` each. Scores stream in batches; nothing per row but numbers is kept."""
    collected = ScoreCollector(1 << 16, leaking)
    groups = GroupKeys(store, f"{run_id}-report")
    fp: list[Pick] = []
    fn: list[Pick] = []
    try:
        with catalog.connect(store) as con:
            rel = con.sql("SELECT sample_id, split, label, generator, score FROM scores WHERE run_id = $run "
                          "AND split = $split", params={"run": run_id, "split": split})
            for batch in duck.batches(rel, 1 << 16):
                rows = pa.Table.from_batches([batch])
                score = rows.column("score").to_numpy()
                collected.write(rows, score)
                groups.write(rows, score)
                left = ~pc.is_in(rows.column("sample_id"), value_set=pa.array(sorted(leaking), pa.string())
                                 ).to_numpy(zero_copy_only=False)
                label = rows.column("label").to_numpy(zero_copy_only=False).astype(bool)
                ids = rows.column("sample_id")
                fp = _top(fp, ids, score, left & ~label, collected.rows - rows.num_rows, highest=True)
                fn = _top(fn, ids, score, left & label, collected.rows - rows.num_rows, highest=False)
        if not collected.rows:
            return None
        return collected.arrays(), groups.codes(), fp, fn
    finally:
        groups.discard()


Pick = tuple[str, bool, float, int]  # sample id, generated?, score, row number in the stream


def _top(kept: list[Pick], ids: pa.ChunkedArray, score: np.ndarray, mask: np.ndarray, start: int,
         highest: bool) -> list[Pick]:
    """The `GALLERY` picks of `kept` and this batch's `mask`ed rows with the highest (or lowest) score,
    ties to the earlier row: as a stable sort of the whole split would choose."""
    rows = np.flatnonzero(mask)
    order = np.lexsort((rows, -score[rows] if highest else score[rows]))[:GALLERY]
    label = not highest  # the most generated-looking real images; the most real-looking generated ones
    new = [(str(ids[int(rows[j])]), label, float(score[rows[j]]), start + int(rows[j])) for j in order]
    both = kept + new
    return sorted(both, key=lambda t: (-t[2] if highest else t[2], t[3]))[:GALLERY]


def _gallery(store: Store, config: Any, metrics: RunMetrics, picks: list[Pick], n_fp_shown: int,
             errors: tuple[int, int], directory: Path, threshold: float) -> str:
    """Thumbnails of the most confident mistakes at `threshold`, each beside its nearest training image."""
    if not picks:
        return "<p>No samples.</p>"
    (n_fp, n_fn), picked = errors, [pick[0] for pick in picks]
    info = {r["sample_id"]: r for r in catalog.query_with(
        store, "SELECT s.* FROM samples s JOIN picked USING (sample_id)",
        {"picked": _id_table(picked)}).to_pylist()}
    nearest = _nearest_training(store, config, metrics, picked)
    near_info = {r["sample_id"]: r for r in catalog.query_with(
        store, "SELECT s.* FROM samples s JOIN picked USING (sample_id)",
        {"picked": _id_table([n for n, _ in nearest.values()])}).to_pylist()}
    reader = LocationReader()

    def card(pick: Pick, kind: str) -> str:
        sid, generated, score, _ = pick
        row = info.get(sid, {})
        near_id, similarity = nearest.get(sid, (None, float("nan")))
        near = near_info.get(near_id or "", {})
        wrong = (score > threshold) != generated
        kind = kind if wrong else ("hardest real (correct)" if not generated else "hardest generated (correct)")
        return (f'<figure class="card{" wrong" if wrong else ""}"><div class="pair">{_thumb(reader, row, directory)}'
                f'{_thumb(reader, near, directory)}</div><figcaption><b>{kind}</b> score {score:.3f} · '
                f'{html.e(html.short(row.get("generator", "?")))}<br><i>{html.e((row.get("text") or "")[:140])}'
                f'</i><br>right: nearest training image ({html.e(html.short(near.get("generator", "–")))}, '
                f'cosine {similarity:.3f})</figcaption></figure>')

    return (f"<p>At threshold {threshold:.3f} (chosen on val) the split has {n_fp} false positives (real called "
            f"generated) and {n_fn} false negatives. Shown: the real images scored most generated and the "
            "generated images scored most real (red border: a mistake). Left: the image from its original bytes; "
            "right: its nearest training neighbour by image embedding.</p>"
            '<div class="gallery">' + "".join(card(pick, "false positive") for pick in picks[:n_fp_shown])
            + "".join(card(pick, "false negative") for pick in picks[n_fp_shown:]) + "</div>")


def _id_table(ids: list[str]) -> Any:
    import pyarrow as pa

    return pa.table({"sample_id": pa.array(ids, pa.string())})


def _thumb(reader: LocationReader, row: dict[str, Any], directory: Path) -> str:
    if not row:
        return '<div class="nothumb">no sample</div>'
    try:
        data = figures.thumbnail_png(reader.read(Location.from_row(row), Expected.of(row)))  # bounded, verified
    except Exception:  # noqa: BLE001 - imported features, moved or broken files: say so on the page
        return '<div class="nothumb">no image bytes</div>'
    path = write_bytes(directory / "gallery" / f"{row['sample_id'][:16]}.png", data)
    return f'<img src="gallery/{path.name}" alt="{html.e(row["sample_id"][:12])}">'


def _nearest_training(store: Store, config: Any, metrics: RunMetrics,
                      picked: list[str]) -> dict[str, tuple[str, float]]:
    """Each picked sample's most similar training image (cosine of image embeddings), exactly.

    One pass over the image vectors in file order keeps each picked sample's NEAREST_CANDIDATES most
    similar rows, whatever their split; the first of them a training sample holds is the answer, as
    every row more similar holds none. A sample whose candidates hold no training row (many near
    copies outside train) is looked for again among the training rows alone (`_among_training`)."""
    import faiss

    try:
        table = feature_table(store, metrics.model_key, config.pairing)
    except PipelineError:
        return {}
    rows = f"FROM {table.parts_sql} WHERE image_row IS NOT NULL AND "
    with duckdb.connect() as con:
        con.register("picked", _id_table(picked))
        queries = con.sql(f"SELECT sample_id, image_row {rows} split IN ('val', 'test') "
                          "AND sample_id IN (SELECT sample_id FROM picked) ORDER BY sample_id").fetchall()
        if not queries:
            return {}
        q = unit_rows(table.images.gather(np.array([row for _, row in queries], np.int64)))
        top = TopK(q, min(NEAREST_CANDIDATES, table.images.rows), faiss)
        with faiss_threads(faiss, 1), step_buffers_reused():  # a dozen queries: products too small for threads
            for start, chunk in table.images.chunks(NEAREST_CHUNK_ROWS):
                top.update(unit_rows(chunk), start)
        # a matrix row held by several training samples: the first by id
        holders = dict(con.sql(f"SELECT image_row, min(sample_id) {rows} split = 'train' "
                               "AND image_row IN (SELECT unnest($rows)) GROUP BY image_row",
                               params={"rows": np.unique(top.rows[top.rows >= 0]).tolist()}).fetchall())
    names = [name for name, _ in queries]
    nearest: dict[str, tuple[str, float]] = {}
    for i, name in enumerate(names):
        order = np.lexsort((top.rows[i], -top.sims[i]))  # most similar first; a tie to the earlier row
        held = [j for j in order if int(top.rows[i, j]) in holders]
        if held:
            nearest[name] = (holders[int(top.rows[i, held[0]])], float(top.sims[i, held[0]]))
    missing = [i for i, name in enumerate(names) if name not in nearest]
    if missing:
        nearest.update(_among_training(table, [names[i] for i in missing], q[missing]))
    return nearest


def _among_training(table: FeatureTable, names: list[str], q: np.ndarray) -> dict[str, tuple[str, float]]:
    """The most similar training image of each unit query, by a pass over the training rows alone."""
    best = np.full(len(names), -np.inf)
    best_id = np.array([""] * len(names), dtype=object)
    for b in FeatureLoader(table, ("train",), LoaderConfig("image", 8192, order="rows")).epoch(0):
        sims = q @ unit_rows(b.x.numpy()).T
        j = sims.argmax(1)
        better = sims[np.arange(len(names)), j] > best
        best = np.where(better, sims[np.arange(len(names)), j], best)
        best_id = np.where(better, b.sample_id.astype(str)[j], best_id)
    return {n: (str(best_id[i]), float(best[i])) for i, n in enumerate(names) if best_id[i]}
