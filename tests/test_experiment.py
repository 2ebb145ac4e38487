"""Experiments beyond the paper's tables: shortcut alarms, seeds, generalisation, intervals in SQL."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.compositions.experiment import ExperimentConfig, seed_spread
from pipeline.compositions.experiment import run as run_exp
from pipeline.errors import PipelineError
from pipeline.evaluation import alarms as shortcuts
from pipeline.evaluation.results import RunMetrics, SplitMetrics
from pipeline.runs.config import TrainConfig
from pipeline.store import catalog
from pipeline.store.layout import Store
from tests.conftest import planted_store
from tests.conftest import train_run as train
from trainer.metrics import Estimate

FAST = {"epochs": 3, "batch_size": 128, "lr": 1e-2}


def _est(value: float, lo: float, hi: float) -> Estimate:
    return Estimate(value, lo, hi, 100, 20, 80)


def test_text_alarm_rules_as_the_readme_states_them() -> None:
    method = _est(0.97, 0.95, 0.99)
    assert shortcuts.text_verdict(_est(0.93, 0.90, 0.96), method) == "text_shortcut"  # high on its own
    assert shortcuts.text_verdict(_est(0.80, 0.70, 0.96), method) == "text_shortcut"  # above chance, reaches the run
    assert shortcuts.text_verdict(_est(0.55, 0.45, 0.65), method) is None  # chance-level text
    assert shortcuts.text_verdict(_est(0.80, 0.70, 0.90), method) is None  # text helps, the run does far better
    # a text AUC of 76.1 whose interval includes chance yet reaches the run's: not ruled out, said so
    assert shortcuts.text_verdict(_est(0.761, 0.45, 0.98), _est(0.9, 0.8, 1.0)) == "text_undecided"
    assert shortcuts.text_verdict(_est(0.761, 0.45, 0.98), None) == "text_undecided"  # a text-only run
    assert shortcuts.text_verdict(_est(0.6, 0.45, 0.8), None) is None


def test_advice_fits_the_data() -> None:
    assert "rerun with --pairing shared" in shortcuts.pairing_advice("as-ingested", 0.99)
    none = shortcuts.pairing_advice("as-ingested", 0.0)
    assert "cannot help" in none and "--features image" in none and "rerun with --pairing shared" not in none
    assert "only the 20% of groups" in shortcuts.pairing_advice("as-ingested", 0.2)
    assert "already on" in shortcuts.pairing_advice("shared", 0.0)


def _metrics(features: str, test: SplitMetrics) -> RunMetrics:
    return RunMetrics("m", True, "mlp", features, "as-ingested", SplitMetrics(), SplitMetrics(), test)


def test_a_text_only_run_alarms_on_its_own_numbers_and_an_image_only_run_never_on_text() -> None:
    test = SplitMetrics.from_json({"intervals": {"all": {"auc": {"value": 0.99, "lo": 0.98, "hi": 1.0, "n": 100}}},
                                   "auc": 0.99, "n": 100, "groups": 40})
    alarm = shortcuts.text_alarm(_metrics("text", test), {"ran": True, "mixed_groups": 1.0})
    assert alarm is not None and alarm.kind == "text_shortcut" and "--pairing shared" in alarm.sentence
    assert "99.00 [98.00, 100.00]" in alarm.sentence and alarm.evidence["source"] == "run"
    assert shortcuts.text_alarm(_metrics("image", test), {"ran": True}) is None


def test_caption_shortcut_alarm_is_stored_by_the_run_on_a_planted_store_only(tmp_path: Path) -> None:
    """An image+text run probes the text it reads and stores the alarm: no text-only run needed."""
    options = {**FAST, "epochs": 6}
    for name, shortcut, expected in (("planted", 4.0, True), ("clean", 0.0, False)):
        store = planted_store(tmp_path / name, rows=300, dim=16, signal=3.0, text_shortcut=shortcut)
        method = train(store, TrainConfig.from_dict(options))
        kinds = {a.kind for a in method.metrics.alarms}
        probe = method.metrics.checks["text"]
        assert probe["ran"] and ("text_shortcut" in kinds) == expected, (name, probe["auc"], kinds)
        assert (probe["auc"]["value"] > 0.9) == expected
        stored = catalog.query(store, "SELECT kind FROM alarms WHERE run_id = ?", [method.run_id]).column(0)
        assert ("text_shortcut" in stored.to_pylist()) == expected
    assert "format" in method.metrics.checks and not method.metrics.checks["format"]["ran"]  # features: no bytes


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
    assert sum("captions alone" in a for a in alarmed.alarms) == 1  # once, with the rows that raised it
    assert "**Shortcut: the captions alone" in alarmed.markdown and 'class="alarm"' in alarmed.page.read_text()
    raised = next(a for a in alarmed.alarms if "captions alone" in a)
    assert "Baseline 1" not in raised and "Baseline 2" in raised and "Text only" in raised  # rows reading text
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
    assert "5 runs trained, 0 reused" in quiet.markdown
    again = run_exp(ExperimentConfig(clean, "table1", base))
    assert "all 5 runs reused" in again.markdown and "cost nothing" not in again.markdown


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


def test_format_probe_reads_the_runs_rows_and_alarms_on_any_single_cue(d3_store: Store) -> None:
    """Synthetic D3: real images are noisy JPEGs, generated ones smooth PNGs or JPEGs: format alone says
    something, bytes per pixel says everything."""
    from pipeline.evaluation import probes
    from pipeline.features.view import feature_table
    from pipeline.stages.encode import run as encode
    from tests.conftest import encode_config

    encode(encode_config(d3_store))
    table = feature_table(d3_store, catalog.model_keys(d3_store)[0])
    probe = probes.format_probe(d3_store, table, seed=0, limit=500)
    assert probe["ran"] and probe["read"] > 0
    cues = {name: e["value"] for name, e in probe["cues"].items()}
    assert set(cues) == {"file format", "JPEG quality", "image size", "format, quality and size together",
                         "bytes per pixel", "file size"}
    assert 0.5 < cues["file format"] < 0.9 and cues["bytes per pixel"] >= 0.9
    alarm = shortcuts.format_alarm(probe)
    assert alarm is not None and alarm.kind == "format_shortcut" and "bytes per pixel alone" in alarm.sentence
    assert "file format alone" not in alarm.sentence  # only the cues that separate are named
    assert probes.format_probe(d3_store, table, seed=0, limit=500) == probe  # deterministic
    # the sample comes in runs of rows that lie together in a source file (a Parquet row group read once)
    rows = probes._files_sample(d3_store, table, "train", 40)
    blocks = {(r["source_uri"], r["source_member"], None if r["source_row"] is None
               else r["source_row"] // probes.BUCKET_ROWS) for r in rows}
    assert len(rows) == 40 and len(blocks) < len(rows) / 2, (len(rows), blocks)
    assert rows == probes._files_sample(d3_store, table, "train", 40)  # chosen by content: the same rows again
