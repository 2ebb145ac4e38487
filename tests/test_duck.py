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
