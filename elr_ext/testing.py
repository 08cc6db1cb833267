"""The tolerance rule (docs/testing.md, "The tolerance rule"), shared by the test suite
(tests/helpers.py) and the GPU check (benchmarks/gpu_check.py), which must judge a fast path by the
same rule without pytest."""

from __future__ import annotations

import torch


def compare_to_ref(out: torch.Tensor, ref64: torch.Tensor, same_dtype: torch.Tensor, name: str = "out",
                   tiny: float = 1e-6) -> dict:
    """flash-attention's rule: the fast path's error against the fp64 reference is at most twice the
    error of plain PyTorch in the same dtype, plus a tiny slack (for fp16/bf16 half an ulp at the
    output's scale, so that a correctly rounded result passes even where eager got lucky on a tiny
    tensor); fp32 and fp64 must also be close in relative terms.

    Returns {"ok", "err", "bound", "eager_err", "scale", "message"}; "message" says why it failed
    (None when it passed)."""
    verdict = {"ok": False, "err": None, "bound": None, "eager_err": None, "scale": None, "message": None}
    if out.shape != ref64.shape:
        verdict["message"] = f"{name}: shape {list(out.shape)} != {list(ref64.shape)}"
        return verdict
    if out.dtype != same_dtype.dtype:
        verdict["message"] = f"{name}: dtype {out.dtype} != {same_dtype.dtype}"
        return verdict
    err = (out.double() - ref64).abs().max().item() if out.numel() else 0.0
    base = (same_dtype.double() - ref64).abs().max().item() if out.numel() else 0.0
    scale = (ref64.abs().max().item() if out.numel() else 0.0) + 1e-12
    if out.dtype == torch.float64:
        bound = 1e-10 * scale + 1e-12
        message = f"{name}: fp64 error {err:.3e} (scale {scale:.3e})"
    elif out.dtype == torch.float32:
        bound = max(2 * base, 1e-5 * scale) + tiny
        message = f"{name}: fp32 error {err:.3e} vs eager {base:.3e}"
    else:  # half an ulp at the largest magnitude: a correctly rounded result always passes
        bound = 2 * base + torch.finfo(out.dtype).eps / 2 * scale
        message = f"{name}: {out.dtype} error {err:.3e} vs eager same-dtype {base:.3e}"
    ok = err <= bound  # False for NaN
    verdict.update(ok=ok, err=err, bound=bound, eager_err=base, scale=scale, message=None if ok else message)
    return verdict


def assert_close_to_ref(out: torch.Tensor, ref64: torch.Tensor, same_dtype: torch.Tensor, name: str = "out",
                        tiny: float = 1e-6) -> None:
    """compare_to_ref as an assertion (the test suite's form)."""
    verdict = compare_to_ref(out, ref64, same_dtype, name, tiny)
    assert verdict["ok"], verdict["message"]
