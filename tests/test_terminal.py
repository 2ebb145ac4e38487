"""What the CLI prints fits 80, 120 and 200 columns without breaking what identifies something.

Through the command as users type it (`COLUMNS` set as a terminal sets it): run ids, sample id
prefixes, generator names, model keys and paths appear whole; numbers are never split; free text is
cut with "…" and a pointer to the whole value; table lines fit the width; epoch lines only on a
terminal or with -v; an alarm once; the progress bar's rate equals the summary's.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.cells import cell_len
from rich.console import Console
from rich.text import Text
from typer.testing import CliRunner, Result

from pipeline.cli import app
from pipeline.present import tables, terminal
from pipeline.present.tables import Column
from pipeline.store import catalog
from pipeline.store.layout import Store

WIDTHS = (80, 120, 200)
runner = CliRunner()


def _run(width: int, *args: str, **env: str) -> Result:
    result = runner.invoke(app, list(args), env={"COLUMNS": str(width), **env})
    assert result.exit_code == 0, result.output
    return result


def _fits(text: str, width: int) -> None:
    """Every table is at most `width` wide: the rule under its header spans it. (Sentences are single
    lines that the terminal wraps, so that a path in them copies whole.)"""
    rules = [line for line in text.splitlines() if line.strip() and not line.strip(" ─")]
    assert all(cell_len(line) <= width for line in rules), rules

def _column(store: Store, sql: str) -> list:
    return catalog.query(store, sql).column(0).to_pylist()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, str]:
    """The demo, run once at 80 columns (the narrowest): its store and what it printed."""
    root = tmp_path_factory.mktemp("demo")
    result = _run(80, "demo", "--root", str(root / "demo"), "--rows", "8", "--workers", "0")
    return Store(root / "demo" / "store"), result.output


# --- the commands ---------------------------------------------------------------------------------


def test_the_demo_at_80_columns_keeps_ids_whole_and_prints_no_epoch_lines(demo: tuple[Store, str]) -> None:
    store, out = demo
    _fits(out, 80)
    for run_id in _column(store, "SELECT run_id FROM runs"):
        assert out.count(run_id) >= 2, run_id  # the train line and the neighbours command
    assert str(store.root / "reports") in out  # the report's path, on one line
    assert not re.search(r"^epoch +\d", out, re.M), "epoch lines printed though the output is not a terminal"
    assert "trained 8 epochs" in out
    # the progress bar's rate is the summary's: the same count over the same seconds
    summary = re.search(r"encoded \d+ images .*\(([\d,.]+) img/s\)", out)
    bar = re.search(r"^images .* ([\d,.]+) img/s", out, re.M)
    assert summary and bar and summary.group(1) == bar.group(1), out
    assert "━" not in out  # in a log, a task is a line of figures, not a row of bar glyphs
    assert re.search(r"^images +\d+/\d+ +[\d,.]+ img/s +in \d+:\d\d:\d\d$", out, re.M), out
    texts = re.search(r"^texts .* ([\d,.]+) texts/s", out, re.M)
    assert texts and float(texts.group(1).replace(",", "")) > 0, out  # a job done before the first tick


@pytest.mark.parametrize("width", WIDTHS)
def test_sql_never_splits_a_number_or_an_id_and_cuts_only_free_text(demo: tuple[Store, str], width: int) -> None:
    store, _ = demo
    run_id = _column(store, "SELECT run_id FROM runs")[0]
    caption = "a caption long enough to be cut at every width we test, " * 4
    query = f"SELECT run_id, 1/15 AS fifteenth, 2/3 AS third, 'sd-xl' AS generator, '{caption}' AS caption FROM runs"
    out = _run(width, "sql", query, "--store", str(store.root)).output
    _fits(out, width)
    for whole in (run_id, "0.0666667", "0.666667", "sd-xl"):
        assert whole in out, (whole, out)
    assert "…" in out and "--format csv or json shows it whole" in out
    csv = _run(width, "sql", query, "--store", str(store.root), "--format", "csv").output
    assert caption.strip() in csv  # the full value is one flag away
    # too wide for any table at this width: one record per row, the 64-digit ids whole
    out = _run(width, "sql", "SELECT * FROM samples ORDER BY sample_id LIMIT 2", "--store", str(store.root)).output
    for sample_id in _column(store, "SELECT sample_id FROM samples ORDER BY sample_id LIMIT 2"):
        assert sample_id in out


@pytest.mark.parametrize("width", WIDTHS)
def test_status_shows_model_keys_and_generators_whole(demo: tuple[Store, str], width: int) -> None:
    store, _ = demo
    out = _run(width, "status", "--store", str(store.root)).output
    _fits(out, width)
    for name in _column(store, "SELECT DISTINCT model_key FROM embeddings") + \
            _column(store, "SELECT DISTINCT generator FROM samples"):
        assert name in out, (name, out)


@pytest.mark.parametrize("width", WIDTHS)
def test_neighbors_keep_sample_id_prefixes_whole(demo: tuple[Store, str], width: int) -> None:
    from pipeline.stages.neighbors import NeighborQuery
    from pipeline.stages.neighbors import run as neighbors

    store, _ = demo
    query = _column(store, "SELECT s.sample_id FROM samples s JOIN embeddings e ON e.content_hash = s.sample_id "
                           "WHERE s.split = 'test' ORDER BY 1 LIMIT 1")[0]
    run_id = _column(store, "SELECT run_id FROM runs")[0]
    out = _run(width, "neighbors", "--sample-id", query[:12], "-k", "4", "--run", run_id,
               "--store", str(store.root)).output
    _fits(out, width)
    expected = neighbors(NeighborQuery(store, query[:12], k=4, run_id=run_id)).rows
    for sample_id, generator in zip(expected.column("sample_id").to_pylist(),
                                    expected.column("generator").to_pylist(), strict=True):
        assert sample_id[:16] in out and generator in out, (sample_id, out)
    assert query in out  # the query's full id in the title


@pytest.mark.parametrize("width", WIDTHS)
def test_table1_keeps_run_ids_and_numbers_whole_and_alarms_once(demo: tuple[Store, str], width: int) -> None:
    store, _ = demo
    out = _run(width, "experiment", "table1", "--epochs", "2", "--batch-size", "64", "--store", str(store.root)).output
    _fits(out, width)
    assert str(store.root / "reports" / "table1-") in out  # the report's path, whole
    names = "('table1: Baseline 1: image, BCE', 'table1: Method: image+text, CVaR+AUC+SAM')"
    runs = _column(store, f"SELECT run_id FROM runs WHERE name IN {names}")
    assert len(runs) == 2
    for run_id in runs:
        assert run_id in out, (run_id, out)
        cells = catalog.query(store, "SELECT value, lo, hi FROM metrics WHERE run_id = ? AND split = 'test' "
                                     "AND metric = 'auc'", [run_id]).to_pylist()
        for c in cells:
            for v in c.values():
                if v is not None:
                    assert f"{100 * v:.2f}" in out, (v, out)  # never split across lines
    small = re.search(r"Small test split: [^\n]*", out)
    assert small and out.count(small.group(0)) == 1, out  # the alarm once (not in a table and a banner)


def test_train_prints_epoch_lines_only_on_a_terminal_or_with_verbose(demo: tuple[Store, str]) -> None:
    store, _ = demo
    fast = ["--epochs", "3", "--batch-size", "64", "--store", str(store.root)]
    epoch = re.compile(r"epoch +\d+ +loss")  # (on a terminal, after the bar's control codes)
    piped = _run(120, "train", *fast, "--seed", "11").output
    assert not epoch.search(piped) and "trained 3 epochs" in piped, piped
    assert "-v" in piped  # says how to see them
    verbose = _run(120, "-v", "train", *fast, "--seed", "12").output
    assert len(epoch.findall(verbose)) == 3, verbose
    tty = _run(120, "train", *fast, "--seed", "13", TTY_COMPATIBLE="1").output  # rich: "a terminal"
    assert len(epoch.findall(tty)) == 3, tty


def test_an_error_prints_a_long_path_on_one_line(tmp_path: Path) -> None:
    store = tmp_path / ("deep-folder-name-" * 8) / "store"
    result = runner.invoke(app, ["sql", "SELECT 1", "--store", str(store)], env={"COLUMNS": "80"})
    assert result.exit_code == 2
    assert str(store) in result.output and len(result.output.strip().splitlines()) == 1, result.output


# --- the pieces -----------------------------------------------------------------------------------


def test_epoch_lines_show_pace_when_the_trainer_measured_it() -> None:
    plain = {"epoch": 3, "train_loss": 0.5, "val_auc": 0.9}
    assert terminal.epoch_line(plain) == "epoch   3  loss 0.5000  val auc 0.9000"
    timed = {**plain, "samples_per_s": 12345.6, "seconds": 2.04, "samples": 25187}
    assert terminal.epoch_line(timed).endswith("12,346 samples/s  2.0 s")


def _reporter_output(steps: list[tuple[str, tuple]], monkeypatch: pytest.MonkeyPatch) -> str:
    sink = io.StringIO()
    monkeypatch.setattr(terminal, "err", Console(file=sink, width=100, soft_wrap=True))
    with terminal.RichReporter() as reporter:
        for method, args in steps:
            getattr(reporter, method)(*args)
    return sink.getvalue()


def test_the_bar_shows_the_stages_own_rate_and_no_zero_for_a_quick_job(monkeypatch: pytest.MonkeyPatch) -> None:
    out = _reporter_output([("start", ("texts", 159, "texts")), ("advance", ("texts", 159)),
                            ("event", ("finished", {"task": "texts", "items": 159, "seconds": 0.25}))], monkeypatch)
    assert "636.0 texts/s" in out and "0.0 texts/s" not in out, out
    quick = _reporter_output([("start", ("texts", 3, "texts")), ("advance", ("texts", 3))], monkeypatch)
    assert " 0.0 texts/s" not in quick, quick


def test_epochs_are_summed_up_once_per_run_off_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    records = [{"epoch": e, "train_loss": 0.1, "val_auc": 0.5, "samples": 1000, "seconds": 0.5} for e in range(4)]
    steps: list[tuple[str, tuple]] = []
    for _ in range(2):  # two runs of an experiment: one bar restarted, one summary each
        steps.append(("start", ("epochs", 4, "epochs")))
        for r in records:
            steps += [("event", ("epoch", r)), ("advance", ("epochs", 1))]
    out = _reporter_output(steps, monkeypatch)
    assert out.count("trained 4 epochs in 2.0 s, 2,000 samples/s") == 2, out
    assert out.count("-v") == 1 and out.count("epochs ") == 1 + 2, out  # the hint once; one bar


def test_an_alarm_prints_once_per_command(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal.configure()
    sink = io.StringIO()
    monkeypatch.setattr(terminal, "out", Console(file=sink, width=80, soft_wrap=True))
    for _ in range(2):
        terminal.alarm("Shortcut: the captions alone separate the classes.")
    assert sink.getvalue().count("captions alone") == 1


_token = st.text("abcdef0123456789-_./", min_size=1, max_size=70)
_number = st.floats(-1e9, 1e9, allow_nan=False).map(lambda v: f"{v:.6g}")
_words = st.lists(st.text("abcdefghij", min_size=1, max_size=14), min_size=1, max_size=12).map(" ".join)
_kinds = {"token": _token, "number": _number, "label": _words, "text": _words}


@st.composite
def _tables(draw: st.DrawFn) -> tuple[list[Column], list[list[str]]]:
    kinds = draw(st.lists(st.sampled_from(list(_kinds)), min_size=1, max_size=8))
    rows = draw(st.lists(st.tuples(*(_kinds[k] for k in kinds)).map(list), min_size=1, max_size=4))
    return [Column(f"col {i}", k) for i, k in enumerate(kinds)], rows


@settings(max_examples=150, deadline=None)
@given(table=_tables(), width=st.sampled_from(WIDTHS))
def test_a_fitted_table_fits_and_shows_every_token_and_number_whole(
        table: tuple[list[Column], list[list[str]]], width: int) -> None:
    columns, rows = table
    console = Console(file=io.StringIO(), width=width, soft_wrap=True)
    fitted = tables.grid(columns, rows, width)
    with console.capture() as capture:
        console.print(fitted[0] if fitted else tables.records(columns, rows))
    out = capture.get()
    lines = out.splitlines()
    for row in rows:
        for value, column in zip(row, columns, strict=True):
            if column.kind in ("token", "number"):
                assert any(value in line for line in lines), (value, out)
            elif column.kind == "label" or not fitted:
                for word in value.split():
                    assert re.search(rf"(^| ){re.escape(word)}($| )", out, re.M), (word, out)
    if fitted:
        assert all(cell_len(line) <= width for line in lines), out
        assert fitted[1] == any(cell_len(row[i]) > w for row in rows for i, w in
                                enumerate(tables.widths(columns, rows, width) or []) if columns[i].kind == "text")


def test_records_when_no_table_fits_and_a_styled_cell_keeps_its_style() -> None:
    columns = [Column("sample_id", "token"), Column("weights", "token")]
    rows = [["f" * 64, Text("random", style="yellow")]]
    assert tables.grid(columns, rows, 60) is None
    console = Console(file=io.StringIO(), width=60, soft_wrap=True)
    with console.capture() as capture:
        shown = tables.show(console, columns, rows)
    assert shown.records and "f" * 64 in capture.get() and "random" in capture.get()
