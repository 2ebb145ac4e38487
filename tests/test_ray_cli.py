"""Ray as a user meets it: through the command, with the CLI's own progress reporter. A sweep runs on
Ray Tune (its callback pickles: no reporter inside), an encode starts its own Ray instance and leaves
no worker, no session folder and no scratch folder behind, says nothing of Ray's own logs, and an
address where no cluster answers is one sentence, not minutes of retries. Marked `ray` (skipped where
Ray is not installed); each test starts at most one 2-CPU local instance."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.store import catalog
from pipeline.store.layout import Store
from tests.conftest import planted_store

pytest.importorskip("ray")
pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _cli(*args: str, env: dict[str, str] | None = None,
         timeout: float = 600) -> tuple[int, subprocess.CompletedProcess[str]]:
    """Run `pipeline ARGS` in a process of its own (Ray's own settings cleared); its pid and outcome."""
    clean = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_BACKEND_LOG_LEVEL")}
    with subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True,
                          env={**clean, "PYTHONPATH": str(REPO), **(env or {})}) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:
            proc.kill()
    return proc.pid, subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture
def http_server() -> Iterator[str]:
    """A TCP server that speaks HTTP/1 (not a Ray head): it answers every connection with a 400."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    server.close()


def test_an_address_where_no_cluster_answers_is_one_sentence(d3_store: Store, http_server: str) -> None:
    # Ray itself retries such addresses for minutes (measured: over 5 min for 127.0.0.1:1); the timeout
    # here only turns that hang into a failure
    for address, said in (("127.0.0.1:1", "No Ray cluster answers at --ray-address 127.0.0.1:1"),
                          (http_server, f"The server at --ray-address {http_server} is not a Ray cluster's head"),
                          ("nowhere", "--ray-address nowhere must be auto or HOST:PORT")):
        _, done = _cli("encode", "--model", "Tiny-ViT-16", "--store", str(d3_store.root), "--engine", "ray",
                       "--ray-address", address, timeout=240)
        text = " ".join(done.stderr.split())
        assert done.returncode == 2 and said in text and "Traceback" not in text, text
    assert not catalog.query(d3_store, "SELECT * FROM embeddings").num_rows


def _processes_with(marker: str) -> list[str]:
    """Command lines of the processes whose environment holds `marker` (Ray's processes inherit the
    driver's environment, so this finds them whatever their names)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds Ray's processes through /proc")
def test_a_ray_encode_through_the_cli_is_quiet_and_leaves_nothing_behind(d3_store: Store) -> None:
    marker = f"PIPELINE_TEST_RUN={uuid.uuid4().hex}"
    key, value = marker.split("=")
    pid, done = _cli("encode", "--model", "Tiny-ViT-16", "--store", str(d3_store.root), "--engine", "ray",
                     "--batch-size", "8", "--shard-rows", "16", env={key: value})
    assert done.returncode == 0, done.stderr[-2000:]
    said = " ".join(done.stdout.split())
    assert "encoded" in said and " on ray:" in said
    # Ray's own lines (core_worker.cc … max_restarts, logging.cc, Ray Data's warnings) stay off the terminal
    lines = [line for line in done.stderr.splitlines() if line.strip() and not set(line) <= set(" ━")]
    assert not [line for line in lines if ".cc:" in line or "WARNING" in line or "INFO" in line], lines
    assert not _processes_with(marker)  # no actor, raylet or GCS of this run still running
    # Ray names a session folder by the time and the pid of the process that started it
    assert not list((Path(tempfile.gettempdir()) / "ray").glob(f"session_*_{pid}"))
    assert not (d3_store.root / "staging").exists() and not d3_store.work_dir.exists()
    texts = catalog.query(d3_store, "SELECT count(DISTINCT text_hash) FROM samples").column(0)[0].as_py()
    assert catalog.query(d3_store, "SELECT count(*) FROM embeddings WHERE modality = 'text'").column(0)[0].as_py() \
        == texts


def test_a_ray_sweep_through_the_cli_with_its_progress_reporter(tmp_path: Path) -> None:
    store = planted_store(tmp_path, rows=120)
    grid = tmp_path / "grid.toml"
    grid.write_text("[base]\nepochs = 2\nbatch_size = 64\n[grid]\nlr = [0.001, 0.003]\n")
    result = runner.invoke(app, ["sweep", "--grid", str(grid), "--store", str(store.root), "--engine", "ray"])
    assert result.exit_code == 0, result.output[-3000:]
    assert "Traceback" not in result.output and "2/2" in result.output  # the bar the Tune callback advanced
    runs = catalog.query(store, "SELECT run_id FROM runs").column(0).to_pylist()
    assert len(runs) == 2 and all(r in result.output for r in runs)
    assert not (store.work_dir / "tune").exists()
    again = runner.invoke(app, ["sweep", "--grid", str(grid), "--store", str(store.root), "--engine", "ray",
                                "--scheduler", "asha"])
    assert again.exit_code == 0 and again.output.count("skipped (exists)") == 2, again.output[-3000:]
    assert catalog.query(store, "SELECT count(*) FROM runs").column(0)[0].as_py() == 2
    assert not store.work_dir.exists() or not any(store.work_dir.iterdir())
