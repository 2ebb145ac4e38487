"""Stage `index build`: a FAISS index over one model's cached vectors (see `pipeline.features.ann.build`)."""

from __future__ import annotations

from pipeline.features.ann.build import IndexConfig, build_index
from pipeline.features.ann.search import IndexInfo
from pipeline.reporting import Reporter, Silent
from pipeline.store.writes import writing

__all__ = ["IndexConfig", "IndexInfo", "run"]


def run(config: IndexConfig, reporter: Reporter | None = None) -> IndexInfo:
    """Build the index, or find the one of these exact embeddings and reuse it."""
    reporter = reporter or Silent()
    with writing(config.store, reporter, config.wait):
        return build_index(config, reporter)
