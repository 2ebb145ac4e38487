"""Static HTML pages: one stylesheet, escaped cells, tables of metrics, the random-weights banner."""

from __future__ import annotations

import html
from typing import Any

import numpy as np

from pipeline.evaluation.results import RunMetrics, SplitMetrics

RANDOM_NOTE = ("Embeddings from a CLIP with RANDOM weights (and, in the demo, synthetic images): these "
               "figures test the pipeline; they are not results about CLIP.")



_CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child{text-align:left}.warn{background:#fff3cd;border:1px solid #e0c060;padding:.6em}
.figs img{width:48%;margin:1%}.side{display:flex;gap:1em;align-items:flex-start}.side img{width:50%}
pre{background:#f7f7f7;padding:.6em;overflow:auto}
.alarm{background:#f8d7da;border:2px solid #c0392b;color:#721c24;padding:.7em;font-weight:600}
img.wide{max-width:100%;display:block;margin:1em 0}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:.8em}
.card{margin:0;border:1px solid #ddd;padding:.4em;font-size:12px;background:#fafafa}
.pair{display:flex;gap:4px}.pair img,.nothumb{width:160px;height:160px;object-fit:contain;background:#eee}
.nothumb{display:flex;align-items:center;justify-content:center;color:#888}
.results td{white-space:nowrap;vertical-align:top}.ci{font-size:11px;color:#555}.sd{font-size:11px;color:#1f5fa0}
code.run{font-size:10px;color:#666}.card.wrong{border:2px solid #c0392b}
.results th:first-child{text-align:left}img.wide{max-width:100%;width:820px}img.wide.broad{width:100%}"""


def page(title: str, body: list[str]) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def banner(random_weights: Any) -> str:
    return f'<p class="warn">{RANDOM_NOTE}</p>' if random_weights else ""


def table(header: list[str], rows: list[list[Any]], escape_last: bool = True) -> str:
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{v if (not escape_last and i == len(r) - 1) else e(v)}</td>" for i, v in enumerate(r))
        + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def raw_table(header: list[str], rows: list[list[str]]) -> str:
    """A table whose cells are HTML already (escape what goes into them)."""
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{v}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table class='results'><tr>{head}</tr>{body}</table>"


def estimate(value: Any, lo: Any = None, hi: Any = None, spread: tuple[float, float] | None = None) -> str:
    """A cell: the value, its interval below it in small type, and mean ± sd over seeds if given."""
    out = f"<b>{pct(value)}</b>"
    if lo is not None and hi is not None and not (isinstance(lo, float) and np.isnan(lo)):
        out += f"<br><span class='ci'>[{pct(lo)}, {pct(hi)}]</span>"
    if spread is not None:
        out += f"<br><span class='sd'>{pct(spread[0])} ± {pct(spread[1])}</span>"
    return out


def metric_row(name: str, m: SplitMetrics) -> list[Any]:
    return [name, m.n, pct(m.auc), pct(m.ap), pct(m.accuracy)]


def history(metrics: RunMetrics) -> str:
    history = metrics.history
    if not history:
        by_k = metrics.val_auc_by_k
        return table(["k", "val AUC"], [[k, pct(v)] for k, v in by_k.items()]) if by_k else "<p>none</p>"
    cols: list[str] = [c for c in ("epoch", "train_loss", "lr", "val_auc", "val_ap") if c in history[0]]
    return table(cols, [[num(h.get(c)) for c in cols] for h in history])


def e(value: Any) -> str:
    return html.escape("–" if value is None else str(value))


def pct(value: Any) -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{100 * float(value):.2f}"


def num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else e(value)


def short(name: str) -> str:
    return name.split("/")[-1][:28]
