"""Perturbations: pure, deterministic, content-addressed; derived samples keep their source's identity."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.sources.perturbations import parse_ops
from pipeline.stages.perturb import PerturbConfig
from pipeline.stages.perturb import run as perturb
from pipeline.store import catalog
from pipeline.store.layout import Store


def _image(seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((48, 64, 3)) * 255).astype(np.uint8), "RGB")


def test_parse_ops_and_sentences() -> None:
    ops = parse_ops(["jpeg:90,75", "resize:0.5", "blur:1,2", "crop:0.8", "noise:0.02", "jpeg:90"])
    assert [p.name for p in ops] == ["jpeg:90", "jpeg:75", "resize:0.5", "blur:1", "blur:2", "crop:0.8", "noise:0.02"]
    for bad, match in (["jpeg:101"], "out of range"), (["sharpen:1"], "Unknown perturbation"), (["blur"], "needs"), \
                      (["blur:x"], "not a number"), ([], "at least one"):
        with pytest.raises(PipelineError, match=match):
            parse_ops(bad)


def test_operations_are_deterministic_and_do_what_they_say() -> None:
    image = _image()
    for p in parse_ops(["jpeg:90,50", "resize:0.5", "blur:2", "crop:0.5", "noise:0.05"]):
        a, b = p.apply(image, b"sample-a"), p.apply(image, b"sample-a")
        assert a == b, p.name
        out = Image.open(io.BytesIO(a))
        assert out.format == ("JPEG" if p.op == "jpeg" else "PNG")
        if p.op == "resize":
            assert out.size == (32, 24)
        if p.op == "crop":
            assert out.size == (32, 24)
        if p.op == "noise":  # the noise depends on the sample, so two samples get different noise
            assert a != p.apply(image, b"sample-b")
            diff = np.asarray(out, np.float32) - np.asarray(image, np.float32)
            assert 0.03 * 255 < diff.std() < 0.07 * 255
    low, high = (len(p.apply(image, b"x")) for p in parse_ops(["jpeg:50,95"]))
    assert low < high
    blurred = np.asarray(Image.open(io.BytesIO(parse_ops(["blur:2"])[0].apply(image, b"x"))), np.float32)
    assert np.abs(np.diff(blurred, axis=1)).mean() < np.abs(np.diff(np.asarray(image, np.float32), axis=1)).mean()


def test_perturb_derives_content_addressed_samples_and_a_rerun_adds_nothing(d3_store: Store) -> None:
    first = perturb(PerturbConfig(d3_store, ("jpeg:75", "resize:0.5")))
    assert first.derived > 0 and first.by_op["jpeg:75"] == first.by_op["resize:0.5"]
    again = perturb(PerturbConfig(d3_store, ("jpeg:75", "resize:0.5")))
    assert again.derived == 0 and again.existing == first.derived
    rows = catalog.query(d3_store, (
        "SELECT d.*, s.label AS s_label, s.generator AS s_generator, s.group_key AS s_group, s.split AS s_split, "
        "s.text AS s_text FROM samples d JOIN samples s ON s.sample_id = d.derived_from")).to_pylist()
    assert len(rows) == first.derived
    for r in rows:
        assert (r["label"], r["generator"], r["group_key"], r["split"], r["text"]) == (
            r["s_label"], r["s_generator"], r["s_group"], r["s_split"], r["s_text"])
        assert r["split"] == "test" and r["perturbation"] in ("jpeg:75", "resize:0.5")
        data = open(r["source_uri"], "rb").read()
        assert hashlib.sha256(data).hexdigest() == r["sample_id"] and len(data) == r["byte_length"]
    labels = {r["label"] for r in rows}
    assert labels == {0, 1}  # real and generated images alike
    with pytest.raises(PipelineError, match="--splits"):
        PerturbConfig(d3_store, ("jpeg:75",), ("holdout",))


def test_perturb_streams_batches_with_a_limit_and_derives_only_missing_pairs(d3_store: Store, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import pipeline.stages.perturb as stage

    monkeypatch.setattr(stage, "BATCH_ROWS", 3)  # sources and key lookups span many batches and shards
    monkeypatch.setattr(stage, "FLUSH_ROWS", 4)
    splits = ("test", "val")
    sizes = {r["split"]: r["n"] for r in catalog.query(
        d3_store, "SELECT split, count(*) AS n FROM samples WHERE derived_from IS NULL GROUP BY 1").to_pylist()}
    first = perturb(PerturbConfig(d3_store, ("jpeg:75",), splits, limit=5))
    assert first.derived + first.undecodable == sum(min(5, sizes[s]) for s in splits) and first.derived > 5
    second = perturb(PerturbConfig(d3_store, ("jpeg:75", "blur:1"), splits, limit=5))
    assert (second.existing, second.by_op) == (first.derived, {"jpeg:75": 0, "blur:1": first.derived})
    pairs = catalog.query(d3_store, "SELECT derived_from, perturbation, count(*) AS n FROM samples "
                                    "WHERE derived_from IS NOT NULL GROUP BY ALL").to_pylist()
    assert all(r["n"] == 1 for r in pairs) and len(pairs) == 2 * first.derived
    by_op: dict[str, set[str]] = {}
    for r in pairs:
        by_op.setdefault(r["perturbation"], set()).add(r["derived_from"])
    assert by_op["jpeg:75"] == by_op["blur:1"]  # the same sources: a fixed order, not the batch's
    assert perturb(PerturbConfig(d3_store, ("jpeg:75", "blur:1"), splits, limit=5)).derived == 0


def test_ops_from_toml(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "ops.toml"
    path.write_text("[ops]\njpeg = [90, 75]\nblur = 1\n")
    assert PerturbConfig.ops_from_toml(path) == ("jpeg:90,75", "blur:1")


@pytest.mark.slow
def test_robustness_and_training_on_one_format_everywhere(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Encode → train → perturb → encode only the new images → robustness; and a run on jpeg:95 everywhere."""
    from pipeline.compositions.experiment import ExperimentConfig
    from pipeline.compositions.experiment import run as run_exp
    from pipeline.runs.config import TrainConfig
    from pipeline.stages import encode
    from pipeline.stages.ingest import IngestConfig
    from pipeline.stages.ingest import run as ingest
    from pipeline.synthetic import make_d3
    from tests.conftest import encode_config
    from tests.conftest import train_run as train

    data = make_d3(tmp_path / "src", rows=40, size=48)
    store = Store(tmp_path / "store")
    ingest(IngestConfig(data.parquet, "d3", store, real_images=data.real_images))
    first = encode.run(encode_config(store))
    run = train(store, TrainConfig.from_dict({"epochs": 3, "batch_size": 64, "lr": 1e-2, "features": "image"}))
    with pytest.raises(PipelineError, match="No perturbed test samples"):
        run_exp(ExperimentConfig(store, "robustness", run_id=run.run_id))
    derived = perturb(PerturbConfig(store, ("jpeg:50", "blur:2")))
    again = encode.run(encode_config(store))
    assert again.images_encoded == derived.derived  # only the new images; their texts were encoded already
    assert again.texts_encoded == 0 and first.images_encoded > 0
    result = run_exp(ExperimentConfig(store, "robustness", run_id=run.run_id))
    assert [label for label, _ in result.rows] == ["none", "blur:2", "jpeg:50"]
    for cells in result.cells.values():
        overall = cells[-1]
        assert overall is not None and overall["lo"] <= overall["value"] <= overall["hi"]
    assert (result.page.parent / "robustness.png").exists()
    # the training view still holds only the samples as ingested
    assert train(store, TrainConfig.from_dict({"epochs": 3, "batch_size": 64, "lr": 1e-2, "features": "image"}),
                 skip_existing=True).metrics.test.n == run.metrics.test.n

    everywhere = perturb(PerturbConfig(store, ("jpeg:95",), ("train", "val", "test")))
    encode.run(encode_config(store))
    on_jpeg = train(store, TrainConfig.from_dict({"epochs": 2, "batch_size": 64, "lr": 1e-2, "features": "image",
                                                 "perturbation": "jpeg:95"}))
    n_scored = sum(on_jpeg.metrics.split(s).n for s in ("train", "val", "test"))
    assert n_scored == everywhere.derived
    with pytest.raises(PipelineError, match="No samples derived by jpeg:10"):
        train(store, TrainConfig.from_dict({"epochs": 1, "perturbation": "jpeg:10"}))


def test_perturb_from_the_cli(d3_store: Store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.test_cli import _run

    store = ["--store", str(d3_store.root)]
    code, out = _run("perturb", *store, "--ops", "jpeg:75 resize:0.5", "--splits", "test,val")
    assert code == 0 and "jpeg:75:" in out and "pipeline encode" in out, out
    toml = tmp_path / "ops.toml"
    toml.write_text("[ops]\njpeg = [75]\n")
    code, out = _run("perturb", *store, "--ops-file", str(toml), "--splits", "test,val")
    assert code == 0 and "derived 0 samples" in out, out
    code, out = _run("perturb", *store, "--ops", "jpeg:0")
    assert code == 2 and "out of range" in out and "Traceback" not in out
