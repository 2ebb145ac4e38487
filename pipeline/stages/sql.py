"""`pipeline sql`: SQL over the store's tables that cannot change anything, by construction.

The query runs in an in-memory DuckDB whose tables are Arrow datasets over the committed shards,
opened with file access, extension installing/loading and configuration changes switched off.
Whatever the statement (EXPLAIN ANALYZE COPY included), DuckDB itself refuses to touch a file or
the network; the worst a query can do is change its own throw-away in-memory database.
`--allow-files` lets a plain SELECT read files outside the store as well. Results go to the
terminal or, with `--output`, to a file outside the store.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline.choices import SqlFormat
from pipeline.config import Validated
from pipeline.errors import PipelineError, first_line
from pipeline.reporting import Reporter
from pipeline.store import catalog
from pipeline.store import manifest as manifests
from pipeline.store.atomic import atomic_write
from pipeline.store.layout import Store
from schemas import TABLES

EXPORT_FORMATS = ("csv", "json", "parquet")
_ALLOWED = {"SELECT", "EXPLAIN"}


@dataclass(frozen=True)
class SqlConfig(Validated):
    store: Store
    query: str
    allow_files: bool = False  # let a plain SELECT read files outside the store
    format: SqlFormat = "table"  # table: for the terminal | csv, json: text | parquet: a file
    output: Path | None = None  # a file outside the store (parquet needs one)

    def check(self) -> None:
        if self.format == "parquet" and self.output is None:
            raise PipelineError("--format parquet writes a file: give --output FILE.")
        if self.output is not None:
            check_output(self.store, self.output)


@dataclass
class SqlResult:
    table: pa.Table
    written: Path | None = None  # the --output file
    text: str | None = None  # csv or json for stdout


def run(config: SqlConfig, reporter: Reporter | None = None) -> SqlResult:
    """Run one query that cannot write or fetch anything; write or format its result as asked."""
    table = run_query(config.store, config.query, config.allow_files)
    if config.output is not None:
        return SqlResult(table, written=export(table, config.output, "parquet" if config.format == "table"
                                               else config.format))
    if config.format != "table":
        return SqlResult(table, text=to_text(table, config.format))
    return SqlResult(table)


def run_query(store: Store, sql: str, allow_files: bool = False) -> pa.Table:
    """Run one query over the store's tables and return its result."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise PipelineError(f"The query does not parse: {first_line(exc)}") from exc
    if len(statements) != 1:
        raise PipelineError(f"Give exactly one statement, not {len(statements)}.")
    kind = statements[0].type.name
    # A courtesy, not the guarantee: the sandbox below is what makes writing impossible.
    if kind not in (_ALLOWED if not allow_files else {"SELECT"}):
        what = "a plain SELECT" if allow_files else "SELECT or EXPLAIN"
        raise PipelineError(f"`pipeline sql` is read-only: a {kind} statement is not allowed, only {what}.")
    manifests.require_store(store)
    manifest = catalog.snapshot(store).manifest
    con = sandbox(allow_files)
    try:
        _register(con, store, manifest)
        return con.sql(sql).to_arrow_table()
    except duckdb.PermissionException as exc:
        raise PipelineError(
            "`pipeline sql` reads only the store's tables: "
            f"{first_line(exc).removeprefix('Permission Error: ')}"
            + ("" if allow_files or kind != "SELECT" else " (pass --allow-files to let a SELECT read other files)")
            + "."
        ) from exc
    except duckdb.Error as exc:
        raise PipelineError(f"The query failed: {first_line(exc)}.") from exc
    finally:
        con.close()


def sandbox(allow_files: bool = False) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB that can reach no file and no network, and cannot be reconfigured."""
    spill = Path(tempfile.gettempdir()) / f"pipeline-sql-{os.getpid()}"
    return duckdb.connect(":memory:", config={
        "enable_external_access": allow_files,
        "autoinstall_known_extensions": False,
        "autoload_known_extensions": False,
        "allow_community_extensions": False,
        "allow_unsigned_extensions": False,
        "temp_directory": str(spill),
        "lock_configuration": True,
    })


def check_output(store: Store, path: Path) -> None:
    """Refuse an export path inside the store, a directory, or a folder that cannot be written."""
    target = path.expanduser().resolve()
    root = store.root.expanduser().resolve()
    if target == root or root in target.parents:
        raise PipelineError(f"--output {path} is inside the store {store.root}; write the result elsewhere.")
    if target.is_dir():
        raise PipelineError(f"--output {path} is a directory; give a file name.")
    parent = target.parent
    if not parent.is_dir():
        raise PipelineError(f"--output {path}: the folder {parent} does not exist.")
    if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise PipelineError(f"--output {path} cannot be written (permission denied).")


def export(table: pa.Table, path: Path, fmt: str) -> Path:
    if fmt not in EXPORT_FORMATS:
        raise PipelineError(f"--format must be table or one of {', '.join(EXPORT_FORMATS)}.")
    try:
        if fmt == "parquet":
            return atomic_write(path, lambda tmp: pq.write_table(table, tmp))
        text = to_text(table, fmt)
        return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    except OSError as exc:
        raise PipelineError(f"--output {path} cannot be written ({exc.strerror or exc}).") from exc


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


def _register(con: duckdb.DuckDBPyConnection, store: Store, manifest: manifests.Manifest) -> None:
    """Each table as an Arrow dataset over its committed shards: DuckDB reads through Arrow, never
    opening a file itself. Files lacking newer columns read them as NULL (the declared schema)."""
    root = store.root.resolve()
    for name, schema in TABLES.items():
        paths = [str(root / s.path) for s in manifest.of(name)]
        con.register(f"_{name}", ds.dataset(paths, schema=schema, format="parquet") if paths else schema.empty_table())
        con.execute(f"CREATE VIEW {'samples_all' if name == 'samples' else name} AS SELECT * FROM _{name}")
    con.execute(f"CREATE VIEW samples AS {catalog.samples_view(manifest)}")
    con.execute(f"CREATE VIEW conflicts AS {catalog.conflicts_view(manifest)}")
    parts = []
    for i, key in enumerate(sorted({s.model_key for s in manifest.of("embeddings") if s.model_key})):
        paths = [str(root / s.path) for s in manifest.of("embeddings", key)]
        newest = _widen(pq.read_schema(paths[-1]))  # shards named by time: the newest has every column
        con.register(f"_embeddings_{i}", ds.dataset(paths, schema=newest, format="parquet"))
        norm = "norm" if "norm" in newest.names else "NULL::FLOAT AS norm"
        parts.append(f"SELECT model_key, modality, content_hash, CAST(vector AS FLOAT[]) AS vector, {norm} "
                     f"FROM _embeddings_{i}")
    empty = ("SELECT NULL::VARCHAR AS model_key, NULL::VARCHAR AS modality, NULL::VARCHAR AS content_hash, "
             "NULL::FLOAT[] AS vector, NULL::FLOAT AS norm WHERE false")
    con.execute(f"CREATE VIEW embeddings AS {' UNION ALL '.join(parts) or empty}")


def _widen(schema: pa.Schema) -> pa.Schema:
    """float16 vectors read as float32: DuckDB's Arrow scan has no half floats (Arrow casts while reading)."""
    fields = []
    for f in schema:
        if pa.types.is_fixed_size_list(f.type) and pa.types.is_float16(f.type.value_type):
            f = f.with_type(pa.list_(pa.float32(), f.type.list_size))
        fields.append(f)
    return pa.schema(fields, metadata=schema.metadata)


def _flat(table: pa.Table) -> pa.Table:
    """CSV has no lists: vectors become JSON text."""
    cols = []
    for col in table.columns:
        if pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type) or pa.types.is_struct(col.type):
            col = pa.array([json.dumps(v) for v in col.to_pylist()], pa.string())
        cols.append(col)
    return pa.Table.from_arrays(cols, names=table.column_names)
