"""The bounded reader (`pipeline.sources.reading`) and `LocationReader` on hostile files: FIFOs and
devices never block and are never read, huge files are refused on `fstat`, no read goes past its
cap whatever the file claims, data-named paths stay inside their folders, changed bytes are named."""

from __future__ import annotations

import hashlib
import io
import os
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from pipeline.sources import reading
from pipeline.sources.common import DamagedArchive, iter_tar_entries
from pipeline.sources.locations import Location, LocationReader
from pipeline.sources.reading import CappedLines, Expected, Limits, Unreadable
from tests.conftest import jpeg

GB = 1024**3


def _within(seconds: float, call: Callable[[], Any]) -> Any:
    """`call()` in a thread that must finish in `seconds`: a read that blocks fails the test, not the suite."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"blocked for more than {seconds} s"
    if "error" in out:
        raise out["error"]
    return out.get("value")


def _reason(call: Callable[[], Any]) -> str:
    with pytest.raises(Unreadable) as info:
        _within(20, call)
    return info.value.reason


def _sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)  # a size that occupies no disk
    return path


def test_fifos_and_devices_are_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)  # no writer: a plain open would wait for one forever
    for path in (fifo, Path("/dev/zero"), tmp_path):
        assert _reason(lambda p=path: reading.read_file(p)) == "not_a_regular_file"
        assert _reason(lambda p=path: reading.hash_file(p)) == "not_a_regular_file"
    assert _reason(lambda: reading.read_range(fifo, 0, 10)) == "not_a_regular_file"
    assert _within(20, lambda: reading.read_text(fifo)) is None  # a sidecar that is a FIFO: no caption
    link = tmp_path / "to-pipe.jpg"
    link.symlink_to(fifo)
    assert _reason(lambda: reading.read_file(link)) == "not_a_regular_file"
    tar = tmp_path / "shard.tar"
    os.mkfifo(tar)  # ingest's tars and D3's Parquet files are opened the same way
    with pytest.raises(DamagedArchive, match="FIFO"):
        _within(20, lambda: list(iter_tar_entries(tar)))
    with pytest.raises(Unreadable, match="FIFO"):
        _within(20, lambda: reading.ensure_regular(tar))


def test_a_huge_file_is_refused_on_fstat_and_a_changed_size_unread(tmp_path: Path) -> None:
    huge = _sparse(tmp_path / "huge.jpg", 3 * GB // 2)
    with pytest.raises(Unreadable) as info:
        reading.read_file(huge)
    assert info.value.reason == "too_large" and "1610612736 bytes" in info.value.detail
    # recorded at ingest as 100 bytes: changed, seen before a byte is read
    assert _reason(lambda: reading.read_file(huge, expect=Expected(size=100))) == "changed_since_ingest"
    assert _reason(lambda: reading.read_range(huge, 0, 2 * GB)) == "too_large"
    assert reading.read_range(huge, GB, 4) == bytes(4)  # a member of a huge container is read alone


class _Endless(io.RawIOBase):
    """A stream that never ends, counting what it hands out."""

    def __init__(self) -> None:
        self.given = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = len(buffer)
        buffer[:n] = b"x" * n
        self.given += n
        return n


def test_no_read_goes_past_its_cap_whatever_the_file_claims(tmp_path: Path) -> None:
    endless = _Endless()
    assert reading.read_capped(endless, 3 << 20) is None and endless.given == (3 << 20) + 1
    endless = _Endless()
    assert reading.sha256_stream(endless, 1000) is None and endless.given == 1001
    status = Path("/proc/self/status")  # a regular file whose fstat says 0 bytes, yet it has more
    if status.exists() and status.stat().st_size == 0:
        assert _reason(lambda: reading.read_file(status, Limits(max_bytes=16))) == "too_large"
        assert _reason(lambda: reading.read_file(status, expect=Expected(size=0))) == "changed_since_ingest"


def test_changed_bytes_and_short_members_are_named(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    path.write_bytes(b"0123456789")
    sha = hashlib.sha256(b"0123456789").hexdigest()
    assert reading.read_file(path, expect=Expected(10, sha)) == b"0123456789"
    assert _reason(lambda: reading.read_file(path, expect=Expected(10, "0" * 64))) == "changed_since_ingest"
    assert reading.read_range(path, 2, 3, expect=Expected(3, hashlib.sha256(b"234").hexdigest())) == b"234"
    assert _reason(lambda: reading.read_range(path, 8, 5, expect=Expected(5))) == "changed_since_ingest"
    assert _reason(lambda: reading.read_range(path, 8, 5)) == "unreadable"
    assert _reason(lambda: reading.read_file(tmp_path / "gone.jpg")) == "unreadable"
    assert reading.hash_range(path, 2, 3) == (hashlib.sha256(b"234").hexdigest(), 3)


def test_paths_named_by_data_stay_inside_their_folders(tmp_path: Path) -> None:
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir()
    outside.mkdir()
    (inside / "ok.jpg").write_bytes(b"ok")
    (outside / "secret").write_bytes(b"secret")
    (inside / "escape.jpg").symlink_to(outside / "secret")
    (inside / "alias.jpg").symlink_to(inside / "ok.jpg")
    limits = Limits.within([inside])
    assert reading.read_file(inside / "ok.jpg", limits) == b"ok"
    assert reading.read_file(inside / "alias.jpg", limits) == b"ok"  # a link that stays inside is fine
    for path in (inside / "escape.jpg", inside / ".." / "out" / "secret", outside / "secret", Path("/etc/passwd")):
        assert _reason(lambda p=path: reading.read_file(p, limits)) == "outside_source"
    assert reading.read_file(inside / "escape.jpg") == b"secret"  # a path the user names: followed
    # the folder itself reached through a link is still inside
    (tmp_path / "in-link").symlink_to(inside)
    assert reading.read_file(tmp_path / "in-link" / "ok.jpg", Limits.within([tmp_path / "in-link"])) == b"ok"


def test_names_that_are_not_utf8_round_trip_as_file_uris(tmp_path: Path) -> None:
    raw = os.fsencode(tmp_path) + b"/caf\xe9 \xff%41.jpg"
    with open(raw, "wb") as f:
        f.write(b"bytes")
    name = os.fsdecode(raw)
    uri = reading.uri_of(name)
    assert uri.startswith("file:///") and "%E9" in uri and uri.encode("utf-8")
    assert reading.path_of(uri) == name and reading.read_file(uri) == b"bytes"
    assert reading.uri_of(tmp_path / "plain.jpg") == str(tmp_path / "plain.jpg")  # UTF-8 paths stay paths
    assert reading.path_of(str(tmp_path)) == str(tmp_path)
    assert reading.text_of(name).endswith("caf\\xe9 \\xff%41.jpg")
    with pytest.raises(Unreadable) as info:
        reading.read_file(uri, Limits(max_bytes=2))
    assert info.value.detail.encode("utf-8")  # messages are valid text: they land in Parquet


def _reference(data: bytes, cap: int) -> tuple[bytes, list[tuple[int, int]]]:
    out, dropped = [], []
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        if len(line) > cap:
            dropped.append((i + 1, len(line)))
        elif line or not last:
            out.append(line + (b"" if last else b"\n"))
    return b"".join(out), dropped


def test_capped_lines_drop_exactly_the_long_lines() -> None:
    rng = random.Random(0)
    for _ in range(2000):
        cap = rng.choice([1, 2, 3, 5, 8, 16, 100])
        data = b"".join(b"x" * rng.choice([0, 1, 2, 3, 5, 9, 20, 120]) + (b"\n" if rng.random() < 0.9 else b"")
                        for _ in range(rng.randint(0, 30)))
        capped = CappedLines(io.BytesIO(data), cap)
        got = b""
        while chunk := capped.read(rng.choice([1, 3, 7, 1000, -1])):
            got += chunk
        assert (got, capped.dropped) == _reference(data, cap), (cap, data)


def test_a_csv_read_through_capped_lines_keeps_every_other_row() -> None:
    long = "y" * (3 << 20)
    text = "path,caption\n" + "".join(f"{i}.jpg,c{i}\n" for i in range(5)) + f"x.jpg,{long}\n" + "5.jpg,c5\n"
    capped = CappedLines(io.BytesIO(text.encode()), 2 << 20)
    table = pacsv.read_csv(capped, read_options=pacsv.ReadOptions(block_size=4 << 20))
    assert table.column("path").to_pylist() == [f"{i}.jpg" for i in range(6)]
    assert capped.dropped == [(7, len("x.jpg,") + len(long))]


def test_parquet_cells_are_capped_checked_and_kept_beside_their_file(tmp_path: Path) -> None:
    (tmp_path / "d3").mkdir()
    (tmp_path / "outside.jpg").write_bytes(jpeg((1, 2, 3)))
    (tmp_path / "d3" / "beside.jpg").write_bytes(jpeg((3, 2, 1)))
    small, big = jpeg((5, 5, 5)), bytes(5000)
    cells = [{"bytes": small, "path": None}, {"bytes": big, "path": None}, {"bytes": None, "path": "beside.jpg"},
             {"bytes": None, "path": "../outside.jpg"}, {"bytes": None, "path": str(tmp_path / "outside.jpg")}]
    path = tmp_path / "d3" / "x.parquet"
    pq.write_table(pa.table({"image_gen0": cells}), path)
    reader = LocationReader(Limits(max_bytes=4000))

    def cell(row: int, expect: Expected | None = None) -> bytes:
        return reader.read(Location(str(path), "image_gen0", row), expect)

    assert cell(0, Expected(len(small), hashlib.sha256(small).hexdigest())) == small
    assert _reason(lambda: cell(0, Expected(len(small), "0" * 64))) == "changed_since_ingest"
    assert _reason(lambda: cell(0, Expected(len(small) + 1))) == "changed_since_ingest"
    assert _reason(lambda: cell(1)) == "too_large"
    assert cell(2) == jpeg((3, 2, 1))
    assert _reason(lambda: cell(3)) == "outside_source" and _reason(lambda: cell(4)) == "outside_source"
    assert _reason(lambda: cell(9, Expected(1))) == "changed_since_ingest"  # the file lost that row
