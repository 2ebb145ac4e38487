"""Embedding-cache pipeline: ingest image collections, encode them once with CLIP, query with SQL."""

from pipeline.errors import PipelineError

__all__ = ["PipelineError"]
