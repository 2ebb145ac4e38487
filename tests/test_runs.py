"""`pipeline runs list|show|rm` as users type them; `rm` is one commit, whole or gone under a kill."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.store import catalog
from pipeline.store.layout import Store
from tests.conftest import kill_when, locked, planted_store

runner = CliRunner()


def _run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def _json(*args: str) -> object:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, list[str]]:
    """A planted store with two trained runs (the second with a report), made once for the module."""
    root = tmp_path_factory.mktemp("runs")
    store = planted_store(root, rows=120, dim=8, signal=4.0)
    fast = ["--epochs", "1", "--batch-size", "128", "--store", str(store.root)]
    ids = [_json("train", *fast, "--features", "image", "--no-sam", "--name", name)["run_id"] for name in ("a", "b")]
    code, out = _run("report", "--run", ids[1], "--store", str(store.root))
    assert code == 0, out
    return store, ids


@pytest.fixture
def store_copy(two_runs: tuple[Store, list[str]], tmp_path: Path) -> tuple[Store, list[str]]:
    store, ids = two_runs
    copy = Store(tmp_path / "store")
    shutil.copytree(store.root, copy.root)
    return copy, ids


def _state(store: Store, run_id: str) -> dict[str, object]:
    """What readers and the disk say of a run: its rows in each view, its files."""
    counts = catalog.query(store, "SELECT (SELECT count(*) FROM runs WHERE run_id = $r), "
                           "(SELECT count(*) FROM scores WHERE run_id = $r), "
                           "(SELECT count(*) FROM metrics WHERE run_id = $r)", {"r": run_id}).to_pylist()[0]
    files = sorted(p.relative_to(store.root).as_posix() for p in store.root.rglob(f"*{run_id}*"))
    return {"rows": tuple(counts.values()), "files": files}


def test_list_and_show_through_the_command(two_runs: tuple[Store, list[str]]) -> None:
    store, (a, b) = two_runs
    code, out = _run("runs", "list", "--store", str(store.root))
    assert code == 0 and a in out and b in out and out.index(b) < out.index(a), out  # newest first
    listed = _json("runs", "list", "--store", str(store.root))["runs"]
    assert [r["run_id"] for r in listed] == [b, a]
    assert listed[0]["features"] == "image" and listed[0]["detector"] == "mlp" 
    assert listed[0]["alarms"] == catalog.query(  # the run's stored alarms (a tiny store raises small_test)
        store, "SELECT count(*) FROM alarms WHERE run_id = ?", [b]).column(0)[0].as_py()
    assert listed[0]["test_auc"] == pytest.approx(catalog.query(
        store, "SELECT test_auc FROM runs WHERE run_id = ?", [b]).column(0)[0].as_py())

    code, out = _run("runs", "show", b[:-3], "--store", str(store.root))  # a prefix that names one run
    assert code == 0, out
    flat = " ".join(out.split())
    assert f"run {b} (b)" in flat and "ROC AUC" in flat and "test:" in flat and "report:" in flat
    shown = _json("runs", "show", b, "--store", str(store.root))
    test_auc = catalog.query(store, "SELECT value, lo, hi FROM metrics WHERE run_id = ? AND split = 'test' "
                             "AND generator = 'all' AND metric = 'auc'", [b]).to_pylist()[0]
    stored = shown["metrics"]["test"]["intervals"]["all"]["auc"]
    assert (stored["value"], stored["lo"], stored["hi"]) == pytest.approx(tuple(test_auc.values()))  # as stored
    assert {f["path"] for f in shown["files"] if f["committed"]} == {
        f"runs/{b}/run.parquet", f"scores/{b}.parquet", f"metrics/{b}.parquet"}
    assert f"reports/run-{b}/index.html" in {f["path"] for f in shown["files"]}
    assert shown["config"]["name"] == "b" and shown["report"].endswith(f"run-{b}/index.html")

    code, out = _run("runs", "show", b[:9], "--store", str(store.root))  # the date alone: both runs
    assert code == 2 and "names 2 runs" in out and "Traceback" not in out


@pytest.mark.parametrize("width", (80, 120))
def test_list_and_show_fit_the_terminal_and_keep_ids_and_numbers_whole(two_runs: tuple[Store, list[str]],
                                                                       width: int) -> None:
    from rich.cells import cell_len

    store, ids = two_runs
    for args in (["runs", "list"], ["runs", "show", ids[1]]):
        result = runner.invoke(app, [*args, "--store", str(store.root)], env={"COLUMNS": str(width)})
        assert result.exit_code == 0, result.output
        rules = [line for line in result.output.splitlines() if line.strip() and not line.strip(" ─")]
        assert rules and all(cell_len(line) <= width for line in rules), rules  # each table's rule fits
        lines = result.output.splitlines()
        for run_id in ids if args[1] == "list" else ids[1:]:
            assert any(run_id in line for line in lines), run_id  # whole, on one line
    auc = catalog.query(store, "SELECT value FROM metrics WHERE run_id = ? AND split = 'test' AND generator = 'all' "
                        "AND metric = 'auc'", [ids[1]]).column(0)[0].as_py()
    assert f"{auc * 100:.2f}" in result.output  # the number whole, whatever the width


def test_rm_removes_files_and_rows_in_one_commit(store_copy: tuple[Store, list[str]]) -> None:
    store, (a, b) = store_copy
    kept = _state(store, a)
    assert _state(store, b)["rows"] == (1, 120 * 5, kept["rows"][2])
    code, out = _run("runs", "rm", b, "--store", str(store.root))
    assert code == 0 and f"removed 1 run ({b})" in " ".join(out.split()), out
    assert _state(store, b) == {"rows": (0, 0, 0), "files": []}  # its report folder too
    assert _state(store, a) == kept
    assert b not in (store.reports_dir / "index.html").read_text()  # the reports index lists what is left
    assert not (store.root / ".removing").exists()
    # people's own DuckDB sessions see the same (catalog.duckdb names no deleted file)
    import duckdb

    with duckdb.connect(str(store.catalog_path), read_only=True) as con:
        assert con.sql("SELECT count(*), count(DISTINCT run_id) FROM scores").fetchall() == [(600, 1)]

    code, out = _run("runs", "rm", a, "nope", "--store", str(store.root))
    assert code == 2 and "No run 'nope'" in out and "nothing was removed" in out
    assert _state(store, a) == kept
    removed = _json("runs", "rm", a, "--store", str(store.root))
    assert removed["run_ids"] == [a] and removed["rows"] == {"runs": 1, "scores": 600, "metrics": kept["rows"][2]}
    assert _state(store, a) == {"rows": (0, 0, 0), "files": []}


HOOK = """
import sys, time
from pathlib import Path
import pipeline.store.writes as w

ready, point = Path(sys.argv[1]), sys.argv[2]
calls = []

def pause():
    ready.write_text("x")
    time.sleep(120)

if point == "before-commit":  # the journal is written, the manifest not yet
    write_text = w.write_text
    def journal_then_pause(*a, **k):
        out = write_text(*a, **k)
        pause()
        return out
    w.write_text = journal_then_pause
else:  # committed, and one of the run's files deleted
    delete = w.delete
    def delete_one_then_pause(path):
        calls.append(path)
        if len(calls) == 2:
            pause()
        delete(path)
    w.delete = delete_one_then_pause

from pipeline.cli import app
app(["runs", "rm", *sys.argv[3:]], prog_name="pipeline")
"""


@pytest.mark.parametrize("point, whole", [("before-commit", True), ("after-commit", False)])
def test_a_killed_rm_leaves_the_run_whole_or_gone(store_copy: tuple[Store, list[str]], tmp_path: Path,
                                                  point: str, whole: bool) -> None:
    store, (a, b) = store_copy
    before, other = _state(store, b), _state(store, a)
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", HOOK, str(ready), point, b, "--store", str(store.root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert kill_when(proc, ready.exists, timeout=120), proc.stderr.read() if proc.stderr else ""
    assert (store.root / ".removing").is_dir()  # the kill landed inside the removal
    gone = {"rows": (0, 0, 0)}
    # readers, before any writer: whole or gone by the manifest, and never a missing file
    assert _state(store, b)["rows"] == (before["rows"] if whole else gone["rows"])
    assert _state(store, a) == other
    with locked(store):  # the next writer finishes (or forgets) the removal when it takes the lock
        pass
    assert _state(store, b) == (before if whole else {**gone, "files": []})
    assert _state(store, a) == other
    assert not (store.root / ".removing").exists()
