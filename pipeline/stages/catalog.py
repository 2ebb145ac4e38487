"""Stage `catalog rebuild`: derive catalog.duckdb again from the Parquet files (they are the truth)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import Validated
from pipeline.errors import PipelineError
from pipeline.reporting import Reporter
from pipeline.store import catalog
from pipeline.store.layout import Store


@dataclass(frozen=True)
class RebuildConfig(Validated):
    store: Store

    def check(self) -> None:
        if not self.store.root.is_dir():
            raise PipelineError(f"No store at {self.store.root}: nothing to rebuild.")


def run(config: RebuildConfig, reporter: Reporter | None = None) -> catalog.Reconciled:
    return catalog.rebuild(config.store)
