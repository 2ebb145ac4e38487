"""The CLI drives the library; errors are one sentence, never a traceback."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.synthetic import make_d3

runner = CliRunner()


def _run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def _flat(text: str) -> str:
    """Terminal output as one line: box drawing and line wraps gone (rich wraps at the terminal's width)."""
    return " ".join("".join(" " if "\u2500" <= ch <= "\u257f" else ch for ch in text).split())


def test_a_full_disk_is_one_sentence_not_a_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import duckdb

    for exc in (OSError(errno.ENOSPC, "No space left on device", "/s/x.tmp"),
                duckdb.IOException('IO Error: Could not write file "/s/t.tmp": No space left on device')):
        def full(*args: object, exc: Exception = exc, **kwargs: object) -> None:
            raise exc

        monkeypatch.setattr("pipeline.stages.status.StatusConfig", lambda store: None)
        monkeypatch.setattr("pipeline.stages.status.run", full)
        code, out = _run("status", "--store", str(tmp_path))
        assert code == 1 and "the disk is full" in out and "Traceback" not in out, out


def test_demo_runs_end_to_end_and_labels_random_weights(tmp_path: Path) -> None:
    code, out = _run("demo", "--root", str(tmp_path / "demo"), "--rows", "6", "--workers", "0")
    assert code == 0, out
    assert "random weights" in out.lower() and "synthetic" in out.lower()
    assert "nothing to encode" in out and "0 forward passes" in out
    assert "real_image_missing" in out


def test_ingest_encode_status_sql(tmp_path: Path) -> None:
    data = make_d3(tmp_path / "src", rows=5, size=32)
    store = str(tmp_path / "store")
    code, out = _run("ingest", str(data.parquet), "--format", "d3", "--real-images",
                     str(data.real_images), "--store", store)
    assert code == 0 and "ingested 24 new samples" in out, out
    code, out = _run("encode", "--model", "Tiny-ViT-16", "--store", store, "--workers", "0")
    assert code == 0 and "encoded 23 images" in out and "RANDOM WEIGHTS" in out, out
    code, out = _run("status", "--store", store)
    assert code == 0 and "Tiny-ViT-16" in out and "truncated" in out, out
    code, out = _run("sql", "SELECT count(*) AS n FROM embeddings WHERE modality = 'image'", "--store", store)
    assert code == 0 and "23" in out
    csv = tmp_path / "o.csv"
    code, out = _run("sql", "SELECT label FROM samples", "--store", store, "--format", "csv", "--output", str(csv))
    assert code == 0 and len(csv.read_text().splitlines()) == 25


def test_errors_are_one_sentence_without_traceback(tmp_path: Path) -> None:
    code, out = _run("sql", "SELECT 1", "--store", str(tmp_path / "none"))
    assert code == 2 and out.startswith("error: No store at") and "Traceback" not in out
    code, out = _run("ingest", str(tmp_path), "--format", "nope", "--store", str(tmp_path / "s"))
    assert code == 2 and "'nope' is not one of 'd3', 'folder', 'webdataset', 'manifest'" in _flat(out)
    assert "Traceback" not in out
    code, out = _run("sql", "SELECT 1", "--store", str(tmp_path / "none"), "--format", "parquet")
    assert code == 2 and "--output" in out


def test_train_sweep_experiment_score_from_the_cli(tmp_path: Path) -> None:
    from tests.conftest import planted_store

    store = str(planted_store(tmp_path, rows=200, dim=8, signal=4.0).root)
    fast = ["--epochs", "2", "--batch-size", "128", "--store", store]
    code, out = _run("train", *fast, "--features", "image", "--no-sam", "--name", "cli")
    assert code == 0 and "test AUC" in out, out
    run_id = out.split("run ", 1)[1].split(":", 1)[0].strip()
    code, out = _run("sql", "SELECT name, features FROM runs", "--store", store, "--format", "json",
                     "--output", str(tmp_path / "runs.json"))
    assert code == 0 and '"name": "cli"' in (tmp_path / "runs.json").read_text()
    grid = tmp_path / "grid.toml"
    grid.write_text("[base]\nepochs = 1\nbatch_size = 128\n[[runs]]\nsam = false\n[[runs]]\nsam = true\n")
    code, out = _run("sweep", "--grid", str(grid), "--store", store)
    assert code == 0 and out.count("trained") == 2 and "open_clip imported by this sweep:" in out, out
    # (whether it says no is proven in a fresh process: test_train.py; here the demo test imported it)
    code, out = _run("sweep", "--grid", str(grid), "--store", store)
    assert code == 0 and out.count("skipped (exists)") == 2
    code, out = _run("experiment", "table1", *fast)
    assert code == 0 and "Text only" in out and "wrote" in out, out
    code, out = _run("score", "--run", run_id, "--store", store)
    assert code == 0 and "scored 0 samples" in out, out
    code, out = _run("train", *fast, "--cvar-alpha", "2")
    assert code == 2 and "--cvar-alpha" in out and "Traceback" not in out
    code, out = _run("score", "--run", "nope", "--store", store)
    assert code == 2 and "No run 'nope'" in out


def test_index_neighbors_leaks_report_landscape_from_the_cli(tmp_path: Path) -> None:
    from tests.test_index import leaky_store

    store_obj, _ = leaky_store(tmp_path, rows=120, leaks=2)
    store = ["--store", str(store_obj.root)]
    code, out = _run("index", "build", *store, "--kind", "ivf")
    assert code == 0 and "built ivf index" in out and "recall@10 against exact search" in out, out
    code, out = _run("index", "build", *store, "--kind", "ivf")
    assert code == 0 and "reused" in out, out
    code, out = _run("index", "build", *store, "--kind", "ivf-pq", "--target-recall", "1")
    recall = float(out.split("recall@10 against exact search: ")[1].split()[0])
    flat = " ".join(out.split())  # the terminal wraps long lines where it likes
    assert code == 0 and "candidates exactly (by depth" in flat, out
    assert ("below the target 1.0" in flat) == (recall < 1), out
    code, out = _run("leaks", *store, "--threshold", "0.95")
    assert code == 0 and "2 cross-split pairs" in out, out
    code, out = _run("sql", "SELECT sample_b FROM leaks", *store, "--format", "csv")
    assert code == 0 and out.splitlines()[0] == "sample_b" and len(out.splitlines()) == 3, out
    leaking = out.splitlines()[1]
    code, out = _run("neighbors", *store, "--sample-id", leaking[:10], "-k", "2")
    assert code == 0 and "2 nearest image neighbours" in out, out
    code, out = _run("train", *store, "--epochs", "2", "--batch-size", "128", "--exclude-leaks", "--name", "x")
    assert code == 0 and "test AUC" in out, out
    run_id = out.split("run ", 1)[1].split(":", 1)[0].strip()
    code, out = _run("report", *store, "--run", run_id, "--output", str(tmp_path / "rep"), "--exclude-leaks")
    assert code == 0 and (tmp_path / "rep" / "index.html").exists(), out
    code, out = _run("landscape", *store, "--run", run_id, "--steps", "3", "--output", str(tmp_path / "l.png"))
    assert code == 0 and "loss at the trained weights" in out and (tmp_path / "l.png").exists(), out
    code, out = _run("neighbors", *store)
    assert code == 2 and "exactly one" in out and "Traceback" not in out
    code, out = _run("index", "build", *store, "--kind", "annoy")
    assert code == 2 and "'annoy' is not one of" in _flat(out)


def test_models_lists_architectures_with_their_pretrained_tags() -> None:
    code, out = _run("models")
    assert code == 0 and "Tiny-ViT-16" in out and "ViT-B-32" in out and "openai" in out, out


def test_bf16_on_a_cpu_without_native_bf16_is_warned_about(tmp_path: Path) -> None:
    from tests.conftest import planted_store
    from trainer.precision import cpu_bf16_native

    store = str(planted_store(tmp_path, rows=60, dim=8).root)
    code, out = _run("train", "--store", store, "--epochs", "1", "--batch-size", "64", "--precision", "bf16")
    assert code == 0, out
    assert ("no native bf16" in out) == (not cpu_bf16_native())
    code, out = _run("train", "--store", store, "--epochs", "1", "--batch-size", "64", "--precision", "auto",
                     "--threads", "1")
    assert code == 0 and ("fp32" in out if not cpu_bf16_native() else "bf16 products" in out), out


def test_a_no_op_encode_through_the_command_imports_neither_torch_nor_open_clip(tmp_path: Path) -> None:
    """`pipeline encode` with nothing pending decides so from the catalog alone: as a user types it, in a
    fresh process, it must not import torch or open_clip (last round a compatibility shim pulled torch
    into this path; the stage-level test could not see it)."""
    import subprocess
    import sys

    data = make_d3(tmp_path / "src", rows=3, size=32)
    store = str(tmp_path / "store")
    assert _run("ingest", str(data.parquet), "--format", "d3", "--real-images", str(data.real_images),
                "--store", store)[0] == 0
    assert _run("encode", "--model", "Tiny-ViT-16", "--store", store, "--workers", "0")[0] == 0
    probe = ("import sys\nfrom pipeline.cli import main\nsys.argv = ['pipeline', 'encode', '--model', 'Tiny-ViT-16', "
             f"'--store', {store!r}]\ntry:\n    main()\nexcept SystemExit as exc:\n    code = exc.code\n"
             "print('RESULT', code, 'torch' in sys.modules, 'open_clip' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert "nothing to encode" in done.stdout, done.stdout + done.stderr
    assert "RESULT 0 False False" in done.stdout, done.stdout + done.stderr


def test_import_features_rebuild_and_verify_from_the_cli(tmp_path: Path) -> None:
    import h5py
    import numpy as np

    rng = np.random.default_rng(0)
    src = tmp_path / "feats"
    src.mkdir()
    with h5py.File(src / "0000.h5", "w") as f:
        for name in ("real", "image_gen0", "image_gen1", "image_gen2", "image_gen3", "original_prompt",
                     "positive_prompt"):
            f[name] = rng.normal(size=(20, 8)).astype(np.float32)
    store = ["--store", str(tmp_path / "store")]
    code, out = _run("import-features", str(src), "--layout", "h5", "--model-key", "tiny-feats", *store)
    assert code == 0 and "imported 100 samples" in out, out
    code, out = _run("import-features", str(src), "--layout", "h5", "--model-key", "tiny-feats", *store)
    assert code == 0 and "1 unchanged files skipped unread" in out, out
    code, out = _run("import-features", str(src), "--layout", "parquet", "--model-key", "x", *store)
    assert code == 2 and "'parquet' is not one of 'h5', 'clip-retrieval'" in _flat(out) and "Traceback" not in out
    code, out = _run("catalog", "rebuild", *store)
    assert code == 0 and "rebuilt the catalog from" in out, out
    code, out = _run("verify", *store)
    assert code == 0 and "no damage found" in out, out
    code, out = _run("status", *store)
    assert code == 0 and "tiny-feats" in out and "100" in out, out


def test_perturb_encode_and_the_robustness_and_generalization_experiments_from_the_cli(tmp_path: Path) -> None:
    data = make_d3(tmp_path / "src", rows=16, size=32)
    store = ["--store", str(tmp_path / "store")]
    assert _run("ingest", str(data.parquet), "--format", "d3", "--real-images", str(data.real_images), *store)[0] == 0
    assert _run("encode", "--model", "Tiny-ViT-16", "--workers", "0", *store)[0] == 0
    code, out = _run("train", *store, "--epochs", "2", "--batch-size", "32", "--features", "image", "--no-sam")
    assert code == 0, out
    run_id = out.split("run ", 1)[1].split(":", 1)[0].strip()
    code, out = _run("perturb", "--ops", "jpeg:50", *store)
    assert code == 0 and "jpeg:50" in out, out
    assert _run("encode", "--model", "Tiny-ViT-16", "--workers", "0", *store)[0] == 0
    code, out = _run("experiment", "robustness", "--run", run_id, *store)
    assert code == 0 and "jpeg:50" in out and "wrote" in out, out
    assert f"run {run_id} scored 1 perturbation of its test split" in " ".join(out.split()), out
    code, out = _run("experiment", "generalization", "--epochs", "1", "--batch-size", "32", *store)
    assert code == 0 and "train on" in out and "wrote" in out, out
    code, out = _run("experiment", "robustness", *store)
    assert code == 2 and "needs --run" in out
