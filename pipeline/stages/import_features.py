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
import pyarrow.parquet as pq

from pipeline.config import Validated
from pipeline.errors import PipelineError
from pipeline.features.vectors import normalise
from pipeline.reporting import Reporter, Silent
from pipeline.sources.d3 import DEFAULT_GENERATORS
from pipeline.sources.webdataset import parse_label
from pipeline.stages.encode import embeddings_table
from pipeline.stages.ingest import assign_split, text_hash
from pipeline.store import catalog
from pipeline.store.atomic import write_parquet
from pipeline.store.layout import Store, safe_name
from pipeline.store.lock import writing
from schemas import SAMPLES, from_rows

Layout = Literal["h5", "clip-retrieval"]
LAYOUTS: tuple[str, ...] = get_args(Layout)


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
    """One source file's worth of rows: sample rows plus the vectors they point at."""

    samples: list[dict[str, Any]]
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
    key = safe_name(config.model_key)
    store = config.store
    have_samples = set(_column(store, "SELECT sample_id FROM samples"))
    have_vectors = set(
        _column(store, "SELECT modality || ':' || content_hash FROM embeddings WHERE model_key = ?", [key])
    )
    chunks = _h5_chunks(config) if config.layout == "h5" else _clip_retrieval_chunks(config)
    result = ImportResult(key)
    dim = None
    for chunk in chunks:
        dim = chunk.image_vectors.shape[1]
        written = []
        new_samples = [s for s in chunk.samples if s["sample_id"] not in have_samples]
        result.already_present += len(chunk.samples) - len(new_samples)
        have_samples.update(s["sample_id"] for s in new_samples)
        for modality, hashes, vectors in (
            ("image", chunk.image_hashes, chunk.image_vectors),
            ("text", chunk.text_hashes, chunk.text_vectors),
        ):
            keep = _first_new(hashes, modality, have_vectors)
            if keep:
                table = embeddings_table(
                    key, modality, [hashes[i] for i in keep], normalise(vectors[keep]), config.dtype
                )
                written.append(write_parquet(table, store.new_shard(store.embeddings_dir(key), modality)))
                result.vectors_added += len(keep)
        if new_samples:
            table = from_rows(SAMPLES, new_samples)
            written.append(write_parquet(table, store.new_shard(store.dataset_dir("samples"), "imported")))
            result.samples_added += len(new_samples)
        catalog.commit(store, written)
        result.shards.extend(written)
    if dim is not None:
        _record_model(store, key, dim, config)
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
            data = {name: np.asarray(f[name], dtype=np.float32) for name in f}
        n = data["real"].shape[0]
        samples, img_h, img_v, txt_h, txt_v = [], [], [], [], []
        for i in range(n):
            group = f"h5:{path.stem}:{i}"
            split = assign_split(group, config.split_fractions, config.split_seed)
            for k, name in enumerate(image_sets):
                vec = data[name][i]
                text_vec = data["original_prompt" if k == 0 else "positive_prompt"][i]
                ih, th = vector_hash("image", vec), vector_hash("text", text_vec)
                label = 0 if k == 0 else 1
                generator = "real" if k == 0 else _name(config.generators, k - 1)
                samples.append(_sample(ih, label, generator, split, group, None, th,
                                       "features:h5", str(path.resolve()), name, i, now))
                img_h.append(ih)
                img_v.append(vec)
                txt_h.append(th)
                txt_v.append(text_vec)
        yield _Chunk(samples, img_h, np.stack(img_v), txt_h, np.stack(txt_v))


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
        yield _Chunk(samples, img_h, img_v, txt_h, txt_v)


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
        "sample_id": sample_id, "label": label, "generator": generator, "split": split,
        "group_key": group, "text": text, "text_hash": t_hash, "source_format": fmt,
        "source_uri": uri, "source_member": member, "source_row": row,
        "byte_offset": None, "byte_length": None, "ingested_at": now,
    }


def _first_new(hashes: list[str], modality: str, have: set[str]) -> list[int]:
    keep = []
    for i, h in enumerate(hashes):
        tagged = f"{modality}:{h}"
        if tagged not in have:
            have.add(tagged)
            keep.append(i)
    return keep


def _name(names: tuple[str, ...], k: int) -> str:
    return names[k] if k < len(names) else f"gen{k}"


def _index(path: Path) -> int:
    match = re.search(r"(\d+)$", path.stem)
    return int(match.group(1)) if match else 0


def _column(store: Store, sql: str, params: list[object] | None = None) -> list[Any]:
    return catalog.query(store, sql, params).column(0).to_pylist()


def _record_model(store: Store, key: str, dim: int, config: ImportConfig) -> None:
    info = {
        "model_key": key, "imported": True, "layout": config.layout, "source": str(config.source),
        "random_weights": None, "dim": dim, "dtype": config.dtype, "normalised_on_import": True,
    }
    store.record_model(key, info)
