"""One model's vectors of one modality as one row-addressable matrix, memory-mapped, stored once.

The embedding shards (Parquet) are the truth, and they are also what is mapped: a shard written by
`store.atomic.write_parquet` holds its vector column uncompressed, PLAIN-encoded, one data page per
row group, so the last `rows x dim x itemsize` bytes of each row group's vector column chunk are
exactly its vectors, row-major (`mappable_pieces` finds them from the footer and checks the first
and last row group against a decode). A batch is then a gather from the page cache; no vector is
copied to a second file. Shards that cannot be mapped (written before this layout, or by another
writer: compressed, dictionary-encoded, several pages) are copied once into `.npy` segments.

In `cache/vectors/<model_key>/<modality>/`:

- `layout.json`: the segments in order. A `parquet` segment is one shard with its row groups'
  byte offsets; an `npy` segment is some shards copied into `<name>.npy`;
- `<name>.norms.npy` per segment (float32, the norm each vector had before L2 normalisation; NaN
  where the shard did not record it): 4 bytes a row, read from the shards' `norm` column.

Row r of the matrix is row `r - offset(shard)` of its shard, so the training view maps content
hashes to rows in SQL with `file_row_number` (no hash is stored a second time). New shards append
segments; offsets of earlier rows never move. A shard that left the store forces a rebuild (a new
`generation`). Every file is written atomically, the layout last.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import resource
import threading
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.reporting import Reporter, Silent
from pipeline.store import cache, catalog
from pipeline.store.atomic import atomic_write, write_text
from pipeline.store.layout import Store
from schemas import MODALITIES, SCHEMA_VERSION

LAYOUT_VERSION = 2
READ_ROWS = 16384  # rows per Parquet batch while copying or checking shards (bounded memory)


MAX_OPEN_MAPS = max(64, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4)  # each map holds a descriptor
# Rows gathered at once from which, where they lie close together (at most a run of pages per
# PREFETCH_DENSE rows, runs closer than PREFETCH_GAP pages merged), their pages are asked for ahead
# (MADV_WILLNEED, a call a run) before they are touched: a page fault reads one page and waits for it,
# a run asked for is read as one request. Measured on this machine's disk (11.5M-vector store beyond the
# page cache): 8,192 consecutive rows 2.08 s by page faults, 0.069 s asked for; 8,192 random rows
# 1.2-1.4 s either way (about 6,000 reads a second), so scattered rows are left to the faults. A
# scoring pass in matrix order (`FeatureLoader`, order "rows") reads at the disk's speed.
# Rows gathered at once from which the gather runs in GATHER_THREADS parts at once: beyond the page
# cache each page fault waits on the disk, and faults in several threads are read side by side.
# Measured (11.5M-vector store, evicted from the page cache, 8,192 random rows): 0.92 s in one
# thread, 0.38-0.41 s in 8, 0.31-0.42 s in 32; cached, 0.13-0.23 s against 0.09-0.10 s.
GATHER_PARALLEL_FROM = 1024
GATHER_THREADS = 8
PREFETCH_FROM = 256
PREFETCH_GAP = 4  # pages: a merged run reads at most 4 pages it was not asked for between two it was
PREFETCH_DENSE = 4


@dataclass(frozen=True)
class Segment:
    name: str  # stem of its files in the cache directory
    shards: tuple[tuple[str, int], ...]  # (store-relative shard path, rows), in row order
    start: int  # global row of its first vector
    kind: str = "npy"  # "npy": copied into <name>.npy; "parquet": its one shard, mapped in place
    pieces: tuple[tuple[int, int], ...] = ()  # parquet: (byte offset, rows) of each row group's vectors
    dtype: str = ""  # parquet: the shard's vector dtype

    @property
    def rows(self) -> int:
        return sum(n for _, n in self.shards)


@dataclass(frozen=True)
class _Piece:
    file: Path
    offset: int  # bytes; -1: an .npy file (np.load finds its header)
    rows: int
    dtype: str
    norms: Path  # the segment's norms (.npy) ...
    norms_at: int  # ... from this row


class VectorMatrix:
    """The concatenated segments of one model and modality: gather rows, stream chunks."""

    def __init__(self, directory: Path, generation: str, segments: list[Segment], dim: int, dtype: str,
                 root: Path, pins: cache.Pins | None = None) -> None:
        self.pins = pins  # the cache files this matrix reads, kept while it lives (`store.cache`)
        self.directory = directory
        self.generation = generation
        self.segments = segments
        self.dim = dim
        self.dtype = dtype
        # one piece per npy segment or per row group of a mapped shard
        starts: list[int] = []
        self._pieces: list[_Piece] = []
        for seg in segments:
            norms = directory / f"{seg.name}.norms.npy"
            if seg.kind == "parquet":
                path = root / seg.shards[0][0]
                at = 0
                for offset, rows in seg.pieces:
                    starts.append(seg.start + at)
                    self._pieces.append(_Piece(path, offset, rows, seg.dtype, norms, at))
                    at += rows
            else:
                starts.append(seg.start)
                self._pieces.append(_Piece(directory / f"{seg.name}.npy", -1, seg.rows, dtype, norms, 0))
        self._starts = np.array(starts + [self.rows], np.int64)
        self._maps: OrderedDict[Path, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.segments)

    @property
    def segment_names(self) -> list[str]:
        return [s.name for s in self.segments]

    def _array(self, p: int) -> np.ndarray:
        """Piece p as a read-only [rows, dim] array over its mapped file."""
        piece = self._pieces[p]
        if piece.offset < 0:
            return self._map(piece.file, npy=True)
        return np.ndarray((piece.rows, self.dim), piece.dtype, buffer=self._map(piece.file), offset=piece.offset)

    def _norms(self, p: int) -> np.ndarray:
        piece = self._pieces[p]
        return self._map(piece.norms, npy=True)[piece.norms_at:piece.norms_at + piece.rows]

    def _map(self, file: Path, npy: bool = False) -> np.ndarray:
        """`file` mapped read-only. At most MAX_OPEN_MAPS files stay mapped (each mapping holds a
        file descriptor); the least recently used is let go."""
        with self._lock:  # gathers run in threads
            whole = self._maps.get(file)
            if whole is None:
                whole = np.load(file, mmap_mode="r") if npy else np.memmap(file, np.uint8, mode="r")
                _advise(whole, mmap.MADV_RANDOM)
                self._maps[file] = whole
                if len(self._maps) > MAX_OPEN_MAPS:
                    self._maps.popitem(last=False)
            else:
                self._maps.move_to_end(file)
            return whole

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
        """float32 [len(rows), dim]: unit vectors, or (raw) scaled back by their stored norms.
        From GATHER_PARALLEL_FROM rows, in GATHER_THREADS parts at once (see there)."""
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), self.dim), np.float32)
        order = np.argsort(rows, kind="stable")  # ascending reads: friendlier to the page cache
        sorted_rows = rows[order]
        if len(rows) < GATHER_PARALLEL_FROM:
            self._gather_sorted(sorted_rows, order, out, raw)
            return out
        cuts = np.linspace(0, len(rows), GATHER_THREADS + 1).astype(np.int64)
        parts = [(sorted_rows[lo:hi], order[lo:hi]) for lo, hi in zip(cuts[:-1], cuts[1:], strict=True) if hi > lo]
        for done in [_gather_pool().submit(self._gather_sorted, part, where, out, raw) for part, where in parts]:
            done.result()  # (raises what the part raised)
        return out

    def _gather_sorted(self, sorted_rows: np.ndarray, order: np.ndarray, out: np.ndarray, raw: bool) -> None:
        """out[order[i]] = vector of sorted_rows[i] (rows ascending)."""
        piece_of = np.searchsorted(self._starts, sorted_rows, side="right") - 1
        bounds = np.r_[0, np.flatnonzero(np.diff(piece_of)) + 1, len(sorted_rows)]
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=False):
            if lo == hi:
                continue
            piece = piece_of[lo]
            local = sorted_rows[lo:hi] - self._starts[piece]
            array = self._array(piece)
            if hi - lo >= PREFETCH_FROM:
                file = self._pieces[piece].file
                _prefetch(self._map(file, npy=self._pieces[piece].offset < 0), array, local)
            values = as_float32(array[local])
            if raw:
                norms = self._norms(piece)[local]
                if np.isnan(norms).any():
                    raise PipelineError(
                        "Some vectors were stored without their norm (written before norms were kept), so "
                        "--input-norm raw cannot restore them: import or encode them again, or use l2."
                    )
                values *= norms[:, None]
            out[order[lo:hi]] = values

    def chunks(self, size: int = 65536, raw: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 chunk) over every row in order; memory is one chunk."""
        for p, piece in enumerate(self._pieces):
            array = self._array(p)
            _advise(self._maps[piece.file], mmap.MADV_SEQUENTIAL)  # one pass in order: read ahead
            for at in range(0, piece.rows, size):
                part = as_float32(np.asarray(array[at:at + size]))
                if raw:
                    part *= np.asarray(self._norms(p)[at:at + size])[:, None]
                yield int(self._starts[p]) + at, part
            if piece.file in self._maps:
                _advise(self._maps[piece.file], mmap.MADV_RANDOM)


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
    with cache.building(directory):  # one builder at a time; readers pin the segments they map
        layout = _read_layout(directory)
        if layout is not None:
            generation, segments, dim, dtype = layout
            covered = {path for s in segments for path, _ in s.shards}
            if not covered <= current.keys() or not all(_present(directory, s) for s in segments):
                layout = None
        if layout is None:
            generation, segments, dim, dtype = uuid.uuid4().hex[:12], [], *_dim_dtype(shards)
            covered = set()
        new = [rel for rel in current if rel not in covered]  # catalog order: name order, i.e. time order
        if new:
            segments = [*segments, *_lay_out(directory, [current[r] for r in new], store,
                                              sum(s.rows for s in segments), dim, dtype, reporter, modality)]
            _write_layout(directory, generation, segments, dim, dtype)
            # pyarrow's pool keeps what the layout's reads freed, for reuse: about 320 MB after 1M vectors,
            # under whatever the caller does next (the training view's DuckDB build: 577 MB at 1M, 653 MB
            # at 5M). Handed back, the view's first build peaks as a rebuild does.
            pa.default_memory_pool().release_unused()
        files = _segment_files(segments)
        pins = cache.pin(directory / f for f in sorted(files))
        cache.sweep([*directory.glob("seg-*.npy"), *directory.glob("pq-*.npy")], files)
    return VectorMatrix(directory, generation, segments, dim, dtype, store.root, pins)


def mappable_pieces(path: Path, dim: int) -> tuple[tuple[int, int], ...] | None:
    """(byte offset, rows) of each row group's vectors in the file, if they lie there row-major;
    None if the shard must be copied instead. The first and last row groups are checked against a
    decode, so a layout this function misjudges is refused, never mapped wrongly."""
    file = pq.ParquetFile(path)
    meta = file.metadata
    names = file.schema_arrow.names
    if "vector" not in names:
        return None
    vtype = file.schema_arrow.field("vector").type
    if not pa.types.is_fixed_size_list(vtype) or vtype.list_size != dim:
        return None
    itemsize = vtype.value_type.bit_width // 8
    leaf = next(i for i in range(meta.num_columns) if meta.schema.column(i).path.startswith("vector."))
    pieces = []
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        chunk = group.column(leaf)
        if (chunk.compression != "UNCOMPRESSED" or chunk.has_dictionary_page
                or not set(chunk.encodings) <= {"PLAIN", "RLE", "BIT_PACKED"}
                or chunk.num_values != group.num_rows * dim):
            return None
        size = group.num_rows * dim * itemsize
        end = chunk.data_page_offset + chunk.total_compressed_size
        if chunk.total_compressed_size < size:
            return None
        pieces.append((end - size, group.num_rows))
    if pieces:
        mapped = np.memmap(path, np.uint8, mode="r")
        dtype = np.float16 if itemsize == 2 else np.float32
        for g in {0, len(pieces) - 1}:
            offset, rows = pieces[g]
            view = np.ndarray((rows, dim), dtype, buffer=mapped, offset=offset)
            decoded = file.read_row_group(g, columns=["vector"], use_threads=False).column("vector")
            expected = decoded.combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(rows, dim)
            if not np.array_equal(view.view(np.uint8), np.ascontiguousarray(expected, dtype).view(np.uint8)):
                return None
        del mapped
    return tuple(pieces)


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




def _advise(mapped: np.ndarray, advice: int) -> None:
    """Tell the kernel how a mapped file will be read. Gathers are random rows: without
    MADV_RANDOM each page fault reads ahead ~128 KB around a 1.5 KB vector, which is harmless
    while the vectors fit the page cache and, beyond it (D3's 21 GB on a 24 GB machine), made
    a scoring pass read the disk ~100x over (measured: 1 TB read in 28 min at 11.5M samples)."""
    handle = getattr(mapped, "_mmap", None)
    if handle is not None and hasattr(handle, "madvise"):
        try:
            handle.madvise(advice)
        except OSError:
            pass  # advice only

_pools: dict[int, ThreadPoolExecutor] = {}


def _gather_pool() -> ThreadPoolExecutor:
    """This process' gather threads (a forked child starts its own: threads do not survive a fork)."""
    pid = os.getpid()
    if pid not in _pools:
        _pools.clear()
        _pools[pid] = ThreadPoolExecutor(GATHER_THREADS, thread_name_prefix="gather")
    return _pools[pid]


def _prefetch(mapped: np.ndarray, array: np.ndarray, rows: np.ndarray) -> None:
    """Ask the kernel to read the pages of these (ascending) rows of `array`, a view of `mapped`."""
    handle = getattr(mapped, "_mmap", None)
    if handle is None or not hasattr(mmap, "MADV_WILLNEED"):
        return
    # where array's data starts in the mapping (numpy maps from the allocation boundary below its offset)
    base = (array.__array_interface__["data"][0] - mapped.__array_interface__["data"][0]
            + getattr(mapped, "offset", 0) % mmap.ALLOCATIONGRANULARITY)
    row_bytes = array.strides[0]
    first = (base + rows * row_bytes) // mmap.PAGESIZE
    last = (base + rows * row_bytes + row_bytes - 1) // mmap.PAGESIZE
    cut = np.flatnonzero(first[1:] - last[:-1] > PREFETCH_GAP) + 1
    if len(cut) + 1 > len(rows) // PREFETCH_DENSE:
        return  # scattered: a call a row costs as much as the faults it saves
    starts, ends = first[np.r_[0, cut]], last[np.r_[cut - 1, len(rows) - 1]]
    try:
        for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
            handle.madvise(mmap.MADV_WILLNEED, start * mmap.PAGESIZE, (end - start + 1) * mmap.PAGESIZE)
    except (OSError, ValueError):
        pass  # advice only


TORCH_CAST_MIN = 1 << 16  # values: fewer are cast by numpy (not worth loading torch for)
_CAST_PIECE = 32768  # torch's grain size (at::internal::GRAIN_SIZE): a copy this size runs in one thread


def as_float32(values: np.ndarray) -> np.ndarray:
    """A new float32 array of `values` (float16 through `cast_into`'s vectorised copy)."""
    out = np.empty(values.shape, np.float32)
    cast_into(out, np.ascontiguousarray(values))
    return out


def cast_into(out: np.ndarray, values: np.ndarray) -> None:
    """`out[...] = values` for C-contiguous arrays of one shape. float16 <-> float32 is torch's
    vectorised copy (F16C / AVX-512 conversions; numpy converts a value at a time), in pieces of at
    most `_CAST_PIECE` values, which torch copies in the calling thread (a whole 2 MB block at once
    wakes its thread pool: 7.9 ms of CPU against 0.04 ms, measured on the shared 2-core machine).
    Equal to numpy's cast, round to nearest even, for every finite value and infinity; a NaN may
    come out otherwise (torch's scalar tail gives 0x7fffffff, a signalling NaN is made quiet), so
    callers cast a block with a non-finite norm again by numpy."""
    pair = {np.dtype(out.dtype), np.dtype(values.dtype)}
    if (pair != {np.dtype(np.float16), np.dtype(np.float32)} or values.size < TORCH_CAST_MIN
            or not (out.flags.c_contiguous and values.flags.c_contiguous) or out.shape != values.shape):
        np.copyto(out, values)
        return
    import torch  # only here: an import with nothing to convert never loads it

    with warnings.catch_warnings():  # a read-only source (a mapped file) is only read: torch's warning is moot
        warnings.simplefilter("ignore", UserWarning)
        source_pieces = torch.from_numpy(values.reshape(-1)).split(_CAST_PIECE)
    pieces = zip(torch.from_numpy(out.reshape(-1)).split(_CAST_PIECE), source_pieces, strict=True)
    for target, source in pieces:
        target.copy_(source)


def _dim_dtype(shards: list[Path]) -> tuple[int, str]:
    types = {pq.read_schema(p).field("vector").type for p in shards}
    dims = {t.list_size for t in types}
    if len(dims) > 1:
        raise PipelineError(f"The shards of one model hold vectors of different sizes ({sorted(dims)}).")
    wide = any(t.value_type == pa.float32() for t in types)
    return dims.pop(), "float32" if wide else "float16"


def _present(directory: Path, segment: Segment) -> bool:
    files = [f"{segment.name}.norms.npy"] + ([] if segment.kind == "parquet" else [f"{segment.name}.npy"])
    return all((directory / f).exists() for f in files)


def _lay_out(directory: Path, shards: list[Path], store: Store, start: int, dim: int, dtype: str,
             reporter: Reporter, modality: str) -> list[Segment]:
    """Segments for new shards: each mappable shard is one (mapped) segment; runs of shards that
    are not are copied into one npy segment each. Only norms (4 bytes a row) are written for the
    mapped ones."""
    total = sum(pq.read_metadata(p).num_rows for p in shards)
    task = f"lay out {modality} vectors"
    reporter.start(task, total, "vectors")
    segments: list[Segment] = []
    pending: list[Path] = []

    def flush() -> None:
        nonlocal start
        if pending:
            segments.append(_copy_segment(directory, list(pending), store, start, dim, dtype, reporter, task))
            start += segments[-1].rows
            pending.clear()

    for path in shards:
        pieces = mappable_pieces(path, dim)
        if pieces is None:
            pending.append(path)
            continue
        flush()
        rows = sum(n for _, n in pieces)
        name = "pq-" + fingerprint(store, [path], "mapped", start)
        norms = _norms(path, rows)
        atomic_write(directory / f"{name}.norms.npy", partial(_save, array=norms))
        width = pq.read_schema(path).field("vector").type.value_type.bit_width
        segments.append(Segment(name, ((store.relative(path), rows),), start, "parquet", pieces, f"float{width}"))
        start += rows
        reporter.advance(task, rows)
    flush()
    return segments


def _norms(path: Path, rows: int) -> np.ndarray:
    file = pq.ParquetFile(path)
    if "norm" not in file.schema_arrow.names:
        return np.full(rows, np.nan, np.float32)
    return file.read(columns=["norm"], use_threads=False).column("norm").to_numpy().astype(np.float32)


def _copy_segment(directory: Path, shards: list[Path], store: Store, start: int, dim: int, dtype: str,
                  reporter: Reporter, task: str) -> Segment:
    counts = [pq.read_metadata(p).num_rows for p in shards]
    total = sum(counts)
    name = "seg-" + fingerprint(store, shards, "segment", start)
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
                    reporter.advance(task, n)

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
    segments = [Segment(s["name"], tuple((p, int(n)) for p, n in s["shards"]), int(s["start"]), s["kind"],
                        tuple((int(o), int(n)) for o, n in s["pieces"]), s["dtype"])
                for s in data["segments"]]
    return data["generation"], segments, int(data["dim"]), data["dtype"]


def _write_layout(directory: Path, generation: str, segments: list[Segment], dim: int, dtype: str) -> None:
    data = {
        "version": LAYOUT_VERSION, "generation": generation, "dim": dim, "dtype": dtype,
        "segments": [{"name": s.name, "start": s.start, "kind": s.kind, "dtype": s.dtype,
                      "shards": [list(x) for x in s.shards],
                      "pieces": [list(p) for p in s.pieces]} for s in segments],
    }
    write_text(directory / "layout.json", json.dumps(data))


def _segment_files(segments: list[Segment]) -> set[str]:
    """The files of the cache a layout's segments read (norms always; vectors when copied, not mapped)."""
    return {f"{s.name}.norms.npy" for s in segments} | {f"{s.name}.npy" for s in segments if s.kind == "npy"}
