"""The Python API (`from pipeline import Store`): the README's example as written, the same stages and
answers as the commands, and an import that stays cheap."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline import PipelineError, Store
from pipeline.cli import app
from pipeline.synthetic import make_d3
from tests.conftest import planted_store

README = Path(__file__).resolve().parents[1] / "README.md"
runner = CliRunner()


def _cli_json(*args: str) -> object:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def readme_python() -> str:
    """The README's Python example: the first python block under `## Python`."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("\n## Python\n"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]


def test_the_readme_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # a project folder, where the README's reader runs `pipeline demo` first
    demo = runner.invoke(app, ["demo", "--rows", "8", "--workers", "0"])  # (the demo, smaller)
    assert demo.exit_code == 0, demo.output
    capsys.readouterr()
    code = readme_python()
    exec(compile(code, str(README), "exec"), {})  # noqa: S102 - the README's code, as a user runs it
    printed = capsys.readouterr().out
    if "Detector.load" in code:  # the Detector line (`pipeline.detector`, from the predict work): one demo image
        assert "000000.jpg" in printed and "score" in printed
    status = _cli_json("status", "--store", "data/demo/store")
    runs = _cli_json("runs", "list", "--store", "data/demo/store")["runs"]
    ours = [r for r in runs if r["name"] == "from-python"]
    assert len(ours) == 1 and len(runs) == 2 and ours[0]["run_id"] in printed  # the demo's run, and this one
    assert f"{status['samples']} samples" in printed and "test AUC" in printed
    assert f"{ours[0]['test_auc']:.3f}" in printed  # the stored number, as `runs list` reads it


def test_import_pipeline_loads_nothing_heavy() -> None:
    heavy = ("torch", "duckdb", "pyarrow", "numpy", "open_clip", "typer")
    code = (f"import sys, pipeline; from pipeline import Store; Store('nowhere'); "
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    import pipeline

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        pipeline.Nope  # noqa: B018


def test_methods_answer_as_the_commands_do(tmp_path: Path) -> None:
    data = make_d3(tmp_path / "src", rows=4, size=32)
    store = Store(str(tmp_path / "store"))  # a path as text
    added = store.ingest(str(data.parquet), format="d3", real_images=str(data.real_images))
    assert added.added == 19
    path = str(store.path)
    assert store.status().samples == _cli_json("status", "--store", path)["samples"] == 19
    query = "SELECT generator, count(*) AS n FROM samples GROUP BY ALL ORDER BY ALL"
    cli = runner.invoke(app, ["sql", query, "--store", path, "--format", "json"])
    assert store.sql(query).to_pylist() == [json.loads(line) for line in cli.stdout.splitlines()]
    with pytest.raises(PipelineError, match="read-only"):
        store.sql("COPY samples TO 'x.csv'")  # the sandbox of `pipeline sql`
    with pytest.raises(PipelineError, match="--memory-limit must look like 4GB"):
        store.sql(query, memory_limit="lots")  # its bounds too, with the command's sentence
    with pytest.raises(PipelineError, match=r"Store.ingest\(\) has no option colour; it takes .*real_images"):
        store.ingest(str(data.parquet), format="d3", colour="red")
    with pytest.raises(PipelineError, match="--batch-size must be at least 2"):
        store.train(batch_size=1)  # the config's own sentence
    assert store.clean(dry_run=True).files == 0


def test_train_runs_and_remove_through_the_api(tmp_path: Path) -> None:
    store = Store(planted_store(tmp_path, rows=60, dim=8, signal=4.0).root)
    first = store.train(features="image", epochs=1, batch_size=64, sam=False, name="a")
    second = store.train(features="image", epochs=1, batch_size=64, sam=False, seed=1, name="b")
    assert [r.run_id for r in store.runs().runs] == [second.run_id, first.run_id]
    assert store.run(first.run_id[:-2]).metrics.test.auc == pytest.approx(first.metrics.test.auc)
    removed = store.remove_runs(first.run_id)
    assert removed.run_ids == [first.run_id] and removed.rows["scores"] == 300
    assert [r.run_id for r in store.runs().runs] == [second.run_id]
