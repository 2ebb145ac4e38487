"""Experiments beyond the paper's tables: shortcut alarms, seeds, generalisation, intervals in SQL."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.compositions.experiment import ExperimentConfig, seed_spread
from pipeline.compositions.experiment import run as run_exp
from pipeline.errors import PipelineError
from pipeline.evaluation import alarms as shortcuts
from pipeline.evaluation.results import SplitMetrics
from pipeline.runs.config import TrainConfig
from pipeline.store import catalog
from pipeline.store.layout import Store
from tests.conftest import planted_store
from tests.conftest import train_run as train

FAST = {"epochs": 3, "batch_size": 128, "lr": 1e-2}


def _cell(value: float, lo: float, hi: float) -> SplitMetrics:
    return SplitMetrics.from_json({"intervals": {"all": {"auc": {"value": value, "lo": lo, "hi": hi, "n": 100}}},
                                   "auc": value, "n": 100})


def test_text_alarm_rules() -> None:
    method = _cell(0.97, 0.95, 0.99)
    assert shortcuts.text_alarm(_cell(0.93, 0.90, 0.96), method) is not None  # high on its own
    assert shortcuts.text_alarm(_cell(0.80, 0.70, 0.96), method) is not None  # overlaps the method
    assert shortcuts.text_alarm(_cell(0.55, 0.45, 0.65), method) is None  # chance-level text
    assert shortcuts.text_alarm(_cell(0.52, 0.30, 0.70), _cell(0.6, 0.4, 0.75)) is None  # not above chance
    sentence = shortcuts.text_alarm(_cell(0.99, 0.98, 1.0))
    assert sentence and "--pairing shared" in sentence and "99.0 [98.0, 100.0]" in sentence


def test_caption_shortcut_alarm_from_runs_fires_on_a_planted_store_only(tmp_path: Path) -> None:
    """The rule `train` and `report` apply: the newest text-only run against this run's test AUC."""
    options = {**FAST, "epochs": 6}
    for name, shortcut, expected in (("planted", 4.0, True), ("clean", 0.0, False)):
        store = planted_store(tmp_path / name, rows=300, dim=16, signal=3.0, text_shortcut=shortcut)
        method = train(store, TrainConfig.from_dict(options))
        train(store, TrainConfig.from_dict({**options, "features": "text"}))
        found = shortcuts.text_only_summary(store, method.model_key, "as-ingested")
        assert found is not None
        alarm = shortcuts.text_alarm(found[1], method.metrics.test)
        assert (alarm is not None) == expected, (name, found[1].auc, alarm)
    assert shortcuts.text_only_summary(store, method.model_key, "shared") is None


def test_a_run_trained_on_one_generator_drops_on_an_unlike_one(tmp_path: Path) -> None:
    store = _two_family_store(tmp_path, rows=200)
    unlike = catalog.query(store, "SELECT DISTINCT generator FROM samples WHERE source_member = 'image_gen3'"
                           ).column(0)[0].as_py()
    like = catalog.query(store, "SELECT DISTINCT generator FROM samples WHERE source_member = 'image_gen0'"
                         ).column(0)[0].as_py()
    run = train(store, TrainConfig.from_dict({**FAST, "epochs": 4, "features": "image", "train_generators": [like]}))
    cells = run.metrics.test.intervals
    assert cells[like]["auc"].value > 0.85 and cells[unlike]["auc"].value < 0.7
    assert cells[unlike]["auc"].hi < cells[like]["auc"].lo


@pytest.mark.slow
def test_planted_caption_shortcut_triggers_the_alarm_and_a_clean_store_does_not(tmp_path: Path) -> None:
    base = {**FAST, "epochs": 2}
    planted = planted_store(tmp_path / "shortcut", rows=300, dim=16, signal=3.0, text_shortcut=4.0)
    alarmed = run_exp(ExperimentConfig(planted, "table1", base, seeds=2))
    assert any("captions alone" in a for a in alarmed.alarms)
    assert "**Shortcut: the captions alone" in alarmed.markdown and 'class="alarm"' in alarmed.page.read_text()
    assert all(len(runs) == 2 for runs in alarmed.seed_runs.values())
    spread = seed_spread(alarmed, "Baseline 1: image, BCE", len(alarmed.columns) - 1)
    assert spread is not None and spread[1] >= 0 and " ± " in alarmed.markdown
    # every AUC cell of the table carries an interval around its value
    for cells in alarmed.cells.values():
        assert all(c is not None and c["lo"] <= c["value"] <= c["hi"] for c in cells)

    clean = planted_store(tmp_path / "clean", rows=300, dim=16, signal=3.0, text_shortcut=0.0)
    quiet = run_exp(ExperimentConfig(clean, "table1", base))
    assert not any("captions alone" in a for a in quiet.alarms)
    assert "Format probe not run" in quiet.markdown  # imported features carry no image bytes


def test_run_metrics_are_in_sql_with_intervals_and_a_val_threshold(tmp_path: Path) -> None:
    store = planted_store(tmp_path, rows=200, dim=8, signal=3.0)
    run = train(store, TrainConfig.from_dict({**FAST, "features": "image"}))
    rows = catalog.query(store, "SELECT split, generator, metric, value, lo, hi, n FROM metrics WHERE run_id = ?",
                         [run.run_id]).to_pylist()
    test_auc = next(r for r in rows if (r["split"], r["generator"], r["metric"]) == ("test", "all", "auc"))
    assert test_auc["value"] == pytest.approx(run.metrics.test.auc)
    assert test_auc["lo"] <= test_auc["value"] <= test_auc["hi"] and test_auc["n"] == run.metrics.test.n
    metrics = {r["metric"] for r in rows if r["split"] == "test"}
    assert {"auc", "ap", "acc", "real_acc", "fake_acc", "balanced_acc", "eer", "tpr_at_fpr_1",
            "tpr_at_fpr_5", "acc_at_val_threshold"} <= metrics
    train_rows = [r for r in rows if r["split"] == "train"]
    assert train_rows and all(r["lo"] is None for r in train_rows)  # train: values, no intervals
    assert run.metrics.test.at_val_threshold is not None and 0 < run.metrics.test.at_val_threshold.threshold < 1


def _two_family_store(root: Path, rows: int = 300, dim: int = 16) -> Store:
    """Generators 0-2 shift image vectors along one direction; generator 3 along an orthogonal one."""
    import h5py

    from pipeline.stages.import_features import ImportConfig
    from pipeline.stages.import_features import run as import_features

    rng = np.random.default_rng(0)
    a, b = np.eye(dim)[0], np.eye(dim)[1]
    src = root / "h5"
    src.mkdir(parents=True)
    with h5py.File(src / "0000.h5", "w") as f:
        f["real"] = rng.normal(size=(rows, dim)).astype(np.float32)
        for k in range(4):
            shift = 4.0 * (b if k == 3 else a)
            f[f"image_gen{k}"] = (rng.normal(size=(rows, dim)) + shift).astype(np.float32)
        f["original_prompt"] = rng.normal(size=(rows, dim)).astype(np.float32)
        f["positive_prompt"] = rng.normal(size=(rows, dim)).astype(np.float32)
    store = Store(root / "store")
    import_features(ImportConfig(src / "0000.h5", "h5", store, "two-family"))
    return store


@pytest.mark.slow
def test_generalization_matrix_shows_the_drop_for_an_unlike_generator(tmp_path: Path) -> None:
    store = _two_family_store(tmp_path, rows=200)
    gens = sorted(catalog.query(store, "SELECT DISTINCT generator FROM samples WHERE label = 1").column(0).to_pylist())
    unlike = catalog.query(store, "SELECT DISTINCT generator FROM samples WHERE source_member = 'image_gen3'"
                           ).column(0)[0].as_py()
    like = next(g for g in gens if g != unlike)
    result = run_exp(ExperimentConfig(store, "generalization", {**FAST, "epochs": 4}))
    col = {g: i for i, g in enumerate(result.columns)}
    trained_on_like = result.cells[next(label for label, _ in result.rows if label.endswith(like[-20:])
                                        and label.startswith("train on"))]
    others_like = [g for g in gens if g not in (like, unlike)]
    assert trained_on_like[col[like]]["value"] > 0.9
    assert all(trained_on_like[col[g]]["value"] > 0.9 for g in others_like)
    assert trained_on_like[col[unlike]]["value"] < 0.75  # never saw that direction
    assert trained_on_like[col[unlike]]["hi"] < trained_on_like[col[like]]["lo"]
    held_out = result.cells[next(label for label, _ in result.rows if label.startswith("all but")
                                 and label.endswith(unlike[-20:]))]
    assert held_out[col[unlike]]["value"] < 0.75 < held_out[col[like]]["value"]
    assert (result.page.parent / "matrix.png").exists()


def test_unknown_train_generator_is_a_sentence(tmp_path: Path) -> None:
    store = planted_store(tmp_path, rows=50, dim=8)
    with pytest.raises(PipelineError, match="Unknown generator"):
        train(store, TrainConfig.from_dict({**FAST, "train_generators": ["nope"]}))
    with pytest.raises(PipelineError, match="--run"):
        ExperimentConfig(store, "robustness")


def test_format_probe_reads_headers_and_sees_the_png_fakes(d3_store: Store) -> None:
    """Synthetic D3: real images are JPEG, half the generators write PNG, so format alone says something."""
    probe = shortcuts.format_probe(d3_store, per_split=500)
    assert probe.read > 0 and probe.auc is not None
    assert 0.6 < probe.auc.value <= 1.0 and probe.auc.lo <= probe.auc.value <= probe.auc.hi
    assert "Format probe" in probe.sentence()
    assert (probe.alarm is not None) == (probe.auc.value >= shortcuts.PROBE_AUC_ALARM)
