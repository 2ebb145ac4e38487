"""Predict's unit of work: a batch of input rows (where each image is, its caption) → a table of
predictions (`schemas.PREDICTIONS`). A pure callable like encode's units: `PredictBatch(detector,
options)(rows)`, so the local stage loops over it and a distributed engine can map it.

It runs in three steps that an engine may place apart: `identify` (read, hash, look the bytes up in
the store's cache, decode the rest: `encoding.identify.IdentifyImages`, in decoding processes),
`start` (queue the forward pass of the images the cache lacks) and `finish` (read it back, add the
cached vectors, encode or look up captions, score, calibrate, flag, explain). CLIP is loaded on the
first image the cache lacks: a batch whose vectors are all cached never loads it.

Vectors are the cache's: unit vectors rounded to the stored dtype (a fresh one is rounded as
`encode` would store it), so a cached and a fresh image give the same score.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.encoding.clip import LoadedModel
from pipeline.encoding.identify import CACHED_ROW, CARRIED, IdentifyImages
from pipeline.encoding.units import Decoded, EncodeImages, EncodeTexts, Started
from pipeline.errors import PipelineError
from pipeline.features.ann.search import unit_rows
from pipeline.features.ood import IndexReference, describe_rows
from pipeline.features.rowkeys import RowKeys, open_rowkeys
from pipeline.features.vectors import VectorMatrix, as_float32, open_matrix, shards_of
from pipeline.runs.detector import Detector
from pipeline.sources.images import DEFAULT_MAX_PIXELS
from pipeline.sources.reading import DEFAULT_MAX_BYTES
from schemas import PREDICTIONS, SAMPLES, UNLABELLED, from_columns

NO_CAPTION = "no_caption"  # an image+text detector met an image without a caption


@dataclass(frozen=True)
class PredictOptions:
    device: str = "auto"
    precision: str = "fp32"
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    threshold: float | None = None  # None: the detector's own (chosen on val)
    explain: int = 0  # nearest training images per row (needs a run's store)


@dataclass
class Predicted:
    """A batch's predictions, and what `--keep` would store of it: fresh image and text vectors
    (encoded-schema rows) and the inputs' sample rows (unlabelled)."""

    rows: pa.Table
    images: pa.Table | None = None
    texts: pa.Table | None = None
    samples: pa.Table | None = None
    encoded: int = 0  # images that took a forward pass
    cached: int = 0  # images whose vector came from the store


class PredictBatch:
    """Input rows → predictions, with one detector and (once needed) one CLIP model."""

    def __init__(self, detector: Detector, options: PredictOptions, loaded: LoadedModel | None = None) -> None:
        self.detector, self.options = detector, options
        self.spec = detector.spec.encode_spec(options.device, options.precision, options.max_pixels,
                                              options.max_bytes)
        self.loaded = loaded
        self.images: VectorMatrix | None = None
        self.texts: VectorMatrix | None = None
        image_keys: RowKeys | None = None
        self.text_keys: RowKeys | None = None
        store, key = detector.store, detector.spec.model_key
        if store is not None:  # the store's cache of this model: vectors looked up by content hash
            self.images = open_matrix(store, key, "image")
            image_keys = open_rowkeys(store, self.images, "image")
            if detector.spec.needs_text and _has(store, key, "text"):
                self.texts = open_matrix(store, key, "text")
                self.text_keys = open_rowkeys(store, self.texts, "text")
        self.identify = IdentifyImages(self.spec, image_keys)
        self._images: EncodeImages | None = None
        self._texts: EncodeTexts | None = None
        if options.explain and not isinstance(detector.ood, IndexReference):
            raise PipelineError("--explain shows the nearest training images, which only a run's store holds: "
                                "predict with --run RUN.")

    def __call__(self, rows: pa.Table) -> pa.Table:
        return self.finish(self.start(self.identify.decode(rows))).rows

    def start(self, decoded: Decoded) -> Started:
        """Queue the forward pass of the pictures the cache lacks (none: nothing is loaded)."""
        if not decoded.ok.any():
            return Started(decoded.rows, decoded.ok, None)
        return self._image_unit().start(decoded)

    def finish(self, started: Started, keep: bool = False, now: datetime | None = None) -> Predicted:
        rows = self._image_unit().finish(started) if started.in_flight is not None else started.rows
        n = rows.num_rows
        spec = self.detector.spec
        cached_rows = rows.column(CACHED_ROW).to_numpy()
        cached = cached_rows >= 0
        fresh = rows.column("vector").is_valid().to_numpy(zero_copy_only=False)
        unit, image_feats = self._image_vectors(rows, cached_rows, cached, fresh)
        has_image = cached | fresh
        captions = rows.column("caption")
        text_feats, has_text, text_rows = None, np.ones(n, bool), None
        if spec.needs_text:
            text_feats, has_text, text_rows = self._text_features(captions, has_image)
        scored = has_image & has_text
        score = np.full(n, np.nan, np.float32)
        score[scored] = self.detector.score(self.detector.features(
            image_feats[scored], None if text_feats is None else text_feats[scored]))
        similarity = np.full(n, np.nan, np.float32)
        similarity[scored] = self.detector.similarity(unit[scored])
        threshold = self.options.threshold if self.options.threshold is not None else spec.threshold
        reason = rows.column("reason")
        if spec.needs_text:
            missing = pa.array(has_image & ~has_text)
            reason = pc.if_else(missing, NO_CAPTION, reason)
        detail = pc.if_else(pa.array(has_image & ~has_text),
                            "the detector reads image+text features and this image has no caption",
                            rows.column("detail"))
        out = from_columns(PREDICTIONS, {
            "path": rows.column("path"),
            "sha256": rows.column("content_hash"),
            "score": pa.array(score, mask=~scored),
            "generated": pa.array(score > threshold, mask=~scored),
            "threshold": pa.array(np.full(n, threshold, np.float32)),
            "probability": pa.array(spec.calibration.apply(score), mask=~scored),
            "ood": pa.array(spec.ood.flag(similarity), mask=~scored) if spec.ood is not None else None,
            "similarity": pa.array(similarity, mask=~np.isfinite(similarity)),
            "cached": pa.array(cached, mask=~has_image),
            "reason": reason,
            "detail": detail,
            "neighbours": self._neighbours(unit, scored) if self.options.explain else None,
        })
        result = Predicted(out, encoded=int(fresh.sum()), cached=int(cached.sum()))
        if keep:
            result.images = _encoded(rows.filter(pa.array(fresh)))
            result.texts = text_rows
            result.samples = _samples(rows.filter(pa.array(has_image)), now)
        return result

    # --- private ---------------------------------------------------------------------------

    def _loaded(self) -> LoadedModel:
        if self.loaded is None:
            from pipeline.encoding.clip import load
            from pipeline.encoding.units import resolve_device

            self.loaded = load(self.spec.model, resolve_device(self.spec.device))
        return self.loaded

    def _image_unit(self) -> EncodeImages:
        if self._images is None:
            self._images = EncodeImages(self.spec, self._loaded())  # (checks the model key: the same CLIP)
        return self._images

    def _image_vectors(self, rows: pa.Table, cached_rows: np.ndarray, cached: np.ndarray,
                       fresh: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Unit image vectors as the cache holds them (float16 values as float32) and the detector's image
        features (the same, or scaled by their norms for `input_norm` raw: the arithmetic of `gather`)."""
        n, dim, raw = rows.num_rows, self.spec.dim, self.detector.spec.input_norm == "raw"
        unit = np.zeros((n, dim), np.float32)
        feats = np.zeros((n, dim), np.float32) if raw else unit
        if cached.any():
            assert self.images is not None
            unit[cached] = self.images.gather(cached_rows[cached])
            if raw:
                feats[cached] = self.images.gather(cached_rows[cached], raw=True)
        if fresh.any():
            vectors = rows.column("vector").filter(pa.array(fresh)).combine_chunks()
            values = as_float32(vectors.values.to_numpy(zero_copy_only=False).reshape(-1, dim))
            unit[fresh] = values
            if raw:
                feats[fresh] = values * rows.column("norm").filter(pa.array(fresh)).to_numpy(
                    zero_copy_only=False)[:, None]
        return unit, feats

    def _text_features(self, captions: pa.ChunkedArray, wanted: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, pa.Table | None]:
        """Text features of the captions (cached, else encoded once per distinct text), which rows have
        one, and the fresh text rows (encoded schema) for `--keep`."""
        n = len(captions)
        texts = captions.to_pylist()
        has = np.array([bool(t) for t in texts]) & wanted
        feats = np.zeros((n, self.spec.dim), np.float32)  # (CLIP embeds texts and images in one space)
        if not has.any():
            return feats, has, None
        hashes = [hashlib.sha256(t.encode("utf-8")).hexdigest() if h else None for t, h in zip(texts, has, strict=True)]
        found = self.text_keys.find(pa.array(hashes, pa.string())) if self.text_keys is not None else \
            np.full(n, -1, np.int64)
        raw = self.detector.spec.input_norm == "raw"
        hit = found >= 0
        if hit.any():
            assert self.texts is not None
            feats[hit] = self.texts.gather(found[hit], raw)
        missing = has & ~hit
        fresh_rows = None
        if missing.any():
            first: dict[str, int] = {}
            for i in np.flatnonzero(missing):
                first.setdefault(hashes[i], int(i))  # type: ignore[arg-type]
            distinct = pa.table({"text_hash": list(first), "text": [texts[i] for i in first.values()]})
            self._texts = self._texts or EncodeTexts(self.spec, self._loaded())
            fresh_rows = self._texts(distinct)
            values = as_float32(fresh_rows.column("vector").combine_chunks().values.to_numpy(zero_copy_only=False)
                                .reshape(-1, self.spec.dim))
            norm = fresh_rows.column("norm").to_numpy(zero_copy_only=False)
            vectors = values * norm[:, None] if raw else values
            at = {h: j for j, h in enumerate(first)}
            rows_of = np.array([at[hashes[i]] for i in np.flatnonzero(missing)])  # type: ignore[index]
            feats[missing] = vectors[rows_of]
        return feats, has, fresh_rows

    def _neighbours(self, unit: np.ndarray, scored: np.ndarray) -> pa.Array:
        """Per row, its nearest training images with their labels and generators (`--explain`)."""
        reference = self.detector.ood
        assert isinstance(reference, IndexReference) and self.detector.store is not None
        k = self.options.explain
        lists: list[list[dict[str, Any]] | None] = [None] * len(unit)
        if scored.any():
            sims, found = reference.nearest(unit_rows(unit[scored]), k)
            assert self.detector.view is not None
            info = {r["image_row"]: r for r in describe_rows(self.detector.store, self.detector.view.parts_sql,
                                                             found).to_pylist()}
            for i, row_sims, row_found in zip(np.flatnonzero(scored), sims, found, strict=True):
                lists[i] = [{"sample_id": info[r]["sample_id"], "similarity": float(s), "label": info[r]["label"],
                             "generator": info[r]["generator"], "split": info[r]["split"]}
                            for s, r in zip(row_sims, row_found, strict=True) if r >= 0 and r in info]
        return pa.array(lists, PREDICTIONS.field("neighbours").type)


@dataclass(frozen=True)
class PredictWorker:
    """What a worker elsewhere (a Ray actor) needs to predict units of input rows: where the detector is
    (a run of a store, or an exported folder) and the options. Plain data, so it pickles; calling it
    loads the detector there, once, and returns the function an actor maps over units. (A `PredictBatch`
    is not sent instead: its detector holds the store's memory-mapped vectors and its FAISS index, which
    would travel whole, if at all.)"""

    store: str | None  # the run's store, as every node sees it
    run_id: str | None
    folder: str | None  # an exported detector
    options: PredictOptions
    batch_size: int

    def __call__(self) -> Callable[[pa.Table], Predicted]:
        from pipeline.runs.detector import from_folder, from_run
        from pipeline.store.layout import Store

        if self.folder is not None:
            detector = from_folder(Path(self.folder))
        else:
            assert self.store is not None and self.run_id is not None
            detector = from_run(Store(Path(self.store)), self.run_id)  # (the driver built its OOD reference)
        unit = PredictBatch(detector, self.options)
        return lambda rows: predict_rows(unit, rows, self.batch_size)


def predict_rows(unit: PredictBatch, rows: pa.Table, batch_size: int) -> Predicted:
    """Every row of `rows` through `unit`, `batch_size` at a time, in order. The next batch is read and
    decoded in a thread while the model runs on this one (decoding and torch both release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    batches = [rows.slice(i, batch_size) for i in range(0, rows.num_rows, batch_size)]
    done: list[Predicted] = []
    with ThreadPoolExecutor(1, thread_name_prefix="decode") as pool:
        future = pool.submit(unit.identify.decode, batches[0]) if batches else None
        waiting = None
        for k in range(len(batches)):
            assert future is not None
            decoded = future.result()
            if k + 1 < len(batches):
                future = pool.submit(unit.identify.decode, batches[k + 1])
            started = unit.start(decoded)
            if waiting is not None:
                done.append(unit.finish(waiting))
            waiting = started
        if waiting is not None:
            done.append(unit.finish(waiting))
    return Predicted(pa.concat_tables([d.rows for d in done]) if done else PREDICTIONS.empty_table(),
                     encoded=sum(d.encoded for d in done), cached=sum(d.cached for d in done))


def _has(store: Any, model_key: str, modality: str) -> bool:
    try:
        return bool(shards_of(store, model_key, modality))
    except PipelineError:
        return False


def _encoded(rows: pa.Table) -> pa.Table:
    """Encoded-schema columns only (what `stage_encoded` stores)."""
    return rows.select([name for name in rows.column_names if name not in (*CARRIED, CACHED_ROW)])


def _samples(rows: pa.Table, now: datetime | None) -> pa.Table:
    """Unlabelled sample rows of the images read (`--keep`): they never enter a split."""
    n = rows.num_rows
    captions = rows.column("caption")
    text_hashes = [None if c is None else hashlib.sha256(c.encode("utf-8")).hexdigest()
                   for c in captions.to_pylist()]
    ids = rows.column("content_hash")
    return from_columns(SAMPLES, {
        "sample_id": ids, "split": [UNLABELLED] * n,
        "group_key": pc.binary_join_element_wise("image:", ids, ""),
        "text": captions, "text_hash": pa.array(text_hashes, pa.string()),
        "source_format": ["predict"] * n, "source_uri": rows.column("source_uri"),
        "source_member": rows.column("source_member"), "byte_offset": rows.column("byte_offset"),
        "byte_length": rows.column("byte_length"), "ingested_at": [now] * n,
    })
