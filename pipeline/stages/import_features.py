"""`pipeline import-features`: bring precomputed CLIP features in without re-encoding.

- `h5`: the reference code's layout, `NNNN.h5` files with datasets `real`, `image_gen0..3`,
  `original_prompt`, `positive_prompt` (row i of each is one D3 row). No image bytes or texts
  exist, so content hashes are hashes of the vectors themselves; the samples are features-only.
- `clip-retrieval`: `img_emb/*.npy`, `text_emb/*.npy`, `metadata/*.parquet` (aligned by file
  index and row). Where `image_path` is readable the sample id is the image's SHA-256 (so a later
  ingest of the same image matches) and the sample stays encodable by other models.

Vectors are L2-normalised on import, as `encode` stores them (their norms are kept). Re-importing
adds nothing, and costs almost nothing: each source file (an `.h5`, or one clip-retrieval shard) is
a unit of ingest's `sources` ledger, so a file imported before with the same options and unchanged
(same size and modification time; a clip-retrieval shard also by its metadata Parquet's footer) is
skipped unread. Files are read in slices of `SLICE_ROWS` rows; each slice is de-duplicated against
key sets of the store's sample ids and this model's vector hashes (`pipeline.store.keys`), built by
one scan per run when a file needs reading, not by a scan of the store per slice.

The stage should cost what moving the bytes costs: a slice's vectors are normalised and hashed a
block of `_BLOCK_BYTES` at a time (temporaries stay in the CPU cache, not fresh pages) straight into
the array the shard is written from, ids and their keys are made from the digests in one pass, and
one thread writes and commits a slice's shards while the next slice is read and hashed.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, get_args

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.choices import FeatureLayout, VectorDtype
from pipeline.config import Validated
from pipeline.errors import PipelineError
from pipeline.features.vectors import cast_into, normalise
from pipeline.reporting import Reporter, Silent
from pipeline.sources.common import Unit, parquet_fingerprint, stat_unit
from pipeline.sources.d3 import DEFAULT_GENERATORS
from pipeline.sources.d3_order import OrderCheck
from pipeline.sources.generators import canonical
from pipeline.sources.ledger import assign_split, ledger_queries, ledger_row, text_hash, unread
from pipeline.sources.webdataset import parse_label
from pipeline.store import writes
from pipeline.store.atomic import write_parquet
from pipeline.store.keys import KeyQuery, StoreKeys, first_occurrence, hex_keys, keys_of
from pipeline.store.layout import Store, safe_name
from pipeline.store.writes import writing
from schemas import SAMPLES, SOURCES, embeddings_schema, from_columns, from_rows

LAYOUTS: tuple[str, ...] = get_args(FeatureLayout)
SLICE_ROWS = 16384  # source rows (h5: 5 images and 2 texts each) read, hashed and written at a time
_BLOCK_BYTES = 2 << 20  # float32 vectors read, normalised and hashed at a time: the CPU's cache, not fresh pages
_IMAGE_SETS = ("real", "image_gen0", "image_gen1", "image_gen2", "image_gen3")
_TEXT_SETS = ("original_prompt", "positive_prompt")


@dataclass(frozen=True)
class ImportConfig(Validated):
    source: Path
    layout: FeatureLayout
    store: Store
    model_key: str  # names the model that produced the features, e.g. ViT-L-14__openai__imported
    generators: tuple[str, ...] = DEFAULT_GENERATORS
    generator: str | None = None  # clip-retrieval: the whole source's generator ('real' → label 0)
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    split_seed: str = "0"
    dtype: VectorDtype = "float16"
    wait: bool = True

    def check(self) -> None:
        if not self.source.exists():
            raise PipelineError(f"Source {self.source} does not exist.")


@dataclass
class ImportResult:
    model_key: str
    samples_added: int = 0
    vectors_added: int = 0
    already_present: int = 0  # rows of the files read whose sample the store held already
    units_read: int = 0  # source files (h5 files, clip-retrieval shards) read
    units_skipped: int = 0  # imported before, unchanged, same options: not opened
    # h5: sentences where --generators disagrees with the store's D3 samples (`pipeline.sources.d3_order`)
    generator_warnings: list[str] = field(default_factory=list)
    shards: list[Path] = field(default_factory=list)


@dataclass
class _Chunk:
    """A slice of one source file: sample rows, the unit vector of each row's image (row i of
    `image_vectors` is sample i's), the texts they point at, and the norms before normalising.
    Vectors are in the stored dtype; keys are `keys_of` the sample ids and the text hashes."""

    samples: pa.Table  # schema SAMPLES
    image_vectors: np.ndarray
    image_norms: np.ndarray
    sample_keys: np.ndarray
    text_hashes: pa.Array
    text_keys: np.ndarray
    text_vectors: np.ndarray
    text_norms: np.ndarray
    done: tuple[Unit, int] | None = None  # the last slice of its file: the unit and the rows it gave


def run(config: ImportConfig, reporter: Reporter | None = None) -> ImportResult:
    """Add the source's samples and vectors the store lacks, one shard set per slice of a file."""
    reporter = reporter or Silent()
    with writing(config.store, reporter, config.wait):
        return _import(config, reporter)


def _import(config: ImportConfig, reporter: Reporter) -> ImportResult:
    key = safe_name(config.model_key)
    store = config.store
    units = _h5_units(config) if config.layout == "h5" else _clip_retrieval_units(config)
    digest = _options_digest(config, key)
    result = ImportResult(key)
    dims: tuple[int, int] | None = None
    now = datetime.now(UTC)
    with StoreKeys(store, {
        **ledger_queries(digest),
        "samples": KeyQuery("samples", "sample_id"),
        "image": KeyQuery("embeddings", "content_hash", "modality = 'image'", key),
        "text": KeyQuery("embeddings", "content_hash", "modality = 'text'", key),
    }, maintained=("samples", "image", "text")) as known, _Writer(store) as writer:
        todo = unread(units, known)
        result.units_skipped = len(units) - len(todo)
        if todo and config.layout == "h5":  # image_gen0..3 named by --generators: checked before a write
            result.generator_warnings = OrderCheck(store, "h5", config.generators).tell(reporter)
        if todo:
            reporter.start("import", None, "samples")
        for unit in todo:
            read = _h5_slices if config.layout == "h5" else _clip_retrieval_slices
            for chunk in read(config, unit, now):
                if chunk.samples.num_rows:
                    dims = _check_dims(store, key, chunk, dims)
                _add(config, key, digest, chunk, known, result, now, writer)
                reporter.advance("import", chunk.samples.num_rows)
            result.units_read += 1
    if dims is not None:
        _record_model(store, key, dims, config)
    return result


def _add(config: ImportConfig, key: str, digest: str, chunk: _Chunk, known: StoreKeys, result: ImportResult,
         now: datetime, writer: _Writer) -> None:
    """Write the slice's new samples and vectors (and, for a file's last slice, its ledger row) and
    commit them at once (in the writer's thread), so a kill leaves the file to be read again, never
    half recorded."""
    store = config.store
    tables: list[tuple[pa.Table, Path]] = []
    n = chunk.samples.num_rows
    if n:
        ids = chunk.sample_keys
        fresh = first_occurrence(ids) & ~known.get("samples").contains(ids)
        result.already_present += int(n - fresh.sum())
        for modality, hashes, keys, vectors, norms in (
            ("image", chunk.samples.column("sample_id"), ids, chunk.image_vectors, chunk.image_norms),
            ("text", chunk.text_hashes, chunk.text_keys, chunk.text_vectors, chunk.text_norms),
        ):
            keep = first_occurrence(keys) & ~known.get(modality).contains(keys)
            if keep.any():
                if not keep.all():
                    hashes, vectors, norms = hashes.filter(pa.array(keep)), vectors[keep], norms[keep]
                tables.append((_embeddings(key, modality, hashes, vectors, norms),
                               store.new_shard(store.embeddings_dir(key), modality)))
                result.vectors_added += int(keep.sum())
                known.add(modality, keys[keep])  # later slices must find them (saved only if the run ends well)
        if fresh.any():
            samples = chunk.samples if fresh.all() else chunk.samples.filter(pa.array(fresh))
            tables.append((samples, store.new_shard(store.dataset_dir("samples"), "imported")))
            result.samples_added += int(fresh.sum())
            known.add("samples", ids[fresh])
    if chunk.done is not None:
        unit, items = chunk.done
        tables.append((from_rows(SOURCES, [ledger_row(unit, digest, items, now)]),
                       store.new_shard(store.dataset_dir("sources"), "imported")))
    if tables:
        writer.submit(tables)
    result.shards.extend(path for _, path in tables if path.parent.name != "sources")


class _Writer:
    """Writes one slice's shards and commits them, in a thread, while the next slice is read and
    hashed (Parquet writes and fsync release the GIL). One slice at a time, in order; a failed
    write is raised at the next `submit` or at exit, so the run fails and its key sets are not kept."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="import-write")
        self._pending: Future[None] | None = None

    def submit(self, tables: list[tuple[pa.Table, Path]]) -> None:
        self.wait()
        self._pending = self._pool.submit(self._write, tables)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _write(self, tables: list[tuple[pa.Table, Path]]) -> None:
        writes.commit(self.store, [write_parquet(table, path) for table, path in tables])

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if kind is None:
                self.wait()
            elif self._pending is not None:
                self._pending.exception()  # let the slice in flight finish; the error already raised wins
        finally:
            self._pool.shutdown(wait=True)


def _embeddings(key: str, modality: str, hashes: pa.Array | pa.ChunkedArray, vectors: np.ndarray,
                norms: np.ndarray) -> pa.Table:
    """Embedding rows from unit vectors in their stored dtype: the vector column is a view of the
    array's buffer (no validity bitmap, no per-value work)."""
    n, dim = vectors.shape
    schema = embeddings_schema(dim, str(vectors.dtype))
    flat = pa.array(np.ascontiguousarray(vectors).reshape(-1))
    return pa.Table.from_arrays([
        _repeated(key, n), _repeated(modality, n), hashes,
        pa.FixedSizeListArray.from_arrays(flat, type=schema.field("vector").type),
        pa.array(np.asarray(norms, np.float32)),
    ], schema=schema)


def _repeated(value: object, n: int, type: pa.DataType | None = None) -> pa.Array:
    return pa.array([value], type or pa.string()).take(np.zeros(n, np.int32))


def _options_digest(config: ImportConfig, key: str) -> str:
    """What, besides a file's bytes, decides the rows it becomes: a change means read it again."""
    options = {
        "stage": "import-features", "layout": config.layout, "model_key": key,
        "generators": list(config.generators), "generator": config.generator,
        "splits": list(config.split_fractions), "split_seed": config.split_seed, "dtype": config.dtype,
    }
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:32]


def vector_hash(modality: str, vector: np.ndarray) -> str:
    """Content hash of a vector with no image or text behind it (float32 bytes, L2-normalised)."""
    unit = normalise(vector[None, :])[0].astype("<f4")
    return hashlib.sha256(modality.encode() + b"\x00" + unit.tobytes()).hexdigest()


# --- the reference code's HDF5 files -------------------------------------------------------


def _h5_units(config: ImportConfig) -> list[Unit]:
    try:
        import h5py  # noqa: F401 - checked before any file is looked at
    except ImportError as exc:
        raise PipelineError(
            "Importing HDF5 features needs h5py: pip install 'clipdetect-pipeline[h5]'."
        ) from exc
    files = [config.source] if config.source.is_file() else sorted(config.source.glob("*.h5"))
    if not files:
        raise PipelineError(f"{config.source} holds no .h5 files.")
    return [stat_unit(path) for path in files]


def _h5_slices(config: ImportConfig, unit: Unit, now: datetime) -> Iterator[_Chunk]:
    import h5py

    path = unit.path
    with h5py.File(path, "r") as f:
        missing = [d for d in _IMAGE_SETS + _TEXT_SETS if d not in f]
        if missing:
            raise PipelineError(f"{path} lacks the dataset(s) {', '.join(missing)}.")
        rows = f["real"].shape[0]
        if rows == 0:
            yield _empty_chunk((unit, 0))
        for start in range(0, rows, SLICE_ROWS):  # slices, so memory is one slice whatever the file's size
            end = min(rows, start + SLICE_ROWS)
            # [n·5, d]: row i·5 + j is image set j of row i; texts [n·2, d]
            images = _unit_rows("image", [f[name] for name in _IMAGE_SETS], start, end, config.dtype)
            texts = _unit_rows("text", [f[name] for name in _TEXT_SETS], start, end, config.dtype)
            yield _h5_chunk(config, path, start, images, texts, now, (unit, 5 * rows) if end == rows else None)


@dataclass
class _Units:
    """Vectors made unit length (in the stored dtype), their norms before, their `vector_hash`es
    and the keys of those."""

    vectors: np.ndarray
    norms: np.ndarray
    hashes: pa.Array
    keys: np.ndarray


def _unit_rows(modality: str, sets: list[Any], first: int, last: int, dtype: str) -> _Units:
    """Rows first:last of several sets (HDF5 datasets or arrays) interleaved (row i·k + j is row i
    of set j), read, normalised and hashed a block at a time into one array of the stored dtype.

    float16 sets are read as they are stored (no conversion in h5py or numpy) and cast with
    `cast_into`; a block with a row whose norm is not finite (a NaN or an infinity in it) is cast
    again by numpy, so every byte (and every `vector_hash`) is numpy's whatever the values. A
    block is hashed in a second thread (hashlib lets go of the GIL for a row's bytes) while the
    next is read and normalised: two float32 blocks take turns."""
    n, k, dim = last - first, len(sets), sets[0].shape[1]
    out = np.empty((n, k, dim), dtype)
    norms = np.empty((n, k), np.float32)
    step = max(1, _BLOCK_BYTES // (4 * k * dim))
    blocks = [np.empty((step, k, dim), np.float32) for _ in range(2)]
    squares = np.empty((step * k, dim), np.float32)
    half = all(np.dtype(values.dtype) == np.float16 for values in sets)
    raw = np.empty((step, k, dim), np.float16) if half else None
    hashed: list[Future[list[bytes]]] = []
    with ThreadPoolExecutor(1, thread_name_prefix="import-hash") as hasher:
        for b, start in enumerate(range(0, n, step)):
            if b >= 2:
                hashed[b - 2].result()  # that block's rows are hashed: its array is free
            end = min(n, start + step)
            rows = blocks[b % 2][:end - start]
            stored = rows if raw is None else raw[:end - start]
            for j, values in enumerate(sets):
                stored[:, j] = values[first + start:first + end]
            flat = rows.reshape(-1, dim)
            if half:
                cast_into(rows, stored)
            block_norms = _normalise_in_place(flat, squares)
            exact = not np.isfinite(block_norms).all()
            if exact and half:  # NaN payloads: numpy's cast, then the same normalising
                np.copyto(rows, stored)
                block_norms = _normalise_in_place(flat, squares)
            norms[start:end] = block_norms.reshape(-1, k)
            hashed.append(hasher.submit(_vector_digests, modality, flat))
            (np.copyto if exact else cast_into)(out[start:end], rows)
        hashes, keys = hex_keys([digest for future in hashed for digest in future.result()])
    return _Units(out.reshape(n * k, dim), norms.reshape(-1), hashes, keys)


def _h5_chunk(config: ImportConfig, path: Path, start: int, images: _Units, texts: _Units,
              now: datetime, done: tuple[Unit, int] | None) -> _Chunk:
    """Rows start… of one file: each row a real image, four generated ones, a caption and a prompt."""
    n = len(images.vectors) // 5
    text_hashes = texts.hashes
    groups = [f"h5:{path.stem}:{i}" for i in range(start, start + n)]
    splits = [assign_split(g, config.split_fractions, config.split_seed) for g in groups]
    # the real image reads the caption (text 0), the four generated images their prompt (text 1)
    which_text = np.tile([0, 1, 1, 1, 1], n) + 2 * np.repeat(np.arange(n), 5)
    given = ["real"] + [_name(config.generators, k) for k in range(4)]
    per_row, per_image = np.repeat(np.arange(n), 5), np.tile(np.arange(5), n)  # sample → its row, its set
    samples = from_columns(SAMPLES, {  # repeated values are taken from short arrays, not built per sample
        "sample_id": images.hashes, "label": np.tile(np.array([0, 1, 1, 1, 1], np.int8), n),
        "generator": pa.array([canonical(g) for g in given]).take(per_image),
        "generator_original": pa.array(given).take(per_image),
        "split": pa.array(splits).take(per_row), "group_key": pa.array(groups).take(per_row),
        "text_hash": text_hashes.take(pa.array(which_text)), "source_format": _repeated("features:h5", 5 * n),
        "source_uri": _repeated(str(path.resolve()), 5 * n), "source_member": pa.array(_IMAGE_SETS).take(per_image),
        "source_row": start + per_row.astype(np.int64),
        "ingested_at": _repeated(now, 5 * n, SAMPLES.field("ingested_at").type),
    })
    return _Chunk(samples, images.vectors, images.norms, images.keys, text_hashes, texts.keys, texts.vectors,
                  texts.norms, done)


# --- clip-retrieval output -----------------------------------------------------------------


def _clip_retrieval_units(config: ImportConfig) -> list[Unit]:
    """One unit per shard i: its metadata Parquet (footer fingerprint), with the sizes and times
    of its two .npy files as the unit's `extra` (either changing means read it again)."""
    root = config.source
    img_files = sorted((root / "img_emb").glob("*.npy"), key=_index)
    if not img_files:
        raise PipelineError(f"{root} has no img_emb/*.npy: not a clip-retrieval output folder.")
    units = []
    for img_file in img_files:
        i = _index(img_file)
        meta_file = root / "metadata" / f"metadata_{i}.parquet"
        text_file = root / "text_emb" / f"text_emb_{i}.npy"
        if not meta_file.exists() or not text_file.exists():
            raise PipelineError(f"{img_file.name} has no matching {meta_file.name} and {text_file.name}.")
        stats = [(p.stat().st_size, p.stat().st_mtime_ns) for p in (img_file, text_file)]
        units.append(stat_unit(meta_file, parquet_fingerprint(meta_file), json.dumps(stats),
                               payload=(i, img_file, text_file)))
    return units


def _clip_retrieval_slices(config: ImportConfig, unit: Unit, now: datetime) -> Iterator[_Chunk]:
    i, img_file, text_file = unit.payload
    meta_file = unit.path
    img_v = np.load(img_file, mmap_mode="r")  # mapped: read a slice at a time
    txt_v = np.load(text_file, mmap_mode="r")
    meta = pq.ParquetFile(meta_file)
    rows = meta.metadata.num_rows
    if not (rows == len(img_v) == len(txt_v)):
        raise PipelineError(f"Shard {i}: {rows} metadata rows, {len(img_v)} image and "
                            f"{len(txt_v)} text vectors; they must match.")
    if rows == 0:
        yield _empty_chunk((unit, 0))
    start = 0
    for batch in meta.iter_batches(batch_size=SLICE_ROWS):
        end = start + batch.num_rows
        yield _clip_retrieval_chunk(config, meta_file, batch.to_pylist(), start,
                                    np.array(img_v[start:end]), np.array(txt_v[start:end]),
                                    now, (unit, rows) if end == rows else None)
        start = end


def _clip_retrieval_chunk(config: ImportConfig, meta_file: Path, meta: list[dict[str, Any]], start: int,
                          img_v: np.ndarray, txt_v: np.ndarray, now: datetime,
                          done: tuple[Unit, int] | None) -> _Chunk:
    root = config.source
    (img_v, img_norms, img_exact), (txt_v, txt_norms, txt_exact) = _unit_vectors(img_v), _unit_vectors(txt_v)
    samples: list[dict[str, Any]] = []
    img_h, txt_h = [], []
    paths = [_image_path(root, row) for row in meta]
    need_image_hash = [k for k, p in enumerate(paths) if p is None]
    need_text_hash = [k for k, row in enumerate(meta) if not row.get("caption")]
    image_by_vector = dict(zip(need_image_hash, _vector_hashes("image", img_v[need_image_hash]), strict=True))
    text_by_vector = dict(zip(need_text_hash, _vector_hashes("text", txt_v[need_text_hash]), strict=True))
    for k, (row, readable) in enumerate(zip(meta, paths, strict=True)):
        label, generator = _label(row, config.generator, meta_file)
        ih = hashlib.sha256(readable.read_bytes()).hexdigest() if readable else image_by_vector[k]
        caption = row.get("caption")
        th = text_hash(caption) if caption else text_by_vector[k]
        group = f"image:{ih}"
        split = assign_split(group, config.split_fractions, config.split_seed)
        fmt = "clip-retrieval" if readable else "features:clip-retrieval"
        uri = str(readable.resolve()) if readable else str(meta_file.resolve())
        samples.append(_sample(ih, label, generator, split, group, caption, th, fmt, uri,
                               None if readable else "image_path", None if readable else start + k, now))
        img_h.append(ih)
        txt_h.append(th)
    text_hashes = pa.array(txt_h, pa.string())
    image_keys = keys_of(pa.array(img_h, pa.string()))
    return _Chunk(from_rows(SAMPLES, samples), _as_stored(img_v, config.dtype, img_exact), img_norms, image_keys,
                  text_hashes, keys_of(text_hashes), _as_stored(txt_v, config.dtype, txt_exact), txt_norms, done)


def _image_path(root: Path, row: dict[str, Any]) -> Path | None:
    """The row's image file when it can be read (its bytes give the sample id), else None."""
    if not row.get("image_path"):
        return None
    path = Path(row["image_path"])
    path = path if path.is_absolute() else root / path
    return path if path.is_file() else None


def _label(row: dict[str, Any], generator: str | None, where: Path) -> tuple[int, str]:
    if row.get("label") is not None:
        label = parse_label(row["label"], str(where))
        return label, row.get("generator") or ("real" if label == 0 else "generated")
    if generator is None:
        raise PipelineError(f"{where} has no label column: give --generator NAME (or 'real').")
    return (0 if generator.lower() == "real" else 1), generator


# --- shared --------------------------------------------------------------------------------


def _sample(sample_id: str, label: int, generator: str, split: str, group: str, text: str | None,
            t_hash: str, fmt: str, uri: str, member: str | None, row: int | None, now: datetime) -> dict[str, Any]:
    return {
        "sample_id": sample_id, "label": label, "generator": canonical(generator), "generator_original": generator,
        "split": split,
        "group_key": group, "text": text, "text_hash": t_hash, "source_format": fmt,
        "source_uri": uri, "source_member": member, "source_row": row,
        "byte_offset": None, "byte_length": None, "ingested_at": now,
    }


def _normalise_in_place(vectors: np.ndarray, squares: np.ndarray | None = None) -> np.ndarray:
    """Scale float32 rows to unit length where they lie (as `normalise` does, to the bit: the vector
    hashes of earlier imports must come out the same); returns the norms they had. The norms are
    `np.linalg.norm`'s own steps (square, `add.reduce` along the row, square root), with the squares
    in `squares` (at least as many rows) when given, not in a fresh array."""
    if squares is not None:
        squares = squares[:len(vectors)]
    squares = np.multiply(vectors, vectors, out=squares)
    norms = np.sqrt(np.add.reduce(squares, axis=1))
    vectors /= np.maximum(norms, 1e-12)[:, None]
    return norms


def _unit_vectors(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """float32 unit rows of `values` (read as stored), their norms, and whether numpy cast them
    (a norm that is not finite: see `_unit_rows`)."""
    vectors = np.empty(values.shape, np.float32)
    cast_into(vectors, values)
    norms = _normalise_in_place(vectors)
    if np.isfinite(norms).all():
        return vectors, norms, False
    np.copyto(vectors, values)
    return vectors, _normalise_in_place(vectors), True


def _as_stored(vectors: np.ndarray, dtype: str, exact: bool) -> np.ndarray:
    out = np.empty(vectors.shape, dtype)
    (np.copyto if exact else cast_into)(out, vectors)
    return out


def _vector_hashes(modality: str, units: np.ndarray) -> list[str]:
    """`vector_hash` of each row of already normalised float32 vectors."""
    return [digest.hex() for digest in _vector_digests(modality, units)]


def _vector_digests(modality: str, units: np.ndarray) -> list[bytes]:
    """The SHA-256 digests behind `_vector_hashes`."""
    prefix = hashlib.sha256(modality.encode() + b"\x00")
    out = []
    for row in np.ascontiguousarray(units, "<f4"):
        digest = prefix.copy()
        digest.update(row)
        out.append(digest.digest())
    return out


def _empty_chunk(done: tuple[Unit, int]) -> _Chunk:
    nothing, none = np.empty((0, 0), np.float32), np.empty(0, np.float32)
    no_keys = keys_of(pa.array([], pa.string()))
    return _Chunk(SAMPLES.empty_table(), nothing, none, no_keys, pa.array([], pa.string()), no_keys, nothing, none,
                  done)


def _check_dims(store: Store, key: str, chunk: _Chunk, seen: tuple[int, int] | None) -> tuple[int, int]:
    """Image and text vectors may differ in size, but each must keep one size per model key."""
    dims = (chunk.image_vectors.shape[1], chunk.text_vectors.shape[1])
    info = store.model_info(key)
    recorded = (info.get("dim"), info.get("text_dim", info.get("dim"))) if info else None
    for before in (seen, recorded):
        if before is not None and tuple(before) != dims:
            raise PipelineError(
                f"These features are {dims[0]}-d (image) and {dims[1]}-d (text), but {key} already holds "
                f"{before[0]}-d and {before[1]}-d vectors; import them under another --model-key.")
    return dims


def _name(names: tuple[str, ...], k: int) -> str:
    return names[k] if k < len(names) else f"gen{k}"


def _index(path: Path) -> int:
    match = re.search(r"(\d+)$", path.stem)
    return int(match.group(1)) if match else 0


def _record_model(store: Store, key: str, dims: tuple[int, int], config: ImportConfig) -> None:
    info = {
        "model_key": key, "imported": True, "layout": config.layout, "source": str(config.source),
        "random_weights": None, "dim": dims[0], "text_dim": dims[1], "dtype": config.dtype,
        "normalised_on_import": True, "norms_kept": True,
    }
    store.record_model(key, info)
