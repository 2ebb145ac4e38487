"""`pipeline neighbors`: what does this image sit next to?

The query is a sample already in the store (`--sample-id`, a unique prefix will do) or an image
file, encoded on the fly with the model that produced the store's vectors. A reader: it never
takes the store's writer lock and never builds an index, so it never waits for a writer.

- With an index over these vectors (`pipeline index build`), the query's row and the samples
  behind the rows found come from binary searches in the index's lookup (`ann.lookup`) and the
  vectors are memory-mapped: no pass over the samples or the embeddings, whatever their number.
- An index built before more vectors were added (an encode that may still be running) is searched
  over the vectors it holds, and the result says how many it does not hold.
- With no index, a store of fewer than `EXACT_BELOW` vectors is searched exactly (every mapped
  vector compared); a larger one gets a sentence asking for `pipeline index build`.
- An index of an older release (no lookup), a sample ingested after the index was built, or a
  lookup whose samples shards were replaced since are looked up in SQL (a scan) instead.
Given a run, its scores of the k samples found are joined in SQL (a scan of that run's scores).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.choices import Modality
from pipeline.config import Validated, at_least
from pipeline.errors import PipelineError
from pipeline.features.ann.lookup import Lookup
from pipeline.features.ann.plan import EXACT_BELOW
from pipeline.features.ann.search import OpenIndex, TopK, open_for_reading, unit_rows
from pipeline.features.vectors import VectorMatrix, normalise, open_matrix
from pipeline.features.view import resolve_model_key
from pipeline.reporting import Reporter
from pipeline.sources.reading import DEFAULT_MAX_BYTES, Limits, Unreadable, read_file, text_of
from pipeline.store import catalog
from pipeline.store.layout import Store

_SAMPLE_COLUMNS = ["sample_id", "label", "generator", "split", "text", "text_hash"]


@dataclass(frozen=True)
class NeighborQuery(Validated):
    store: Store
    sample_id: str | None = None
    image: Path | None = None
    k: int = 10
    model_key: str | None = None
    run_id: str | None = None
    modality: Modality = "image"
    max_bytes: int = DEFAULT_MAX_BYTES  # --image: the most read of the file

    def check(self) -> None:
        if (self.sample_id is None) == (self.image is None):
            raise PipelineError("Give exactly one of --sample-id ID or --image FILE.")
        if self.k < 1:
            raise PipelineError("-k must be at least 1.")
        at_least(self, "max_bytes", 1)


@dataclass
class NeighborResult:
    query: str  # the sample id, or the image file
    model_key: str
    index_kind: str  # "exact" where no index was searched
    random_weights: bool | None
    rows: pa.Table
    note: str | None = None  # what the search did not cover (vectors added since the index was built)


def run(q: NeighborQuery, reporter: Reporter | None = None) -> NeighborResult:
    """Top-k neighbours of a stored sample or an image file, without waiting for any writer."""
    store = q.store
    model_key = resolve_model_key(store, q.model_key)
    if q.run_id and not catalog.query(store, "SELECT 1 FROM runs WHERE run_id = ?", [q.run_id]).num_rows:
        raise PipelineError(f"No run {q.run_id!r}; `pipeline sql \"SELECT run_id FROM runs\"` lists them.")
    matrix, index = _searchable(store, model_key, q.modality)
    if q.sample_id is not None:
        own, vector = _stored_vector(store, model_key, q.modality, q.sample_id, index, matrix)
        label = own
    else:
        assert q.image is not None
        own, vector, label = None, encode_image_file(store, model_key, q.image, q.max_bytes), str(q.image)
    wanted = q.k + (1 if own else 0)  # the query's own row comes back too
    sims, hashes = _search(index, vector, wanted) if index is not None else _exact(store, matrix, vector, wanted)
    hits = [(float(s), h) for s, h in zip(sims.tolist(), hashes, strict=True) if h != own][: q.k]
    table = None
    if index is not None and index.lookup is not None:
        table = _samples_by_lookup(store, index.lookup, hits, q.modality, q.run_id)
    if table is None:
        table = _samples_by_sql(q, hits)
    note = None
    if index is not None and index.info.vectors < matrix.rows:
        note = (f"The index holds {index.info.vectors:,} of the {matrix.rows:,} {q.modality} vectors: the "
                f"{matrix.rows - index.info.vectors:,} added since were not searched; `pipeline index build` "
                "adds them.")
    kind = index.info.kind if index is not None else "exact"
    return NeighborResult(label, model_key, kind, store.model_info(model_key).get("random_weights"), table, note)


def encode_image_file(store: Store, model_key: str, path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """One image file → the L2-normalised vector the store's model gives it (CPU, fp32). The file is
    read bounded (`reading.read_file`: a regular file, at most `max_bytes`, a FIFO never blocks)."""
    import torch

    from pipeline.encoding.clip import ModelSpec, load
    from pipeline.encoding.units import Encoder
    from pipeline.sources.images import UndecodableImage, decode_rgb

    info = store.model_info(model_key)
    if not info.get("architecture"):
        raise PipelineError(
            f"The vectors of {model_key} were imported, so the model that made them is unknown and an "
            "image file cannot be encoded for it; query with --sample-id instead."
        )
    try:
        data = read_file(path, Limits(max_bytes))
    except Unreadable as exc:
        raise PipelineError(f"Cannot read --image: {exc.detail} ({exc.reason}).") from exc
    try:
        picture = decode_rgb(data)
    except UndecodableImage as exc:
        raise PipelineError(f"--image {text_of(path)} cannot be decoded: {exc.detail} ({exc.reason}).") from exc
    spec = ModelSpec(info["architecture"], info.get("pretrained"), info.get("seed") or 0)
    loaded = load(spec, torch.device("cpu"))
    if loaded.model_key != model_key:
        raise PipelineError(
            f"The model loaded now has key {loaded.model_key}, not {model_key} (weights or preprocessing "
            "changed since the store was encoded); encode the store again or query with --sample-id."
        )
    encoder = Encoder(loaded, torch.device("cpu"), "fp32")
    return encoder.images(encoder.transform(picture)[None])[0].astype(np.float32)


# --- private -------------------------------------------------------------------------------


def _searchable(store: Store, model_key: str, modality: str) -> tuple[VectorMatrix, OpenIndex | None]:
    """The vectors, and the index to search them with (None: compare them all), or a sentence."""
    matrix = open_matrix(store, model_key, modality)
    index = open_for_reading(store, model_key, modality, matrix)
    if index is not None and index.info.vectors < matrix.rows < EXACT_BELOW:
        index = None  # an index that misses vectors, over a store small enough to compare them all
    if index is None and matrix.rows >= EXACT_BELOW:
        raise PipelineError(
            f"No index over the {modality} vectors of {model_key} ({matrix.rows:,}): build one with "
            f"`pipeline index build --vectors {modality}` (neighbours search an index and never build one, "
            "so they never wait for a writer).")
    return matrix, index


def _search(index: OpenIndex, vector: np.ndarray, k: int) -> tuple[np.ndarray, list[str]]:
    sims, rows = index.search(vector[None], k)
    found = rows[0] >= 0
    return sims[0][found], index.hashes(rows[0][found])


def _stored_vector(store: Store, model_key: str, modality: str, sample_id: str, index: OpenIndex | None,
                   matrix: VectorMatrix) -> tuple[str, np.ndarray]:
    """The content hash and unit vector of the sample whose id starts with `sample_id`: through the
    index's lookup where the sample and its vector are in it, else in SQL."""
    if len(sample_id) < 6:
        raise PipelineError("--sample-id needs at least 6 characters of the id.")
    if index is not None and index.lookup is not None and index.matrix is not None:
        found = _indexed_row(index, index.lookup, modality, sample_id.lower())
        if found is not None:
            content_hash, row = found
            return content_hash, unit_rows(index.matrix.gather(np.array([row])))[0]
    return _stored_vector_by_sql(store, model_key, modality, sample_id)


def _indexed_row(index: OpenIndex, lookup: Lookup, modality: str, prefix: str) -> tuple[str, int] | None:
    """(content hash, index row) of the one sample whose id starts with `prefix`, by binary searches;
    None where the lookup cannot tell (no such sample in it, or its vector not in the index)."""
    positions = lookup.samples.with_prefix(prefix)
    if len(positions) > 1:  # keys alike: several samples, or several rows of one
        ids = {str(r["sample_id"]) for r in lookup.sample_rows.read(positions, ["sample_id"])}
        if len({i for i in ids if i.startswith(prefix)}) > 1:
            raise PipelineError(f"{prefix!r} is the start of several sample ids; give more characters.")
    if modality == "image":  # an image's content hash is its sample id
        rows = lookup.hashes.with_prefix(prefix)
        hashes = index.hashes(rows) if len(rows) else []
        matches = {(h, int(r)) for h, r in zip(hashes, rows.tolist(), strict=True) if h.startswith(prefix)}
    else:
        samples = lookup.sample_rows.read(positions, ["sample_id", "text_hash"])
        mine = [r for r in samples if str(r["sample_id"]).startswith(prefix)]
        text = str(mine[0]["text_hash"]) if mine and mine[0]["text_hash"] else None
        rows = lookup.hashes.of([text])[0] if text else np.zeros(0, np.int64)
        matches = {(h, int(r)) for h, r in zip(index.hashes(rows), rows.tolist(), strict=True) if h == text}
    if len({h for h, _ in matches}) > 1:
        raise PipelineError(f"{prefix!r} is the start of several sample ids; give more characters.")
    return min(matches) if matches else None


def _stored_vector_by_sql(store: Store, model_key: str, modality: str, sample_id: str) -> tuple[str, np.ndarray]:
    key = "sample_id" if modality == "image" else "text_hash"
    found = catalog.query(
        store, f"SELECT DISTINCT sample_id, {key} AS content_hash FROM samples WHERE starts_with(sample_id, ?) LIMIT 2",
        [sample_id],
    ).to_pylist()
    if not found:
        raise PipelineError(f"No sample whose id starts with {sample_id!r}.")
    if len(found) > 1:
        raise PipelineError(f"{sample_id!r} is the start of several sample ids; give more characters.")
    content_hash = found[0]["content_hash"]
    vec = catalog.query(
        store, "SELECT vector FROM embeddings WHERE model_key = ? AND modality = ? AND content_hash = ? LIMIT 1",
        [model_key, modality, content_hash],
    )
    if not vec.num_rows or content_hash is None:
        raise PipelineError(f"Sample {found[0]['sample_id']} has no {modality} vector for {model_key} yet: "
                            "run `pipeline encode`.")
    return content_hash, normalise(np.asarray(vec.column(0)[0].as_py(), np.float32)[None])[0]


def _exact(store: Store, matrix: VectorMatrix, vector: np.ndarray, k: int) -> tuple[np.ndarray, list[str]]:
    """Similarities and content hashes of the k nearest rows, every vector compared (a small store)."""
    top = TopK(vector[None], min(k, matrix.rows))
    for start, chunk in matrix.chunks():
        top.update(unit_rows(chunk), start)
    rows = top.rows[0][top.rows[0] >= 0]
    offsets = matrix.shard_offsets()
    starts = offsets.column("offset").to_numpy()
    shard_of = np.searchsorted(starts, rows, "right") - 1
    columns = {shard: pq.read_table(store.root / offsets.column("path")[shard].as_py(), columns=["content_hash"])
               .column(0) for shard in set(shard_of.tolist())}
    hashes = [columns[shard][row - int(starts[shard])].as_py()
              for row, shard in zip(rows.tolist(), shard_of.tolist(), strict=True)]
    return top.sims[0][: len(rows)], hashes


def _samples_by_lookup(store: Store, lookup: Lookup, hits: list[tuple[float, str]], modality: str,
                       run_id: str | None) -> pa.Table | None:
    """Rank, sample, similarity (and the run's score) of each hit: one sample with its content hash,
    placed by the lookup (a binary search a hit) and read by DuckDB from the row groups holding them;
    None where the lookup places none of them. Built in SQL, as `_samples_by_sql` is, so the two
    give one table; no Arrow array is made in Python (pyarrow's first one imports pandas: 0.3 CPU-s)."""
    keys, key = (lookup.samples, "sample_id") if modality == "image" else (lookup.texts, "text_hash")
    assert keys is not None
    cand = [(rank, file, row) for rank, positions in enumerate(keys.of([h for _, h in hits]), 1)
            for file, row in lookup.sample_rows.places(positions)]
    if not hits or not cand:
        return None
    files, rows = sorted({f for _, f, _ in cand}), sorted({r for *_, r in cand})
    score = "sc.score, " if run_id else ""
    score_join = ("LEFT JOIN (SELECT sample_id, score FROM scores WHERE run_id = ? AND sample_id IN "
                  "(SELECT sample_id FROM found)) sc ON sc.sample_id = f.sample_id") if run_id else ""
    sql = f"""
        WITH hit(rank, content_hash, similarity) AS (VALUES {_rows(len(hits), "?::INTEGER, ?::VARCHAR, ?::FLOAT")}),
             cand(rank, file, row) AS (VALUES {_rows(len(cand), "?::INTEGER, ?::VARCHAR, ?::BIGINT")}),
             s AS (SELECT filename AS file, file_row_number AS row, sample_id, label, generator, split, text, text_hash
                   FROM read_parquet([{_rows(len(files), "?")}], filename = true, file_row_number = true)
                   WHERE file_row_number IN ({_rows(len(rows), "?")})),
             found AS (SELECT DISTINCT ON (c.rank) c.rank, s.sample_id, s.label, s.generator, s.split, s.text
                       FROM cand c JOIN s ON s.file = c.file AND s.row = c.row JOIN hit h ON h.rank = c.rank
                       WHERE s.{key} = h.content_hash ORDER BY c.rank, c.file, c.row)
        SELECT h.rank, f.sample_id, round(h.similarity, 4) AS similarity, f.label, f.generator, f.split,
               {score}f.text
        FROM hit h LEFT JOIN found f ON f.rank = h.rank {score_join}
        ORDER BY h.rank
    """
    params = [*[v for rank, (s, h) in enumerate(hits, 1) for v in (rank, h, s)], *[v for c in cand for v in c],
              *files, *rows, *([run_id] if run_id else [])]
    if run_id:  # the scores view, over the committed shards
        with catalog.connect(store) as con:
            return con.sql(sql, params=params).to_arrow_table()
    with duckdb.connect() as con:
        return con.sql(sql, params=params).to_arrow_table()


def _rows(count: int, row: str) -> str:
    """`count` comma-separated copies of a parameter row: `(?, ?), (?, ?)`, or `?, ?` for a bare `?`."""
    return ", ".join([f"({row})" if "," in row else row] * count)


def _samples_by_sql(q: NeighborQuery, hits: list[tuple[float, str]]) -> pa.Table:
    """As `_samples_by_lookup`, and the run's scores, joined in SQL (a scan of the samples)."""
    found = pa.table({
        "rank": pa.array(range(1, len(hits) + 1), pa.int32()),
        "content_hash": pa.array([h for _, h in hits], pa.string()),
        "similarity": pa.array([s for s, _ in hits], pa.float32()),
    })
    key = "sample_id" if q.modality == "image" else "text_hash"
    # only the k found rows' samples and scores are joined: never a pass that groups the whole store
    score = "sc.score" if q.run_id else "NULL::FLOAT AS score"
    score_join = ("LEFT JOIN (SELECT sample_id, score FROM scores WHERE run_id = ? AND sample_id IN "
                  "(SELECT sample_id FROM hit)) sc ON sc.sample_id = s.sample_id") if q.run_id else ""
    sql = f"""
        WITH hit AS (SELECT DISTINCT ON ({key}) * FROM samples WHERE {key} IN (SELECT content_hash FROM found))
        SELECT n.rank, s.sample_id, round(n.similarity, 4) AS similarity, s.label, s.generator, s.split,
               {score}, s.text
        FROM found n
        LEFT JOIN hit s ON s.{key} = n.content_hash
        {score_join}
        ORDER BY n.rank
    """
    table = catalog.query_with(q.store, sql, {"found": found}, [q.run_id] if q.run_id else None)
    return table if q.run_id else table.drop_columns(["score"])
