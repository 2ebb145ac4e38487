"""`pipeline sql` is bounded and prints data safely, all through the command: Ctrl-C and `--timeout`
stop an endless query with one sentence, `--memory-limit` reaches DuckDB (a join beyond it spills or
says so), the table stops the query at the rows it shows, BLOBs and settings export as text, PIVOT
runs, and a caption holding escape sequences reaches the terminal escaped but an export byte for byte."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.store.layout import Store
from tests.conftest import jpeg

REPO = Path(__file__).resolve().parents[1]
ENDLESS = "SELECT count(*) FROM range(1000000000000::BIGINT)"
runner = CliRunner()


def _sql(store: Store, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["sql", "--store", str(store.root), *args])
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def _cpu_seconds(pid: int) -> float:
    fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="watches the query's CPU time in /proc")
def test_ctrl_c_stops_an_endless_query_with_one_sentence(d3_store: Store) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "sql", "--store", str(d3_store.root), ENDLESS],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # the query is running once the process has burnt well past its start-up's CPU (imports: about 1-2 s)
    deadline = time.monotonic() + 300
    while proc.poll() is None and _cpu_seconds(proc.pid) < 5 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read().decode()[-800:] if proc.stderr else ""
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)  # it would run for hours if Ctrl-C did not reach DuckDB
    finally:
        proc.kill()
    text = " ".join(err.decode().split())
    assert proc.returncode == 130, text
    assert "The query was stopped (Ctrl-C)" in text and "Traceback" not in text


def test_timeout_stops_an_endless_query_with_one_sentence(d3_store: Store) -> None:
    code, out = _sql(d3_store, ENDLESS, "--timeout", "1")
    assert code == 2 and "ran past --timeout 1 s and was stopped" in " ".join(out.split())
    code, out = _sql(d3_store, "SELECT 1", "--timeout", "0")
    assert code == 2 and "--timeout must be a number of seconds above 0" in out


def test_memory_limit_reaches_duckdb_with_a_quarter_of_ram_by_default(d3_store: Store) -> None:
    query = "SELECT current_setting('memory_limit') AS m"
    code, out = _sql(d3_store, query, "--memory-limit", "100MB", "--format", "csv")
    assert code == 0 and out.splitlines()[-1] == "95.3 MiB"
    quarter = duckdb.connect(config={"memory_limit": "25%"}).sql(query).fetchall()[0][0]
    default = duckdb.connect().sql(query).fetchall()[0][0]
    code, out = _sql(d3_store, query, "--format", "csv")
    assert code == 0 and out.splitlines()[-1] == quarter != default  # DuckDB's own default is 80%
    code, out = _sql(d3_store, "SELECT 1", "--memory-limit", "lots")
    assert code == 2 and "--memory-limit must look like 4GB, 512MiB or 25%" in " ".join(out.split())


def test_a_triple_self_join_beyond_the_limit_spills_or_says_so(d3_store: Store) -> None:
    code, out = _sql(d3_store, "SELECT count(*) FROM samples", "--format", "csv")
    n = int(out.splitlines()[-1])
    # n³ distinct strings of 192 characters: 40 MB of hash table and more, held to 16 MB
    query = ("SELECT count(DISTINCT a.sample_id || b.sample_id || c.sample_id) AS n "
             "FROM samples a, samples b, samples c")
    code, out = _sql(d3_store, query, "--memory-limit", "16MB", "--format", "csv")
    if code == 0:  # spilled to disk and finished
        assert out.splitlines()[-1] == str(n ** 3)
    else:  # (what this machine's DuckDB does at 16 MB: a sentence, no traceback, no 17 GB)
        assert code == 2 and "needs more memory than --memory-limit 16MB" in " ".join(out.split())
    code, out = _sql(d3_store, query, "--memory-limit", "64MB", "--format", "csv")
    assert code == 0 and out.splitlines()[-1] == str(n ** 3)


def test_the_table_stops_the_query_at_the_rows_it_shows(d3_store: Store) -> None:
    # an endless result: the table fetches its rows and stops the query (else the --timeout would end it)
    code, out = _sql(d3_store, "SELECT range AS i FROM range(1000000000000::BIGINT)", "--max-rows", "3",
                     "--timeout", "120")
    assert code == 0 and "more rows not shown" in out
    lines = out.splitlines()
    assert lines[lines.index("─") + 1:lines.index("─") + 4] == ["0", "1", "2"] and "3" not in lines
    code, out = _sql(d3_store, "SELECT 1 AS one", "--max-rows", "3")
    assert code == 0 and "more rows" not in out


def test_blobs_and_settings_export_as_text(d3_store: Store, tmp_path: Path) -> None:
    query = "SELECT from_hex('5c27410a') AS b, 'x' AS t"
    code, out = _sql(d3_store, query, "--format", "csv")
    assert code == 0 and list(csv.reader(io.StringIO(out))) == [["b", "t"], ["\\x5C\\x27A\\x0A", "x"]]
    # DuckDB reads its own text of a BLOB back
    assert duckdb.connect().sql("SELECT '\\x5C\\x27A\\x0A'::BLOB = from_hex('5c27410a')").fetchall() == [(True,)]
    code, out = _sql(d3_store, query, "--format", "json")
    assert code == 0 and json.loads(out) == {"b": "\\x5C\\x27A\\x0A", "t": "x"}
    code, out = _sql(d3_store, "SELECT * FROM duckdb_settings()", "--format", "json")
    settings = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and {"memory_limit", "threads"} <= {s["name"] for s in settings}
    code, out = _sql(d3_store, "SELECT * FROM duckdb_settings()", "--format", "csv", "--output",
                     str(tmp_path / "s.csv"))
    assert code == 0 and "rows to" in out and (tmp_path / "s.csv").read_text().startswith("name,")
    code, out = _sql(d3_store, query)
    assert code == 0 and "\\x5C\\x27A\\x0A" in out


def test_export_is_refused_with_its_article_and_pivot_runs(d3_store: Store) -> None:
    code, out = _sql(d3_store, "EXPORT DATABASE 'x'")
    assert code == 2 and "an EXPORT statement is not allowed" in " ".join(out.split())
    code, out = _sql(d3_store, "PIVOT samples ON split USING count(*) GROUP BY label ORDER BY label", "--format",
                     "csv")
    assert code == 0, out
    rows = list(csv.DictReader(io.StringIO(out)))
    counts = runner.invoke(app, ["sql", "--store", str(d3_store.root), "--format", "csv",
                                 "SELECT label, split, count(*) AS n FROM samples GROUP BY ALL"]).output
    expected = {(r["label"], r["split"]): r["n"] for r in csv.DictReader(io.StringIO(counts))}
    assert {(r["label"], s): r[s] for r in rows for s in ("train", "val", "test") if s in r} == expected
    code, out = _sql(d3_store, "PIVOT samples ON split USING count(*)", "--allow-files")
    assert code == 2 and "list its values with IN" in " ".join(out.split())


def test_control_characters_reach_the_terminal_escaped_and_exports_unchanged(tmp_path: Path) -> None:
    caption = "a caption\x1b]0;pwned\x07 in \x1b[31mred\x9b"
    for i in range(2):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg((90 * i, 9, 9)))
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["path", "caption", "label", "generator"], ["0.jpg", caption, "0", "real"],
                                 ["1.jpg", "plain", "1", "sdxl"]])
    store = Store(tmp_path / "store")
    ingested = runner.invoke(app, ["ingest", str(manifest), "--format", "manifest", "--store", str(store.root)])
    assert ingested.exit_code == 0
    code, out = _sql(store, "SELECT text FROM samples ORDER BY text")
    assert code == 0 and not any(c in out for c in "\x1b\x07\x9b")
    assert "a caption\\x1b]0;pwned\\x07 in \\x1b[31mred\\x9b" in out  # shown, markup included, not obeyed
    code, out = _sql(store, "SELECT text FROM samples ORDER BY text", "--format", "csv")
    assert code == 0 and out.splitlines()[1:] == [caption, "plain"]  # the data stay data
    code, out = _sql(store, "SELECT text FROM samples ORDER BY text", "--format", "json")
    assert code == 0 and json.loads(out.splitlines()[0]) == {"text": caption}
    # an error sentence that quotes the data is escaped too
    code, out = _sql(store, f"SELECT * FROM \"{caption}\"")
    assert code == 2 and "\x1b" not in out and "\\x1b]0;pwned" in out
