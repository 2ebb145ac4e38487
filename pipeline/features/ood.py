"""Out of distribution: is an image near anything the detector was trained on?

A new generator, seen from outside, is images unlike every training image: the detector's score on
them is extrapolation. The flag compares an image's similarity to the training images with the
validation images' own: below their `PERCENTILE`-th percentile, the image is "far from every
training image: the score is unreliable". Validation images are what in-distribution images look
like to the detector (it never trained on them), so on them the flag fires at that rate (1%).

Two references, one rule:

- `IndexReference` (a run in a store): the statistic is the mean cosine similarity of the image to
  its `K` nearest *training* images, found in the store's FAISS index (`features.ann`) restricted to
  the rows of the run's training images (a FAISS ID selector over a bitmap, 1 bit a vector), so the
  neighbours are exact training images, not val, test or unlabelled ones. It is cached per run and
  index under `cache/ood/` (the bitmap and the validation threshold; both follow from the store).
- `CentroidSketch` (an exported detector, no store): the training image vectors summarised by
  spherical k-means centroids (at most `MAX_CENTROIDS`, float16: 1.5 MB for ViT-L-14), the statistic
  the cosine to the nearest centroid, the threshold measured the same way on the store's validation
  images at export. Coarser than the index (a centroid is nearer than the images around it), but the
  threshold is measured with the same statistic, so the flag keeps its meaning.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.errors import PipelineError
from pipeline.features.ann.build import IndexConfig, build_index
from pipeline.features.ann.coarse import train_coarse
from pipeline.features.ann.search import OpenIndex, open_built, read_info, unit_rows
from pipeline.features.vectors import VectorMatrix
from pipeline.reporting import Reporter, Silent
from pipeline.store import cache, catalog
from pipeline.store.atomic import atomic_write, write_text
from pipeline.store.layout import Store
from pipeline.store.writes import writing

PERCENTILE = 1.0  # of the validation images' statistic: the flag's rate on in-distribution images
K = 5  # nearest training images averaged (one near-duplicate does not make an image familiar)
VAL_QUERIES = 4096  # validation images measured (a fixed sample: the first by a hash of their id)
MAX_CENTROIDS = 1024
ROWS_PER_CENTROID = 32  # fewer training images than this per centroid: fewer centroids
KMEANS_SAMPLE = 262_144  # training vectors the sketch's k-means sees at most
UNRELIABLE = "far from every training image: the score is unreliable"
CACHE_VERSION = 1


@dataclass(frozen=True)
class OodSpec:
    """The flag's rule: the statistic (`kind`), its `threshold` (the `percentile`-th percentile of the
    statistic over `val` validation images) and the neighbours averaged (`k`)."""

    kind: str  # index: mean similarity to the k nearest training images | centroids: to the nearest centroid
    k: int
    percentile: float
    threshold: float  # NaN: no validation image to measure it on (the flag is then never raised)
    val: int
    centroids: int = 0

    def flag(self, similarity: np.ndarray) -> np.ndarray:
        """True where the statistic is below the threshold (NaN statistic or threshold: False)."""
        with np.errstate(invalid="ignore"):
            return np.asarray(similarity < self.threshold)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "k": self.k, "percentile": self.percentile,
                "threshold": None if math.isnan(self.threshold) else self.threshold, "val": self.val,
                "centroids": self.centroids}

    @staticmethod
    def from_json(data: dict[str, Any]) -> OodSpec:
        threshold = data.get("threshold")
        return OodSpec(str(data["kind"]), int(data["k"]), float(data["percentile"]),
                       math.nan if threshold is None else float(threshold), int(data.get("val") or 0),
                       int(data.get("centroids") or 0))


def threshold_of(similarities: np.ndarray, percentile: float = PERCENTILE) -> float:
    values = np.asarray(similarities, np.float64)
    values = values[np.isfinite(values)]
    return float(np.percentile(values, percentile)) if len(values) else math.nan


class IndexReference:
    """The k nearest training images of a run, from the store's index; see the module docstring."""

    def __init__(self, index: OpenIndex, train: np.ndarray, spec: OodSpec) -> None:
        self.index = index
        self.allowed = np.packbits(train, bitorder="little")  # FAISS' IDSelectorBitmap: bit i of byte i >> 3
        self.rows = len(train)
        self.spec = spec

    def nearest(self, x: np.ndarray, k: int = K) -> tuple[np.ndarray, np.ndarray]:
        """Similarities and matrix rows of each unit row of x's k nearest training images (-1: none)."""
        import faiss

        selector = faiss.IDSelectorBitmap(self.rows, faiss.swig_ptr(self.allowed))
        return self.index.search_among(unit_rows(np.array(x, np.float32)), k, selector)

    def similarity(self, x: np.ndarray) -> np.ndarray:
        sims, rows = self.nearest(x, self.spec.k)
        return _mean_found(sims, rows)


class CentroidSketch:
    """Spherical k-means centroids of the training image vectors; see the module docstring."""

    def __init__(self, centroids: np.ndarray, spec: OodSpec) -> None:
        self.centroids = unit_rows(np.array(centroids, np.float32))
        self.spec = spec

    def similarity(self, x: np.ndarray) -> np.ndarray:
        if not len(x):
            return np.zeros(0, np.float32)
        return (unit_rows(np.array(x, np.float32)) @ self.centroids.T).max(axis=1)


def index_reference(store: Store, model_key: str, run_id: str, matrix: VectorMatrix, view_sql: str,
                    only: tuple[str, ...] | None = None, reporter: Reporter | None = None,
                    wait: bool = True) -> IndexReference:
    """The run's reference: an index of the current vector layout that holds every training row of the
    run (one is built, under the writer lock, if there is none), the bitmap of those rows and the
    validation threshold; the last two cached per run and index. `view_sql`: the run's training view
    (rows of samples); `only`: the generators the run learned from (with every real image)."""
    reporter = reporter or Silent()
    directory = store.root / "cache" / "ood" / model_key / run_id
    with cache.building(directory):  # the bitmap: rows follow from the layout of the vectors alone
        bitmap = directory / f"train-{matrix.generation}.npy"
        if bitmap.exists():
            train = np.unpackbits(np.load(bitmap), count=matrix.rows, bitorder="little").astype(bool)
        else:
            train = _rows(store, view_sql, run_id, "train", only, matrix.rows)
            atomic_write(bitmap, lambda tmp: np.save(tmp.open("wb"), np.packbits(train, bitorder="little")))
        cache.sweep(directory.glob("train-*.npy"), {bitmap.name})
    index = _covering_index(store, model_key, matrix, train, reporter, wait)
    key = f"{index.info.index_id}-{matrix.generation}"
    with cache.building(directory):  # the threshold: measured through this index
        meta = cache.read_json(directory / "reference.json")
        if meta is None or meta.get("key") != key or meta.get("version") != CACHE_VERSION:
            reference = IndexReference(index, train, OodSpec("index", K, PERCENTILE, math.nan, 0))
            val = _rows(store, view_sql, run_id, "val", only, matrix.rows, VAL_QUERIES, as_mask=False)
            stats = np.concatenate([reference.similarity(matrix.gather(part)) for part in _parts(val)]) \
                if len(val) else np.zeros(0)
            spec = OodSpec("index", K, PERCENTILE, threshold_of(stats), len(val))
            meta = {"version": CACHE_VERSION, "key": key, "spec": spec.to_json()}
            write_text(directory / "reference.json", json.dumps(meta))
    return IndexReference(index, train, OodSpec.from_json(meta["spec"]))


def centroid_sketch(store: Store, run_id: str, matrix: VectorMatrix, view_sql: str,
                    only: tuple[str, ...] | None = None, seed: int = 0) -> CentroidSketch:
    """A sketch of the run's training images and its validation threshold (for an exported detector)."""
    import faiss

    train = np.flatnonzero(_rows(store, view_sql, run_id, "train", only, matrix.rows))
    if not len(train):
        raise PipelineError(f"Run {run_id} has no training images with vectors in this store to sketch.")
    count = max(1, min(MAX_CENTROIDS, len(train) // ROWS_PER_CENTROID))
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(train, min(len(train), KMEANS_SAMPLE), replace=False))
    vectors = unit_rows(matrix.gather(sample))
    centroids = train_coarse(vectors, count, seed, faiss).centroids if count > 1 else vectors.mean(0, keepdims=True)
    # float16, as shipped: the threshold is measured with the centroids a user will load
    shipped = unit_rows(centroids).astype(np.float16).astype(np.float32)
    sketch = CentroidSketch(shipped, OodSpec("centroids", 1, PERCENTILE, math.nan, 0, len(shipped)))
    val = _rows(store, view_sql, run_id, "val", only, matrix.rows, VAL_QUERIES, as_mask=False)
    stats = np.concatenate([sketch.similarity(matrix.gather(part)) for part in _parts(val)]) if len(val) else \
        np.zeros(0)
    sketch.spec = OodSpec("centroids", 1, PERCENTILE, threshold_of(stats), len(val), len(centroids))
    return sketch


def describe_rows(store: Store, view_sql: str, rows: np.ndarray) -> pa.Table:
    """For matrix rows (neighbours found), each sample's id, label, generator and split, from the view
    (only those rows are read back: an `IN` list over one integer column)."""
    wanted = np.unique(rows[rows >= 0])
    if not len(wanted):
        return pa.table({"image_row": pa.array([], pa.int64()), "sample_id": pa.array([], pa.string()),
                         "label": pa.array([], pa.int8()), "generator": pa.array([], pa.string()),
                         "split": pa.array([], pa.string())})
    return catalog.query_with(store, f"SELECT DISTINCT ON (image_row) image_row, sample_id, label, generator, split "
                              f"FROM {view_sql} WHERE image_row IN (SELECT row FROM wanted)",
                              {"wanted": pa.table({"row": pa.array(wanted, pa.int64())})})


# --- private -------------------------------------------------------------------------------


def _rows(store: Store, view_sql: str, run_id: str, split: str, only: tuple[str, ...] | None, n: int,
          limit: int | None = None, as_mask: bool = True) -> np.ndarray:
    """Matrix rows of the run's samples of `split` (its scores say which), as a mask of n rows, or (a
    fixed sample of `limit`, the first by a hash of the id) sorted row numbers."""
    seen = "" if only is None else "AND (v.label = 0 OR v.generator IN (SELECT unnest($only)))"
    order = f"ORDER BY md5(v.sample_id) LIMIT {int(limit)}" if limit else ""
    params: dict[str, object] = {"run": run_id, "split": split, **({"only": list(only)} if only else {})}
    rows = catalog.query(store, f"SELECT v.image_row FROM {view_sql} v WHERE v.split = $split {seen} AND v.sample_id "
                         f"IN (SELECT sample_id FROM scores WHERE run_id = $run AND split = $split) {order}",
                         params).column(0).to_numpy()
    if not as_mask:
        return np.sort(rows)
    mask = np.zeros(n, bool)
    mask[rows] = True
    return mask


def _covering_index(store: Store, model_key: str, matrix: VectorMatrix, train: np.ndarray, reporter: Reporter,
                    wait: bool) -> OpenIndex:
    """The newest image index over this layout of the vectors that holds every training row; else one built now."""
    last = int(np.flatnonzero(train)[-1]) if train.any() else -1
    found = []
    for record in (store.dataset_dir("indexes") / model_key).glob("image-*/index.parquet"):
        info = read_info(record)
        if info.params.get("matrix") == matrix.generation and info.vectors > last and \
                (record.parent / "ids.arrow").exists():
            found.append(info)
    if found:
        info = max(found, key=lambda i: (i.vectors, i.index_id))
        info.built = False
    else:
        with writing(store, reporter, wait):
            info = build_index(IndexConfig(store, model_key, modality="image"), reporter)
    return open_built(store, info, "image")


def _mean_found(sims: np.ndarray, rows: np.ndarray) -> np.ndarray:
    found = rows >= 0
    total = np.where(found, sims, 0).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (total / found.sum(1)).astype(np.float32)  # NaN: no training image at all


def _parts(rows: np.ndarray, size: int = 1024) -> Iterator[np.ndarray]:
    for start in range(0, len(rows), size):
        yield rows[start:start + size]


