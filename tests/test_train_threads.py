"""Issue 18: the same config gives the same numbers whatever the thread count, or a different hash.

Sizes are chosen so that two threads really split the work (tensors above ATen's 32,768-element
grain): on this project's machine, without MKL's strict mode and the fused blocks, the val AUC of
such a run differs between 1 and 2 threads.
"""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.runs.config import TrainConfig
from pipeline.store import catalog
from pipeline.store.layout import Store
from tests.conftest import planted_store
from tests.conftest import train_run as train

SIZE = {"epochs": 2, "batch_size": 384, "hidden": 256, "lr": 1e-2, "seed": 7}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return planted_store(tmp_path_factory.mktemp("threads"), rows=300, dim=64, signal=0.6)


def _metrics(result: object) -> tuple[float, float]:
    m = result.metrics  # type: ignore[attr-defined]
    return m.val.auc, m.test.auc


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_same_numbers_and_hash_with_one_and_two_threads(store: Store, precision: str) -> None:
    one = train(store, TrainConfig.from_dict({**SIZE, "precision": precision, "threads": 1}))
    two = train(store, TrainConfig.from_dict({**SIZE, "precision": precision, "threads": 2}))
    assert one.compute.threads == 1 and two.compute.threads == 2 and one.compute.precision == precision
    if one.compute.thread_dependent:  # no MKL strict mode here: the hash says what the numbers depend on
        assert one.config_hash != two.config_hash
        return
    assert one.config_hash == two.config_hash
    assert _metrics(one) == pytest.approx(_metrics(two), abs=1e-6)
    assert one.metrics.history == two.metrics.history  # every epoch's loss, lr and val metrics
    again = train(store, TrainConfig.from_dict({**SIZE, "precision": precision, "threads": 2}), skip_existing=True)
    assert again.skipped and again.run_id == one.run_id  # the same hash: the first run is reused


def test_without_thread_independent_products_the_hash_carries_the_thread_count(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.stages import train as stage

    monkeypatch.setattr(stage, "GEMM_THREAD_INDEPENDENT", False)
    config = {**SIZE, "epochs": 1, "precision": "fp32"}
    one = train(store, TrainConfig.from_dict({**config, "threads": 1}))
    two = train(store, TrainConfig.from_dict({**config, "threads": 2}))
    assert one.compute.thread_dependent and one.config_hash != two.config_hash


def test_a_run_records_how_it_computed_and_each_epoch_its_speed(store: Store) -> None:
    events: list[dict] = []

    class Recorder:
        def start(self, *args: object) -> None: ...
        def advance(self, *args: object) -> None: ...
        def event(self, kind: str, data: dict) -> None:
            events.append(data)

    from pipeline.stages import train as stage

    result = stage.run(stage.TrainJob(store, TrainConfig.from_dict({**SIZE, "precision": "auto"})), Recorder())
    compute = result.metrics.compute
    assert compute is not None and result.metrics.timing is not None
    assert compute.precision in ("fp32", "bf16") and compute.precision_why and compute.threads >= 1
    stored = json.loads(catalog.query(store, "SELECT config_json FROM runs WHERE run_id = ?",
                                      [result.run_id]).column(0)[0].as_py())
    assert stored["precision"] == compute.precision  # the resolved precision, not `auto`
    assert len(events) == SIZE["epochs"]
    for record, timing in zip(events, result.metrics.timing, strict=True):
        assert record["samples"] == timing["samples"] > 0 and record["samples_per_s"] > 0
        assert record["seconds"] > 0 and record["epoch_seconds"] >= record["seconds"]
    assert events[-1]["eta_seconds"] == 0 and events[0]["eta_seconds"] > 0
    assert "samples_per_s" not in result.metrics.history[0]  # history stays what the seed determines


def test_the_same_config_through_the_command_with_one_and_two_threads(store: Store, tmp_path: Path) -> None:
    runner = CliRunner()
    hashes, aucs = [], []
    for threads in (1, 2):
        config = tmp_path / f"t{threads}.toml"
        config.write_text(f'epochs = 2\nbatch_size = 384\nhidden = 256\nlr = 0.01\nseed = 11\nprecision = "fp32"\n'
                          f'threads = {threads}\nname = "threads-{threads}"\n')
        result = runner.invoke(app, ["train", "--config", str(config), "--store", str(store.root)])
        assert result.exit_code == 0 and "test AUC" in result.output, result.output
        row = catalog.query(store, "SELECT config_hash, val_auc, test_auc, metrics_json FROM runs WHERE name = ?",
                            [f"threads-{threads}"]).to_pylist()[0]
        assert json.loads(row["metrics_json"])["compute"]["threads"] == threads
        hashes.append(row["config_hash"])
        aucs.append((row["val_auc"], row["test_auc"]))
    if json.loads(row["metrics_json"])["compute"]["thread_dependent"]:
        assert hashes[0] != hashes[1]
    else:
        assert hashes[0] == hashes[1] and aucs[0] == pytest.approx(aucs[1], abs=1e-6)


def test_bf16_products_outside_mkl_make_a_bf16_run_carry_its_thread_count(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where bf16 products go to oneDNN (a CPU other than Intel's: `trainer.products`), a bf16 run's
    numbers may change with its threads, so its hash says how many; an fp32 run's does not."""
    from pipeline.stages import train as stage

    monkeypatch.setattr(stage, "BF16_THREAD_INDEPENDENT", False)
    config = {**SIZE, "epochs": 1, "precision": "bf16"}
    one = train(store, TrainConfig.from_dict({**config, "threads": 1}))
    two = train(store, TrainConfig.from_dict({**config, "threads": 2}))
    assert one.compute.thread_dependent and one.config_hash != two.config_hash
    fp32 = train(store, TrainConfig.from_dict({**config, "precision": "fp32", "threads": 1}))
    assert not fp32.compute.thread_dependent or not stage.GEMM_THREAD_INDEPENDENT


def test_through_the_cli_a_bf16_run_outside_mkl_carries_its_thread_count_in_its_hash(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`pipeline train --precision bf16 --threads 1`, then `--threads 2`: where bf16 products go to
    oneDNN the two runs' hashes differ (each carries its threads), and the JSON says they depend on it."""
    pytest.importorskip("h5py")
    from pipeline.stages import train as stage
    from tests.test_import_features import cli_imported_store

    monkeypatch.setattr(stage, "BF16_THREAD_INDEPENDENT", False)
    store = cli_imported_store(tmp_path, rows=40)
    runner = CliRunner()
    runs = []
    for threads in ("1", "2"):
        done = runner.invoke(app, ["train", "--store", store, "--epochs", "1", "--batch-size", "16", "--no-sam",
                                   "--features", "image", "--precision", "bf16", "--threads", threads, "--json"])
        assert done.exit_code == 0, done.output
        runs.append(json.loads(done.stdout))
    assert runs[0]["config_hash"] != runs[1]["config_hash"]
