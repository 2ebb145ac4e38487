"""Alarms computed once per run from its own rows, shown with its numbers; run identity by content.

Mirrors `pipeline/evaluation/alarms.py` and `probes.py`, through the command where it is one."""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.compositions.experiment import ExperimentResult, to_markdown
from pipeline.evaluation import alarms, probes
from pipeline.evaluation.results import RunMetrics, SplitMetrics
from pipeline.features.view import feature_table
from pipeline.stages.encode import run as encode
from pipeline.stages.ingest import IngestConfig
from pipeline.stages.ingest import run as ingest
from pipeline.stages.train import TrainResult
from pipeline.store import catalog
from pipeline.store.layout import Store
from pipeline.synthetic import make_d3
from tests.conftest import encode_config, planted_store
from trainer.metrics import Estimate, evaluate

runner = CliRunner()
FAST = ["--epochs", "2", "--batch-size", "32"]


def _demo_store(root: Path, rows: int = 60) -> Store:
    """The demo's data (synthetic D3: real images carry captions, generated ones prompts), encoded."""
    data = make_d3(root / "src", rows=rows, size=32)
    store = Store(root / "store")
    ingest(IngestConfig(data.parquet, "d3", store, real_images=data.real_images))
    encode(encode_config(store))
    return store


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return _demo_store(tmp_path_factory.mktemp("demo"))


def _sql(store: Store, query: str) -> list[dict]:
    done = runner.invoke(app, ["sql", "--store", str(store.root), "--format", "json", query])
    assert done.exit_code == 0, done.output
    return [json.loads(line) for line in done.output.splitlines() if line.startswith("{")]


def test_train_alone_raises_the_shortcut_alarm_on_the_demo_store_once_and_stores_it(demo: Store) -> None:
    done = runner.invoke(app, ["train", "--store", str(demo.root), *FAST])
    assert done.exit_code == 0, done.output
    flat = " ".join(done.output.split())
    assert flat.count("the captions alone separate the classes") == 1  # printed once
    assert "rerun with --pairing shared" in flat  # D3 groups hold both classes: shared pairing is the advice
    assert "Small test split" in flat  # the README's promise: train shows the small-test banner too
    rows = _sql(demo, "SELECT run_id, kind, sentence, evidence FROM alarms ORDER BY kind")
    kinds = {r["kind"] for r in rows}
    assert {"text_shortcut", "format_shortcut", "small_test", "too_few"} <= kinds
    text = next(r for r in rows if r["kind"] == "text_shortcut")
    evidence = json.loads(text["evidence"])
    assert evidence["source"] == "probe" and evidence["text_auc"]["value"] >= alarms.TEXT_AUC_ALARM
    assert evidence["mixed_groups"] > 0.9
    run = _sql(demo, "SELECT run_id, metrics_json FROM runs")[0]
    stored = RunMetrics.from_json(json.loads(run["metrics_json"]))
    assert sorted(a.sentence for a in stored.alarms) == sorted(r["sentence"] for r in rows)
    # the report shows the stored alarms, not a recomputation
    done = runner.invoke(app, ["report", "--store", str(demo.root), "--run", run["run_id"]])
    assert done.exit_code == 0, done.output
    page = (demo.root / "reports" / f"run-{run['run_id']}" / "index.html").read_text()
    shortcuts = [a for a in stored.alarms if a.kind in alarms.SHORTCUT_KINDS]
    assert page.count('class="alarm"') == len(shortcuts) == 2 and "Shortcut checks" in page
    assert all(html.escape(a.sentence, quote=True) in page for a in stored.alarms)
    assert "one false positive is already" in page  # TPR at 1% FPR from a handful of real images, marked


def test_an_image_only_run_has_no_text_alarm_and_shared_pairing_reuses_it(demo: Store) -> None:
    store = ["--store", str(demo.root)]
    done = runner.invoke(app, ["train", *store, *FAST, "--features", "image"])
    assert done.exit_code == 0, done.output
    assert "captions alone" not in done.output
    first = _sql(demo, "SELECT run_id, config_hash FROM runs WHERE features = 'image'")
    done = runner.invoke(app, ["train", *store, *FAST, "--features", "image", "--pairing", "shared"])
    assert done.exit_code == 0, done.output
    both = _sql(demo, "SELECT DISTINCT config_hash FROM runs WHERE features = 'image'")
    assert [r["config_hash"] for r in both] == [first[0]["config_hash"]]  # the pairing is not what it read


def test_the_same_data_in_two_stores_gets_the_same_config_hash(tmp_path: Path) -> None:
    hashes = []
    for name in ("a", "b"):
        store = planted_store(tmp_path / name, rows=60, dim=8, signal=2.0)
        done = runner.invoke(app, ["train", "--store", str(store.root), *FAST])
        assert done.exit_code == 0, done.output
        hashes.append(_sql(store, "SELECT config_hash FROM runs")[0]["config_hash"])
        shards = {p.name for p in catalog.shard_paths(store, "samples")}
        assert shards  # (named by the time of the import: the two stores' file names differ)
    assert hashes[0] == hashes[1]
    tables = [feature_table(Store(tmp_path / n / "store"), "planted") for n in ("a", "b")]
    assert tables[0].parts[0].name != "" and tables[0].directory != tables[1].directory
    for features in ("image", "text", "image+text"):
        assert tables[0].data_fingerprint(features) == tables[1].data_fingerprint(features)


def test_perturb_and_encode_then_table1_reuses_every_row(tmp_path: Path) -> None:
    store = _demo_store(tmp_path, rows=30)
    args = ["--store", str(store.root), *FAST]
    first = runner.invoke(app, ["experiment", "table1", *args])
    assert first.exit_code == 0, first.output
    assert "5 runs trained, 0 reused" in " ".join(first.output.split())
    for command in (["perturb", "--store", str(store.root), "--ops", "jpeg:50"],
                    ["encode", "--store", str(store.root), "--model", "Tiny-ViT-16", "--workers", "0"]):
        done = runner.invoke(app, command)
        assert done.exit_code == 0, done.output
    assert _sql(store, "SELECT count(*) AS n FROM samples WHERE perturbation IS NOT NULL")[0]["n"] > 0
    again = runner.invoke(app, ["experiment", "table1", *args])
    assert again.exit_code == 0, again.output
    flat = " ".join(again.output.split())
    assert "0 runs trained, 5 reused" in flat
    assert _sql(store, "SELECT count(*) AS n FROM runs")[0]["n"] == 5
    # the shared pairing changes the text of the rows that read text, not the image-only baseline
    shared = runner.invoke(app, ["experiment", "table1", *args, "--pairing", "shared"])
    assert shared.exit_code == 0, shared.output
    assert "4 runs trained, 1 reused" in " ".join(shared.output.split())


def test_the_text_probe_is_deterministic_and_sees_the_shortcut_only_where_the_text_differs(tmp_path: Path) -> None:
    store = planted_store(tmp_path, rows=300, dim=16, signal=0.0, text_shortcut=4.0)
    as_ingested = feature_table(store, "planted")
    probe = probes.text_probe(store, as_ingested, seed=0)
    assert probe["ran"] and probe["auc"]["value"] > 0.95 and probe["mixed_groups"] == 1.0
    assert probes.text_probe(store, as_ingested, seed=0) == probe
    shared = probes.text_probe(store, feature_table(store, "planted", "shared"), seed=0)
    assert shared["ran"] and abs(shared["auc"]["value"] - 0.5) < 0.1  # one text per group: nothing to find
    assert probe["test_rows"] <= probes.TEXT_ROWS and probe["train_rows"] <= probes.TEXT_ROWS
    small = probes.text_probe(store, as_ingested, seed=0, limit=100)  # a sample of whole groups, bounded
    assert small["train_rows"] == small["test_rows"] == 100


def test_probe_results_are_cached_by_what_they_read(tmp_path: Path) -> None:
    store = planted_store(tmp_path, rows=80, dim=8, text_shortcut=4.0)
    table = feature_table(store, "planted")
    first = probes.checks(store, table, "image+text", 0, "l2")
    cached = list((store.root / "cache" / "probes").glob("*.json"))
    assert len(cached) == 2 and set(first) == {"text", "format"}
    assert probes.checks(store, table, "image+text", 0, "l2") == first
    assert len(list((store.root / "cache" / "probes").glob("*.json"))) == 2
    probes.checks(store, table, "image+text", 1, "l2")  # another seed: another interval, another file
    assert len(list((store.root / "cache" / "probes").glob("*.json"))) == 4


def test_n_is_per_class_where_the_metric_is_a_rate_over_one_class() -> None:
    labels = np.array([0] * 6 + [1] * 24)
    scores = np.linspace(0, 1, 30)
    out = evaluate(labels, scores, rng=np.random.default_rng(0), n_boot=50)
    assert out["real_acc"].n == 6 and out["fake_acc"].n == 24 and out["tpr_at_fpr_1"].n == 24
    assert out["auc"].n == out["acc"].n == 30
    assert all(e.n_real == 6 and e.n_fake == 24 for e in out.values())
    assert alarms.caveat("tpr_at_fpr_1", out["tpr_at_fpr_1"]).startswith("from 6 real images")
    assert alarms.caveat("auc", out["auc"]) == "rests on 6 real and 24 generated images"
    enough = evaluate(np.array([0] * 200 + [1] * 200), np.linspace(0, 1, 400))
    assert all(alarms.caveat(m, e) is None for m, e in enough.items())
    assert alarms.caveat("auc", Estimate(0.9, 0.8, 1.0, 12)) is None  # an old run: counts not recorded


def test_the_metrics_view_counts_real_images_for_real_accuracy(tmp_path: Path) -> None:
    store = planted_store(tmp_path, rows=60, dim=8, signal=2.0)
    done = runner.invoke(app, ["train", "--store", str(store.root), *FAST, "--features", "image"])
    assert done.exit_code == 0, done.output
    rows = {r["metric"]: r for r in _sql(store, "SELECT metric, n, n_real, n_fake FROM metrics "
                                                "WHERE split = 'test' AND generator = 'all'")}
    real = _sql(store, "SELECT count(*) AS n FROM samples WHERE split = 'test' AND label = 0")[0]["n"]
    assert rows["real_acc"]["n"] == rows["real_acc"]["n_real"] == real
    assert rows["fake_acc"]["n"] == rows["fake_acc"]["n_fake"] == rows["auc"]["n"] - real


def _run(label: str, value: float, lo: float, hi: float, seed_alarms: tuple = ()) -> TrainResult:
    test = SplitMetrics.from_json({"n": 40, "groups": 8, "auc": value, "intervals": {"all": {"auc": {
        "value": value, "lo": lo, "hi": hi, "n": 40}}}})
    metrics = RunMetrics("m", False, "mlp", "image", "as-ingested", SplitMetrics(), SplitMetrics(), test,
                         alarms=seed_alarms)
    return TrainResult(label, "h", metrics, skipped=True)


def test_markdown_names_a_degenerate_interval_and_bolds_the_mean_over_seeds() -> None:
    runs = [_run("r0", 1.0, 1.0, 1.0), _run("r1", 0.9, 0.8, 1.0)]
    result = ExperimentResult("table1", rows=[("Method", runs[0])], seed_runs={"Method": runs}, columns=["all"],
                              cells={"Method": [{"value": 1.0, "lo": 1.0, "hi": 1.0, "n": 40}]})
    text = to_markdown(result)
    assert "[100.00, 100.00]" not in text and "100.00 (interval not informative)" in text
    assert "**95.00 ± 7.07**; first seed 100.00" in text and "all 2 runs reused" in text
    assert "cost nothing" not in text


def test_rules_of_the_readme_match_the_code() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for number in (alarms.TEXT_AUC_ALARM, alarms.FORMAT_AUC_ALARM):
        assert f"AUC ≥ {number}" in readme
    assert f"fewer than {alarms.MIN_GROUPS} groups" in readme and f"fewer than {alarms.MIN_PER_CLASS}" in readme
    assert "lower bound above 0.5" in readme and "not ruled out" in readme


def test_an_old_run_without_stored_alarms_says_it_was_not_checked(tmp_path: Path) -> None:
    store = planted_store(tmp_path, rows=40, dim=8)
    done = runner.invoke(app, ["train", "--store", str(store.root), *FAST, "--features", "image"])
    assert done.exit_code == 0, done.output
    run_id = _sql(store, "SELECT run_id FROM runs")[0]["run_id"]
    path = store.run_dir(run_id) / "metrics.json"
    old = json.loads(path.read_text())
    for key in ("alarms", "checks"):
        old.pop(key, None)
    old["version"] = 2
    path.chmod(0o644)
    path.write_text(json.dumps(old))
    out = tmp_path / "page"
    done = runner.invoke(app, ["report", "--store", str(store.root), "--run", run_id, "--output", str(out)])
    assert done.exit_code == 0, done.output
    assert "trained before runs stored their shortcut checks" in (out / "index.html").read_text()
    shutil.rmtree(out)


def test_a_stored_split_without_a_threshold_reads_as_none() -> None:
    """A run recorded with `--lr inf` before such settings were refused stored `threshold: null`."""
    split = SplitMetrics.from_json({"n": 4, "at_val_threshold": {"threshold": None, "metrics": {}}})
    assert split.at_val_threshold is None
