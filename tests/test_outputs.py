"""The store touches only itself: every `--output` is checked by `pipeline.store.outputs.check_output`
(outside the store or in a name of one's own under STORE/reports/; only a regular file is ever
replaced), and `atomic_write` refuses to rename over anything but a regular file (issue 19, items 1, 7)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import PipelineError
from pipeline.stages.report import ReportConfig
from pipeline.store.atomic import write_text
from pipeline.store.layout import Store
from pipeline.store.outputs import check_output


def _pipeline(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    assert "Traceback" not in result.output, result.output
    return result.exit_code, " ".join(result.output.split())


def _device(path: Path) -> Path:
    """A character device like /dev/null (major 1, minor 3), made where the test may break it."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("making a device node needs root")
    return path


def test_sql_output_leaves_devices_fifos_links_and_folders_alone(d3_store: Store, tmp_path: Path) -> None:
    device = _device(tmp_path / "null")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    target = tmp_path / "target.txt"
    target.write_text("keep me")
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    folder = tmp_path / "folder"
    folder.mkdir()
    cases = {device: "a character device", fifo: "a FIFO", link: "a symbolic link", folder: "a directory"}
    for path, what in cases.items():
        rc, out = _pipeline("sql", "SELECT 1 AS x", "--format", "csv", "--output", str(path),
                            "--store", str(d3_store.root))
        assert rc == 2 and f"is {what}" in out, (path, out)
    assert stat.S_ISCHR(os.lstat(device).st_mode) and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert os.path.islink(link) and target.read_text() == "keep me" and folder.is_dir()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temp file was even begun
    # a regular file the user named is replaced, as asked
    rc, out = _pipeline("sql", "SELECT 1 AS x", "--format", "csv", "--output", str(target),
                        "--store", str(d3_store.root))
    assert rc == 0, out
    assert target.read_text() == "x\n1\n"


def test_sql_output_inside_the_store_is_refused(d3_store: Store) -> None:
    for inside in (d3_store.root / "out.csv", d3_store.root / "samples" / "x.parquet", d3_store.manifest_path):
        rc, out = _pipeline("sql", "SELECT 1 AS x", "--format", "csv", "--output", str(inside),
                            "--store", str(d3_store.root))
        assert rc == 2 and "is inside the store" in out, out


def test_landscape_and_report_never_write_over_the_store(d3_store: Store) -> None:
    manifest = d3_store.manifest_path.read_bytes()
    rc, out = _pipeline("landscape", "--run", "any", "--output", str(d3_store.manifest_path),
                        "--store", str(d3_store.root))
    assert rc == 2 and "is inside the store" in out, out
    assert d3_store.manifest_path.read_bytes() == manifest
    samples = sorted(p.name for p in (d3_store.root / "samples").iterdir())
    rc, out = _pipeline("report", "--run", "any", "--output", str(d3_store.root / "samples"),
                        "--store", str(d3_store.root))
    assert rc == 2 and "is inside the store" in out and "reports" in out, out
    assert sorted(p.name for p in (d3_store.root / "samples").iterdir()) == samples
    # the reports index is the store's own page: a landscape may not take its name
    rc, out = _pipeline("landscape", "--run", "any", "--output", str(d3_store.root / "reports" / "index.html"),
                        "--store", str(d3_store.root))
    assert rc == 2 and "is inside the store" in out, out


def test_outputs_under_the_stores_reports_folder_are_allowed(d3_store: Store, tmp_path: Path) -> None:
    ReportConfig(d3_store, "run", output=d3_store.root / "reports" / "mine")
    ReportConfig(d3_store, "run", output=tmp_path / "new" / "folder")
    plain = tmp_path / "plain.txt"
    plain.write_text("")
    with pytest.raises(PipelineError, match="is a file, not a directory"):
        ReportConfig(d3_store, "run", output=plain)


def test_landscape_checks_the_json_it_writes_beside_the_png(d3_store: Store, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fig.json")
    rc, out = _pipeline("landscape", "--run", "any", "--output", str(tmp_path / "fig.png"),
                        "--store", str(d3_store.root))
    assert rc == 2 and "fig.json is a FIFO" in out, out


def test_a_path_that_became_a_fifo_after_the_check_is_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "out.txt"
    check_output(None, path)
    os.mkfifo(path)  # between the check and the write
    with pytest.raises(PipelineError, match="is a FIFO"):
        write_text(path, "data")
    assert stat.S_ISFIFO(os.lstat(path).st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
