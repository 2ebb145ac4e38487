"""`pipeline predict … --output DIR/`: Parquet parts written atomically, a rerun that resumes (every input
exactly once after a crash), another command refused, and `--engine ray` giving the local engine's rows."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from pipeline.errors import PipelineError
from pipeline.runs import predicting
from pipeline.store.layout import Store
from pipeline.store.parts import COMMAND_FILE, PartsFolder
from schemas import PREDICTIONS
from tests.test_predict import _cli, _images, trained  # noqa: F401 - `trained` is a fixture


def _parts(folder: Path) -> pa.Table:
    paths = sorted(folder.glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in paths]) if paths else pa.table({})


def _stamps(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("part-*.parquet")}


def _predict(store: Store, run_id: str, *args: str, code: int = 0) -> str:
    return _cli("predict", *args, "--run", run_id, "--store", str(store.root), "--workers", "0", "--batch-size", "4",
                "--shard-rows", "8", code=code)


def test_a_folder_output_holds_the_rows_of_a_file_output_and_a_rerun_skips_every_part(
        trained: tuple[Store, str], tmp_path: Path) -> None:  # noqa: F811
    store, run_id = trained
    images = _images(tmp_path / "new", 20, seed=3)
    (images / "broken.jpg").write_bytes(b"not an image")  # a reason, in its unit's part like any row
    _predict(store, run_id, str(images), "--output", str(tmp_path / "all.csv"))
    text = _predict(store, run_id, str(images), "--output", str(tmp_path / "out") + "/")
    folder = tmp_path / "out"
    assert "predicted 21 images" in text and "3 Parquet parts on local" in text, text
    assert sorted(p.name for p in folder.glob("part-*")) == ["part-00000.parquet", "part-00001.parquet",
                                                             "part-00002.parquet"]
    got, want = _parts(folder), pacsv.read_csv(tmp_path / "all.csv")
    assert got.column("path").to_pylist() == want.column("path").to_pylist()  # input order, each once
    assert got.column("score").to_pylist() == pytest.approx(want.column("score").to_pylist(), nan_ok=True)
    assert got.column("reason").to_pylist().count("not_an_image") == 1
    assert json.loads((folder / COMMAND_FILE).read_text())["complete"] is True

    stamps = _stamps(folder)
    again = _predict(store, run_id, str(images), "--output", str(folder))
    assert "predicted 0 images" in again and "21 images were in parts of an earlier run, skipped" in again, again
    assert _stamps(folder) == stamps  # not one part rewritten

    refused = _predict(store, run_id, str(images), "--output", str(folder), "--threshold", "0.9", code=2)
    assert "holds the parts of another command" in refused and "--force" in refused, refused
    assert _stamps(folder) == stamps
    forced = _predict(store, run_id, str(images), "--output", str(folder), "--threshold", "0.9", "--force")
    assert "predicted 21 images" in forced
    assert _parts(folder).column("threshold").to_pylist() == pytest.approx([0.9] * 21)


def test_a_crash_after_two_parts_then_a_rerun_gives_every_input_exactly_once(
        trained: tuple[Store, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    store, run_id = trained
    images = _images(tmp_path / "new", 30, seed=4)
    folder = tmp_path / "out"
    finish = predicting.PredictBatch.finish
    calls = {"n": 0}

    def failing(self: predicting.PredictBatch, *args: object, **kwargs: object) -> predicting.Predicted:
        calls["n"] += 1
        if calls["n"] == 5:  # batches of 4, parts of 8: two parts are whole, the third is half done
            raise PipelineError("simulated crash in the fifth batch")
        return finish(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(predicting.PredictBatch, "finish", failing)
    said = _predict(store, run_id, str(images), "--output", str(folder), code=2)
    assert "simulated crash" in said
    assert sorted(p.name for p in folder.glob("part-*")) == ["part-00000.parquet", "part-00001.parquet"]
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]  # the half-done part left no temp
    assert json.loads((folder / COMMAND_FILE).read_text())["complete"] is False
    stamps = _stamps(folder)

    monkeypatch.setattr(predicting.PredictBatch, "finish", finish)
    text = _predict(store, run_id, str(images), "--output", str(folder))
    assert "predicted 14 images" in text and "16 images were in parts of an earlier run, skipped" in text, text
    assert {k: v for k, v in _stamps(folder).items() if k in stamps} == stamps  # the two parts kept as they were
    paths = _parts(folder).column("path").to_pylist()
    assert sorted(paths) == sorted(str(p) for p in images.iterdir()) and len(set(paths)) == 30


def test_a_killed_predict_resumes_where_it_stopped(trained: tuple[Store, str], tmp_path: Path) -> None:  # noqa: F811
    store, run_id = trained
    images = _images(tmp_path / "new", 64, seed=8)
    folder = tmp_path / "out"
    command = [sys.executable, "-m", "pipeline.cli", "predict", str(images), "--run", run_id, "--store",
               str(store.root), "--output", str(folder), "--workers", "0", "--batch-size", "2", "--shard-rows", "4"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as proc:
        deadline = time.monotonic() + 300
        while len(list(folder.glob("part-*.parquet"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    written = len(list(folder.glob("part-*.parquet")))
    assert proc.returncode == -signal.SIGKILL and 3 <= written < 16, (proc.returncode, written)
    text = _cli("predict", str(images), "--run", run_id, "--store", str(store.root), "--output", str(folder),
                "--workers", "0", "--batch-size", "2", "--shard-rows", "4")
    assert f"predicted {64 - 4 * written} images" in text, text
    assert f"{4 * written} images were in parts of an earlier run, skipped" in text, text
    paths = _parts(folder).column("path").to_pylist()
    assert sorted(paths) == sorted(str(p) for p in images.iterdir()) and len(paths) == 64
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]  # the killed run's temp was swept


def test_folder_output_refusals_are_sentences(trained: tuple[Store, str], tmp_path: Path) -> None:  # noqa: F811
    store, run_id = trained
    images = _images(tmp_path / "new", 2, seed=5)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "part-00000.parquet").write_bytes(b"someone's")
    said = _predict(store, run_id, str(images), "--output", str(folder), code=2)
    assert "no command of this pipeline recorded" in said, said
    busy = tmp_path / "busy"
    with PartsFolder(busy, PREDICTIONS, {"another": "command"}):  # a command writing there now
        said = _predict(store, run_id, str(images), "--output", str(busy), code=2)
    assert "is being written by another command now" in said, said
    said = _predict(store, run_id, str(images), "--output", os.devnull, code=2)  # no suffix: taken as a folder
    assert "is a character device, not a directory; give a file ending in .csv, .json or .parquet, or a " \
           "folder (DIR/)" in said and "Traceback" not in said, said
    said = _predict(store, run_id, str(images), "--output", f"{os.devnull}/x.csv", code=2)  # under a device
    assert f"{os.devnull} is a character device, not a folder to write into." in said and "Traceback" not in said
    assert "predicted 2 images" in _predict(store, run_id, str(images), "--output", str(busy), "--force")
    said = _predict(store, run_id, str(images), "--engine", "ray", "--keep", "--output", str(tmp_path / "o"), code=2)
    assert "--keep cannot go with --engine ray" in said, said
    said = _predict(store, run_id, str(images), "--engine", "ray", "--output", str(tmp_path / "o.csv"), code=2)
    assert "--engine ray writes Parquet parts into a folder" in said, said
    said = _predict(store, run_id, str(images), "--actors", "2", code=2)
    assert "need --engine ray" in said, said
    said = _predict(store, run_id, str(images), "--engine", "ray", "--ray-address", "127.0.0.1:1", "--output",
                    str(tmp_path / "o"), code=2)
    assert "No Ray cluster answers at --ray-address 127.0.0.1:1" in said and "Traceback" not in said, said
    assert not (tmp_path / "o").exists()


def test_the_python_api_predicts_into_a_folder_and_resumes(trained: tuple[Store, str],  # noqa: F811
                                                           tmp_path: Path) -> None:
    from pipeline import Detector

    store, run_id = trained
    images = _images(tmp_path / "new", 10, seed=7)
    detector = Detector.load(run_id, store=store.root)
    first = detector.predict_to(tmp_path / "out", [images], shard_rows=4, batch_size=4)
    assert (first.inputs, first.parts, first.resumed) == (10, 3, 0)
    again = detector.predict_to(tmp_path / "out", [images], shard_rows=4, batch_size=4)
    assert (again.inputs, again.parts, again.resumed) == (0, 3, 10)
    table = detector.predict([images])
    assert _parts(tmp_path / "out").column("sha256").equals(table.column("sha256"))


def test_what_a_ray_actor_runs_gives_the_rows_of_predict(trained: tuple[Store, str],  # noqa: F811
                                                        tmp_path: Path) -> None:
    """`PredictWorker` pickles, builds its detector where it is called (a run, or an exported folder) and
    predicts a unit in batches with decoding a batch ahead: the rows `predict` gives, in order."""
    import pickle

    from pipeline.runs.predicting import PredictOptions, PredictWorker
    from pipeline.sources.inputs import inputs
    from pipeline.stages.predict import _units_of

    store, run_id = trained
    images = _images(tmp_path / "new", 10, seed=9)
    (images / "broken.png").write_bytes(b"\x89PNG broken")
    _cli("export", "--run", run_id, "--store", str(store.root), "--output", str(tmp_path / "exported"))
    for where, args in (("run", ("--run", run_id, "--store", str(store.root))),
                        ("folder", ("--detector", str(tmp_path / "exported")))):
        want = tmp_path / f"{where}.parquet"
        _cli("predict", str(images), *args, "--output", str(want), "--workers", "0")
        worker = PredictWorker(str(store.root) if where == "run" else None, run_id if where == "run" else None,
                               str(tmp_path / "exported") if where == "folder" else None, PredictOptions(), 3)
        listed = tmp_path / f"{where}-inputs.parquet"
        pq.write_table(pa.concat_tables(inputs([images])), listed)
        unit = pickle.loads(pickle.dumps(worker))()
        done = [unit(rows) for rows in _units_of(listed, 8)]  # units of 8 rows, batches of 3
        got, expected = pa.concat_tables([d.rows for d in done]), pq.read_table(want)
        assert got.column("path").equals(expected.column("path")), where
        assert got.column("score").to_pylist() == pytest.approx(expected.column("score").to_pylist(), nan_ok=True)
        assert got.column("reason").to_pylist() == expected.column("reason").to_pylist()
        assert sum(d.encoded + d.cached for d in done) == 10


@pytest.mark.ray
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed")
def test_ray_engine_gives_the_local_engines_rows_and_resumes_them(
        trained: tuple[Store, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    from tests.test_ray_cli import _processes_with

    store, run_id = trained
    images = _images(tmp_path / "new", 24, seed=6)
    local, ray = tmp_path / "local", tmp_path / "ray"
    _predict(store, run_id, str(images), "--output", str(local))
    marker = uuid.uuid4().hex  # Ray's processes inherit this process' environment: found by it afterwards
    monkeypatch.setenv("PIPELINE_TEST_RUN", marker)
    text = _predict(store, run_id, str(images), "--output", str(ray), "--engine", "ray", "--actors", "2")
    assert not _processes_with(f"PIPELINE_TEST_RUN={marker}")  # no actor, raylet or GCS still running
    assert "predicted 24 images" in text and "3 Parquet parts on ray:2xcpu" in text, text
    assert "Traceback" not in text
    for name in ("part-00000.parquet", "part-00001.parquet", "part-00002.parquet"):
        a, b = pq.read_table(local / name), pq.read_table(ray / name)
        assert a.column("path").equals(b.column("path")) and a.column("sha256").equals(b.column("sha256"))
        assert a.column("score").to_pylist() == pytest.approx(b.column("score").to_pylist(), abs=1e-6)
        assert a.column("generated").equals(b.column("generated")) and a.column("ood").equals(b.column("ood"))
    # a part lost (as if the run died before it): the rerun on Ray redoes that unit alone
    (ray / "part-00001.parquet").unlink()
    again = _predict(store, run_id, str(images), "--output", str(ray), "--engine", "ray", "--actors", "1")
    assert "predicted 8 images" in again and "16 images were in parts" in again, again
    assert _parts(ray).column("path").to_pylist() == _parts(local).column("path").to_pylist()
