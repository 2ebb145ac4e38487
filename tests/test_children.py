"""Children die with their parent, and what a killed process leaves is swept by the next command,
reader or writer (issue 19, item 10): `sweep --jobs 2`'s workers, encode's decoding workers and their
forkserver, and the temp files a killed `report` leaves beside the scores."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from pipeline.children import alive, descendants
from pipeline.cli import app
from pipeline.store.atomic import temp_path
from pipeline.store.layout import Store
from pipeline.synthetic import make_d3
from tests.conftest import planted_store

ROOT = Path(__file__).resolve().parents[1]
CLI = "from pipeline.cli import main; main()"


def _helper(pid: int) -> bool:
    try:
        return b"resource_tracker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True


def _kill_parent_when(args: list[str], workers: int, timeout: float = 240) -> set[int]:
    """Start `pipeline ARGS`, wait until it has `workers` worker processes (besides multiprocessing's
    helpers), SIGKILL it alone, and return its descendants still running once they had time to end."""
    proc = subprocess.Popen([sys.executable, "-c", CLI, *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    family: set[int] = set()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            family |= descendants(proc.pid)
            if sum(not _helper(p) for p in family) >= workers:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the command ended before its workers started"
        family |= descendants(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        until = time.monotonic() + 30  # a condition to wait for, not a speed: they end within a second
        while time.monotonic() < until and any(alive(p) for p in family):
            time.sleep(0.2)
        return {p for p in family if alive(p)}
    finally:
        for p in family | {proc.pid}:
            if alive(p):
                os.kill(p, signal.SIGKILL)


def test_encode_workers_and_their_forkserver_end_with_a_killed_encode(tmp_path: Path) -> None:
    data = make_d3(tmp_path / "src", rows=80, size=64)
    store = tmp_path / "store"
    ingested = CliRunner().invoke(app, ["ingest", str(data.parquet), "--format", "d3", "--real-images",
                                        str(data.real_images), "--store", str(store)])
    assert ingested.exit_code == 0, ingested.output
    # the forkserver and two decoding workers forked by it
    left = _kill_parent_when(["encode", "--model", "Tiny-ViT-16", "--workers", "2", "--batch-size", "4",
                              "--store", str(store)], workers=3)
    assert not left, [Path(f"/proc/{p}/cmdline").read_bytes()[:120] for p in left]


def test_sweep_workers_end_with_a_killed_sweep(tmp_path: Path) -> None:
    store = planted_store(tmp_path, rows=300)
    grid = tmp_path / "grid.toml"
    grid.write_text("[grid]\nepochs = [200]\nseed = [0, 1, 2, 3]\nbatch_size = [16]\n")
    left = _kill_parent_when(["sweep", "--grid", str(grid), "--jobs", "2", "--store", str(store.root)], workers=2)
    assert not left, [Path(f"/proc/{p}/cmdline").read_bytes()[:120] for p in left]


def test_a_dead_readers_temp_files_are_swept_by_the_next_reader(d3_store: Store) -> None:
    """A killed `report` left `scores/.RUN-groups.parquet.*.tmp` until the next writer; now any command's
    first look at the store removes the temps of dead processes (never a live one's)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        scores = d3_store.dataset_dir("scores")
        scores.mkdir(exist_ok=True)
        mine = temp_path(scores / "RUN-report-groups.parquet")
        leftovers = [mine.with_name(mine.name.replace(f"~{os.getpid()}~", f"~{pid}~")) for pid in (dead.pid, live.pid)]
        page = temp_path(d3_store.root / "reports" / "run-RUN" / "index.html")
        leftovers.append(page.with_name(page.name.replace(f"~{os.getpid()}~", f"~{dead.pid}~")))
        for path in leftovers:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"half a file")
        result = CliRunner().invoke(app, ["status", "--store", str(d3_store.root)])
        assert result.exit_code == 0, result.output
        assert [p.exists() for p in leftovers] == [False, True, False]  # the live process' temp stays
    finally:
        live.kill()
        live.wait()
