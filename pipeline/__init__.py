"""Embedding-cache pipeline: ingest image collections, encode them once with CLIP, query with SQL.

`from pipeline import Store` is the Python API (`pipeline.api`): the stages the `pipeline` command runs.
"""

from typing import Any

from pipeline.errors import PipelineError

__all__ = ["PipelineError", "Store"]


def __getattr__(name: str) -> Any:
    # The API is imported on first use, so `import pipeline` (and every `pipeline` command, which
    # imports this package first) loads no torch, DuckDB or Arrow.
    if name == "Store":
        from pipeline.api import Store

        return Store
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
