"""One model's cached vectors of one modality as a float32 matrix, for FAISS and kNN.

Shards are read one at a time with pyarrow (no DuckDB copy); a content hash seen twice (an
import and an encode of the same image) keeps its first vector.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.store import catalog
from pipeline.store.layout import Store
from schemas import MODALITIES, SCHEMA_VERSION


@dataclass
class Vectors:
    ids: np.ndarray  # content hashes (object array of str), row i names matrix row i
    matrix: np.ndarray  # float32 [n, dim], L2-normalised (again, after float16 storage)
    source: tuple[Path, ...] = ()  # the shards they were read from


def shards_of(store: Store, model_key: str, modality: str) -> list[Path]:
    if modality not in MODALITIES:
        raise PipelineError(f"--vectors must be one of {', '.join(MODALITIES)}.")
    shards = [p for p in catalog.shard_paths(store, "embeddings", model_key) if p.name.startswith(f"{modality}-")]
    if not shards:
        raise PipelineError(f"No {modality} embeddings for {model_key}: run `pipeline encode` first.")
    return shards


def fingerprint(store: Store, shards: list[Path], *extra: object) -> str:
    """Names exactly this set of shard files (they are immutable once written)."""
    h = hashlib.sha256(json.dumps([SCHEMA_VERSION, *extra], default=str).encode())
    for p in sorted(store.relative(s) for s in shards):
        h.update(p.encode() + b"\n")
    return h.hexdigest()[:16]


def count_rows(shards: list[Path]) -> int:
    return sum(pq.read_metadata(p).num_rows for p in shards)


def load_vectors(shards: list[Path]) -> Vectors:
    ids: list[np.ndarray] = []
    mats: list[np.ndarray] = []
    for path in shards:
        table = pq.read_table(path, columns=["content_hash", "vector"])
        ids.append(table.column("content_hash").to_numpy(zero_copy_only=False))
        mats.append(matrix(table.column("vector")))
    all_ids = np.concatenate(ids)
    all_mat = np.concatenate(mats)
    _, first = np.unique(all_ids, return_index=True)
    if len(first) < len(all_ids):
        keep = np.sort(first)
        all_ids, all_mat = all_ids[keep], all_mat[keep]
    # float16 storage leaves norms off 1 by ~1e-4; renormalise so cosine similarities stay ≤ 1
    return Vectors(all_ids, np.ascontiguousarray(normalise(all_mat)), tuple(shards))


def matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """fixed_size_list<float16|float32>[dim] → float32 [n, dim]."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    dim = arr.type.list_size
    return arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)


def normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)
