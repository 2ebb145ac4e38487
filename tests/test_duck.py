"""`store.duck`: DuckDB bounded the way every module bounds it."""

from pathlib import Path

import duckdb

from pipeline.store import duck


def test_a_connection_that_spilled_is_bounded_again(tmp_path: Path) -> None:
    """A command's snapshot connection serves several bounded queries (train: the count of its samples,
    then the ranks of its group keys); once one spilled, DuckDB refuses to set the temp directory again,
    even to the same path, and the second bound must not fail on it."""
    con = duckdb.connect(":memory:")
    spill = tmp_path / "spill"
    count = "SELECT count(DISTINCT md5(i::VARCHAR)) FROM range(2000000) t(i)"
    duck.limit_memory(con, "32MB", spill, threads=1)
    assert con.execute(count).fetchall() == [(2_000_000,)]
    duck.limit_memory(con, "32MB", spill, threads=1)
    assert con.execute(count).fetchall() == [(2_000_000,)]


def test_a_bound_holds_on_a_machine_with_many_cores(tmp_path: Path) -> None:
    """DuckDB runs a query on as many threads as the machine has cores, and part of its need is per
    thread: at 5M samples `status`'s distinct count failed in 64 MB on 16 threads, and the loader's sort in
    256 MB on 8, where 2 threads fit. A bound is set with a few threads unless the caller names more."""
    con = duckdb.connect(":memory:", config={"threads": 16})  # as on a 16-core machine
    duck.limit_memory(con, "64MB", tmp_path / "spill")
    sort = "SELECT count(*) FROM (SELECT md5(i::VARCHAR) AS m, i FROM range(2000000) t(i) ORDER BY m)"
    assert con.execute(sort).fetchall() == [(2_000_000,)]
    assert con.execute("SELECT current_setting('threads')").fetchall()[0][0] == duck.BOUNDED_THREADS
