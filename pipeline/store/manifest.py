"""The manifest: which shard files are committed, as the writer recorded them.

The Parquet files are the truth. The writer (the one process holding the store's lock) records each
committed shard in `manifest.json`, replaced atomically, so a commit is one rename. A committed
shard whose size or modification time changed since its commit, or that no longer reads, is
*damaged*: readers stop with a sentence naming it and `pipeline verify --repair`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

import duckdb
import pyarrow.parquet as pq

from pipeline.errors import PipelineError, first_line
from pipeline.store.atomic import write_text
from pipeline.store.layout import DATASETS, Store
from schemas import schema_problem

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
        damaged = dict(data.get("damaged", {}))
        _refuse_outside(path, [*shards, *damaged])
        return Manifest(shards, damaged)
    if store.catalog_path.exists():
        return _legacy_manifest(store)
    return Manifest()


def _refuse_outside(manifest: Path, paths: Iterable[str]) -> None:
    """Every path a manifest names is a relative path inside the store: a store reads (and `verify --repair`
    moves) only its own files, whatever an edited or hostile manifest says."""
    for rel in paths:
        parts = PurePosixPath(rel).parts
        if not parts or PurePosixPath(rel).is_absolute() or ".." in parts or "\\" in rel:
            raise PipelineError(f"The store's manifest {manifest} names {rel!r}, a path outside the store, which reads "
                                "only its own files: run `pipeline catalog rebuild` to list the store's own shards "
                                "again.")


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
        problem = stat_problem(store, shard)
        if problem:
            raise PipelineError(f"Shard {shard.path} is damaged ({problem}); {REPAIR}.")


def describe(store: Store, path: Path) -> Shard | str:
    """The manifest entry of a shard file, or a sentence saying why it cannot be one (footer only)."""
    rel = store.relative(path)
    found = footer(store, path)
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
        rows = con.execute(f"SELECT {', '.join(present)}, count(*) FROM read_parquet(?) "
                           "GROUP BY ALL ORDER BY ALL", [str(path)]).fetchall()
    return tuple(tuple(row) for row in rows)


def footer(store: Store, path: Path, rel: str | None = None) -> Shard | str:
    """The shard as its footer describes it, or why the footer rules it out (a short clause).
    `rel`: where the file is to live, if not where it is (a staged shard)."""
    rel = rel or store.relative(path)
    try:
        st = path.stat()
        meta = pq.read_metadata(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable footer means the same to the user
        return f"not a readable Parquet file: {first_line(exc)}"
    arrow_schema = meta.schema.to_arrow_schema()
    dataset = rel.split("/", 1)[0]
    problem = schema_problem(arrow_schema.metadata, dataset, "it")
    if problem:
        return problem.split("; use a pipeline release")[0].rstrip(".")
    model_key = path.parent.name if dataset == "embeddings" else None
    return Shard(rel, dataset, model_key, meta.num_rows, st.st_size, st.st_mtime_ns,
                 tuple(arrow_schema.names))


def write_manifest(store: Store, manifest: Manifest) -> None:
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
            f"The catalog {store.catalog_path} cannot be opened ({first_line(exc)}); "
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


def stat_problem(store: Store, shard: Shard, read_footer: bool = True) -> str | None:
    """Why a committed shard cannot be trusted any more, or None. Cheap: a stat, and a footer read
    only when the stat changed (a store copied without keeping times is still fine)."""
    path = store.root / shard.path
    try:
        st = path.stat()
    except OSError:
        return "the file is missing"
    if shard.size < 0 or (st.st_size == shard.size and st.st_mtime_ns == shard.mtime_ns):
        return None
    if not read_footer:
        return "it was modified since it was committed"
    described = footer(store, path)
    if isinstance(described, str):
        return described
    if described.num_rows != shard.num_rows:
        return f"it holds {described.num_rows} rows, not the {shard.num_rows} committed"
    if st.st_size != shard.size:
        return f"its size changed from {shard.size} to {st.st_size} bytes since it was committed"
    return None


def shard_files(store: Store) -> list[Path]:
    files: list[Path] = []
    for dataset in DATASETS:
        directory = store.dataset_dir(dataset)
        if directory.exists():
            files.extend(p for p in directory.rglob("*.parquet") if not p.name.startswith("."))
    return files

