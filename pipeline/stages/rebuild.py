"""Stage `catalog rebuild`: derive the manifest and catalog.duckdb again from the Parquet files
(they are the truth), beside the old ones, then swap them in; a damaged file is left out and named."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import Validated
from pipeline.errors import PipelineError
from pipeline.reporting import Reporter
from pipeline.store import writes
from pipeline.store.layout import Store


@dataclass(frozen=True)
class RebuildConfig(Validated):
    store: Store
    wait: bool = True  # wait for another writer of the store instead of stopping

    def check(self) -> None:
        if self.store.root.exists() and not self.store.root.is_dir():
            raise PipelineError(f"--store {self.store.root} is a file, not a store directory.")
        if not self.store.root.is_dir():
            raise PipelineError(f"No store at {self.store.root}: nothing to rebuild.")
        # (a folder that is not a store is refused by `writes.rebuild`, before anything is written)


def run(config: RebuildConfig, reporter: Reporter | None = None) -> writes.Reconciled:
    return writes.rebuild(config.store, reporter, config.wait)
