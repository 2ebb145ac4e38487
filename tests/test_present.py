"""The presentation layer: pages readable on phones, one AUC axis on every figure, honest intervals, the index."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.present import figures, html
from pipeline.present.names import metric_name
from trainer.metrics import METRICS


def cell(value: float, lo: float | None, hi: float | None) -> dict[str, Any]:
    return {"value": value, "lo": lo, "hi": hi, "n": 40}


LOW = {"bad": [cell(0.15, 0.02, 0.31), cell(0.48, 0.30, 0.66)], "ok": [cell(0.55, 0.40, 0.70), cell(0.6, 0.5, 0.7)]}
HIGH = {"good": [cell(0.97, 0.93, 1.0), cell(1.0, 1.0, 1.0)], "better": [cell(0.99, 0.98, 1.0), cell(0.999, 0.99, 1.0)]}


def _chance_lines(ax: Any, axis: str = "y") -> list[Any]:
    """The lines of `ax` drawn across it at 50 (axhline/axvline: constant data, axes-fraction extent)."""
    index = 1 if axis == "y" else 0
    return [line for line in ax.get_lines() if np.allclose(np.asarray(line.get_data()[index], float), 50.0)]


def test_every_metric_key_has_a_readers_name() -> None:
    for key in METRICS:
        assert metric_name(key) != key and "_" not in metric_name(key), key
    assert metric_name("tpr_at_fpr_1") == "TPR @ 1% FPR"
    assert metric_name("some_new_key") == "some new key"


def test_a_degenerate_interval_says_so_and_a_real_one_is_shown() -> None:
    assert html.estimate_text(cell(1.0, 1.0, 1.0)) == "100.00 (interval not informative)"
    assert html.estimate_text(cell(0.75, 0.75, 0.75)) == "75.00 (interval not informative)"
    assert html.estimate_text(cell(0.8261, 0.5, 1.0)) == "82.61 [50.00, 100.00]"
    assert html.estimate_text(cell(0.8, None, None)) == "80.00"
    assert html.estimate_text(cell(0.8, float("nan"), float("nan"))) == "80.00"
    assert html.estimate_text(None) == "–"
    flat = html.estimate(1.0, 1.0, 1.0)
    assert "interval not informative" in flat and "[100.00" not in flat
    assert "[50.00, 100.00]" in html.estimate(0.8, 0.5, 1.0)
    assert html.degenerate(0.99999, 1.0) and not html.degenerate(0.999, 1.0)  # at the 2 decimals shown × 100


def test_pages_have_a_viewport_and_tables_that_scroll_sideways() -> None:
    text = html.page("t", [html.table(["a", "b"], [[1, 2]]), html.raw_table(["a"], [["<b>x</b>"]])])
    assert "<meta name='viewport' content='width=device-width, initial-scale=1'>" in text
    assert text.count("<table") == 2 == text.count("<div class='scroll'><table")
    assert re.search(r"\.scroll\{[^}]*overflow-x:auto", text)


def test_history_shows_rates_times_100_under_their_names() -> None:
    from pipeline.evaluation.results import RunMetrics, SplitMetrics

    metrics = RunMetrics("m", None, "mlp", "image", "as-ingested", SplitMetrics(), SplitMetrics(), SplitMetrics(),
                         history=({"epoch": 0, "train_loss": 0.6931, "val_auc": 0.8125},))
    text = html.history(metrics)
    assert "val ROC AUC × 100" in text and "81.25" in text and "0.6931" in text and "val_auc" not in text


@pytest.mark.parametrize("values", [LOW, HIGH])
def test_grouped_bars_share_one_auc_axis_with_a_chance_line_and_whole_whiskers(values: dict[str, Any]) -> None:
    fig = figures.draw_grouped_bars_ci(values, ["sd-xl", "all"], "t")
    ax = fig.axes[0]
    assert ax.get_ylim() == figures.AUC_LIMITS and figures.AUC_LIMITS[0] == 0 and figures.AUC_LIMITS[1] > 100
    assert list(ax.get_yticks()) == list(range(0, 101, 10))
    assert len(_chance_lines(ax)) == 1
    heights = sorted(round(bar.get_height(), 6) for bar in ax.patches)
    expected = sorted(round(100 * c["value"], 6) for cells in values.values() for c in cells)
    assert heights == expected  # bars × 100, as the tables
    for collection in ax.collections:  # the whiskers: every segment inside the axis, none cut at 100
        for segment in collection.get_segments():
            assert segment[:, 1].min() >= figures.AUC_LIMITS[0] and segment[:, 1].max() <= figures.AUC_LIMITS[1]
    top = max(c["hi"] for cells in values.values() for c in cells)
    assert max(s[:, 1].max() for c in ax.collections for s in c.get_segments()) == pytest.approx(100 * top)


def test_per_generator_bars_keep_numbers_off_the_intervals() -> None:
    cells = {"sd-xl": cell(0.55, 0.10, 0.90), "sd-1.4": cell(1.0, 1.0, 1.0), "all": cell(0.7, 0.5, 0.9)}
    fig = figures.draw_bars_ci(cells, "t")
    ax = fig.axes[0]
    assert ax.get_xlim() == figures.AUC_LIMITS and len(_chance_lines(ax, "x")) == 1
    assert len(ax.texts) == 0  # no number drawn inside the plot, where a whisker could cross it
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["sd-xl\n55.0 [10.0, 90.0]", "sd-1.4\n100.0 (interval not informative)",
                      "overall\n70.0 [50.0, 90.0]"]
    # with long names the axes are narrow: the title and axis label still lie inside the figure
    fig = figures.draw_bars_ci(cells, "test ROC AUC per generator (each against all real)")
    fig.set_layout_engine("tight")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    box = fig.bbox
    ax = fig.axes[0]
    for text in (ax.title, ax._right_title, ax.xaxis.label):  # noqa: SLF001 - the right-aligned title
        if text.get_text():
            extent = text.get_window_extent(renderer)
            assert box.x0 - 1 <= extent.x0 and extent.x1 <= box.x1 + 1, (text.get_text(), extent, box)


def test_learning_curve_puts_val_auc_on_the_same_axis() -> None:
    fig = figures.draw_learning_curve([{"epoch": e, "train_loss": 1 / (e + 1), "val_auc": 0.8 + e / 100}
                                       for e in range(4)], best_epoch=3)
    auc = fig.axes[1]
    assert auc.get_ylim() == figures.AUC_LIMITS
    assert np.allclose(auc.get_lines()[0].get_ydata(), [80, 81, 82, 83])


def test_heat_map_scale_is_fixed_and_centred_on_chance_and_trained_cells_are_outlined() -> None:
    from matplotlib.patches import Rectangle

    columns = ["a", "b", "c", "all"]
    values = {"train on a": [cell(0.9, 0.8, 1.0), cell(0.15, 0.05, 0.3), cell(0.5, 0.4, 0.6), cell(0.5, 0.4, 0.6)],
              "all but c": [cell(1.0, 1.0, 1.0), cell(0.95, 0.9, 1.0), cell(0.6, 0.5, 0.7), cell(0.9, 0.8, 1.0)],
              "all generators": [cell(0.9, 0.8, 1.0)] * 4}
    trained = {"train on a": ("a",), "all but c": ("a", "b"), "all generators": None}
    fig = figures.draw_heatmap(values, columns, "t", trained)
    ax = fig.axes[0]
    norm = ax.images[0].norm
    assert (norm.vmin, norm.vcenter, norm.vmax) == (0, 50, 100)
    assert np.nanmin(ax.images[0].get_array()) == pytest.approx(15)  # × 100
    outlined = {(round(r.get_x() + 0.44), round(r.get_y() + 0.42)) for r in ax.patches if isinstance(r, Rectangle)}
    assert outlined == {(0, 0), (0, 1), (1, 1), (0, 2), (1, 2), (2, 2)}  # (column, row); never "overall"
    texts = [t.get_text() for t in ax.texts]
    assert "100.0" in texts and "not informative" in texts and "[100, 100]" not in texts
    assert min(t.get_fontsize() for t in ax.texts) >= 8
    plain = figures.draw_heatmap(values, columns, "t")
    assert not [p for p in plain.axes[0].patches if isinstance(p, Rectangle)]


def test_robustness_starts_from_the_test_split_as_ingested_and_dodges_generators() -> None:
    def pts(*strengths: float) -> list[tuple[float, dict[str, Any]]]:
        return [(s, cell(0.8, 0.6, 1.0)) for s in strengths]

    curves = {"none": {g: [(0.0, cell(0.9, 0.7, 1.0))] for g in ("all", "sd-xl", "sd-1.4")},
              "jpeg": {g: pts(90, 50) for g in ("all", "sd-xl", "sd-1.4")},
              "blur": {g: pts(2, 1) for g in ("all", "sd-xl", "sd-1.4")}}
    fig = figures.draw_robustness(curves)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 2
    for ax, weak_to_strong in zip(axes, (["as ingested", "90", "50"], ["as ingested", "1", "2"]), strict=True):
        assert [t.get_text() for t in ax.get_xticklabels()] == weak_to_strong
        assert ax.get_ylim() == figures.AUC_LIMITS and len(_chance_lines(ax)) == 1
        xs = [np.asarray(line.get_xdata(), float) for line in ax.get_lines() if line.get_marker() == "o"]
        assert len(xs) == 3
        at_first = sorted(x[0] for x in xs)
        assert all(b - a > 0.05 for a, b in zip(at_first, at_first[1:], strict=False))  # apart, not piled up
        assert all(abs(x[0]) < 0.5 for x in xs)  # and still at their own strength


def _save(fig: Any, path: Path) -> None:
    """Save with a random-weights caption on an Agg canvas, kept so the test can measure what was drawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    figures.save_png(fig, path, random_weights=True)


def _overlaps(fig: Any, text: Any) -> list[str]:
    renderer = fig.canvas.get_renderer()
    box = text.get_window_extent(renderer)
    return [ax.get_label() or str(i) for i, ax in enumerate(fig.axes)
            if ax.get_visible() and box.overlaps(ax.get_tightbbox(renderer))]


@pytest.mark.filterwarnings("ignore:This figure includes Axes that are not compatible with tight_layout")
@pytest.mark.parametrize("layout", ["constrained", None])
def test_the_random_weights_caption_overlaps_nothing(tmp_path: Path, layout: Any) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12.8, 4.8), dpi=figures.DPI, layout=layout)  # the 2-D landscape's shape
    axes = fig.subplots(1, 2)
    for ax in axes:
        filled = ax.contourf(np.arange(3), np.arange(3), np.arange(9).reshape(3, 3))
        ax.set_xlabel("direction 1")
        ax.set_ylabel("direction 2")
    fig.colorbar(filled, ax=list(axes), label="objective")
    _save(fig, tmp_path / "f.png")
    caption = [t for t in fig.texts if t.get_text() == figures.RANDOM_CAPTION]
    assert len(caption) == 1 and _overlaps(fig, caption[0]) == []


def test_the_caption_clears_the_heat_map_and_robustness_figures(tmp_path: Path) -> None:
    heat = figures.draw_heatmap({"r": [cell(0.9, 0.8, 1.0)]}, ["all"], "t", {"r": None})
    robust = figures.draw_robustness({"none": {"all": [(0.0, cell(0.9, 0.8, 1.0))]},
                                      "jpeg": {"all": [(50.0, cell(0.7, 0.6, 0.8))]}})
    for i, fig in enumerate((heat, robust)):
        _save(fig, tmp_path / f"{i}.png")
        assert _overlaps(fig, fig.texts[-1]) == []


def _page(directory: Path, mtime: float) -> Path:
    directory.mkdir(parents=True)
    path = directory / "index.html"
    path.write_text("<html></html>")
    os.utime(path, (mtime, mtime))
    return path


def test_the_index_lists_every_report_newest_first_and_forgets_deleted_ones(tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    _page(reports / "table1-Tiny-ViT-16__random-seed0__pp12-20250101-120000", 1_700_000_000)  # before .about.json
    old_run = _page(reports / "run-20250101-000000-abc", 1_700_000_100)
    (reports / "landscape-abc-vs-def-2d.png").write_bytes(b"png")
    (reports / "landscape-abc-vs-def-2d.json").write_text(json.dumps({"runs": ["r-abc", "r-def"], "dims": 2}))
    os.utime(reports / "landscape-abc-vs-def-2d.png", (1_600_000_000, 1_600_000_000))
    new = _page(reports / "robustness-m-20990101-000000", 1_700_000_200)
    index = html.index_reports(reports, new, "robustness", "run-7", "ViT-L-14__openai__pp1")
    assert index == reports / "index.html" and (new.parent / html.ABOUT).is_file()
    text = index.read_text()
    assert "name='viewport'" in text and "<div class='scroll'><table" in text
    links = re.findall(r"<a href='([^']+)'>([^<]+)</a>", text)
    assert links == [("robustness-m-20990101-000000/index.html", "robustness"),
                     ("run-20250101-000000-abc/index.html", "run report"),
                     ("table1-Tiny-ViT-16__random-seed0__pp12-20250101-120000/index.html", "table1"),
                     ("landscape-abc-vs-def-2d.png", "landscape (2-D)")]
    assert "<code>run-7</code>" in text and "ViT-L-14__openai__pp1" in text
    assert "Tiny-ViT-16__random-seed0__pp12" in text and "<code>20250101-000000-abc</code>" in text
    assert "<code>r-abc</code><br><code>r-def</code>" in text
    for link, _ in links:
        assert (reports / link).is_file()
    old_run.unlink()
    old_run.parent.rmdir()
    assert "run-20250101-000000-abc" not in html.index_reports(reports).read_text()


def test_a_report_written_outside_the_reports_folder_is_not_noted_there(tmp_path: Path) -> None:
    elsewhere = _page(tmp_path / "mine", 1_700_000_000)
    html.index_reports(tmp_path / "store" / "reports", elsewhere, "run report", "r", "m")
    assert not (elsewhere.parent / html.ABOUT).exists()
    assert "No reports yet" in (tmp_path / "store" / "reports" / "index.html").read_text()
