"""`pipeline leaks`: near-duplicate images across splits, and exact ones by hash.

Every validation and test image is searched against the whole index; a neighbour in another
split with cosine similarity ≥ threshold is a leak. Pairs are ordered train < val < test, so
`sample_b` is always the member a clean evaluation would drop. Exact duplicates are one image
hash filed under two splits (possible when two sources carry the same bytes).

The pairs land in `leaks/<model_key>/image-t<threshold>-<fingerprint>.parquet` (the `leaks`
view), replacing the previous scan at that threshold. `leaking_ids` gives the evaluation samples
to exclude, and refuses a scan older than the embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import Validated, at_least, within
from pipeline.errors import PipelineError
from pipeline.features.index import open_index
from pipeline.features.vectors import fingerprint, load_vectors, shards_of
from pipeline.features.view import resolve_model_key
from pipeline.reporting import Reporter, Silent
from pipeline.store import catalog
from pipeline.store.atomic import write_parquet
from pipeline.store.layout import Store
from pipeline.store.lock import writing
from schemas import LEAKS, SPLITS, from_rows

SPLIT_ORDER = {split: i for i, split in enumerate(SPLITS)}
DEFAULT_THRESHOLD = 0.95
_META_THRESHOLD = b"pipeline.leak_threshold"
_META_FINGERPRINT = b"pipeline.embeddings_fingerprint"


@dataclass(frozen=True)
class LeakConfig(Validated):
    store: Store
    model_key: str | None = None
    threshold: float = DEFAULT_THRESHOLD
    k: int = 10  # neighbours examined per evaluation image
    exact_search: bool = False  # search with a flat index whatever the store's size
    wait: bool = True

    def check(self) -> None:
        within(self, "threshold", 0, 1, low_open=True)
        at_least(self, "k", 1)


@dataclass
class LeakResult:
    model_key: str
    threshold: float
    index_kind: str
    recall_at_10: float | None
    queries: int
    pairs: pa.Table
    by_split_pair: pa.Table
    path: Path


def run(config: LeakConfig, reporter: Reporter | None = None) -> LeakResult:
    """Scan every val/test image for near-duplicates in an earlier split; replace the scan at this threshold."""
    reporter = reporter or Silent()
    with writing(config.store, reporter, config.wait):
        return _find_leaks(config, reporter)


def _find_leaks(config: LeakConfig, reporter: Reporter) -> LeakResult:
    store = config.store
    model_key = resolve_model_key(store, config.model_key)
    shards = shards_of(store, model_key, "image")
    fp = fingerprint(store, shards)
    vecs = load_vectors(shards)
    index = open_index(store, model_key, "image", "flat" if config.exact_search else "auto", reporter, vecs)
    splits = catalog.query(store, "SELECT DISTINCT ON (sample_id) sample_id, split FROM samples")
    split_of = dict(zip(splits.column(0).to_pylist(), splits.column(1).to_pylist(), strict=True))
    is_query = np.array([SPLIT_ORDER.get(split_of.get(i, ""), 0) > 0 for i in vecs.ids])
    q_ids, q_mat = vecs.ids[is_query], vecs.matrix[is_query]
    reporter.start("leaks", len(q_ids), "images")
    found: dict[tuple[str, str], float] = {}
    for start in range(0, len(q_ids), 4096):
        sims, rows = index.search(q_mat[start:start + 4096], config.k + 1)
        for qid, srow, rrow in zip(q_ids[start:start + 4096], sims, rows, strict=True):
            for sim, r in zip(srow, rrow, strict=True):
                if r < 0 or sim < config.threshold:
                    continue
                other = str(index.ids[r])
                if other == qid or split_of.get(other) == split_of[qid] or other not in split_of:
                    continue
                a, b = sorted((str(qid), other), key=lambda s: SPLIT_ORDER[split_of[s]])
                found[(a, b)] = max(found.get((a, b), -1.0), float(sim))
        reporter.advance("leaks", len(q_ids[start:start + 4096]))
    now = datetime.now(UTC)
    rows_out = [_pair("near", a, b, split_of, sim, model_key, config.threshold, now) for (a, b), sim in found.items()]
    rows_out += [_pair("exact", sid, sid, splits, 1.0, model_key, config.threshold, now)
                 for sid, splits in _exact_duplicates(store)]
    pairs = from_rows(LEAKS, rows_out).sort_by([("similarity", "descending")])
    path = _write(store, model_key, config.threshold, fp, pairs)
    counts = catalog.query_with(
        store,
        "SELECT split_a, split_b, kind, count(*) AS pairs, count(DISTINCT sample_b) AS samples_b "
        "FROM pairs GROUP BY ALL ORDER BY split_a, split_b, kind",
        {"pairs": pairs},
    )
    return LeakResult(model_key, config.threshold, index.info.kind, index.info.recall_at_10, len(q_ids),
                      pairs, counts, path)


def leaking_ids(store: Store, model_key: str, threshold: float = DEFAULT_THRESHOLD) -> tuple[set[str], str]:
    """Evaluation samples (val/test) with a near or exact duplicate in an earlier split.

    Uses the scan of `pipeline leaks` at the lowest threshold ≤ `threshold`; returns the ids and
    the scan's fingerprint. Refuses when no scan exists or the embeddings changed since.
    """
    scans = []
    for path in sorted((store.dataset_dir("leaks") / model_key).glob("image-t*.parquet")):
        meta = pq.read_schema(path).metadata or {}
        t = float(meta.get(_META_THRESHOLD, b"nan"))
        if t <= threshold + 1e-9:
            scans.append((t, path, meta.get(_META_FINGERPRINT, b"").decode()))
    if not scans:
        raise PipelineError(
            f"No leak scan of {model_key} at threshold {threshold} or below: run "
            f"`pipeline leaks --model-key {model_key} --threshold {threshold}` first."
        )
    _, path, scanned = min(scans)
    current = fingerprint(store, shards_of(store, model_key, "image"))
    if scanned != current:
        raise PipelineError(
            f"The embeddings of {model_key} changed since `pipeline leaks` ran; run it again."
        )
    table = pq.read_table(path, columns=["sample_b", "similarity"])
    keep = table.filter(pc.greater_equal(table.column("similarity"), pa.scalar(threshold, pa.float32())))
    return set(keep.column("sample_b").to_pylist()), f"{path.name}@{threshold}"


# --- private -------------------------------------------------------------------------------


def _pair(kind: str, a: str, b: str, split_of: dict[str, str] | tuple[str, str], sim: float, model_key: str,
          threshold: float, now: datetime) -> dict:
    split_a, split_b = split_of if isinstance(split_of, tuple) else (split_of[a], split_of[b])
    return {"model_key": model_key, "modality": "image", "kind": kind, "sample_a": a, "split_a": split_a,
            "sample_b": b, "split_b": split_b, "similarity": sim, "threshold": threshold, "detected_at": now}


def _exact_duplicates(store: Store) -> list[tuple[str, tuple[str, str]]]:
    rows = catalog.query(
        store,
        "SELECT sample_id, list(DISTINCT split) AS splits FROM samples GROUP BY 1 HAVING count(DISTINCT split) > 1",
    ).to_pylist()
    out = []
    for r in rows:
        splits = sorted(r["splits"], key=lambda s: SPLIT_ORDER.get(s, 3))
        out += [(r["sample_id"], (splits[0], later)) for later in splits[1:]]
    return out


def _write(store: Store, model_key: str, threshold: float, fp: str, pairs: pa.Table) -> Path:
    directory = store.dataset_dir("leaks") / model_key
    prefix = f"image-t{threshold:.4f}-"
    meta = dict(pairs.schema.metadata or {})
    meta.update({_META_THRESHOLD: str(threshold).encode(), _META_FINGERPRINT: fp.encode()})
    path = write_parquet(pairs.replace_schema_metadata(meta), directory / f"{prefix}{fp}.parquet")
    catalog.commit(store, [path])
    stale = [p for p in directory.glob(f"{prefix}*.parquet") if p != path]
    if stale:
        catalog.forget(store, stale)
    for p in stale:
        p.unlink()
    return path
