"""The catalog: which shard files are committed, and SQL views over them.

The Parquet files are the truth. The writer (the one process holding the store's lock, see
`pipeline.store.lock`) records each committed shard in `manifest.json`, replaced atomically, so a
commit is one rename. Readers build their views from the manifest in an in-memory DuckDB: they
never open a database file another process writes, so they never wait and never see half a commit.
`catalog.duckdb` is a convenience copy for people who open the store with their own DuckDB; it is
rebuilt beside the old one and swapped in.

A committed shard whose size or modification time changed since its commit, or that no longer
reads, is *damaged*: reading stages stop with a sentence naming it and `pipeline verify --repair`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.reporting import Reporter
from pipeline.store.atomic import atomic_write, remove_stale_temps, write_parquet, write_text
from pipeline.store.layout import DATASETS, Store
from schemas import TABLES, schema_problem

MANIFEST_FORMAT = 1
REPAIR = "run `pipeline verify --repair` to move it aside"
# What each shard's manifest entry counts (rows grouped by these expressions, each naming its column
# first), so `pipeline status` adds up a few numbers per shard instead of scanning millions of rows.
COUNTED: dict[str, tuple[str, ...]] = {
    "samples": ("split", "label", "generator", "source_format LIKE 'features:%'", "text IS NULL OR trim(text) = ''"),
    "embeddings": ("modality",),
    "quarantine": ("stage", "reason"),
}


@dataclass(frozen=True)
class Shard:
    """One committed file as the manifest records it."""

    path: str  # relative to the store root
    dataset: str
    model_key: str | None
    num_rows: int
    size: int
    mtime_ns: int
    columns: tuple[str, ...] = ()
    counts: tuple[tuple[Any, ...], ...] | None = None  # COUNTED[dataset] values + row count; None: not known

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"dataset": self.dataset, "model_key": self.model_key, "num_rows": self.num_rows,
                "size": self.size, "mtime_ns": self.mtime_ns, "columns": list(self.columns)}
        if self.counts is not None:
            data["counts"] = [list(row) for row in self.counts]
        return data

    @staticmethod
    def from_json(path: str, data: dict[str, Any]) -> Shard:
        counts = data.get("counts")
        return Shard(path, data["dataset"], data.get("model_key"), int(data["num_rows"]),
                     int(data.get("size", -1)), int(data.get("mtime_ns", -1)), tuple(data.get("columns") or ()),
                     None if counts is None else tuple(tuple(row) for row in counts))


@dataclass
class Manifest:
    shards: dict[str, Shard] = field(default_factory=dict)
    damaged: dict[str, str] = field(default_factory=dict)  # relative path → why it is not in the views

    def of(self, dataset: str, model_key: str | None = None) -> list[Shard]:
        return sorted(
            (s for s in self.shards.values()
             if s.dataset == dataset and (model_key is None or s.model_key == model_key)),
            key=lambda s: s.path,
        )


@dataclass(frozen=True)
class Reconciled:
    added: int
    dropped: int
    temps_removed: int
    adopted: int = 0
    swept: int = 0
    ignored: tuple[str, ...] = ()  # files on disk that are not valid shards (see `pipeline verify`)


# --- reading --------------------------------------------------------------------------------


def read_manifest(store: Store) -> Manifest:
    """The committed shard list; a store written before manifests existed is read from its catalog."""
    path = store.manifest_path
    if path.exists():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise PipelineError(
                f"The store's manifest {path} is unreadable ({exc}); run `pipeline catalog rebuild`."
            ) from exc
        if data.get("format") != MANIFEST_FORMAT:
            raise PipelineError(
                f"The store's manifest {path} has format {data.get('format')!r}, but this pipeline reads "
                f"format {MANIFEST_FORMAT}; use a pipeline release that matches the store."
            )
        shards = {p: Shard.from_json(p, d) for p, d in data.get("shards", {}).items()}
        return Manifest(shards, dict(data.get("damaged", {})))
    if store.catalog_path.exists():
        return _legacy_manifest(store)
    return Manifest()


def exists(store: Store) -> bool:
    return store.manifest_path.exists() or store.catalog_path.exists()


def require_store(store: Store) -> None:
    """Stop with a sentence when `store` is not a store (missing, or a file)."""
    if store.root.exists() and not store.root.is_dir():
        raise PipelineError(f"--store {store.root} is a file, not a store directory.")
    if not exists(store):
        raise PipelineError(
            f"No store at {store.root}: run `pipeline ingest` (or `pipeline demo`) first, "
            "or point --store at an existing store."
        )


def check_shards(store: Store, manifest: Manifest, datasets: Iterable[str] | None = None) -> None:
    """Stop with one sentence if a committed shard was damaged or replaced since its commit.

    Files that were never committed (a stray copy, a damaged file a rebuild left out) are not in
    the views and stop nothing; `pipeline verify` lists them."""
    wanted = set(datasets) if datasets is not None else None
    for shard in manifest.shards.values():
        if wanted is not None and shard.dataset not in wanted:
            continue
        problem = _stat_problem(store, shard)
        if problem:
            raise PipelineError(f"Shard {shard.path} is damaged ({problem}); {REPAIR}.")


@contextmanager
def connect(store: Store, read_only: bool = True) -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory DuckDB with the views `samples`, `embeddings`, … over the committed shards.

    It never opens a file another process writes, so it never waits. (`read_only` is kept for
    callers of the old API: every connection is a reader; writers change the store via `commit`.)
    """
    if store.root.exists() and not store.root.is_dir():
        raise PipelineError(f"--store {store.root} is a file, not a store directory.")
    if read_only and not exists(store):
        require_store(store)
    manifest = read_manifest(store)
    check_shards(store, manifest)
    con = duckdb.connect(":memory:")
    try:
        con.execute(f"SET file_search_path = '{_sql_str(str(store.root.resolve()))}'")
        _define_views(con, store, manifest, absolute=True)
        yield con
    except duckdb.Error as exc:
        raise _read_error(store, manifest, exc) from exc
    finally:
        con.close()


def limit_memory(con: duckdb.DuckDBPyConnection, memory: str, spill: Path, threads: int | None = None) -> None:
    """Hold a DuckDB connection's sorts, joins and aggregates to `memory`, spilling to `spill`."""
    spill.mkdir(parents=True, exist_ok=True)
    con.execute(f"SET memory_limit = '{memory}'")
    con.execute(f"SET temp_directory = '{_sql_str(str(spill))}'")
    if threads is not None:
        con.execute(f"SET threads = {int(threads)}")


def shard_paths(store: Store, dataset: str, model_key: str | None = None) -> list[Path]:
    """Absolute paths of a dataset's committed shards (optionally of one model), in name order."""
    if not exists(store):
        return []
    manifest = read_manifest(store)
    shards = manifest.of(dataset, model_key)
    for shard in shards:
        problem = _stat_problem(store, shard)
        if problem:
            raise PipelineError(f"Shard {shard.path} is damaged ({problem}); {REPAIR}.")
    return [store.root / s.path for s in shards]


def query(store: Store, sql: str, params: list[object] | None = None) -> pa.Table:
    """Run a query against the views and return an Arrow table."""
    with connect(store) as con:
        return con.sql(sql, params=params or None).to_arrow_table()


def query_with(store: Store, sql: str, tables: dict[str, pa.Table], params: list[object] | None = None) -> pa.Table:
    """`query` with Arrow tables registered under the given names for the duration of the query."""
    with connect(store) as con:
        for name, table in tables.items():
            con.register(name, table)
        return con.sql(sql, params=params or None).to_arrow_table()


def model_keys(store: Store) -> list[str]:
    if not exists(store):
        return []
    return sorted({s.model_key for s in read_manifest(store).of("embeddings") if s.model_key})


# --- writing (only the holder of the store's writer lock) -----------------------------------


def commit(store: Store, files: Iterable[Path]) -> None:
    """Record shard files already renamed into place, in one atomic manifest update. Idempotent.
    Only the holder of the store's writer lock may call it."""
    _require_lock(store)
    manifest = read_manifest(store)
    for path in (Path(f) for f in files):
        shard = describe(store, path)
        if isinstance(shard, str):
            raise PipelineError(shard)
        manifest.shards[shard.path] = shard
        manifest.damaged.pop(shard.path, None)
    _write_manifest(store, manifest)


def commit_staged(store: Store, staged: Iterable[Path]) -> list[Path]:
    """Move complete shards written by workers under `STORE/staging/` (see `Store.staged`) into
    place and record them in one manifest update."""
    _require_lock(store)
    finals = [_unstage(store, Path(p)) for p in staged]
    commit(store, finals)
    return finals


def forget(store: Store, files: Iterable[Path | str]) -> None:
    """Drop shards from the manifest (files deleted, or moved aside by `pipeline verify --repair`)."""
    _require_lock(store)
    manifest = read_manifest(store)
    for f in files:
        rel = store.relative(Path(f)) if Path(f).is_absolute() else Path(f).as_posix()
        manifest.shards.pop(rel, None)
        manifest.damaged.pop(rel, None)
    _write_manifest(store, manifest)


def reconcile(store: Store) -> Reconciled:
    """Make the manifest match the files: sweep dead writers' temps, adopt staged and orphan shards,
    drop vanished ones, sweep scores of runs that never committed. Runs when the lock is taken."""
    _require_lock(store)
    return _reconcile(store)


def rebuild(store: Store, reporter: Reporter | None = None, wait: bool = True) -> Reconciled:
    """Derive the manifest and `catalog.duckdb` again from the Parquet files, beside the old ones,
    and swap them in; damaged files are left out (and listed) so healthy tables stay queryable."""
    from pipeline.store.lock import writing

    with writing(store, reporter, wait, reconcile=False):
        result = _reconcile(store, trust_manifest=False)
        write_catalog_file(store)
        return result


def write_catalog_file(store: Store) -> None:
    """Write `catalog.duckdb` (table `shards`, views with store-relative paths) beside, then swap.
    A committed shard that is damaged is left out of this copy (the pipeline's own readers name it)."""
    manifest = read_manifest(store)
    for rel, shard in list(manifest.shards.items()):
        if _stat_problem(store, shard):
            del manifest.shards[rel]

    def build(tmp: Path) -> None:
        tmp.unlink(missing_ok=True)
        con = duckdb.connect(str(tmp))
        try:
            con.execute(f"SET file_search_path = '{_sql_str(str(store.root.resolve()))}'")
            con.execute(
                "CREATE TABLE shards (path VARCHAR PRIMARY KEY, dataset VARCHAR NOT NULL, "
                "model_key VARCHAR, num_rows BIGINT NOT NULL)"
            )
            rows = [(s.path, s.dataset, s.model_key, s.num_rows) for s in manifest.shards.values()]
            if rows:
                con.executemany("INSERT INTO shards VALUES (?, ?, ?, ?)", rows)
            _define_views(con, store, manifest, absolute=False)
            con.execute("CHECKPOINT")
        finally:
            con.close()
        Path(str(tmp) + ".wal").unlink(missing_ok=True)

    atomic_write(store.catalog_path, build)
    Path(str(store.catalog_path) + ".wal").unlink(missing_ok=True)


def describe(store: Store, path: Path) -> Shard | str:
    """The manifest entry of a shard file, or a sentence saying why it cannot be one (footer only)."""
    rel = store.relative(path)
    found = _footer(store, path)
    if isinstance(found, str):
        return f"Shard {rel} is damaged ({found}); {REPAIR}."
    if found.dataset in COUNTED:
        found = replace(found, counts=count_rows(path, found.dataset))
    return found


def count_rows(path: Path, dataset: str) -> tuple[tuple[Any, ...], ...]:
    """A shard's rows grouped by `COUNTED[dataset]`, each group's values then its count. An
    embeddings shard holds one modality (its footer's statistics say so): nothing is read."""
    meta = pq.read_metadata(path)
    names = meta.schema.to_arrow_schema().names
    if dataset == "embeddings" and "modality" in names:
        single = _only_value(meta, names.index("modality"))
        if single is not None:
            return ((single, meta.num_rows),)
    if meta.num_rows == 0:
        return ()
    present = [e if e.split()[0] in names else "NULL" for e in COUNTED[dataset]]  # older shards may lack one
    with duckdb.connect() as con:
        rows = con.execute(f"SELECT {', '.join(present)}, count(*) FROM read_parquet('{_sql_str(str(path))}') "
                           "GROUP BY ALL ORDER BY ALL").fetchall()
    return tuple(tuple(row) for row in rows)


def _footer(store: Store, path: Path, rel: str | None = None) -> Shard | str:
    """The shard as its footer describes it, or why the footer rules it out (a short clause).
    `rel`: where the file is to live, if not where it is (a staged shard)."""
    rel = rel or store.relative(path)
    try:
        st = path.stat()
        meta = pq.read_metadata(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable footer means the same to the user
        return f"not a readable Parquet file: {_first_line(exc)}"
    arrow_schema = meta.schema.to_arrow_schema()
    dataset = rel.split("/", 1)[0]
    problem = schema_problem(arrow_schema.metadata, dataset, "it")
    if problem:
        return problem.split("; use a pipeline release")[0].rstrip(".")
    model_key = path.parent.name if dataset == "embeddings" else None
    return Shard(rel, dataset, model_key, meta.num_rows, st.st_size, st.st_mtime_ns,
                 tuple(arrow_schema.names))


# --- private --------------------------------------------------------------------------------


def _reconcile(store: Store, trust_manifest: bool = True) -> Reconciled:
    temps = remove_stale_temps(store.root)
    manifest = read_manifest(store) if trust_manifest else Manifest()
    adopted = 0
    for staged in _staged_files(store):
        final = store.root / staged.relative_to(store.staging_dir)
        if isinstance(_footer(store, staged, store.relative(final)), str):
            continue  # left for `pipeline verify`, which lists it
        final.parent.mkdir(parents=True, exist_ok=True)
        if _without_committed_vectors(store, manifest, staged, final):
            os.replace(staged, final)
        adopted += 1
    swept = _sweep_uncommitted_runs(store, manifest)
    on_disk = {store.relative(p): p for p in shard_files(store)}
    gone = sorted(set(manifest.shards) - on_disk.keys())
    for rel in gone:
        del manifest.shards[rel]
    added = 0
    ignored: list[str] = []
    for rel, path in sorted(on_disk.items()):
        known = manifest.shards.get(rel)
        if known is not None and known.size >= 0 and not _stat_problem(store, known, footer=False):
            if known.counts is None and known.dataset in COUNTED:  # a manifest from before the counts
                manifest.shards[rel] = replace(known, counts=count_rows(path, known.dataset))
            continue
        shard = describe(store, path)
        if isinstance(shard, str) or (known is not None and known.num_rows != shard.num_rows):
            # A committed shard that changed stays committed, so every reader names it until
            # `pipeline verify --repair`; a file never committed is left out of the views.
            if known is None:
                manifest.damaged[rel] = shard if isinstance(shard, str) else "row count changed"
                ignored.append(rel)
            continue
        manifest.damaged.pop(rel, None)
        if known is None:
            added += 1
        manifest.shards[rel] = shard
    for rel in list(manifest.damaged):
        if rel not in on_disk:
            del manifest.damaged[rel]
    _write_manifest(store, manifest)
    return Reconciled(added=added, dropped=len(gone), temps_removed=temps, adopted=adopted,
                      swept=swept, ignored=tuple(ignored))


def _without_committed_vectors(store: Store, manifest: Manifest, staged: Path, final: Path) -> bool:
    """Drop from a staged embeddings shard the vectors already committed; False when none is left.

    A worker of a killed driver (a Ray task) may finish a staged shard after the next writer looked
    for pending work and encoded the same hashes again: adopting it whole would double those rows.
    Only adopted (orphaned) shards pass through here, so the extra read is rare.
    """
    if final.parent.parent != store.dataset_dir("embeddings"):
        return True
    committed = [store.root / s.path for s in manifest.of("embeddings", final.parent.name)]
    if not committed:
        return True
    table = pq.read_table(staged)
    with duckdb.connect() as con:
        con.register("staged", table.select(["modality", "content_hash"]))  # DuckDB reads no half floats
        listed = ", ".join(f"'{_sql_str(str(p))}'" for p in committed)
        have = con.sql(
            f"SELECT DISTINCT c.modality, c.content_hash FROM read_parquet([{listed}]) c "
            "SEMI JOIN staged s ON s.content_hash = c.content_hash AND s.modality = c.modality"
        ).fetchall()
    if not have:
        return True
    seen = {(m, h) for m, h in have}
    keep = [(m, h) not in seen for m, h in zip(table.column("modality").to_pylist(),
                                                  table.column("content_hash").to_pylist(), strict=True)]
    if any(keep):
        write_parquet(table.filter(pa.array(keep)), final)
    staged.unlink()
    return False


def _sweep_uncommitted_runs(store: Store, manifest: Manifest) -> int:
    """A run is committed when its `run.parquet` is (written last); score and metric shards
    (`scores|metrics/<run_id>[-<part>].parquet`) and folders of any other run are a killed writer's ghosts."""
    runs_dir = store.dataset_dir("runs")
    committed = {p.parent.name for p in runs_dir.glob("*/run.parquet")} if runs_dir.exists() else set()
    swept = 0
    for per_run in (store.dataset_dir("scores"), store.dataset_dir("metrics")):
        if not per_run.exists():
            continue
        for scores in per_run.glob("*.parquet"):
            stem = scores.stem
            prefixes = {stem} | {stem[:i] for i, ch in enumerate(stem) if ch == "-"}
            if not prefixes & committed:
                manifest.shards.pop(store.relative(scores), None)
                scores.unlink(missing_ok=True)
                swept += 1
    if runs_dir.exists():
        for run in runs_dir.iterdir():
            if run.is_dir() and run.name not in committed:
                shutil.rmtree(run, ignore_errors=True)
                swept += 1
    return swept


def _require_lock(store: Store) -> None:
    from pipeline.store.lock import holds

    if not holds(store):
        raise RuntimeError(f"catalog change outside the writer lock of {store.root}: wrap it in lock.writing(store)")


def _unstage(store: Store, staged: Path) -> Path:
    try:
        rel = staged.resolve().relative_to(store.staging_dir.resolve())
    except ValueError as exc:
        raise PipelineError(f"{staged} is not under {store.staging_dir}; only staged files can be committed.") from exc
    final = store.root / rel
    if not staged.exists() and final.exists():
        return final  # adopted already (a reconcile when the lock was taken afresh moved it)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, final)
    return final


def _staged_files(store: Store) -> list[Path]:
    if not store.staging_dir.exists():
        return []
    return sorted(p for p in store.staging_dir.rglob("*.parquet") if not p.name.startswith("."))


def _write_manifest(store: Store, manifest: Manifest) -> None:
    data = {
        "format": MANIFEST_FORMAT,
        "shards": {p: s.to_json() for p, s in sorted(manifest.shards.items())},
        "damaged": dict(sorted(manifest.damaged.items())),
    }
    text = json.dumps(data, indent=0, separators=(",", ":"))
    try:
        if store.manifest_path.read_text(encoding="utf-8") == text:
            return  # nothing changed: readers' caches and catalog.duckdb stay valid
    except OSError:
        pass
    write_text(store.manifest_path, text)


def _legacy_manifest(store: Store) -> Manifest:
    """Stores from before the manifest: read the shard list from `catalog.duckdb` once."""
    try:
        con = duckdb.connect(str(store.catalog_path), read_only=True)
    except duckdb.Error as exc:
        raise PipelineError(
            f"The catalog {store.catalog_path} cannot be opened ({_first_line(exc)}); "
            "run `pipeline catalog rebuild`."
        ) from exc
    try:
        rows = con.execute("SELECT path, dataset, model_key, num_rows FROM shards").fetchall()
    except duckdb.Error:
        rows = []
    finally:
        con.close()
    shards = {}
    for p, d, m, n in rows:
        described = describe(store, store.root / p)
        columns = described.columns if isinstance(described, Shard) else ()
        shards[p] = Shard(p, d, m, int(n), -1, -1, columns)
    return Manifest(shards)


def _only_value(meta: pq.FileMetaData, column: int) -> Any:
    """The one value a column holds in every row, if the footer's statistics show it; else None."""
    values = set()
    for g in range(meta.num_row_groups):
        stats = meta.row_group(g).column(column).statistics
        if stats is None or not stats.has_min_max or stats.null_count or stats.min != stats.max:
            return None
        values.add(stats.min)
    return values.pop() if len(values) == 1 else None


def _stat_problem(store: Store, shard: Shard, footer: bool = True) -> str | None:
    """Why a committed shard cannot be trusted any more, or None. Cheap: a stat, and a footer read
    only when the stat changed (a store copied without keeping times is still fine)."""
    path = store.root / shard.path
    try:
        st = path.stat()
    except OSError:
        return "the file is missing"
    if shard.size < 0 or (st.st_size == shard.size and st.st_mtime_ns == shard.mtime_ns):
        return None
    if not footer:
        return "it was modified since it was committed"
    described = _footer(store, path)
    if isinstance(described, str):
        return described
    if described.num_rows != shard.num_rows:
        return f"it holds {described.num_rows} rows, not the {shard.num_rows} committed"
    if st.st_size != shard.size:
        return f"its size changed from {shard.size} to {st.st_size} bytes since it was committed"
    return None


def _read_error(store: Store, manifest: Manifest, exc: duckdb.Error) -> Exception:
    """A DuckDB error while reading: name the shard if one is to blame, else pass the error on."""
    text = str(exc)
    for rel in manifest.shards:
        if rel in text:
            return PipelineError(f"Shard {rel} is damaged ({_first_line(exc).rstrip('.')}); {REPAIR}.")
    return exc


def shard_files(store: Store) -> list[Path]:
    files: list[Path] = []
    for dataset in DATASETS:
        directory = store.dataset_dir(dataset)
        if directory.exists():
            files.extend(p for p in directory.rglob("*.parquet") if not p.name.startswith("."))
    return files


def _define_views(con: duckdb.DuckDBPyConnection, store: Store, manifest: Manifest, absolute: bool) -> None:
    root = store.root.resolve()
    for dataset, schema in TABLES.items():
        shards = manifest.of(dataset)
        paths = [str(root / s.path) if absolute else s.path for s in shards]
        body = _select(con, schema, paths, shards) if paths else _empty_select(con, schema)
        name = "samples_all" if dataset == "samples" else dataset
        con.execute(f"CREATE OR REPLACE VIEW {name} AS {body}")
    con.execute(f"CREATE OR REPLACE VIEW samples AS {samples_view(manifest)}")
    con.execute(f"CREATE OR REPLACE VIEW embeddings AS {_embeddings_select(manifest, root, absolute)}")


def samples_view(manifest: Manifest) -> str:
    """`samples` is `samples_all` less the images quarantined as `label_conflict`: the same bytes
    under two labels are used as neither."""
    if not manifest.of("quarantine"):
        return "SELECT * FROM samples_all"
    return ("SELECT * FROM samples_all WHERE sample_id NOT IN (SELECT content_hash FROM quarantine "
            "WHERE reason = 'label_conflict' AND content_hash IS NOT NULL)")


def _select(con: duckdb.DuckDBPyConnection, schema: pa.Schema, paths: list[str], shards: list[Shard]) -> str:
    """The declared columns in order; a column no file has yet (an older store) comes back NULL.
    Files written with fewer columns are read by name (`union_by_name`), which costs a footer read
    per file at each query, so only when the files differ."""
    column_sets = {s.columns or tuple(schema.names) for s in shards}
    present = set().union(*column_sets)
    rel = con.from_arrow(schema.empty_table())
    cols = []
    for name, dtype in zip(rel.columns, rel.dtypes, strict=True):
        cols.append(f'"{name}"' if name in present else f'NULL::{dtype} AS "{name}"')
    return f"SELECT {', '.join(cols)} FROM {_read(paths, by_name=len(column_sets) > 1)}"


def _embeddings_select(manifest: Manifest, root: Path, absolute: bool) -> str:
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
        paths = [str(root / s.path) if absolute else s.path for s in shards]
        parts.append(f"SELECT model_key, modality, content_hash, CAST(vector AS FLOAT[]) AS vector, {norm} "
                     f"FROM {_read(paths, by_name=len(column_sets) > 1)}")
    return " UNION ALL ".join(parts)


def _read(paths: list[str], by_name: bool = False) -> str:
    listed = ", ".join(f"'{_sql_str(p)}'" for p in paths)
    return f"read_parquet([{listed}]{', union_by_name = true' if by_name else ''})"


def _empty_select(con: duckdb.DuckDBPyConnection, schema: pa.Schema) -> str:
    rel = con.from_arrow(schema.empty_table())
    cols = ", ".join(
        f'NULL::{dtype} AS "{name}"' for name, dtype in zip(rel.columns, rel.dtypes, strict=True)
    )
    return f"SELECT {cols} WHERE false"


def _sql_str(text: str) -> str:
    return text.replace("'", "''")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__).rstrip(".")
