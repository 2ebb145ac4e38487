"""`pipeline neighbors`: what does this image sit next to?

The query is a sample already in the store (`--sample-id`, a unique prefix will do) or an image
file, encoded on the fly with the model that produced the store's vectors. Neighbours come from
the store's FAISS index (built first if there is none; memory-mapped, so a query holds only the
lists it scans), joined in SQL with their samples and, given a run, its scores: only the k rows
found are joined, so memory does not grow with the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.choices import Modality
from pipeline.config import Validated, at_least
from pipeline.errors import PipelineError
from pipeline.features.ann.build import open_index
from pipeline.features.ann.search import OpenIndex
from pipeline.features.vectors import normalise
from pipeline.features.view import resolve_model_key
from pipeline.reporting import Reporter, Silent
from pipeline.sources.reading import DEFAULT_MAX_BYTES, Limits, Unreadable, read_file, text_of
from pipeline.store import catalog
from pipeline.store.layout import Store
from pipeline.store.writes import writing


@dataclass(frozen=True)
class NeighborQuery(Validated):
    store: Store
    sample_id: str | None = None
    image: Path | None = None
    k: int = 10
    model_key: str | None = None
    run_id: str | None = None
    modality: Modality = "image"
    wait: bool = True
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
    index_kind: str
    random_weights: bool | None
    rows: pa.Table


def run(q: NeighborQuery, reporter: Reporter | None = None) -> NeighborResult:
    """Top-k neighbours of a stored sample or an image file (builds the index first if there is none)."""
    reporter = reporter or Silent()
    with writing(q.store, reporter, q.wait):  # the index may need building
        return _query(q)


def _query(q: NeighborQuery) -> NeighborResult:
    model_key = resolve_model_key(q.store, q.model_key)
    if q.run_id and not catalog.query(q.store, "SELECT 1 FROM runs WHERE run_id = ?", [q.run_id]).num_rows:
        raise PipelineError(f"No run {q.run_id!r}; `pipeline sql \"SELECT run_id FROM runs\"` lists them.")
    index = open_index(q.store, model_key, q.modality)
    if q.sample_id is not None:
        own, vector = _stored_vector(q.store, model_key, q.modality, q.sample_id)
        label = own
    else:
        assert q.image is not None
        own, vector, label = None, encode_image_file(q.store, model_key, q.image, q.max_bytes), str(q.image)
    rows = _neighbours(q, index, vector, own)
    info = q.store.model_info(model_key)
    return NeighborResult(label, model_key, index.info.kind, info.get("random_weights"), rows)


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


def _stored_vector(store: Store, model_key: str, modality: str, sample_id: str) -> tuple[str, np.ndarray]:
    if len(sample_id) < 6:
        raise PipelineError("--sample-id needs at least 6 characters of the id.")
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


def _neighbours(q: NeighborQuery, index: OpenIndex, vector: np.ndarray, own: str | None) -> pa.Table:
    sims, rows = index.search(vector[None], q.k + (1 if own else 0))
    valid = rows[0] >= 0
    hits = list(zip(sims[0][valid].astype(float).tolist(), index.hashes(rows[0][valid]), strict=True))
    hits = [h for h in hits if h[1] != own][: q.k]
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
