"""`pipeline predict` and `pipeline export`, driven as a user types them, and `Detector` in Python."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.runs.config import TrainConfig
from pipeline.stages.ingest import IngestConfig
from pipeline.stages.ingest import run as ingest
from pipeline.stages.predict import PredictConfig
from pipeline.stages.predict import run as predict
from pipeline.store import catalog
from pipeline.store.layout import Store
from pipeline.synthetic import generated_image, real_image
from tests.conftest import encode_config, train_run

runner = CliRunner()
FAST = {"epochs": 3, "batch_size": 64, "lr": 1e-2, "features": "image"}


def _cli(*args: str, code: int = 0) -> str:
    result = runner.invoke(app, list(args), env={"COLUMNS": "250"})
    assert result.exit_code == code, result.output
    return " ".join(result.output.split())


def _images(root: Path, n: int, seed: int, captions: bool = False) -> Path:
    """n new images, half 'real' textures and half 'generated' gradients (synthetic, random-weight CLIP)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = real_image(rng, 40) if i % 2 else generated_image(rng, i % 4, 40)
        img.save(root / f"new{i:03d}.{'jpg' if i % 3 else 'png'}")
        if captions:
            (root / f"new{i:03d}.txt").write_text(f"picture number {i}")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, str]:
    """A store of synthetic real and generated images, encoded with a random-weight Tiny CLIP, and an
    image-only run trained on it."""
    root = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(0)
    for i in range(60):
        (root / "src" / "real").mkdir(parents=True, exist_ok=True)
        (root / "src" / "sdxl").mkdir(parents=True, exist_ok=True)
        real_image(rng, 40).save(root / "src" / "real" / f"{i}.jpg")
        generated_image(rng, 2, 40).save(root / "src" / "sdxl" / f"{i}.png")
        (root / "src" / "real" / f"{i}.txt").write_text(f"photo {i}")
        (root / "src" / "sdxl" / f"{i}.txt").write_text(f"render {i}, trending")
    store = Store(root / "store")
    ingest(IngestConfig(root / "src", "folder", store, group_by="image"))
    from pipeline.stages import encode

    encode.run(encode_config(store))
    run = train_run(store, TrainConfig.from_dict(FAST))
    return store, run.run_id  # type: ignore[attr-defined]


def _state(store: Store) -> tuple[list[tuple[str, str]], list[dict[str, object]]]:
    """Every committed shard with a digest of its bytes, and the sample counts by split and label."""
    shards = sorted((s, hashlib.sha256((store.root / s).read_bytes()).hexdigest())
                    for s in json.loads(store.manifest_path.read_text())["shards"])
    counts = catalog.query(Store(store.root), "SELECT split, label, count(*) AS n FROM samples GROUP BY ALL "
                           "ORDER BY ALL").to_pylist()
    return shards, counts


def _hostile(root: Path) -> list[Path]:
    """Ten inputs that must each get a row with a reason: given by name, or found in the folder."""
    root.mkdir(parents=True)
    good = root / "good.jpg"
    real_image(np.random.default_rng(5), 40).save(good)
    (root / "truncated.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "text.jpg").write_text("not an image at all")
    os.mkfifo(root / "fifo.jpg")
    (root / "device.jpg").symlink_to("/dev/zero")
    with open(root / "huge.jpg", "wb") as f:
        f.truncate(5_000_000)  # sparse: over --max-bytes below
    Image.new("L", (3000, 3000)).save(root / "bomb.png")  # over --max-pixels below
    good.unlink()
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(str(root / "socket.jpg"))  # (the file stays after the socket is closed)
    listening.close()
    (root / "broken.tar").write_bytes(b"\x00garbage" * 100)
    return [root, root / "missing.jpg", root / "broken.tar"]


def test_200_new_images_and_10_hostile_files_give_200_scores_10_reasons_and_change_nothing(
        trained: tuple[Store, str], tmp_path: Path) -> None:
    store, run_id = trained
    before = _state(store)
    images = _images(tmp_path / "new", 200, seed=1)
    hostile = _hostile(tmp_path / "hostile")
    out = tmp_path / "predictions.csv"
    text = _cli("predict", str(images), *map(str, hostile), "--run", run_id, "--store", str(store.root),
                "--output", str(out), "--max-bytes", "1000000", "--max-pixels", "4000000", "--workers", "0")
    assert "predicted 210 images" in text and "200 scored" in text, text
    table = pacsv.read_csv(out)
    assert table.num_rows == 210
    scored = table.filter(table.column("score").is_valid())
    assert scored.num_rows == 200 and scored.column("sha256").null_count == 0
    reasons = sorted(r for r in table.column("reason").to_pylist() if r)
    assert reasons == sorted(["truncated", "empty", "not_an_image", "not_a_regular_file", "not_a_regular_file",
                              "too_large", "too_many_pixels", "not_a_regular_file", "unreadable",
                              "unreadable_archive"]), reasons
    assert all(p is not None for p in scored.column("probability").to_pylist())
    assert set(scored.column("generated").to_pylist()) <= {True, False}
    after = _state(store)
    # no sample, split, conflict, vector or score added, not a byte of a shard changed; the one shard added
    # is the FAISS index the OOD flag searches (built once, derived from the vectors: no dataset)
    assert [s for s in after[0] if s not in before[0]] == [s for s in after[0] if s[0].startswith("indexes/")
                                                           and s not in before[0]]
    assert [s for s in before[0] if s not in after[0]] == [] and after[1] == before[1]


def test_export_then_predict_detector_in_a_fresh_directory_gives_identical_scores(
        trained: tuple[Store, str], tmp_path: Path) -> None:
    store, run_id = trained
    images = _images(tmp_path / "new", 12, seed=2)
    folder = tmp_path / "exported"
    text = _cli("export", "--run", run_id, "--store", str(store.root), "--output", str(folder))
    assert "model.safetensors" in text
    card = (folder / "README.md").read_text()
    assert "RANDOM-WEIGHT CLIP" in card and "ROC AUC" in card and "## Alarms" in card
    config = json.loads((folder / "config.json").read_text())
    assert config["clip"]["architecture"] == "Tiny-ViT-16" and config["clip"]["preprocess_digest"]
    assert config["ood"]["kind"] == "centroids" and config["calibration"]["method"] == "platt"
    # elsewhere, with no store: a fresh directory, a fresh process
    fresh = tmp_path / "elsewhere"
    fresh.mkdir()
    shutil.copytree(folder, fresh / "detector")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("PIPELINE_STORE", None)
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "predict", str(images), "--detector", "detector",
                           "--output", "scores.parquet", "--workers", "0"], cwd=fresh, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (fresh / "data").exists()  # no store was made
    alone = pq.read_table(fresh / "scores.parquet")
    with_store = tmp_path / "with_store.parquet"
    _cli("predict", str(images), "--run", run_id, "--store", str(store.root), "--output", str(with_store),
         "--workers", "0")
    there = pq.read_table(with_store)
    assert alone.column("path").to_pylist() == there.column("path").to_pylist()
    for column in ("score", "generated", "probability", "threshold", "sha256"):
        assert alone.column(column).to_pylist() == there.column(column).to_pylist(), column


def test_the_model_card_shows_the_alarms_stored_with_the_run(trained: tuple[Store, str]) -> None:
    from dataclasses import replace

    from pipeline.evaluation.results import Alarm
    from pipeline.present.card import model_card
    from pipeline.runs.detector import from_run
    from pipeline.runs.record import load_run_record

    store, run_id = trained
    config, metrics = load_run_record(store, run_id)
    spec = from_run(store, run_id, ood=False).spec
    fired = (Alarm("text_shortcut", "A text-only run scores 0.97: the captions give the label away."),
             Alarm("small_test", "The test split has 12 generated images: intervals are wide."))
    card = model_card(spec, replace(metrics, alarms=fired), run_id, config.flat())
    alarms = card.split("## Alarms", 1)[1].split("## Limits", 1)[0]
    assert "**text_shortcut**: A text-only run scores 0.97" in alarms and "**small_test**: The test split" in alarms
    assert "None fired" not in alarms
    quiet = model_card(spec, replace(metrics, alarms=()), run_id, config.flat())
    assert "None fired when the run was trained." in quiet


def test_keep_stores_unlabelled_samples_and_a_second_predict_is_a_lookup(
        trained: tuple[Store, str], tmp_path: Path) -> None:
    store, run_id = trained
    images = _images(tmp_path / "new", 20, seed=3)
    labelled_before = _state(store)[1]
    first = predict(PredictConfig((images,), Store(store.root), run_id, keep=True, workers=0, collect=True))
    assert (first.encoded, first.cached, first.kept) == (20, 0, {"samples": 20, "images": 20, "texts": 0})
    counts = _state(store)[1]
    assert [c for c in counts if c["split"] != "unlabelled"] == labelled_before  # training data unchanged
    assert {"split": "unlabelled", "label": None, "n": 20} in counts
    second = predict(PredictConfig((images,), Store(store.root), run_id, keep=True, workers=0, collect=True))
    assert (second.encoded, second.cached, second.kept) == (0, 20, {"samples": 0, "images": 0, "texts": 0})
    assert second.rows.column("score").to_pylist() == first.rows.column("score").to_pylist()
    assert all(second.rows.column("cached").to_pylist())
    # score scores the unlabelled samples too, and says what it could not score and why
    _cli("ingest", str(_images(tmp_path / "later", 3, seed=30)), "--format", "folder", "--unlabelled",
         "--store", str(store.root))
    text = _cli("score", "--run", run_id, "--store", str(store.root))
    assert "20 of them unlabelled" in text and "not scored 3 samples: not encoded yet" in text, text


def test_an_image_text_detector_without_captions_refuses_in_one_sentence_naming_an_image_only_run(
        trained: tuple[Store, str], tmp_path: Path) -> None:
    store, image_run = trained
    both = train_run(Store(store.root), TrainConfig.from_dict({**FAST, "features": "image+text", "seed": 1}))
    images = _images(tmp_path / "new", 4, seed=4)
    text = _cli("predict", str(images), "--run", both.run_id, "--store", str(store.root), code=2)  # type: ignore[attr-defined]
    assert "reads image+text features" in text and "has no caption" in text and f"--run {image_run}" in text
    assert "Traceback" not in text
    captioned = _images(tmp_path / "captioned", 4, seed=4, captions=True)
    text = _cli("predict", str(captioned), "--run", both.run_id, "--store", str(store.root), "--workers", "0")  # type: ignore[attr-defined]
    assert "4 scored" in text
    text = _cli("predict", str(images), "--run", both.run_id, "--store", str(store.root), "--caption", "a photo",  # type: ignore[attr-defined]
                "--workers", "0")
    assert "4 scored" in text


def test_lists_tars_and_explain(trained: tuple[Store, str], tmp_path: Path) -> None:
    store, run_id = trained
    images = _images(tmp_path / "new", 6, seed=6)
    listing = tmp_path / "list.csv"
    listing.write_text("path,caption\n" + "".join(f"new/{p.name},cap {i}\n" for i, p in
                                                  enumerate(sorted(images.glob("*.*")))))
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        for p in sorted(images.glob("*.*"))[:3]:
            tar.add(p, arcname=f"k{p.stem}.{p.suffix[1:]}")
    out = tmp_path / "out.json"
    _cli("predict", str(listing), str(tmp_path / "shard.tar"), "--run", run_id, "--store", str(store.root),
         "--explain", "--neighbours", "2", "--output", str(out), "--workers", "0")
    rows = json.loads(out.read_text())
    assert len(rows) == 9 and all(r["score"] is not None for r in rows)
    assert rows[6]["path"].endswith("shard.tar::knew000.png")
    assert rows[0]["sha256"] == rows[6]["sha256"] and rows[0]["score"] == rows[6]["score"]  # same bytes
    for r in rows:
        assert len(r["neighbours"]) == 2 and all(n["split"] == "train" for n in r["neighbours"])
        assert {n["generator"] for n in r["neighbours"]} <= {"real", "sd-xl"}
    result = runner.invoke(app, ["predict", str(listing), "--run", run_id, "--store", str(store.root), "--json",
                                 "--workers", "0"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)  # one JSON document on stdout, progress on stderr
    assert (doc["inputs"], doc["scored"], len(doc["rows"])) == (6, 6, 6)
    assert [r["score"] for r in doc["rows"]] == [r["score"] for r in rows[:6]]


def test_output_paths_that_are_not_plain_files_are_refused(trained: tuple[Store, str], tmp_path: Path) -> None:
    store, run_id = trained
    images = _images(tmp_path / "new", 1, seed=7)
    os.mkfifo(tmp_path / "fifo.csv")
    (tmp_path / "link.csv").symlink_to(tmp_path / "elsewhere.csv")
    (tmp_path / "dir.csv").mkdir()
    for target, why in ((tmp_path / "fifo.csv", "is a FIFO"), (tmp_path / "link.csv", "symbolic link"),
                        (tmp_path / "dir.csv", "directory"), (store.root / "x.csv", "inside the store"),
                        (tmp_path / "x.txt", "is not a file format (.csv, .json, .parquet)"),
                        (tmp_path / "scores.d", "for a folder of Parquet parts, give a name without a suffix")):
        text = _cli("predict", str(images), "--run", run_id, "--store", str(store.root), "--output", str(target),
                    code=2)
        assert why in text, text
    assert not (tmp_path / "elsewhere.csv").exists()


def test_detector_in_python_is_the_cli_and_importing_pipeline_stays_light(
        trained: tuple[Store, str], tmp_path: Path) -> None:
    store, run_id = trained
    images = _images(tmp_path / "new", 3, seed=8)
    from pipeline import Detector

    table = Detector.load(run_id, store=store.root).predict(sorted(images.glob("*.*")))
    out = tmp_path / "cli.parquet"
    _cli("predict", str(images), "--run", run_id, "--store", str(store.root), "--output", str(out), "--workers", "0")
    assert table.column("score").to_pylist() == pq.read_table(out).column("score").to_pylist()
    code = "import sys, pipeline; assert 'torch' not in sys.modules; from pipeline import Detector; print(Detector)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 0, done.stderr


def test_the_readme_detector_example_runs_as_written(trained: tuple[Store, str], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    store, run_id = trained
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("In Python, on the same code path")[1].split("```python\n")[1].split("```")[0]
    _cli("export", "--run", run_id, "--store", str(store.root), "--output", str(tmp_path / "detector"))
    real_image(np.random.default_rng(9), 40).save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {}
    exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - the documented example, as written
    table = scope["table"]
    assert table.num_rows == 1 and table.column("score")[0].as_py() is not None  # type: ignore[attr-defined]


def test_runs_rm_and_clean_take_the_ood_reference_of_a_removed_run(trained: tuple[Store, str], tmp_path: Path) -> None:
    store, _ = trained
    other = train_run(Store(store.root), TrainConfig.from_dict({**FAST, "seed": 5}))
    images = _images(tmp_path / "new", 2, seed=11)
    _cli("predict", str(images), "--run", other.run_id, "--store", str(store.root), "--workers", "0")  # type: ignore[attr-defined]
    [reference] = list((store.root / "cache" / "ood").glob(f"*/{other.run_id}"))  # type: ignore[attr-defined]
    assert any(p.name != ".lock" for p in reference.iterdir())
    _cli("runs", "rm", other.run_id, "--store", str(store.root))  # type: ignore[attr-defined]
    assert [p.name for p in reference.iterdir()] == [".lock"]
    # one left behind (a predict held it while the run was removed): `clean` names it and takes it
    planted = reference.parent / "20200101-000000-deadbeef-0000"
    planted.mkdir()
    (planted / ".lock").touch()
    (planted / "reference.json").write_text("{}")
    planned = _cli("clean", "--dry-run", "--store", str(store.root))
    assert "caches of models or runs no longer in the store 1 " in planned, planned
    _cli("clean", "--store", str(store.root))
    assert not (planted / "reference.json").exists()


def test_a_killed_predicts_temp_beside_its_output_is_swept_by_the_next_one(
        trained: tuple[Store, str], tmp_path: Path) -> None:
    from pipeline.store.atomic import temp_path

    store, run_id = trained
    images = _images(tmp_path / "new", 2, seed=12)
    out = tmp_path / "out.csv"
    host = temp_path(out).name.split(".")[3].split("~")[0]
    dead = out.with_name(f".out.csv.{host}~999999999~deadbeef.tmp")  # this host, a pid that does not run
    dead.write_text("half a file")
    other = tmp_path / ".notes.txt.tmp"  # the user's own hidden file: never swept
    other.write_text("mine")
    _cli("predict", str(images), "--run", run_id, "--store", str(store.root), "--output", str(out), "--workers", "0")
    assert not dead.exists() and other.exists() and out.exists()
    assert [p.name for p in tmp_path.glob(".out.csv*")] == []
