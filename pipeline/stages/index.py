"""Stage `index build`: a FAISS index over one model's cached vectors (see `pipeline.features.index`)."""

from __future__ import annotations

from pipeline.features.index import IndexConfig, IndexInfo, build_index
from pipeline.reporting import Reporter, Silent
from pipeline.store.writes import writing

__all__ = ["IndexConfig", "IndexInfo", "run"]


def run(config: IndexConfig, reporter: Reporter | None = None) -> IndexInfo:
    """Build the index, or find the one of these exact embeddings and reuse it."""
    reporter = reporter or Silent()
    with writing(config.store, reporter, config.wait):
        return build_index(config, reporter)
