"""What the report pages cost: each figure against a bare matplotlib plot, and the index against its size.

    python bench/bench_pages.py [--reports 100,1000] [--repeats 3]

Figures: CPU seconds to draw and save each figure kind (synthetic cells: 4 generators, 9 heat-map rows,
3 perturbations), as a ratio to the floor of a bare 640 × 480 line plot saved as PNG in the same process.
Index: CPU seconds of `index_reports` over folders of N fake report pages (half with `.about.json`),
per report: it reads each report's name and small sidecar, so the cost per report should stay flat.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.present import figures, html


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def best_of(repeats: int, work: Callable[[], Any]) -> float:
    times = []
    for _ in range(repeats):
        start = cpu()
        work()
        times.append(cpu() - start)
    return min(times)


def _cell(rng: np.random.Generator) -> dict[str, float]:
    value = float(rng.uniform(0.4, 1.0))
    return {"value": value, "lo": max(0.0, value - 0.1), "hi": min(1.0, value + 0.05), "n": 100}


def figure_costs(out: Path, repeats: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    gens = ["deepfloyd-if", "sd-1.4", "sd-2.1", "sd-xl"]
    columns = [*gens, "all"]
    rows = {f"row {i}": [_cell(rng) for _ in columns] for i in range(9)}
    curves = {"none": {g: [(0.0, _cell(rng))] for g in columns},
              **{op: {g: [(s, _cell(rng)) for s in strengths] for g in columns}
                 for op, strengths in (("jpeg", (90, 75, 50)), ("resize", (0.5, 0.25)), ("blur", (1, 2)))}}
    y = rng.random(2000) < 0.8
    p = np.clip(rng.normal(0.3 + 0.4 * y, 0.2), 0, 1)
    g = np.array(rng.choice(gens, 2000), object)

    def floor() -> None:
        fig, ax = figures.figure("floor")
        ax.plot(np.arange(50), np.arange(50))
        figures.save_png(fig, out / "floor.png")

    kinds: dict[str, Callable[[], Any]] = {
        "floor (bare plot)": floor,
        "roc": lambda: figures.roc(out / "roc.png", y, p, g, "test", True),
        "bars_ci": lambda: figures.bars_ci(out / "bars.png", dict(zip(columns, rows["row 0"], strict=True)), "t", True),
        "grouped_bars_ci": lambda: figures.grouped_bars_ci(out / "auc.png", dict(list(rows.items())[:5]), columns,
                                                           "t", True),
        "heatmap": lambda: figures.heatmap(out / "matrix.png", rows, columns, "t", True,
                                           {r: (gens[i % 4],) for i, r in enumerate(rows)}),
        "robustness": lambda: figures.robustness(out / "robustness.png", curves, True),
    }
    return {name: best_of(repeats, work) for name, work in kinds.items()}


def index_cost(root: Path, reports: int, repeats: int) -> float:
    folder = root / f"reports-{reports}"
    for i in range(reports):
        page = folder / f"table1-Tiny-ViT-16__random-seed0__pp1-20250101-{i:06d}" / "index.html"
        page.parent.mkdir(parents=True)
        page.write_text("<html></html>")
        if i % 2:
            (page.parent / html.ABOUT).write_text(json.dumps({"kind": "table1", "run": None, "model": "m",
                                                              "written": "2025-01-01T00:00:00+00:00"}))
    return best_of(repeats, lambda: html.index_reports(folder))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reports", default="100,1000")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        costs = figure_costs(Path(tmp), args.repeats)
        base = costs["floor (bare plot)"]
        print("figure              CPU s   × floor")
        for name, seconds in costs.items():
            print(f"{name:<18} {seconds:6.3f}   {seconds / base:5.1f}")
        print("index: reports   CPU s   ms per report")
        for n in (int(r) for r in args.reports.split(",")):
            seconds = index_cost(Path(tmp), n, args.repeats)
            print(f"{n:>14}   {seconds:6.3f}   {1000 * seconds / n:6.3f}")


if __name__ == "__main__":
    main()
