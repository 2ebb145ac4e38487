"""The terminal: rich progress bars behind the `Reporter` protocol, tables, and every stage result as text.

Everything the CLI shows goes through here, one `show_*` function per result; stages return data
and never print. Text that comes from the data or the user (captions, paths, error messages) goes
through `escape`: its control characters are shown as `\\x1b`-style escapes (a caption holding an
escape sequence would otherwise retitle, recolour or clear the user's terminal) and its rich markup
is escaped, so a `[` in it is shown, not interpreted. Exports (csv, json, parquet) keep the data as
it is: they are data, not terminal output.

Widths: the consoles are made per command (`configure`), so they read `COLUMNS` or the terminal's
size when the command starts. Sentences are printed as one line each (`soft_wrap`): the terminal
wraps them where it must, so a path or a command in them is copied whole, and a log holds one line
per message. Tables are fitted to the width by `present.tables` (identifiers and numbers are never
broken; free text is cut with "…"; records when no table fits).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from rich.console import Console
from rich.markup import escape as escape_markup
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from pipeline.present import tables
from pipeline.present.tables import Column

if TYPE_CHECKING:  # the results rendered here; imported for their types only (a renderer runs no stage)
    from pipeline.compositions.demo import DemoResult
    from pipeline.compositions.experiment import ExperimentResult
    from pipeline.compositions.sweep import SweepResult
    from pipeline.stages.clean import CleanResult
    from pipeline.stages.conflicts import ConflictsResult
    from pipeline.stages.encode import EncodeResult
    from pipeline.stages.export import ExportResult
    from pipeline.stages.import_features import ImportResult
    from pipeline.stages.index import IndexInfo
    from pipeline.stages.ingest import IngestResult
    from pipeline.stages.landscape import LandscapeResult
    from pipeline.stages.leaks import LeakResult
    from pipeline.stages.neighbors import NeighborResult
    from pipeline.stages.perturb import PerturbResult
    from pipeline.stages.predict import PredictResult
    from pipeline.stages.report import ReportResult
    from pipeline.stages.runs import RunDetail, RunList, RunsRemoved
    from pipeline.stages.score import ScoreResult
    from pipeline.stages.sql import SqlResult
    from pipeline.stages.status import StoreStatus
    from pipeline.stages.train import TrainResult
    from pipeline.stages.verify import VerifyResult
    from pipeline.store.writes import Reconciled

# highlight=False: rich's number highlighting would colour parts of run ids and model keys
out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)
_alarmed: set[str] = set()  # the alarm sentences this command has printed: each goes out once


def configure() -> None:
    """Fresh consoles for a command: the width (COLUMNS, or the terminal's) is read now, not at import."""
    global out, err
    out = Console(soft_wrap=True, highlight=False)
    err = Console(stderr=True, soft_wrap=True, highlight=False)
    _alarmed.clear()


# C0 controls but tab and newline, DEL, and C1 controls (0x9b alone starts a sequence on some terminals)
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` with each control character shown as its escape (ESC as \\x1b): nothing from the data
    reaches the terminal as a command."""
    return _CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def escape(text: str) -> str:
    """Text from the data or the user, safe to print: control characters shown, rich markup escaped."""
    return escape_markup(printable(text))


class _Rate(ProgressColumn):
    """Items per second on the stage's clock: done over the seconds from the bar's start to its last
    advance (a bar without a total stops there too), and once the stage has said how long the job took
    (event `finished`), its own count over its own seconds: the figure its summary prints."""

    def render(self, task: Any) -> Text:
        unit = task.fields.get("unit", "it")
        rate = task.fields.get("rate")
        last = task.fields.get("last")
        if rate is None and task.completed and last is not None and task.start_time is not None \
                and last > task.start_time:
            rate = task.completed / (last - task.start_time)
        return Text("–" if rate is None else f"{rate:,.1f} {unit}/s", style="cyan")


class RichReporter:
    """Progress bars for the library's `Reporter` protocol.

    Epoch lines are printed on a terminal or with `--verbose`; otherwise a run's epochs are summed up
    in one line when it ends (a log of 32 lines per run says little that the summary does not).
    """

    def __init__(self, verbose: bool = False) -> None:
        # On a terminal, live bars with the time left; in a log or a pipe (where rich prints each bar once,
        # as the command ends) one line per task: its count, rate and time taken, no row of bar glyphs.
        columns = (BarColumn(), MofNCompleteColumn(), _Rate(), TimeRemainingColumn()) if err.is_terminal else \
            (MofNCompleteColumn(), _Rate(), TextColumn("in"), TimeElapsedColumn())
        self.progress = Progress(
            TextColumn("[bold]{task.description:<8}"),
            *columns,
            console=err,
            transient=False,
            get_time=time.perf_counter,  # the clock the stages time their jobs with
        )
        self.tasks: dict[str, Any] = {}
        self.epoch_lines = verbose or err.is_terminal
        self.epochs: list[dict[str, Any]] = []  # this run's epoch records not printed: summed up at its end
        self.hinted = False

    def start(self, task: str, total: int | None, unit: str) -> None:
        if task == "epochs":
            self._epochs_summary()
        if task in self.tasks:  # the same work again (the next run of an experiment): one bar, restarted
            self.progress.reset(self.tasks[task], total=total, unit=unit, rate=None, last=None)
        else:
            self.tasks[task] = self.progress.add_task(task, total=total, unit=unit, rate=None, last=None)

    def advance(self, task: str, n: int) -> None:
        if task in self.tasks:
            self.progress.update(self.tasks[task], advance=n, last=time.perf_counter())
            if task == "epochs" and self.progress.tasks[self.tasks[task]].finished:
                self._epochs_summary()  # the run's last epoch: its summary now, before its result

    def note(self, message: str) -> None:
        self.progress.console.print(f"[yellow]{escape(message)}[/]", highlight=False)

    def event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "epoch":
            if self.epoch_lines:
                self.progress.console.print(epoch_line(data))
            else:
                self.epochs.append(data)
        elif kind == "finished" and data.get("task") in self.tasks and data.get("seconds"):
            self.progress.update(self.tasks[data["task"]], rate=data["items"] / data["seconds"])
        elif kind == "row":
            verb = "reused" if data["skipped"] else "trained"
            self.progress.console.print(f"{escape(data['label'])}: {verb} {data['run_id']}", highlight=False)

    def _epochs_summary(self) -> None:
        """One line for the epochs not printed (count, time, pace), and forget them."""
        records, self.epochs = self.epochs, []
        if not records:
            return
        text = f"trained {len(records)} epochs"
        if all(r.get("seconds") is not None for r in records):
            seconds = sum(float(r["seconds"]) for r in records)
            text += f" in {seconds:.1f} s"
            if all(r.get("samples") is not None for r in records) and seconds > 0:
                text += f", {sum(r['samples'] for r in records) / seconds:,.0f} samples/s"
        if not self.hinted:  # once per command
            text += " (pipeline -v … prints each epoch)"
            self.hinted = True
        self.progress.console.print(text)

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._epochs_summary()
        self.progress.stop()


def epoch_line(record: dict[str, Any]) -> str:
    """An epoch as one line: its loss and validation AUC, and its pace where the trainer measured it."""
    val_auc = record.get("val_auc", float("nan"))
    line = f"epoch {record['epoch']:>3}  loss {record['train_loss']:.4f}  val auc {val_auc:.4f}"
    if record.get("samples_per_s") is not None:
        line += f"  {record['samples_per_s']:,.0f} samples/s"
    if record.get("seconds") is not None:
        line += f"  {record['seconds']:.1f} s"
    return line


# --- pieces ----------------------------------------------------------------------------------


def error(message: str) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)


def alarm(text: str) -> None:
    """A banner for a sentence that says the numbers beside it mislead (a shortcut, a tiny test split).

    Printed with the numbers (stdout: a saved table keeps its alarm), and once per command however
    many results carry the same sentence."""
    if text in _alarmed:
        return
    _alarmed.add(text)
    label = "SHORTCUT" if text.startswith("Shortcut") else "WARNING"
    out.print(f"[bold white on red] {label} [/] [bold red]{escape(text)}[/]")


def warning(text: str) -> None:
    err.print(f"[bold yellow]warning[/]: {escape(text)}")


# An identifier column of the store's tables (run_id, sample_id, source_uri, model_key, text_hash,
# generator, ...): never cut, whatever it holds.
_IDENTIFIER = re.compile(r"(^|_)(id|ids|uri|key|path|hash|member|generator|checkpoint|fingerprint|shard)($|_)")
LABEL_MAX = 24  # a string column whose values are all this short is labels, not free text


def _kinds(table: pa.Table, cells: list[list[str]]) -> list[tables.Kind]:
    """What each column of a result holds, from its type (and, for strings, its name and values)."""
    found: list[tables.Kind] = []
    for i, field in enumerate(table.schema):
        t = field.type
        if pa.types.is_dictionary(t):
            t = t.value_type
        shown = [row[i] for row in cells]
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            found.append("label")  # `[0.1, 0.2, … (768 values)]`: may break between its items
        elif pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) or pa.types.is_temporal(t):
            found.append("number")
        elif pa.types.is_boolean(t) or _IDENTIFIER.search(field.name.lower()):
            found.append("token")
        elif not (pa.types.is_string(t) or pa.types.is_large_string(t)):
            found.append("text")  # bytes, structs, maps: shown as text
        elif all(v.isascii() and not any(ch.isspace() for ch in v) for v in shown):
            found.append("token")  # one ASCII word each: an id, a name, a URL (a caption in Japanese is text)
        else:
            found.append("label" if max(len(v) for v in shown) <= LABEL_MAX else "text")
    return found


def render_table(table: pa.Table, title: str | None = None, max_rows: int = 50,
                 whole: str = "--format csv or json") -> None:
    """A result table that fits the terminal (or records); `whole` says where cut text is shown whole."""
    # cells go to rich as Text (no markup), so only their control characters need showing as escapes
    rows = [[printable(cell(v)) for v in row.values()] for row in table.slice(0, max_rows).to_pylist()]
    columns = [Column(printable(name), kind) for name, kind in zip(table.column_names, _kinds(table, rows),
                                                                     strict=True)]
    shown = tables.show(out, columns, rows, printable(title) if title else None)
    if shown.cut:
        out.print(f"[dim]… marks text cut to fit {out.width} columns; {escape(whole)} shows it whole[/]")
    if table.num_rows > max_rows:
        out.print(f"[dim]… {table.num_rows - max_rows} more rows (use --format csv --output FILE)[/]")


def short_ids(table: pa.Table, width: int = 16) -> pa.Table:
    """Sample ids cut to a prefix that `--sample-id` still accepts, so tables fit a terminal."""
    if "sample_id" not in table.column_names:
        return table
    import pyarrow.compute as pc

    i = table.column_names.index("sample_id")
    # in Arrow, not through a Python list: pyarrow's first array made from Python imports pandas (0.2-0.5 CPU-s)
    short = pc.utf8_slice_codeunits(table.column(i).cast(pa.string()), 0, width)
    return table.set_column(i, "sample_id", short)


def cell(value: Any) -> str:
    if isinstance(value, list):
        if len(value) > 6:
            return "[" + ", ".join(f"{v:.4g}" if isinstance(v, float) else cell(v) for v in value[:4]) \
                + f", … ({len(value)} values)]"
        return "[" + ", ".join(cell(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, bytes):  # as DuckDB shows a BLOB (and as csv and json write it)
        from pipeline.stages.sql import blob_text

        return blob_text(value)
    return "NULL" if value is None else str(value)


def random_banner(random_weights: bool | None) -> None:
    if random_weights:
        out.print("[bold yellow]RANDOM-WEIGHT EMBEDDINGS[/]: the features come from a CLIP with random "
                  "weights; these metrics test the pipeline, they say nothing about CLIP.")


def _f(value: float | None, digits: int = 4) -> str:
    return f"{float('nan') if value is None else value:.{digits}f}"


def _size(n: int) -> str:
    """Bytes for people, in powers of 1000 (as `du --si`)."""
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000:
            return f"{n:,} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:,.1f} TB"


# --- any result as JSON (`--json`) -----------------------------------------------------------


def show_json(result: Any) -> None:
    """Any result as one JSON document on stdout; progress, notes and warnings stay on stderr (and the
    warnings are in the document too: results carry them). A result's `to_json()` is used where it has
    one (a typed, versioned form such as `RunMetrics`), else its fields."""
    out.file.write(json.dumps(plain(result), indent=2, allow_nan=False) + "\n")
    out.file.flush()


def plain(value: Any) -> Any:
    """`value` as JSON data: dataclasses by field (or their `to_json()`), Arrow tables as lists of rows,
    paths and times as text, NaN and infinities as null, numpy values as numbers."""
    import numpy as np
    import pyarrow as pa

    from pipeline.store.layout import Store

    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if callable(getattr(value, "to_json", None)):
        return plain(value.to_json())
    if isinstance(value, Store):
        return str(value.root)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.repr}
    if isinstance(value, pa.Table):
        return plain(value.to_pylist())
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, np.generic):
        return plain(value.item())
    if isinstance(value, dict):
        return {("/".join(map(str, k)) if isinstance(k, tuple) else str(k)): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(v) for v in value]
    if isinstance(value, datetime | date):
        return value.isoformat()
    return str(value)  # paths, and whatever else prints as what it is


# --- one renderer per result -----------------------------------------------------------------


def show_ingest(result: IngestResult) -> None:
    out.print(
        f"[green]ingested[/] {result.added} new samples "
        f"({', '.join(f'{k} {v}' for k, v in sorted(result.by_split.items())) or 'none'}); "
        f"{result.already_in_store} already in the store, {result.duplicates_in_source} duplicates in the source; "
        f"{result.units_skipped} source files unchanged since the last ingest (not read)"
        + (f"; {result.units_resumed} grown files read from where the last ingest stopped." if result.units_resumed
           else ".")
    )
    if result.missing_captions:
        out.print(f"[yellow]{result.missing_captions} new samples have no caption[/]: image+text training "
                  "leaves them out.")
    for (here, there), count in result.generator_mismatches.most_common(4):
        out.print(f"[yellow]{count} images are already in the store as {escape(repr(there))}[/], named "
                  f"{escape(repr(here))} here: check --generators (D3's gen_0..gen_3 follow the Parquet "
                  "model_gen0..3).")
    if result.unlabelled:
        out.print(f"{result.unlabelled} of them unlabelled (split 'unlabelled'): never trained on.")
    if result.labelled_unlabelled:
        out.print(f"{result.labelled_unlabelled} unlabelled samples were brought with a label and are now labelled.")
    for sentence in result.conflict_sentences:
        alarm(sentence)
    for reason, count in sorted(result.problems.items()):
        out.print(f"[yellow]quarantined[/] {count} × {escape(reason)} "
                  "(see: pipeline sql \"SELECT * FROM quarantine\")")
    if result.rechecked:
        found = sum(result.resolved.values())
        out.print(f"The real-images folder changed: {result.rechecked} rows whose image was missing looked up again, "
                  f"{found} found and ingested (the source files themselves were not read again).")


def show_encode(result: EncodeResult) -> None:
    for text in result.warnings:
        warning(text)
    if result.random_weights:
        out.print("[bold yellow]RANDOM WEIGHTS[/]: no pretrained checkpoint was given; these vectors "
                  "carry no meaning beyond testing the pipeline.")
    if result.nothing_to_do:
        out.print(f"[green]nothing to encode[/]: every image and text is cached for {escape(result.model_key)} "
                  "(0 forward passes).")
        return
    out.print(
        f"[green]encoded[/] {result.images_encoded} images and {result.texts_encoded} texts with "
        f"{escape(result.model_key)} on {result.device} ({result.images_per_second:,.1f} img/s); "
        f"{len(result.shards)} shards written."
    )
    for reason, count in sorted(result.quarantined.items()):
        out.print(f"[yellow]quarantined[/] {count} × {escape(reason)}")


def show_sql(result: SqlResult) -> None:
    if result.written is not None:
        err.print(f"[green]wrote[/] {result.rows} rows to {escape(str(result.written))}")
    elif result.table is not None:  # (csv and json went to stdout as they streamed)
        render_table(result.table, max_rows=result.table.num_rows)
        if result.more:
            out.print("[dim]… more rows not shown (--max-rows N shows more; --format csv --output FILE "
                      "exports them all)[/]")


def show_status(result: StoreStatus) -> None:
    out.print(f"[bold]{result.samples}[/] samples")
    render_table(result.by_split_label_generator, "samples by split, label, generator")
    if result.quarantine_by_reason.num_rows:
        render_table(result.quarantine_by_reason, "quarantine")
    if result.without_text:
        out.print(f"[yellow]{result.without_text} samples have no text[/] (no caption, no imported text vector): "
                  "image+text training leaves them out.")
    columns = [Column("model_key", "token"), Column("weights", "token"), *(
        Column(name, "number") for name in ("images done", "images pending", "texts done", "texts pending"))]
    rows = [[m.model_key, Text("random", style="yellow") if m.random_weights else "pretrained",
             str(m.images_encoded), str(m.images_pending), str(m.texts_encoded), str(m.texts_pending)]
            for m in result.models]
    tables.show(out, columns, rows, "embeddings by model")
    if result.derived is not None and result.derived.num_rows:
        render_table(result.derived, "runs (best test AUC), indexes (vectors, recall@10), leak scans")


def show_import(result: ImportResult) -> None:
    out.print(f"[green]imported[/] {result.samples_added} samples and {result.vectors_added} vectors "
              f"as {escape(result.model_key)}; {result.already_present} samples were already present"
              + (f"; {result.units_skipped} unchanged files skipped unread." if result.units_skipped else "."))
    if result.label_conflicts:
        alarm(f"{result.label_conflicts} contents came under two labels: a content the store held keeps its label, "
              "one met twice in this import is used as neither. `pipeline conflicts list` shows them; "
              "`pipeline conflicts resolve SAMPLE --label real|generated|none` decides one (`--undo` reverses it).")
    for reason, count in sorted(result.quarantined.items()):
        out.print(f"[yellow]quarantined[/] {count} × {escape(reason)} "
                  "(see: pipeline sql \"SELECT * FROM quarantine WHERE stage = 'import'\")")
    if result.image_paths_unread:
        why = ", ".join(f"{escape(r)} {n}" for r, n in sorted(result.image_paths_unread.items()))
        out.print(f"[yellow]{sum(result.image_paths_unread.values())} image_path values were not read[/] ({why}); "
                  "those rows keep features-only ids; --images DIR allows a folder you trust.")


def show_train(result: TrainResult) -> None:
    m = result.metrics
    for text in result.warnings:
        warning(text)
    random_banner(m.random_weights)
    out.print(f"[green]run[/] {result.run_id}: {m.chosen}, val AUC {_f(m.val.auc)}, test AUC {_f(m.test.auc)}, "
              f"AP {_f(m.test.ap)}, accuracy {_f(m.test.accuracy)}")
    for gen, value in m.test.auc_by_generator.items():
        out.print(f"  {escape(gen)}: test AUC {_f(value)}")
    if result.compute is not None:
        out.print(f"[dim]{escape(result.compute.precision_why)}; {escape(result.compute.threads_why)}[/]")
    out.print(f'[dim]scores: pipeline sql "SELECT * FROM scores WHERE run_id = \'{result.run_id}\' LIMIT 10"[/]')
    if m.left_out.no_image_vector:
        out.print(f"[yellow]left out[/] {m.left_out.no_image_vector} samples without an image vector for this "
                  "model (not encoded yet, or quarantined at decode: `pipeline status` shows which).")
    if m.left_out.no_text_vector:
        out.print(f"[yellow]left out[/] {m.left_out.no_text_vector} samples without a text vector "
                  f"({m.features} features need one): an empty or missing caption, or a caption "
                  "not encoded yet; --features image keeps them.")
    for text in result.alarms:
        alarm(text)


def show_sweep(result: SweepResult) -> None:
    columns = [Column("run_id", "token"), Column("options", "label"), Column("status", "label"),
               Column("val AUC", "number"), Column("test AUC", "number")]
    rows = []
    for row in result.rows:
        status = ("skipped (exists)" if row.skipped else "trained" if row.stopped_after is None
                  else f"stopped after {row.stopped_after} reports (asha)")
        rows.append([row.run_id, ", ".join(f"{k}={v}" for k, v in row.overrides.items()), status,
                     cell(row.val_auc), cell(row.test_auc)])
    tables.show(out, columns, rows, "sweep")
    out.print(f"open_clip imported by this sweep: {'yes' if result.open_clip_imported else 'no'}")


def show_experiment(result: ExperimentResult) -> None:
    """The table from its cells (never from its Markdown, which carries the alarms too), alarms once."""
    out.print(Text(f"{result.table}: test ROC AUC per generator and overall", style="bold"))
    random_banner(any(run.random_weights for _, run in result.rows))
    seeds = max((len(v) for v in result.seed_runs.values()), default=1)
    if result.rows:
        run0 = result.rows[0][1]
        out.print(f"Model key {escape(run0.model_key)}, text pairing {escape(str(run0.metrics.pairing))}. Cells: "
                  + (f"AUC × 100 [95% group-bootstrap interval of the first seed]; mean ± sd over {seeds} seeds."
                     if seeds > 1 else "AUC × 100 [95% group-bootstrap interval]."))
        excluded = run0.metrics.excluded_leaks
        if excluded:
            out.print(f"Leaking samples left out of the metrics (near-duplicates of an earlier split): "
                      f"{excluded.get('val', 0)} val, {excluded.get('test', 0)} test.")
    for note in result.notes:
        out.print(escape(note.replace("`", "")))
    _experiment_table(result)
    for text in [*result.alarms, *result.warnings]:  # shortcuts, then how far the numbers can be read
        alarm(text)
    runs = [r for seeded in result.seed_runs.values() for r in seeded]
    if result.table == "robustness":  # one run, which trained nothing here: it scored the perturbed copies
        scored = sum(label != "none" for label, _ in result.rows)
        out.print(f"run {escape(result.rows[0][1].run_id) if result.rows else '-'} scored {scored} "
                  f"perturbation{'' if scored == 1 else 's'} of its test split in {result.seconds:.1f} s "
                  "(no run trained).")
    else:
        out.print(f"{sum(not r.skipped for r in runs)} runs trained, {sum(r.skipped for r in runs)} reused, "
                  f"in {result.seconds:.1f} s.")
    out.print(f"[green]wrote[/] {escape(str(result.path))} and {escape(str(result.page))}")


def _experiment_table(result: ExperimentResult) -> None:
    """The widest layout that fits: cells on one line, then a value over its interval, then the interval's
    ends on lines of their own; each first with the run ids in a column, then with them listed below.
    Records when none fits. No layout cuts a number or a run id."""
    from pipeline.compositions.experiment import cell_text

    columns = [Column("perturbation" if result.table == "robustness" else "method", "label"),
               *(Column("overall" if c == "all" else c, "number") for c in result.columns), Column("run", "token")]
    for lines in (1, 2, 3):
        rows = [[label, *(_stacked(cell_text(result, label, i), lines) for i in range(len(result.columns))),
                 run.run_id] for label, run in result.rows]
        if (fitted := tables.grid(columns, rows, out.width)) is not None:
            out.print(fitted[0])
            return
        if (fitted := tables.grid(columns[:-1], [r[:-1] for r in rows], out.width)) is not None:
            out.print(fitted[0])
            for label, run in result.rows:  # the run ids whole, below the table they did not fit in
                out.print(f"  {escape(label)}: {run.run_id}")
            return
    out.print(tables.records(columns, rows))


def _stacked(cell: str, lines: int) -> str:
    """`80.00 [45.42, 100.00]; 80.12 ± 1.23` on one line, on one line per part, or with each number
    of the interval and spread on its own line."""
    if lines == 1:
        return cell
    cell = cell.replace(" [", "\n[").replace("; ", "\n")
    return cell if lines == 2 else cell.replace(", ", ",\n").replace(" ± ", "\n± ")


def show_perturb(result: PerturbResult) -> None:
    for op, n in result.by_op.items():
        out.print(f"  {escape(op)}: {n} new samples")
    out.print(f"[green]derived[/] {result.derived} samples ({result.existing} already derived, "
              f"{result.undecodable} sources undecodable) in {result.seconds:.1f} s; "
              "next: `pipeline encode` (encodes only the new images), then `pipeline experiment robustness --run RUN`.")


def show_score(result: ScoreResult) -> None:
    unlabelled = f", {result.unlabelled} of them unlabelled" if result.unlabelled else ""
    out.print(f"[green]scored[/] {result.scored} samples with run {result.run_id}{unlabelled} "
              f"({result.already_scored} already had a score).")
    for why, n in result.not_scored.items():
        out.print(f"[yellow]not scored[/] {n} samples: {escape(why)}.")


def show_conflicts(result: ConflictsResult) -> None:
    if result.decided:
        out.print(f"[green]decided[/]: {escape(result.decided)}")
    elif not result.conflicts.num_rows:
        out.print("No label conflicts: no image was brought under two labels.")
        return
    shown = result.conflicts.select(["sample_id", "split", "label", "generator", "stored_label", "claimed_label",
                                     "claimed_generator", "claims", "status"])
    render_table(short_ids(shown), None if result.decided else "label conflicts (label: as training uses it now)",
                 whole="pipeline sql \"SELECT * FROM conflicts\"")


def show_index(info: IndexInfo, target_recall: float) -> None:
    verb = "built" if info.built else "up to date (embeddings unchanged), reused"
    out.print(f"[green]{verb}[/] {info.kind} index {info.index_id}: {info.vectors:,} × {info.dim} "
              f"{info.modality} vectors of {escape(info.model_key)}, params {escape(str(info.params))}, "
              f"{info.build_seconds:.2f} s")
    if info.kind == "flat":
        return
    tried = ", ".join(f"{b}: {r:.3f}" for b, r in info.recall_by_breadth.items())
    by = f" (by search breadth {tried})" if tried else ""
    depths = info.params.get("recall_by_rerank") or {}
    if depths:
        by += f"; re-ranking {info.params['rerank']} candidates exactly (by depth " + \
            ", ".join(f"{d}: {r:.3f}" for d, r in depths.items()) + ")"
    out.print(f"recall@10 against exact search: {info.recall_at_10:.4f}{by}")
    if info.built and info.recall_at_10 is not None and info.recall_at_10 < target_recall:
        out.print(f"[yellow]below the target {target_recall}:[/] no wider search or deeper re-ranking reached "
                  "it (these vectors' neighbours are hard to tell apart); --kind flat searches exactly, and a "
                  "larger --max-memory lets auto keep more of each vector.")


_WHOLE_TEXT = 'pipeline sql "SELECT sample_id, text FROM samples WHERE sample_id LIKE \'PREFIX%\'"'


def show_neighbors(result: NeighborResult, k: int, modality: str) -> None:
    random_banner(result.random_weights)
    render_table(short_ids(result.rows), title=f"{k} nearest {modality} neighbours of {result.query} "
                                               f"({result.index_kind} index, {result.model_key})",
                 whole=_WHOLE_TEXT)


def show_leaks(result: LeakResult) -> None:
    random_banner(result.random_weights)
    approx = "" if result.index_kind == "flat" else f" (approximate {result.index_kind} index, recall@10 " \
        f"{result.recall_at_10:.3f}; --exact searches exhaustively)"
    out.print(f"searched {result.queries:,} val/test images at similarity ≥ {result.threshold}{approx}: "
              f"{result.pair_count:,} cross-split pairs")
    if result.by_split_pair.num_rows:
        render_table(result.by_split_pair, title="pairs per split pair")
    out.print(f'[dim]pipeline sql "SELECT * FROM leaks WHERE threshold = {result.threshold} ORDER BY similarity '
              'DESC"; train/experiment/report take --exclude-leaks[/]')


def show_report(result: ReportResult) -> None:
    for text in [*result.alarms, *result.warnings]:
        alarm(text)
    out.print(f"[green]wrote[/] {escape(str(result.page))} with {', '.join(f.name for f in result.files)}")


def show_landscape(result: LandscapeResult) -> None:
    for s in result.surfaces:
        rec = "–" if s.recorded_eval_loss is None else f"{s.recorded_eval_loss:.6f}"
        out.print(f"{escape(s.label)}: loss at the trained weights {s.centre_loss:.6f} (run recorded {rec}); "
                  f"range {s.losses.min():.4f} … {s.losses.max():.4f}")
    out.print(f"[green]wrote[/] {escape(str(result.png))} and {escape(str(result.data))}")


def show_models(tags: dict[str, list[str]]) -> None:
    rows = [[name, ", ".join(found) or Text("(random weights / local checkpoint)", style="dim")]
            for name, found in tags.items()]
    tables.show(out, [Column("architecture", "token"), Column("pretrained tags", "label")], rows)


def show_rebuild(result: Reconciled) -> None:
    out.print(f"[green]rebuilt[/] the catalog from {result.added} shards.")
    for rel in result.ignored:
        out.print(f"[yellow]left out[/] {escape(rel)}: it is not a readable shard of this pipeline; "
                  "`pipeline verify` says why and `pipeline verify --repair` moves it aside.")
    for d in result.doubled:
        out.print(f"[red]doubled[/]: {d.rows} rows of {escape(d.table)} repeat a key an earlier row holds (two "
                  f"writers at once), in {len(d.shards)} shards; `pipeline verify --repair` keeps one of each.")


def show_verify(result: VerifyResult, store: Path, repair: bool) -> None:
    out.print(f"checked {result.shards_checked} shards, {result.rows_checked} rows.")
    if result.healthy:
        out.print("[green]no damage found[/]")
        return
    for d in result.doubled:
        done = (f"kept one of each: {len(d.shards)} shards rewritten without the copies (the originals moved "
                "to damaged/)" if repair else "run `pipeline verify --repair` to keep one of each")
        out.print(f"[red]doubled[/]: {d.rows} rows of {escape(d.table)} repeat a key an earlier row holds (two "
                  f"writers at once), in {', '.join(escape(s) for s in d.shards[:3])}"
                  f"{' …' if len(d.shards) > 3 else ''}; {done}.")
    if not result.damaged:
        return
    render_table(pa.table({
        "shard": [d.path for d in result.damaged],
        "in views": ["yes" if d.committed else "no" for d in result.damaged],
        "problem": [d.problem for d in result.damaged],
        "rows": [d.rows for d in result.damaged],
        "then": [d.remedy for d in result.damaged],
    }), title="damaged shards")
    if repair:
        out.print(f"[green]moved[/] {len(result.repaired)} files to {escape(str(store / 'damaged'))}; rerun the "
                  "stages named above to restore what they held.")
    else:
        out.print("run `pipeline verify --repair` to move them aside.")


def show_runs(result: RunList) -> None:
    if not result.runs:
        out.print("No runs yet: `pipeline train` makes one.")
        return
    # The id says when (UTC); one column says what was trained (the pairing when not the default);
    # `--json` has every field apart.
    many = f"{len(result.runs)} run{'s' if len(result.runs) != 1 else ''}"
    columns = [Column("run_id", "token"), Column("name", "text"), Column("detector", "label"),
               *(Column(split, "number") for split in ("val", "test")), Column("alarms", "number")]
    rows = []
    for r in result.runs:
        mark = "*" if r.random_weights else ""
        what = f"{r.detector} {r.features}" + (f" {r.pairing}" if r.pairing != "as-ingested" else "")
        rows.append([r.run_id, r.name or "–", what, _f(r.val_auc) + mark, _f(r.test_auc) + mark,
                     Text(str(r.alarms), style="bold red") if r.alarms else "0"])
    tables.show(out, columns, rows, f"{many}, newest first; val and test ROC AUC")
    if any(r.random_weights for r in result.runs):
        out.print("[yellow]*[/] random-weight embeddings: these AUCs test the pipeline, they say nothing about CLIP.")
    out.print("[dim]pipeline runs show RUN · pipeline runs rm RUN …[/]")


def show_run(result: RunDetail) -> None:
    from pipeline.present.html import NOT_INFORMATIVE, interval, pct
    from pipeline.present.names import metric_name, short_metric_name

    r, m = result.row, result.metrics
    out.print(f"[bold]run {r.run_id}[/]" + (f" ({escape(r.name)})" if r.name else "")
              + f", created {r.created_at:%Y-%m-%d %H:%M} UTC")
    out.print(f"{r.detector} on {r.features} features of {escape(r.model_key)}, pairing {r.pairing}; {m.chosen}")
    random_banner(r.random_weights)
    for text in (a.sentence for a in m.alarms):
        alarm(text)
    keys = ("auc", "ap", "balanced_acc", "eer", "tpr_at_fpr_1")
    degenerate = False
    for split in ("val", "test"):
        metrics = m.split(split)
        if not metrics.n:
            continue
        title = (f"{split}: {metrics.n} samples" + (f", {metrics.groups} groups" if metrics.groups else "")
                 + " (×100, 95% interval)")
        columns = [Column("generator", "token"), *(Column(short_metric_name(k), "number") for k in keys),
                   Column("n", "number")]
        cells = []
        for generator in ["all", *metrics.generators]:
            found = [metrics.estimate(k, generator) for k in keys]
            n = next((e.n for e in found if e is not None), None)
            texts = []
            for e in found:
                bounds = None if e is None else interval(e.lo, e.hi)
                degenerate |= bounds == NOT_INFORMATIVE
                texts.append("–" if e is None else pct(e.value) + ("" if bounds is None else " n.i."
                                                                   if bounds == NOT_INFORMATIVE else f" {bounds}"))
            cells.append((generator, texts, "–" if n is None else str(n)))
        out.print(Text(title, style="bold"))
        for lines in (1, 2, 3):  # the widest layout that fits: a value and its interval apart, then each number
            rows = [[g, *(_stacked(c, lines).replace(" n.i.", "\nn.i." if lines > 1 else " n.i.") for c in texts), n]
                    for g, texts, n in cells]
            if (fitted := tables.grid(columns, rows, out.width)) is not None:
                out.print(fitted[0])
                break
        else:
            out.print(tables.records(columns, rows))
    out.print("[dim]" + "; ".join(f"{short_metric_name(k)}: {metric_name(k)}" for k in keys
                                  if short_metric_name(k) != metric_name(k))
              + ("; n.i.: interval not informative (every bootstrap replicate gave the same value)" if degenerate
                 else "") + "[/]")
    tables.show(out, [Column("option", "token"), Column("value", "text")],
                [[key, cell(value)] for key, value in sorted(result.config.items())], "config")
    tables.show(out, [Column("path", "token"), Column("size", "number"), Column("in views", "label")],
                [[f.path, _size(f.bytes), "yes" if f.committed else ""] for f in result.files],
                f"files ({_size(result.bytes)})")
    out.print(f"report: {escape(str(result.report))}" if result.report
              else f"[dim]no report yet: pipeline report --run {r.run_id}[/]")


def show_runs_removed(result: RunsRemoved) -> None:
    rows = ", ".join(f"{n:,} {table}" for table, n in sorted(result.rows.items()))
    out.print(f"[green]removed[/] {len(result.run_ids)} run{'s' if len(result.run_ids) != 1 else ''} "
              f"({', '.join(result.run_ids)}): {result.files} files, {_size(result.bytes)}; rows taken out of the "
              f"views: {rows}.")


def show_clean(result: CleanResult) -> None:
    verb = "would free" if result.dry_run else "freed"
    if result.freed:
        tables.show(out, [Column(verb, "label"), Column("files", "number"), Column("size", "number")],
                    [[f.what, f"{f.files:,}", _size(f.bytes)] for f in result.freed])
    out.print(f"[green]{verb}[/] {result.files:,} files, {_size(result.bytes)}"
              + (" (nothing was removed: run without --dry-run to free it)." if result.dry_run else "."))
    if result.adopted:
        adopted = "are waiting to be committed by the next writer" if result.dry_run else "were committed"
        out.print(f"{result.adopted} staged shards of finished workers {adopted} (they are data, not garbage).")
    for k in (k for k in result.kept if k.files):
        out.print(f"[dim]kept[/] {escape(k.what)}: {k.files:,} files, {_size(k.bytes)} ({escape(k.note or '')}).")


def demo_intro() -> None:
    out.rule("[bold]pipeline demo")
    out.print("[bold yellow]Synthetic data, random weights.[/] The images are drawn by numpy and the "
              "CLIP model is a tiny open_clip config with random weights; nothing here is a real result.")


def show_demo(result: DemoResult) -> None:
    root = result.store.root
    ing = result.ingested
    out.print(f"[green]ingest[/]: {ing.added} samples from {result.data.rows} D3 rows; "
              f"quarantined {dict(ing.problems)} (a D3 row without its LAION image is reported, not dropped).")
    out.print("[green]encode, first run[/]:", end=" ")
    show_encode(result.encoded)
    out.print("[green]encode, second run[/]:", end=" ")
    show_encode(result.encoded_again)
    run = result.trained
    out.print(f"[green]train[/] (CVaR + AUC + SAM on image+text, from the cache, no CLIP call): run {run.run_id}, "
              f"test AUC {_f(run.metrics.test.auc, 3)} "
              "[yellow](random-weight CLIP on synthetic images: a pipeline check, not a result)[/]")
    for text in run.alarms:  # the run's stored alarms (the report page shows them too)
        alarm(text)
    show_status(result.status)
    for title, query, table in result.queries:
        out.print(f"[dim]$ pipeline sql --store {escape(str(root))} \"{escape(query)}\"[/]")
        render_table(table, title)
    nb = result.neighbours
    out.print(f"[dim]$ pipeline neighbors --store {escape(str(root))} --sample-id {nb.query[:12]} -k 3 "
              f"--run {run.run_id}[/]")
    render_table(short_ids(nb.rows), f"nearest images of a test sample ({nb.index_kind} FAISS index)",
                 whole=_WHOLE_TEXT)
    out.print(f"[green]report[/]: {escape(str(result.report.page))} (ROC, AUC per generator, score histograms, "
              "confusion)")
    example = "SELECT * FROM samples LIMIT 5"
    out.print(f"Store: {escape(str(root))}  (try: pipeline sql --store {escape(str(root))} \"{example}\")")


def show_predict(result: PredictResult) -> None:
    random_banner(result.random_weights)
    for text in result.warnings:
        warning(text)
    rows = result.rows
    if result.output is None and rows.num_rows:
        shown = rows.select(["path", "score", "generated", "probability", "ood", "reason"])
        render_table(shown, f"predictions (score > {result.threshold:.3f}: generated)", max_rows=rows.num_rows,
                     whole="--output FILE.csv|json|parquet")
        if result.inputs > rows.num_rows:
            out.print(f"[dim]… {result.inputs - rows.num_rows} more rows: --output FILE.csv|json|parquet writes "
                      "them all[/]")
        if "neighbours" in rows.column_names and rows.column("neighbours").null_count < rows.num_rows:
            for row in rows.select(["path", "neighbours"]).to_pylist():
                near = ", ".join(f"{n['generator'] or 'unlabelled'} ({n['split']}, {n['similarity']:.3f})"
                                 for n in row["neighbours"] or [])
                out.print(f"  {escape(row['path'])}: nearest training images {escape(near) or 'none'}")
    out.print(f"[green]predicted[/] {result.inputs} images with {escape(result.source)} in {result.seconds:.1f} s "
              f"({result.images_per_second:,.1f} img/s): {result.scored} scored, {result.generated} called "
              f"generated (score > {result.threshold:.3f}); {result.cached} vectors from the store, "
              f"{result.encoded} encoded now.")
    if result.flagged:
        ood = result.ood
        rule = f" (similarity below {ood.threshold:.3f}, percentile {ood.percentile:g} of validation images')" \
            if ood is not None else ""
        out.print(f"[yellow]{result.flagged} images are far from every training image[/]{rule}: their scores are "
                  "unreliable (column ood).")
    for reason, n in sorted(result.reasons.items()):
        out.print(f"[yellow]no score[/] {n} × {escape(reason)} (column reason, detail)")
    if result.output is not None and result.parts:
        resumed = f"; {result.resumed} images were in parts of an earlier run, skipped" if result.resumed else ""
        out.print(f"[green]wrote[/] {escape(str(result.output))}/: {result.parts} Parquet parts on {result.engine}"
                  f"{resumed}")
    elif result.output is not None:
        out.print(f"[green]wrote[/] {escape(str(result.output))}")
    if result.kept is not None:
        k = result.kept
        out.print(f"[green]kept[/] {k['images']} image and {k['texts']} caption vectors, {k['samples']} images as "
                  "unlabelled samples (never trained on): predicting them again is a lookup.")


def show_export(result: ExportResult) -> None:
    random_banner(result.random_weights)
    out.print(f"[green]exported[/] run {escape(result.run_id)} to {escape(str(result.folder))}: "
              + ", ".join(f.name for f in result.files)
              + f". `pipeline predict IMAGES --detector {escape(str(result.folder))}` uses it without a store.")
    for text in result.alarms:
        alarm(text)
