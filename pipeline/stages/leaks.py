"""`pipeline leaks`: near-duplicate images across splits, and exact ones by hash.

Every validation and test image is searched against the store's FAISS index (the one
`pipeline index build` made, or one built within the memory budget), a chunk of queries at a
time streamed from the memory-mapped vectors; a neighbour in another
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
from pipeline.features.index import DEFAULT_MAX_MEMORY, OpenIndex, apply_breadth, open_index
from pipeline.features.vectors import fingerprint, normalise, open_matrix, shards_of
from pipeline.features.view import FeatureTable, feature_table, resolve_model_key
from pipeline.reporting import Reporter, Silent
from pipeline.store import catalog
from pipeline.store.atomic import write_parquet
from pipeline.store.layout import Store
from pipeline.store.lock import writing
from schemas import LEAKS, SPLITS, from_columns, from_rows

SPLIT_ORDER = {split: i for i, split in enumerate(SPLITS)}
QUERY_ROWS = 16384  # evaluation images searched at a time
LEAK_NPROBE = 32  # IVF lists searched per evaluation image
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
    max_memory: int = DEFAULT_MAX_MEMORY  # for the index, if one must be built
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
    fp = fingerprint(store, shards_of(store, model_key, "image"))
    kind = "flat" if config.exact_search else "auto"
    index = open_index(store, model_key, "image", kind, reporter, config.max_memory)
    matrix = open_matrix(store, model_key, "image")
    if index.info.params.get("matrix") != matrix.generation:  # rows laid out anew since: rows differ
        index = open_index(store, model_key, "image", kind, reporter, config.max_memory, force=True)
    _narrow(index)
    split_of_row = _split_codes(feature_table(store, model_key), matrix.rows)
    queries = int(np.sum(split_of_row > 0))
    reporter.start("leaks", queries, "images")
    found_a, found_b, found_sim = [], [], []
    for start, chunk in matrix.chunks(QUERY_ROWS):
        rows = start + np.nonzero(split_of_row[start:start + len(chunk)] > 0)[0]
        if not len(rows):
            continue
        sims, hits = index.search(normalise(chunk[rows - start]), config.k + 1)
        a, b, sim = _cross_split(rows, sims, hits, split_of_row, config.threshold)
        found_a.append(a)
        found_b.append(b)
        found_sim.append(sim)
        reporter.advance("leaks", len(rows))
    pairs = _pairs_table(store, index, split_of_row, found_a, found_b, found_sim, model_key, config.threshold)
    path = _write(store, model_key, config.threshold, fp, pairs)
    counts = catalog.query_with(
        store,
        "SELECT split_a, split_b, kind, count(*) AS pairs, count(DISTINCT sample_b) AS samples_b "
        "FROM pairs GROUP BY ALL ORDER BY split_a, split_b, kind",
        {"pairs": pairs},
    )
    return LeakResult(model_key, config.threshold, index.info.kind, index.info.recall_at_10, queries,
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


def _narrow(index: OpenIndex) -> None:
    """Search at most LEAK_NPROBE IVF lists: a near-duplicate (cosine ≥ 0.95) falls in its original's list
    or a neighbouring one, so the scan needs far less breadth than recall@10 of ordinary neighbours."""
    import faiss

    params = index.info.params
    if index.info.kind.startswith("ivf") and params.get("nprobe", 0) > LEAK_NPROBE:
        apply_breadth(index.index, index.info.kind, {**params, "nprobe": LEAK_NPROBE}, faiss)


def _split_codes(table: FeatureTable, rows: int) -> np.ndarray:
    """SPLIT_ORDER code of each image matrix row (-1: no sample, or a second copy of a hash)."""
    codes = np.full(rows, -1, np.int8)
    for part in table.parts:
        file = pq.ParquetFile(part)
        for batch in file.iter_batches(65536, columns=["image_row", "split"]):
            split = batch.column("split").to_numpy(zero_copy_only=False)
            codes[batch.column("image_row").to_numpy()] = [SPLIT_ORDER.get(s, -1) for s in split]
    return codes


def _cross_split(rows: np.ndarray, sims: np.ndarray, hits: np.ndarray, split_of_row: np.ndarray,
                 threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(earlier-split row, later-split row, similarity) of every hit above threshold in another split."""
    query = np.broadcast_to(rows[:, None], hits.shape)
    other_split = np.where(hits >= 0, split_of_row[np.maximum(hits, 0)], -1)
    keep = (hits >= 0) & (sims >= threshold) & (other_split >= 0) & (other_split != split_of_row[query])
    q, h, s = query[keep], hits[keep], sims[keep]
    earlier = split_of_row[h] < split_of_row[q]
    return np.where(earlier, h, q), np.where(earlier, q, h), s


def _pairs_table(store: Store, index: OpenIndex, split_of_row: np.ndarray, found_a: list[np.ndarray],
                 found_b: list[np.ndarray], found_sim: list[np.ndarray], model_key: str, threshold: float) -> pa.Table:
    a = np.concatenate(found_a) if found_a else np.zeros(0, np.int64)
    b = np.concatenate(found_b) if found_b else np.zeros(0, np.int64)
    sim = np.concatenate(found_sim) if found_sim else np.zeros(0, np.float32)
    order = np.lexsort((-sim, b, a))  # a pair found from both sides keeps its highest similarity
    a, b, sim = a[order], b[order], sim[order]
    first = np.ones(len(a), bool)
    first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    a, b, sim = a[first], b[first], sim[first]
    names = {v: k for k, v in SPLIT_ORDER.items()}
    now = datetime.now(UTC)
    near = {
        "model_key": [model_key] * len(a), "modality": ["image"] * len(a), "kind": ["near"] * len(a),
        "sample_a": index.hashes(a), "split_a": [names[c] for c in split_of_row[a]],
        "sample_b": index.hashes(b), "split_b": [names[c] for c in split_of_row[b]],
        "similarity": sim.astype(np.float32), "threshold": [threshold] * len(a), "detected_at": [now] * len(a),
    }
    exact = [{"model_key": model_key, "modality": "image", "kind": "exact", "sample_a": sid, "split_a": first,
              "sample_b": sid, "split_b": later, "similarity": 1.0, "threshold": threshold, "detected_at": now}
             for sid, (first, later) in _exact_duplicates(store)]
    both = pa.concat_tables([from_columns(LEAKS, near), from_rows(LEAKS, exact)])
    return both.sort_by([("similarity", "descending")])


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
