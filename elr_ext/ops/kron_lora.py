"""Kronecker-product LoRA GEMM (eq. 9): the whole Python story of the op.

    y = x W^T + bias + scale * x dW^T,   dW = sum_t A_t kron (U_t V_t)

- `kron_lora_linear` never builds dW: with X_m = x_m viewed [a2, b2],
  Y_m = sum_t A_t (X_m V_t^T) U_t^T through the rank-space products tmat [M, a2, T*r] and
  smat [M, a1, T*r] (csrc/kernels/kron_lora_common.h has the index conventions). Those are stored
  in x's dtype, rounded from fp32 accumulators exactly as the unfused einsum path rounds them.
  By default the backward recomputes them from x (same bits: every backend accumulates in the same
  order); `save_intermediates=True` keeps them instead, when a factor needs its gradient. Measured on
  a CPU (benchmarks/kron_gemm.py, fwd+bwd): recomputing costs 0-10 % of the Kronecker term's
  time and cuts the peak by the saved (a1 + a2) * T * r values per token (39.2 -> 21.3 MB at
  320 -> 320, 8192 tokens, n=4, r=8; 48.7 -> 14.1 MB at 640 -> 640, n=8, r=16).
- `kron_delta` builds dW for conv weights (viewed [out, in*kh*kw]), where it is cheap next to the
  convolution, with its own backward.
- schema: torch.library custom ops elr_ext::kron_lora_forward / kron_lora_backward / kron_delta /
  kron_delta_backward with fake kernels; gradient masks (`output_mask`) in input order, as the C++
  schemas have them.
- dispatch: per call through elr_ext.backends.choose (compiled cpu / cuda kernels in
  csrc/{cpu,cuda}/kron_lora.*, the fused Triton kernels in elr_ext/triton/kron_lora.py, or the
  reference in elr_ext/reference.py). Triton has kernels for the fused Kronecker GEMM only: for
  kron_delta, and for factors beyond its fused path, it is not a candidate.
- the convolution adapter, a composite of these ops, is elr_ext/ops/kron_lora_conv2d.py.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import backends, reference
from .._autocast import autocast_cast, autocast_dtype
from .._checks import check_same_dtype_device, check_tensor


def _triton_kernels(t: torch.Tensor, A: torch.Tensor, U: torch.Tensor):
    """elr_ext.triton.kron_lora when Triton runs on t's device and its fused path takes these factors,
    else None."""
    if backends.unavailable_reason("triton", t.device.type, t.device) is not None:
        return None
    from ..triton import kron_lora as triton_kron  # imported on first use: Triton fixes interpreted/compiled then

    return triton_kron if triton_kron.supported(A, U) else None


def _select(native_op: str, t: torch.Tensor, A: torch.Tensor, U: torch.Tensor) -> str:
    return backends.choose("kron_lora", native_op, t, triton=_triton_kernels(t, A, U) is not None)


def no_intermediates(x: torch.Tensor, A: torch.Tensor, U: torch.Tensor):
    """The empty (tmat, smat) pair that tells kron_lora_backward to recompute the rank-space products."""
    T, a1, a2 = A.shape
    return x.new_empty((0, a2, T * U.shape[2])), x.new_empty((0, a1, T * U.shape[2]))


# ---------------------------------------------------------------- backends: kron_lora_linear forward
def _forward_native(x, A, U, V, weight, bias, scale, save):
    return torch.ops.elr_ext_native.kron_lora_forward(x, A, U, V, weight, bias, scale, save)


def _forward_triton(x, A, U, V, weight, bias, scale, save):
    return _triton_kernels(x, A, U).forward(x, A, U, V, weight, bias, scale, save)


def _forward_torch(x, A, U, V, weight, bias, scale, save):
    y = reference.kron_lora_linear(x, A, U, V, weight, bias, scale).contiguous()
    if not save:
        return (y, *no_intermediates(x, A, U))
    tmat, smat = reference.kron_lora_intermediates(x, A, U, V)
    return y, tmat.contiguous(), smat.contiguous()


_FORWARD = {"cpu": _forward_native, "cuda": _forward_native, "triton": _forward_triton, "torch": _forward_torch}


@torch.library.custom_op("elr_ext::kron_lora_forward", mutates_args=())
def kron_lora_forward(
    x: torch.Tensor, A: torch.Tensor, U: torch.Tensor, V: torch.Tensor, weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor], scale: float, save_intermediates: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _FORWARD[_select("kron_lora_forward", x, A, U)](x, A, U, V, weight, bias, scale, save_intermediates)


@kron_lora_forward.register_fake
def _(x, A, U, V, weight, bias, scale, save_intermediates):
    T, a1, a2 = A.shape
    b1, r = U.shape[1], U.shape[2]
    # the saved intermediates are empty ([0, ...]) when autograd will not need them
    M = x.shape[0] if save_intermediates else 0
    return x.new_empty((x.shape[0], a1 * b1)), x.new_empty((M, a2, T * r)), x.new_empty((M, a1, T * r))


# --------------------------------------------------------------- backends: kron_lora_linear backward
def _backward_native(grad_y, x, A, U, V, tmat, smat, weight, scale, output_mask):
    return torch.ops.elr_ext_native.kron_lora_backward(grad_y, x, A, U, V, tmat, smat, weight, scale, output_mask)


def _backward_triton(grad_y, x, A, U, V, tmat, smat, weight, scale, output_mask):
    return _triton_kernels(x, A, U).backward(grad_y, x, A, U, V, tmat, smat, weight, scale, output_mask)


def _backward_torch(grad_y, x, A, U, V, tmat, smat, weight, scale, output_mask):
    grads = reference.kron_lora_linear_backward(grad_y, x, A, U, V, weight, scale)
    return [g.contiguous() if need else None for g, need in zip(grads, output_mask)]


_BACKWARD = {"cpu": _backward_native, "cuda": _backward_native, "triton": _backward_triton, "torch": _backward_torch}


@torch.library.custom_op("elr_ext::kron_lora_backward", mutates_args=())
def kron_lora_backward(
    grad_y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, U: torch.Tensor, V: torch.Tensor,
    tmat: torch.Tensor, smat: torch.Tensor, weight: Optional[torch.Tensor], scale: float, output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dA, dU, dV, dweight, dbias), in input order; an empty tensor where output_mask is False."""
    backward = _BACKWARD[_select("kron_lora_backward", x, A, U)]
    grads = backward(grad_y, x, A, U, V, tmat, smat, weight, scale, output_mask)
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@kron_lora_backward.register_fake
def _(grad_y, x, A, U, V, tmat, smat, weight, scale, output_mask):
    shapes = (x, A, U, V, weight, grad_y[0])
    return tuple(torch.empty_like(t) if need and t is not None else x.new_empty(0) for t, need in zip(shapes, output_mask))


def _linear_setup_context(ctx, inputs, output):
    x, A, U, V, weight, bias, scale, _ = inputs
    _, tmat, smat = output
    ctx.mark_non_differentiable(tmat, smat)
    ctx.save_for_backward(x, A, U, V, tmat, smat, weight)
    ctx.scale = scale
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None


def _linear_backward(ctx, grad_y, _grad_tmat, _grad_smat):
    x, A, U, V, tmat, smat, weight = ctx.saved_tensors
    output_mask = list(ctx.needs_input_grad[:6])
    output_mask[4] = output_mask[4] and ctx.has_weight
    output_mask[5] = output_mask[5] and ctx.has_bias
    if not any(output_mask):
        return (None,) * 8
    grads = kron_lora_backward(grad_y.contiguous(), x, A, U, V, tmat, smat, weight, ctx.scale, output_mask)
    return tuple(g if need else None for g, need in zip(grads, output_mask)) + (None, None)


torch.library.register_autograd("elr_ext::kron_lora_forward", _linear_backward, setup_context=_linear_setup_context)



def check_factors(A, U, V):
    check_tensor("A", A, dim=3)
    check_tensor("U", U, dim=3)
    check_tensor("V", V, dim=3)
    check_same_dtype_device("A", A, U=U, V=V)
    T, r = A.shape[0], U.shape[2]
    if T < 1 or r < 1:
        raise ValueError(f"A [T, a1, a2] and U [T, b1, r] need T >= 1 terms and rank r >= 1; got T={T}, r={r}")
    if U.shape[0] != T or V.shape[0] != T:
        raise ValueError(f"U {list(U.shape)} and V {list(V.shape)} must have A's T={T} terms in dim 0")
    if V.shape[1] != r:
        raise ValueError(f"V must be [T, r, b2] with U's rank r={r}, got {list(V.shape)}")


def kron_lora_linear(
    x: torch.Tensor, A: torch.Tensor, U: torch.Tensor, V: torch.Tensor,
    weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None, scale: float = 1.0,
    save_intermediates: bool = False,
) -> torch.Tensor:
    """``x W^T + bias + scale * x dW^T`` with ``dW = sum_t A_t kron (U_t V_t)`` (eq. 9), dW never built.

    Args:
        x: [..., d_in], any leading dims, non-contiguous accepted.
        A: [T, a1, a2]; U: [T, b1, r]; V: [T, r, b2], with d_out = a1*b1 and d_in = a2*b2.
        weight, bias: the frozen base layer ([d_out, d_in], [d_out]); optional.
        scale: multiplies the Kronecker term (alpha / rank in the modules).
        save_intermediates: keep the rank-space products for the backward instead of recomputing them
            (a slightly faster backward for (a1 + a2) * T * r more values per token in memory).

    Under torch.autocast it runs like F.linear: every input in the autocast dtype (elr_ext/_autocast.py).
    """
    check_tensor("x", x)
    dtype = autocast_dtype(x.device.type, gemm=True)
    if dtype is not None:  # a GEMM under autocast: everything in the autocast dtype, as F.linear does
        with torch.autocast(x.device.type, enabled=False):
            return kron_lora_linear(*autocast_cast(dtype, (x, A, U, V, weight, bias)), scale, save_intermediates)
    check_factors(A, U, V)
    check_same_dtype_device("x", x, A=A, U=U, V=V, weight=weight, bias=bias)
    T, a1, a2 = A.shape
    b1, b2 = U.shape[1], V.shape[2]
    if x.dim() < 1 or x.shape[-1] != a2 * b2:
        raise ValueError(f"x must be [..., d_in] with d_in = a2*b2 = {a2}*{b2} = {a2 * b2} from A {list(A.shape)} "
                         f"and V {list(V.shape)}; got x {list(x.shape)}")
    if weight is not None and list(weight.shape) != [a1 * b1, a2 * b2]:
        raise ValueError(f"weight must be [d_out, d_in] = [{a1 * b1}, {a2 * b2}], got {list(weight.shape)}")
    if bias is not None and list(bias.shape) != [a1 * b1]:
        raise ValueError(f"bias must be [d_out] = [{a1 * b1}], got {list(bias.shape)}")
    lead = x.shape[:-1]
    x2d = x.reshape(-1, a2 * b2).contiguous()
    save = save_intermediates and torch.is_grad_enabled() and (A.requires_grad or U.requires_grad)
    y, _, _ = kron_lora_forward(x2d, A.contiguous(), U.contiguous(), V.contiguous(), weight, bias, float(scale), save)
    return y.reshape(*lead, a1 * b1)


# ------------------------------------------------------------------------------------ kron_delta
def _delta_native(A, U, V):
    return torch.ops.elr_ext_native.kron_delta(A, U, V)


def _delta_torch(A, U, V):
    return reference.kron_delta(A, U, V).contiguous()


def _delta_backward_native(grad, A, U, V, output_mask):
    return torch.ops.elr_ext_native.kron_delta_backward(grad, A, U, V, output_mask)


def _delta_backward_torch(grad, A, U, V, output_mask):
    return [g.contiguous() if need else None for g, need in zip(reference.kron_delta_backward(grad, A, U, V), output_mask)]


_DELTA = {"cpu": _delta_native, "cuda": _delta_native, "torch": _delta_torch}
_DELTA_BACKWARD = {"cpu": _delta_backward_native, "cuda": _delta_backward_native, "torch": _delta_backward_torch}


@torch.library.custom_op("elr_ext::kron_delta", mutates_args=())
def kron_delta_op(A: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    return _DELTA[backends.choose("kron_lora", "kron_delta", A, triton=False)](A, U, V)


@kron_delta_op.register_fake
def _(A, U, V):
    return A.new_empty((A.shape[1] * U.shape[1], A.shape[2] * V.shape[2]))


@torch.library.custom_op("elr_ext::kron_delta_backward", mutates_args=())
def kron_delta_backward(
    grad: torch.Tensor, A: torch.Tensor, U: torch.Tensor, V: torch.Tensor, output_mask: list[bool]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dA, dU, dV) of kron_delta, in input order; an empty tensor where output_mask is False."""
    backward = _DELTA_BACKWARD[backends.choose("kron_lora", "kron_delta_backward", A, triton=False)]
    grads = backward(grad, A, U, V, output_mask)
    return tuple(g if g is not None else A.new_empty(0) for g in grads)


@kron_delta_backward.register_fake
def _(grad, A, U, V, output_mask):
    return tuple(torch.empty_like(t) if need else A.new_empty(0) for t, need in zip((A, U, V), output_mask))


def _delta_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _delta_backward(ctx, grad):
    A, U, V = ctx.saved_tensors
    output_mask = list(ctx.needs_input_grad)
    grads = kron_delta_backward(grad.contiguous(), A, U, V, output_mask)
    return tuple(g if need else None for g, need in zip(grads, output_mask))


torch.library.register_autograd("elr_ext::kron_delta", _delta_backward, setup_context=_delta_setup_context)


def kron_delta(A: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """dW = sum_t A_t kron (U_t V_t), [a1*b1, a2*b2] (eq. 9), for conv weights viewed [out, in*kh*kw]."""
    check_factors(A, U, V)
    return kron_delta_op(A.contiguous(), U.contiguous(), V.contiguous())
