"""The training view of one model: which vector rows make each sample, and nothing else.

Vectors live once, in the model's memory-mapped matrices (`features.vectors`). The view is an
index over them, built by DuckDB out of core: one row per sample with `sample_id, split, label,
generator, group_key, image_row, text_row`, sorted by split and then by a hash of the sample id
(a fixed pseudo-random order, so every row group is a random draw of its split, every class
mixed). A batch is then a gather from mapped memory; no vector is copied into the view.

Why this design: the old view copied every vector (image and text, per sample) into one Parquet
file. At D3 size that is a second 40 GB, a hash join that held every vector (DuckDB ran out of
memory at 1M samples) and a full rebuild whenever one sample was added. An index of integers is
~100 bytes a sample, joins on hashes only, and grows by appending.

On disk, `cache/views/<model_key>/<pairing>/`: `view.json` lists the parts (Parquet files) with
the sample and embedding shards they cover and the matrix segments their rows point into. New
shards append a part holding only the samples not yet in the view; a part set that no longer
matches (a shard left the store, a matrix rebuilt, text vectors arriving for samples that lacked
them, too many parts) is rebuilt whole. Parts and `view.json` are written atomically.

Text pairing: `as-ingested` pairs each image with its own text (D3: real ↔ caption, generated ↔
prompt). `shared` gives every member of a group the text of its generated members, so a real
image and its generated siblings carry the same text: text alone can then not tell them apart.

What a run reads, as a fingerprint (`FeatureTable.data_fingerprint`): each part records two digests
of its rows, computed by DuckDB while the part is written (one MD5 per row and digest, no pass of
its own): over every row, the MD5 of (sample_id, label, split, generator, group_key), and over the
rows with a text vector, the MD5 of the same and the hash of the text the row is paired with. A
digest is the XOR of its rows' MD5s, so it depends on the rows only, not on their order, on how the
view was split into parts, on shard file names or on the store's path: the same data in another
store gives the same fingerprint, and samples a view leaves out (derived by `perturb`) change nothing.
Measured on this 2-core machine (shared): 7.7 s of DuckDB time per digest at 11.5M rows.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import PipelineError, first_line
from pipeline.features.vectors import VectorMatrix, fingerprint, open_matrix
from pipeline.reporting import Reporter, Silent
from pipeline.store import cache, catalog, duck
from pipeline.store.atomic import remove_stale_temps, temp_path, write_text
from pipeline.store.duck import literal
from pipeline.store.layout import Store, safe_name
from pipeline.store.stream import ParquetStream
from schemas import FEATURE_VIEW

PAIRINGS = ("as-ingested", "shared")
VIEW_VERSION = 2  # 2: each part records the digests of its rows
ROW_GROUP_ROWS = 16384
MAX_PARTS = 16  # more appended parts than this and the view is rebuilt as one
# The joins hold hashes and integers only and spill beyond the first bound (measured 1M -> 2M samples:
# 356 -> 375 MB peak anon, CPU 5.8 -> 16.0 s, against 512 -> 872 MB and 5.0 -> 11.5 s under 1 GB). Part
# of DuckDB's need is per thread, not per row (128 MB fails at 1M samples): a build that does not fit
# is tried again under the next bound rather than failed.
DUCKDB_MEMORY = ("256MB", "1GB")
DUCKDB_THREADS = 2
# Rows (about) of one bucket of the view's sort: the joined rows are written in buckets of (split, a
# range of hash(sample_id)) and each bucket is sorted alone, so the sort holds one bucket, whatever the
# view's size. Measured at 2M samples, 256 MB, 2 threads: one sort of every row 365 MB peak anon (323 at
# 1M; at 1M it ran out of 160 MB where the joins fit); 1M-row buckets 328 MB; 250k-row buckets 252 MB,
# below the joins' own ~335 MB, at less CPU (1.5 against 3.0 s). The whole build (bench_scale.py's
# `view rebuild`): 351 MB at 1M in one sort; in buckets 326 MB at 1M, 339 MB at 2M.
BUCKET_ROWS = 262_144


_MASK64 = "18446744073709551615::UHUGEINT"  # the low 64 bits of an MD5 number


@dataclass(frozen=True)
class RowDigest:
    """An order-free digest of a set of rows: the XOR of their 128-bit MD5s, and how many there are."""

    xor: int = 0
    rows: int = 0

    def __add__(self, other: RowDigest) -> RowDigest:
        return RowDigest(self.xor ^ other.xor, self.rows + other.rows)

    def to_json(self) -> list[object]:
        return [f"{self.xor:032x}", self.rows]

    @staticmethod
    def from_json(data: list[object]) -> RowDigest:
        return RowDigest(int(str(data[0]), 16), int(str(data[1])))

    @staticmethod
    def of(hi: pa.Array | pa.ChunkedArray, lo: pa.Array | pa.ChunkedArray) -> RowDigest:
        """The digest of a batch's rows from the high and low 64 bits of each row's MD5 (NULL: not counted)."""
        valid = int(pc.sum(pc.is_valid(hi)).as_py() or 0)
        if not valid:
            return RowDigest()
        high = np.bitwise_xor.reduce(pc.fill_null(hi, 0).to_numpy(zero_copy_only=False).astype(np.uint64))
        low = np.bitwise_xor.reduce(pc.fill_null(lo, 0).to_numpy(zero_copy_only=False).astype(np.uint64))
        return RowDigest((int(high) << 64) | int(low), valid)


@dataclass(frozen=True)
class FeatureTable:
    """One model's training view: its parts and the matrices their rows point into."""

    directory: Path
    parts: tuple[Path, ...]
    model_key: str
    pairing: str
    images: VectorMatrix
    texts: VectorMatrix | None
    rows: int
    row_digest: RowDigest = field(default_factory=RowDigest)  # every row: sample, label, split, generator, group
    text_digest: RowDigest = field(default_factory=RowDigest)  # rows with a text vector, with the text they get
    perturbation: str | None = None  # the samples `perturb` derived by this operation; None: the samples as ingested
    retries: tuple[str, ...] = ()  # sentences: the memory bounds this call's build ran out of, and what it did then
    pins: cache.Pins | None = field(default=None, compare=False, repr=False)  # its parts, kept while it lives

    def data_fingerprint(self, features: str) -> str:
        """What a run with these `features` reads, named by content: image features read every row of
        the view (sample, label, split, generator, group); text and image+text read the rows with a text
        vector, each with the hash of its text (so the pairing shows where it changes a row's text)."""
        which, digest = ("rows", self.row_digest) if features == "image" else ("text", self.text_digest)
        named = json.dumps([VIEW_VERSION, which, *digest.to_json()])
        return hashlib.sha256(named.encode()).hexdigest()[:16]

    @property
    def dim(self) -> int:
        return self.images.dim

    @property
    def parts_sql(self) -> str:
        """The view's rows as a DuckDB table expression."""
        return "read_parquet([" + ", ".join(literal(str(p)) for p in self.parts) + "])"

    @property
    def text_dim(self) -> int:
        return self.texts.dim if self.texts is not None else 0


def resolve_model_key(store: Store, model_key: str | None) -> str:
    keys = catalog.model_keys(store)
    if model_key is None:
        if len(keys) == 1:
            return keys[0]
        if not keys:
            raise PipelineError("The store holds no embeddings yet: run `pipeline encode` first.")
        raise PipelineError(f"The store holds several models; pick one with --model-key: {', '.join(keys)}.")
    if model_key not in keys:
        raise PipelineError(f"No embeddings for model key {model_key!r}; the store has: {', '.join(keys) or 'none'}.")
    return model_key


def feature_table(store: Store, model_key: str, pairing: str = "as-ingested", perturbation: str | None = None,
                  reporter: Reporter | None = None) -> FeatureTable:
    """The training view for this model and pairing, brought up to date (appended or rebuilt) first.

    Samples derived by `pipeline perturb` are left out, unless `perturbation` (e.g. "jpeg:75") asks
    for the samples derived by that operation only.
    """
    if pairing not in PAIRINGS:
        raise PipelineError(f"--pairing must be one of {', '.join(PAIRINGS)}.")
    reporter = reporter or Silent()
    samples = catalog.shard_paths(store, "samples")
    decisions = catalog.shard_paths(store, "decisions")  # a label decided changes rows: the view is rebuilt
    vectors = catalog.shard_paths(store, "embeddings", model_key)
    image_shards = [p for p in vectors if p.name.startswith("image-")]
    text_shards = [p for p in vectors if p.name.startswith("text-")]
    if not image_shards:
        raise PipelineError(f"No image embeddings for {model_key}: run `pipeline encode` first.")
    images = open_matrix(store, model_key, "image", reporter)
    texts = open_matrix(store, model_key, "text", reporter) if text_shards else None
    name = pairing if perturbation is None else f"{pairing}@{safe_name(perturbation)}"
    directory = store.root / "cache" / "views" / model_key / name
    covered = {store.relative(p) for p in samples + decisions + vectors}
    layout = {"image": images.segment_names, "text": texts.segment_names if texts else []}
    with cache.building(directory):  # one builder of this view at a time; its readers pin their parts
        found = _read_manifest(directory)
        manifest: dict[str, Any] = {"version": VIEW_VERSION, "layout": layout, "parts": []}
        if found is not None and _extendable(found, directory, covered, layout, text_shards, store):
            manifest = found
        known = {p for part in manifest["parts"] for p in part["shards"]}
        retries: list[str] = []
        if covered - known:
            part = _build_part(store, directory, manifest, images, texts, pairing, perturbation, sorted(covered),
                               retries, reporter)
            manifest["parts"].append(part)
            manifest["layout"] = layout
            write_text(directory / "view.json", json.dumps(manifest))
        parts = tuple(directory / p["file"] for p in manifest["parts"])
        pins = cache.pin(parts)
        cache.sweep(directory.glob("part-*.parquet"), {p.name for p in parts})  # (parts pinned by others stay)
    rows = sum(int(p["rows"]) for p in manifest["parts"])
    row_digest = sum((RowDigest.from_json(p["digest_rows"]) for p in manifest["parts"]), RowDigest())
    text_digest = sum((RowDigest.from_json(p["digest_text"]) for p in manifest["parts"]), RowDigest())
    return FeatureTable(directory, parts, model_key, pairing, images, texts, rows, row_digest, text_digest,
                        perturbation, tuple(retries), pins)


# --- private -------------------------------------------------------------------------------


def _extendable(manifest: dict[str, Any], directory: Path, covered: set[str], layout: dict[str, list[str]],
                text_shards: list[Path], store: Store) -> bool:
    """Whether appending a part to this view keeps every row right."""
    if manifest.get("version") != VIEW_VERSION or not manifest["parts"]:
        return False
    old = manifest["layout"]
    if any(layout[m][: len(old[m])] != old[m] for m in ("image", "text")):
        return False  # a matrix was rebuilt: its rows moved
    known = {p for part in manifest["parts"] for p in part["shards"]}
    if not known <= covered or len(manifest["parts"]) >= MAX_PARTS:
        return False
    if any(p.startswith("decisions/") for p in covered - known):
        return False  # a decision changes rows already in the view (a label, a sample left out)
    if not all((directory / p["file"]).exists() for p in manifest["parts"]):
        return False
    new_texts = {store.relative(p) for p in text_shards} - known
    lacking_text = sum(int(p["missing_text"]) for p in manifest["parts"])
    return not (new_texts and lacking_text)  # rows without text could gain one: rebuild them


def _build_part(store: Store, directory: Path, manifest: dict[str, Any], images: VectorMatrix,
                texts: VectorMatrix | None, pairing: str, perturbation: str | None,
                covered: list[str], retries: list[str], reporter: Reporter) -> dict[str, Any]:
    """Write the part under the first memory bound it fits in; each bound it ran out of is a sentence in
    `retries`, noted to `reporter` as it happens (a retry is never silent: it costs memory and time)."""
    earlier = [directory / p["file"] for p in manifest["parts"]]
    name = f"part-{fingerprint(store, [store.root / c for c in covered], pairing, len(earlier))}.parquet"
    for memory, larger in zip(DUCKDB_MEMORY, DUCKDB_MEMORY[1:], strict=False):
        try:
            return _write_part(store, directory, name, earlier, images, texts, pairing, perturbation, covered, memory)
        except (duckdb.OutOfMemoryException, OSError) as exc:  # (OSError: the limit hit while streaming)
            if not duck.out_of_memory(exc):
                raise
            retries.append(f"The training view did not fit in DuckDB's {memory} ({first_line(exc)}); "
                           f"built again under {larger}.")
            reporter.note(retries[-1])
    return _write_part(store, directory, name, earlier, images, texts, pairing, perturbation, covered,
                       DUCKDB_MEMORY[-1])


def _write_part(store: Store, directory: Path, name: str, earlier: list[Path], images: VectorMatrix,
                texts: VectorMatrix | None, pairing: str, perturbation: str | None, covered: list[str],
                memory: str) -> dict[str, Any]:
    spill = store.root / "cache" / "duckdb-tmp"
    remove_stale_temps(directory, recursive=False, strict=False)  # a killed build's samples-with-images
    joined = temp_path(directory / "samples-with-images")  # a folder: one subfolder per bucket
    try:
        with catalog.connect(store) as con:
            _limit(con, spill, memory)
            con.register("image_offsets", images.shard_offsets())
            if texts is not None:
                con.register("text_offsets", texts.shard_offsets())
            joins, params = _view_sql(store, images, texts, pairing, perturbation, earlier, _bucket_bits(images.rows))
            con.execute(f"COPY ({joins}) TO {literal(str(joined))} "
                        "(FORMAT parquet, PARTITION_BY (split, _bucket), WRITE_PARTITION_COLUMNS true)", params)
            buckets = _buckets(joined)
            if not buckets:  # no row: the schema alone
                buckets = [(f"SELECT * FROM ({joins}) LIMIT 0", params)]
            digests = {"rows": RowDigest(), "text": RowDigest()}
            stream: ParquetStream | None = None
            try:
                for sql, bucket_params in buckets:
                    rows = duck.batches(con.sql(sql, params=bucket_params), ROW_GROUP_ROWS)
                    if stream is None:  # (the digests and the bucket are not written)
                        kept = pa.schema([rows.schema.field(n) for n in FEATURE_VIEW.names])
                        stream = ParquetStream(directory / name, kept, group_rows=ROW_GROUP_ROWS)
                    for batch in rows:
                        for which in digests:
                            digests[which] += RowDigest.of(batch.column(f"_{which}_hi"), batch.column(f"_{which}_lo"))
                        stream.write(pa.Table.from_batches([batch]).select(kept.names))
                assert stream is not None
                path = stream.finalize()
            finally:
                if stream is not None:
                    stream.discard()
    finally:
        shutil.rmtree(joined, ignore_errors=True)
    meta = pq.read_metadata(path)
    missing = _count_missing_text(path)
    return {"file": name, "rows": meta.num_rows, "missing_text": missing, "shards": covered,
            "digest_rows": digests["rows"].to_json(), "digest_text": digests["text"].to_json()}


def _bucket_bits(rows: int) -> int:
    """How many high bits of hash(sample_id) name a bucket of the sort, for buckets of about BUCKET_ROWS."""
    return max(0, math.ceil(math.log2(max(rows, 1) / BUCKET_ROWS)))


def _view_sql(store: Store, images: VectorMatrix, texts: VectorMatrix | None, pairing: str,
              perturbation: str | None, earlier: list[Path], bits: int) -> tuple[str, dict[str, object]]:
    """The query of the view's rows, unsorted, each with its `_bucket` (the top `bits` bits of
    hash(sample_id)); `_write_part` writes them partitioned by (split, _bucket), then reads each bucket
    sorted, in order (`_buckets`): (split, bucket, hash) is the view's order, (split, hash).

    Why not one query: the joins and the sort together ran out of 256 MB and of 512 MB at 5M samples (and
    1 GB was then the view's peak), where the joins alone, and a sort alone, each fit in 256 MB: DuckDB
    spills a join's build side or a sort's runs, not both at once. Why buckets: one sort of every row grew
    with the rows (see BUCKET_ROWS)."""
    params: dict[str, object] = {"root": str(store.root.resolve()) + "/",
                                 "image_files": images.shard_offsets().column("path").to_pylist()}

    def rows_of(files: str, offsets: str) -> str:
        # a content hash written twice (an import and an encode of the same image) keeps its first row
        return (f"SELECT v.content_hash, min(v.file_row_number + o.offset) AS row "
                f"FROM read_parquet(${files}, filename = true, file_row_number = true) v "
                f"JOIN {offsets} o ON v.filename = $root || o.path GROUP BY v.content_hash")

    where = "derived_from IS NULL"
    if perturbation is not None:
        where, params["perturbation"] = "perturbation = $perturbation", perturbation
    if earlier:  # an appended part: only samples no earlier part holds
        where += " AND sample_id NOT IN (SELECT sample_id FROM read_parquet($earlier))"
        params["earlier"] = [str(p) for p in earlier]
    text_key = "s.text_hash" if pairing == "as-ingested" else "coalesce(g.shared_text_hash, s.text_hash)"
    text_cte = text_join = ""
    if texts is not None:
        params["text_files"] = texts.shard_offsets().column("path").to_pylist()
        text_cte = f", t AS ({rows_of('text_files', 'text_offsets')})"
        text_join = f"LEFT JOIN t ON t.content_hash = {text_key}"
    text_row = "t.row" if texts is not None else "NULL::BIGINT"
    shared = ("LEFT JOIN (SELECT group_key, any_value(text_hash) FILTER (WHERE label = 1) AS shared_text_hash "
              "FROM samples GROUP BY group_key) g ON g.group_key = s.group_key") if pairing == "shared" else ""
    # what a row is, for the digests: one MD5 each (see the module's docstring), split into two UBIGINTs
    what = "concat_ws('|', s.sample_id, s.label, s.split, s.generator, s.group_key)"
    text_md5 = (f"CASE WHEN t.row IS NULL THEN NULL ELSE md5_number(concat_ws('|', {what}, {text_key})) END"
                if texts is not None else "NULL::UHUGEINT")
    joins = f"""
        WITH s AS (
            SELECT DISTINCT ON (sample_id) sample_id, split, label, generator, group_key, text_hash
            FROM samples WHERE {where}
        ), i AS ({rows_of('image_files', 'image_offsets')}){text_cte},
        v AS (
            SELECT s.sample_id, s.split, s.label, s.generator, s.group_key,
                   i.row AS image_row, {text_row} AS text_row,
                   md5_number({what}) AS rows_md5, {text_md5} AS text_md5
            FROM s JOIN i ON i.content_hash = s.sample_id {shared} {text_join}
        )
        SELECT sample_id, split, label, generator, group_key, image_row, text_row,
               (rows_md5 >> 64)::UBIGINT AS _rows_hi, (rows_md5 & {_MASK64})::UBIGINT AS _rows_lo,
               (text_md5 >> 64)::UBIGINT AS _text_hi, (text_md5 & {_MASK64})::UBIGINT AS _text_lo,
               {f"hash(sample_id) >> {64 - bits}" if bits else "0::UBIGINT"} AS _bucket
        FROM v
    """
    return joins, params


def _buckets(joined: Path) -> list[tuple[str, dict[str, object]]]:
    """A query per bucket folder DuckDB wrote under `joined` (`split=…/_bucket=…/`), in the view's order:
    split, then bucket (a range of hashes), each bucket's rows by hash(sample_id)."""
    def value(folder: Path) -> str:
        return unquote(folder.name.partition("=")[2])

    found: list[tuple[str, dict[str, object]]] = []
    for split in sorted((d for d in joined.iterdir() if d.is_dir()), key=value) if joined.is_dir() else ():
        for bucket in sorted((d for d in split.iterdir() if d.is_dir()), key=lambda d: int(value(d))):
            files = sorted(str(f) for f in bucket.glob("*.parquet"))
            found.append(("SELECT * EXCLUDE (_bucket) FROM read_parquet($files, hive_partitioning = false) "
                          "ORDER BY hash(sample_id)", {"files": files}))
    return found


def _count_missing_text(path: Path) -> int:
    file = pq.ParquetFile(path)
    index = file.schema_arrow.get_field_index("text_row")
    total = 0
    for g in range(file.metadata.num_row_groups):
        stats = file.metadata.row_group(g).column(index).statistics
        total += stats.null_count if stats is not None and stats.has_null_count else 0
    return total


def _limit(con: duckdb.DuckDBPyConnection, spill: Path, memory: str) -> None:
    duck.limit_memory(con, memory, spill, DUCKDB_THREADS)
    con.execute("SET preserve_insertion_order = true")


def _read_manifest(directory: Path) -> dict[str, Any] | None:
    path = directory / "view.json"
    return json.loads(path.read_text()) if path.exists() else None

