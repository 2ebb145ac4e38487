"""`pipeline demo`: the whole cache on synthetic D3 data with a tiny random-weight CLIP, offline.

Returns the results of each stage so the CLI can render them (and tests can check them).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from pipeline.encoding.clip import ModelSpec
from pipeline.reporting import Reporter, Silent
from pipeline.runs.config import TrainConfig
from pipeline.stages import encode, ingest, neighbors, report, sql, status, train
from pipeline.stages.encode import EncodeConfig, EncodeResult
from pipeline.stages.ingest import IngestConfig, IngestResult
from pipeline.stages.neighbors import NeighborQuery, NeighborResult
from pipeline.stages.report import ReportConfig, ReportResult
from pipeline.stages.status import StatusConfig, StoreStatus
from pipeline.stages.train import TrainJob, TrainResult
from pipeline.store import catalog
from pipeline.store.layout import Store
from pipeline.synthetic import SyntheticD3, make_d3

DEMO_MODEL = "Tiny-ViT-16"
# What the demo asks of the store in SQL (shown with the command that asks it).
QUERIES = (
    ("samples per generator and split",
     "SELECT generator, split, count(*) AS n FROM samples GROUP BY ALL ORDER BY generator, split"),
    ("why inputs were quarantined",
     "SELECT stage, reason, count(*) AS n, any_value(detail) AS example FROM quarantine GROUP BY ALL"),
    ("each sample with its image and text vectors (first rows)",
     "SELECT s.generator, s.label, left(s.text, 40) AS text, len(i.vector) AS image_dim, "
     "len(t.vector) AS text_dim FROM samples s "
     "JOIN embeddings i ON i.modality = 'image' AND i.content_hash = s.sample_id "
     "JOIN embeddings t ON t.modality = 'text' AND t.content_hash = s.text_hash LIMIT 5"),
    ("the detector's test scores by generator",
     "SELECT generator, count(*) AS n, round(avg(score), 3) AS mean_score, "
     "round(avg(((score > 0.5)::INT = label)::INT), 3) AS accuracy "
     "FROM scores WHERE split = 'test' GROUP BY 1 ORDER BY 1"),
)


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
    status: StoreStatus
    queries: list[tuple[str, str, pa.Table]]  # title, SQL, result


def run(config: DemoConfig, reporter: Reporter | None = None) -> DemoResult:
    reporter = reporter or Silent()
    if config.fresh and config.root.exists():
        shutil.rmtree(config.root)
    data = make_d3(config.root / "source", rows=config.rows)
    store = Store(config.root / "store")
    ingested = ingest.run(IngestConfig(data.parquet, "d3", store, real_images=data.real_images), reporter)
    encode_config = EncodeConfig(store, ModelSpec(config.model), workers=config.workers, batch_size=32)
    encoded = encode.run(encode_config, reporter)
    encoded_again = encode.run(encode_config, reporter)
    # the paper's method on the cached features; small data, so a few epochs with a higher lr
    config_ = TrainConfig.from_dict({"epochs": 8, "batch_size": 64, "lr": 1e-2, "name": "demo"})
    trained = train.run(TrainJob(store, config_), reporter)
    page = report.run(ReportConfig(store, trained.run_id), reporter)
    first_test = catalog.query(store, "SELECT sample_id FROM scores WHERE split = 'test' ORDER BY sample_id LIMIT 1")
    neighbours = neighbors.run(NeighborQuery(store, sample_id=first_test.column(0)[0].as_py(), k=3,
                                             run_id=trained.run_id), reporter)
    answers = [(title, query, sql.run_query(store, query)) for title, query in QUERIES]
    return DemoResult(data, store, ingested, encoded, encoded_again, trained, page, neighbours,
                      status.run(StatusConfig(store)), answers)
