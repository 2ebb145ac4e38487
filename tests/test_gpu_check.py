"""bench/gpu_check.py: refuses cleanly without a GPU, and its CPU smoke run goes through every part
(decoding paths included) as a user types it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                          cwd=SCRIPT.parents[1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the script would run for real")
def test_without_a_gpu_it_refuses_in_one_sentence() -> None:
    done = _run("--images", "8")
    assert done.returncode == 2
    assert "needs an NVIDIA GPU" in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0, done.stderr


def test_cpu_smoke_runs_every_decoding_path_and_feeds_the_model() -> None:
    done = _run("--cpu-smoke", "--images", "32", "--batch-size", "8", "--workers", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "CPU SMOKE RUN (not a measurement)" in out
    for path in ("PIL × 1 processes", "torchvision CPU × 1 processes", "stand-in for nvJPEG"):
        decoded = [line for line in out.splitlines() if line.startswith("decode + resize") and path in line]
        fed = [line for line in out.splitlines() if " fed by " in line and path in line]
        assert len(decoded) == len(fed) == 1, out
        assert float(fed[0].split(":")[-1].split("img/s")[0]) > 0
    assert "mean |difference|" in out and "trainer step" in out and "gpu_check took" in out
