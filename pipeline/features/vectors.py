"""One model's cached vectors of one modality, laid out once as memory-mapped matrices.

The embedding shards (Parquet) are the truth; this is a derived, append-only cache that lets a
batch be a gather from mapped memory instead of a Parquet decode. In
`cache/vectors/<model_key>/<modality>/`:

- `seg-<fingerprint>.npy`: the vectors of some shards, concatenated in shard order (the shards'
  own dtype, float16 normally), and `seg-<fingerprint>.norms.npy` (float32, the norm each vector
  had before L2 normalisation; NaN where the shard did not record it);
- `layout.json`: the segments in order, each with the shards (and their row counts) it holds.

Row r of the matrix is row `r - offset(shard)` of its shard, so the training view maps content
hashes to rows in SQL with `file_row_number` (no hash is stored a second time). New shards append
a segment; offsets of earlier rows never move. A shard that left the store forces a rebuild
(a new `generation`). Every file is written atomically, the layout last.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.reporting import Reporter, Silent
from pipeline.store import catalog
from pipeline.store.atomic import atomic_write, write_text
from pipeline.store.layout import Store
from schemas import MODALITIES, SCHEMA_VERSION

LAYOUT_VERSION = 1
READ_ROWS = 16384  # rows per Parquet batch while laying shards out (bounded memory)


@dataclass(frozen=True)
class Segment:
    name: str  # file stem, e.g. seg-<fingerprint>
    shards: tuple[tuple[str, int], ...]  # (store-relative shard path, rows), in row order
    start: int  # global row of its first vector

    @property
    def rows(self) -> int:
        return sum(n for _, n in self.shards)


class VectorMatrix:
    """The concatenated segments of one model and modality: gather rows, stream chunks."""

    def __init__(self, directory: Path, generation: str, segments: list[Segment], dim: int, dtype: str) -> None:
        self.directory = directory
        self.generation = generation
        self.segments = segments
        self.dim = dim
        self.dtype = dtype
        self._starts = np.array([s.start for s in segments] + [self.rows], np.int64)
        self._data: list[np.ndarray] = [np.load(directory / f"{s.name}.npy", mmap_mode="r") for s in segments]
        self._norms: list[np.ndarray] = [
            np.load(directory / f"{s.name}.norms.npy", mmap_mode="r") for s in segments
        ]

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.segments)

    @property
    def segment_names(self) -> list[str]:
        return [s.name for s in self.segments]

    def shard_offsets(self) -> pa.Table:
        """(path, offset): global row of each shard's first row, for SQL joins on file_row_number."""
        paths, offsets = [], []
        for seg in self.segments:
            at = seg.start
            for path, n in seg.shards:
                paths.append(path)
                offsets.append(at)
                at += n
        return pa.table({"path": pa.array(paths, pa.string()), "offset": pa.array(offsets, pa.int64())})

    def gather(self, rows: np.ndarray, raw: bool = False) -> np.ndarray:
        """float32 [len(rows), dim]: unit vectors, or (raw) scaled back by their stored norms."""
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), self.dim), np.float32)
        order = np.argsort(rows, kind="stable")  # ascending reads: friendlier to the page cache
        sorted_rows = rows[order]
        seg_of = np.searchsorted(self._starts, sorted_rows, side="right") - 1
        for seg in np.unique(seg_of):
            pick = seg_of == seg
            local = sorted_rows[pick] - self._starts[seg]
            values = self._data[seg][local].astype(np.float32)
            if raw:
                norms = self._norms[seg][local]
                if np.isnan(norms).any():
                    raise PipelineError(
                        "Some vectors were stored without their norm (written before norms were kept), so "
                        "--input-norm raw cannot restore them: import or encode them again, or use l2."
                    )
                values *= norms[:, None]
            out[order[pick]] = values
        return out

    def chunks(self, size: int = 65536, raw: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 chunk) over every row in order; memory is one chunk."""
        for s, seg in enumerate(self.segments):
            data = self._data[s]
            for at in range(0, seg.rows, size):
                part = np.array(data[at:at + size], np.float32)
                if raw:
                    part *= np.asarray(self._norms[s][at:at + size])[:, None]
                yield seg.start + at, part

    def has_norms(self) -> bool:
        return all(not np.isnan(np.asarray(n[:1])).any() for n in self._norms if len(n))


def shards_of(store: Store, model_key: str, modality: str) -> list[Path]:
    if modality not in MODALITIES:
        raise PipelineError(f"--vectors must be one of {', '.join(MODALITIES)}.")
    shards = [p for p in catalog.shard_paths(store, "embeddings", model_key) if p.name.startswith(f"{modality}-")]
    if not shards:
        raise PipelineError(f"No {modality} embeddings for {model_key}: run `pipeline encode` first.")
    return shards


def open_matrix(store: Store, model_key: str, modality: str, reporter: Reporter | None = None) -> VectorMatrix:
    """The matrix of the current shards, appending (or, if a shard vanished, rebuilding) first."""
    reporter = reporter or Silent()
    shards = shards_of(store, model_key, modality)
    directory = store.root / "cache" / "vectors" / model_key / modality
    current = {store.relative(p): p for p in shards}
    layout = _read_layout(directory)
    if layout is not None:
        generation, segments, dim, dtype = layout
        covered = {path for s in segments for path, _ in s.shards}
        if not covered <= current.keys() or not all((directory / f"{s.name}.npy").exists() for s in segments):
            layout = None
    if layout is None:
        generation, segments, dim, dtype = uuid.uuid4().hex[:12], [], *_dim_dtype(shards)
        covered = set()
    new = [rel for rel in current if rel not in covered]  # catalog order: name order, i.e. time order
    if new:
        start = sum(s.rows for s in segments)
        segments = [*segments, _write_segment(directory, [current[r] for r in new], store, start, dim, dtype,
                                              reporter, modality)]
        _write_layout(directory, generation, segments, dim, dtype)
    return VectorMatrix(directory, generation, segments, dim, dtype)


def fingerprint(store: Store, shards: list[Path], *extra: object) -> str:
    """Names exactly this set of shard files (they are immutable once written)."""
    h = hashlib.sha256(json.dumps([SCHEMA_VERSION, *extra], default=str).encode())
    for p in sorted(store.relative(s) for s in shards):
        h.update(p.encode() + b"\n")
    return h.hexdigest()[:16]


def normalise(x: np.ndarray) -> np.ndarray:
    """A float32 copy of `x` with rows scaled to unit L2 norm (zero rows stay zero)."""
    out = np.array(x, np.float32)
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


# --- private -------------------------------------------------------------------------------


def _dim_dtype(shards: list[Path]) -> tuple[int, str]:
    types = {pq.read_schema(p).field("vector").type for p in shards}
    dims = {t.list_size for t in types}
    if len(dims) > 1:
        raise PipelineError(f"The shards of one model hold vectors of different sizes ({sorted(dims)}).")
    wide = any(t.value_type == pa.float32() for t in types)
    return dims.pop(), "float32" if wide else "float16"


def _write_segment(directory: Path, shards: list[Path], store: Store, start: int, dim: int, dtype: str,
                   reporter: Reporter, modality: str) -> Segment:
    counts = [pq.read_metadata(p).num_rows for p in shards]
    total = sum(counts)
    name = "seg-" + fingerprint(store, shards, "segment", start)
    reporter.start(f"lay out {modality} vectors", total, "vectors")
    norms = np.full(total, np.nan, np.float32)

    def write(tmp: Path) -> None:
        # plain writes, not a writable memmap: dirty mapped pages would count against this process
        with open(tmp, "wb") as out:
            np.lib.format.write_array_header_2_0(
                out, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": (total, dim)})
            at = 0
            for path in shards:
                file = pq.ParquetFile(path)
                columns = ["vector"] + (["norm"] if "norm" in file.schema_arrow.names else [])
                for batch in _batches(file, columns):
                    vec = batch.column("vector")
                    if vec.type.list_size != dim:
                        raise PipelineError(f"{path.name} holds {vec.type.list_size}-d vectors, not {dim}-d.")
                    n = len(vec)
                    values = vec.flatten().to_numpy(zero_copy_only=False)
                    out.write(np.ascontiguousarray(values, np.dtype(dtype)).tobytes())
                    if "norm" in columns:
                        norms[at:at + n] = batch.column("norm").to_numpy(zero_copy_only=False)
                    at += n
                    reporter.advance(f"lay out {modality} vectors", n)

    atomic_write(directory / f"{name}.npy", write)
    atomic_write(directory / f"{name}.norms.npy", lambda tmp: _save(tmp, norms))
    rel = tuple((store.relative(p), n) for p, n in zip(shards, counts, strict=True))
    return Segment(name, rel, start)


def _batches(file: pq.ParquetFile, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """Up to READ_ROWS rows at a time, one row group read at a time (`iter_batches` reads ahead
    several row groups, which for vector shards is tens of megabytes)."""
    for group in range(file.metadata.num_row_groups):
        table = file.read_row_group(group, columns=columns, use_threads=False)
        yield from table.to_batches(READ_ROWS)


def _save(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a temp name
        np.save(f, array)


def _read_layout(directory: Path) -> tuple[str, list[Segment], int, str] | None:
    path = directory / "layout.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if data.get("version") != LAYOUT_VERSION:
        return None
    segments = [Segment(s["name"], tuple((p, int(n)) for p, n in s["shards"]), int(s["start"]))
                for s in data["segments"]]
    return data["generation"], segments, int(data["dim"]), data["dtype"]


def _write_layout(directory: Path, generation: str, segments: list[Segment], dim: int, dtype: str) -> None:
    data = {
        "version": LAYOUT_VERSION, "generation": generation, "dim": dim, "dtype": dtype,
        "segments": [{"name": s.name, "start": s.start, "shards": [list(x) for x in s.shards]} for s in segments],
    }
    write_text(directory / "layout.json", json.dumps(data))
    keep = {f"{s.name}.npy" for s in segments} | {f"{s.name}.norms.npy" for s in segments}
    for stale in directory.glob("seg-*.npy"):
        if stale.name not in keep:
            stale.unlink(missing_ok=True)
