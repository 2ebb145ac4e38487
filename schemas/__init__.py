"""Every table of the store, declared once (pyarrow schemas) with the version stamped into each file.

Build tables with `from_rows` / `from_columns`: a misspelt column is an error, never a NULL column.
"""

from schemas.tables import (
    EMBEDDING_DTYPES,
    INDEX_IDS,
    INDEXES,
    LEAKS,
    MODALITIES,
    QUARANTINE,
    READABLE_VERSIONS,
    RUNS,
    SAMPLES,
    SCHEMA_VERSION,
    SCORES,
    SPLITS,
    TABLES,
    embeddings_schema,
    encoded_schema,
    feature_view_schema,
    from_columns,
    from_rows,
    schema_problem,
    stamp,
    table_of,
)

__all__ = [
    "EMBEDDING_DTYPES",
    "INDEXES",
    "INDEX_IDS",
    "LEAKS",
    "MODALITIES",
    "QUARANTINE",
    "READABLE_VERSIONS",
    "RUNS",
    "SAMPLES",
    "SCHEMA_VERSION",
    "SCORES",
    "SPLITS",
    "TABLES",
    "embeddings_schema",
    "encoded_schema",
    "feature_view_schema",
    "from_columns",
    "from_rows",
    "schema_problem",
    "stamp",
    "table_of",
]
