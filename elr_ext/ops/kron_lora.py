"""Kronecker-product LoRA GEMM (eq. 9): the whole Python story of the op.

    y = x W^T + bias + scale * x dW^T,   dW = sum_t A_t kron (U_t V_t)

- `kron_lora_linear` never builds dW: with X_m = x_m viewed [a2, b2],
  Y_m = sum_t A_t (X_m V_t^T) U_t^T through the rank-space products tmat [M, a2, T*r] and
  smat [M, a1, T*r] (csrc/kernels/kron_lora_common.h has the index conventions). Those are stored
  in x's dtype, rounded from fp32 accumulators exactly as the unfused einsum path rounds them;
  By default the backward recomputes them from x (same bits: every backend accumulates in the same
  order); `save_intermediates=True` keeps them instead, when a factor needs its gradient. Measured on
  the 2-core CPU (benchmarks/kron_gemm.py, fwd+bwd): recomputing costs 0-10 % of the Kronecker term's
  time and cuts the peak by the saved (a1 + a2) * T * r values per token (39.2 -> 21.3 MB at
  320 -> 320, 8192 tokens, n=4, r=8; 48.7 -> 14.1 MB at 640 -> 640, n=8, r=16).
- `kron_delta` builds dW for conv weights (viewed [out, in*kh*kw]), where it is cheap next to the
  convolution, with its own backward.
- schema: torch.library custom ops elr_ext::kron_lora_forward / kron_lora_backward / kron_delta /
  kron_delta_backward with fake kernels; dispatch per call through elr_ext.backends (compiled cpu /
  cuda kernels in csrc/{cpu,cuda}/kron_lora.*, the fused Triton kernels in
  elr_ext/triton/kron_lora.py, or the reference in elr_ext/reference.py). The triton backend runs
  kron_delta, and factors too large for its fused path, through the reference (torch.kron and
  batched cuBLAS GEMMs).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import backends, reference
from .._autocast import autocast_cast, autocast_dtype
from .._checks import check_same_dtype_device, check_tensor


_NATIVE = ("cpu", "cuda")


def _triton_fused(device: torch.device, A: torch.Tensor, U: torch.Tensor):
    """elr_ext.triton.kron_lora when Triton runs on `device` and its fused path takes these factors,
    else None."""
    if backends.unavailable_reason("triton", device.type) is not None:
        return None
    # imported on first use: Triton fixes interpreted or compiled then
    from ..triton import kron_lora as triton_kron

    return triton_kron if triton_kron.supported(A, U) else None


def _select(native_op: str, device: torch.device, dtype: torch.dtype, triton_fused: bool = False) -> str:
    """The backend for this call. The triton backend has kernels for the fused Kronecker GEMM only:
    elsewhere (kron_delta, factors beyond the fused path) a requested triton backend runs the
    reference, and GPU_DISPATCH's choice of triton passes to the next backend in line."""
    native = backends.native_implementations(native_op)
    with_triton = ("triton",) if triton_fused or backends.requested_backend() == "triton" else ()
    return backends.select("kron_lora", device, native + with_triton + ("torch",), dtype)


# ------------------------------------------------------------------------------ kron_lora_linear
def _no_intermediates(x: torch.Tensor, A: torch.Tensor, U: torch.Tensor):
    """The empty (tmat, smat) pair that tells kron_lora_backward to recompute the rank-space products."""
    T, a1, a2 = A.shape
    return x.new_empty((0, a2, T * U.shape[2])), x.new_empty((0, a1, T * U.shape[2]))


@torch.library.custom_op("elr_ext::kron_lora_forward", mutates_args=())
def kron_lora_forward(
    x: torch.Tensor, A: torch.Tensor, U: torch.Tensor, V: torch.Tensor, weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor], scale: float, save_intermediates: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fused = _triton_fused(x.device, A, U)
    backend = _select("kron_lora_forward", x.device, x.dtype, fused is not None)
    if backend in _NATIVE:
        return torch.ops.elr_ext_native.kron_lora_forward(x, A, U, V, weight, bias, scale, save_intermediates)
    if backend == "triton" and fused is not None:
        return fused.forward(x, A, U, V, weight, bias, scale, save_intermediates)
    y = reference.kron_lora_linear(x, A, U, V, weight, bias, scale).contiguous()
    if not save_intermediates:
        return (y, *_no_intermediates(x, A, U))
    tmat, smat = reference.kron_lora_intermediates(x, A, U, V)
    return y, tmat.contiguous(), smat.contiguous()


@kron_lora_forward.register_fake
def _(x, A, U, V, weight, bias, scale, save_intermediates):
    T, a1, a2 = A.shape
    b1, r = U.shape[1], U.shape[2]
    # the saved intermediates are empty ([0, ...]) when autograd will not need them
    M = x.shape[0] if save_intermediates else 0
    return x.new_empty((x.shape[0], a1 * b1)), x.new_empty((M, a2, T * r)), x.new_empty((M, a1, T * r))


@torch.library.custom_op("elr_ext::kron_lora_backward", mutates_args=())
def kron_lora_backward(
    grad_y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, U: torch.Tensor, V: torch.Tensor,
    tmat: torch.Tensor, smat: torch.Tensor, weight: Optional[torch.Tensor], scale: float, needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    fused = _triton_fused(x.device, A, U)
    backend = _select("kron_lora_backward", x.device, x.dtype, fused is not None)
    if backend in _NATIVE:
        grads = torch.ops.elr_ext_native.kron_lora_backward(grad_y, x, A, U, V, tmat, smat, weight, scale, needs)
    elif backend == "triton" and fused is not None:
        grads = fused.backward(grad_y, x, A, U, V, tmat, smat, weight, scale, needs)
    else:
        grads = reference.kron_lora_linear_backward(grad_y, x, A, U, V, weight, scale)
        grads = [g.contiguous() if need else None for g, need in zip(grads, needs)]
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@kron_lora_backward.register_fake
def _(grad_y, x, A, U, V, tmat, smat, weight, scale, needs):
    shapes = (x, A, U, V, weight, grad_y[0])
    return tuple(torch.empty_like(t) if need and t is not None else x.new_empty(0) for t, need in zip(shapes, needs))


def _linear_setup_context(ctx, inputs, output):
    x, A, U, V, weight, bias, scale, _ = inputs
    _, tmat, smat = output
    ctx.mark_non_differentiable(tmat, smat)
    ctx.save_for_backward(x, A, U, V, tmat, smat, weight)
    ctx.scale = scale
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None


def _linear_backward(ctx, grad_y, _grad_tmat, _grad_smat):
    x, A, U, V, tmat, smat, weight = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:6])
    needs[4] = needs[4] and ctx.has_weight
    needs[5] = needs[5] and ctx.has_bias
    if not any(needs):
        return (None,) * 8
    grads = kron_lora_backward(grad_y.contiguous(), x, A, U, V, tmat, smat, weight, ctx.scale, needs)
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None, None)


torch.library.register_autograd("elr_ext::kron_lora_forward", _linear_backward, setup_context=_linear_setup_context)


def _check_factors(A, U, V):
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
    _check_factors(A, U, V)
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
@torch.library.custom_op("elr_ext::kron_delta", mutates_args=())
def _kron_delta(A: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    if _select("kron_delta", A.device, A.dtype) in _NATIVE:
        return torch.ops.elr_ext_native.kron_delta(A, U, V)
    return reference.kron_delta(A, U, V).contiguous()


@_kron_delta.register_fake
def _(A, U, V):
    return A.new_empty((A.shape[1] * U.shape[1], A.shape[2] * V.shape[2]))


@torch.library.custom_op("elr_ext::kron_delta_backward", mutates_args=())
def _kron_delta_backward(
    grad: torch.Tensor, A: torch.Tensor, U: torch.Tensor, V: torch.Tensor, needs: list[bool]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _select("kron_delta_backward", A.device, A.dtype) in _NATIVE:
        grads = torch.ops.elr_ext_native.kron_delta_backward(grad, A, U, V, needs)
    else:
        grads = [g.contiguous() if need else None for g, need in zip(reference.kron_delta_backward(grad, A, U, V), needs)]
    return tuple(g if g is not None else A.new_empty(0) for g in grads)


@_kron_delta_backward.register_fake
def _(grad, A, U, V, needs):
    return tuple(torch.empty_like(t) if need else A.new_empty(0) for t, need in zip((A, U, V), needs))


def _delta_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _delta_backward(ctx, grad):
    A, U, V = ctx.saved_tensors
    needs = list(ctx.needs_input_grad)
    grads = _kron_delta_backward(grad.contiguous(), A, U, V, needs)
    return tuple(g if need else None for g, need in zip(grads, needs))


torch.library.register_autograd("elr_ext::kron_delta", _delta_backward, setup_context=_delta_setup_context)


def kron_delta(A: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """dW = sum_t A_t kron (U_t V_t), [a1*b1, a2*b2] (eq. 9), for conv weights viewed [out, in*kh*kw]."""
    _check_factors(A, U, V)
    return _kron_delta(A.contiguous(), U.contiguous(), V.contiguous())


# ------------------------------------------------------------------------------ kron_lora_conv2d
_UNFOLD_BYTES = 64 << 20  # the backward unfolds x in chunks of samples of about this size
# The factors' gradients in rank space cost about T*r*(d_in + d_out) per token against d_out*d_in for
# the weight gradient; the rank-space path runs where that ratio is at least this. Measured on the
# 2-core CPU (benchmarks/kron_gemm.py --conv, fwd+bwd against the weight-gradient path): 0.82-0.96x at
# a ratio of 9 (320 channels), 1.15-1.83x at 18-36 (640 and 1280 channels).
_RANK_SPACE_MIN_RATIO = 12.0


def _patches(x, kernel, stride, padding, dilation) -> torch.Tensor:
    """The convolution's input patches token-major, [N*Ho*Wo, C*kh*kw] in the weight's (c, kh, kw)
    order: F.unfold's columns transposed, built from kh*kw shifted channels-last views (one pass each
    with contiguous channel rows, where unfold plus a transpose copies the columns twice, strided)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    N, C, H, W = x.shape
    Ho, Wo = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    padded = F.pad(x, (pw, pw, ph, ph)).permute(0, 2, 3, 1).contiguous()  # [N, H + 2ph, W + 2pw, C]
    out = x.new_empty((N, Ho, Wo, C, kh * kw))
    for i in range(kh):
        for j in range(kw):
            out[..., i * kw + j] = padded[:, i * dh:i * dh + (Ho - 1) * sh + 1:sh, j * dw:j * dw + (Wo - 1) * sw + 1:sw]
    return out.view(N * Ho * Wo, C * kh * kw)


def _factor_grads(x, grad_y, A, U, V, w_shape, scale, stride, padding, dilation, needs):
    """dA, dU, dV of conv2d(x, W + scale*dW) from grad_y without building dL/dW: the unfolded input
    (im2col) is the linear op's x [tokens, in*kh*kw], grad_y its grad_y [tokens, out], and the
    rank-space backward of kron_lora_linear gives the factors' gradients. Chunked over samples."""
    N, L = x.shape[0], grad_y.shape[2] * grad_y.shape[3]
    d_in = w_shape[1] * w_shape[2] * w_shape[3]
    per = max(1, _UNFOLD_BYTES // max(1, L * d_in * x.element_size()))
    empty_t, empty_s = _no_intermediates(x, A, U)
    totals = [None, None, None]
    for n0 in range(0, N, per):
        x2d = _patches(x[n0:n0 + per], tuple(w_shape[2:]), stride, padding, dilation)
        g2d = grad_y[n0:n0 + per].permute(0, 2, 3, 1).reshape(-1, w_shape[0])
        grads = kron_lora_backward(g2d, x2d, A, U, V, empty_t, empty_s, None, scale, [False, *needs, False, False])
        for i, need in enumerate(needs):
            if need:
                totals[i] = grads[1 + i] if totals[i] is None else totals[i] + grads[1 + i]
    return totals


class _KronLoRAConv2d(torch.autograd.Function):
    """conv2d(x, weight + scale * dW, bias): forward with dW built (small next to the convolution),
    backward without the [out, in*kh*kw] weight gradient the frozen weight does not need."""

    @staticmethod
    def forward(ctx, x, A, U, V, weight, bias, scale, stride, padding, dilation):
        w = torch.add(weight, _kron_delta(A, U, V).view_as(weight), alpha=scale)
        ctx.save_for_backward(x, A, U, V, w)
        ctx.conf = (scale, stride, padding, dilation)
        return F.conv2d(x, w, bias, stride, padding, dilation)

    @staticmethod
    def backward(ctx, grad_y):
        x, A, U, V, w = ctx.saved_tensors
        scale, stride, padding, dilation = ctx.conf
        need_x, need_A, need_U, need_V, need_w, need_b = ctx.needs_input_grad[:6]
        grad_y = grad_y.contiguous()
        gx = gw = gb = None
        if need_x:
            gx = torch.nn.grad.conv2d_input(x.shape, w, grad_y, stride, padding, dilation)
        needs = [need_A, need_U, need_V]
        d_out, d_in, terms_rank = w.shape[0], w[0].numel(), A.shape[0] * U.shape[2]
        rank_space = d_out * d_in >= _RANK_SPACE_MIN_RATIO * terms_rank * (d_in + d_out)
        gA = gU = gV = None
        if any(needs) and rank_space and not need_w:
            gA, gU, gV = _factor_grads(x, grad_y, A, U, V, w.shape, scale, stride, padding, dilation, needs)
        elif any(needs) or need_w:  # narrow layers (or a trainable base weight): through the weight gradient
            gw = torch.nn.grad.conv2d_weight(x, w.shape, grad_y, stride, padding, dilation)
            if any(needs):
                grads = _kron_delta_backward((gw * scale).flatten(1).contiguous(), A, U, V, needs)
                gA, gU, gV = (g if need else None for g, need in zip(grads, needs))
            gw = gw if need_w else None
        if need_b:
            gb = grad_y.sum((0, 2, 3))
        return gx, gA, gU, gV, gw, gb, None, None, None, None


def kron_lora_conv2d(
    x: torch.Tensor, A: torch.Tensor, U: torch.Tensor, V: torch.Tensor, weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None, scale: float = 1.0, stride=1, padding=0, dilation=1,
) -> torch.Tensor:
    """``conv2d(x, weight + scale * dW, bias, stride, padding, dilation)``, dW = sum_t A_t kron (U_t V_t)
    on the weight viewed [out, in*kh*kw] (groups 1, zero padding given as ints).

    The forward builds dW (weight-sized, small next to the convolution). Where it is cheaper (wide
    layers: d_out*d_in >= 12 * T*r * (d_in + d_out)) the backward never forms the weight gradient
    [out, in*kh*kw]: it takes the input's patches (in chunks of samples) and the factors' gradients in
    rank space, as kron_lora_linear's backward does; narrow layers reduce the weight gradient to the
    factors. Under torch.autocast it runs like F.conv2d: every input in the autocast dtype.
    """
    check_tensor("x", x)
    dtype = autocast_dtype(x.device.type, gemm=True)
    if dtype is not None:
        with torch.autocast(x.device.type, enabled=False):
            return kron_lora_conv2d(*autocast_cast(dtype, (x, A, U, V, weight, bias)), scale, stride, padding, dilation)
    _check_factors(A, U, V)
    check_tensor("weight", weight, dim=4)
    check_same_dtype_device("x", x, A=A, U=U, V=V, weight=weight, bias=bias)
    T, a1, a2 = A.shape
    d_out, d_in = a1 * U.shape[1], a2 * V.shape[2]
    if weight.shape[0] != d_out or weight[0].numel() != d_in:
        raise ValueError(f"weight must be [out, in, kh, kw] with out = a1*b1 = {d_out} and in*kh*kw = a2*b2 = "
                         f"{d_in} from A {list(A.shape)}, U {list(U.shape)}, V {list(V.shape)}; got {list(weight.shape)}")
    if x.dim() != 4 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x must be [N, {weight.shape[1]}, H, W] for weight {list(weight.shape)}, got {list(x.shape)}")
    if bias is not None and list(bias.shape) != [d_out]:
        raise ValueError(f"bias must be [out] = [{d_out}], got {list(bias.shape)}")
    conf = []
    for name, value, least in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        pair = (value, value) if isinstance(value, int) else tuple(value)
        if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= least for v in pair):
            raise ValueError(f"{name} must be an int >= {least} or a pair of them, got {value!r}")
        conf.append(pair)
    return _KronLoRAConv2d.apply(x, A.contiguous(), U.contiguous(), V.contiguous(), weight, bias, float(scale), *conf)
