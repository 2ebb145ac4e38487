"""`pipeline sql` reads and exports; it refuses anything that writes."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.errors import PipelineError
from pipeline.stages.sql import export, run_query, to_text
from pipeline.store.layout import Store


@pytest.mark.parametrize(
    "query",
    [
        "DELETE FROM samples",
        "DROP VIEW samples",
        "CREATE TABLE x AS SELECT 1",
        "INSERT INTO shards VALUES ('a', 'b', NULL, 1, now())",
        "COPY samples TO 'out.csv'",
        "ATTACH 'other.duckdb'",
        "SELECT 1; DROP VIEW samples",
    ],
)
def test_writes_are_refused(d3_store: Store, query: str) -> None:
    with pytest.raises(PipelineError, match="read-only|exactly one statement"):
        run_query(d3_store, query)
    assert run_query(d3_store, "SELECT count(*) AS n FROM samples").column(0)[0].as_py() > 0


def test_errors_are_sentences(d3_store: Store) -> None:
    with pytest.raises(PipelineError, match="does not exist"):
        run_query(d3_store, "SELECT * FROM nope")
    with pytest.raises(PipelineError, match="does not parse"):
        run_query(d3_store, "SELEKT 1")


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet"])
def test_export_formats(d3_store: Store, tmp_path: Path, fmt: str) -> None:
    table = run_query(d3_store, "SELECT label, count(*) AS n FROM samples GROUP BY 1 ORDER BY 1")
    path = export(table, tmp_path / f"out.{fmt}", fmt)
    if fmt == "parquet":
        assert pq.read_table(path).to_pylist() == table.to_pylist()
    elif fmt == "json":
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert rows == table.to_pylist()
    else:
        assert path.read_text().splitlines() == ["label,n", "0,11", "1,48"]


def test_csv_quotes_only_where_needed_and_round_trips(d3_store: Store) -> None:
    import csv

    table = run_query(d3_store, "SELECT 'a, \"quoted\" text' AS t, 1 AS n, NULL::VARCHAR AS missing")
    text = to_text(table, "csv")
    assert list(csv.reader(text.splitlines())) == [["t", "n", "missing"], ['a, "quoted" text', "1", ""]]


def test_float16_vectors_read_in_the_sandbox(d3_store: Store) -> None:
    from pipeline.stages.encode import run as encode
    from tests.conftest import encode_config

    encode(encode_config(d3_store))
    row = run_query(d3_store, "SELECT count(*) AS n, max(len(vector)) AS d "
                              "FROM embeddings WHERE modality = 'image'").to_pylist()[0]
    assert row["n"] > 0 and row["d"] > 0
    direct = run_query(d3_store, "SELECT vector FROM embeddings ORDER BY content_hash LIMIT 1").to_pylist()[0]
    from pipeline.store import catalog

    inside = catalog.query(d3_store, "SELECT vector FROM embeddings ORDER BY content_hash LIMIT 1").to_pylist()[0]
    assert direct == inside
