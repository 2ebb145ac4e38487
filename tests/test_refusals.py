"""What the system or the user refuses is one sentence with exit 2, never a traceback, through the
command: a read-only store, a file-size limit, non-finite training values, an empty grid list, a
manifest naming a file outside the store, `encode` without `--model`."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.store import catalog
from pipeline.store.layout import Store
from tests.conftest import planted_store

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    assert "Traceback" not in result.output, result.output
    return result.exit_code, " ".join(result.output.split())


def _digest(root: Path) -> str:
    """Every file's path, size and content under `root`: what a refused command must leave as it was."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _trained(tmp_path: Path) -> tuple[Store, str]:
    store = planted_store(tmp_path / "p", rows=60)
    code, out = _run("train", "--store", str(store.root), "--epochs", "1", "--batch-size", "64")
    assert code == 0, out
    run_id = catalog.query(store, "SELECT run_id FROM runs").column(0)[0].as_py()
    return store, run_id


@pytest.mark.parametrize("flag,value", [("--lr", "nan"), ("--lr", "inf"), ("--lr", "-inf"), ("--sam-rho", "nan"),
                                        ("--auc-gamma", "nan"), ("--cvar-alpha", "nan")])
def test_non_finite_training_values_are_one_sentence(tmp_path: Path, flag: str, value: str) -> None:
    store = planted_store(tmp_path, rows=30)
    code, out = _run("train", "--store", str(store.root), flag, value)
    assert code == 2 and f"{flag} must be a finite number, not {value}" in out
    assert not catalog.query(store, "SELECT * FROM runs").num_rows


def test_non_finite_values_in_a_config_file_or_grid_are_one_sentence(tmp_path: Path) -> None:
    store = planted_store(tmp_path, rows=30)
    (tmp_path / "c.toml").write_text("lr = nan\n")
    code, out = _run("train", "--store", str(store.root), "--config", str(tmp_path / "c.toml"))
    assert code == 2 and "--lr must be a finite number, not nan" in out
    (tmp_path / "g.toml").write_text("[grid]\nbetas = [[0.9, inf]]\n")
    code, out = _run("sweep", "--store", str(store.root), "--grid", str(tmp_path / "g.toml"))
    assert code == 2 and "--betas must be a finite number, not inf" in out


def test_an_empty_grid_list_is_refused_and_the_grid_sentence_keeps_its_brackets(tmp_path: Path) -> None:
    store = planted_store(tmp_path, rows=30)
    grid = tmp_path / "g.toml"
    grid.write_text("[base]\nepochs = 1\n[grid]\nseed = []\nlr = [0.001, 0.01]\n")
    code, out = _run("sweep", "--store", str(store.root), "--grid", str(grid))
    assert code == 2 and "The grid's seed list is empty" in out
    grid.write_text("runs = []\n")
    code, out = _run("sweep", "--store", str(store.root), "--grid", str(grid))
    assert code == 2 and "[[runs]] list is empty" in out
    grid.write_text("[base]\nepochs = 1\n")
    code, out = _run("sweep", "--store", str(store.root), "--grid", str(grid))
    assert code == 2 and "needs either a [grid] table or [[runs]] entries" in out  # rich markup kept off
    shown = _run("sweep", "--help")[1]
    assert all(part in shown for part in ("[base]", "[grid]", "[[runs]]"))
    assert not catalog.query(store, "SELECT * FROM runs").num_rows


@pytest.mark.parametrize("outside", ["../outside.parquet", "/abs/outside.parquet", "samples/../../x.parquet"])
def test_a_manifest_naming_a_file_outside_the_store_is_one_sentence(tmp_path: Path, outside: str) -> None:
    store = planted_store(tmp_path, rows=30)
    manifest = json.loads(store.manifest_path.read_text())
    rel = next(p for p in manifest["shards"] if p.startswith("samples/"))
    shutil.copy(store.root / rel, tmp_path / "outside.parquet")  # the file a hostile manifest points at
    manifest["shards"][outside.replace("/abs", str(tmp_path))] = manifest["shards"].pop(rel)
    store.manifest_path.write_text(json.dumps(manifest))
    for command in (["status"], ["sql", "SELECT count(*) FROM samples"], ["train", "--epochs", "1"],
                    ["verify", "--repair"]):
        code, out = _run(*command, "--store", str(store.root))
        assert code == 2 and "a path outside the store" in out and "pipeline catalog rebuild" in out, (command, out)
    assert (tmp_path / "outside.parquet").exists()  # verify --repair moved nothing in from outside
    code, out = _run("catalog", "rebuild", "--store", str(store.root))
    assert code == 0 and _run("status", "--store", str(store.root))[0] == 0


def _read_only(root: Path) -> list[str]:
    """A command prefix that runs what follows with `root` read-only: a private read-only bind mount
    (root, in a mount namespace of its own), or file modes (anyone else)."""
    if os.geteuid() != 0:
        for path in [root, *root.rglob("*")]:
            if path.is_dir():
                path.chmod(0o555)
        return []
    if not shutil.which("unshare") or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("root without mount namespaces: no way to make a folder read-only here")
    return ["unshare", "-m", "sh", "-c", f'mount --bind -o ro "{root}" "{root}" && exec "$@"', "sh"]


def test_a_read_only_store_is_one_sentence_for_report_train_and_score(tmp_path: Path) -> None:
    store, run_id = _trained(tmp_path)
    before = _digest(store.root)
    prefix = _read_only(store.root)
    try:
        for command, writes in ((["report", "--run", run_id, "--output", str(tmp_path / "page")], "report"),
                                (["train", "--epochs", "1", "--lr", "0.01"], "train"),
                                (["score", "--run", run_id], "score")):
            done = subprocess.run([*prefix, sys.executable, "-m", "pipeline.cli", *command, "--store",
                                   str(store.root)], cwd=REPO, capture_output=True, text=True, timeout=300)
            text = " ".join(done.stderr.split())
            assert done.returncode == 2 and "Traceback" not in text, text
            assert f"is on a read-only filesystem, and `pipeline {writes}` writes into it" in text or \
                f"cannot be written by this user, and `pipeline {writes}` writes into it" in text, text
    finally:
        for path in [store.root, *store.root.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)
    assert _digest(store.root) == before


def _limited(size: int) -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


def test_a_file_size_limit_is_one_sentence_in_ingest_train_and_score(tmp_path: Path) -> None:
    from tests.conftest import jpeg

    (tmp_path / "imgs").mkdir()
    for i in range(4):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(jpeg((60 * i, 9, 9)))
    (tmp_path / "m.csv").write_text("path,caption,label,generator\n" + "".join(
        f"imgs/{i}.jpg,c{i},{i % 2},{'real' if i % 2 == 0 else 'sdxl'}\n" for i in range(4)))
    store, run_id = _trained(tmp_path)
    more = planted_store(tmp_path / "more", rows=60, seed=1, file_name="0001.h5")  # new samples to score
    code, out = _run("import-features", str(more.root.parent / "h5" / "0001.h5"), "--layout", "h5", "--model-key",
                     "planted", "--store", str(store.root))
    assert code == 0, out
    for command in (["ingest", str(tmp_path / "m.csv"), "--format", "manifest", "--store", str(tmp_path / "s")],
                    ["train", "--epochs", "1", "--lr", "0.02", "--store", str(store.root)],
                    ["score", "--run", run_id, "--store", str(store.root)]):
        done = subprocess.run([sys.executable, "-m", "pipeline.cli", *command], cwd=REPO, capture_output=True,
                              text=True, timeout=300, preexec_fn=lambda: _limited(4096))
        text = " ".join(done.stderr.split())
        assert done.returncode == 2 and "reached this process's file-size limit" in text, (command, text)
        assert "Traceback" not in text


def test_encode_without_model_uses_the_stores_only_model_or_says_which(d3_store: Store) -> None:
    code, out = _run("encode", "--store", str(d3_store.root), "--workers", "0")
    assert code == 2 and "No model has encoded this store yet: give --model" in out
    code, out = _run("encode", "--store", str(d3_store.root), "--pretrained", "openai")
    assert code == 2 and "--pretrained needs --model" in out
    code, out = _run("encode", "--model", "Tiny-ViT-16", "--store", str(d3_store.root), "--workers", "0")
    assert code == 0 and "encoded" in out
    code, out = _run("perturb", "--ops", "jpeg:90", "--store", str(d3_store.root))
    assert code == 0 and "next: `pipeline encode`" in out
    code, out = _run("encode", "--store", str(d3_store.root), "--workers", "0")  # as the hint says
    assert code == 0 and "encoded" in out and "Tiny-ViT-16__random-seed0" in out
    assert not catalog.query(d3_store, "SELECT * FROM samples s WHERE perturbation IS NOT NULL AND sample_id NOT IN "
                                       "(SELECT content_hash FROM embeddings WHERE modality = 'image')").num_rows
    code, out = _run("encode", "--model", "Tiny-ViT-16", "--seed", "1", "--store", str(d3_store.root),
                     "--workers", "0")
    assert code == 0
    code, out = _run("encode", "--store", str(d3_store.root))
    assert code == 2 and "vectors of 2 models: say which" in out and "--model Tiny-ViT-16 --seed 1" in out
