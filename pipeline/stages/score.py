"""`pipeline score --run RUN`: score samples (e.g. newly ingested and encoded ones, unlabelled ones too)
with a trained run, and say how many it could not score and why."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from pipeline.config import Validated
from pipeline.errors import PipelineError
from pipeline.evaluation.scores import ScoreWriter, bound_memory
from pipeline.features.loader import FeatureLoader, LoaderConfig
from pipeline.features.view import FeatureTable, feature_table
from pipeline.reporting import Reporter, Silent
from pipeline.runs.record import load_run
from pipeline.store import catalog, writes
from pipeline.store.layout import Store
from pipeline.store.writes import require_writable, writing
from schemas import SPLITS, UNLABELLED
from trainer.fit import predict

BATCH_ROWS = 8192


@dataclass(frozen=True)
class ScoreConfig(Validated):
    store: Store
    run_id: str
    wait: bool = True


@dataclass
class ScoreResult:
    run_id: str
    scored: int
    already_scored: int
    unlabelled: int = 0  # of `scored`: samples without a label
    not_scored: dict[str, int] = field(default_factory=dict)  # why, in words → samples the run cannot score


def run(cfg: ScoreConfig, reporter: Reporter | None = None) -> ScoreResult:
    """Score every encoded sample the run has not scored yet; one new score shard.

    The training view is brought up to date first (new samples append a part, nothing big is
    rebuilt); DuckDB then picks the view rows without a score of this run (an anti-join), so only
    those rows' vectors are gathered and scored, in batches.
    """
    reporter = reporter or Silent()
    store, run_id = cfg.store, cfg.run_id
    config, model, metrics = load_run(store, run_id)
    require_writable(store, "score", "the scores and the caches it reads vectors through")
    model_key = metrics.model_key
    if model_key not in catalog.model_keys(store):
        raise PipelineError(f"Run {run_id} needs embeddings of {model_key}, which this store lacks.")
    table = feature_table(store, model_key, config.pairing, reporter=reporter)
    loader = FeatureLoader(table, SPLITS, LoaderConfig(config.features, BATCH_ROWS, input_norm=config.input_norm))
    need_text = "AND v.text_row IS NOT NULL" if config.features != "image" else ""
    stamp = f"{datetime.now(UTC):%Y%m%d-%H%M%S}"
    writer = ScoreWriter(store, run_id, f"scored-{stamp}")  # rows stream to a temp file: nothing kept per row
    unlabelled = 0
    try:
        with catalog.connect(store) as con:
            bound_memory(con, store)  # the anti-join holds every scored id of the run: let DuckDB spill
            done = con.execute("SELECT count(DISTINCT sample_id) FROM scores WHERE run_id = ?",
                               [run_id]).fetchall()[0]
            not_scored = _not_scored(con, table, config.features != "image")
            rel = con.sql(
                f"SELECT v.* FROM {table.parts_sql} v WHERE v.split IN (SELECT unnest($splits)) {need_text} "
                "AND NOT EXISTS (SELECT 1 FROM scores s WHERE s.run_id = $run AND s.sample_id = v.sample_id) "
                f"ORDER BY v.{'text_row' if config.features == 'text' else 'image_row'}",  # vectors in file order
                params={"run": run_id, "splits": [*SPLITS, UNLABELLED]},
            )
            stream = getattr(rel, "to_arrow_reader", None) or rel.fetch_record_batch  # DuckDB 2 / 1
            for record in stream(BATCH_ROWS):
                batch = loader.batch_of(pa.Table.from_batches([record]))
                writer.write(batch.rows, predict(model, [batch.x], config.fit))
                unlabelled += batch.rows.column("label").null_count
        already = int(done[0])
        if not writer.rows:
            return ScoreResult(run_id, 0, already, 0, not_scored)
        with writing(store, reporter, cfg.wait):
            writes.commit(store, [writer.publish()])
    finally:
        writer.discard()
    return ScoreResult(run_id, writer.rows, already, unlabelled, not_scored)


def _not_scored(con: Any, table: FeatureTable, needs_text: bool) -> dict[str, int]:
    """Samples of the store (as ingested, not derived by `perturb`) that no run of this model can score,
    by why: no image vector (undecodable, or not encoded yet), or no text vector for a text detector.
    Counts only: the view's rows against the samples' (one count of distinct ids, spilling)."""
    total, undecodable = con.execute(
        "SELECT count(DISTINCT sample_id), count(DISTINCT sample_id) FILTER (WHERE sample_id IN "
        "(SELECT content_hash FROM quarantine WHERE stage = 'decode' AND content_hash IS NOT NULL)) "
        "FROM samples WHERE derived_from IS NULL").fetchall()[0]
    no_vector = max(0, int(total) - table.rows)
    why = {"undecodable (quarantined at decode)": min(int(undecodable), no_vector),
           "not encoded yet (run `pipeline encode`)": max(0, no_vector - int(undecodable))}
    if needs_text:
        why["no text vector (no caption, or not encoded yet)"] = int(con.execute(
            f"SELECT count(*) FROM {table.parts_sql} WHERE text_row IS NULL").fetchall()[0][0])
    return {reason: n for reason, n in why.items() if n}
