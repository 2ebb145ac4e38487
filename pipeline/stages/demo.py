"""`pipeline demo`: the whole cache on synthetic D3 data with a tiny random-weight CLIP, offline.

Returns the results of each stage so the CLI can render them (and tests can check them).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.store import catalog
from pipeline.encoding.clip import ModelSpec
from pipeline.stages.encode import EncodeConfig, EncodeResult, encode
from pipeline.stages.ingest import IngestConfig, IngestResult, ingest
from pipeline.stages.neighbors import NeighborQuery, NeighborResult, neighbors
from pipeline.reporting import Reporter
from pipeline.stages.report import ReportResult, run_report
from pipeline.store.layout import Store
from pipeline.synthetic import SyntheticD3, make_d3
from pipeline.stages.train import TrainConfig, TrainResult, train

DEMO_MODEL = "Tiny-ViT-16"


@dataclass(frozen=True)
class DemoConfig:
    root: Path = Path("data/demo")
    rows: int = 100
    model: str = DEMO_MODEL
    workers: int | None = None
    fresh: bool = True


@dataclass
class DemoResult:
    data: SyntheticD3
    store: Store
    ingested: IngestResult
    encoded: EncodeResult
    encoded_again: EncodeResult
    trained: TrainResult
    report: ReportResult
    neighbours: NeighborResult


def run_demo(config: DemoConfig, reporter: Reporter | None = None) -> DemoResult:
    if config.fresh and config.root.exists():
        shutil.rmtree(config.root)
    data = make_d3(config.root / "source", rows=config.rows)
    store = Store(config.root / "store")
    ingested = ingest(IngestConfig(data.parquet, "d3", store, real_images=data.real_images))
    encode_config = EncodeConfig(store, ModelSpec(config.model), workers=config.workers, batch_size=32)
    encoded = encode(encode_config, reporter)
    encoded_again = encode(encode_config, reporter)
    # the paper's method on the cached features; small data, so a few epochs with a higher lr
    trained = train(store, TrainConfig.from_dict({"epochs": 8, "batch_size": 64, "lr": 1e-2, "name": "demo"}))
    report = run_report(store, trained.run_id)
    first_test = catalog.query(store, "SELECT sample_id FROM scores WHERE split = 'test' ORDER BY sample_id LIMIT 1")
    neighbours = neighbors(NeighborQuery(store, sample_id=first_test.column(0)[0].as_py(), k=3,
                                         run_id=trained.run_id))
    return DemoResult(data, store, ingested, encoded, encoded_again, trained, report, neighbours)
