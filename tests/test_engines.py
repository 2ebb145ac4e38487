"""Engines: `--engine ray` gives the local engine's vectors; killed workers and drivers lose and double
nothing; a Tune sweep gives the local sweep's runs. Ray tests share one 2-CPU local instance (marked
`ray`; skipped, not failed, where Ray is not installed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from pipeline.compositions import sweep
from pipeline.encoding.units import EncodeImages
from pipeline.errors import PipelineError
from pipeline.stages.encode import run as encode
from pipeline.store import catalog
from pipeline.store.layout import Store
from tests.conftest import encode_config, kill_when, planted_store

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield ray
    ray.shutdown()


def _vectors(store: Store) -> dict[tuple[str, str], np.ndarray]:
    rows = catalog.query(store, "SELECT modality, content_hash, vector, norm FROM embeddings").to_pylist()
    return {(r["modality"], r["content_hash"]): np.asarray(r["vector"] + [r["norm"]], np.float32) for r in rows}


def _assert_complete_without_duplicates(store: Store) -> None:
    def count(sql: str) -> int:
        return catalog.query(store, sql).column(0)[0].as_py()

    samples = count("SELECT count(DISTINCT sample_id) FROM samples")
    rows = count("SELECT count(*) FROM embeddings WHERE modality = 'image'")
    distinct = count("SELECT count(DISTINCT content_hash) FROM embeddings WHERE modality = 'image'")
    bad = count("SELECT count(DISTINCT content_hash) FROM quarantine WHERE stage = 'decode'")
    texts = count("SELECT count(DISTINCT text_hash) FROM samples")
    assert rows == distinct == samples - bad
    assert count("SELECT count(*) FROM embeddings WHERE modality = 'text'") == texts
    assert not [p for p in store.staging_dir.rglob("*.parquet")]


def test_ray_missing_says_how_to_install(d3_store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray → ImportError
    with pytest.raises(PipelineError, match=r"pip install 'clipdetect-pipeline\[ray\]'"):
        encode(encode_config(d3_store, engine="ray"))


def test_ray_options_need_the_ray_engine(d3_store: Store) -> None:
    with pytest.raises(PipelineError, match="need --engine ray"):
        encode_config(d3_store, actors=2)


def test_decoding_workers_give_the_in_process_vectors_through_shared_memory_or_not(
    d3_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.engines.local as local

    stores = [Store(tmp_path / name) for name in ("shared", "piped")]
    for store in stores:
        shutil.copytree(d3_store.root, store.root)
    encode(encode_config(d3_store, dtype="float32", batch_size=4))  # decoded in this process
    encode(encode_config(stores[0], dtype="float32", workers=2, batch_size=4))
    monkeypatch.setattr(local, "_fits_in_shared_memory", lambda nbytes: False)  # a 64 MB /dev/shm
    encode(encode_config(stores[1], dtype="float32", workers=2, batch_size=4))
    expected = _vectors(d3_store)
    for store in stores:
        got = _vectors(store)
        assert got.keys() == expected.keys() and all(np.array_equal(got[k], expected[k]) for k in got)


@pytest.mark.ray
def test_ray_vectors_equal_local_vectors(ray_cluster: Any, d3_store: Store, tmp_path: Path) -> None:
    other = Store(tmp_path / "copy")
    shutil.copytree(d3_store.root, other.root)
    local = encode(encode_config(d3_store, dtype="float32"))
    remote = encode(encode_config(other, dtype="float32", engine="ray", batch_size=8, shard_rows=16))
    assert remote.device.startswith("ray:") and remote.engine == "ray"
    assert (remote.images_encoded, remote.texts_encoded, remote.quarantined) == (
        local.images_encoded, local.texts_encoded, local.quarantined)
    a, b = _vectors(d3_store), _vectors(other)
    assert a.keys() == b.keys()
    # same model, fp32, CPU; batches differ in size, which may move the last bit of a float
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) < 1e-5
    _assert_complete_without_duplicates(other)
    assert encode(encode_config(other, dtype="float32", engine="ray")).nothing_to_do  # decided before Ray starts


@pytest.mark.ray
def test_killed_ray_worker_is_retried_nothing_lost_or_doubled(
    ray_cluster: Any, d3_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.engines.ray as ray_engine

    marker = tmp_path / "marker"
    monkeypatch.setattr(ray_engine, "EncodeImages", _DiesOnce.bind(marker))
    result = encode(encode_config(d3_store, engine="ray", batch_size=8, shard_rows=16))
    assert marker.exists()  # a worker did die
    _assert_complete_without_duplicates(d3_store)
    assert result.images_encoded + sum(result.quarantined.values()) == catalog.query(
        d3_store, "SELECT count(DISTINCT sample_id) FROM samples").column(0)[0].as_py()


class _DiesOnce(EncodeImages):
    """An encode actor whose first batch kills its process (the marker file makes it once only)."""

    marker: Path

    @classmethod
    def bind(cls, marker: Path) -> type:
        return type("DiesOnce", (cls,), {"marker": marker})

    def __call__(self, rows: pa.Table) -> pa.Table:
        if not self.marker.exists():
            self.marker.write_text("died")
            os._exit(1)
        return super().__call__(rows)


_DRIVER = textwrap.dedent(
    """
    import sys
    from pipeline.encoding.clip import ModelSpec
    from pipeline.stages.encode import EncodeConfig, run
    from pipeline.store.layout import Store
    run(EncodeConfig(Store(sys.argv[1]), ModelSpec("Tiny-ViT-16"), engine="ray", ray_address="auto",
                     batch_size=4, shard_rows=4))
    print("FINISHED")
    """
)


@pytest.mark.ray
def test_killed_ray_driver_leaves_staged_shards_that_the_next_run_adopts(
    ray_cluster: Any, d3_store: Store
) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, str(d3_store.root)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    alive = kill_when(proc, lambda: list(d3_store.staging_dir.rglob("image-*.parquet")), 180)
    assert alive, "the driver finished before it could be killed: " + proc.stderr.read().decode()[-800:]
    time.sleep(2)  # Ray ends a dead driver's tasks and actors
    encode(encode_config(d3_store))
    _assert_complete_without_duplicates(d3_store)


@pytest.mark.ray
def test_store_that_a_node_cannot_see_is_refused(
    ray_cluster: Any, d3_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.engines.ray as ray_engine

    monkeypatch.setattr(ray_engine, "_read_probe", _blind_probe)
    with pytest.raises(PipelineError, match="cannot see the store .* every node mounts at the same path"):
        encode(encode_config(d3_store, engine="ray"))


@pytest.mark.ray
def test_impossible_devices_are_refused_with_a_sentence(ray_cluster: Any, d3_store: Store) -> None:
    with pytest.raises(PipelineError, match="fp16 needs GPU actors"):
        encode(encode_config(d3_store, engine="ray", precision="fp16"))
    if not ray_cluster.cluster_resources().get("GPU"):
        with pytest.raises(PipelineError, match="the Ray cluster has no GPUs"):
            encode(encode_config(d3_store, engine="ray", device="cuda"))


def _blind_probe(path: str, token: str) -> tuple[bool, str]:
    return False, "node-without-the-store"


_GRID = [sweep.SweepPoint({"lr": lr, "epochs": 3, "batch_size": 64}, {"lr": lr}) for lr in (1e-3, 3e-3)]


@pytest.mark.ray
def test_tune_sweep_gives_the_local_sweeps_runs(ray_cluster: Any, tmp_path: Path) -> None:
    store = planted_store(tmp_path / "a", rows=120)
    other = Store(tmp_path / "b")
    shutil.copytree(store.root, other.root)
    local = sweep.run(sweep.SweepConfig(store, tuple(_GRID), jobs=2))  # one thread per run, as in a trial
    tuned = sweep.run(sweep.SweepConfig(other, tuple(_GRID), engine="ray"))
    assert [r.skipped for r in tuned.rows] == [r.skipped for r in local.rows] == [False, False]
    assert [r.overrides for r in tuned.rows] == [r.overrides for r in local.rows]
    hashes = "SELECT config_hash, val_auc, test_auc FROM runs ORDER BY config_hash"
    a, b = catalog.query(store, hashes).to_pylist(), catalog.query(other, hashes).to_pylist()
    assert [r["config_hash"] for r in a] == [r["config_hash"] for r in b] and len(a) == 2
    for x, y in zip(a, b, strict=True):  # the same training, in a Ray worker instead of here
        assert x["val_auc"] == pytest.approx(y["val_auc"], abs=1e-6)
        assert x["test_auc"] == pytest.approx(y["test_auc"], abs=1e-6)
    assert catalog.query(other, "SELECT count(*) FROM scores").column(0)[0].as_py() == catalog.query(
        store, "SELECT count(*) FROM scores").column(0)[0].as_py()
    # configs already run are skipped, through Tune too
    again = sweep.run(sweep.SweepConfig(other, tuple(_GRID), engine="ray", scheduler="asha"))
    assert [r.skipped for r in again.rows] == [True, True]
    assert [r.run_id for r in again.rows] == [r.run_id for r in tuned.rows]


def test_sweep_samples_draw_a_seeded_subset(tmp_path: Path) -> None:
    grid = tuple(sweep.SweepPoint({"lr": lr}, {"lr": lr}) for lr in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2))
    store = Store(tmp_path)
    first = sweep.chosen(sweep.SweepConfig(store, grid, samples=2, seed=5))
    assert len(first) == 2 and first == sweep.chosen(sweep.SweepConfig(store, grid, samples=2, seed=5))
    assert sweep.chosen(sweep.SweepConfig(store, grid)) == list(grid)
    with pytest.raises(PipelineError, match="need --engine ray"):
        sweep.SweepConfig(store, grid, scheduler="asha")


def test_cli_engine_flags_are_checked_with_a_sentence(d3_store: Store) -> None:
    from typer.testing import CliRunner

    from pipeline.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["encode", "--model", "Tiny-ViT-16", "--store", str(d3_store.root), "--actors", "2"])
    assert result.exit_code == 2 and "need --engine ray" in result.output
    result = runner.invoke(app, ["encode", "--model", "Tiny-ViT-16", "--store", str(d3_store.root),
                                 "--engine", "spark"])
    assert result.exit_code == 2 and "'spark' is not one of" in result.output
    assert "--ray-address" in runner.invoke(app, ["encode", "--help"]).output

