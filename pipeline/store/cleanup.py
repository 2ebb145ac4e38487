"""What the store holds besides its committed shards, and how it goes without harming a live process.

Three kinds of files are not committed shards: leftovers of dead processes (temp files and scratch
folders named with their owner's pid, a killed encode's pending lists), derived caches under
`STORE/cache/` (rebuilt when next needed) and reports. This module finds them and measures them; the
deleting is `pipeline.store.writes` (under the writer lock) and `clear_cache` (under a cache's build
lock, skipping what a reader pins). Nothing here touches a committed shard.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pipeline.store import cache
from pipeline.store.atomic import pid_alive, stale_temps
from pipeline.store.layout import Store

# Scratch folders of one process each, named with its pid (`keys.scratch_dir`, perturb's spill,
# the real-images index being built): its owner's death makes them leftovers.
_SCRATCH = re.compile(r"^(keys|perturb-tmp)-(?P<pid>\d+)$|^\.building-(?P<builder>\d+)-[0-9a-f]+$")


@dataclass(frozen=True)
class Removed:
    """Files and bytes: what a deletion freed, or would free."""

    files: int = 0
    bytes: int = 0

    def __add__(self, other: Removed) -> Removed:
        return Removed(self.files + other.files, self.bytes + other.bytes)


def size_of(path: Path) -> Removed:
    """Files and bytes under `path` (a file or a folder; a symbolic link counts as itself, never followed)."""
    try:
        if path.is_symlink() or not path.is_dir():
            return Removed(1, path.lstat().st_size)
    except OSError:
        return Removed()
    total = Removed()
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += Removed(1, os.lstat(os.path.join(root, name)).st_size)
            except OSError:
                continue
    return total


def sizes(paths: Iterable[Path]) -> Removed:
    return sum((size_of(p) for p in paths), Removed())


def delete(path: Path) -> None:
    """Delete a file or a folder (a symbolic link itself, never what it points to)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def dead_leftovers(store: Store, writer_free: bool) -> list[Path]:
    """Temp files and scratch folders whose owner is dead. `writer_free`: no process holds the writer
    lock (or this one does), so scratch only a writer makes (ingest's re-check spill, encode's pending
    lists and spill) is a dead writer's too. Staged shards are not leftovers: the next writer adopts them.
    Cost: a walk of the store's folder names (the datasets' files included, for temp names)."""
    found: list[Path] = list(stale_temps(store.root))
    for folder in (store.root / "cache", store.root / "cache" / "real-images"):
        for entry in sorted(folder.iterdir()) if folder.is_dir() else ():
            match = _SCRATCH.match(entry.name)
            if match and not pid_alive(int(match["pid"] or match["builder"])):
                found.append(entry)
            elif writer_free and entry.name.startswith(".recheck-") and folder.name == "cache":
                found.append(entry)
    if writer_free:
        for name in ("pending", "duckdb-tmp"):
            work = store.work_dir / name
            if work.is_dir():
                found.extend(sorted(work.iterdir()))
    return found


def empty_folders(root: Path) -> list[Path]:
    """Folders under `root` holding no file at any depth, deepest first (staging left by finished workers)."""
    if not root.is_dir():
        return []
    found = []
    for folder, _dirs, files in os.walk(root, topdown=False):
        path = Path(folder)
        if path != root and not files and all(p in found for p in path.iterdir()):
            found.append(path)
    return found


def cache_units(store: Store) -> list[Path]:
    """Every cache folder built under its own lock (`cache.building`: views, vector layouts), and the
    folders only the writer builds (`keys`, `real-images`); the unit `clear_cache` removes whole."""
    root = store.root / "cache"
    if not root.is_dir():
        return []
    locked = sorted(lock.parent for lock in root.rglob(".lock"))
    writer_only = [root / name for name in ("keys", "real-images") if (root / name).is_dir()]
    return [*locked, *writer_only]


def stale_cache_units(store: Store, model_keys: set[str], run_ids: set[str]) -> list[Path]:
    """Cache units of models the store no longer holds (their vectors' layouts, training views and key
    lookups), and the out-of-distribution references of runs it no longer holds (`cache/ood/<model>/<run>`)."""
    units: list[Path] = []
    for kind in ("vectors", "views", "rowkeys", "ood"):
        folder = store.root / "cache" / kind
        for model in sorted(folder.iterdir()) if folder.is_dir() else ():
            if not model.is_dir():
                continue
            if model.name not in model_keys:
                units.extend(u for u in cache_units(store) if u.is_relative_to(model))
            elif kind == "ood":
                units.extend(u for u in cache_units(store) if u.parent == model and u.name not in run_ids)
    return units


def clear_cache(unit: Path, dry_run: bool = False) -> Removed | None:
    """Empty a cache unit (`cache.clear`: under its build lock, never under a reader's pin); None when in use."""
    cleared = cache.clear(unit, dry_run)
    return None if cleared is None else Removed(*cleared)
