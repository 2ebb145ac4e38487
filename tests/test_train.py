"""End-to-end training on planted stores; runs, scores and sweeps in SQL."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from pipeline.compositions.experiment import ExperimentConfig
from pipeline.compositions.experiment import run as run_exp
from pipeline.compositions.sweep import SweepConfig, expand
from pipeline.compositions.sweep import run as run_sweep
from pipeline.errors import PipelineError
from pipeline.runs.config import TrainConfig
from pipeline.runs.record import load_run
from pipeline.stages.score import ScoreConfig
from pipeline.stages.score import run as run_score
from pipeline.store import catalog
from pipeline.store.layout import Store
from tests.conftest import planted_store
from tests.conftest import train_run as train

# tiny stores give few steps: a higher lr than the paper's 1e-3 lets 6 epochs converge
FAST = {"epochs": 6, "batch_size": 128, "lr": 1e-2}


def _config(**kw: object) -> TrainConfig:
    return TrainConfig.from_dict({**FAST, **kw})


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return planted_store(tmp_path_factory.mktemp("planted"), rows=600, dim=16, signal=4.0, text_shortcut=4.0)


def test_planted_signal_is_found_and_shuffled_control_is_not(planted: Store, tmp_path: Path) -> None:
    found = train(planted, _config(features="image"))
    assert found.metrics.test.auc > 0.95
    assert all(v > 0.9 for v in found.metrics.test.auc_by_generator.values())
    control = planted_store(tmp_path, rows=600, dim=16, signal=4.0, shuffle_labels=True)
    null = train(control, _config(features="image"))
    assert abs(null.metrics.test.auc - 0.5) < 0.12


def test_shared_pairing_removes_the_text_shortcut(planted: Store) -> None:
    as_ingested = train(planted, _config(features="text"))
    shared = train(planted, _config(features="text", pairing="shared"))
    assert as_ingested.metrics.test.auc > 0.95  # prompts and captions differ: text alone separates
    assert abs(shared.metrics.test.auc - 0.5) < 0.12


def test_same_seed_same_metrics_and_a_complete_run_record(planted: Store) -> None:
    a = train(planted, _config(seed=3))
    b = train(planted, _config(seed=3))
    assert a.metrics.history == b.metrics.history and a.metrics.test == b.metrics.test
    assert a.config_hash == b.config_hash and a.run_id != b.run_id
    row = catalog.query(planted, "SELECT * FROM runs WHERE run_id = ?", [a.run_id]).to_pylist()[0]
    assert row["test_auc"] == pytest.approx(a.metrics.test.auc)
    assert json.loads(row["metrics_json"])["best_epoch"] == a.metrics.best_epoch
    assert len(a.metrics.history) == 6
    # a score for every sample of every split
    n_samples = catalog.query(planted, "SELECT count(*) FROM samples").column(0)[0].as_py()
    per_split = catalog.query(
        planted, "SELECT split, count(*) AS n FROM scores WHERE run_id = ? GROUP BY 1", [a.run_id]
    ).to_pylist()
    assert sum(r["n"] for r in per_split) == n_samples and len(per_split) == 3
    # the checkpoint is safetensors and reloads to the same scores
    state = load_file(str(planted.run_dir(a.run_id) / "model.safetensors"))
    assert "head.weight" in state
    config, model, _ = load_run(planted, a.run_id)
    assert config.seed == 3 and not model.training


def test_sweep_skips_configs_already_run_and_never_imports_open_clip(planted: Store, tmp_path: Path) -> None:
    # fp32: the same numbers whatever the thread count, so --jobs 2 (one thread each) and --jobs 1 share
    # hashes (bf16 runs would not: their hash carries the thread count, tests/test_train_threads.py)
    grid = tmp_path / "grid.toml"
    grid.write_text('[base]\nepochs = 2\nbatch_size = 256\nprecision = "fp32"\n[grid]\nsam = [true, false]\n'
                    'lr = [0.001]\n')
    first = subprocess.run([sys.executable, "-m", "pipeline.cli", "sweep", "--grid", str(grid), "--store",
                            str(planted.root), "--jobs", "2"], capture_output=True, text=True, check=True,
                           env={**os.environ, "COLUMNS": "200"})
    assert first.stdout.count(" trained ") == 2 and "skipped" not in first.stdout, first.stdout
    assert "open_clip imported by this sweep: no" in first.stdout
    grid_spec = {"base": {"epochs": 2, "batch_size": 256, "precision": "fp32"}, "grid": {"sam": [True, False]}}
    again = run_sweep(SweepConfig(planted, tuple(expand(grid_spec))))
    assert [r.skipped for r in again.rows] == [True, True]
    assert catalog.query(planted, "SELECT count(DISTINCT config_hash) FROM runs").column(0)[0].as_py() >= 2


def test_grid_errors_are_sentences() -> None:
    with pytest.raises(PipelineError, match="either a \\[grid\\] table or \\[\\[runs\\]\\]"):
        expand({"base": {}})
    with pytest.raises(PipelineError, match="Unknown training option"):
        expand({"grid": {"learning_rate": [1]}})


def test_experiment_table2_has_every_combination(planted: Store) -> None:
    result = run_exp(ExperimentConfig(planted, "table2", {"epochs": 1, "batch_size": 512}))
    labels = [label for label, _ in result.rows]
    assert len(labels) == 8 and labels[0] == "BCE" and labels[-1] == "BCE + CVaR + AUC + SAM"
    assert result.path.exists() and "| BCE + CVaR |" in result.markdown
    assert result.markdown.count("\n| ") == 9  # header + 8 rows


def test_score_adds_only_new_samples(tmp_path: Path) -> None:
    store = planted_store(tmp_path, rows=100, dim=8)
    run = train(store, _config(features="image", epochs=1))
    assert run_score(ScoreConfig(store, run.run_id)).scored == 0
    planted_store(tmp_path, rows=20, dim=8, seed=5, file_name="0001.h5")
    result = run_score(ScoreConfig(store, run.run_id))
    assert result.scored == 100 and result.already_scored == 500
    total = catalog.query(store, "SELECT count(DISTINCT sample_id) FROM scores").column(0)[0].as_py()
    assert total == 600


def test_bad_options_are_sentences(planted: Store) -> None:
    with pytest.raises(PipelineError, match="--cvar-alpha"):
        train(planted, _config(cvar_alpha=0.0))
    with pytest.raises(PipelineError, match="No embeddings for model key"):
        train(planted, _config(model_key="nope"))


def test_a_run_records_the_metrics_of_its_scores_computed_from_names(planted: Store) -> None:
    """Metrics come from numbers (generator codes, group ranks); they equal the metrics of the run's
    score shard computed from the generator names and group keys themselves."""
    import numpy as np
    import pyarrow.parquet as pq

    from pipeline.evaluation.bootstrap import BOOT_CELLS, MIN_BOOT, N_BOOT
    from pipeline.evaluation.results import jsonable
    from trainer.metrics import evaluate_by_generator, summary

    run = train(planted, _config(features="image", epochs=1, seed=4))
    scores = pq.read_table(planted.dataset_dir("scores") / f"{run.run_id}.parquet").to_pydict()
    samples = catalog.query(planted, "SELECT sample_id, group_key FROM samples").to_pydict()
    keys = dict(zip(samples["sample_id"], samples["group_key"], strict=True))
    test = np.array(scores["split"]) == "test"
    y, p = np.array(scores["label"])[test], np.array(scores["score"], np.float32)[test]
    gens = np.array(scores["generator"], object)[test]
    groups = np.array([keys[i] for i in scores["sample_id"]], object)[test]
    n_boot = max(MIN_BOOT, min(N_BOOT, BOOT_CELLS // int(test.sum())))
    by_gen = evaluate_by_generator(y, p, gens, groups, 0.5, np.random.default_rng([4, 2]), n_boot)
    recorded = run.metrics.test.to_json()
    assert jsonable(summary(y, p, gens)["auc_by_generator"]) == jsonable(recorded["auc_by_generator"])
    assert jsonable({g: {m: e.as_dict() for m, e in d.items()} for g, d in by_gen.items()}) == \
        jsonable(recorded["intervals"])
    assert recorded["groups"] == len(set(groups))


def test_scores_stream_to_a_temp_file_that_only_a_committed_run_publishes(planted: Store, monkeypatch) -> None:
    from pipeline.stages import train as train_stage

    scores_dir = planted.dataset_dir("scores")
    run = train(planted, _config(features="image", epochs=1))
    assert (scores_dir / f"{run.run_id}.parquet").exists() and not list(scores_dir.glob(".*"))
    before = sorted(scores_dir.iterdir())

    def fail(*args: object) -> None:
        raise RuntimeError("metrics failed")

    monkeypatch.setattr(train_stage, "summarise_splits", fail)
    with pytest.raises(RuntimeError, match="metrics failed"):
        train(planted, _config(features="image", epochs=1, seed=11))
    assert sorted(scores_dir.iterdir()) == before  # no shard, no temp file left behind


def test_score_collector_keeps_codes_and_the_leak_mask_and_group_codes_sort_as_keys(planted: Store) -> None:
    import numpy as np
    import pyarrow as pa

    from pipeline.evaluation.scores import GroupKeys, ScoreCollector, group_codes

    collector = ScoreCollector(1, excluded={"b"})  # capacity 1: grows as rows come
    for part in ({"sample_id": ["a", "b"], "split": ["test", "val"], "label": [1, 0], "generator": ["z", "real"]},
                 {"sample_id": ["c"], "split": ["train"], "label": [1], "generator": ["m"]}):
        rows = pa.table({**part, "label": pa.array(part["label"], pa.int8())})
        collector.write(rows, np.array([0.9, 0.2, 0.7][: rows.num_rows], np.float32))
    s = collector.arrays()
    assert s.generators == ("m", "real", "z")
    assert s.generator.tolist() == [2, 1, 0] and s.split.tolist() == [2, 1, 0]
    assert s.label.tolist() == [1, 0, 1] and s.excluded.tolist() == [False, True, False]
    assert s.of("val").tolist() == [False, False, False] and s.of("test").tolist() == [True, False, False]
    ids = catalog.query(planted, "SELECT sample_id, group_key FROM samples ORDER BY sample_id DESC LIMIT 40")
    unknown = "f" * 64  # no such sample: its own group, ranked by its id among the keys
    codes = group_codes(planted, np.array(ids.column("sample_id").to_pylist() + [unknown], object))
    keys = ids.column("group_key").to_pylist() + [unknown]
    assert codes.tolist() == np.unique(np.array(keys), return_inverse=True)[1].tolist()
    # a run's keys stream to a temp file in scoring order (rows without group_key: looked up by id)
    sample_ids = pa.array(ids.column("sample_id").to_pylist() + [unknown])
    for columns in ({"sample_id": sample_ids, "group_key": pa.array(keys)}, {"sample_id": sample_ids}):
        streamed = GroupKeys(planted, "test-run")
        for start in range(0, len(sample_ids), 16):
            streamed.write(pa.table(columns).slice(start, 16), np.zeros(16, np.float32))
        assert streamed.codes().tolist() == codes.tolist() and not list(planted.root.rglob(".test-run*"))
