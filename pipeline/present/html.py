"""Static HTML pages: one stylesheet for phones and desktops, escaped cells, tables of metrics × 100 with
their intervals, the random-weights banner, and the index of every report in `STORE/reports/`."""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# the one rule for rates and intervals, shared with Markdown, the terminal and alarm sentences (re-exported)
from pipeline.evaluation.numbers import NOT_INFORMATIVE, NOT_INFORMATIVE_WHY, interval, pct
from pipeline.evaluation.numbers import degenerate as degenerate
from pipeline.evaluation.numbers import estimate_text as estimate_text
from pipeline.evaluation.results import RunMetrics, SplitMetrics
from pipeline.present.names import PERCENT_KEYS, metric_name
from pipeline.store.atomic import write_text

RANDOM_NOTE = ("Embeddings from a CLIP with RANDOM weights (and, in the demo, synthetic images): these "
               "figures test the pipeline; they are not results about CLIP.")

# Tables sit in a horizontally scrolling box (a phone scrolls the table, not the page) with the row
# label column pinned; figures never grow beyond their own pixels (blurry) nor beyond the screen.
_CSS = """*{box-sizing:border-box}
body{font:16px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1120px;
padding:12px 16px 48px;color:#1d1d1f;-webkit-text-size-adjust:100%;text-size-adjust:100%}
h1{font-size:1.6em;line-height:1.25;overflow-wrap:anywhere}h2{font-size:1.25em;margin-top:1.6em}
code{overflow-wrap:anywhere}
.scroll{overflow-x:auto;max-width:100%;margin:.6em 0}
table{border-collapse:separate;border-spacing:0;font-variant-numeric:tabular-nums}
td,th{border:solid #ccc;border-width:0 1px 1px 0;padding:4px 8px;text-align:right;white-space:nowrap;
vertical-align:top}
tr:first-child>*{border-top-width:1px}
th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left;white-space:normal;min-width:6em;max-width:16em;
position:sticky;left:0;background:#fff;border-left-width:1px;z-index:1}
th:first-child{background:#f3f3f3}
.warn{background:#fff3cd;border:1px solid #e0c060;padding:.6em}
.alarm{background:#f8d7da;border:2px solid #c0392b;color:#721c24;padding:.7em;font-weight:600}
pre{background:#f7f7f7;padding:.6em;overflow:auto;font-size:13px}
img{max-width:100%;height:auto}
.figs{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,460px),1fr));gap:16px;
align-items:start;margin:1em 0}
.figs img{width:100%;max-width:640px;display:block}
img.wide,img.wide.broad{display:block;margin:1em 0;width:auto;max-width:100%}
.side{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}.side img{flex:1 1 320px;max-width:640px}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(330px,100%),1fr));gap:.8em}
.card{margin:0;border:1px solid #ddd;padding:.4em;font-size:13px;background:#fafafa;overflow-wrap:anywhere}
.card.wrong{border:2px solid #c0392b}
.pair{display:flex;gap:4px}
.pair img,.nothumb{width:calc(50% - 2px);max-width:160px;aspect-ratio:1;height:auto;object-fit:contain;
background:#eee}
.nothumb{display:flex;align-items:center;justify-content:center;color:#888;text-align:center}
.ci{font-size:12px;color:#555}.sd{font-size:12px;color:#1f5fa0}.mean{color:#1f5fa0}
.na{font-style:italic;color:#8a6d00;display:inline-block;white-space:normal;max-width:7.5em;line-height:1.2}
.index td,.index th{text-align:left}.index code{overflow-wrap:normal;font-size:13px}
code.run{font-size:11px;color:#666}
table{line-height:22px}
@media (max-width:600px){body{padding:8px 10px 32px}h1{font-size:1.35em}
td,th{padding:3px 6px}td:first-child,th:first-child{min-width:7.5em;max-width:11em}}"""


def page(title: str, body: list[str]) -> str:
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{e(title)}</title><style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def banner(random_weights: Any) -> str:
    return f'<p class="warn">{RANDOM_NOTE}</p>' if random_weights else ""


def scroll(table_html: str) -> str:
    """A table in a box that scrolls sideways when the screen is narrower than the table."""
    return f"<div class='scroll'>{table_html}</div>"


def table(header: list[str], rows: list[list[Any]], escape_last: bool = True) -> str:
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{v if (not escape_last and i == len(r) - 1) else e(v)}</td>" for i, v in enumerate(r))
        + "</tr>" for r in rows)
    return scroll(f"<table><tr>{head}</tr>{body}</table>")


def raw_table(header: list[str], rows: list[list[str]], css_class: str = "results") -> str:
    """A table whose cells are HTML already (escape what goes into them)."""
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{v}</td>" for v in r) + "</tr>" for r in rows)
    return scroll(f"<table class='{css_class}'><tr>{head}</tr>{body}</table>")


# --- numbers ---------------------------------------------------------------------------------------


def estimate(value: Any, lo: Any = None, hi: Any = None, spread: tuple[float, float] | None = None) -> str:
    """A cell: the value in bold, its interval below it in small type. With seeds (`spread`: mean, sd) the
    mean ± sd is what the cell says, in bold, and the first seed's value and interval follow in small type."""
    bounds = interval(lo, hi)
    if bounds == NOT_INFORMATIVE:
        ci = f"<span class='ci na' title='{e(NOT_INFORMATIVE_WHY)}'>{NOT_INFORMATIVE}</span>"
    else:
        ci = "" if bounds is None else f"<span class='ci'>{bounds}</span>"
    if spread is not None:
        first = f"<span class='ci'>first seed {pct(value)}</span>"
        return f"<b class='mean'>{pct(spread[0])} ± {pct(spread[1])}</b><br>{first}" + (f"<br>{ci}" if ci else "")
    return f"<b>{pct(value)}</b>" + (f"<br>{ci}" if ci else "")


def metric_row(name: str, m: SplitMetrics) -> list[Any]:
    return [name, m.n, pct(m.auc), pct(m.ap), pct(m.accuracy)]


def history(metrics: RunMetrics) -> str:
    history = metrics.history
    if not history:
        by_k = metrics.val_auc_by_k
        return table(["k", metric_name("val_auc")], [[k, pct(v)] for k, v in by_k.items()]) if by_k else "<p>none</p>"
    cols: list[str] = [c for c in ("epoch", "train_loss", "lr", "val_auc", "val_ap") if c in history[0]]
    return table([metric_name(c) + (" × 100" if c in PERCENT_KEYS else "") for c in cols],
                 [[pct(h.get(c)) if c in PERCENT_KEYS else num(h.get(c)) for c in cols] for h in history])


def e(value: Any) -> str:
    return html.escape("–" if value is None else str(value))


def num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else e(value)


def short(name: str) -> str:
    return name.split("/")[-1][:28]


# --- the index of reports ----------------------------------------------------------------------------

ABOUT = ".about.json"  # beside a report: what it is, written by the stage that wrote the report
_STAMPED = re.compile(r"^(?P<kind>[a-z0-9]+)-(?P<model>.+)-(?P<stamp>\d{8}-\d{6})$")


@dataclass(frozen=True)
class ReportEntry:
    link: str  # relative to the reports folder
    kind: str
    runs: tuple[str, ...]
    model: str | None
    written: datetime


def index_reports(reports: Path, written: Path | None = None, kind: str | None = None, run: str | None = None,
                  model: str | None = None) -> Path:
    """Note what `written` is (its kind, its run or runs joined by commas, its model key) beside it, then
    rewrite `reports/index.html` atomically.

    The index lists every report under `reports` (each `*/index.html` page and each top-level PNG, the
    landscapes), newest first; reports written before this index existed get what their names say.
    Cost grows with the number of reports (a stat and a small JSON read each), never with rows.
    """
    if written is not None and kind and written.resolve().is_relative_to(reports.resolve()):
        write_text(_about_path(written), json.dumps({"kind": kind, "run": run, "model": model,
                                                     "written": datetime.now(UTC).isoformat()}))
    entries = sorted(report_entries(reports), key=lambda r: (r.written, r.link), reverse=True)
    rows = [[f"<a href='{e(r.link)}'>{e(r.kind)}</a>", f"{r.written:%Y-%m-%d %H:%M}",
             "<br>".join(f"<code>{e(run)}</code>" for run in r.runs) or "–",
             f"<code>{e(r.model)}</code>" if r.model else "–"]
            for r in entries]
    body = ["<h1>Reports</h1>",
            f"<p>{len(entries)} report{'s' if len(entries) != 1 else ''} in <code>{e(reports)}</code>, newest first. "
            "This page is rewritten whenever <code>pipeline report</code>, <code>experiment</code> or "
            "<code>landscape</code> writes one.</p>",
            raw_table(["report", "written (UTC)", "run", "model key"], rows, "index") if rows
            else "<p>No reports yet.</p>"]
    return write_text(reports / "index.html", page("Reports", body))


def report_entries(reports: Path) -> list[ReportEntry]:
    """Every report under `reports`, as the index lists it (kind, runs, model, when)."""
    return [_entry(reports, path) for path in _report_files(reports)]


def report_files(reports: Path, entry: ReportEntry) -> list[Path]:
    """What a report is on disk: its folder, or a top-level figure with its data and its note."""
    path = reports / entry.link
    if path.name == "index.html":
        return [path.parent]
    return [p for p in (path, path.with_suffix(".json"), _about_path(path)) if p.exists()]


def _about_path(report: Path) -> Path:
    return report.parent / ABOUT if report.name == "index.html" else report.with_name(report.name + ABOUT)


def _report_files(reports: Path) -> list[Path]:
    if not reports.is_dir():
        return []
    return [*reports.glob("*/index.html"), *(p for p in reports.glob("*.png") if p.is_file())]


def _entry(reports: Path, path: Path) -> ReportEntry:
    about = _read_json(_about_path(path))
    written = (datetime.fromisoformat(about["written"]) if about.get("written")
               else datetime.fromtimestamp(path.stat().st_mtime, UTC))
    name = path.parent.name if path.name == "index.html" else path.stem
    kind, run, model = _from_name(path, name)
    runs = about.get("run") or run
    return ReportEntry(path.relative_to(reports).as_posix(), about.get("kind") or kind,
                       tuple(r.strip() for r in runs.split(",")) if runs else (), about.get("model") or model, written)


def _from_name(path: Path, name: str) -> tuple[str, str | None, str | None]:
    """What a report's name says about it (reports written before `.about.json` files existed)."""
    if name.startswith("run-"):
        return "run report", name[4:], None
    if path.suffix == ".png":
        data = _read_json(path.with_suffix(".json"))
        kind = "landscape" + (f" ({data['dims']}-D)" if data.get("dims") else "")
        return kind if name.startswith("landscape") else "figure", ", ".join(data.get("runs", [])) or None, None
    if match := _STAMPED.match(name):
        return match["kind"], None, match["model"]
    return "page", None, None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
