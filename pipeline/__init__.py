"""Embedding-cache pipeline: ingest image collections, encode them once with CLIP, query with SQL.

`from pipeline import Detector` loads on first use (importing `pipeline` imports no torch)."""

from typing import Any

from pipeline.errors import PipelineError

__all__ = ["Detector", "PipelineError"]


def __getattr__(name: str) -> Any:
    if name == "Detector":
        from pipeline.detector import Detector

        return Detector
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
