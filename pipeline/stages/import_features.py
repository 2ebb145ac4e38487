"""`pipeline import-features`: bring precomputed CLIP features in without re-encoding.

- `h5`: the reference code's layout, `NNNN.h5` files with datasets `real`, `image_gen0..3`,
  `original_prompt`, `positive_prompt` (row i of each is one D3 row). No image bytes or texts
  exist, so content hashes are hashes of the vectors themselves; the samples are features-only.
- `clip-retrieval`: `img_emb/*.npy`, `text_emb/*.npy`, `metadata/*.parquet` (aligned by file
  index and row). Where `image_path` is readable the sample id is the image's SHA-256 (so a later
  ingest of the same image matches) and the sample stays encodable by other models.

What a features file says is checked, not trusted:
- `image_path` is read only through `pipeline.sources.reading` (a regular file, at most
  `max_bytes`, a FIFO never blocks), and only inside the imported folder or a folder the user names
  (`image_roots`, `--images DIR`), symlinks resolved: a downloaded features file must not make the
  tool read any file of the machine (`/etc/shadow`) into the store. A path it may not or cannot
  read leaves the row a features-only sample, counted by reason (`image_paths_unread`).
- A vector that is not finite (NaN, an infinity, or a norm past float32) or has no length (norm
  below 1e-12) is quarantined (`nonfinite_vector`, `zero_vector`, stage `import`), never stored:
  a bad image vector keeps its sample out, a bad text vector leaves its samples without text. The
  test is on the norms the normalising pass computes anyway: no second pass over the vectors.
- The same content under both labels is quarantined as `label_conflict`, as ingest does (and with
  its rows, which keep the label claimed), whether the twin is in the same slice or already in the
  store: a stored sample keeps its label (the `conflicts` view lists the claim until `pipeline
  conflicts resolve`); contents met twice in one slice are stored as neither.
- Arrays that are not 2-D float (a 1-D `.npy`, strings, objects) or do not line up stop the import
  with one sentence naming the file.

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
import os
import re
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, get_args

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.choices import FeatureLayout, VectorDtype
from pipeline.config import Validated, at_least
from pipeline.errors import PipelineError
from pipeline.features.vectors import cast_into, normalise
from pipeline.reporting import Reporter, Silent
from pipeline.sources import reading
from pipeline.sources.common import Unit, parquet_fingerprint, stat_unit
from pipeline.sources.d3 import DEFAULT_GENERATORS
from pipeline.sources.d3_order import OrderCheck
from pipeline.sources.generators import canonical
from pipeline.sources.ledger import (
    PROBLEM_KEY,
    assign_split,
    conflict_row,
    ledger_queries,
    ledger_row,
    text_hash,
    unread,
    where,
)
from pipeline.sources.reading import DEFAULT_MAX_BYTES, Limits, Unreadable
from pipeline.sources.webdataset import parse_label
from pipeline.store import catalog, writes
from pipeline.store.atomic import write_parquet
from pipeline.store.keys import KeyQuery, StoreKeys, first_occurrence, hex_keys, keys_of
from pipeline.store.layout import Store, safe_name
from pipeline.store.writes import writing
from schemas import QUARANTINE, SAMPLES, SOURCES, embeddings_schema, from_columns, from_rows

LAYOUTS: tuple[str, ...] = get_args(FeatureLayout)
SLICE_ROWS = 16384  # source rows (h5: 5 images and 2 texts each) read, hashed and written at a time
_BLOCK_BYTES = 2 << 20  # float32 vectors read, normalised and hashed at a time: the CPU's cache, not fresh pages
_IMAGE_SETS = ("real", "image_gen0", "image_gen1", "image_gen2", "image_gen3")
_TEXT_SETS = ("original_prompt", "positive_prompt")
MIN_NORM = 1e-12  # `normalise` divides by at least this: a shorter vector cannot be made unit length
STAGE = "import"  # quarantine's stage of what this stage refuses
_LABELLED = "concat_ws(chr(0), sample_id, label::VARCHAR)"  # the key of a sample id under one label
# A vector's fault, as quarantined (0: none)
_FAULTS = {1: ("nonfinite_vector", "holds NaN or infinite values (or its norm overflows float32)"),
           2: ("zero_vector", f"is all zeros (its norm is below {MIN_NORM:g}): it has no direction")}


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
    max_bytes: int = DEFAULT_MAX_BYTES  # clip-retrieval: the largest image file read for its hash
    image_roots: tuple[Path, ...] = ()  # clip-retrieval: folders besides the source that image_path may name

    def check(self) -> None:
        if not self.source.exists():
            raise PipelineError(f"Source {self.source} does not exist.")
        at_least(self, "max_bytes", 1)
        for root in self.image_roots:
            if not root.is_dir():
                raise PipelineError(f"--images {root} is not a folder.")

    def image_limits(self) -> Limits:
        """What an `image_path` may lead to: files inside the source folder or `image_roots`."""
        source = self.source if self.source.is_dir() else self.source.parent
        return Limits.within([source, *self.image_roots], self.max_bytes)


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
    quarantined: Counter[str] = field(default_factory=Counter)  # rows newly quarantined, by reason
    label_conflicts: int = 0  # distinct contents found under both labels
    image_paths_unread: Counter[str] = field(default_factory=Counter)  # clip-retrieval, by reading's reason


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
    image_ok: np.ndarray | None = None  # rows whose image vector is sound (None: all)
    text_ok: np.ndarray | None = None  # text rows whose vector is sound (None: all)
    problems: list[dict[str, Any]] = field(default_factory=list)  # quarantine rows of the unsound ones
    sample_text: np.ndarray | None = None  # sample i's row of the texts (None: row i)


def run(config: ImportConfig, reporter: Reporter | None = None) -> ImportResult:
    """Add the source's samples and vectors the store lacks, one shard set per slice of a file."""
    reporter = reporter or Silent()
    with writing(config.store, reporter, config.wait, create=True):
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
        "problems": KeyQuery("quarantine", PROBLEM_KEY, f"stage = '{STAGE}'"),  # opened only if a slice has some
        "labelled": KeyQuery("samples", _LABELLED),  # opened only if a slice holds stored ids; covers what it scanned
    }, maintained=("samples", "image", "text", "problems")) as known, _Writer(store) as writer:
        todo = unread(units, known)
        result.units_skipped = len(units) - len(todo)
        for unit in todo:
            _check_unit(config, unit)
        if todo and config.layout == "h5":  # image_gen0..3 named by --generators: checked before a write
            result.generator_warnings = OrderCheck(store, "h5", config.generators).tell(reporter)
        if todo:
            reporter.start("import", None, "samples")
        for unit in todo:
            chunks = (_h5_slices(config, unit, now) if config.layout == "h5"
                      else _clip_retrieval_slices(config, unit, now, result.image_paths_unread))
            for chunk in chunks:
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
    """Write the slice's new samples and vectors, the quarantine rows of what it holds that is unsound
    or labelled both ways (and, for a file's last slice, its ledger row) and commit them at once (in
    the writer's thread), so a kill leaves the file to be read again, never half recorded."""
    store = config.store
    tables: list[tuple[pa.Table, Path]] = []
    problems = list(chunk.problems)
    n = chunk.samples.num_rows
    if n:
        ids = chunk.sample_keys
        stored = known.get("samples").contains(ids)
        usable = np.ones(n, bool) if chunk.image_ok is None else chunk.image_ok
        first = _first_of(ids, usable)
        conflicted, conflicts = _label_conflicts(store, chunk.samples, ids, usable, first, stored, known, writer, now)
        if conflicts:
            problems += conflicts
            usable = usable & ~conflicted
            first = _first_of(ids, usable)
        fresh = first & ~stored
        result.already_present += int(usable.sum() - fresh.sum())
        # a vector is kept only for a sample of the store (status counts on it): not for a sample left out
        for modality, hashes, keys, vectors, norms, ok in (
            ("image", chunk.samples.column("sample_id"), ids, chunk.image_vectors, chunk.image_norms, usable),
            ("text", chunk.text_hashes, chunk.text_keys, chunk.text_vectors, chunk.text_norms,
             _texts_used(chunk, usable)),
        ):
            keep = _first_of(keys, ok) & ~known.get(modality).contains(keys)
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
    if problems:
        new = _new_problems(problems, known)
        if new is not None:
            tables.append((new, store.new_shard(store.dataset_dir("quarantine"), "imported")))
            result.quarantined.update(new.column("reason").to_pylist())
            conflicts = new.filter(pc.equal(new.column("reason"), "label_conflict"))
            result.label_conflicts += len(set(conflicts.column("content_hash").to_pylist()))
    if chunk.done is not None:
        unit, items = chunk.done
        tables.append((from_rows(SOURCES, [ledger_row(unit, digest, items, now)]),
                       store.new_shard(store.dataset_dir("sources"), "imported")))
    if tables:
        writer.submit(tables)
    result.shards.extend(path for _, path in tables if path.parent.name not in ("sources", "quarantine"))


def _texts_used(chunk: _Chunk, usable: np.ndarray) -> np.ndarray | None:
    """Which text rows are sound and read by a usable sample (None: all of them)."""
    if usable.all():
        return chunk.text_ok  # every text row is some sample's
    used = np.zeros(len(chunk.text_keys), bool)
    used[usable.nonzero()[0] if chunk.sample_text is None else chunk.sample_text[usable]] = True
    return used if chunk.text_ok is None else used & chunk.text_ok


def _first_of(keys: np.ndarray, ok: np.ndarray | None) -> np.ndarray:
    """Which entries are the first of their key among the `ok` ones (None: all are)."""
    if ok is None or ok.all():
        return first_occurrence(keys)
    first = np.zeros(len(keys), bool)
    rows = np.flatnonzero(ok)
    first[rows] = first_occurrence(keys[rows])
    return first


def _label_conflicts(store: Store, samples: pa.Table, ids: np.ndarray, usable: np.ndarray, first: np.ndarray,
                     stored: np.ndarray, known: StoreKeys, writer: _Writer,
                     now: datetime) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Which usable rows hold content that is also labelled the other way, in this slice or in the store
    (this run's earlier slices included), and their quarantine rows, as ingest writes them. `first`:
    which usable rows are the first of their id. Costs nothing when no id repeats in the slice and
    none is stored (the first import of new features); a stored id is looked up in the key set of
    (id, label) pairs, and only one not found there (a conflict, or a row of this run) in the store."""
    conflicted = np.zeros(len(ids), bool)
    rows: list[dict[str, Any]] = []
    repeated = usable & ~first
    if repeated.any():  # the same content twice in a slice: rare, so looked at row by row
        groups: dict[bytes, list[int]] = {}
        for i in np.flatnonzero(usable & np.isin(ids, ids[repeated])):
            groups.setdefault(ids[i].tobytes(), []).append(int(i))
        for members in groups.values():
            found = samples.take(pa.array(members)).to_pylist()
            if len({r["label"] for r in found}) < 2:
                continue
            conflicted[members] = True
            for row in found:
                other = next(o for o in found if o["label"] != row["label"])
                rows.append(conflict_row(row, where(other["source_uri"], other["source_member"], other["source_row"]),
                                         int(other["label"]), now, STAGE))
    asked = np.flatnonzero(stored & usable & ~conflicted)
    if len(asked):
        pairs = samples.select(["sample_id", "label"]).take(asked)
        asked = asked[~known.get("labelled").contains(keys_of(pairs, _LABELLED))]  # not stored under this label
    if len(asked):
        writer.wait()  # this run's earlier slices are committed, so the query sees them
        table = pa.table({"i": pa.array(asked, pa.int64()), "sample_id": samples.column("sample_id").take(asked),
                          "label": samples.column("label").take(asked)})
        others = catalog.query_with(store, """
            SELECT c.i, any_value(s.label) AS label, any_value(s.source_uri) AS uri,
                   any_value(s.source_member) AS member
            FROM c JOIN samples_all s ON s.sample_id = c.sample_id AND s.label <> c.label
            GROUP BY c.i ORDER BY c.i
        """, {"c": table}).to_pylist()
        for other in others:
            at = int(other["i"])
            conflicted[at] = True
            rows.append(conflict_row(samples.slice(at, 1).to_pylist()[0], where(other["uri"], other["member"], None),
                                     int(other["label"]), now, STAGE))
    return conflicted, rows


def _new_problems(rows: list[dict[str, Any]], known: StoreKeys) -> pa.Table | None:
    """The quarantine rows not recorded before (same reason, same place; a file read again after a
    touch adds none), as a table; their keys join the store's set."""
    table = from_rows(QUARANTINE, rows)
    keys = keys_of(table.select(["reason", "source_uri", "source_member", "source_row"]), PROBLEM_KEY)
    fresh = first_occurrence(keys) & ~known.get("problems").contains(keys)
    if not fresh.any():
        return None
    known.add("problems", keys[fresh])
    return table if fresh.all() else table.filter(pa.array(fresh))


def _faults(norms: np.ndarray) -> np.ndarray | None:
    """Each vector's fault from its norm (0 none, 1 not finite, 2 no length); None when all are sound.
    A NaN or an infinity anywhere in a vector makes its norm so; the test is one pass over the norms."""
    sound = (norms >= MIN_NORM) & (norms <= np.finfo(np.float32).max)  # False for NaN
    if sound.all():
        return None
    faults = np.zeros(len(norms), np.int8)
    faults[~sound] = 1
    faults[np.isfinite(norms) & (norms < MIN_NORM)] = 2
    return faults


def _fault_rows(modality: str, faults: np.ndarray, hashes: pa.Array, place: Any, now: datetime) -> list[dict[str, Any]]:
    """Quarantine rows of the faulty vectors; `place(i)` gives row i's (uri, member, row)."""
    out = []
    for i in np.flatnonzero(faults):
        reason, why = _FAULTS[int(faults[i])]
        uri, member, row = place(int(i))
        out.append({"content_hash": hashes[int(i)].as_py(), "stage": STAGE, "reason": reason,
                    "detail": f"the {modality} vector at {where(uri, member, row)} {why}; it was not imported",
                    "source_uri": uri, "source_member": member, "source_row": row, "recorded_at": now})
    return out


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
    options: dict[str, Any] = {
        "stage": "import-features", "layout": config.layout, "model_key": key,
        "generators": list(config.generators), "generator": config.generator,
        "splits": list(config.split_fractions), "split_seed": config.split_seed, "dtype": config.dtype,
    }
    if config.layout == "clip-retrieval":  # what image_path may read decides sample ids: named only when
        if config.image_roots:             # not the default, so earlier imports keep their digest
            options["image_roots"] = sorted(os.path.realpath(r) for r in config.image_roots)
        if config.max_bytes != DEFAULT_MAX_BYTES:
            options["max_bytes"] = config.max_bytes
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
    for path in files:
        _ensure_regular(path)
    return [stat_unit(path) for path in files]


def _open_h5(path: Path) -> Any:
    """The HDF5 file, open, once its datasets are known to be the reference layout's."""
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise PipelineError(f"{path} is not a readable HDF5 file ({exc}).") from exc
    try:
        missing = [d for d in _IMAGE_SETS + _TEXT_SETS if d not in f]
        if missing:
            raise PipelineError(f"{path} lacks the dataset(s) {', '.join(missing)}.")
        _check_arrays(path, {name: f[name] for name in _IMAGE_SETS}, {name: f[name] for name in _TEXT_SETS})
    except BaseException:
        f.close()
        raise
    return f


def _h5_slices(config: ImportConfig, unit: Unit, now: datetime) -> Iterator[_Chunk]:
    path = unit.path
    with _open_h5(path) as f:
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
    uri = reading.uri_of(path.resolve())
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
        "source_uri": _repeated(uri, 5 * n), "source_member": pa.array(_IMAGE_SETS).take(per_image),
        "source_row": start + per_row.astype(np.int64),
        "ingested_at": _repeated(now, 5 * n, SAMPLES.field("ingested_at").type),
    })
    image_faults, text_faults = _faults(images.norms), _faults(texts.norms)  # none, almost always
    problems = []
    if image_faults is not None:
        problems += _fault_rows("image", image_faults, images.hashes,
                                lambda i: (uri, _IMAGE_SETS[i % 5], start + i // 5), now)
    if text_faults is not None:
        problems += _fault_rows("text", text_faults, text_hashes,
                                lambda i: (uri, _TEXT_SETS[i % 2], start + i // 2), now)
    return _Chunk(samples, images.vectors, images.norms, images.keys, text_hashes, texts.keys, texts.vectors,
                  texts.norms, done, None if image_faults is None else image_faults == 0,
                  None if text_faults is None else text_faults == 0, problems, which_text)


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
        for path in (img_file, text_file, meta_file):
            _ensure_regular(path)
        stats = [(p.stat().st_size, p.stat().st_mtime_ns) for p in (img_file, text_file)]
        units.append(stat_unit(meta_file, parquet_fingerprint(meta_file), json.dumps(stats),
                               payload=(i, img_file, text_file)))
    return units


def _open_clip_shard(unit: Unit) -> tuple[np.ndarray, np.ndarray, pq.ParquetFile]:
    """A shard's image and text vectors (mapped: read a slice at a time) and its metadata, once they
    are known to be 2-D float arrays and to line up."""
    i, img_file, text_file = unit.payload
    img_v, txt_v = _load_npy(img_file), _load_npy(text_file)
    _check_arrays(img_file, {"": img_v}, {})
    _check_arrays(text_file, {"": txt_v}, {})
    try:
        meta = pq.ParquetFile(unit.path)
    except Exception as exc:  # noqa: BLE001 - pyarrow's errors for a file that is no Parquet vary
        raise PipelineError(f"{unit.path} is not a readable Parquet file ({str(exc).splitlines()[0]}).") from exc
    rows = meta.metadata.num_rows
    if not (rows == len(img_v) == len(txt_v)):
        raise PipelineError(f"Shard {i}: {rows} metadata rows, {len(img_v)} image and "
                            f"{len(txt_v)} text vectors; they must match.")
    return img_v, txt_v, meta


def _check_unit(config: ImportConfig, unit: Unit) -> None:
    """Open a file about to be read and check its arrays, before anything is written: a bad one
    stops the import with one sentence, not part way through."""
    if config.layout == "h5":
        _open_h5(unit.path).close()
    else:
        _open_clip_shard(unit)


@dataclass(frozen=True)
class _ClipFiles:
    """One clip-retrieval shard's files, and what its rows' `image_path` may read."""

    meta: Path
    images: Path
    texts: Path
    limits: Limits


def _clip_retrieval_slices(config: ImportConfig, unit: Unit, now: datetime,
                           unread: Counter[str] | None = None) -> Iterator[_Chunk]:
    _, img_file, text_file = unit.payload
    img_v, txt_v, meta = _open_clip_shard(unit)
    rows = meta.metadata.num_rows
    if rows == 0:
        yield _empty_chunk((unit, 0))
    start = 0
    files = _ClipFiles(unit.path, img_file, text_file, config.image_limits())
    for batch in meta.iter_batches(batch_size=SLICE_ROWS):
        end = start + batch.num_rows
        yield _clip_retrieval_chunk(config, files, batch.to_pylist(), start,
                                    np.array(img_v[start:end]), np.array(txt_v[start:end]),
                                    now, (unit, rows) if end == rows else None, unread)
        start = end


def _clip_retrieval_chunk(config: ImportConfig, files: _ClipFiles, meta: list[dict[str, Any]], start: int,
                          img_v: np.ndarray, txt_v: np.ndarray, now: datetime,
                          done: tuple[Unit, int] | None, unread: Counter[str] | None = None) -> _Chunk:
    root = config.source
    (img_v, img_norms, img_exact), (txt_v, txt_norms, txt_exact) = _unit_vectors(img_v), _unit_vectors(txt_v)
    samples: list[dict[str, Any]] = []
    img_h, txt_h = [], []
    unread = Counter() if unread is None else unread
    images = [_image_file(files.limits, root, row, unread) for row in meta]
    need_image_hash = [k for k, image in enumerate(images) if image is None]
    need_text_hash = [k for k, row in enumerate(meta) if not row.get("caption")]
    image_by_vector = dict(zip(need_image_hash, _vector_hashes("image", img_v[need_image_hash]), strict=True))
    text_by_vector = dict(zip(need_text_hash, _vector_hashes("text", txt_v[need_text_hash]), strict=True))
    meta_uri = reading.uri_of(files.meta.resolve())
    for k, (row, image) in enumerate(zip(meta, images, strict=True)):
        label, generator = _label(row, config.generator, files.meta)
        ih = image[0] if image else image_by_vector[k]
        caption = row.get("caption")
        th = text_hash(caption) if caption else text_by_vector[k]
        group = f"image:{ih}"
        split = assign_split(group, config.split_fractions, config.split_seed)
        fmt = "clip-retrieval" if image else "features:clip-retrieval"
        samples.append(_sample(ih, label, generator, split, group, caption, th, fmt, image[2] if image else meta_uri,
                               None if image else "image_path", None if image else start + k, now,
                               image[1] if image else None))
        img_h.append(ih)
        txt_h.append(th)
    text_hashes = pa.array(txt_h, pa.string())
    image_hashes = pa.array(img_h, pa.string())
    image_faults, text_faults = _faults(img_norms), _faults(txt_norms)
    problems = []
    if image_faults is not None:
        uri = reading.uri_of(files.images.resolve())
        problems += _fault_rows("image", image_faults, image_hashes, lambda i: (uri, None, start + i), now)
    if text_faults is not None:
        uri = reading.uri_of(files.texts.resolve())
        problems += _fault_rows("text", text_faults, text_hashes, lambda i: (uri, None, start + i), now)
    return _Chunk(from_rows(SAMPLES, samples), _as_stored(img_v, config.dtype, img_exact), img_norms,
                  keys_of(image_hashes), text_hashes, keys_of(text_hashes), _as_stored(txt_v, config.dtype, txt_exact),
                  txt_norms, done, None if image_faults is None else image_faults == 0,
                  None if text_faults is None else text_faults == 0, problems)


def _image_file(limits: Limits, root: Path, row: dict[str, Any], unread: Counter[str]) -> tuple[str, int, str] | None:
    """The row's image, hashed by a bounded read: (sha256, size, uri). None when the row names no
    file, or one it may not or cannot read (counted in `unread` by reason: `outside_source` for a
    path that leads outside the folders allowed, `unreadable` for a missing file, …)."""
    value = row.get("image_path")
    if not value:
        return None
    path = Path(str(value))
    path = path if path.is_absolute() else root / path
    try:
        sha, size = reading.hash_file(path, limits)
    except Unreadable as exc:
        unread[exc.reason] += 1
        return None
    return sha, size, reading.uri_of(os.path.realpath(path))


def _label(row: dict[str, Any], generator: str | None, where: Path) -> tuple[int, str]:
    if row.get("label") is not None:
        label = parse_label(row["label"], str(where))
        return label, row.get("generator") or ("real" if label == 0 else "generated")
    if generator is None:
        raise PipelineError(f"{where} has no label column: give --generator NAME (or 'real').")
    return (0 if generator.lower() == "real" else 1), generator


# --- shared --------------------------------------------------------------------------------


def _sample(sample_id: str, label: int, generator: str, split: str, group: str, text: str | None,
            t_hash: str, fmt: str, uri: str, member: str | None, row: int | None, now: datetime,
            size: int | None = None) -> dict[str, Any]:
    return {
        "sample_id": sample_id, "label": label, "generator": canonical(generator), "generator_original": generator,
        "split": split,
        "group_key": group, "text": text, "text_hash": t_hash, "source_format": fmt,
        "source_uri": uri, "source_member": member, "source_row": row,
        "byte_offset": None, "byte_length": size, "ingested_at": now,
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


def _ensure_regular(path: Path) -> None:
    """A features file must be a regular file (a FIFO would block the library that opens it)."""
    try:
        reading.ensure_regular(path)
    except Unreadable as exc:
        raise PipelineError(f"{exc.detail}: import-features reads regular files only.") from exc


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as exc:  # no .npy, cut short, or objects (pickles are never loaded)
        raise PipelineError(f"{path} is not a readable .npy array of vectors ({exc}).") from exc


def _check_arrays(path: Path, images: dict[str, Any], texts: dict[str, Any]) -> None:
    """One sentence naming the file unless every array (HDF5 dataset or .npy) is 2-D float, all have the
    same rows, and the image ones (and the text ones) the same width."""
    for name, values in {**images, **texts}.items():
        shape, dtype = tuple(values.shape), np.dtype(values.dtype)
        if len(shape) != 2 or dtype.kind != "f" or not shape[1]:
            where_ = f"{path} dataset {name}" if name else str(path)
            raise PipelineError(f"{where_} holds a {len(shape)}-D array of shape {shape} and type {dtype}; "
                                "import-features needs 2-D float vectors (one row per item).")
    rows = {name: values.shape[0] for name, values in {**images, **texts}.items()}
    if len(set(rows.values())) > 1:
        raise PipelineError(f"{path}: its datasets hold different numbers of rows ({rows}); row i of each must "
                            "be one D3 row.")
    for group in (images, texts):
        widths = {name: values.shape[1] for name, values in group.items()}
        if len(set(widths.values())) > 1:
            raise PipelineError(f"{path}: datasets {', '.join(widths)} must hold vectors of one width, not {widths}.")


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
