"""The terminal: rich progress bars behind the `Reporter` protocol, tables, and stage results as text.

Everything the CLI shows goes through here; stages return data and never print.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

out = Console()
err = Console(stderr=True)


class _Rate(ProgressColumn):
    def render(self, task: Any) -> Text:
        unit = task.fields.get("unit", "it")
        return Text(f"{task.speed or 0:,.1f} {unit}/s", style="cyan")


class RichReporter:
    """Progress bars for the library's `Reporter` protocol."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description:<8}"),
            BarColumn(),
            MofNCompleteColumn(),
            _Rate(),
            TimeRemainingColumn(),
            console=err,
            transient=False,
        )
        self.tasks: dict[str, Any] = {}

    def start(self, task: str, total: int | None, unit: str) -> None:
        self.tasks[task] = self.progress.add_task(task, total=total, unit=unit)

    def advance(self, task: str, n: int) -> None:
        if task in self.tasks:
            self.progress.advance(self.tasks[task], n)

    def note(self, message: str) -> None:
        self.progress.console.print(f"[yellow]{message}[/]", highlight=False)

    def event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "epoch":
            val_auc = data.get("val_auc", float("nan"))
            self.progress.console.print(
                f"epoch {data['epoch']:>3}  loss {data['train_loss']:.4f}  val auc {val_auc:.4f}", highlight=False)
        elif kind == "row":
            verb = "reused" if data["skipped"] else "trained"
            self.progress.console.print(f"{data['label']}: {verb} {data['run_id']}", highlight=False)

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()


def render_table(table: pa.Table, title: str | None = None, max_rows: int = 50) -> None:
    view = Table(title=title, header_style="bold", title_justify="left")
    for name in table.column_names:
        view.add_column(name, overflow="fold")
    for row in table.slice(0, max_rows).to_pylist():
        view.add_row(*(cell(v) for v in row.values()))
    out.print(view)
    if table.num_rows > max_rows:
        out.print(f"[dim]… {table.num_rows - max_rows} more rows (use --format csv --output FILE)[/]")


def short_ids(table: pa.Table, width: int = 16) -> pa.Table:
    """Sample ids cut to a prefix that `--sample-id` still accepts, so tables fit a terminal."""
    if "sample_id" not in table.column_names:
        return table
    i = table.column_names.index("sample_id")
    short = pa.array([None if v is None else v[:width] for v in table.column(i).to_pylist()], pa.string())
    return table.set_column(i, "sample_id", short)


def cell(value: Any) -> str:
    if isinstance(value, list) and len(value) > 6:
        head = ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in value[:4])
        return f"[{head}, … ({len(value)} values)]"
    if isinstance(value, float):
        return f"{value:.6g}"
    return "NULL" if value is None else str(value)


def show_status(result: Any) -> None:
    out.print(f"[bold]{result.samples}[/] samples")
    render_table(result.by_split_label_generator, "samples by split, label, generator")
    if result.quarantine_by_reason.num_rows:
        render_table(result.quarantine_by_reason, "quarantine")
    if getattr(result, "missing_captions", 0):
        out.print(f"[yellow]{result.missing_captions} samples have no caption[/]: image+text training leaves "
                  "them out.")
    view = Table(title="embeddings by model", header_style="bold", title_justify="left")
    view.add_column("model_key", overflow="fold")
    for col in ("weights", "images done", "pending", "texts done", "pending"):
        view.add_column(col, justify="right")
    for m in result.models:
        weights = "[yellow]random[/]" if m.random_weights else "pretrained"
        view.add_row(m.model_key, weights, str(m.images_encoded), str(m.images_pending),
                     str(m.texts_encoded), str(m.texts_pending))
    out.print(view)
    if result.derived is not None and result.derived.num_rows:
        render_table(result.derived, "runs (best test AUC), indexes (vectors, recall@10), leak scans")


def print_encode_result(result: Any) -> None:
    if result.random_weights:
        out.print("[bold yellow]RANDOM WEIGHTS[/]: no pretrained checkpoint was given; these vectors "
                  "carry no meaning beyond testing the pipeline.")
    if result.nothing_to_do:
        out.print(f"[green]nothing to encode[/]: every image and text is cached for {result.model_key} "
                  "(0 forward passes).")
        return
    out.print(
        f"[green]encoded[/] {result.images_encoded} images and {result.texts_encoded} texts with "
        f"{result.model_key} on {result.device} ({result.images_per_second:,.1f} img/s); "
        f"{len(result.shards)} shards written."
    )
    for reason, count in sorted(result.quarantined.items()):
        out.print(f"[yellow]quarantined[/] {count} × {reason}")


def random_banner(random_weights: bool | None) -> None:
    if random_weights:
        out.print("[bold yellow]RANDOM-WEIGHT EMBEDDINGS[/]: the features come from a CLIP with random "
                  "weights; these metrics test the pipeline, they say nothing about CLIP.")
