"""The manifest: which shard files are committed, as the writer recorded them.

The Parquet files are the truth. The writer (the one process holding the store's lock) records each
committed shard in `manifest.json`, replaced atomically, so a commit is one rename. A committed
shard that is missing, or that changed since its commit (`stat_problem`: its stat, then its footer
digest and, where it was written in place, its pages; see `pipeline.store.integrity`), is *damaged*:
readers stop with a sentence naming it and `pipeline verify --repair`.

Format 2 records each shard's inode, change time and footer digest; a format-1 manifest is read
(those shards are checked by size and modification time only) and the next writer fills them in.
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
from pipeline.store.integrity import Checked, footer_digest, page_crc_problem, stat_of
from pipeline.store.layout import DATASETS, Store
from schemas import schema_problem

MANIFEST_FORMAT = 2
READABLE_FORMATS = (1, 2)


REPAIR = "run `pipeline verify --repair` to move it aside"


# What each shard's manifest entry counts (rows grouped by these expressions, each naming its column
# first), so `pipeline status` adds up a few numbers per shard instead of scanning millions of rows.
COUNTED: dict[str, tuple[str, ...]] = {
    "samples": ("split", "label", "generator", "source_format LIKE 'features:%'", "text IS NULL OR trim(text) = ''"),
    "embeddings": ("modality",),
    "quarantine": ("stage", "reason"),
    "scores": ("run_id",),  # which run's scores a file holds: readers pick one run's files (`latest_scores`)
}
# Columns whose one value per shard the footer's statistics give, so counting those shards reads no row.
_ONE_PER_SHARD = {"embeddings": "modality", "scores": "run_id"}


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
    inode: int = -1  # -1: not known (format 1)
    ctime_ns: int = -1
    digest: str | None = None  # of the Parquet footer (`integrity.footer_digest`); None: not known

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"dataset": self.dataset, "model_key": self.model_key, "num_rows": self.num_rows,
                "size": self.size, "mtime_ns": self.mtime_ns, "columns": list(self.columns)}
        if self.counts is not None:
            data["counts"] = [list(row) for row in self.counts]
        if self.digest is not None:
            data |= {"inode": self.inode, "ctime_ns": self.ctime_ns, "digest": self.digest}
        return data

    @staticmethod
    def from_json(path: str, data: dict[str, Any]) -> Shard:
        counts = data.get("counts")
        return Shard(path, data["dataset"], data.get("model_key"), int(data["num_rows"]),
                     int(data.get("size", -1)), int(data.get("mtime_ns", -1)), tuple(data.get("columns") or ()),
                     None if counts is None else tuple(tuple(row) for row in counts),
                     int(data.get("inode", -1)), int(data.get("ctime_ns", -1)), data.get("digest"))


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
        if not isinstance(data, dict) or data.get("format") not in READABLE_FORMATS:
            found = data.get("format") if isinstance(data, dict) else None
            raise PipelineError(
                f"The store's manifest {path} has format {found!r}, but this pipeline reads formats "
                f"{', '.join(map(str, READABLE_FORMATS))}: use a pipeline release that matches the store, or "
                "`pipeline catalog rebuild` if the file was overwritten."
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


def recognisable(store: Store) -> bool:
    """Whether a folder is a store even if its manifest and catalog are lost: one of its dataset
    folders holds a Parquet file stamped as that dataset's (a user's own Parquet files are not)."""
    if exists(store):
        return True
    for dataset in DATASETS:
        for path in sorted(store.dataset_dir(dataset).rglob("*.parquet"))[:4]:
            try:
                metadata = pq.read_schema(path).metadata
            except Exception:  # noqa: BLE001 - a file that does not read is no evidence either way
                continue
            if schema_problem(metadata, dataset, "it") is None:
                return True
    return False


def check_shards(store: Store, manifest: Manifest, datasets: Iterable[str] | None = None) -> None:
    """Stop with one sentence if a committed shard was damaged or replaced since its commit.

    Files that were never committed (a stray copy, a damaged file a rebuild left out) are not in
    the views and stop nothing; `pipeline verify` lists them."""
    wanted = set(datasets) if datasets is not None else None
    checked = Checked(store)
    for shard in manifest.shards.values():
        if wanted is not None and shard.dataset not in wanted:
            continue
        problem = stat_problem(store, shard, checked=checked)
        if problem:
            raise PipelineError(f"Shard {shard.path} is damaged ({problem}); {REPAIR}.")
    checked.save(set(manifest.shards))


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
    embeddings shard holds one modality, a scores shard one run (its footer's statistics say so):
    nothing is read."""
    meta = pq.read_metadata(path)
    names = meta.schema.to_arrow_schema().names
    column = _ONE_PER_SHARD.get(dataset)
    if column in names:
        single = _only_value(meta, names.index(column))
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
    try:
        digest = footer_digest(path)
    except (OSError, ValueError) as exc:
        return f"not a readable Parquet file: {first_line(exc)}"
    return Shard(rel, dataset, model_key, meta.num_rows, st.st_size, st.st_mtime_ns,
                 tuple(arrow_schema.names), inode=st.st_ino, ctime_ns=st.st_ctime_ns, digest=digest)


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


def stat_problem(store: Store, shard: Shard, read_footer: bool = True, checked: Checked | None = None) -> str | None:
    """Why a committed shard cannot be trusted any more, or None (`pipeline.store.integrity`). A stat when
    nothing changed; else its footer (digest, rows, size) and, for a file changed in place, its pages.
    `read_footer=False`: only say whether the stat changed. `checked`: shards found intact before."""
    path = store.root / shard.path
    try:
        st = path.stat()
    except OSError:
        return "the file is missing"
    same_file = shard.inode < 0 or st.st_ino == shard.inode
    if shard.size < 0 or (same_file and st.st_size == shard.size and st.st_mtime_ns == shard.mtime_ns
                          and shard.ctime_ns in (-1, st.st_ctime_ns)):
        return None
    if not read_footer:
        return "it was modified since it was committed"
    if checked is not None and checked.holds(shard.path, shard.digest, stat_of(st)):
        return None
    described = footer(store, path)
    if isinstance(described, str):
        return described
    if described.num_rows != shard.num_rows:
        return f"it holds {described.num_rows} rows, not the {shard.num_rows} committed"
    if st.st_size != shard.size:
        return f"its size changed from {shard.size} to {st.st_size} bytes since it was committed"
    if shard.digest is not None and described.digest != shard.digest:
        return "its footer is not the one committed"
    # Written in place (on the inode committed, or on the one a copy was last found intact on): the
    # footer may be intact while a page is not. A copy not yet read once is checked by its footer only.
    copied_to = checked.inode(shard.path, shard.digest) if checked is not None else None
    in_place = st.st_ino in (shard.inode, copied_to)
    if shard.digest is not None and in_place:
        problem = page_crc_problem(path)
        if problem:
            return problem
    if checked is not None:
        checked.add(shard.path, shard.digest, stat_of(st))
    return None


def shard_files(store: Store) -> list[Path]:
    files: list[Path] = []
    for dataset in DATASETS:
        directory = store.dataset_dir(dataset)
        if directory.exists():
            files.extend(p for p in directory.rglob("*.parquet") if not p.name.startswith("."))
    return files

