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


# Threads of a bounded query. DuckDB runs one thread per core and part of its need is per thread: at 5M
# samples `status`'s distinct count failed in 64 MB on 16 threads and the loader's sort in 256 MB on 8,
# where both fit on 2 (the sort then in 128 MB too); this 2-core box never showed it. A bounded query
# feeds one consumer (a stream of batches, a count), so more threads buy little.
BOUNDED_THREADS = 2


def limit_memory(con: duckdb.DuckDBPyConnection, memory: str, spill: Path, threads: int = BOUNDED_THREADS) -> None:
    """Hold a DuckDB connection's sorts, joins and aggregates to `memory` on `threads` threads, spilling to
    `spill`."""
    spill.mkdir(parents=True, exist_ok=True)
    con.execute("SET memory_limit = ?", [memory])
    try:
        con.execute("SET temp_directory = ?", [str(spill)])
    except duckdb.NotImplementedException:
        # A database that has spilled keeps its temp directory (DuckDB refuses to switch it, even to the
        # same path): a second bounded query on a command's snapshot connection spills there too.
        if not con.execute("SELECT current_setting('temp_directory')").fetchall()[0][0]:
            raise
    con.execute("SET threads = ?", [int(threads)])


def out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is DuckDB running out of its memory limit. Raised while a query starts, it is a
    `duckdb.OutOfMemoryException`; raised while its result streams through `batches` (a sort or a join
    that stops fitting halfway, as the training view at 5M samples), pyarrow hands it on as an `OSError`
    carrying DuckDB's message."""
    if isinstance(exc, duckdb.OutOfMemoryException):
        return True
    return isinstance(exc, OSError) and str(exc).startswith("Out of Memory Error")


def batches(rel: Any, rows: int) -> pa.RecordBatchReader:
    """A relation's result as a reader of Arrow record batches of about `rows` rows, streamed (never all
    at once); its `schema` is known before the first batch, even when there is none."""
    stream = getattr(rel, "to_arrow_reader", None) or rel.fetch_record_batch  # DuckDB 2 / 1
    return stream(rows)


_TYPES = {"string": "VARCHAR", "large_string": "VARCHAR", "bool": "BOOLEAN", "int8": "TINYINT", "int16": "SMALLINT",
          "int32": "INTEGER", "int64": "BIGINT", "uint8": "UTINYINT", "uint16": "USMALLINT", "uint32": "UINTEGER",
          "uint64": "UBIGINT", "halffloat": "FLOAT", "float": "FLOAT", "double": "DOUBLE", "binary": "BLOB",
          "large_binary": "BLOB"}


def sql_type(arrow: pa.DataType) -> str:
    """DuckDB's name of an Arrow type (for `NULL::TYPE` in a view), without handing DuckDB an Arrow
    object: registering one imports pandas, a second of start-up for every command."""
    if pa.types.is_timestamp(arrow):
        return "TIMESTAMP WITH TIME ZONE" if arrow.tz else "TIMESTAMP"
    if pa.types.is_fixed_size_list(arrow):
        return f"{sql_type(arrow.value_type)}[{arrow.list_size}]"
    if pa.types.is_list(arrow) or pa.types.is_large_list(arrow):
        return f"{sql_type(arrow.value_type)}[]"
    if str(arrow) not in _TYPES:
        raise TypeError(f"no DuckDB type known for {arrow}")
    return _TYPES[str(arrow)]
