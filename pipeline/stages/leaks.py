"""`pipeline leaks`: near-duplicate images across splits, and exact ones by hash.

Every validation and test image looks for near-duplicates in the earlier splits through the
store's FAISS index (the one `pipeline index build` made, or one built within the memory
budget), a chunk of matrix rows at a time; a neighbour in an earlier split with cosine similarity
≥ threshold is a leak. Pairs are ordered train < val < test and found from their later member, so
`sample_b` is always the member a clean evaluation would drop, and each pair is found once. An IVF
index is searched at most `LEAK_NPROBE` lists wide whatever its size: a near-duplicate sits in its
original's list or one beside it (measured: see LEAK_NPROBE), so the scan costs the same per
image at any size. A compressed index's scores only propose pairs: every hit is scored again
exactly from the memory-mapped vectors before the threshold applies, so the similarities are exact.
Exact duplicates are one image hash filed under two splits (stores written before ingest
de-duplicated by image hash could hold them), found by DuckDB within its memory limit.

The pairs stream into `leaks/<model_key>/image-t<threshold>-<fingerprint>.parquet` (the `leaks`
view), which replaces the previous scan at that threshold; memory is one chunk of queries and the
split of each matrix row (a byte a row), whatever the number of rows or pairs. `leaking_ids` gives
the evaluation samples to exclude, and refuses a scan older than the embeddings.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.allocator import step_buffers_reused
from pipeline.choices import IndexKind
from pipeline.config import Validated, at_least, within
from pipeline.features.ann.build import open_index
from pipeline.features.ann.plan import DEFAULT_MAX_MEMORY
from pipeline.features.ann.search import OpenIndex
from pipeline.features.leaks import DEFAULT_THRESHOLD, META_FINGERPRINT, META_THRESHOLD
from pipeline.features.vectors import VectorMatrix, fingerprint, normalise, open_matrix, shards_of
from pipeline.features.view import FeatureTable, feature_table, resolve_model_key
from pipeline.reporting import Reporter, Silent
from pipeline.store import catalog, duck, writes
from pipeline.store.layout import Store
from pipeline.store.stream import ParquetStream
from pipeline.store.writes import writing
from schemas import LEAKS, SPLITS, from_columns

SPLIT_ORDER = {split: i for i, split in enumerate(SPLITS)}
QUERY_ROWS = 16384  # matrix rows whose val/test images are searched at a time
# IVF lists (of ~1024 vectors) searched per evaluation image at most: fewer where recall@10 of
# ordinary neighbours needs fewer. Measured against exact search by bench/leak_recall.py (clustered
# 768-d stores, near-duplicates planted across splits at cosine 0.95-0.995 in random directions):
# recall of the pairs at nprobe 1 / 2 / 4 / 8 was 0.998 / 0.9995 / 1 / 1 (2,000 pairs, 100k
# samples) and 1 / 1 / 1 / 1 (4,000 pairs, 200k); those indexes reached recall@10 0.99 at nprobe 1.
LEAK_NPROBE = 4
DUCKDB_MEMORY = "512MB"  # the grouping of every sample id (exact duplicates) spills beyond this


@dataclass(frozen=True)
class LeakConfig(Validated):
    store: Store
    model_key: str | None = None
    threshold: float = DEFAULT_THRESHOLD
    k: int = 10  # neighbours examined per evaluation image
    exact_search: bool = False  # search with a flat index whatever the store's size
    max_memory: int = DEFAULT_MAX_MEMORY  # for the index, if one must be built
    wait: bool = True
    nprobe: int | None = None  # IVF lists searched per image (default: the index's tuned nprobe, ≤ LEAK_NPROBE)

    def check(self) -> None:
        within(self, "threshold", 0, 1, low_open=True)
        at_least(self, "k", 1)
        at_least(self, "nprobe", 1)


@dataclass
class LeakResult:
    model_key: str
    random_weights: bool | None
    threshold: float
    index_kind: str
    recall_at_10: float | None
    queries: int
    pair_count: int
    by_split_pair: pa.Table
    path: Path

    @property
    def pairs(self) -> pa.Table:
        """Every pair of the scan, read from its file (as many rows as pairs, in the order found)."""
        return pq.read_table(self.path)


def run(config: LeakConfig, reporter: Reporter | None = None) -> LeakResult:
    """Scan every val/test image for near-duplicates in an earlier split; replace the scan at this threshold."""
    reporter = reporter or Silent()
    # query-sized buffers (gathered vectors, candidates, their exact scores) made and freed for every chunk
    # of queries: kept on the heap, not mapped and zeroed afresh each time (see `allocator`)
    with writing(config.store, reporter, config.wait), step_buffers_reused():
        return _find_leaks(config, reporter)


def _find_leaks(config: LeakConfig, reporter: Reporter) -> LeakResult:
    store = config.store
    model_key = resolve_model_key(store, config.model_key)
    fp = fingerprint(store, shards_of(store, model_key, "image"))
    kind: IndexKind = "flat" if config.exact_search else "auto"
    index = open_index(store, model_key, "image", kind, reporter, config.max_memory)
    matrix = open_matrix(store, model_key, "image")
    if index.info.params.get("matrix") != matrix.generation:  # rows laid out anew since: rows differ
        index = open_index(store, model_key, "image", kind, reporter, config.max_memory, force=True)
    _set_breadth(index, config.nprobe)
    split_of_row = _split_codes(feature_table(store, model_key, reporter=reporter), matrix.rows)
    queries = int(np.count_nonzero(split_of_row > 0))
    directory = store.dataset_dir("leaks") / model_key
    prefix = f"image-t{config.threshold:.4f}-"
    path = directory / f"{prefix}{fp}.parquet"
    meta = {META_THRESHOLD: str(config.threshold).encode(), META_FINGERPRINT: fp.encode()}
    schema = LEAKS.with_metadata({**(LEAKS.metadata or {}), **meta})
    reporter.start("leaks", queries, "images")

    with ParquetStream(path, schema) as stream:  # pairs stream to disk: memory is one chunk of queries
        for table in _near_pairs(index, matrix, split_of_row, config, model_key, reporter):
            stream.write(table)
        for table in _exact_pairs(store, model_key, config.threshold):
            stream.write(table)
        writes.commit(store, [stream.finalize()])
    stale = [p for p in directory.glob(f"{prefix}*.parquet") if p != path]
    if stale:
        writes.forget(store, stale)
    for p in stale:
        p.unlink()
    counts = catalog.query(
        store,
        "SELECT split_a, split_b, kind, count(*) AS pairs, count(DISTINCT sample_b) AS samples_b "
        "FROM read_parquet(?) GROUP BY ALL ORDER BY split_a, split_b, kind",
        [str(path)],
    )
    total = pq.read_metadata(path).num_rows
    return LeakResult(model_key, store.model_info(model_key).get("random_weights"), config.threshold,
                      index.info.kind, index.info.recall_at_10, queries, total, counts, path)


# --- private -------------------------------------------------------------------------------


def _set_breadth(index: OpenIndex, nprobe: int | None) -> None:
    """Search `nprobe` IVF lists (default: as many as recall@10 of ordinary neighbours needs, at most
    LEAK_NPROBE). A near-duplicate (cosine ≥ 0.95) is far closer than a tenth neighbour and falls in its
    original's list or a neighbouring one, so the scan needs no more breadth than that; a bounded breadth
    over lists of fixed size keeps the cost of a query the same at any store size."""
    if index.info.kind.startswith("ivf"):
        index.set_breadth(nprobe or min(LEAK_NPROBE, index.info.params.get("nprobe", LEAK_NPROBE)))


def _split_codes(table: FeatureTable, rows: int) -> np.ndarray:
    """SPLIT_ORDER code of each image matrix row (-1: no sample, or a second copy of a hash)."""
    codes = np.full(rows, -1, np.int8)
    names = pa.array(SPLITS, pa.string())
    for part in table.parts:
        file = pq.ParquetFile(part)
        for batch in file.iter_batches(65536, columns=["image_row", "split"]):
            split = pc.index_in(batch.column("split").cast(pa.string()), value_set=names).fill_null(-1)
            codes[batch.column("image_row").to_numpy()] = split.to_numpy(zero_copy_only=False)
    return codes


def _near_pairs(index: OpenIndex, matrix: VectorMatrix, split_of_row: np.ndarray, config: LeakConfig,
                model_key: str, reporter: Reporter) -> Iterator[pa.Table]:
    """The near-duplicate pairs of each chunk of matrix rows, found from their val/test member."""
    now = datetime.now(UTC)
    compressed = "PQ" in index.info.params.get("factory", "") or "SQ" in index.info.params.get("factory", "")
    for start in range(0, matrix.rows, QUERY_ROWS):
        rows = start + np.nonzero(split_of_row[start:start + QUERY_ROWS] > 0)[0]
        if not len(rows):
            continue
        queries = normalise(matrix.gather(rows))
        sims, hits = index.search(queries, config.k + 1, rerank=False)
        if compressed:
            sims = index.similarities(queries, hits)
        a, b, sim = _cross_split(rows, sims, hits, split_of_row, config.threshold)
        reporter.advance("leaks", len(rows))
        if len(a):
            yield _pairs_table(index, split_of_row, a, b, sim, model_key, config.threshold, now)


def _cross_split(rows: np.ndarray, sims: np.ndarray, hits: np.ndarray, split_of_row: np.ndarray,
                 threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(earlier-split row, query row, similarity) of every hit at or above threshold in an earlier split."""
    query = np.broadcast_to(rows[:, None], hits.shape)
    their_split = np.where(hits >= 0, split_of_row[np.maximum(hits, 0)], -1)
    keep = (hits >= 0) & (sims >= threshold) & (their_split >= 0) & (their_split < split_of_row[query])
    return hits[keep], query[keep], sims[keep].astype(np.float32)


def _pairs_table(index: OpenIndex, split_of_row: np.ndarray, a: np.ndarray, b: np.ndarray, sim: np.ndarray,
                 model_key: str, threshold: float, now: datetime) -> pa.Table:
    names = pa.array(SPLITS, pa.string())
    return from_columns(LEAKS, {
        **_constants(model_key, "near", threshold, now, len(a)),
        "sample_a": index.ids.take(pa.array(a)), "split_a": names.take(pa.array(split_of_row[a].astype(np.int64))),
        "sample_b": index.ids.take(pa.array(b)), "split_b": names.take(pa.array(split_of_row[b].astype(np.int64))),
        "similarity": sim,
    })


def _exact_pairs(store: Store, model_key: str, threshold: float) -> Iterator[pa.Table]:
    """One image hash filed under two splits: a pair per later split, in batches (DuckDB spills the grouping)."""
    now = datetime.now(UTC)
    order = " ".join(f"WHEN '{split}' THEN {code}" for split, code in SPLIT_ORDER.items())
    sql = f"""
        WITH multi AS (SELECT sample_id FROM samples GROUP BY sample_id HAVING min(split) <> max(split)),
             coded AS (SELECT DISTINCT sample_id, split, CASE split {order} ELSE 3 END AS o FROM samples
                       WHERE sample_id IN (SELECT sample_id FROM multi)),
             first AS (SELECT sample_id, arg_min(split, o) AS split_a, min(o) AS o FROM coded GROUP BY sample_id)
        SELECT f.sample_id, f.split_a, c.split AS split_b
        FROM first f JOIN coded c ON c.sample_id = f.sample_id AND c.o > f.o
    """
    with catalog.connect(store) as con:
        duck.limit_memory(con, DUCKDB_MEMORY, store.root / "cache" / "duckdb-tmp")
        for batch in con.sql(sql).to_arrow_reader(65536):
            if batch.num_rows:
                yield from_columns(LEAKS, {
                    **_constants(model_key, "exact", threshold, now, batch.num_rows),
                    "sample_a": batch.column("sample_id"), "split_a": batch.column("split_a"),
                    "sample_b": batch.column("sample_id"), "split_b": batch.column("split_b"),
                    "similarity": pa.repeat(pa.scalar(1.0, pa.float32()), batch.num_rows),
                })


def _constants(model_key: str, kind: str, threshold: float, now: datetime, n: int) -> dict[str, pa.Array]:
    return {
        "model_key": pa.repeat(pa.scalar(model_key, pa.string()), n),
        "modality": pa.repeat(pa.scalar("image", pa.string()), n),
        "kind": pa.repeat(pa.scalar(kind, pa.string()), n),
        "threshold": pa.repeat(pa.scalar(threshold, pa.float32()), n),
        "detected_at": pa.repeat(pa.scalar(now, LEAKS.field("detected_at").type), n),
    }
