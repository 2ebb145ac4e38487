"""Embedding-cache pipeline: ingest image collections, encode them once with CLIP, query with SQL.

The Python API: `from pipeline import Store` (`pipeline.api`: the stages the `pipeline` command runs)
and `from pipeline import Detector` (`pipeline.detector`: a trained detector that scores new images).
"""

from typing import Any

from pipeline.errors import PipelineError

__all__ = ["Detector", "PipelineError", "Store"]


def __getattr__(name: str) -> Any:
    # The API is imported on first use, so `import pipeline` (and every `pipeline` command, which
    # imports this package first) loads no torch, DuckDB or Arrow.
    if name == "Store":
        from pipeline.api import Store

        return Store
    if name == "Detector":
        from pipeline.detector import Detector

        return Detector
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
