"""A folder of Parquet parts that a long command fills unit by unit and a rerun resumes: `PartsFolder`.

A command whose `--output` names a directory (predict over a crawl) splits its ordered inputs into
fixed-size units and writes one part per unit, `part-NNNNN.parquet` (NNNNN: the unit's index), each
atomically (temp + rename). A part records itself: its Parquet metadata holds the unit's key (a digest
of the unit's inputs), so a part is committed exactly when its rename is done, and nothing else must
be updated after it (no log to rewrite, no order between two writes to get wrong). Beside the parts,
`_command.json` (written once, atomically, before the first part) names the command that owns the
folder: a rerun of the same command skips every unit whose part holds the same key and redoes the
others; a different command is refused in one sentence unless `force`, which empties the folder's
parts first. `finish` removes the parts of units the inputs no longer have and stamps the file
complete, with the row count. One command writes into a folder at a time: it holds an flock on
`DIR/.lock` (a second is refused in one sentence) until `close`.

Cost: one footer read per existing part when the folder is opened (thousands at 11.5M images: a
second), a set of (index, key) pairs in memory: O(units), never O(rows).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.store.atomic import atomic_write, remove_stale_temps_of, write_text

COMMAND_FILE = "_command.json"
FORMAT = "clipdetect-parts"
_PART = re.compile(r"^part-(\d{5,})\.parquet$")
_KEY = b"pipeline.unit_key"


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def unit_key(rows: pa.Table, columns: Iterable[str]) -> str:
    """A digest of a unit's inputs: the given columns of its rows, in order (nulls distinct from '')."""
    digest = hashlib.sha256()
    names = list(columns)
    for row in rows.select(names).to_pylist():
        digest.update(json.dumps([row[n] for n in names]).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()[:32]


class PartsFolder:
    """The parts of `folder` owned by `command` (plain JSON data: what the rows depend on)."""

    def __init__(self, folder: Path, schema: pa.Schema, command: dict[str, Any], force: bool = False,
                 flag: str = "--output") -> None:
        self.folder, self.schema = Path(folder), schema
        self.command = command
        self._lock: int | None = None
        self.digest = hashlib.sha256(json.dumps(command, sort_keys=True).encode("utf-8")).hexdigest()[:32]
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = _lock(self.folder, flag)
        try:
            self._open(force, flag)
        except BaseException:
            self.close()
            raise

    def _open(self, force: bool, flag: str) -> None:
        folder = self.folder
        found = self._read_command()
        if found is not None and found.get("digest") != self.digest:
            if not force:
                raise PipelineError(
                    f"{flag} {folder} holds the parts of another command ({_describe(found.get('command'))}); "
                    "give an empty folder, or --force to replace its parts.")
            self._remove_parts(self._parts())
            found = None
        elif found is None and self._parts():
            if not force:
                raise PipelineError(f"{flag} {folder} holds part-*.parquet files that no command of this pipeline "
                                    f"recorded (no {COMMAND_FILE}); give an empty folder, or --force to replace them.")
            self._remove_parts(self._parts())
        self._sweep_temps()
        write_text(self.folder / COMMAND_FILE, json.dumps({
            "format": FORMAT, "digest": self.digest, "command": self.command, "complete": False}, indent=1))
        self.done = self._committed()

    def close(self) -> None:
        """Let another command write into the folder."""
        if self._lock is not None:
            os.close(self._lock)  # (closing the descriptor releases its flock)
            self._lock = None

    def __enter__(self) -> PartsFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def is_done(self, index: int, key: str) -> bool:
        return self.done.get(index) == key

    def commit(self, index: int, key: str, table: pa.Table) -> Path:
        """Write unit `index`'s rows as its part, atomically; the part holds `key` (its record)."""
        table = table.cast(self.schema)
        metadata = dict(table.schema.metadata or {})
        metadata[_KEY] = key.encode()
        path = self.folder / part_name(index)
        atomic_write(path, lambda tmp: pq.write_table(table.replace_schema_metadata(metadata), tmp,
                                                      compression="zstd"))
        self.done[index] = key
        return path

    def finish(self, units: int, rows: int) -> list[Path]:
        """Remove the parts of units past `units` (the inputs shrank); stamp the command complete."""
        stale = {i: p for i, p in self._parts().items() if i >= units}
        self._remove_parts(stale)
        for i in stale:
            self.done.pop(i, None)
        write_text(self.folder / COMMAND_FILE, json.dumps({
            "format": FORMAT, "digest": self.digest, "command": self.command, "complete": True, "units": units,
            "rows": rows}, indent=1))
        return [self.folder / part_name(i) for i in sorted(self.done)]

    # --- private ---------------------------------------------------------------------------

    def _read_command(self) -> dict[str, Any] | None:
        path = self.folder / COMMAND_FILE
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise PipelineError(f"{path} is not readable JSON ({exc}); remove it, or give another folder.") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise PipelineError(f"{path} was not written by this pipeline; give another folder.")
        return data

    def _parts(self) -> dict[int, Path]:
        found = {}
        for entry in os.scandir(self.folder):
            match = _PART.match(entry.name)
            if match and entry.is_file(follow_symlinks=False):
                found[int(match.group(1))] = Path(entry.path)
        return found

    def _committed(self) -> dict[int, str]:
        """Each whole part's unit key, from its footer (a part that does not read is redone)."""
        done = {}
        for index, path in self._parts().items():
            try:
                metadata = pq.read_metadata(path).schema.to_arrow_schema().metadata or {}
            except (OSError, pa.ArrowException):
                continue
            if _KEY in metadata:
                done[index] = metadata[_KEY].decode()
        return done

    def _remove_parts(self, parts: dict[int, Path]) -> None:
        for path in parts.values():
            path.unlink(missing_ok=True)

    def _sweep_temps(self) -> None:
        """Temps of parts (any index) that dead writers left: `remove_stale_temps_of` per name seen."""
        names = {m.group(0) for e in os.scandir(self.folder) if e.name.startswith(".part-")
                 and (m := re.match(r"part-\d{5,}\.parquet", e.name[1:]))}
        for name in names:
            remove_stale_temps_of(self.folder / name)


def _lock(folder: Path, flag: str) -> int:
    """An exclusive flock on FOLDER/.lock (opened without following a link), or a sentence if held."""
    try:
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise PipelineError(f"{flag} {folder}/.lock cannot be opened ({exc.strerror or exc}).") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise PipelineError(f"{flag} {folder} is being written by another command now; wait for it to end (a "
                            "rerun then resumes where it stopped).") from None
    return fd


def _describe(command: Any) -> str:
    if not isinstance(command, dict):
        return "unknown"
    shown = {k: v for k, v in command.items() if k in ("detector", "sources")}
    text = ", ".join(f"{k} {v if not isinstance(v, list) else ' '.join(map(str, v[:3])) + (' …' if len(v) > 3 else '')}"
                     for k, v in shown.items())
    return text or "unknown"
