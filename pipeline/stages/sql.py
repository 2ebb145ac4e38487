"""`pipeline sql`: read-only SQL over the catalog's views, with export to CSV, JSON or Parquet.

Only SELECT-like statements run (checked by DuckDB's own parser), on a read-only connection.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import Validated
from pipeline.errors import PipelineError
from pipeline.reporting import Reporter
from pipeline.store import catalog
from pipeline.store.atomic import atomic_write
from pipeline.store.layout import Store

EXPORT_FORMATS = ("csv", "json", "parquet")
_ALLOWED = {"SELECT", "EXPLAIN"}


@dataclass(frozen=True)
class SqlConfig(Validated):
    store: Store
    query: str


def run(config: SqlConfig, reporter: Reporter | None = None) -> pa.Table:
    """Run one read-only query and return its result; anything that writes is refused."""
    return run_query(config.store, config.query)


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
    text = to_text(table, fmt)
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def to_text(table: pa.Table, fmt: str) -> str:
    """CSV (with a header) or JSON lines."""
    if fmt == "csv":  # quoted only where needed, so one column pipes straight into a shell
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        flat = _flat(table)
        writer.writerow(flat.column_names)
        for batch in flat.to_batches(65536):
            writer.writerows(zip(*(c.to_pylist() for c in batch.columns), strict=True))
        return buf.getvalue()
    if fmt == "json":
        return "".join(json.dumps(row, default=str) + "\n" for row in table.to_pylist())
    raise PipelineError(f"--format {fmt} cannot be printed: give --output FILE.")


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
