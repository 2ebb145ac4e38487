"""`pipeline import-features`: bring precomputed CLIP features in without re-encoding.

- `h5`: the reference code's layout, `NNNN.h5` files with datasets `real`, `image_gen0..3`,
  `original_prompt`, `positive_prompt` (row i of each is one D3 row). No image bytes or texts
  exist, so content hashes are hashes of the vectors themselves; the samples are features-only.
- `clip-retrieval`: `img_emb/*.npy`, `text_emb/*.npy`, `metadata/*.parquet` (aligned by file
  index and row). Where `image_path` is readable the sample id is the image's SHA-256 (so a later
  ingest of the same image matches) and the sample stays encodable by other models.

Vectors are L2-normalised on import, as `encode` stores them. Re-importing adds nothing.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import Validated
from pipeline.errors import PipelineError
from pipeline.features.vectors import normalise
from pipeline.reporting import Reporter, Silent
from pipeline.sources.d3 import DEFAULT_GENERATORS
from pipeline.sources.generators import canonical
from pipeline.sources.webdataset import parse_label
from pipeline.stages.encode import embeddings_table
from pipeline.stages.ingest import assign_split, text_hash
from pipeline.store import catalog
from pipeline.store.atomic import write_parquet
from pipeline.store.layout import Store, safe_name
from pipeline.store.lock import writing
from schemas import SAMPLES, from_columns, from_rows

Layout = Literal["h5", "clip-retrieval"]
LAYOUTS: tuple[str, ...] = get_args(Layout)
H5_ROWS = 8192  # reference rows (5 images, 2 texts each) read, hashed and written at a time


@dataclass(frozen=True)
class ImportConfig(Validated):
    source: Path
    layout: Layout
    store: Store
    model_key: str  # names the model that produced the features, e.g. ViT-L-14__openai__imported
    generators: tuple[str, ...] = DEFAULT_GENERATORS
    generator: str | None = None  # clip-retrieval: the whole source's generator ('real' → label 0)
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    split_seed: str = "0"
    dtype: Literal["float16", "float32"] = "float16"
    wait: bool = True

    def check(self) -> None:
        if not self.source.exists():
            raise PipelineError(f"Source {self.source} does not exist.")


@dataclass
class ImportResult:
    model_key: str
    samples_added: int = 0
    vectors_added: int = 0
    already_present: int = 0
    shards: list[Path] = field(default_factory=list)


@dataclass
class _Chunk:
    """One source file's worth of rows: sample rows plus the (raw) vectors they point at."""

    samples: pa.Table  # schema SAMPLES
    image_hashes: list[str]
    image_vectors: np.ndarray
    text_hashes: list[str]
    text_vectors: np.ndarray


def run(config: ImportConfig, reporter: Reporter | None = None) -> ImportResult:
    """Add the source's samples and vectors the store lacks, one shard set per source file."""
    reporter = reporter or Silent()
    with writing(config.store, reporter, config.wait):
        return _import(config, reporter)


def _import(config: ImportConfig, reporter: Reporter) -> ImportResult:
    """One source file at a time: what the store already holds is found by a DuckDB semi-join of the
    file's ids against the committed shards (no set of every id in memory); new rows become one
    shard per table, committed before the next file is read."""
    key = safe_name(config.model_key)
    store = config.store
    chunks = _h5_chunks(config) if config.layout == "h5" else _clip_retrieval_chunks(config)
    result = ImportResult(key)
    reporter.start("import", None, "samples")
    dims: tuple[int, int] | None = None
    for chunk in chunks:
        dims = _check_dims(store, key, chunk, dims)
        written = []
        ids = chunk.samples.column("sample_id")
        known = _present(store, "SELECT sample_id FROM samples", ids)
        fresh = np.asarray(pc.invert(pc.is_in(ids, value_set=known)))
        fresh &= _first_occurrence(ids.to_numpy(zero_copy_only=False))
        result.already_present += int(len(fresh) - fresh.sum())
        for modality, hashes, vectors in (
            ("image", chunk.image_hashes, chunk.image_vectors),
            ("text", chunk.text_hashes, chunk.text_vectors),
        ):
            keep = _new_vectors(store, key, modality, hashes)
            if len(keep):
                raw = vectors[keep]
                table = embeddings_table(key, modality, [hashes[i] for i in keep], normalise(raw), config.dtype,
                                         np.linalg.norm(raw, axis=1))
                written.append(write_parquet(table, store.new_shard(store.embeddings_dir(key), modality)))
                result.vectors_added += len(keep)
        if fresh.any():
            written.append(write_parquet(chunk.samples.filter(pa.array(fresh)),
                                         store.new_shard(store.dataset_dir("samples"), "imported")))
            result.samples_added += int(fresh.sum())
        catalog.commit(store, written)
        result.shards.extend(written)
        reporter.advance("import", chunk.samples.num_rows)
    if dims is not None:
        _record_model(store, key, dims, config)
    return result


def vector_hash(modality: str, vector: np.ndarray) -> str:
    """Content hash of a vector with no image or text behind it (float32 bytes, L2-normalised)."""
    unit = normalise(vector[None, :])[0].astype("<f4")
    return hashlib.sha256(modality.encode() + b"\x00" + unit.tobytes()).hexdigest()


# --- the reference code's HDF5 files -------------------------------------------------------


def _h5_chunks(config: ImportConfig) -> Iterator[_Chunk]:
    try:
        import h5py
    except ImportError as exc:
        raise PipelineError(
            "Importing HDF5 features needs h5py: pip install 'clipdetect-pipeline[h5]'."
        ) from exc
    files = [config.source] if config.source.is_file() else sorted(config.source.glob("*.h5"))
    if not files:
        raise PipelineError(f"{config.source} holds no .h5 files.")
    image_sets = ["real"] + [f"image_gen{k}" for k in range(4)]
    now = datetime.now(UTC)
    for path in files:
        with h5py.File(path, "r") as f:
            missing = [d for d in image_sets + ["original_prompt", "positive_prompt"] if d not in f]
            if missing:
                raise PipelineError(f"{path} lacks the dataset(s) {', '.join(missing)}.")
            rows = f["real"].shape[0]
            for start in range(0, rows, H5_ROWS):  # slices, so memory is one slice whatever the file's size
                end = min(rows, start + H5_ROWS)
                images = np.stack([np.asarray(f[name][start:end], np.float32) for name in image_sets],
                                  axis=1)  # [n, 5, d]
                texts = np.stack([np.asarray(f[name][start:end], np.float32)
                                  for name in ("original_prompt", "positive_prompt")], axis=1)  # [n, 2, d]
                yield _h5_chunk(config, path, start, images, texts, image_sets, now)


def _h5_chunk(config: ImportConfig, path: Path, start: int, images: np.ndarray, texts: np.ndarray,
              image_sets: list[str], now: datetime) -> _Chunk:
    """Rows start… of one file: each row a real image, four generated ones, a caption and a prompt."""
    n = images.shape[0]
    image_hashes = _vector_hashes("image", images.reshape(n * 5, -1))
    text_hashes = _vector_hashes("text", texts.reshape(n * 2, -1))
    groups = [f"h5:{path.stem}:{i}" for i in range(start, start + n)]
    splits = [assign_split(g, config.split_fractions, config.split_seed) for g in groups]
    # the real image reads the caption (text 0), the four generated images their prompt (text 1)
    which_text = np.tile([0, 1, 1, 1, 1], n) + 2 * np.repeat(np.arange(n), 5)
    given = ["real"] + [_name(config.generators, k) for k in range(4)]
    samples = from_columns(SAMPLES, {
        "sample_id": image_hashes, "label": np.tile(np.array([0, 1, 1, 1, 1], np.int8), n),
        "generator": [canonical(g) for g in given] * n, "generator_original": given * n,
        "split": np.repeat(splits, 5), "group_key": np.repeat(groups, 5),
        "text_hash": [text_hashes[i] for i in which_text], "source_format": ["features:h5"] * (5 * n),
        "source_uri": [str(path.resolve())] * (5 * n), "source_member": image_sets * n,
        "source_row": np.repeat(np.arange(start, start + n, dtype=np.int64), 5),
        "ingested_at": pa.array([now] * (5 * n), SAMPLES.field("ingested_at").type),
    })
    return _Chunk(samples, image_hashes, images.reshape(n * 5, -1), text_hashes, texts.reshape(n * 2, -1))


# --- clip-retrieval output -----------------------------------------------------------------


def _clip_retrieval_chunks(config: ImportConfig) -> Iterator[_Chunk]:
    root = config.source
    img_files = sorted((root / "img_emb").glob("*.npy"), key=_index)
    if not img_files:
        raise PipelineError(f"{root} has no img_emb/*.npy: not a clip-retrieval output folder.")
    now = datetime.now(UTC)
    for img_file in img_files:
        i = _index(img_file)
        meta_file = root / "metadata" / f"metadata_{i}.parquet"
        text_file = root / "text_emb" / f"text_emb_{i}.npy"
        if not meta_file.exists() or not text_file.exists():
            raise PipelineError(f"{img_file.name} has no matching {meta_file.name} and {text_file.name}.")
        img_v = np.load(img_file).astype(np.float32)
        txt_v = np.load(text_file).astype(np.float32)
        meta = pq.read_table(meta_file).to_pylist()
        if not (len(meta) == len(img_v) == len(txt_v)):
            raise PipelineError(f"Shard {i}: {len(meta)} metadata rows, {len(img_v)} image and "
                                f"{len(txt_v)} text vectors; they must match.")
        samples: list[dict[str, Any]] = []
        img_h, txt_h = [], []
        for row, ivec, tvec in zip(meta, img_v, txt_v, strict=True):
            label, generator = _label(row, config.generator, meta_file)
            image_path = Path(row["image_path"]) if row.get("image_path") else None
            if image_path is not None and not image_path.is_absolute():
                image_path = root / image_path
            readable = image_path if image_path is not None and image_path.is_file() else None
            ih = hashlib.sha256(readable.read_bytes()).hexdigest() if readable else vector_hash("image", ivec)
            caption = row.get("caption")
            th = text_hash(caption) if caption else vector_hash("text", tvec)
            group = f"image:{ih}"
            split = assign_split(group, config.split_fractions, config.split_seed)
            fmt = "clip-retrieval" if readable else "features:clip-retrieval"
            uri = str(readable.resolve()) if readable else str(meta_file.resolve())
            samples.append(_sample(ih, label, generator, split, group, caption, th, fmt, uri,
                                   None if readable else "image_path", None if readable else len(samples), now))
            img_h.append(ih)
            txt_h.append(th)
        yield _Chunk(from_rows(SAMPLES, samples), img_h, img_v, txt_h, txt_v)


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


def _vector_hashes(modality: str, vectors: np.ndarray) -> list[str]:
    """`vector_hash` of each row, normalising them all at once."""
    prefix = modality.encode() + b"\x00"
    units = np.ascontiguousarray(normalise(vectors), "<f4")
    return [hashlib.sha256(prefix + row.tobytes()).hexdigest() for row in units]


def _present(store: Store, sql: str, ids: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Which of `ids` the query's single column already holds (DuckDB scans the shards; ids are the small side)."""
    found = catalog.query_with(store, f"SELECT DISTINCT h FROM ids WHERE h IN ({sql})", {"ids": pa.table({"h": ids})})
    return found.column(0).combine_chunks() if found.num_rows else pa.array([], pa.string())


def _new_vectors(store: Store, key: str, modality: str, hashes: list[str]) -> np.ndarray:
    """Rows of `hashes` whose vector the store lacks, each distinct hash once."""
    ids = pa.array(hashes, pa.string())
    sql = f"SELECT content_hash FROM embeddings WHERE model_key = '{key}' AND modality = '{modality}'"
    if not any(s.model_key == key for s in catalog.read_manifest(store).of("embeddings")):
        sql = "SELECT NULL::VARCHAR WHERE false"  # a new model key: nothing to look up
    known = _present(store, sql, ids)
    fresh = np.asarray(pc.invert(pc.is_in(ids, value_set=known))) & _first_occurrence(np.asarray(hashes, object))
    return np.nonzero(fresh)[0]


def _first_occurrence(values: np.ndarray) -> np.ndarray:
    first = np.zeros(len(values), bool)
    if len(values):
        first[np.unique(values, return_index=True)[1]] = True
    return first


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
