"""Calibration (Platt scaling, ECE) on hand-worked numbers, and the OOD flag on planted clusters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.evaluation.calibration import Calibration, calibrate, calibration_of, fit, reliability
from pipeline.features.ood import PERCENTILE, centroid_sketch
from pipeline.features.rowkeys import open_rowkeys
from pipeline.features.vectors import open_matrix
from pipeline.features.view import feature_table
from pipeline.runs.config import TrainConfig
from pipeline.runs.detector import from_run
from pipeline.runs.record import load_run_record
from pipeline.store import catalog
from pipeline.store.layout import Store
from tests.conftest import train_run
from trainer.metrics import roc_auc


def test_ece_is_the_weighted_gap_between_frequency_and_confidence_per_bin() -> None:
    # two bins: [0, .5) holds .1 and .4 (mean .25, no generated), [.5, 1] holds .6 and .9 (mean .75, all generated)
    rel = reliability(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.6, 0.9]), bins=2)
    assert rel.counts == (2, 2) and rel.confidence == pytest.approx((0.25, 0.75))
    assert rel.frequency == (0.0, 1.0) and rel.ece == pytest.approx(0.5 * 0.25 + 0.5 * 0.25)
    # a perfectly calibrated bin contributes nothing
    assert reliability(np.array([0, 1]), np.array([0.5, 0.5]), bins=1).ece == pytest.approx(0.0)


def test_platt_scaling_recovers_a_planted_slope_and_bias_and_keeps_the_ranking() -> None:
    rng = np.random.default_rng(0)
    s = rng.normal(0, 2, 40_000)
    y = rng.random(len(s)) < 1 / (1 + np.exp(-(0.5 * s + 1.0)))  # true probability σ(0.5 s + 1)
    scores = 1 / (1 + np.exp(-s))
    a, b = fit(y, scores)
    assert a == pytest.approx(0.5, abs=0.03) and b == pytest.approx(1.0, abs=0.05)
    cal = calibrate({"val": (y[:20_000], scores[:20_000]), "test": (y[20_000:], scores[20_000:])})
    before, after = cal.ece("test")  # type: ignore[misc]
    assert after < 0.02 < before  # miscalibrated scores, calibrated probabilities on data the fit never saw
    assert roc_auc(y, cal.apply(scores)) == pytest.approx(roc_auc(y, scores), abs=1e-6)  # a > 0: ranks kept
    assert Calibration.from_json(cal.to_json()).to_json() == cal.to_json()


def test_separable_validation_gives_a_finite_fit_and_one_class_the_identity() -> None:
    y = np.array([0] * 50 + [1] * 50)
    p = np.concatenate([np.full(50, 0.2), np.full(50, 0.8)])
    a, b = fit(y, p)
    assert np.isfinite(a) and np.isfinite(b) and a > 0  # Platt's smoothed targets keep it finite
    assert fit(np.ones(10), np.full(10, 0.7)) == (1.0, 0.0)


@pytest.fixture(scope="module")
def clusters(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, str]:
    """Imported features where real images and each generator form their own cluster; a run trained
    on real and three generators, with sd-1.4 (image_gen3) held out of training."""
    h5py = pytest.importorskip("h5py")
    from pipeline.stages.import_features import ImportConfig
    from pipeline.stages.import_features import run as import_features

    root = tmp_path_factory.mktemp("clusters")
    rng = np.random.default_rng(0)
    dim, rows = 32, 300
    centres = rng.normal(size=(5, dim)) * 3  # far apart: real, gen0..gen3
    (root / "h5").mkdir()
    with h5py.File(root / "h5" / "0000.h5", "w") as f:
        for name, centre in zip(["real", "image_gen0", "image_gen1", "image_gen2", "image_gen3"], centres,
                                strict=True):
            f[name] = (centre + rng.normal(size=(rows, dim))).astype(np.float32)
        f["original_prompt"] = rng.normal(size=(rows, dim)).astype(np.float32)
        f["positive_prompt"] = rng.normal(size=(rows, dim)).astype(np.float32)
    store = Store(root / "store")
    import_features(ImportConfig(root / "h5" / "0000.h5", "h5", store, "planted"))
    seen = ("deepfloyd-if", "sd-2.1", "sd-xl")
    run = train_run(store, TrainConfig.from_dict({"epochs": 2, "batch_size": 128, "lr": 1e-2, "features": "image",
                                                  "train_generators": list(seen)}))
    return store, run.run_id  # type: ignore[attr-defined]


def _vectors(store: Store, generator: str, split: str) -> np.ndarray:
    table = feature_table(store, "planted")
    rows = catalog.query(store, f"SELECT image_row FROM {table.parts_sql} WHERE generator = ? AND split = ?",
                         [generator, split]).column(0).to_numpy()
    return open_matrix(store, "planted", "image").gather(rows)


def test_the_ood_flag_fires_on_a_generator_held_out_of_training(clusters: tuple[Store, str]) -> None:
    store, run_id = clusters
    detector = from_run(store, run_id)
    assert detector.spec.ood is not None and detector.spec.ood.percentile == PERCENTILE
    held_out = _vectors(store, "sd-1.4", "test")
    familiar = np.concatenate([_vectors(store, g, "test") for g in ("real", "sd-xl")])
    spec = detector.spec.ood
    assert spec.flag(detector.similarity(held_out)).mean() > 0.95  # a new generator, seen from outside
    # in distribution: 1% expected; the threshold is a low percentile of ~100 val images, so allow for its noise
    assert spec.flag(detector.similarity(familiar)).mean() < 0.1
    # the exported sketch keeps the meaning: the same images flagged by its own statistic
    config, _ = load_run_record(store, run_id)
    table = feature_table(store, "planted")
    sketch = centroid_sketch(store, run_id, open_matrix(store, "planted", "image"), table.parts_sql,
                             config.train_generators)
    assert sketch.spec.flag(sketch.similarity(held_out)).mean() > 0.95
    assert sketch.spec.flag(sketch.similarity(familiar)).mean() < 0.1


def test_a_run_from_before_calibration_is_calibrated_from_its_scores_the_same_every_time(
        clusters: tuple[Store, str]) -> None:
    store, run_id = clusters
    _, metrics = load_run_record(store, run_id)
    assert metrics.calibration is not None  # trained now: stored with the run
    first, second = calibration_of(store, run_id, None), calibration_of(Store(store.root), run_id, None)
    assert first.to_json() == second.to_json() and first.n == metrics.val.n
    assert (first.a, first.b) == pytest.approx((metrics.calibration.a, metrics.calibration.b), rel=1e-6)


def test_row_keys_find_each_hash_at_its_matrix_row_and_grow_with_the_shards(clusters: tuple[Store, str],
                                                                            tmp_path: Path) -> None:
    store, _ = clusters
    matrix = open_matrix(store, "planted", "image")
    keys = open_rowkeys(store, matrix, "image")
    table = feature_table(store, "planted")
    rows = catalog.query(store, f"SELECT sample_id, image_row FROM {table.parts_sql} ORDER BY image_row LIMIT 50")
    assert keys.find(rows.column("sample_id")).tolist() == rows.column("image_row").to_pylist()
    assert keys.find(["0" * 64, None]).tolist() == [-1, -1]
    again = open_rowkeys(Store(store.root), open_matrix(Store(store.root), "planted", "image"), "image")
    assert again.parts == keys.parts  # nothing new: nothing rebuilt
