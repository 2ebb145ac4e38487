"""The DuckDB catalog: a table of shard files and SQL views over them.

The Parquet files are the truth. The catalog records which files exist (table `shards`) and
defines the views `samples`, `embeddings`, `quarantine`, `runs`, `scores` over them. `commit`
(and `commit_staged`, `forget`) are the only functions that change it, and only the holder of the
store's writer lock (`pipeline.store.lock.writing`) may call them; `reconcile` re-derives it from
the files on disk once per writing invocation, so a run killed between a rename and its catalog
update loses nothing.

Connections are short-lived (open, act, close) so a long encode never locks out `pipeline sql`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.store.atomic import remove_stale_temps
from pipeline.store.layout import DATASETS, Store
from schemas import TABLES, schema_problem, table_of

_LOCK_WAIT_S = 60.0
_SHARDS_DDL = """
CREATE TABLE IF NOT EXISTS shards (
    path VARCHAR PRIMARY KEY,      -- relative to the store root
    dataset VARCHAR NOT NULL,      -- samples | embeddings | quarantine | runs | scores
    model_key VARCHAR,             -- embeddings only
    num_rows BIGINT NOT NULL,
    registered_at TIMESTAMPTZ NOT NULL DEFAULT now()
)
"""


@contextmanager
def connect(store: Store, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
    """A connection whose relative paths resolve inside the store; waits while another writes."""
    if read_only and not store.catalog_path.exists():
        raise PipelineError(
            f"No store at {store.root}: run `pipeline ingest` (or `pipeline demo`) first, "
            "or point --store at an existing store."
        )
    store.root.mkdir(parents=True, exist_ok=True)
    con = _open_with_retry(store.catalog_path, read_only)
    try:
        con.execute(f"SET file_search_path = '{_sql_str(str(store.root.resolve()))}'")
        yield con
    finally:
        con.close()


def commit(store: Store, files: Iterable[Path]) -> None:
    """Record newly renamed-into-place shard files and refresh the views. Idempotent."""
    _require_lock(store)
    rows = [_describe_shard(store, Path(f)) for f in files]
    with connect(store) as con:
        con.execute(_SHARDS_DDL)
        if rows:
            con.executemany(
                "INSERT OR IGNORE INTO shards (path, dataset, model_key, num_rows) VALUES (?, ?, ?, ?)",
                rows,
            )
        _refresh_views(con)


def commit_staged(store: Store, staged: Iterable[Path]) -> list[Path]:
    """Move complete shards from the staging area to their places and record them in one update."""
    _require_lock(store)
    finals = [_unstage(store, Path(p)) for p in staged]
    commit(store, finals)
    return finals


def forget(store: Store, files: Iterable[Path]) -> None:
    """Drop deleted (or about to be deleted) shard files from the catalog and refresh the views."""
    _require_lock(store)
    rels = [(store.relative(Path(f)) if Path(f).is_absolute() else str(f),) for f in files]
    with connect(store) as con:
        con.execute(_SHARDS_DDL)
        if rels:
            con.executemany("DELETE FROM shards WHERE path = ?", rels)
        _refresh_views(con)


@dataclass(frozen=True)
class Reconciled:
    added: int
    dropped: int
    temps_removed: int
    adopted: int = 0


def reconcile(store: Store) -> Reconciled:
    """Make the catalog match the files on disk: adopt staged shards, register orphans, forget vanished files."""
    _require_lock(store)
    temps = sum(remove_stale_temps(store.dataset_dir(d)) for d in DATASETS)
    temps += remove_stale_temps(store.staging_dir)
    adopted = [_unstage(store, p) for p in _staged_files(store)]
    on_disk = {store.relative(p): p for p in _shard_files(store)}
    with connect(store) as con:
        con.execute(_SHARDS_DDL)
        known = {r[0] for r in con.execute("SELECT path FROM shards").fetchall()}
        gone = sorted(known - on_disk.keys())
        if gone:
            con.executemany("DELETE FROM shards WHERE path = ?", [(g,) for g in gone])
    new = [on_disk[p] for p in sorted(on_disk.keys() - known)]
    commit(store, new)
    return Reconciled(added=len(new), dropped=len(gone), temps_removed=temps, adopted=len(adopted))


def rebuild(store: Store) -> Reconciled:
    """Throw the catalog away and derive it again from the Parquet files (under the writer lock)."""
    from pipeline.store.lock import writing

    with writing(store):
        store.catalog_path.unlink(missing_ok=True)
        Path(str(store.catalog_path) + ".wal").unlink(missing_ok=True)
        return reconcile(store)


def shard_paths(store: Store, dataset: str, model_key: str | None = None) -> list[Path]:
    """Absolute paths of a dataset's registered shards (optionally of one model), in name order."""
    if not store.catalog_path.exists():
        return []
    with connect(store, read_only=True) as con:
        if not _has_shards_table(con):
            return []
        sql = "SELECT path FROM shards WHERE dataset = ?"
        params: list[object] = [dataset]
        if model_key is not None:
            sql += " AND model_key = ?"
            params.append(model_key)
        paths = [r[0] for r in con.execute(sql + " ORDER BY path", params).fetchall()]
    return [store.root / p for p in paths]


def query(store: Store, sql: str, params: list[object] | None = None) -> pa.Table:
    """Run a read-only query against the catalog and return an Arrow table."""
    with connect(store, read_only=True) as con:
        return con.sql(sql, params=params or None).to_arrow_table()


def query_with(store: Store, sql: str, tables: dict[str, pa.Table], params: list[object] | None = None) -> pa.Table:
    """`query` with Arrow tables registered under the given names for the duration of the query."""
    with connect(store, read_only=True) as con:
        for name, table in tables.items():
            con.register(name, table)
        return con.sql(sql, params=params or None).to_arrow_table()


def model_keys(store: Store) -> list[str]:
    if not store.catalog_path.exists():
        return []
    with connect(store, read_only=True) as con:
        if not _has_shards_table(con):
            return []
        rows = con.execute(
            "SELECT DISTINCT model_key FROM shards WHERE dataset = 'embeddings' ORDER BY 1"
        ).fetchall()
    return [r[0] for r in rows]


# --- private -------------------------------------------------------------------------------


def _open_with_retry(path: Path, read_only: bool) -> duckdb.DuckDBPyConnection:
    deadline = time.monotonic() + _LOCK_WAIT_S
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                raise PipelineError(
                    f"Cannot open the catalog {path}: {exc}".rstrip(".") + "."
                ) from exc
            time.sleep(0.2)


def _require_lock(store: Store) -> None:
    from pipeline.store.lock import holds

    if not holds(store):
        raise RuntimeError(f"catalog change outside the writer lock of {store.root}: wrap it in lock.writing(store)")


def _staged_files(store: Store) -> list[Path]:
    if not store.staging_dir.exists():
        return []
    return sorted(p for p in store.staging_dir.rglob("*") if p.is_file() and not p.name.startswith("."))


def _unstage(store: Store, staged: Path) -> Path:
    final = store.root / staged.resolve().relative_to(store.staging_dir.resolve())
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, final)
    return final


def _has_shards_table(con: duckdb.DuckDBPyConnection) -> bool:
    return bool(
        con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'shards'"
        ).fetchone()[0]  # type: ignore[index]
    )


def _shard_files(store: Store) -> list[Path]:
    files: list[Path] = []
    for dataset in DATASETS:
        files.extend(p for p in store.dataset_dir(dataset).rglob("*.parquet") if not p.name.startswith("."))
    return files


def _describe_shard(store: Store, path: Path) -> tuple[str, str, str | None, int]:
    rel = store.relative(path)
    try:
        meta = pq.read_metadata(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable footer means the same to the user
        raise PipelineError(f"Shard {rel} is not a readable Parquet file ({exc}).") from exc
    stamped = meta.schema.to_arrow_schema().metadata
    dataset = table_of(stamped) or rel.split("/", 1)[0]
    problem = schema_problem(stamped, dataset, f"Shard {rel}")
    if problem:
        raise PipelineError(problem)
    model_key = path.parent.name if dataset == "embeddings" else None
    return rel, dataset, model_key, meta.num_rows


def _refresh_views(con: duckdb.DuckDBPyConnection) -> None:
    files: dict[str, list[tuple[str, str | None]]] = {d: [] for d in DATASETS}
    for path, dataset, model_key in con.execute(
        "SELECT path, dataset, model_key FROM shards ORDER BY path"
    ).fetchall():
        files.setdefault(dataset, []).append((path, model_key))
    for dataset, schema in TABLES.items():
        paths = [p for p, _ in files[dataset]]
        body = f"SELECT * FROM {_read(paths)}" if paths else _empty_select(con, schema)
        con.execute(f"CREATE OR REPLACE VIEW {dataset} AS {body}")
    con.execute(f"CREATE OR REPLACE VIEW embeddings AS {_embeddings_select(files['embeddings'])}")


def _embeddings_select(files: list[tuple[str, str | None]]) -> str:
    # Models differ in dimension; casting to FLOAT[] lets one view hold every model's vectors.
    cols = "model_key, modality, content_hash, CAST(vector AS FLOAT[]) AS vector"
    by_model: dict[str | None, list[str]] = {}
    for path, key in files:
        by_model.setdefault(key, []).append(path)
    if not by_model:
        return (
            "SELECT NULL::VARCHAR AS model_key, NULL::VARCHAR AS modality, "
            "NULL::VARCHAR AS content_hash, NULL::FLOAT[] AS vector WHERE false"
        )
    return " UNION ALL ".join(f"SELECT {cols} FROM {_read(paths)}" for paths in by_model.values())


def _read(paths: list[str]) -> str:
    listed = ", ".join(f"'{_sql_str(p)}'" for p in paths)
    return f"read_parquet([{listed}])"


def _empty_select(con: duckdb.DuckDBPyConnection, schema: pa.Schema) -> str:
    rel = con.from_arrow(schema.empty_table())
    cols = ", ".join(
        f'NULL::{dtype} AS "{name}"' for name, dtype in zip(rel.columns, rel.dtypes, strict=True)
    )
    return f"SELECT {cols} WHERE false"


def _sql_str(text: str) -> str:
    return text.replace("'", "''")
