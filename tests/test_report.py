"""Reports (HTML + PNG), the loss landscape and the kNN detector, on planted-signal stores."""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.compositions.experiment import ExperimentConfig
from pipeline.compositions.experiment import run as run_exp
from pipeline.errors import PipelineError
from pipeline.evaluation.loss import evaluation_loss, evaluation_set
from pipeline.features.view import feature_table
from pipeline.present.figures import DPI, FIG_SIZE
from pipeline.runs.config import TrainConfig
from pipeline.runs.record import load_run
from pipeline.stages.landscape import LandscapeConfig, filter_normalised_direction, surface
from pipeline.stages.landscape import run as landscape
from pipeline.stages.report import ReportConfig
from pipeline.stages.report import run as write_report
from pipeline.stages.score import ScoreConfig
from pipeline.stages.score import run as run_score
from pipeline.store import catalog
from pipeline.store.layout import Store
from tests.conftest import planted_store
from tests.conftest import train_run as train

runner = CliRunner()

FAST = {"epochs": 3, "batch_size": 128, "lr": 1e-2}
PNG_SIZE = (int(FIG_SIZE[0] * DPI), int(FIG_SIZE[1] * DPI))


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return planted_store(tmp_path_factory.mktemp("planted"), rows=300, signal=2.5)


def _referenced_files_exist(page: Path) -> list[str]:
    refs = re.findall(r'(?:src|href)="([^"]+)"', page.read_text())
    assert refs, "the page shows no figure"
    for ref in refs:
        assert not re.match(r"[a-z]+:", ref), f"{ref} is not a local file"
        assert (page.parent / ref).is_file(), f"{ref} does not exist"
    return refs


def test_run_report_writes_decodable_pngs_and_a_page_that_only_references_them(planted: Store, tmp_path: Path) -> None:
    run = train(planted, TrainConfig.from_dict(FAST))
    result = write_report(ReportConfig(planted, run.run_id, tmp_path / "report"))
    names = {f.name for f in result.files}
    assert names == {"roc.png", "auc_by_generator.png", "scores.png", "confusion.png", "learning_curve.png",
                     "reliability.png"}
    for f in result.files:
        with Image.open(f) as img:
            img.load()
            assert img.size == PNG_SIZE and img.format == "PNG"
    assert set(_referenced_files_exist(result.page)) == names
    text = result.page.read_text()
    assert run.run_id in text and "RANDOM" not in text  # imported features: no random-weights claim
    assert "TPR @ 1% FPR" in text and "group-bootstrap" in text and "false positive" in text
    assert not re.search(r"<td>(tpr_at_fpr_1|real_acc|balanced_acc)</td>", text)  # keys get their readers' names
    assert "no image bytes" in text  # imported features: the gallery says so instead of a broken image
    assert "scored since" not in text  # every figure counts the same samples
    # calibration: its ECE before and after on val and test, as the run stored them
    cal = run.metrics.calibration
    assert cal is not None and "fitted on val when the run was trained" in text
    for split in ("val", "test"):
        before, after = cal.reliability[split]
        assert f"<td>{split}</td><td>{before.n}</td><td>{100 * before.ece:.2f}</td><td>{100 * after.ece:.2f}</td>" \
            in text.replace("\n", ""), split
    with pytest.raises(PipelineError, match="--split must be one of train, val, test"):
        write_report(ReportConfig(planted, run.run_id, tmp_path / "r2", split="nope"))


def test_a_report_after_new_samples_were_scored_says_which_figures_count_them(tmp_path: Path) -> None:
    store = planted_store(tmp_path, rows=120, signal=2.5)
    run = train(store, TrainConfig.from_dict(FAST))
    planted_store(tmp_path, rows=60, signal=2.5, seed=1, file_name="0001.h5")  # new samples, same store
    assert run_score(ScoreConfig(store, run.run_id)).scored == 300
    text = write_report(ReportConfig(store, run.run_id, tmp_path / "report")).page.read_text()
    then = load_run(store, run.run_id)[2].test.n
    now = int(re.search(r"Figures on the <b>test</b> split \((\d+) samples\)", text).group(1))  # type: ignore[union-attr]
    assert now > then and f"n = {then} test samples when it was trained" in text
    assert f"The figures also count the {now - then} test samples scored since by <code>pipeline score</code>; " \
        "the tables do not." in text


def test_experiment_table1_has_knn_row_and_an_html_page(planted: Store) -> None:
    result = run_exp(ExperimentConfig(planted, "table1", {"epochs": 2, "batch_size": 256, "lr": 1e-2}))
    labels = [label for label, _ in result.rows]
    assert any(label.startswith("kNN") for label in labels) and len(labels) == 5
    knn, text_only = dict(result.rows)[labels[-1]], dict(result.rows)[labels[-2]]
    assert knn.metrics.detector == "knn"
    assert knn.metrics.test.auc > 0.8 > text_only.metrics.test.auc + 0.2  # the signal is in the images
    assert result.page.exists() and result.path.exists()
    assert _referenced_files_exist(result.page) == ["auc.png"]
    index = (planted.root / "reports" / "index.html").read_text()
    assert f"<a href='{result.page.parent.name}/index.html'>table1</a>" in index  # the stage keeps the index
    assert "[" in result.markdown.split("| Baseline 1")[1].split("\n")[0]  # cells carry intervals
    with pytest.raises(PipelineError, match="keeps no weights"):
        run_score(ScoreConfig(planted, knn.run_id))


def test_knn_on_shuffled_labels_stays_near_chance(tmp_path: Path) -> None:
    store = planted_store(tmp_path, rows=300, signal=2.5, shuffle_labels=True)
    run = train(store, TrainConfig.from_dict({"detector": "knn", "features": "image"}))
    assert abs(run.metrics.test.auc - 0.5) < 0.15


def test_landscape_centre_equals_the_run_evaluation_loss(planted: Store, tmp_path: Path) -> None:
    run = train(planted, TrainConfig.from_dict({**FAST, "name": "with SAM"}))
    result = landscape(LandscapeConfig(planted, (run.run_id,), dims=1, steps=5, output=tmp_path / "l.png"))
    s = result.surfaces[0]
    assert s.centre_loss == pytest.approx(run.metrics.eval_loss, abs=1e-6)
    assert s.losses.shape == (5,) and np.all(np.isfinite(s.losses))
    assert s.losses.max() > s.centre_loss  # moving away from trained weights costs something
    # and independently of the recorded number: the objective on the fixed evaluation set
    config, model, _ = load_run(planted, run.run_id)
    x, y, _ = evaluation_set(feature_table(planted, "planted", config.pairing), config.features)
    assert s.centre_loss == pytest.approx(evaluation_loss(model, x, y, config.fit), abs=1e-6)
    with Image.open(result.png) as img:
        assert img.size == PNG_SIZE


def test_landscape_of_two_runs_in_2d(planted: Store, tmp_path: Path) -> None:
    a = train(planted, TrainConfig.from_dict({**FAST, "sam": True}))
    b = train(planted, TrainConfig.from_dict({**FAST, "sam": False}))
    result = landscape(LandscapeConfig(planted, (a.run_id, b.run_id), dims=2, steps=3, output=tmp_path / "l2.png"))
    assert [s.losses.shape for s in result.surfaces] == [(3, 3), (3, 3)]
    with Image.open(result.png) as img:
        assert img.size == (2 * PNG_SIZE[0], PNG_SIZE[1])
    with pytest.raises(PipelineError, match="--dims"):
        landscape(LandscapeConfig(planted, (a.run_id,), dims=3))


def test_filter_normalised_directions_and_weights_restored() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 1))
    d = filter_normalised_direction(model, torch.Generator().manual_seed(0))
    for p, dp in zip(model.parameters(), d, strict=True):
        if p.dim() == 1:
            assert torch.count_nonzero(dp) == 0
        else:
            assert torch.allclose(dp.norm(dim=1), p.detach().norm(dim=1), atol=1e-6)
    before = [p.detach().clone() for p in model.parameters()]
    model.eval()
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    out = surface(model, x, y, lambda m, xs, ys: float(m(xs).sum()), [d], np.array([-1.0, 0.0, 1.0]))
    with torch.no_grad():
        assert out[1] == pytest.approx(float(model(x).sum()), abs=1e-5)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_the_reports_intervals_are_the_metrics_views(tmp_path: Path) -> None:
    """One interval per quantity: the report reads what training stored (the `metrics` view), never a
    second bootstrap (last round the report drew with another seed: [61.11, 100] against [64.00, 100])."""
    import math

    store = planted_store(tmp_path, rows=150, signal=1.0)
    run = train(store, TrainConfig.from_dict({**FAST, "features": "image", "seed": 3}))
    shown = write_report(ReportConfig(store, run.run_id, tmp_path / "report")).intervals
    rows = catalog.query(store, "SELECT generator, metric, value, lo, hi, n FROM metrics WHERE run_id = ? "
                                "AND split = 'test' AND metric NOT LIKE '%_at_val_threshold'", [run.run_id]).to_pylist()
    assert rows and len(rows) == sum(len(d) for d in shown.values())

    def same(a: float | None, b: float) -> bool:
        return (a is None and math.isnan(b)) or (a is not None and a == pytest.approx(b, abs=1e-9))

    for r in rows:
        e = shown[r["generator"]][r["metric"]]
        assert same(r["value"], e.value) and same(r["lo"], e.lo) and same(r["hi"], e.hi) and r["n"] == e.n, r


def test_the_robustness_row_none_is_the_runs_stored_test_auc(d3_store: Store) -> None:
    import math

    from pipeline.compositions.experiment import ExperimentConfig
    from pipeline.compositions.experiment import run as run_experiment
    from pipeline.stages.encode import run as encode
    from pipeline.stages.perturb import PerturbConfig
    from pipeline.stages.perturb import run as perturb
    from tests.conftest import encode_config

    encode(encode_config(d3_store))
    run = train(d3_store, TrainConfig.from_dict({**FAST, "features": "image", "batch_size": 16}))
    perturb(PerturbConfig(d3_store, ("jpeg:50",)))
    encode(encode_config(d3_store))
    result = run_experiment(ExperimentConfig(d3_store, "robustness", run_id=run.run_id))
    stored = {r["generator"]: r for r in catalog.query(
        d3_store, "SELECT generator, value, lo, hi FROM metrics WHERE run_id = ? AND split = 'test' "
                  "AND metric = 'auc'", [run.run_id]).to_pylist()}
    none = dict(zip(result.columns, result.cells["none"], strict=True))
    for generator, cell in none.items():
        if cell is None:
            continue
        for key in ("value", "lo", "hi"):
            want = stored[generator][key]
            assert (cell[key] is None and (want is None or math.isnan(want))) or cell[key] == pytest.approx(want)
    assert "jpeg:50" in result.cells


def test_report_and_landscape_commands_write_phone_readable_pages_listed_in_the_index(planted: Store) -> None:
    run = train(planted, TrainConfig.from_dict({**FAST, "name": "for the index"}))
    store = ["--store", str(planted.root)]
    done = runner.invoke(app, ["report", *store, "--run", run.run_id])
    assert done.exit_code == 0, done.output
    done = runner.invoke(app, ["landscape", *store, "--run", run.run_id, "--steps", "3"])
    assert done.exit_code == 0, done.output
    reports = planted.root / "reports"
    page = (reports / f"run-{run.run_id}" / "index.html").read_text()
    assert "<meta name='viewport' content='width=device-width, initial-scale=1'>" in page
    assert page.count("<table") == page.count("<div class='scroll'><table") > 3  # every table scrolls sideways
    assert "TPR @ 1% FPR" in page and "balanced accuracy" in page
    # each card's right image is its sample's nearest training image: the cosine shown is one of those
    shown = re.findall(r"nearest training image \([^,]*, cosine (-?[0-9.]+)\)", page)
    assert shown and set(shown) <= {f"{cos:.3f}" for _, cos in _nearest_by_brute_force(planted).values()}
    assert "[100.00, 100.00]" not in page  # a bootstrap that cannot vary is called what it is
    index = (reports / "index.html").read_text()
    assert "name='viewport'" in index
    links = dict((kind, link) for link, kind in re.findall(r"<a href='([^']+)'>([^<]+)</a>", index))
    assert links["run report"] == f"run-{run.run_id}/index.html"
    assert links["landscape (1-D)"].endswith("-1d.png") and (reports / links["landscape (1-D)"]).is_file()
    row = index.split(f"run-{run.run_id}/index.html")[1].split("</tr>")[0]
    assert f"<code>{run.run_id}</code>" in row and "<code>planted</code>" in row  # its run and model key


def _nearest_by_brute_force(store: Store) -> dict[str, tuple[str, float]]:
    """Every val and test sample's most similar training image, over every pair (a tie: the earlier
    matrix row, then sample id)."""
    table = feature_table(store, "planted")
    with duckdb.connect() as con:
        rows = con.sql(f"SELECT sample_id, split, image_row FROM {table.parts_sql} "
                       "ORDER BY image_row, sample_id").fetchall()
    train_rows = [(sid, row) for sid, split, row in rows if split == "train"]
    x = table.images.gather(np.array([row for _, row in train_rows]))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    nearest = {}
    for sid, split, row in rows:
        if split in ("val", "test"):
            q = table.images.gather(np.array([row]))[0]
            sims = x @ (q / np.linalg.norm(q))
            j = int(np.argmax(sims))
            nearest[sid] = (train_rows[j][0], float(sims[j]))
    return nearest


@pytest.mark.parametrize("candidates", [64, 1])
def test_a_gallery_samples_nearest_training_image_is_exact_with_or_without_the_second_pass(
        planted: Store, monkeypatch: pytest.MonkeyPatch, candidates: int) -> None:
    import pipeline.stages.report as report

    truth = _nearest_by_brute_force(planted)
    picked = sorted(truth)[::max(1, len(truth) // 12)]
    config = TrainConfig.from_dict(FAST)
    run = train(planted, config)
    # one candidate: each query's own row, which is not a training row, so every one takes the second pass
    monkeypatch.setattr(report, "NEAREST_CANDIDATES", candidates)
    second = []
    among = report._among_training
    monkeypatch.setattr(report, "_among_training", lambda *a: second.append(len(a[1])) or among(*a))
    found = report._nearest_training(planted, config, run.metrics, picked)
    assert sorted(found) == sorted(picked)
    for sid in picked:
        assert found[sid][0] == truth[sid][0] and found[sid][1] == pytest.approx(truth[sid][1], abs=1e-5)
    assert second == ([] if candidates > 1 else [len(picked)])
