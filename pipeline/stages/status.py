"""`pipeline status`: what the store holds — counts by split, label, generator and model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa

from pipeline.config import Validated
from pipeline.errors import PipelineError
from pipeline.reporting import Reporter
from pipeline.store import catalog
from pipeline.store.layout import Store


@dataclass
class ModelStatus:
    model_key: str
    random_weights: bool | None
    images_encoded: int
    images_pending: int
    texts_encoded: int
    texts_pending: int


@dataclass
class StoreStatus:
    samples: int
    by_split_label_generator: pa.Table
    quarantine_by_reason: pa.Table
    models: list[ModelStatus] = field(default_factory=list)
    derived: pa.Table | None = None  # runs, indexes and leak scans per model
    missing_captions: int = 0  # samples whose caption is missing or empty: image+text training leaves them out


@dataclass(frozen=True)
class StatusConfig(Validated):
    store: Store

    def check(self) -> None:
        if self.store.root.is_file():
            raise PipelineError(f"--store {self.store.root} is a file, not a store directory.")
        if not self.store.exists():
            raise PipelineError(f"No store at {self.store.root}: run `pipeline ingest` or `pipeline demo` first.")


def run(config: StatusConfig, reporter: Reporter | None = None) -> StoreStatus:
    """What the store holds; reads only (never waits for a writer, never changes the catalog)."""
    with catalog.connect(config.store) as con:  # one connection: its views are set up once
        return _status(config.store, lambda sql, params=None: con.sql(sql, params=params or None).to_arrow_table())


def _status(store: Store, q: Callable[..., pa.Table]) -> StoreStatus:
    samples = q("SELECT count(*) FROM samples").column(0)[0].as_py()
    groups = q(
        "SELECT split, label, generator, count(*) AS samples FROM samples "
        "GROUP BY ALL ORDER BY split, label, generator"
    )
    quarantine = q(
        "SELECT stage, reason, count(*) AS inputs FROM quarantine GROUP BY ALL ORDER BY stage, reason"
    )
    models = []
    images_total = q(
        "SELECT count(DISTINCT sample_id) FROM samples WHERE source_format NOT LIKE 'features:%'"
    ).column(0)[0].as_py()
    texts_total = q("SELECT count(DISTINCT text_hash) FROM samples").column(0)[0].as_py()
    for key in catalog.model_keys(store):
        counts = q(
            """
            SELECT
              count(DISTINCT e.content_hash) FILTER (WHERE e.modality = 'image' AND s.sample_id IS NOT NULL),
              (SELECT count(DISTINCT content_hash) FROM embeddings
                 WHERE model_key = ? AND modality = 'text'
                   AND content_hash IN (SELECT text_hash FROM samples)),
              (SELECT count(DISTINCT q.content_hash) FROM quarantine q WHERE q.stage = 'decode')
            FROM embeddings e LEFT JOIN samples s ON s.sample_id = e.content_hash
            WHERE e.model_key = ?
            """,
            [key, key],
        ).to_pylist()[0]
        images, texts, bad = counts.values()
        info = store.model_info(key)
        models.append(
            ModelStatus(
                model_key=key,
                random_weights=info.get("random_weights"),
                images_encoded=images,
                images_pending=max(0, images_total - images - bad),
                texts_encoded=texts,
                texts_pending=max(0, texts_total - texts),
            )
        )
    derived = q(
        """
        SELECT model_key, 'runs' AS what, count(*) AS n, round(max(test_auc), 4) AS best FROM runs GROUP BY ALL
        UNION ALL
        SELECT model_key, 'index ' || modality || ' ' || kind, max(vectors), round(max(recall_at_10), 4)
        FROM indexes GROUP BY ALL
        UNION ALL
        SELECT model_key, 'leak pairs at ' || threshold::DECIMAL(6, 4), count(*), NULL FROM leaks GROUP BY ALL
        ORDER BY 1, 2
        """
    )
    no_caption = q("SELECT count(*) FROM samples WHERE text IS NULL OR trim(text) = ''").column(0)[0].as_py()
    return StoreStatus(samples, groups, quarantine, models, derived, no_caption)
