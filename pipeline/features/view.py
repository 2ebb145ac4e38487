"""The training view of one model's embeddings: samples joined with their image and text vectors.

Built once per (model key, text pairing) by DuckDB, out of core, into one float16 Parquet file
sorted by split then by a hash of the sample id (a fixed pseudo-random order), in row groups the
loader shuffles. Its name carries a fingerprint of the shards it was built from, so it is rebuilt
exactly when samples or embeddings change, and every run or sweep over unchanged data reuses it.

Text pairing: `as-ingested` pairs each image with its own text (D3: real ↔ caption, generated ↔
prompt). `shared` gives every member of a group the text of its generated members, so a real
image and its generated siblings carry the same text: text alone can then not tell them apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.features.vectors import fingerprint as shards_fingerprint
from pipeline.store import catalog
from pipeline.store.atomic import atomic_write
from pipeline.store.layout import Store

PAIRINGS = ("as-ingested", "shared")
ROW_GROUP_ROWS = 4096
_DUCKDB_MEMORY = "2GB"


@dataclass(frozen=True)
class FeatureTable:
    path: Path
    model_key: str
    pairing: str
    fingerprint: str
    dim: int


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


def feature_table(store: Store, model_key: str, pairing: str = "as-ingested",
                  perturbation: str | None = None) -> FeatureTable:
    """The (possibly cached) joined feature file for this model and pairing.

    Samples derived by `pipeline perturb` are left out, unless `perturbation` (e.g. "jpeg:75") asks
    for the samples derived by that operation only.
    """
    if pairing not in PAIRINGS:
        raise PipelineError(f"--pairing must be one of {', '.join(PAIRINGS)}.")
    samples = catalog.shard_paths(store, "samples")
    vectors = catalog.shard_paths(store, "embeddings", model_key)
    images = [p for p in vectors if p.name.startswith("image-")]
    texts = [p for p in vectors if p.name.startswith("text-")]
    if not images:
        raise PipelineError(f"No image embeddings for {model_key}: run `pipeline encode` first.")
    salt = pairing if perturbation is None else f"{pairing}|{perturbation}"
    fingerprint = shards_fingerprint(store, samples + vectors, salt)
    path = store.root / "cache" / "features" / model_key / f"{pairing}-{fingerprint}.parquet"
    dim = _dim(images[0])
    if not path.exists():
        _build(store, path, images, texts, pairing, dim, perturbation)
    return FeatureTable(path, model_key, pairing, fingerprint, dim)


def _dim(shard: Path) -> int:
    return pq.read_schema(shard).field("vector").type.list_size


def _build(store: Store, path: Path, images: list[Path], texts: list[Path], pairing: str, dim: int,
           perturbation: str | None = None) -> None:
    derived = ("derived_from IS NULL" if perturbation is None
               else "perturbation = '" + perturbation.replace("'", "''") + "'")
    text_key = "text_hash" if pairing == "as-ingested" else "shared_text_hash"
    image_list = _sql_list(store, images)
    text_join = (
        f"LEFT JOIN (SELECT content_hash, vector FROM read_parquet({_sql_list(store, texts)})) t "
        f"ON t.content_hash = p.{text_key}"
        if texts else "LEFT JOIN (SELECT NULL::VARCHAR AS content_hash, NULL::FLOAT[] AS vector) t ON false"
    )
    sql = f"""
        WITH s AS (
            SELECT DISTINCT ON (sample_id) sample_id, split, label, generator, group_key, text_hash
            FROM samples WHERE {derived}
        ), p AS (
            SELECT *, coalesce(
                any_value(text_hash) FILTER (WHERE label = 1) OVER (PARTITION BY group_key),
                text_hash) AS shared_text_hash
            FROM s
        )
        SELECT p.sample_id, p.split, p.label, p.generator, i.vector AS image, t.vector AS text
        FROM p
        JOIN (SELECT content_hash, vector FROM read_parquet({image_list})) i ON i.content_hash = p.sample_id
        {text_join}
        ORDER BY p.split, hash(p.sample_id)
    """
    schema = pa.schema([
        ("sample_id", pa.string()), ("split", pa.string()), ("label", pa.int8()), ("generator", pa.string()),
        ("image", pa.list_(pa.float16(), dim)), ("text", pa.list_(pa.float16(), dim)),
    ])
    spill = store.root / "cache" / "duckdb-tmp"

    def write(tmp: Path) -> None:
        with catalog.connect(store, read_only=True) as con, pq.ParquetWriter(tmp, schema, compression="zstd") as out:
            con.execute(f"SET memory_limit = '{_DUCKDB_MEMORY}'")
            con.execute(f"SET temp_directory = '{spill}'")
            rel = con.sql(sql)
            stream = getattr(rel, "to_arrow_reader", None) or rel.fetch_record_batch  # DuckDB 2 / 1
            for batch in stream(ROW_GROUP_ROWS):
                out.write_table(_to_float16(pa.Table.from_batches([batch]), schema, dim), row_group_size=ROW_GROUP_ROWS)

    atomic_write(path, write)


def _to_float16(table: pa.Table, schema: pa.Schema, dim: int) -> pa.Table:
    cols = []
    for name in schema.names:
        col = table.column(name).combine_chunks()
        if name in ("image", "text"):
            col = _vectors(col, dim)
        cols.append(col.cast(schema.field(name).type) if name not in ("image", "text") else col)
    return pa.Table.from_arrays(cols, schema=schema)


def _vectors(col: pa.Array, dim: int) -> pa.Array:
    """FLOAT[] from DuckDB (nulls allowed) → fixed_size_list<float16>[dim]."""
    valid = col.is_valid().to_numpy(zero_copy_only=False)
    values = np.zeros((len(col), dim), np.float16)
    if valid.any():
        values[valid] = np.asarray(col.filter(pa.array(valid)).flatten().to_numpy(), np.float32).reshape(-1, dim)
    arr = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), dim)
    if valid.all():
        return arr
    return pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), dim, mask=pa.array(~valid))


def _sql_list(store: Store, paths: list[Path]) -> str:
    return "[" + ", ".join("'" + store.relative(p).replace("'", "''") + "'" for p in paths) + "]"
