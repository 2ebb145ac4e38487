"""One writer per store: a second writer waits or stops with a sentence, readers never wait,
two real processes writing at once double nothing, and only dead writers' temp files are swept."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.errors import PipelineError
from pipeline.stages import ingest
from pipeline.store import catalog, lock, writes
from pipeline.store.atomic import remove_stale_temps
from pipeline.store.layout import Store
from pipeline.store.writes import writing
from pipeline.synthetic import SyntheticD3

ROOT = Path(__file__).resolve().parents[1]
HOLD = """
import sys, time
from pathlib import Path
from pipeline.store.layout import Store
from pipeline.store.writes import writing
with writing(Store(Path(sys.argv[1]))):
    print("HELD", flush=True)
    time.sleep(float(sys.argv[2]))
"""
INGEST = """
import sys
from pathlib import Path
from pipeline.stages.ingest import IngestConfig, run
from pipeline.store.layout import Store
r = run(IngestConfig(Path(sys.argv[2]), "d3", Store(Path(sys.argv[1])), real_images=Path(sys.argv[3]), shard_rows=7))
print("ADDED", r.added, flush=True)
"""


def _python(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def _hold(store: Store, seconds: float) -> subprocess.Popen[str]:
    p = _python(HOLD, str(store.root), str(seconds))
    assert p.stdout is not None and p.stdout.readline().strip() == "HELD"
    return p


def test_second_writer_stops_with_a_sentence_naming_the_holder(d3_store: Store, d3: SyntheticD3) -> None:
    holder = _hold(d3_store, 30)
    try:
        with pytest.raises(PipelineError, match=rf"Another process \(pid {holder.pid} on .*--wait"):
            ingest.run(ingest.IngestConfig(d3.parquet, "d3", d3_store, real_images=d3.real_images, wait=False))
        # readers never wait for the writer
        started = time.monotonic()
        assert catalog.query(d3_store, "SELECT count(*) FROM samples").column(0)[0].as_py() == 59
        assert time.monotonic() - started < 20  # generous: only that it did not block for the holder
    finally:
        holder.kill()
        holder.communicate()


def test_writing_commands_take_no_wait_from_the_cli(d3_store: Store) -> None:
    from typer.testing import CliRunner

    from pipeline.cli import app

    holder = _hold(d3_store, 60)
    try:
        store = str(d3_store.root)
        for args in (["encode", "--model", "Tiny-ViT-16", "--workers", "0"], ["index", "build"], ["leaks"]):
            result = CliRunner().invoke(app, [*args, "--store", store, "--no-wait"])
            assert result.exit_code == 2, (args, result.output)
            assert "Another process" in result.output and "Traceback" not in result.output, (args, result.output)
    finally:
        holder.kill()
        holder.communicate()


def test_second_writer_waits_then_proceeds(d3_store: Store, d3: SyntheticD3) -> None:
    holder = _hold(d3_store, 1.5)
    notes: list[str] = []

    class Notes:
        def start(self, *a: object, **k: object) -> None: ...
        def advance(self, *a: object, **k: object) -> None: ...
        def note(self, text: str) -> None:
            notes.append(text)
        def event(self, *a: object, **k: object) -> None: ...

    result = ingest.run(ingest.IngestConfig(d3.parquet, "d3", d3_store, real_images=d3.real_images),
                        Notes())  # type: ignore[arg-type]
    holder.communicate()
    assert result.added == 0
    assert any(f"pid {holder.pid}" in n and "waiting" in n for n in notes)


def test_two_ingests_at_once_double_nothing(tmp_path: Path, d3: SyntheticD3) -> None:
    store = Store(tmp_path / "s")
    procs = [_python(INGEST, str(store.root), str(d3.parquet), str(d3.real_images)) for _ in range(2)]
    outs = [p.communicate() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    added = sorted(int(o[0].split()[-1]) for o in outs)
    assert added == [0, 59]
    row = catalog.query(store, "SELECT count(*) AS n, count(DISTINCT sample_id) AS d FROM samples").to_pylist()[0]
    assert row == {"n": 59, "d": 59}


def test_the_lock_is_reentrant_and_released(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    with writing(store, create=True):
        with writing(store):
            assert lock.holds(store)
        assert lock.holds(store)
    assert not lock.holds(store)
    assert lock.holder(store) is None


def test_only_dead_writers_temps_are_swept(tmp_path: Path) -> None:
    directory = tmp_path / "samples"
    directory.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = lock.owner().rpartition(":")[0]
    host = "".join(c if c.isalnum() or c == "-" else "-" for c in host)[:40]
    live_tmp = directory / f".samples-1.parquet.{host}~{sleeper.pid}~0123abcd.tmp"
    dead_tmp = directory / f".samples-2.parquet.{host}~{dead.pid}~0123abcd.tmp"
    old_style = directory / ".samples-3.parquet.0123abcd.tmp"
    for p in (live_tmp, dead_tmp, old_style):
        p.write_bytes(b"half")
    try:
        assert remove_stale_temps(tmp_path) == 2
        assert live_tmp.exists() and not dead_tmp.exists() and not old_style.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert remove_stale_temps(tmp_path) == 1


def test_store_that_is_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "store"
    path.write_text("not a store")
    with pytest.raises(PipelineError, match="is a file, not a store directory"):
        with writing(Store(path)):
            pass


def test_staged_shards_are_committed_by_the_lock_holder_or_adopted_by_the_next(d3_store: Store) -> None:
    """A distributed encode: workers write complete shards under staging/, the lock holder commits."""
    import shutil

    samples = catalog.shard_paths(d3_store, "samples")[0]
    final = d3_store.dataset_dir("samples") / "samples-worker-1.parquet"
    staged = d3_store.staged(final)
    staged.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(samples, staged)  # a worker's complete shard (a copy: its rows count twice, visibly)
    assert _samples_count(d3_store) == 59  # staged files are invisible to readers
    with writing(d3_store):
        assert writes.commit_staged(d3_store, [staged]) == [final]
    assert _samples_count(d3_store) == 2 * 59 and not staged.exists()
    orphan = d3_store.staged(d3_store.dataset_dir("samples") / "samples-worker-2.parquet")
    shutil.copy(samples, orphan)  # its driver died before committing it
    with writing(d3_store):  # the next writer adopts it
        pass
    assert _samples_count(d3_store) == 3 * 59


def test_commits_outside_the_lock_are_refused(d3_store: Store) -> None:
    with pytest.raises(RuntimeError, match="outside the writer lock"):
        writes.commit(d3_store, [])


def _samples_count(store: Store) -> int:
    return catalog.query(store, "SELECT count(*) FROM samples").column(0)[0].as_py()


def test_a_no_op_encode_never_waits_for_another_writer(d3_store: Store) -> None:
    """Nothing pending is a reader's answer: `pipeline encode` says so at once while another process
    holds the writer lock (it takes the lock only when there is work)."""
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.stages.encode import run as encode
    from tests.conftest import encode_config

    encode(encode_config(d3_store))
    holder = _hold(d3_store, 60)
    try:
        result = CliRunner().invoke(app, ["encode", "--model", "Tiny-ViT-16", "--store", str(d3_store.root),
                                          "--no-wait"])
        assert result.exit_code == 0 and "nothing to encode" in result.output, result.output
    finally:
        holder.kill()
        holder.communicate()


# --- the lock file is the store's own (issue 19, items 2 and 3) --------------------------------------

def _cli(*args: str) -> tuple[int, str]:
    from typer.testing import CliRunner

    from pipeline.cli import app

    result = CliRunner().invoke(app, list(args))
    assert "Traceback" not in result.output, result.output
    return result.exit_code, " ".join(result.output.split())


def test_a_lock_file_that_is_a_link_or_a_fifo_is_refused_and_nothing_written_through_it(
        d3_store: Store, tmp_path: Path) -> None:
    precious = tmp_path / "bashrc"
    precious.write_text("export PATH=/usr/bin\n")
    d3_store.lock_path.unlink()  # (left by the ingest that made the store)
    d3_store.lock_path.symlink_to(precious)  # as a store received in a tar may hold
    rc, out = _cli("verify", "--repair", "--store", str(d3_store.root))
    assert rc == 2 and "is a symbolic link" in out, out
    assert precious.read_text() == "export PATH=/usr/bin\n" and d3_store.lock_path.is_symlink()
    d3_store.lock_path.unlink()
    os.mkfifo(d3_store.lock_path)
    rc, out = _cli("verify", "--repair", "--store", str(d3_store.root))  # (no hang on the FIFO either)
    assert rc == 2 and "is not a regular file" in out, out


def test_a_holder_whose_lock_file_was_removed_commits_nothing_more(d3_store: Store) -> None:
    shard = catalog.shard_paths(d3_store, "samples")[0]
    with writing(d3_store):
        d3_store.lock_path.unlink()  # (another writer could now create and lock a new one)
        copy = write_samples_copy(shard)
        with pytest.raises(PipelineError, match=r"lock file .*\.lock was removed while this process held it"):
            writes.commit(d3_store, [copy])
        assert not copy.exists()  # a file it could not commit is not left for a reconcile to adopt
    with writing(d3_store):  # the next writer makes a new lock file and goes on
        pass
    assert _samples_count(Store(d3_store.root)) == 59


def write_samples_copy(shard: Path) -> Path:
    import shutil

    copy = shard.with_name("samples-9999999999999-00000000.parquet")
    shutil.copy(shard, copy)
    return copy


PAUSED_ENCODE = """
import sys
from pathlib import Path
from pipeline.encoding.clip import ModelSpec
from pipeline.errors import PipelineError
from pipeline.stages import encode
from pipeline.store import writes
from pipeline.store.layout import Store

writes.COMMIT_EVERY_SHARDS = 2
original, calls = writes.commit_staged, []
def paused(store, staged):  # the second commit waits for the test: the first went through
    calls.append(1)
    if len(calls) == 2:
        print("PAUSED", flush=True)
        sys.stdin.readline()
    return original(store, staged)
writes.commit_staged = paused
try:
    encode.run(encode.EncodeConfig(Store(Path(sys.argv[1])), ModelSpec("Tiny-ViT-16"), workers=0,
                                   batch_size=4, shard_rows=4))
except PipelineError as exc:
    print("STOPPED", exc, flush=True)
"""


def test_two_encodes_with_the_lock_file_removed_between_them_double_nothing(d3_store: Store) -> None:
    """Issue 19 item 3: an encode holds the lock, `.lock` is deleted, a second encode starts. Before,
    both encoded everything (1,796 rows for 900 hashes); now the first stops at its next commit."""
    first = subprocess.Popen([sys.executable, "-c", PAUSED_ENCODE, str(d3_store.root)], cwd=ROOT, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert first.stdout is not None and first.stdin is not None
    try:
        assert first.stdout.readline().strip() == "PAUSED", first.stderr.read() if first.stderr else ""
        d3_store.lock_path.unlink()
        rc, out = _cli("encode", "--model", "Tiny-ViT-16", "--workers", "0", "--store", str(d3_store.root),
                       "--no-wait")
        assert rc == 0, out
        out_first, err_first = first.communicate("go\n", timeout=120)
    finally:
        first.kill()
    assert "STOPPED" in out_first and "was replaced while this process held it" in out_first, (out_first, err_first)
    hashes = catalog.query(Store(d3_store.root), "SELECT count(DISTINCT text_hash) + count(DISTINCT sample_id) "
                           "FILTER (WHERE sample_id NOT IN (SELECT content_hash FROM quarantine WHERE stage = "
                           "'decode')) FROM samples").column(0)[0].as_py()  # (one image of the fixture is truncated)
    rows = catalog.query(Store(d3_store.root), "SELECT count(*) AS n, count(DISTINCT (modality, content_hash)) "
                         "AS d FROM embeddings").to_pylist()[0]
    assert rows == {"n": hashes, "d": hashes}
    rc, out = _cli("encode", "--model", "Tiny-ViT-16", "--workers", "0", "--store", str(d3_store.root))
    assert rc == 0 and "nothing to encode" in out, out  # the first one's leftovers adopted without doubling
    rc, out = _cli("verify", "--store", str(d3_store.root))
    assert rc == 0 and "no damage found" in out, out
