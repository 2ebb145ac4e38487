"""DuckDB, the way every module here uses it: values as parameters, bounded memory, streamed results.

Values travel as prepared-statement parameters wherever DuckDB takes them (`read_parquet(?)`,
`SET memory_limit = ?`). Only a view definition cannot be prepared: `literal` quotes a string for
one, and is the only place a value is spliced into SQL text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa


def literal(text: str) -> str:
    """`text` as a SQL string literal (for view definitions, which take no parameters)."""
    return "'" + text.replace("'", "''") + "'"


def limit_memory(con: duckdb.DuckDBPyConnection, memory: str, spill: Path, threads: int | None = None) -> None:
    """Hold a DuckDB connection's sorts, joins and aggregates to `memory`, spilling to `spill`."""
    spill.mkdir(parents=True, exist_ok=True)
    con.execute("SET memory_limit = ?", [memory])
    con.execute("SET temp_directory = ?", [str(spill)])
    if threads is not None:
        con.execute("SET threads = ?", [int(threads)])


def batches(rel: Any, rows: int) -> pa.RecordBatchReader:
    """A relation's result as a reader of Arrow record batches of about `rows` rows, streamed (never all
    at once); its `schema` is known before the first batch, even when there is none."""
    stream = getattr(rel, "to_arrow_reader", None) or rel.fetch_record_batch  # DuckDB 2 / 1
    return stream(rows)
