"""The store: its layout on disk, atomic writes, the DuckDB catalog and the writer lock."""
