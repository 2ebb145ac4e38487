"""Every table of the store, declared once (pyarrow schemas) with the version stamped into each file."""

from schemas.tables import (
    EMBEDDING_DTYPES,
    INDEXES,
    LEAKS,
    MODALITIES,
    QUARANTINE,
    RUNS,
    SAMPLES,
    SCHEMA_VERSION,
    SCORES,
    TABLES,
    embeddings_schema,
    schema_problem,
    stamp,
    table_of,
)

__all__ = [
    "EMBEDDING_DTYPES",
    "INDEXES",
    "LEAKS",
    "MODALITIES",
    "QUARANTINE",
    "RUNS",
    "SAMPLES",
    "SCHEMA_VERSION",
    "SCORES",
    "TABLES",
    "embeddings_schema",
    "schema_problem",
    "stamp",
    "table_of",
]
