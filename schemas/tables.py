"""Column declarations for samples, embeddings, quarantine, runs and scores.

Nothing else in the project spells a column list: code derives names and types from these schemas.
Each schema carries two metadata keys, written into every Parquet file: the table's name and
`SCHEMA_VERSION`. A reader meeting another version stops (see `schema_problem`).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

SCHEMA_VERSION = 2  # 2: nullable columns may be added; files of version 1 still read (missing columns NULL)
# Tables whose meaning changed since, each stamped with its own version (the others keep SCHEMA_VERSION, so
# fingerprints of their files do not move). 3: `label` and `generator` may be NULL (unlabelled samples, split
# `unlabelled`, and their scores): a reader of version 2 would take NULL for a label, so it must refuse them.
TABLE_VERSIONS = {"samples": 3, "scores": 3, "decisions": 3}
READABLE_VERSIONS = (1, 2, 3)
_KEY_TABLE = b"pipeline.table"
_KEY_VERSION = b"pipeline.schema_version"

MODALITIES = ("image", "text")
SPLITS = ("train", "val", "test")  # where a detector learns and is measured; a later must not leak into an earlier
UNLABELLED = "unlabelled"  # the split of samples without a label (`ingest --unlabelled`, `predict --keep`)
EMBEDDING_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}


def version_of(name: str) -> int:
    """The schema version files of table `name` are written with."""
    return TABLE_VERSIONS.get(name, SCHEMA_VERSION)


def stamp(name: str, schema: pa.Schema) -> pa.Schema:
    """Attach the table name and its schema version to a schema's metadata."""
    meta = dict(schema.metadata or {})
    meta.update({_KEY_TABLE: name.encode(), _KEY_VERSION: str(version_of(name)).encode()})
    return schema.with_metadata(meta)


_UTC_MS = pa.timestamp("ms", tz="UTC")

SAMPLES = stamp(
    "samples",
    pa.schema(
        [
            pa.field("sample_id", pa.string(), nullable=False),  # sha256 of the image bytes
            pa.field("label", pa.int8()),  # 0 real, 1 generated; NULL: unlabelled (split `unlabelled`)
            pa.field("generator", pa.string()),  # "real" for label 0; NULL when unlabelled
            pa.field("generator_original", pa.string()),  # the name the source gave (canonical above)
            pa.field("split", pa.string(), nullable=False),  # train | val | test | unlabelled
            pa.field("group_key", pa.string(), nullable=False),  # split unit (D3: prompt row)
            pa.field("text", pa.string()),  # caption (real) or prompt (generated)
            pa.field("text_hash", pa.string()),  # sha256 of the text's UTF-8 bytes
            pa.field("source_format", pa.string(), nullable=False),
            pa.field("source_uri", pa.string(), nullable=False),  # file the bytes live in
            pa.field("source_member", pa.string()),  # tar member or Parquet column
            pa.field("source_row", pa.int64()),  # row inside a Parquet/HDF5 source
            pa.field("byte_offset", pa.int64()),  # start of the bytes inside a tar
            pa.field("byte_length", pa.int64()),
            pa.field("ingested_at", _UTC_MS, nullable=False),
            pa.field("derived_from", pa.string()),  # `pipeline perturb`: the sample_id perturbed
            pa.field("perturbation", pa.string()),  # `pipeline perturb`: the operation, e.g. jpeg:75
        ]
    ),
)

QUARANTINE = stamp(
    "quarantine",
    pa.schema(
        [
            pa.field("content_hash", pa.string()),  # image sha256 when the bytes were readable
            pa.field("stage", pa.string(), nullable=False),  # ingest | decode
            pa.field("reason", pa.string(), nullable=False),  # short code, e.g. truncated
            pa.field("detail", pa.string(), nullable=False),  # the full message
            pa.field("source_uri", pa.string(), nullable=False),
            pa.field("source_member", pa.string()),
            pa.field("source_row", pa.int64()),
            pa.field("recorded_at", _UTC_MS, nullable=False),
            # reason label_conflict: the label and generator this input claimed (NULL in rows written before
            # they were kept: such a conflict still keeps its sample out of `samples` until resolved)
            pa.field("label", pa.int8()),
            pa.field("generator", pa.string()),
        ]
    ),
)

DECISIONS = stamp(
    "decisions",
    pa.schema(
        [  # label decisions, appended, never rewritten: the latest user decision per sample holds
            pa.field("sample_id", pa.string(), nullable=False),
            # relabel: use `label`/`generator` | exclude: use as neither | restore: as ingested (an undo) |
            # labelled: ingest gave an unlabelled sample a label (its unlabelled row is hidden)
            pa.field("action", pa.string(), nullable=False),
            pa.field("label", pa.int8()),
            pa.field("generator", pa.string()),
            pa.field("note", pa.string()),  # the command that decided, for the record
            pa.field("decided_at", _UTC_MS, nullable=False),
        ]
    ),
)

RUNS = stamp(
    "runs",
    pa.schema(
        [
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("name", pa.string()),  # a label for people; not part of the config hash
            pa.field("config_hash", pa.string(), nullable=False),  # config + data fingerprint
            pa.field("model_key", pa.string(), nullable=False),
            pa.field("features", pa.string(), nullable=False),  # image | text | image+text
            pa.field("val_auc", pa.float64()),
            pa.field("test_auc", pa.float64()),
            pa.field("config_json", pa.string(), nullable=False),
            pa.field("metrics_json", pa.string(), nullable=False),
            pa.field("checkpoint", pa.string()),
            pa.field("created_at", _UTC_MS, nullable=False),
        ]
    ),
)

SCORES = stamp(
    "scores",
    pa.schema(
        [
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("sample_id", pa.string(), nullable=False),
            pa.field("split", pa.string(), nullable=False),
            pa.field("label", pa.int8()),  # NULL: an unlabelled sample
            pa.field("generator", pa.string()),
            pa.field("score", pa.float32(), nullable=False),  # probability of "generated"
        ]
    ),
)

INDEXES = stamp(
    "indexes",
    pa.schema(
        [
            pa.field("index_id", pa.string(), nullable=False),  # <modality>-<kind>-<fingerprint>
            pa.field("model_key", pa.string(), nullable=False),
            pa.field("modality", pa.string(), nullable=False),  # image | text
            pa.field("kind", pa.string(), nullable=False),  # flat | ivf | hnsw
            pa.field("params_json", pa.string(), nullable=False),  # nlist, nprobe, M, efSearch, …
            pa.field("vectors", pa.int64(), nullable=False),
            pa.field("dim", pa.int32(), nullable=False),
            pa.field("fingerprint", pa.string(), nullable=False),  # of the embedding shards indexed
            pa.field("recall_at_10", pa.float64()),  # against exact search; 1 for flat
            pa.field("build_seconds", pa.float64(), nullable=False),
            pa.field("path", pa.string(), nullable=False),  # the index file, relative to the store
            pa.field("created_at", _UTC_MS, nullable=False),
        ]
    ),
)

LEAKS = stamp(
    "leaks",
    pa.schema(
        [
            pa.field("model_key", pa.string(), nullable=False),
            pa.field("modality", pa.string(), nullable=False),
            pa.field("kind", pa.string(), nullable=False),  # exact (same bytes) | near (similarity)
            pa.field("sample_a", pa.string(), nullable=False),  # the member in the earlier split
            pa.field("split_a", pa.string(), nullable=False),
            pa.field("sample_b", pa.string(), nullable=False),  # the member in the later split
            pa.field("split_b", pa.string(), nullable=False),
            pa.field("similarity", pa.float32(), nullable=False),
            pa.field("threshold", pa.float32(), nullable=False),
            pa.field("detected_at", _UTC_MS, nullable=False),
        ]
    ),
)

METRICS = stamp(
    "metrics",
    pa.schema(
        [
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("split", pa.string(), nullable=False),
            pa.field("generator", pa.string(), nullable=False),  # "all", or one generator with every real sample
            pa.field("metric", pa.string(), nullable=False),  # auc | ap | acc | eer | tpr_at_fpr_1 | …
            pa.field("value", pa.float64()),
            pa.field("lo", pa.float64()),  # 95% group-bootstrap interval
            pa.field("hi", pa.float64()),
            pa.field("n", pa.int64(), nullable=False),  # samples the value is over (real_acc: the real ones, …)
            pa.field("n_real", pa.int64()),  # real images behind it (NULL: a run from before these were recorded)
            pa.field("n_fake", pa.int64()),  # generated images behind it
        ]
    ),
)

SOURCES = stamp(
    "sources",
    pa.schema(
        [  # ingest's ledger: one row per unit read (a file, or a manifest row), so unchanged ones are skipped
            pa.field("source_uri", pa.string(), nullable=False),
            pa.field("size", pa.int64(), nullable=False),  # -1 when the file could not be stat-ed
            pa.field("mtime_ns", pa.int64(), nullable=False),
            pa.field("fingerprint", pa.string()),  # Parquet footer digest: the same file after a copy
            pa.field("extra", pa.string()),  # must match too: a manifest row's values, a sidecar caption
            pa.field("options_digest", pa.string(), nullable=False),  # ingest options that shape the rows
            pa.field("items", pa.int64(), nullable=False),  # samples and problems the unit gave
            pa.field("recorded_at", _UTC_MS, nullable=False),
            # A file read as growing (a tar, a CSV manifest): where its next read starts (the end of its
            # last complete member or line), a digest of the 64 KiB before that (unchanged: only grown),
            # and the manifest rows before it. NULL: read it whole next time (or a ledger before these).
            pa.field("resume_offset", pa.int64()),
            pa.field("resume_tail", pa.string()),
            pa.field("resume_rows", pa.int64()),
        ]
    ),
)

TABLES: dict[str, pa.Schema] = {
    "samples": SAMPLES,
    "quarantine": QUARANTINE,
    "runs": RUNS,
    "scores": SCORES,
    "indexes": INDEXES,
    "leaks": LEAKS,
    "metrics": METRICS,
    "sources": SOURCES,
    "decisions": DECISIONS,
}


def embeddings_schema(dim: int, dtype: str = "float16") -> pa.Schema:
    """Embedding rows of one model: vectors of `dim` values stored as float16 or float32."""
    if dtype not in EMBEDDING_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(EMBEDDING_DTYPES)}, not {dtype!r}")
    return stamp(
        "embeddings",
        pa.schema(
            [
                pa.field("model_key", pa.string(), nullable=False),
                pa.field("modality", pa.string(), nullable=False),  # image | text
                pa.field("content_hash", pa.string(), nullable=False),
                pa.field("vector", pa.list_(EMBEDDING_DTYPES[dtype], dim), nullable=False),
                pa.field("norm", pa.float32()),  # the L2 norm before normalisation (NULL: unknown)
            ]
        ),
    )


def encoded_schema(dim: int, dtype: str = "float16") -> pa.Schema:
    """What an encode unit of work returns per input row: a vector and its norm, or why there is none.

    Rows with a vector become `embeddings` rows, rows with a reason become `quarantine` rows; the
    location columns say where a failed input lives. Not stored: the units' common output.
    """
    stored = embeddings_schema(dim, dtype)
    return stamp(
        "encoded",
        pa.schema(
            [stored.field(n) for n in ("model_key", "modality", "content_hash")]
            + [stored.field("vector").with_nullable(True), stored.field("norm")]
            + [QUARANTINE.field(n).with_nullable(True) for n in ("reason", "detail", "source_uri")]
            + [QUARANTINE.field(n) for n in ("source_member", "source_row")]
        ),
    )


FEATURE_VIEW = stamp(
    "feature_view",
    pa.schema(
        [  # the training view: a sample, what it is, and which rows of the model's vector matrices hold it
            pa.field("sample_id", pa.string(), nullable=False),
            pa.field("split", pa.string(), nullable=False),
            pa.field("label", pa.int8(), nullable=False),
            pa.field("generator", pa.string(), nullable=False),
            pa.field("group_key", pa.string()),
            pa.field("image_row", pa.int64(), nullable=False),  # row of cache/vectors/<model>/image
            pa.field("text_row", pa.int64()),  # row of cache/vectors/<model>/text (NULL: no text vector)
        ]
    ),
)


PREDICT_INPUTS = stamp(
    "predict_inputs",
    pa.schema(
        [  # what `pipeline predict` was given, one row per image found (a work file, not stored)
            pa.field("path", pa.string(), nullable=False),  # as shown: a file, `TAR::member`
            pa.field("source_uri", pa.string(), nullable=False),  # the file the bytes live in
            pa.field("source_member", pa.string()),  # tar member
            pa.field("byte_offset", pa.int64()),  # start of the bytes inside a tar
            pa.field("byte_length", pa.int64()),
            pa.field("caption", pa.string()),  # sidecar .txt, a list's caption column, a tar's KEY.txt, --caption
            pa.field("reason", pa.string()),  # found unreadable before any byte was read (a damaged tar, …)
            pa.field("detail", pa.string()),
        ]
    ),
)

_NEIGHBOUR = pa.struct([
    pa.field("sample_id", pa.string()),
    pa.field("similarity", pa.float32()),
    pa.field("label", pa.int8()),
    pa.field("generator", pa.string()),
    pa.field("split", pa.string()),
])

PREDICTIONS = stamp(
    "predictions",
    pa.schema(
        [  # what `pipeline predict` writes (a file outside the store), one row per input
            pa.field("path", pa.string(), nullable=False),  # the input: a file, `TAR::member`, a list's path
            pa.field("sha256", pa.string()),  # of the bytes read (NULL: they could not be read)
            pa.field("score", pa.float32()),  # the detector's probability of "generated", as in `scores`
            pa.field("generated", pa.bool_()),  # score > threshold
            pa.field("threshold", pa.float32()),  # the run's val-chosen threshold, or --threshold
            pa.field("probability", pa.float32()),  # the score calibrated on validation
            pa.field("ood", pa.bool_()),  # far from every training image: the score is unreliable
            pa.field("similarity", pa.float32()),  # what the OOD flag compares (see the detector's config)
            pa.field("cached", pa.bool_()),  # the image vector came from the store, not a forward pass
            pa.field("reason", pa.string()),  # why there is no score: unreadable, not_an_image, …
            pa.field("detail", pa.string()),
            pa.field("neighbours", pa.list_(_NEIGHBOUR)),  # --explain: the nearest training images
        ]
    ),
)

ALARMS = stamp(
    "alarms",
    pa.schema(
        [  # the `alarms` view: one row per alarm a run stored in its metrics (read from `runs.metrics_json`)
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("kind", pa.string(), nullable=False),  # text_shortcut | text_undecided | format_shortcut | …
            pa.field("sentence", pa.string(), nullable=False),
            pa.field("evidence", pa.string()),  # JSON: the numbers behind the sentence
        ]
    ),
)


INDEX_IDS = stamp(
    "index_ids",
    pa.schema([pa.field("content_hash", pa.string(), nullable=False)]),  # row i of a FAISS index
)


def table_of(metadata: dict[bytes, bytes] | None) -> str | None:
    """The table name stamped in a file's metadata, if any."""
    return (metadata or {}).get(_KEY_TABLE, b"").decode() or None


def schema_problem(metadata: dict[bytes, bytes] | None, expected_table: str, where: str) -> str | None:
    """A sentence saying why a file with this metadata cannot be read as `expected_table`, or None."""
    meta = metadata or {}
    table = meta.get(_KEY_TABLE, b"").decode()
    version = meta.get(_KEY_VERSION, b"").decode()
    if not table or not version:
        return f"{where} carries no pipeline schema stamp; it was not written by this pipeline."
    if table != expected_table:
        return f"{where} holds the '{table}' table, not '{expected_table}'."
    newest = version_of(table)
    if version not in {str(v) for v in READABLE_VERSIONS if v <= newest}:
        return (
            f"{where} was written with schema version {version} of '{table}', but this pipeline "
            f"reads version {newest}; use a pipeline release that matches the store."
        )
    return None


def from_rows(schema: pa.Schema, rows: list[dict[str, Any]]) -> pa.Table:
    """A table of `schema` from row dicts. A key the schema lacks (a misspelt column) is an error,
    and so is a missing non-nullable column; omitted nullable columns are NULL."""
    if rows:
        _check_names(schema, set().union(*rows))
    return pa.Table.from_pylist(rows, schema=schema)


def from_columns(schema: pa.Schema, columns: dict[str, Any]) -> pa.Table:
    """A table of `schema` from named columns (arrays or lists), with the same checks as `from_rows`."""
    _check_names(schema, set(columns))
    n = max((len(v) for v in columns.values() if v is not None), default=0)
    arrays = []
    for field in schema:
        value = columns.get(field.name)
        if value is None:
            arrays.append(pa.nulls(n, field.type))
        elif isinstance(value, pa.ChunkedArray | pa.Array):
            arrays.append(value if value.type == field.type else value.cast(field.type))
        else:
            arrays.append(pa.array(value, field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _check_names(schema: pa.Schema, given: set[str]) -> None:
    unknown = sorted(given - set(schema.names))
    if unknown:
        raise KeyError(f"{table_of(schema.metadata) or 'table'} has no column(s) {', '.join(unknown)}")
    missing = sorted(f.name for f in schema if not f.nullable and f.name not in given)
    if missing:
        raise KeyError(f"{table_of(schema.metadata) or 'table'} needs column(s) {', '.join(missing)}")
