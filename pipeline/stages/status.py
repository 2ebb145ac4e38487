"""`pipeline status`: what the store holds — counts by split, label, generator and model.

Interactive at any size: the counts come from the manifest (each shard's rows grouped by what status
reports, recorded when the shard was committed), not from scanning rows."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import Validated
from pipeline.errors import PipelineError
from pipeline.reporting import Reporter
from pipeline.sources.common import RESOLVED
from pipeline.store import catalog, duck
from pipeline.store import manifest as manifests
from pipeline.store.layout import Store
from schemas import SAMPLES

DUCKDB_MEMORY = "64MB"  # the one row-scanning count (distinct texts) spills beyond this: 2.3M texts fit


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
    # samples with no text at all (no caption, no imported text vector: `text_hash` is NULL), whom every
    # model's image+text training leaves out; a text not encoded yet shows as a model's `texts_pending`
    without_text: int = 0


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
    manifest = catalog.snapshot(config.store).manifest
    with catalog.connect(config.store) as con:  # one connection: its views are set up once
        spill = Path(tempfile.gettempdir()) / f"pipeline-status-{os.getpid()}"
        duck.limit_memory(con, DUCKDB_MEMORY, spill)
        try:
            return _status(config.store, manifest,
                           lambda sql, params=None: con.sql(sql, params=params or None).to_arrow_table())
        finally:
            shutil.rmtree(spill, ignore_errors=True)


def _status(store: Store, manifest: manifests.Manifest, q: Callable[..., pa.Table]) -> StoreStatus:
    """Counts are sums of the manifest's per-shard counts; rows are read only where they cannot be:
    the distinct texts, and the few samples whose rows the `samples` view changes (relabelled or left
    out by a decision, an unlabelled copy superseded by a labelled one, an old label conflict). The
    samples without text come from each samples shard's footer (its `text_hash` NULL count).

    Every writer keeps a sample id once in `samples` (an unlabelled one may gain a labelled row) and a
    vector once per model, modality and hash, and writes a vector only for a sample of the store (its
    image, or its text): so the vectors of a model, less those of the samples left out, are the
    encoded samples."""
    samples = _sum(store, manifest, "samples")
    quarantine = _unresolved(_sum(store, manifest, "quarantine"))
    conflicts = sum(n for (_, reason), n in quarantine.items() if reason == "label_conflict")
    touched = bool(conflicts or manifest.of("decisions"))
    if touched:  # the rows of the touched samples as stored, replaced by what the view makes of them
        counted = ', '.join(manifests.COUNTED['samples'])
        for sign, view in ((-1, "samples_all"), (1, "samples")):
            for row in q(f"SELECT {counted}, count(*) FROM {view} WHERE sample_id IN ({_TOUCHED}) "
                         "GROUP BY ALL").to_pylist():
                *key, n = row.values()
                samples[tuple(key)] += sign * n
    by_group: Counter[tuple[Any, ...]] = Counter()
    for (split, label, generator, _, _), n in samples.items():
        by_group[(split, label, generator)] += n
    images_total = sum(n for key, n in samples.items() if key[3] is False)  # NULL source_format: not an image
    texts_total = q("SELECT count(DISTINCT text_hash) FROM samples").column(0)[0].as_py()
    decode = sum(n for (stage, _), n in quarantine.items() if stage == "decode")
    bad = q("SELECT count(DISTINCT content_hash) FROM quarantine WHERE stage = 'decode'"
            ).column(0)[0].as_py() if decode else 0
    models = []
    for key in catalog.model_keys(store):
        vectors = _sum(store, manifest, "embeddings", key)
        images, texts = vectors[("image",)], vectors[("text",)]
        if touched:
            images -= q(f"SELECT count(DISTINCT content_hash) FROM embeddings WHERE model_key = ? "
                        f"AND modality = 'image' AND content_hash IN ({_LEFT_OUT})", [key]).column(0)[0].as_py()
            texts -= q(_ORPHAN_TEXTS, [key]).column(0)[0].as_py()
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
    without_text = sum(_nulls(store.root / shard.path, "text_hash") for shard in manifest.of("samples"))
    if touched and without_text:  # the touched samples as stored, replaced by what the view makes of them
        for sign, view in ((-1, "samples_all"), (1, "samples")):
            without_text += sign * q(f"SELECT count(*) FROM {view} WHERE sample_id IN ({_TOUCHED}) "
                                     "AND text_hash IS NULL").column(0)[0].as_py()
    return StoreStatus(sum(samples.values()), _groups_table(by_group), _quarantine_table(quarantine), models,
                       derived, without_text)


# samples whose rows the `samples` view may change: decided on, or claimed under another label
_TOUCHED = ("SELECT sample_id FROM decisions UNION SELECT content_hash FROM quarantine "
            "WHERE reason = 'label_conflict' AND content_hash IS NOT NULL")
# of those, the ones the view leaves out altogether
_LEFT_OUT = f"SELECT sample_id FROM ({_TOUCHED}) EXCEPT SELECT sample_id FROM samples WHERE sample_id IN ({_TOUCHED})"
# text vectors whose only samples are left out: not the text of any sample in the view
_ORPHAN_TEXTS = f"""
    WITH c AS (SELECT DISTINCT text_hash FROM samples_all
               WHERE sample_id IN ({_LEFT_OUT}) AND text_hash IS NOT NULL)
    SELECT count(*) FROM c
    WHERE text_hash NOT IN (SELECT text_hash FROM samples WHERE text_hash IN (SELECT text_hash FROM c))
      AND text_hash IN (SELECT content_hash FROM embeddings WHERE model_key = ? AND modality = 'text')
"""


def _sum(store: Store, manifest: manifests.Manifest, dataset: str, model_key: str | None = None
         ) -> Counter[tuple[Any, ...]]:
    """The dataset's rows by `manifests.COUNTED[dataset]`, from the manifest (or, for shards committed
    before the manifest kept counts, from the shards themselves)."""
    total: Counter[tuple[Any, ...]] = Counter()
    for shard in manifest.of(dataset, model_key):
        counts = shard.counts if shard.counts is not None else manifests.count_rows(store.root / shard.path, dataset)
        for *key, n in counts:
            total[tuple(key)] += n
    return total


def _nulls(path: Path, column: str) -> int:
    """The NULLs of one column of a shard, from its footer's statistics (a file written without them
    has that column read). Imported features carry a text hash without a caption, so the hash, not
    the caption, says whether a sample has a text vector."""
    meta = pq.read_metadata(path)
    names = meta.schema.to_arrow_schema().names
    if column not in names:
        return meta.num_rows  # an older shard without the column: every row NULL in the view
    col = names.index(column)
    stats = [meta.row_group(g).column(col).statistics for g in range(meta.num_row_groups)]
    if all(s is not None and s.has_null_count for s in stats):
        return sum(s.null_count for s in stats)
    return pq.read_table(path, columns=[column]).column(0).null_count


def _unresolved(quarantine: Counter[tuple[Any, ...]]) -> Counter[tuple[Any, ...]]:
    """Quarantine less what later runs resolved: a `resolved:<reason>` row (a D3 real image found
    since) takes one `<reason>` row off; neither is shown."""
    for (stage, reason), n in list(quarantine.items()):
        if reason.startswith(RESOLVED):
            quarantine[(stage, reason.removeprefix(RESOLVED))] -= n
            del quarantine[(stage, reason)]
    return quarantine


def _groups_table(groups: Counter[tuple[Any, ...]]) -> pa.Table:
    rows = sorted((k for k, n in groups.items() if n > 0), key=_order)
    return pa.table({
        "split": pa.array([r[0] for r in rows], pa.string()),
        "label": pa.array([r[1] for r in rows], SAMPLES.field("label").type),
        "generator": pa.array([r[2] for r in rows], pa.string()),
        "samples": pa.array([groups[r] for r in rows], pa.int64()),
    })


def _quarantine_table(reasons: Counter[tuple[Any, ...]]) -> pa.Table:
    rows = sorted((k for k, n in reasons.items() if n > 0), key=_order)
    return pa.table({
        "stage": pa.array([r[0] for r in rows], pa.string()),
        "reason": pa.array([r[1] for r in rows], pa.string()),
        "inputs": pa.array([reasons[r] for r in rows], pa.int64()),
    })


def _order(key: tuple[Any, ...]) -> tuple[Any, ...]:
    """SQL's ORDER BY: ascending, NULLs last."""
    return tuple((v is None, v if v is not None else 0) for v in key)
