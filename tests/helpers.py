"""Shared test helpers: the tolerance rule of DESIGN.md 5 and the backends to run."""

from __future__ import annotations

import torch

import elr_ext


def cpu_backends() -> list:
    """Every backend that runs on CPU tensors here (torch always; cpu when compiled; triton under
    TRITON_INTERPRET=1)."""
    return elr_ext.available_backends("cpu")


def assert_close_to_ref(out: torch.Tensor, ref64: torch.Tensor, same_dtype: torch.Tensor, name: str = "out",
                        tiny: float = 1e-6) -> None:
    """flash-attention's rule: the fast path's error against the fp64 reference is at most twice the
    error of plain PyTorch in the same dtype, plus a tiny slack (for fp16/bf16 half an ulp at the
    output's scale, so that a correctly rounded result passes even where eager got lucky on a tiny
    tensor); fp32 and fp64 must also be close in relative terms."""
    assert out.shape == ref64.shape, f"{name}: shape {list(out.shape)} != {list(ref64.shape)}"
    assert out.dtype == same_dtype.dtype, f"{name}: dtype {out.dtype} != {same_dtype.dtype}"
    err = (out.double() - ref64).abs().max().item()
    base = (same_dtype.double() - ref64).abs().max().item()
    scale = ref64.abs().max().item() + 1e-12
    if out.dtype == torch.float64:
        assert err <= 1e-10 * scale + 1e-12, f"{name}: fp64 error {err:.3e} (scale {scale:.3e})"
    elif out.dtype == torch.float32:
        assert err <= max(2 * base, 1e-5 * scale) + tiny, f"{name}: fp32 error {err:.3e} vs eager {base:.3e}"
    else:  # half an ulp at the largest magnitude: a correctly rounded result always passes
        half_ulp = torch.finfo(out.dtype).eps / 2 * scale
        assert err <= 2 * base + half_ulp, f"{name}: {out.dtype} error {err:.3e} vs eager same-dtype {base:.3e}"
