"""What every source adapter yields, and the helpers they share (tar scanning, real-image lookup)."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.sources.locations import Location

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
REAL = "real"


@dataclass(frozen=True)
class Candidate:
    """One image found in a source, with its bytes (read once, to hash them)."""

    data: bytes
    location: Location
    label: int
    generator: str
    group_key: str
    text: str | None
    split: str | None = None  # a split given by the source wins over the hashed one


@dataclass(frozen=True)
class Problem:
    """An input that cannot become a sample; it is recorded in quarantine with its reason."""

    reason: str
    detail: str
    location: Location


Item = Candidate | Problem


def is_image(path: Path | str) -> bool:
    return str(path).lower().endswith(IMAGE_SUFFIXES)


def read_file(path: Path) -> tuple[bytes, Location] | Problem:
    loc = Location(uri=str(path.resolve()))
    try:
        return path.read_bytes(), loc
    except OSError as exc:
        return Problem("unreadable", f"{path}: {exc.strerror or exc}", loc)


@dataclass
class TarEntry:
    """The members of one webdataset key: suffix ("jpg", "gen_0.jpg", "txt") → member."""

    key: str
    members: dict[str, tarfile.TarInfo] = field(default_factory=dict)


def split_key(name: str) -> tuple[str, str]:
    """webdataset convention: the key is the path up to the first dot of the file name."""
    head, _, base = name.rpartition("/")
    stem, dot, suffix = base.partition(".")
    return (f"{head}/{stem}" if head else stem), suffix if dot else ""


def iter_tar_entries(path: Path) -> Iterator[tuple[tarfile.TarFile, TarEntry]]:
    """Group a tar's members by key, in archive order. Yields the open archive with each entry."""
    try:
        tf = tarfile.open(path)
    except (tarfile.TarError, OSError) as exc:
        raise PipelineError(f"{path} is not a readable tar archive ({exc}).") from exc
    with tf:
        current: TarEntry | None = None
        for member in tf:
            if not member.isfile():
                continue
            key, suffix = split_key(member.name)
            if current is None or key != current.key:
                if current is not None:
                    yield tf, current
                current = TarEntry(key)
            current.members[suffix.lower()] = member
        if current is not None:
            yield tf, current


def tar_member_bytes(tf: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    f = tf.extractfile(member)
    return f.read() if f is not None else b""


def tar_location(path: Path, member: tarfile.TarInfo) -> Location:
    return Location(
        uri=str(path.resolve()), member=member.name, offset=member.offset_data, length=member.size
    )


def tar_text(tf: tarfile.TarFile, entry: TarEntry, suffix: str) -> str | None:
    member = entry.members.get(suffix)
    if member is None:
        return None
    return tar_member_bytes(tf, member).decode("utf-8", errors="replace").strip()


def image_member(entry: TarEntry, name: str = "") -> tarfile.TarInfo | None:
    """The image member called `name`.<ext> in an entry ("" for the bare KEY.jpg)."""
    for suffix, member in entry.members.items():
        base, _, ext = suffix.rpartition(".")
        if base == name and f".{ext}" in IMAGE_SUFFIXES:
            return member
    return None


class RealImageIndex:
    """Downloaded LAION images (a folder of files or img2dataset output), found by id or by URL.

    Files named `<id>.<ext>` match a D3 row id; img2dataset writes a `.json` beside each image
    (or a `.json` member in its tars) whose `url` matches the row's URL.
    """

    def __init__(self, root: Path) -> None:
        if not root.exists():
            raise PipelineError(f"--real-images {root} does not exist.")
        self.by_key: dict[str, Location] = {}
        self.by_url: dict[str, Location] = {}
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in paths:
            if path.suffix == ".tar":
                self._index_tar(path)
            elif is_image(path):
                loc = Location(uri=str(path.resolve()))
                self.by_key.setdefault(path.stem, loc)
                url = _url_from_sidecar(path.with_suffix(".json"))
                if url:
                    self.by_url.setdefault(url, loc)

    def find(self, row_id: str | None, url: str | None) -> Location | None:
        if row_id is not None and str(row_id) in self.by_key:
            return self.by_key[str(row_id)]
        if url:
            return self.by_url.get(url)
        return None

    def __len__(self) -> int:
        return len({*self.by_key.values(), *self.by_url.values()})

    def _index_tar(self, path: Path) -> None:
        for tf, entry in iter_tar_entries(path):
            member = image_member(entry)
            if member is None:
                continue
            loc = tar_location(path, member)
            self.by_key.setdefault(entry.key.rpartition("/")[2], loc)
            meta = entry.members.get("json")
            if meta is not None:
                url = _url_from_json(tar_member_bytes(tf, meta))
                if url:
                    self.by_url.setdefault(url, loc)


def _url_from_sidecar(path: Path) -> str | None:
    return _url_from_json(path.read_bytes()) if path.exists() else None


def _url_from_json(raw: bytes) -> str | None:
    try:
        url = json.loads(raw).get("url")
    except (ValueError, AttributeError):
        return None
    return url if isinstance(url, str) else None
