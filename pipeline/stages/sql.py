"""`pipeline sql`: SQL over the store's tables that cannot change anything, by construction, and
that stops when told to.

The query runs in an in-memory DuckDB whose tables are Arrow datasets over the committed shards,
opened with file access, extension installing/loading and configuration changes switched off.
Whatever the statement (EXPLAIN ANALYZE COPY included), DuckDB itself refuses to touch a file or
the network; the worst a query can do is change its own throw-away in-memory database.
`--allow-files` lets a plain SELECT read files outside the store as well. Results go to the
terminal or, with `--output`, to a file outside the store.

Bounds: DuckDB holds its joins, sorts and aggregates to `--memory-limit` (a quarter of the machine's
memory unless told otherwise), spilling to a temp folder beyond it; the result streams out in
batches (the terminal keeps only the rows it shows, exports write batch by batch), so no result is
ever held whole. The query executes in a worker thread while this thread waits on its batches, so
Ctrl-C and `--timeout` reach DuckDB at once (`interrupt()`), whatever it is computing.
"""

from __future__ import annotations

import csv
import io
import json
import os
import queue
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as fs
import pyarrow.parquet as pq

from pipeline.choices import SqlFormat
from pipeline.config import Validated, at_least
from pipeline.errors import PipelineError, Stopped, first_line
from pipeline.reporting import Reporter
from pipeline.store import catalog, duck
from pipeline.store import manifest as manifests
from pipeline.store.atomic import atomic_write
from pipeline.store.layout import Store
from pipeline.store.outputs import check_output
from schemas import SCORES, TABLES

EXPORT_FORMATS = ("csv", "json", "parquet")
# Every page read is checked against its CRC (a few percent of a scan's time, measured in
# bench/bench_snapshot.py): a bit flipped in a data page stops the query instead of changing a value.
# No pre-buffering: it reads ahead the column chunks of a file's row groups, more the larger the file
# (a remote store's need; here files are local). See READ_AHEAD for the figures.
_PARQUET = ds.ParquetFileFormat(
    default_fragment_scan_options=ds.ParquetFragmentScanOptions(page_checksum_verification=True, pre_buffer=False))
DEFAULT_MEMORY_LIMIT = "25%"  # of the memory DuckDB finds (the machine's, or its cgroup's if lower)
BATCH_ROWS = 65536  # rows per streamed batch
# How far ahead an Arrow scan decodes. DuckDB builds a registered dataset's scanner itself, as
# `type(dataset).scanner(dataset, columns=…, filter=…)`, so pyarrow's defaults held: 16 batches of 131,072
# rows and 4 files ahead, about 2M rows decoded before DuckDB asks for them, so a query over one big file
# (the newest run's scores) grew with its rows until that was full. `_Bounded` reads 4 batches of 16,384
# rows ahead, one file ahead, without pre-buffering (`_PARQUET`). Measured on one score file, 2 threads,
# 1M -> 5M rows: peak anon 162 -> 238 MB (at 3M) under the defaults; 4 batches of 65,536 but pre-buffered
# 142 -> 170 MB; the same without pre-buffering 148 -> 148 MB, at less CPU (0.85 against 1.07 s at 5M);
# no pre-buffering alone 246 MB at 5M. Smaller row groups did not help (16,384 rows, 1M -> 3M: 155 -> 250
# MB): the read-ahead is counted in batches. Through `pipeline sql` (bench/bench_scale.py's `sql
# latest_scores`), 1M -> 5M samples: 195 -> 325 MB before; 165 -> 177 MB in batches of 65,536, 136 -> 146
# MB in batches of 16,384, at the same CPU.
READ_AHEAD = {"batch_size": 16_384, "batch_readahead": 4, "fragment_readahead": 1}
_ALLOWED = {"SELECT", "EXPLAIN"}
# DuckDB's own memory syntax (4GB, 512MiB, 1.5GiB) or a share of the machine's memory (25%).
_MEMORY = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*(%|[KMGT]i?B)\s*", re.IGNORECASE)


@dataclass(frozen=True)
class SqlConfig(Validated):
    store: Store
    query: str
    allow_files: bool = False  # let a plain SELECT read files outside the store
    format: SqlFormat = "table"  # table: for the terminal | csv, json: text | parquet: a file
    output: Path | None = None  # a file outside the store (parquet needs one)
    memory_limit: str = DEFAULT_MEMORY_LIMIT  # DuckDB's joins, sorts and aggregates; beyond it they spill
    timeout: float | None = None  # seconds the query may run (None: until it ends or Ctrl-C)
    max_rows: int = 50  # table format: the rows kept for the terminal (the query stops after them)
    sink: IO[bytes] | None = None  # csv/json without --output: where the text streams (the CLI: stdout)

    def check(self) -> None:
        if self.format == "parquet" and self.output is None:
            raise PipelineError("--format parquet writes a file: give --output FILE.")
        check_limits(self.memory_limit, self.timeout)
        at_least(self, "max_rows", 0)
        if self.output is not None:
            check_output(self.store, self.output)  # outside the store, a new or regular file


@dataclass
class SqlResult:
    table: pa.Table | None = None  # table format: the rows kept for the terminal (None: streamed or written)
    written: Path | None = None  # the --output file
    rows: int = 0  # rows the query gave (table format: shown)
    more: bool = False  # table format: the query had more rows than were kept
    seconds: float = 0.0


def run(config: SqlConfig, reporter: Reporter | None = None) -> SqlResult:
    """Run one query that cannot write or fetch anything; show, stream or export its result as asked."""
    started = time.monotonic()
    fmt = "parquet" if config.format == "table" and config.output is not None else config.format
    with open_query(config.store, config.query, config.allow_files, config.memory_limit,
                    config.timeout) as result:
        if config.output is not None:
            rows = export_batches(result.schema, result, config.output, fmt)
            return SqlResult(written=config.output, rows=rows, seconds=time.monotonic() - started)
        if fmt != "table":
            if config.sink is None:
                raise PipelineError(f"--format {fmt} needs somewhere to go: give --output FILE.")
            rows = write_text(result.schema, result, fmt, config.sink)
            return SqlResult(rows=rows, seconds=time.monotonic() - started)
        head, more = _head(result.schema, result, config.max_rows)
        return SqlResult(head, rows=head.num_rows, more=more, seconds=time.monotonic() - started)


def run_query(store: Store, sql: str, allow_files: bool = False, memory_limit: str = DEFAULT_MEMORY_LIMIT,
              timeout: float | None = None) -> pa.Table:
    """Run one query over the store's tables and return its whole result (for results known to be small)."""
    with open_query(store, sql, allow_files, memory_limit, timeout) as result:
        return pa.Table.from_batches(list(result), result.schema)


def check_limits(memory_limit: str, timeout: float | None) -> None:
    if not _MEMORY.fullmatch(memory_limit):
        raise PipelineError(f"--memory-limit must look like 4GB, 512MiB or 25% (of this machine's memory), "
                            f"not {memory_limit!r}.")
    if timeout is not None and not 0 < timeout < float("inf"):
        raise PipelineError(f"--timeout must be a number of seconds above 0, not {timeout}.")


class QueryStream:
    """The batches of one running query, with the schema known before the first one.

    DuckDB executes in a worker thread and hands batches over a queue of two, so at most a few
    batches are held whatever the result's size; this thread waits on the queue, where Ctrl-C and
    the deadline reach it, and `stop()` interrupts DuckDB wherever it is."""

    _END = object()

    def __init__(self, con: duckdb.DuckDBPyConnection, sql: str, timeout: float | None) -> None:
        self.con, self.sql, self.timeout = con, sql, timeout
        self.started = time.monotonic()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=2)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="pipeline-sql", daemon=True)
        self._thread.start()
        self.schema = pa.schema([])

    def wait_for_schema(self) -> None:
        """Wait until the query's result has a schema (DuckDB has planned it and begun)."""
        self.schema = self._next()

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        while (item := self._next()) is not self._END:
            yield item

    def stop(self) -> None:
        """Interrupt the query (if it still runs) and wait for its thread to let go of the connection."""
        self._stopping.set()
        self.con.interrupt()
        self._thread.join(timeout=30)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def _produce(self) -> None:
        try:
            reader = duck.batches(self.con.sql(self.sql), BATCH_ROWS)
            if self._put(reader.schema):
                for batch in reader:
                    if not self._put(batch):
                        return
                self._put(self._END)
        except BaseException as exc:  # handed to the waiting thread, which turns it into a sentence
            self._put(exc)

    def _put(self, item: Any) -> bool:
        while not self._stopping.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _next(self) -> Any:
        remaining = None if self.timeout is None else self.started + self.timeout - time.monotonic()
        try:
            if remaining is not None and remaining <= 0:
                raise queue.Empty
            item = self._queue.get(timeout=remaining)  # Ctrl-C interrupts this wait
        except queue.Empty:
            self.stop()
            raise PipelineError(f"The query ran past --timeout {self.timeout:g} s and was stopped (no --output "
                                "file was written or replaced): narrow it (WHERE, LIMIT) or allow it longer.") from None
        if isinstance(item, BaseException):
            raise item
        return item


@contextmanager
def open_query(store: Store, sql: str, allow_files: bool = False, memory_limit: str = DEFAULT_MEMORY_LIMIT,
               timeout: float | None = None) -> Iterator[QueryStream]:
    """The running query's stream; leaving the block (done, failed or Ctrl-C) stops it and closes DuckDB."""
    check_limits(memory_limit, timeout)
    kind = _statement_kind(sql, allow_files)
    manifests.require_store(store)
    manifest = catalog.snapshot(store).manifest
    con = sandbox(allow_files, memory_limit)
    stream: QueryStream | None = None
    try:
        _register(con, store, manifest)
        stream = QueryStream(con, sql, timeout)
        stream.wait_for_schema()
        yield stream
    except KeyboardInterrupt:
        seconds = stream.elapsed if stream is not None else 0.0
        raise Stopped(f"The query was stopped (Ctrl-C) after {seconds:.1f} s; no --output file was written "
                      "or replaced.") from None
    except duckdb.PermissionException as exc:
        raise PipelineError(
            "`pipeline sql` reads only the store's tables: "
            f"{first_line(exc).removeprefix('Permission Error: ')}"
            + ("" if allow_files or kind != "SELECT" else " (pass --allow-files to let a SELECT read other files)")
            + "."
        ) from exc
    except duckdb.OutOfMemoryException as exc:
        raise PipelineError(
            f"The query needs more memory than --memory-limit {memory_limit} lets DuckDB use, even spilling to "
            f"disk ({first_line(exc)}): narrow it, or raise --memory-limit.") from exc
    except duckdb.Error as exc:
        raise PipelineError(f"The query failed: {first_line(exc)}.") from exc
    finally:
        if stream is not None:
            stream.stop()
        con.close()


def _statement_kind(sql: str, allow_files: bool) -> str:
    """The statement's kind, or a sentence refusing it. A courtesy, not the guarantee: the sandbox is
    what makes writing impossible. PIVOT without an IN list is DuckDB's one MULTI statement (it makes a
    temporary enum of the values, then selects): harmless in the sandbox, refused with --allow-files."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise PipelineError(f"The query does not parse: {first_line(exc)}") from exc
    if len(statements) != 1:
        raise PipelineError(f"Give exactly one statement, not {len(statements)}.")
    kind = statements[0].type.name
    if kind == "MULTI" and allow_files:
        raise PipelineError("With --allow-files only a plain SELECT runs; a PIVOT without an IN (…) list is "
                            "several statements: list its values with IN (…), or drop --allow-files.")
    if kind not in ({"SELECT"} if allow_files else _ALLOWED | {"MULTI"}):
        what = "a plain SELECT" if allow_files else "SELECT (PIVOT included) or EXPLAIN"
        article = "an" if kind[:1] in "AEIOU" else "a"
        raise PipelineError(f"`pipeline sql` is read-only: {article} {kind} statement is not allowed, only {what}.")
    return kind


def sandbox(allow_files: bool = False, memory_limit: str = DEFAULT_MEMORY_LIMIT) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB that can reach no file and no network, cannot be reconfigured, and keeps its
    working memory under `memory_limit` (spilling to a temp folder of this process beyond it)."""
    spill = Path(tempfile.gettempdir()) / f"pipeline-sql-{os.getpid()}"
    try:
        return duckdb.connect(":memory:", config={
            "enable_external_access": allow_files,
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
            "allow_community_extensions": False,
            "allow_unsigned_extensions": False,
            "memory_limit": memory_limit.strip(),
            "temp_directory": str(spill),
            "lock_configuration": True,
        })
    except duckdb.Error as exc:  # a limit the pattern admits but DuckDB refuses (0%, 9999TB)
        raise PipelineError(f"--memory-limit {memory_limit}: {first_line(exc)}.") from exc


def export(table: pa.Table, path: Path, fmt: str) -> Path:
    """Write a table (already in memory) to `path` as csv, json or parquet, atomically."""
    export_batches(table.schema, table.to_batches(BATCH_ROWS), path, fmt)
    return path


def export_batches(schema: pa.Schema, batches: Iterator[pa.RecordBatch] | QueryStream, path: Path,
                   fmt: str) -> int:
    """Stream batches into `path` (a temp file renamed into place when complete); the rows written."""
    if fmt not in EXPORT_FORMATS:
        raise PipelineError(f"--format must be table or one of {', '.join(EXPORT_FORMATS)}.")
    rows = 0

    def write(tmp: Path) -> None:
        nonlocal rows
        if fmt == "parquet":
            with pq.ParquetWriter(tmp, schema) as writer:
                for batch in batches:
                    writer.write_batch(batch)
                    rows += batch.num_rows
        else:
            with open(tmp, "wb") as out:
                rows = write_text(schema, batches, fmt, out)

    try:
        atomic_write(path, write)
    except OSError as exc:
        raise PipelineError(f"--output {path} cannot be written ({exc.strerror or exc}).") from exc
    return rows


def write_text(schema: pa.Schema, batches: Iterator[pa.RecordBatch] | QueryStream, fmt: str,
               out: IO[bytes]) -> int:
    """CSV (with a header) or JSON lines, batch by batch into a binary stream; the rows written.

    The data stay data: captions go out byte for byte, control characters included (only the terminal
    table shows them escaped). BLOBs are written as DuckDB writes them as text (`\\xNN` for bytes outside
    printable ASCII), which `'…'::BLOB` reads back."""
    if fmt not in ("csv", "json"):
        raise PipelineError(f"--format {fmt} cannot be printed: give --output FILE.")
    text = io.TextIOWrapper(out, encoding="utf-8", newline="", write_through=False)
    rows = 0
    try:
        if fmt == "csv":  # quoted only where needed, so one column pipes straight into a shell
            writer = csv.writer(text, lineterminator="\n")
            writer.writerow(schema.names)
            for batch in batches:
                columns = [[_csv_value(v) for v in col.to_pylist()] for col in batch.columns]
                writer.writerows(zip(*columns, strict=True))
                rows += batch.num_rows
                text.flush()
        else:
            for batch in batches:
                text.writelines(json.dumps(row, default=_jsonable, ensure_ascii=False) + "\n"
                                for row in batch.to_pylist())
                rows += batch.num_rows
                text.flush()
    finally:
        text.flush()
        text.detach()  # the caller owns `out` (stdout stays open)
    return rows


def to_text(table: pa.Table, fmt: str) -> str:
    """CSV (with a header) or JSON lines of a table in memory."""
    buf = io.BytesIO()
    write_text(table.schema, table.to_batches(BATCH_ROWS), fmt, buf)
    return buf.getvalue().decode("utf-8")


def blob_text(value: bytes | bytearray) -> str:
    """A BLOB as DuckDB casts it to text: printable ASCII as itself, other bytes (and \\ and ') as \\xNN."""
    return "".join(chr(b) if 32 <= b < 127 and b not in (0x5C, 0x27) else f"\\x{b:02X}" for b in value)


def _jsonable(value: Any) -> Any:
    """What JSON has no type for: BLOBs as DuckDB's text of them, the rest (times, decimals) as text."""
    return blob_text(value) if isinstance(value, bytes | bytearray) else str(value)


def _csv_value(value: Any) -> Any:
    """CSV has no lists or structs: those become JSON text; BLOBs DuckDB's text of them."""
    if isinstance(value, list | dict):
        return json.dumps(value, default=_jsonable, ensure_ascii=False)
    if isinstance(value, bytes | bytearray):
        return blob_text(value)
    return value


def _head(schema: pa.Schema, batches: QueryStream, max_rows: int) -> tuple[pa.Table, bool]:
    """The first `max_rows` rows, and whether the query had more (it is stopped there: a terminal
    shows a few rows, and the query behind them may be endless)."""
    kept: list[pa.RecordBatch] = []
    rows = 0
    for batch in batches:
        if rows + batch.num_rows > max_rows:
            kept.append(batch.slice(0, max_rows - rows))
            return pa.Table.from_batches(kept, schema), True
        kept.append(batch)
        rows += batch.num_rows
    return pa.Table.from_batches(kept, schema), False


def _register(con: duckdb.DuckDBPyConnection, store: Store, manifest: manifests.Manifest) -> None:
    """Each table as an Arrow dataset over its committed shards: DuckDB reads through Arrow, never
    opening a file itself. Files lacking newer columns read them as NULL (the declared schema)."""
    root = store.root.resolve()
    for name, schema in TABLES.items():
        paths = [str(root / s.path) for s in manifest.of(name)]
        con.register(f"_{name}", _bounded(ds.dataset(paths, schema=schema, format=_PARQUET)) if paths
                     else schema.empty_table())
        con.execute(f"CREATE VIEW {'samples_all' if name == 'samples' else name} AS SELECT * FROM _{name}")
    con.execute(f"CREATE VIEW samples AS {catalog.samples_view(manifest)}")
    con.execute(f"CREATE VIEW conflicts AS {catalog.conflicts_view(manifest)}")
    con.execute(f"CREATE VIEW alarms AS {catalog.alarms_view()}")  # (from runs.metrics_json)
    parts = []
    for i, key in enumerate(sorted({s.model_key for s in manifest.of("embeddings") if s.model_key})):
        paths = [str(root / s.path) for s in manifest.of("embeddings", key)]
        newest = _widen(pq.read_schema(paths[-1]))  # shards named by time: the newest has every column
        con.register(f"_embeddings_{i}", _bounded(ds.dataset(paths, schema=newest, format=_PARQUET)))
        norm = "norm" if "norm" in newest.names else "NULL::FLOAT AS norm"
        parts.append(f"SELECT model_key, modality, content_hash, CAST(vector AS FLOAT[]) AS vector, {norm} "
                     f"FROM _embeddings_{i}")
    empty = ("SELECT NULL::VARCHAR AS model_key, NULL::VARCHAR AS modality, NULL::VARCHAR AS content_hash, "
             "NULL::FLOAT[] AS vector, NULL::FLOAT AS norm WHERE false")
    con.execute(f"CREATE VIEW embeddings AS {' UNION ALL '.join(parts) or empty}")
    _register_latest(con, root, manifest)


def _register_latest(con: duckdb.DuckDBPyConnection, root: Path, manifest: manifests.Manifest) -> None:
    """`latest_scores` over the newest run's files only, and `scores_of(run)`, which skips other runs'
    files (see `catalog.LATEST_RUN`): DuckDB pushes no `run_id = (SELECT …)` into an Arrow scan, so
    without them the natural question reads every run's scores."""
    shards = manifest.of("scores")
    if shards:  # each file's run as its partition: a constant `run_id` filter skips other runs' files unopened
        known = [pc.field("run_id") == run if (run := catalog.run_of(s)) else pc.scalar(True) for s in shards]
        con.register("_scores", _bounded(ds.FileSystemDataset.from_paths(
            [str(root / s.path) for s in shards], schema=SCORES, format=_PARQUET,
            filesystem=fs.LocalFileSystem(), partitions=known)))
    latest = catalog.latest_run(con) if shards else None
    paths = [str(root / s.path) for s in catalog.run_scores(manifest, latest)] if latest else []
    con.register("_latest_scores", _bounded(ds.dataset(paths, schema=SCORES, format=_PARQUET)) if paths
                 else SCORES.empty_table())
    where = f" WHERE run_id = {duck.literal(latest)}" if latest else ""
    con.execute(f"CREATE VIEW latest_scores AS SELECT * FROM _latest_scores{where}")
    con.execute(f"CREATE MACRO scores_of(run) AS TABLE {catalog.SCORES_OF}")


class _Bounded(ds.FileSystemDataset):
    """A file dataset whose every scan reads ahead at most `READ_AHEAD`, whoever builds the scanner
    (DuckDB passes only the columns and the filter)."""

    def scanner(self, **kwargs: Any) -> ds.Scanner:
        return super().scanner(**{**READ_AHEAD, **kwargs})


def _bounded(dataset: ds.Dataset) -> _Bounded:
    """The same files, schema, format and partitions, scanned with bounded read-ahead."""
    assert isinstance(dataset, ds.FileSystemDataset)
    return _Bounded(list(dataset.get_fragments()), dataset.schema, dataset.format, dataset.filesystem)


def _widen(schema: pa.Schema) -> pa.Schema:
    """float16 vectors read as float32: DuckDB's Arrow scan has no half floats (Arrow casts while reading)."""
    fields = []
    for f in schema:
        if pa.types.is_fixed_size_list(f.type) and pa.types.is_float16(f.type.value_type):
            f = f.with_type(pa.list_(pa.float32(), f.type.list_size))
        fields.append(f)
    return pa.schema(fields, metadata=schema.metadata)
