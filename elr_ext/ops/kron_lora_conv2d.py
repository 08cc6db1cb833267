"""The Kronecker adapter of a convolution (eq. 9 on the weight viewed [out, in*kh*kw]): a composite of
elr_ext/ops/kron_lora.py's ops, with a backward that skips the weight gradient where it costs more
than the factors' gradients in rank space."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .._autocast import autocast_cast, autocast_dtype
from .._checks import check_same_dtype_device, check_tensor
from .kron_lora import check_factors, kron_delta_backward, kron_delta_op, kron_lora_backward, no_intermediates

_UNFOLD_BYTES = 64 << 20  # the backward unfolds x in chunks of samples of about this size
# The factors' gradients in rank space cost about T*r*(d_in + d_out) per token against d_out*d_in for
# the weight gradient; the rank-space path runs where that ratio is at least this. Measured on a
# CPU (benchmarks/kron_gemm.py --conv, fwd+bwd against the weight-gradient path): 0.82-0.96x at
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
    empty_t, empty_s = no_intermediates(x, A, U)
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
        w = torch.add(weight, kron_delta_op(A, U, V).view_as(weight), alpha=scale)
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
                grads = kron_delta_backward((gw * scale).flatten(1).contiguous(), A, U, V, needs)
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
    check_factors(A, U, V)
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
