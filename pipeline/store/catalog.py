"""The catalog as readers see it: one snapshot of the committed shards, and SQL views over them.

Readers build their views from the manifest (`pipeline.store.manifest`) in an in-memory DuckDB:
they never open a database file another process writes, so they never wait and never see half a
commit. A command reads the manifest once (and checks its shards once) per version of it: the
`Snapshot` travels with the `Store` object the command passes down, and is read again only when
`manifest.json` was replaced (by this process' own commits or another writer's). Its DuckDB
connection, with the views defined, is opened on first use and kept; each query runs on a cursor
of it. `catalog.duckdb` is a convenience copy for people who open the store with their own DuckDB;
the writer rebuilds it beside the old one and swaps it in (`write_catalog_file`). Its views find the
shards beside the file, from any working directory and after the store moved (`STORE_ROOT_MACRO`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa

from pipeline.errors import PipelineError, first_line
from pipeline.store.atomic import atomic_write, remove_stale_temps
from pipeline.store.duck import literal, sql_type
from pipeline.store.layout import Store
from pipeline.store.manifest import (
    REPAIR,
    Manifest,
    Shard,
    check_shards,
    exists,
    read_manifest,
    require_store,
    stat_problem,
)
from schemas import ALARMS, SCORES, TABLES


@dataclass
class Snapshot:
    """The committed state of a store at one version of its manifest, with a lazily opened DuckDB."""

    store: Store
    manifest: Manifest
    stamp: tuple[int, int, int] | None  # (inode, size, mtime) of the manifest file this was read from
    _con: duckdb.DuckDBPyConnection | None = field(default=None, repr=False)

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        """The snapshot's DuckDB, its views defined on first use."""
        if self._con is None:
            con = duckdb.connect(":memory:")
            con.execute("SET file_search_path = ?", [str(self.store.root.resolve())])
            _define_views(con, self.store, self.manifest, relative=False)
            self._con = con
        return self._con

    def shard_paths(self, dataset: str, model_key: str | None = None) -> list[Path]:
        """Absolute paths of a dataset's committed shards (optionally of one model), in name order."""
        return [self.store.root / s.path for s in self.manifest.of(dataset, model_key)]

    def model_keys(self) -> list[str]:
        return sorted({s.model_key for s in self.manifest.of("embeddings") if s.model_key})

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None


def snapshot(store: Store) -> Snapshot:
    """The store's committed state now: the snapshot this `Store` object already holds while the
    manifest file is unchanged, else a new one (manifest read, every shard checked: a damaged or
    replaced one stops with a sentence naming it)."""
    if store.root.exists() and not store.root.is_dir():
        raise PipelineError(f"--store {store.root} is a file, not a store directory.")
    stamp = _stamp(store)
    held = store.snapshot_slot
    if held and held[0].stamp == stamp and stamp is not None:
        return held[0]
    if not held:
        sweep_dead_temps(store)
    manifest = read_manifest(store)
    check_shards(store, manifest)
    snap = Snapshot(store, manifest, stamp)
    if held:
        held.pop().close()
    held.append(snap)
    return snap


# Where readers write temp files (report's group keys beside the scores, pages, derived caches) and
# workers write staged shards: a reader killed there leaves a temp that no writer may come to sweep.
READER_TEMPS = (("scores", False), ("reports", True), ("cache", True), ("staging", True))


def sweep_dead_temps(store: Store) -> int:
    """Remove the temp files of dead processes where readers and workers write them (each command does,
    once, with its first snapshot: a stat per file in those folders); writers sweep the whole store."""
    return sum(remove_stale_temps(store.root / folder, recursive, strict=False) for folder, recursive in READER_TEMPS)


def forget_snapshot(store: Store) -> None:
    """Drop the snapshot this Store object carries: the next read takes a new one (manifest read, every
    shard checked), as a new command would."""
    while store.snapshot_slot:
        store.snapshot_slot.pop().close()


@contextmanager
def connect(store: Store) -> Iterator[duckdb.DuckDBPyConnection]:
    """A cursor on the snapshot's DuckDB with the views `samples`, `embeddings`, … over the committed
    shards. A DuckDB error that names a shard becomes a sentence naming it."""
    require_store(store)
    snap = snapshot(store)
    cursor = snap.con.cursor()
    cursor.execute("SET file_search_path = ?", [str(store.root.resolve())])  # (a connection's own setting)
    try:
        yield cursor
    except duckdb.Error as exc:
        raise _read_error(snap.manifest, exc) from exc
    finally:
        cursor.close()


def shard_paths(store: Store, dataset: str, model_key: str | None = None) -> list[Path]:
    """Absolute paths of a dataset's committed shards (optionally of one model), in name order."""
    return snapshot(store).shard_paths(dataset, model_key) if exists(store) else []


def query(store: Store, sql: str, params: list[object] | dict[str, object] | None = None) -> pa.Table:
    """Run a query against the views and return an Arrow table."""
    with connect(store) as con:
        return con.sql(sql, params=params or None).to_arrow_table()


def query_with(store: Store, sql: str, tables: dict[str, pa.Table],
               params: list[object] | dict[str, object] | None = None) -> pa.Table:
    """`query` with Arrow tables registered under the given names for the duration of the query."""
    with connect(store) as con:
        for name, table in tables.items():
            con.register(name, table)
        return con.sql(sql, params=params or None).to_arrow_table()


def model_keys(store: Store) -> list[str]:
    return snapshot(store).model_keys() if exists(store) else []


# DuckDB resolves a relative path in a view against the working directory, and has no notion of a
# path relative to a database file. A database file's default `temp_directory` is `<file>.tmp`, beside
# it: so the folder of `catalog.duckdb` is the directory part of that setting, whatever the working
# directory and wherever the store was moved. Where that does not hold (the file ATTACHed to another
# database, or `temp_directory` set by hand), `SET VARIABLE pipeline_store = 'path/to/store'` says it.
STORE_ROOT_MACRO = (
    "CREATE MACRO store_root() AS coalesce(getvariable('pipeline_store'), "
    "coalesce(nullif(parse_dirpath(current_setting('temp_directory')), ''), '.'))"
)


def write_catalog_file(store: Store) -> None:
    """Write `catalog.duckdb` (table `shards`, macro `store_root()`, views over the shards by their paths
    relative to the store, joined to `store_root()` when a query binds) beside, then swap.
    A committed shard that is damaged is left out of this copy (the pipeline's own readers name it).
    Only the holder of the writer lock calls it (`pipeline.store.commit`)."""
    manifest = read_manifest(store)
    for rel, shard in list(manifest.shards.items()):
        if stat_problem(store, shard):
            del manifest.shards[rel]

    def build(tmp: Path) -> None:
        tmp.unlink(missing_ok=True)
        con = duckdb.connect(str(tmp))
        try:
            # (while it is written the file has a temp name: the views bind against the store named here)
            con.execute(f"SET VARIABLE pipeline_store = {literal(str(store.root.resolve()))}")
            con.execute("BEGIN")  # one commit (and one fsync of DuckDB's log), not one per statement
            con.execute(STORE_ROOT_MACRO)
            con.execute(
                "CREATE TABLE shards (path VARCHAR PRIMARY KEY, dataset VARCHAR NOT NULL, "
                "model_key VARCHAR, num_rows BIGINT NOT NULL)"
            )
            shards = list(manifest.shards.values())
            # (one statement of lists: `executemany` measured 7 s for 3,400 rows, this 0.07 s)
            con.execute("INSERT INTO shards SELECT unnest(?::VARCHAR[]), unnest(?::VARCHAR[]), "
                        "unnest(?::VARCHAR[]), unnest(?::BIGINT[])",
                        [[s.path for s in shards], [s.dataset for s in shards], [s.model_key for s in shards],
                         [s.num_rows for s in shards]])
            _define_views(con, store, manifest, relative=True)
            con.execute("COMMIT")
            con.execute("CHECKPOINT")
        finally:
            con.close()
        Path(str(tmp) + ".wal").unlink(missing_ok=True)

    atomic_write(store.catalog_path, build)
    Path(str(store.catalog_path) + ".wal").unlink(missing_ok=True)


def _stamp(store: Store) -> tuple[int, int, int] | None:
    """What says the manifest file was replaced: a commit renames a new file into place."""
    for path in (store.manifest_path, store.catalog_path):  # (a store from before manifests: its catalog)
        try:
            st = os.stat(path)
        except OSError:
            continue
        return st.st_ino, st.st_size, st.st_mtime_ns
    return None


def _read_error(manifest: Manifest, exc: duckdb.Error) -> Exception:
    """A DuckDB error while reading: name the shard if one is to blame, else pass the error on."""
    text = str(exc)
    for rel in manifest.shards:
        if rel in text:
            return PipelineError(f"Shard {rel} is damaged ({first_line(exc).rstrip('.')}); {REPAIR}.")
    return exc


def _define_views(con: duckdb.DuckDBPyConnection, store: Store, manifest: Manifest, relative: bool) -> None:
    """The views over the committed shards: by absolute path (a snapshot), or by the path relative to the
    store, joined to `store_root()` (the `catalog.duckdb` file)."""
    files = _relative_files if relative else _absolute_files(store.root.resolve())
    for dataset, schema in TABLES.items():
        shards = manifest.of(dataset)
        body = _select(con, schema, files(shards), shards) if shards else _empty_select(con, schema)
        name = "samples_all" if dataset == "samples" else dataset
        con.execute(f"CREATE OR REPLACE VIEW {name} AS {body}")
    con.execute(f"CREATE OR REPLACE VIEW samples AS {samples_view(manifest)}")
    con.execute(f"CREATE OR REPLACE VIEW conflicts AS {conflicts_view(manifest)}")
    con.execute(f"CREATE OR REPLACE VIEW embeddings AS {_embeddings_select(manifest, files)}")
    con.execute(f"CREATE OR REPLACE VIEW alarms AS {alarms_view()}")
    latest = latest_run(con) if manifest.of("scores") else None
    shards = run_scores(manifest, latest) if latest else []
    body = (f"SELECT * FROM ({_select(con, SCORES, files(shards), shards)}) WHERE run_id = {literal(latest)}"
            if latest and shards else _empty_select(con, SCORES))
    con.execute(f"CREATE OR REPLACE VIEW latest_scores AS {body}")
    con.execute(f"CREATE OR REPLACE MACRO scores_of(run) AS TABLE {SCORES_OF}")


# The views and macro that make "the scores of one run" read that run's files only. A filter
# `run_id = (SELECT … FROM runs …)` is known only while the query runs: DuckDB's own Parquet reader
# (2.0) skips other runs' row groups with it, but an Arrow dataset (`pipeline sql`) or an older DuckDB
# opening catalog.duckdb reads every run's scores. `latest_scores` names the newest run's files and
# its id as a constant; `scores_of('<run_id>')` is a constant filter every reader pushes down.
LATEST_RUN = "SELECT run_id FROM runs ORDER BY created_at DESC, run_id DESC LIMIT 1"
SCORES_OF = "SELECT * FROM scores WHERE run_id = run"


def latest_run(con: duckdb.DuckDBPyConnection) -> str | None:
    """The newest run's id (by `created_at`), read through a connection whose `runs` view is defined."""
    rows = con.execute(LATEST_RUN).fetchall()  # (all: a result left open blocks the connection)
    return rows[0][0] if rows else None


def run_of(shard: Shard) -> str | None:
    """The run whose scores a scores shard holds, from its manifest counts; None where not known
    (a manifest from before it counted scores, or an empty file)."""
    return shard.counts[0][0] if shard.counts is not None and len(shard.counts) == 1 else None


def run_scores(manifest: Manifest, run_id: str) -> list[Shard]:
    """The scores shards that may hold `run_id`'s rows: its own, and any whose run is not known."""
    return [s for s in manifest.of("scores") if run_of(s) in (run_id, None)]


def alarms_view() -> str:
    """`alarms`: one row per alarm a run stored in its metrics (`metrics_json`'s "alarms"), evidence as JSON.

    Derived from `runs` rather than written as a dataset of its own: a run's metrics are the one record
    of its alarms, so the two cannot disagree, and there is no second file to write, commit or sweep.
    (A run trained before alarms were stored has no rows here.)"""
    columns = {
        "run_id": "run_id",
        "kind": "json_extract_string(alarm, '$.kind')",
        "sentence": "json_extract_string(alarm, '$.sentence')",
        "evidence": "json_extract(alarm, '$.evidence')::VARCHAR",
    }
    select = ", ".join(f'{columns[f.name]} AS "{f.name}"' for f in ALARMS)  # (the declared columns, in order)
    return f"SELECT {select} FROM (SELECT run_id, unnest(json_extract(metrics_json, '$.alarms[*]')) AS alarm FROM runs)"


FileList = Callable[[list[Shard]], str]  # shards -> a SQL list expression of their paths


def _absolute_files(root: Path) -> FileList:
    return lambda shards: "[" + ", ".join(literal(str(root / s.path)) for s in shards) + "]"


def _relative_files(shards: list[Shard]) -> str:
    # One `store_root()` per path would cost DuckDB about 0.3 ms each at every bind (a second at D3's
    # 3,000 shards); one lambda over the list binds as fast as literal paths.
    listed = ", ".join(literal(s.path) for s in shards)
    return f"list_transform([{listed}], {_LAMBDA} store_root() || '/' || p)"


# DuckDB 1.3 brought `lambda p: …` and 2.0 refuses the older `p -> …` unless told otherwise: the file is
# written in the syntax of the DuckDB writing it (the one its readers most likely have).
_LAMBDA = "lambda p:" if tuple(int(x) for x in duckdb.__version__.split(".")[:2]) >= (1, 3) else "p ->"


def samples_view(manifest: Manifest) -> str:
    """`samples`: `samples_all` as training sees it. Rows are never rewritten; what changes a sample's
    label is a row of `decisions`, written only by a command a user runs (and reversed by another):

    - the same bytes brought again under another label do not touch the sample: the claim is kept in
      `quarantine` (reason `label_conflict`, with the claimed label) and listed in `conflicts`;
    - `pipeline conflicts resolve` relabels a sample (`relabel`), leaves it out (`exclude`) or puts it
      back as ingested (`restore`, its undo); the latest of these per sample holds;
    - an unlabelled sample that a later ingest brought with a label keeps its labelled row only;
    - a conflict recorded before claims kept their label (its `label` is NULL) still leaves its sample
      out, as it did then, until resolved.

    Each clause is added only when the store holds what it reads: a plain store reads `samples_all`."""
    decided = bool(manifest.of("decisions"))
    quarantined = bool(manifest.of("quarantine"))
    if not decided and not quarantined:
        return "SELECT * FROM samples_all"
    where = []
    source = "samples_all s"
    columns = "s.*"
    if decided:
        source += f" LEFT JOIN ({LATEST_DECISION}) d ON d.sample_id = s.sample_id"
        columns = ("s.* REPLACE (CASE WHEN d.action = 'relabel' THEN d.label ELSE s.label END AS label, "
                   "CASE WHEN d.action = 'relabel' THEN d.generator ELSE s.generator END AS generator)")
        where.append("d.action IS DISTINCT FROM 'exclude'")
        where.append("NOT (s.label IS NULL AND s.sample_id IN "
                     "(SELECT sample_id FROM decisions WHERE action = 'labelled'))")
    if quarantined:
        undecided = "coalesce(d.action, 'restore') = 'restore' AND " if decided else ""
        where.append(f"NOT ({undecided}s.sample_id IN ({LEGACY_CONFLICTS}))")
    return f"SELECT {columns} FROM {source} WHERE {' AND '.join(where)}"


# The user's latest label decision per sample (`pipeline conflicts resolve`); ingest's `labelled` rows are not one.
LATEST_DECISION = ("SELECT sample_id, action, label, generator, decided_at FROM decisions "
                   "WHERE action IN ('relabel', 'exclude', 'restore') "
                   "QUALIFY row_number() OVER (PARTITION BY sample_id ORDER BY decided_at DESC, action) = 1")
# Conflicts recorded before claims kept their label: their samples stay out until resolved, as they were.
LEGACY_CONFLICTS = ("SELECT content_hash FROM quarantine WHERE reason = 'label_conflict' AND label IS NULL "
                    "AND content_hash IS NOT NULL")


def conflicts_view(manifest: Manifest) -> str:
    """`conflicts`: one row per content brought under two labels: the label training uses now (`label`,
    NULL when the sample is left out), what was stored first, what the other source(s) claimed, and
    whether a user resolved it (`status`: open | relabelled | excluded | left out (recorded before
    claims kept their label))."""
    decided = f"LEFT JOIN ({LATEST_DECISION}) d ON d.sample_id = c.sample_id" if manifest.of("decisions") else \
        "LEFT JOIN (SELECT NULL::VARCHAR AS sample_id, NULL::VARCHAR AS action) d ON false"
    return f"""
        WITH c AS (
            SELECT content_hash AS sample_id, count(*) AS claims,
                   any_value(label) FILTER (WHERE label IS NOT NULL) AS claimed_label,
                   any_value(generator) FILTER (WHERE label IS NOT NULL) AS claimed_generator,
                   bool_or(label IS NULL) AS legacy, min(recorded_at) AS first_claimed,
                   any_value(source_uri) AS claimed_at, any_value(detail) AS detail
            FROM quarantine WHERE reason = 'label_conflict' AND content_hash IS NOT NULL GROUP BY 1
        ), stored AS (
            SELECT sample_id, arg_min(label, ingested_at) AS label, arg_min(generator, ingested_at) AS generator,
                   arg_min(split, ingested_at) AS split, arg_min(source_uri, ingested_at) AS source_uri
            FROM samples_all WHERE label IS NOT NULL AND sample_id IN (SELECT sample_id FROM c) GROUP BY 1
        ), used AS (
            SELECT sample_id, any_value(label) AS label, any_value(generator) AS generator FROM samples
            WHERE sample_id IN (SELECT sample_id FROM c) GROUP BY 1
        )
        SELECT c.sample_id, st.split, u.label, u.generator, st.label AS stored_label,
               st.generator AS stored_generator, st.source_uri AS stored_at, c.claimed_label,
               c.claimed_generator, c.claimed_at, c.claims,
               CASE WHEN d.action = 'relabel' THEN 'relabelled' WHEN d.action = 'exclude' THEN 'excluded'
                    WHEN c.legacy THEN 'left out (recorded before claims kept their label)' ELSE 'open' END
                   AS status,
               c.first_claimed, c.detail
        FROM c LEFT JOIN stored st ON st.sample_id = c.sample_id LEFT JOIN used u ON u.sample_id = c.sample_id
        {decided}
        ORDER BY c.first_claimed, c.sample_id
    """


def _select(con: duckdb.DuckDBPyConnection, schema: pa.Schema, files: str, shards: list[Shard]) -> str:
    """The declared columns in order; a column no file has yet (an older store) comes back NULL.
    Files written with fewer columns are read by name (`union_by_name`), which costs a footer read
    per file at each query, so only when the files differ."""
    column_sets = {s.columns or tuple(schema.names) for s in shards}
    present = set().union(*column_sets)
    cols = [f'"{f.name}"' if f.name in present else f'NULL::{sql_type(f.type)} AS "{f.name}"' for f in schema]
    return f"SELECT {', '.join(cols)} FROM {_read(files, by_name=len(column_sets) > 1)}"


def _embeddings_select(manifest: Manifest, files: FileList) -> str:
    # Models differ in dimension; casting to FLOAT[] lets one view hold every model's vectors.
    by_model: dict[str | None, list[Shard]] = {}
    for s in manifest.of("embeddings"):
        by_model.setdefault(s.model_key, []).append(s)
    if not by_model:
        return (
            "SELECT NULL::VARCHAR AS model_key, NULL::VARCHAR AS modality, "
            "NULL::VARCHAR AS content_hash, NULL::FLOAT[] AS vector, NULL::FLOAT AS norm WHERE false"
        )
    parts = []
    for shards in by_model.values():
        column_sets = {s.columns for s in shards}
        has_norm = any("norm" in cols or not cols for cols in column_sets)
        norm = "norm" if has_norm else "NULL::FLOAT AS norm"
        parts.append(f"SELECT model_key, modality, content_hash, CAST(vector AS FLOAT[]) AS vector, {norm} "
                     f"FROM {_read(files(shards), by_name=len(column_sets) > 1)}")
    return " UNION ALL ".join(parts)


def _read(files: str, by_name: bool = False) -> str:
    return f"read_parquet({files}{', union_by_name = true' if by_name else ''})"


def _empty_select(con: duckdb.DuckDBPyConnection, schema: pa.Schema) -> str:
    cols = ", ".join(f'NULL::{sql_type(f.type)} AS "{f.name}"' for f in schema)
    return f"SELECT {cols} WHERE false"



