"""Matrix products whose rounding does not depend on the thread count, in fp32 and in bf16.

By default both libraries torch calls on the CPU round differently with the thread count: MKL
(fp32) and oneDNN (bf16, what autocast runs). On this project's machine a 2048 × 1536 by 1536 × 1
fp32 product differs between 1 and 3 threads, a 1536 × 2048 by 2048 × 1536 bf16 one between 1 and
2. MKL's strict CNR mode makes its products bitwise equal whatever the count, at no cost on the
trainer's large products; it can be switched on only before MKL's first call in the process, so
this module does it when it is imported. bf16 products then go to MKL too (`cblas_gemm_bf16bf16f32`,
called directly: bf16 operands, fp32 accumulation and fp32 result, thread-independent under strict
CNR), instead of oneDNN, which offers no such mode. That holds on Intel CPUs only: elsewhere MKL's
bf16 product runs at its fp32 rate (an AMD EPYC with AVX512-BF16, one core, 2048 × 1536 by
1536 × 1536: 83 GFLOP/s, against oneDNN's 185 and MKL's fp32 80), so there bf16 products go to
torch's own (oneDNN: bf16 results, widened to fp32) and `BF16_THREAD_INDEPENDENT` is False.

Where MKL is missing (other BLAS builds) or was already used, nothing is promised:
`THREAD_INDEPENDENT` is False and a run's hash carries its thread count (`trainer.threads`).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path

import torch

from trainer.precision import cpu_vendor

_MKL_CBWR_ALL = -1  # mkl_cbwr_get(MKL_CBWR_ALL): the branch and the strict flag
_MKL_CBWR_AUTO_STRICT = 0x10002  # MKL_CBWR_AUTO | MKL_CBWR_STRICT: best code path, thread-independent
_MKL_CBWR_STRICT = 0x10000
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112  # CBLAS_LAYOUT, CBLAS_TRANSPOSE


def _torch_mkl() -> ctypes.CDLL | None:
    """torch's CPU library, where its MKL lives (linked in statically), or None."""
    if not torch.backends.mkl.is_available():
        return None
    lib_dir = Path(torch.__file__).parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib", "torch_cpu.dll"):
        if (lib_dir / name).exists():
            try:
                return ctypes.CDLL(str(lib_dir / name))
            except OSError:
                return None
    return None


def reproducible_gemm(lib: ctypes.CDLL | None = None) -> bool:
    """Switch MKL to its strict reproducibility mode; True if that mode is in effect.

    False where torch has no MKL or where MKL has already computed something in this process (the
    mode is fixed at its first call).
    """
    lib = lib or _torch_mkl()
    if lib is None:
        return False
    try:
        get, set_ = lib.mkl_serv_cbwr_get, lib.mkl_serv_cbwr_set
    except AttributeError:
        return False
    get.argtypes, get.restype = [ctypes.c_int], ctypes.c_int
    set_.argtypes, set_.restype = [ctypes.c_int], ctypes.c_int
    if get(_MKL_CBWR_ALL) & _MKL_CBWR_STRICT:
        return True
    return set_(_MKL_CBWR_AUTO_STRICT) == 0 and bool(get(_MKL_CBWR_ALL) & _MKL_CBWR_STRICT)


def _mkl_bf16_gemm(lib: ctypes.CDLL | None) -> Callable[..., None] | None:
    try:
        gemm = lib.cblas_gemm_bf16bf16f32 if lib is not None else None
    except AttributeError:
        return None
    if gemm is not None:
        i, p, f = ctypes.c_int, ctypes.c_void_p, ctypes.c_float
        gemm.argtypes = [i, i, i, i, i, i, f, p, i, p, i, f, p, i]
        gemm.restype = None
    return gemm


_LIB = _torch_mkl()
THREAD_INDEPENDENT = reproducible_gemm(_LIB)  # (at import: before anything multiplies)
# MKL's bf16 kernels are native on Intel only (see the module docstring)
_BF16_GEMM = _mkl_bf16_gemm(_LIB) if THREAD_INDEPENDENT and cpu_vendor() == "GenuineIntel" else None
BF16_THREAD_INDEPENDENT = _BF16_GEMM is not None
BF16_PRODUCTS = ("MKL (bf16 operands, fp32 results; thread-independent)" if BF16_THREAD_INDEPENDENT
                 else "torch's oneDNN (bf16 operands and results)")


def thread_independent(precision: str) -> bool:
    """Whether the trainer's products at `precision` (`fp32` or `bf16`) round the same whatever the
    thread count on this machine."""
    return THREAD_INDEPENDENT and (precision != "bf16" or BF16_THREAD_INDEPENDENT)


def matmul(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b for 2-D a and b, operands rounded to `dtype`, the result in fp32 (fp64 for fp64).

    bf16 on an Intel CPU goes to MKL (thread-independent; transposed views cost no copy), elsewhere
    to torch (`torch.mm` in bf16, then widened).
    """
    if dtype != torch.bfloat16:
        return torch.mm(a.to(dtype), b.to(dtype))
    a, b = a.to(dtype), b.to(dtype)
    if _BF16_GEMM is None or a.device.type != "cpu":
        return torch.mm(a, b).float()
    (a, trans_a, lda), (b, trans_b, ldb) = _operand(a), _operand(b)
    m, k, n = a.shape[1] if trans_a else a.shape[0], b.shape[1] if trans_b else b.shape[0], \
        b.shape[0] if trans_b else b.shape[1]
    out = torch.empty(m, n, dtype=torch.float32)
    if m and n:
        _BF16_GEMM(_ROW_MAJOR, _TRANS if trans_a else _NO_TRANS, _TRANS if trans_b else _NO_TRANS, m, n, k, 1.0,
                   a.data_ptr(), lda, b.data_ptr(), ldb, 0.0, out.data_ptr(), n)
    return out


def _operand(t: torch.Tensor) -> tuple[torch.Tensor, bool, int]:
    """(the row-major storage, whether `t` is its transpose, its leading dimension)."""
    if t.stride(1) == 1 and t.stride(0) >= max(1, t.shape[1]):
        return t, False, t.stride(0)
    if t.stride(0) == 1 and t.stride(1) >= max(1, t.shape[0]):
        return t.t(), True, t.stride(1)
    t = t.contiguous()
    return t, False, max(1, t.shape[1])
