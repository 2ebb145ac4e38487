"""`--json`: the result as one JSON document on stdout, progress on stderr, as a script pipes it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.present.terminal import plain
from tests.conftest import planted_store

runner = CliRunner()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(planted_store(tmp_path_factory.mktemp("json"), rows=100, dim=8, signal=4.0).root)


def _pipeline(*args: str) -> tuple[object, str]:
    """Run `pipeline ARGS --json` as a shell would, with stdout piped: (the parsed document, stderr)."""
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", *args, "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), done.stderr


def test_status_and_train_print_one_document_and_keep_progress_on_stderr(store: str) -> None:
    status, _ = _pipeline("status", "--store", store)
    assert status["samples"] == 500 and status["models"][0]["model_key"] == "planted"
    assert sum(r["samples"] for r in status["by_split_label_generator"]) == 500
    run, err = _pipeline("train", "--store", store, "--epochs", "2", "--batch-size", "128", "--name", "j")
    assert "trained 2 epochs" in err and "epochs" in err.splitlines()[-1]  # progress: on stderr, not in the document
    test_samples = sum(r["samples"] for r in status["by_split_label_generator"] if r["split"] == "test")
    assert run["metrics"]["version"] == 3 and run["metrics"]["test"]["n"] == test_samples > 0
    assert run["metrics"]["test"]["intervals"]["all"]["auc"]["lo"] is not None
    assert isinstance(run["alarms"], list) and isinstance(run["warnings"], list)
    listed = runner.invoke(app, ["runs", "list", "--store", store, "--json"])
    assert json.loads(listed.stdout)["runs"][0]["run_id"] == run["run_id"]


def test_sweep_and_experiment_print_one_document(store: str, tmp_path: Path) -> None:
    grid = tmp_path / "grid.toml"
    grid.write_text("[base]\nepochs = 1\nbatch_size = 128\nfeatures = 'image'\n[grid]\nsam = [false, true]\n")
    result = runner.invoke(app, ["sweep", "--grid", str(grid), "--store", store, "--json"])
    assert result.exit_code == 0, result.output
    swept = json.loads(result.stdout)
    assert [r["overrides"] for r in swept["rows"]] == [{"sam": False}, {"sam": True}]
    result = runner.invoke(app, ["experiment", "table2", "--epochs", "1", "--batch-size", "128", "--store", store,
                                 "--json"])
    assert result.exit_code == 0, result.output
    table = json.loads(result.stdout)
    assert table["table"] == "table2" and table["path"].endswith("table.md") and len(table["rows"]) == 8
    assert all(row[1]["metrics"]["version"] == 3 for row in table["rows"])


def test_plain_turns_any_result_into_json_data() -> None:
    import math
    from dataclasses import dataclass, field
    from datetime import UTC, datetime

    import numpy as np
    import pyarrow as pa

    @dataclass
    class Inner:
        def to_json(self) -> dict:
            return {"own": "form"}

    @dataclass
    class Result:
        table: pa.Table
        when: datetime
        where: Path
        counts: dict
        vector: np.ndarray
        nan: float = math.nan
        inner: Inner = field(default_factory=Inner)
        hidden: list = field(default_factory=list, repr=False)

    result = Result(pa.table({"a": [1, 2]}), datetime(2024, 1, 2, tzinfo=UTC), Path("/s"), {("x", "y"): np.int64(3)},
                    np.array([0.5, np.inf]))
    assert plain(result) == {"table": [{"a": 1}, {"a": 2}], "when": "2024-01-02T00:00:00+00:00", "where": "/s",
                             "counts": {"x/y": 3}, "vector": [0.5, None], "nan": None, "inner": {"own": "form"}}
    json.dumps(plain(result), allow_nan=False)
