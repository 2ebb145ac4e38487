"""D3's real images (downloaded LAION files, or img2dataset tars), found by D3 row id or by URL.

Files named `<id>.<ext>` match a D3 row id; img2dataset writes a `.json` beside each image (or a
`.json` member in its tars) whose `url` matches the row's URL. The index is a table on disk, not
dicts in memory (those held ~1.3 KB an image: 3 GB for D3's 2.3M): the MD5 keys of ids and of URLs,
sorted, each with the row of its image in an Arrow file of locations, all memory-mapped, so a lookup
is a binary search in pages of the file cache. It is built once per state of the folder (keyed by
its `directory_fingerprint`, under the store's `cache/real-images/`) and replaced when that changes;
building holds 48 bytes an image (keys and rows) until they are sorted and written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.errors import PipelineError
from pipeline.sources.common import (
    absolute,
    directory_fingerprint,
    image_member,
    is_image,
    iter_tar_entries,
    tar_location,
)
from pipeline.sources.locations import Location
from pipeline.sources.reading import TEXT_MAX_BYTES, opened
from pipeline.store.atomic import pid_alive

FORMAT = 1  # of the files below: a change builds every index again
_KEY = "S16"
_BATCH = 16_384  # locations a record batch (row r is in batch r // _BATCH); what a build holds at once
_LOCATIONS = pa.schema([("uri", pa.string()), ("member", pa.string()), ("offset", pa.int64()),
                        ("length", pa.int64())])


class RealImageIndex:
    """Lookups by id and by URL in an index built (or found) under `cache` for `root` as it is."""

    def __init__(self, root: Path, cache: Path | None = None, fingerprint: str | None = None) -> None:
        if not root.exists():
            raise PipelineError(f"--real-images {root} does not exist.")
        if cache is None:  # no store to keep it in: built for this process only
            self._temporary = tempfile.TemporaryDirectory(prefix="real-images-")
            cache = Path(self._temporary.name)
        fingerprint = fingerprint or directory_fingerprint(root)
        place = hashlib.sha256(f"{FORMAT}\0{absolute(root)}".encode()).hexdigest()[:16]
        state = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
        self.directory = cache / f"{place}-{state}"
        if not (self.directory / "index.json").exists():
            _build(root, self.directory)
            _sweep(cache, place, keep=self.directory)
        meta = json.loads((self.directory / "index.json").read_text(encoding="utf-8"))
        self._size, self._batch_rows = int(meta["images"]), int(meta["batch_rows"])
        self._ids, self._id_rows = _map(self.directory / "ids.keys", _KEY), _map(self.directory / "ids.rows", "<i8")
        self._urls, self._url_rows = _map(self.directory / "urls.keys", _KEY), _map(self.directory / "urls.rows", "<i8")
        reader = pa.ipc.open_file(pa.memory_map(str(self.directory / "locations.arrow")))
        self._batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]

    def find(self, row_id: str | None, url: str | None) -> Location | None:
        row = _lookup(self._ids, self._id_rows, str(row_id)) if row_id is not None else None
        if row is None and url:
            row = _lookup(self._urls, self._url_rows, url)
        if row is None:
            return None
        batch = self._batches[row // self._batch_rows]
        i = row % self._batch_rows
        return Location(uri=batch.column(0)[i].as_py(), member=batch.column(1)[i].as_py(),
                        offset=batch.column(2)[i].as_py(), length=batch.column(3)[i].as_py())

    def __len__(self) -> int:
        return self._size  # images found by id or URL (counted at build: `len()` runs per D3 row)

    def __bool__(self) -> bool:
        return True  # an index exists even when it found nothing; `find` says what it has


# An image found: (uri, tar member, offset, length, id, URL); plain tuples, as a build holds a batch of them.
_Entry = tuple[str, str | None, int | None, int | None, str, str | None]


def _entries(root: Path) -> Iterator[_Entry]:
    """Each image, in walk order (the first of an id or URL wins)."""
    if root.is_file():
        yield from (_tar_entries(root) if root.suffix == ".tar" else _file_entries(str(root.parent), [root.name]))
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        yield from _file_entries(dirpath, sorted(filenames))


def _file_entries(directory: str, names: list[str]) -> Iterator[_Entry]:
    present = set(names)
    for name in names:
        path = os.path.join(directory, name)
        stem, suffix = os.path.splitext(name)
        if suffix == ".tar":
            yield from _tar_entries(Path(path))
        elif is_image(name):
            sidecar = stem + ".json"
            url = _url_from_file(os.path.join(directory, sidecar)) if sidecar in present else None
            yield absolute(Path(path)), None, None, None, stem, url


def _tar_entries(path: Path) -> Iterator[_Entry]:
    for tf, entry in iter_tar_entries(path):
        member = image_member(entry)
        if member is None:
            continue
        meta = entry.members.get("json")
        url = None
        if meta is not None:
            f = tf.extractfile(meta)
            url = _url_from_json(f.read(1 << 20) if f is not None else b"")
        loc = tar_location(path, member)
        yield loc.uri, loc.member, loc.offset, loc.length, entry.key.rpartition("/")[2], url


def _build(root: Path, directory: Path) -> None:
    """Write the index into a new folder, then rename it into place (a killed build leaves none)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    work = directory.parent / f".building-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    try:
        ids: list[tuple[np.ndarray, np.ndarray]] = []
        urls: list[tuple[np.ndarray, np.ndarray]] = []
        rows = 0
        with pa.ipc.new_file(str(work / "locations.arrow"), _LOCATIONS) as writer:
            for batch in _batched(_entries(root)):
                n = len(batch)
                numbers = np.arange(rows, rows + n, dtype=np.int64)
                uri, member, offset, length, key, url = zip(*batch, strict=True)
                ids.append((_keys(key), numbers))
                has_url = [i for i, u in enumerate(url) if u]
                urls.append((_keys([str(url[i]) for i in has_url]), numbers[has_url]))
                writer.write_batch(pa.record_batch([pa.array(uri, pa.string()), pa.array(member, pa.string()),
                                                    pa.array(offset, pa.int64()), pa.array(length, pa.int64())],
                                                   schema=_LOCATIONS))
                rows += n
        found = [_write_sorted(work, "ids", ids), _write_sorted(work, "urls", urls)]
        images = len(np.union1d(*found))
        meta = {"format": FORMAT, "root": absolute(root), "images": images, "batch_rows": _BATCH}
        (work / "index.json").write_text(json.dumps(meta), encoding="utf-8")
        if directory.exists():  # a build that was never finished (no index.json): replaced
            shutil.rmtree(directory)
        os.replace(work, directory)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _batched(entries: Iterator[_Entry]) -> Iterator[list[_Entry]]:
    batch: list[_Entry] = []
    for entry in entries:
        batch.append(entry)
        if len(batch) == _BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_sorted(work: Path, name: str, parts: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Sort keys (the first row of each wins), write keys and rows; returns the rows kept."""
    keys = np.concatenate([k for k, _ in parts]) if parts else np.empty(0, _KEY)
    rows = np.concatenate([r for _, r in parts]) if parts else np.empty(0, np.int64)
    order = np.argsort(keys, kind="stable")
    keys, rows = keys[order], rows[order]
    first = np.ones(len(keys), bool)
    first[1:] = keys[1:] != keys[:-1]
    keys[first].tofile(work / f"{name}.keys")
    rows[first].astype("<i8").tofile(work / f"{name}.rows")
    return rows[first]


def _keys(texts: Iterable[str]) -> np.ndarray:
    # a file name that is not UTF-8 matches no D3 id, but must not stop the index being built
    return np.frombuffer(b"".join(hashlib.md5(t.encode("utf-8", "surrogateescape")).digest() for t in texts), _KEY)


def _lookup(keys: np.ndarray, rows: np.ndarray, text: str) -> int | None:
    if not len(keys):
        return None
    key = np.frombuffer(hashlib.md5(text.encode()).digest(), _KEY)
    at = int(np.searchsorted(keys, key)[0])
    return int(rows[at]) if at < len(keys) and keys[at] == key[0] else None


def _map(path: Path, dtype: str) -> np.ndarray:
    size = path.stat().st_size
    return np.memmap(path, dtype, "r") if size else np.empty(0, dtype)


def _sweep(cache: Path, place: str, keep: Path) -> None:
    """Indexes of this folder's earlier states, and builds left by killed processes."""
    for old in cache.iterdir():
        if old.name.startswith(f"{place}-") and old != keep:
            shutil.rmtree(old, ignore_errors=True)
        elif old.name.startswith(".building-"):
            pid = old.name.split("-")[1]
            if pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)


def _url_from_file(path: str) -> str | None:
    try:
        with opened(path, whole=False) as (f, _):  # a FIFO named .json never blocks
            return _url_from_json(f.read(TEXT_MAX_BYTES))
    except OSError:
        return None


def _url_from_json(raw: bytes) -> str | None:
    try:
        url = json.loads(raw).get("url")
    except (ValueError, AttributeError):
        return None
    return url if isinstance(url, str) else None
