"""Triton kernels: the `triton` backend of the three ops (elr_ext/backends.py says when it runs).

    fdn.py          FDN forward (split group statistics, normalise + modulation + optional SiLU)
                    and backward (dz, dgamma, dbeta)
    kron_lora.py    the fused small-factor Kronecker LoRA GEMM, forward and backward
    lowrank_proj.py the fused low-rank projections (one GEMM over the concatenated downs, then each
                    up with its bias in the epilogue)

Each module launches its kernels on CUDA tensors (sm_80 and newer, autotuned) or, under
TRITON_INTERPRET=1, on CPU tensors through Triton's interpreter (one small fixed configuration per
kernel: the tests' path). Triton decides interpreted or compiled when a kernel is *defined*, so the
ops import these modules lazily, on the first call that selects the triton backend, and
TRITON_INTERPRET must be set before that (tests/test_triton.py runs in a subprocess that has it
from the start).
"""

from __future__ import annotations

import contextlib
import inspect
import os

import torch
import triton
import triton.language as tl

from ..reference import accumulation_dtype


def _interpreting() -> bool:
    """Whether triton.jit defines interpreted kernels now. triton.knobs holds the setting from
    Triton 3.4 on; older Tritons (those of torch 2.4-2.7) have no knobs and read TRITON_INTERPRET in
    triton.jit itself, interpreting exactly when it is "1"."""
    knobs = getattr(triton, "knobs", None)
    runtime = getattr(knobs, "runtime", None)
    if runtime is not None and hasattr(runtime, "interpret"):
        return bool(runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Fixed when the kernels of this package are defined (at the import of this package).
INTERPRETED: bool = _interpreting()
_EMULATE_BF16_ROUNDING = tl.constexpr(INTERPRETED)


@triton.jit
def cast_rn(x, dtype: tl.constexpr):
    """x.to(dtype), rounding to nearest even. On a GPU that is what .to() does; Triton 3.8's
    interpreter truncates fp32 -> bf16 instead, which would fail the tolerance rule for the wrong
    reason, so there the rounding is done on the bits first (NaN-free data; the truncation after it
    is then exact)."""
    if _EMULATE_BF16_ROUNDING:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


def check_device(op: str, t: torch.Tensor) -> None:
    """A kernel defined for one mode cannot run in the other; say so instead of crashing inside Triton."""
    if t.device.type == "cuda" and not INTERPRETED:
        return
    if t.device.type == "cpu" and INTERPRETED:
        return
    mode = "under TRITON_INTERPRET=1 (CPU tensors only)" if INTERPRETED else "for the GPU (CUDA tensors only)"
    raise RuntimeError(
        f"elr_ext.triton.{op}: got a {t.device.type} tensor, but the Triton kernels were defined {mode}; "
        "set TRITON_INTERPRET=1 before elr_ext.triton is first imported to run them on the CPU"
    )


def device_of(t) -> contextlib.AbstractContextManager:
    """The context a launch on `t`'s data needs: Triton compiles for, and launches on, the *current*
    CUDA device (and its current stream), which need not be the tensor's."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def launch(kernel, grid, *args, **kwargs):
    """kernel[grid](*args, **kwargs) on the device of its first tensor argument."""
    tensor = next(a for a in args if isinstance(a, torch.Tensor))
    with device_of(tensor):
        return kernel[grid](*args, **kwargs)


# ptxas without a register limit trades registers for occupancy and spills a few values even far
# below 255 (measured: 16 bytes at 128 registers, 8 bytes at 72); with `.maxnreg 255` the same
# kernels compile without spills. Config takes maxnreg from Triton 3.0 on.
_HAS_MAXNREG = "maxnreg" in inspect.signature(triton.Config).parameters


def gpu_config(kwargs: dict, num_warps: int, num_stages: int) -> "triton.Config":
    """A GPU autotune configuration that may use all 255 registers per thread."""
    extra = {"maxnreg": 255} if _HAS_MAXNREG else {}
    return triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages, **extra)


def configs(gpu: list, interpreted: "triton.Config") -> list:
    """Autotune configurations: the GPU list, or one small configuration under the interpreter
    (autotuning there would only run every configuration, slowly, for nothing)."""
    return [interpreted] if INTERPRETED else gpu


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (split heuristics); a small stand-in when
    interpreting, so that the tests exercise the multi-split paths on tiny shapes."""
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


def tl_accumulation_dtype(dtype: torch.dtype):
    """accumulation_dtype(dtype) (elr_ext/reference.py) as a Triton dtype, for the kernels' ACC_TY."""
    return _TL_DTYPES[accumulation_dtype(dtype)]


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for fp32 operands: IEEE fp32 (torch's default for fp32 matmuls)
    unless torch allows TF32; fp64 is always IEEE. Operands converted up from fp16/bf16 products
    (the fp32 rank-space intermediates of a half-precision call) may use TF32: its 10-bit mantissa
    is finer than the inputs' own rounding."""
    if dtype == torch.float64:
        return "ieee"
    if accumulation_dtype(dtype) != dtype:  # fp16 / bf16
        return "tf32"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
