"""Which float format the trainer computes in: bf16 where the hardware has it natively, fp32 elsewhere.

Importing this module does not import torch (the CPU probe reads the kernel's feature flags), so the
CLI and the encoder can ask the same question cheaply.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path
from typing import Literal

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")

BF16_EMULATED = ("this CPU has no native bf16 (AVX512-BF16/AMX): torch emulates it, and bf16 runs far "
                 "slower than fp32 here")

# x86: AVX512-BF16 (Cooper Lake, Zen 4+) or AMX-BF16 (Sapphire Rapids+); aarch64: the BF16 extension
_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


@functools.cache
def cpu_bf16_native() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX on x86, BF16 on Arm).

    Without it torch emulates bf16 and a matrix product runs ~70× slower than in fp32 (measured
    on an AVX2-only EPYC: 0.9 against 67 GFLOP/s), so bf16 there is a trap, not a speed-up. On
    Linux the kernel's CPU flags answer; elsewhere torch's oneDNN probe (which also says yes
    for AVX-512 CPUs that emulate bf16, so it is only the fallback).
    """
    flags = _linux_cpu_flags()
    if flags is not None:
        return bool(flags & _BF16_FLAGS)
    try:
        import torch

        return platform.machine().lower() in ("x86_64", "amd64") and bool(
            torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError, ImportError):
        return False


def resolve_precision(requested: str, device_type: str = "cpu") -> tuple[str, str]:
    """The precision a run computes in (`fp32` or `bf16`) for `requested` on this device, and why.

    `auto` is bf16 where the device has native bf16 (a CPU with AVX512-BF16/AMX, a CUDA GPU of
    compute capability 8.0 or later) and fp32 elsewhere. An explicit choice is kept; asking for bf16
    where it is emulated is allowed (it gives the same numbers, slowly) and the sentence says so.
    The sentence is for the CLI to print; nothing here prints.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {requested!r}")
    native, where = _native_bf16(device_type)
    if requested == "fp32":
        return "fp32", "fp32, as asked"
    if requested == "bf16":
        return "bf16", ("bf16, as asked" if native else f"bf16, as asked, but {where}")
    if native:
        return "bf16", f"bf16 products (fp32 accumulation): {where}; --precision fp32 turns it off"
    return "fp32", f"fp32: {where}"


def _native_bf16(device_type: str) -> tuple[bool, str]:
    if device_type == "cuda":
        import torch

        major, _ = torch.cuda.get_device_capability()
        if major >= 8:
            return True, "this GPU computes bf16 natively"
        return False, "this GPU (before compute capability 8.0) has no native bf16"
    if device_type != "cpu":
        return False, f"bf16 support on {device_type} is not probed"
    if cpu_bf16_native():
        return True, "this CPU computes bf16 natively (AVX512-BF16/AMX)"
    return False, BF16_EMULATED


@functools.cache
def cpu_vendor() -> str | None:
    """The first processor's vendor (`GenuineIntel`, `AuthenticAMD`, …) where the kernel says it, else None."""
    value = _cpuinfo_field(("vendor_id",))
    return value.strip() if value else None


def _linux_cpu_flags(path: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The first processor's flags (x86 `flags`, Arm `Features`), or None where there is no such file."""
    value = _cpuinfo_field(("flags", "Features"), path)
    return None if value is None else set(value.split())


def _cpuinfo_field(keys: tuple[str, ...], path: Path = Path("/proc/cpuinfo")) -> str | None:
    """The first processor's value for the first of `keys` found, or None."""
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in keys:
            return value
    return None
