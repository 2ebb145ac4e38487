"""`pipeline sql`: read-only SQL over the catalog's views, with export to CSV, JSON or Parquet.

Only SELECT-like statements run (checked by DuckDB's own parser), on a read-only connection.
"""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline import catalog
from pipeline.atomic import atomic_write
from pipeline.errors import PipelineError
from pipeline.store import Store

EXPORT_FORMATS = ("csv", "json", "parquet")
_ALLOWED = {"SELECT", "EXPLAIN"}


def run_query(store: Store, sql: str) -> pa.Table:
    """Run one read-only query and return its result; anything that writes is refused."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise PipelineError(f"The query does not parse: {_first_line(exc)}") from exc
    if len(statements) != 1:
        raise PipelineError(f"Give exactly one statement, not {len(statements)}.")
    kind = statements[0].type.name
    if kind not in _ALLOWED:
        raise PipelineError(f"`pipeline sql` is read-only: a {kind} statement is not allowed.")
    try:
        return catalog.query(store, sql)
    except duckdb.Error as exc:
        raise PipelineError(f"The query failed: {_first_line(exc)}") from exc


def export(table: pa.Table, path: Path, fmt: str) -> Path:
    if fmt not in EXPORT_FORMATS:
        raise PipelineError(f"--format must be table or one of {', '.join(EXPORT_FORMATS)}.")
    if fmt == "parquet":
        return atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    if fmt == "csv":
        return atomic_write(path, lambda tmp: pacsv.write_csv(_flat(table), tmp))
    lines = "".join(json.dumps(row, default=str) + "\n" for row in table.to_pylist())
    return atomic_write(path, lambda tmp: tmp.write_text(lines, encoding="utf-8"))


def _flat(table: pa.Table) -> pa.Table:
    """CSV has no lists: vectors become JSON text."""
    cols = []
    for col in table.columns:
        if pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type) or pa.types.is_struct(col.type):
            col = pa.array([json.dumps(v) for v in col.to_pylist()], pa.string())
        cols.append(col)
    return pa.Table.from_arrays(cols, names=table.column_names)


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0].rstrip(".") + "."
