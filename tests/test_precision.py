"""The precision a run computes in: bf16 where the hardware has it natively, fp32 elsewhere, with why."""

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import PipelineError
from pipeline.runs.config import TrainConfig
from trainer import precision
from trainer.precision import BF16_EMULATED, _cpuinfo_field, _linux_cpu_flags, resolve_precision


@pytest.fixture
def native(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    def set_native(value: bool) -> None:
        monkeypatch.setattr(precision, "cpu_bf16_native", lambda: value)
    return set_native


def test_auto_is_bf16_where_native_and_fp32_elsewhere_saying_why(native) -> None:  # noqa: ANN001
    native(True)
    used, why = resolve_precision("auto", "cpu")
    assert used == "bf16" and "natively" in why and "--precision fp32" in why
    native(False)
    used, why = resolve_precision("auto", "cpu")
    assert used == "fp32" and BF16_EMULATED in why


def test_an_explicit_choice_is_kept_and_emulated_bf16_is_said(native) -> None:  # noqa: ANN001
    native(False)
    assert resolve_precision("fp32", "cpu") == ("fp32", "fp32, as asked")
    used, why = resolve_precision("bf16", "cpu")
    assert used == "bf16" and "as asked, but" in why and BF16_EMULATED in why
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16", "cpu")


def test_cpu_flags_come_from_the_kernel(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 avx512_bf16\n\nprocessor\t: 1\n")
    assert {"amx_bf16", "avx512_bf16"} <= (_linux_cpu_flags(cpuinfo) or set())
    cpuinfo.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert "bf16" in (_linux_cpu_flags(cpuinfo) or set())
    assert _linux_cpu_flags(tmp_path / "missing") is None


def test_the_cpu_vendor_comes_from_the_kernel(tmp_path: Path) -> None:
    """(It picks the bf16 products: MKL's on Intel, oneDNN's elsewhere: `trainer.products`.)"""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: avx512_bf16\n")
    assert (_cpuinfo_field(("vendor_id",), cpuinfo) or "").strip() == "AuthenticAMD"
    assert _cpuinfo_field(("vendor_id",), tmp_path / "missing") is None


def test_importing_the_probe_does_not_import_torch() -> None:
    code = "import sys, trainer.precision as p; p.cpu_bf16_native(); print('torch' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    assert out.stdout.strip() == "False"


def test_config_takes_a_precision_and_reads_the_former_bf16_flag() -> None:
    assert TrainConfig().fit.precision == "auto"
    assert TrainConfig.from_dict({"bf16": True}).fit.precision == "bf16"
    assert TrainConfig.from_dict({"bf16": False}).fit.precision == "fp32"
    with pytest.raises(PipelineError, match="--precision must be one of auto, fp32, bf16"):
        TrainConfig.from_dict({"precision": "fp16"})
