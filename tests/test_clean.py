"""`pipeline clean` as users type it: it says what it frees, frees exactly that, and never what a live
process uses or the store needs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.store import cache, catalog
from pipeline.store.atomic import temp_path
from pipeline.store.layout import Store
from tests.conftest import planted_store

runner = CliRunner()
DEAD_PID = 4_000_000  # above Linux's pid_max (2^22): no live process has it


def _clean(store: Store, *flags: str) -> dict:
    result = runner.invoke(app, ["clean", "--store", str(store.root), "--json", *flags])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _files(store: Store) -> set[str]:
    return {p.relative_to(store.root).as_posix() for p in store.root.rglob("*") if p.is_file()}


def _counts(store: Store) -> dict:
    return catalog.query(store, "SELECT (SELECT count(*) FROM samples) AS samples, (SELECT count(*) FROM "
                         "embeddings) AS vectors, (SELECT count(*) FROM scores) AS scores, (SELECT count(*) "
                         "FROM runs) AS runs, (SELECT count(*) FROM indexes) AS indexes").to_pylist()[0]


@pytest.fixture
def littered(tmp_path: Path) -> tuple[Store, dict[str, Path]]:
    """A store with a run and an index, then every kind of litter clean knows, and things it must keep."""
    store = planted_store(tmp_path, rows=100, dim=8, signal=4.0)
    s = str(store.root)
    for args in (["train", "--epochs", "1", "--batch-size", "128", "--features", "image", "--no-sam"],
                 ["index", "build"]):
        result = runner.invoke(app, [*args, "--store", s])
        assert result.exit_code == 0, result.output
    planted_store(tmp_path, rows=20, dim=8, seed=1, file_name="0001.h5")  # new vectors: the index is stale
    litter = {
        "dead temp": store.dataset_dir("samples") / f".samples-x.parquet.{os.uname().nodename}~{DEAD_PID}~abcdef12.tmp",
        "dead scratch": store.root / "cache" / f"keys-{DEAD_PID}" / "ids.keys",
        "ghost scores": store.dataset_dir("scores") / "20990101-000000-deadbeef-0000.parquet",
        "killed index build": store.dataset_dir("indexes") / "planted" / "image-flat-0123456789abcdef" / "index.faiss",
        "old report": store.reports_dir / "run-20990101-000000-deadbeef-0000" / "index.html",
        "gone model's cache": store.root / "cache" / "views" / "gone-model" / "as-ingested" / "part-1.parquet",
        "encode's pending list": store.work_dir / "pending" / "image-1-abc.parquet",
    }
    for path in litter.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 1000)
    (litter["gone model's cache"].parent / ".lock").touch()
    keep = {"live temp": temp_path(store.dataset_dir("samples") / "samples-live.parquet")}  # this process's
    keep["live temp"].write_bytes(b"y" * 10)
    staged = store.staging_dir / catalog.shard_paths(store, "samples")[0].relative_to(store.root)
    staged = staged.with_name("samples-staged.parquet")
    staged.parent.mkdir(parents=True)
    shutil.copy(catalog.shard_paths(store, "samples")[0], staged)  # a finished worker's shard: data
    return store, {**litter, **keep, "staged": staged}


def test_dry_run_says_what_goes_and_clean_frees_exactly_that(littered: tuple[Store, dict[str, Path]]) -> None:
    store, paths = littered
    before_files, before_counts = _files(store), _counts(store)
    assert before_counts["indexes"] == 1

    planned = _clean(store, "--dry-run")
    assert _files(store) == before_files  # a dry run touches nothing
    kinds = {f["what"]: f for f in planned["freed"]}
    assert set(kinds) == {"leftovers of dead processes", "files of runs that never committed",
                          "index folders no committed index names", "stale indexes", "reports whose runs are gone",
                          "caches of models or runs no longer in the store"}
    listed = {p for f in planned["freed"] for p in f["paths"]}
    for name in ("dead temp", "ghost scores", "encode's pending list"):
        assert paths[name].relative_to(store.root).as_posix() in listed, name
    assert planned["adopted"] == 1 and planned["dry_run"] is True
    assert any(k["what"].startswith("caches (rebuilt") and k["files"] for k in planned["kept"])

    done = _clean(store)
    assert [(f["what"], f["files"], f["bytes"]) for f in done["freed"]] == \
        [(f["what"], f["files"], f["bytes"]) for f in planned["freed"]]  # it freed what it said it would
    for name, path in paths.items():
        assert path.exists() == (name == "live temp"), name  # the staged shard: moved into samples/
    assert done["adopted"] == 1
    staged_rows = pq.read_metadata(store.dataset_dir("samples") / paths["staged"].name).num_rows
    assert _counts(store) == {**before_counts, "indexes": 0, "samples": before_counts["samples"] + staged_rows}
    assert not (store.root / "cache" / "views" / "gone-model").exists()
    assert (store.root / "cache" / "views" / "planted").is_dir()  # the current model's caches stay
    again = _clean(store)
    assert again["freed"] == []  # nothing left to free
    result = runner.invoke(app, ["runs", "list", "--store", str(store.root)])
    assert result.exit_code == 0 and "1 run," in result.output


def test_caches_go_only_when_no_reader_pins_them(littered: tuple[Store, dict[str, Path]]) -> None:
    store, _ = littered
    views = store.root / "cache" / "views" / "planted"
    part = next(views.rglob("part-*.parquet"))
    pins = cache.pin([part])  # a reader (a training run) uses this view now
    try:
        done = _clean(store, "--caches")
        assert part.exists()
        busy = [k for k in done["kept"] if k["what"].startswith("caches in use")]
        assert busy and busy[0]["paths"] == [part.parent.relative_to(store.root).as_posix()]
        vectors = store.root / "cache" / "vectors" / "planted"
        assert not [p for p in vectors.rglob("*") if p.is_file() and p.name != ".lock"]  # unpinned: gone
    finally:
        pins.close()
    done = _clean(store, "--caches")
    assert not part.exists() and not [k for k in done["kept"] if k["what"].startswith("caches in use")]
    result = runner.invoke(app, ["train", "--epochs", "1", "--batch-size", "128", "--features", "image",
                                 "--no-sam", "--seed", "1", "--store", str(store.root)])
    assert result.exit_code == 0, result.output  # the caches are rebuilt when next needed


def test_reports_go_with_reports_and_the_index_follows(littered: tuple[Store, dict[str, Path]]) -> None:
    store, _ = littered
    run_id = catalog.query(store, "SELECT run_id FROM runs").column(0)[0].as_py()
    result = runner.invoke(app, ["report", "--run", run_id, "--store", str(store.root)])
    assert result.exit_code == 0, result.output
    done = _clean(store)
    assert (store.run_report_dir(run_id) / "index.html").exists()  # its run exists: kept by default
    assert any(k["what"] == "other reports" and k["files"] for k in done["kept"])
    done = _clean(store, "--reports")
    assert not store.run_report_dir(run_id).exists()
    assert run_id not in (store.reports_dir / "index.html").read_text()


def test_clean_through_the_terminal_and_on_a_missing_store(tmp_path: Path) -> None:
    store = planted_store(tmp_path, rows=20, dim=8)
    result = runner.invoke(app, ["clean", "--store", str(store.root), "--dry-run"])
    assert result.exit_code == 0 and "would free 0 files" in result.output, result.output
    result = runner.invoke(app, ["clean", "--store", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "No store at" in result.output and "Traceback" not in result.output
