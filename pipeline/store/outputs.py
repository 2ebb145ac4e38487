"""Where a command may write what the user asked for (`--output`): the one check every output path passes.

The store touches only itself: an output named by the user lies outside the store, or inside the
store's own `reports/` folder where a command allows it (`own="reports"`), never on a file the store
holds (its manifest, a shard, a dataset folder). And it replaces only a regular file: a device, a
FIFO, a socket, a symbolic link or a directory at the path is refused, so `--output /dev/null` run as
root leaves /dev/null a device. `atomic.atomic_write` refuses the same things at the moment it
renames, so a path that changed after this check is still never replaced by a file.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pipeline.errors import PipelineError
from pipeline.store.atomic import not_regular
from pipeline.store.layout import Store

# Names the store writes itself inside a folder that takes outputs: an output never replaces them.
_OWN_NAMES = {"reports": ("index.html",)}


def check_output(store: Store | None, path: Path, kind: Literal["file", "directory"] = "file",
                 own: str | None = None, flag: str = "--output", beside: Iterable[Path] = ()) -> Path:
    """Refuse `path` as an output with one sentence, or return it as an absolute path.

    `kind`: a file the command writes (its folder must exist), or a directory it writes files into
    (created if missing). `own`: the store folder (e.g. "reports") that may take the output; elsewhere
    inside `store` is refused. `beside`: other files the command writes next to `path` (landscape's
    JSON), checked the same way. `store` None: a command without a store (a detector folder)."""
    target = _absolute(path)
    for checked in (target, *(_absolute(p) for p in beside)):
        shown = path if checked == target else checked  # (a file beside is named as it is)
        _refuse_inside(store, checked, shown, own, flag)
        _refuse_special(checked, shown, kind if checked == target else "file", flag)
    if kind == "file":
        parent = target.parent
        if not parent.is_dir():
            raise PipelineError(f"{flag} {path}: the folder {parent} does not exist.")
        if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
            raise PipelineError(f"{flag} {path} cannot be written (permission denied).")
    else:
        existing = next((p for p in (target, *target.parents) if os.path.lexists(p)), None)
        if existing is not None and not existing.is_dir():
            raise PipelineError(f"{flag} {path}: {existing} is not a directory.")
        if existing is not None and not os.access(existing, os.W_OK):
            raise PipelineError(f"{flag} {path} cannot be written (permission denied).")
    return target


def _absolute(path: Path) -> Path:
    """The path with its folder resolved (links followed) but its last name kept as given, so a link
    at the path itself is seen and refused rather than followed."""
    path = Path(os.path.abspath(Path(path).expanduser()))
    return path.parent.resolve() / path.name if path.name else path


def _refuse_inside(store: Store | None, target: Path, given: Path, own: str | None, flag: str) -> None:
    if store is None:
        return
    root = store.root.expanduser().resolve()
    if target != root and root not in target.parents:
        return
    if own is not None:
        folder = root / own
        inside = target.relative_to(folder).parts if folder in target.parents else ()
        if inside and not (len(inside) == 1 and inside[0] in _OWN_NAMES.get(own, ())):
            return
        raise PipelineError(f"{flag} {given} is inside the store {store.root}: write it outside the store, "
                            f"or under {store.root / own}/ in a name of your own.")
    raise PipelineError(f"{flag} {given} is inside the store {store.root}; the store holds only its own "
                        "files: write it elsewhere.")


def _refuse_special(target: Path, given: Path, kind: str, flag: str) -> None:
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise PipelineError(f"{flag} {given} cannot be checked ({exc.strerror or exc}).") from exc
    if kind == "directory":
        if stat.S_ISDIR(st.st_mode):
            return
        what = "a file" if stat.S_ISREG(st.st_mode) else not_regular(st.st_mode)
        raise PipelineError(f"{flag} {given} is {what}, not a directory; give a folder to write into.")
    if stat.S_ISREG(st.st_mode):
        return
    if stat.S_ISDIR(st.st_mode):
        raise PipelineError(f"{flag} {given} is a directory; give a file name.")
    raise PipelineError(f"{flag} {given} is {not_regular(st.st_mode)}; the pipeline replaces only a regular "
                        "file: give the name of a new or regular file.")
