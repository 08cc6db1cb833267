"""FDN, fused GroupNorm + modulation (eq. 8): the whole Python story of the op.

    out = act(zhat * (1 + gamma) + beta),   zhat = (z - mean_g) * rstd_g   per (sample, group)

- schema: two torch.library custom ops, elr_ext::fdn_forward -> (out, mean, rstd) and
  elr_ext::fdn_backward -> (dz, dgamma, dbeta), each with a fake kernel so torch.compile traces
  them without graph breaks;
- autograd: fdn_forward saves z, gamma, mean, rstd (and beta only with the fused SiLU, whose
  derivative needs the pre-activation); zhat is recomputed in the backward, never stored;
- dispatch: the backend is chosen per call by elr_ext.backends (cuda / cpu compiled kernels from
  csrc/{cuda,cpu}/fdn.*, Triton kernels from elr_ext/triton/fdn.py, or the reference in
  elr_ext/reference.py).
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .. import backends, reference
from .._autocast import autocast_cast, autocast_dtype
from .._checks import check_choice, check_same_dtype_device, check_shape, check_tensor

ACTIVATIONS = (None, "silu")
_ACTIVATION_CODE = {"none": 0, "silu": 1}


def _layout_of(z: torch.Tensor) -> torch.memory_format:
    """The memory format the kernels produce outputs in (channels_last stays channels_last)."""
    if not z.is_contiguous() and z.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _select(native_op: str, z: torch.Tensor) -> str:
    return backends.choose("fdn", native_op, z)


# --------------------------------------------------------------------------- backends: forward
def _forward_native(z, gamma, beta, num_groups, eps, activation):
    return torch.ops.elr_ext_native.fdn_forward(z, gamma, beta, num_groups, eps, _ACTIVATION_CODE[activation])


def _forward_torch(z, gamma, beta, num_groups, eps, activation):
    out, mean, rstd = reference.fdn_with_stats(z, gamma, beta, num_groups, eps, None if activation == "none" else activation)
    return out.contiguous(memory_format=_layout_of(z)), mean, rstd


def _forward_triton(z, gamma, beta, num_groups, eps, activation):
    from ..triton import fdn as triton_fdn  # imported on first use: Triton fixes interpreted/compiled then

    return triton_fdn.forward(z, gamma, beta, num_groups, eps, activation)


_FORWARD = {"cpu": _forward_native, "cuda": _forward_native, "triton": _forward_triton,
            "torch": _forward_torch}


@torch.library.custom_op("elr_ext::fdn_forward", mutates_args=())
def fdn_forward(
    z: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, num_groups: int, eps: float, activation: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _FORWARD[_select("fdn_forward", z)](z, gamma, beta, num_groups, eps, activation)


@fdn_forward.register_fake
def _(z, gamma, beta, num_groups, eps, activation):
    out = torch.empty_like(z, memory_format=_layout_of(z))
    stats = z.new_empty((z.shape[0], num_groups), dtype=reference.accumulation_dtype(z.dtype))
    return out, stats, torch.empty_like(stats)


# -------------------------------------------------------------------------- backends: backward
def _backward_native(grad_out, z, gamma, beta, mean, rstd, num_groups, activation, needs):
    return torch.ops.elr_ext_native.fdn_backward(
        grad_out, z, gamma, beta, mean, rstd, num_groups, _ACTIVATION_CODE[activation], needs
    )


def _backward_torch(grad_out, z, gamma, beta, mean, rstd, num_groups, activation, needs):
    dz, dgamma, dbeta = reference.fdn_backward(
        grad_out, z, gamma, beta, mean, rstd, num_groups, None if activation == "none" else activation
    )
    layout = _layout_of(z)
    dz = dz.contiguous(memory_format=layout)
    if gamma.shape == z.shape:  # in z's layout, as the kernels give them; dbeta may alias grad_out
        dgamma, dbeta = dgamma.contiguous(memory_format=layout), dbeta.clone(memory_format=layout)
    return tuple(g if need else None for g, need in zip((dz, dgamma, dbeta), needs))


def _backward_triton(grad_out, z, gamma, beta, mean, rstd, num_groups, activation, needs):
    from ..triton import fdn as triton_fdn

    return triton_fdn.backward(grad_out, z, gamma, beta, mean, rstd, num_groups, activation, needs)


_BACKWARD = {"cpu": _backward_native, "cuda": _backward_native, "triton": _backward_triton,
             "torch": _backward_torch}


@torch.library.custom_op("elr_ext::fdn_backward", mutates_args=())
def fdn_backward(
    grad_out: torch.Tensor,
    z: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    num_groups: int,
    activation: str,
    needs_z: bool,
    needs_gamma: bool,
    needs_beta: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    needs = [needs_z, needs_gamma, needs_beta]
    backend = _select("fdn_backward", z)
    grads = _BACKWARD[backend](grad_out, z, gamma, beta, mean, rstd, num_groups, activation, needs)
    # custom ops return tensors only: an empty tensor stands for "not computed"
    return tuple(g if g is not None else z.new_empty(0) for g in grads)


@fdn_backward.register_fake
def _(grad_out, z, gamma, beta, mean, rstd, num_groups, activation, needs_z, needs_gamma, needs_beta):
    dz = torch.empty_like(z, memory_format=_layout_of(z)) if needs_z else z.new_empty(0)
    broadcast = gamma.shape != z.shape
    layout = torch.contiguous_format if broadcast else _layout_of(z)
    dgamma = torch.empty_like(gamma, memory_format=layout) if needs_gamma else z.new_empty(0)
    dbeta = torch.empty_like(gamma, memory_format=layout) if needs_beta else z.new_empty(0)
    return dz, dgamma, dbeta


# ------------------------------------------------------------------------------------ autograd
def _traced(t: torch.Tensor) -> bool:
    """True under torch.compile, make_fx or fake tensors: there only the custom ops (which have
    fake kernels) may be called; eager code goes straight to the backend."""
    return torch.compiler.is_compiling() or is_fake(t) or _get_current_dispatch_mode() is not None


def _save(ctx, z, gamma, beta, mean, rstd, num_groups, activation):
    # beta is only needed to rebuild the pre-activation for SiLU's derivative
    ctx.save_for_backward(z, gamma, beta if activation == "silu" else None, mean, rstd)
    ctx.num_groups = num_groups
    ctx.activation = activation
    ctx.beta_shape = beta.shape


def _setup_context(ctx, inputs, output):
    z, gamma, beta, num_groups, eps, activation = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    _save(ctx, z, gamma, beta, mean, rstd, num_groups, activation)


def _backward(ctx, grad_out, _grad_mean=None, _grad_rstd=None):
    z, gamma, beta, mean, rstd = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:3])
    if not any(needs):
        return None, None, None, None, None, None
    grad_out = grad_out.contiguous(memory_format=_layout_of(z))
    # Without an activation a full-size beta's gradient is grad_out itself: hand it on instead of
    # having the kernel write a copy (one pass of z's size less).
    dbeta_is_grad_out = needs[2] and ctx.activation == "none" and ctx.beta_shape == z.shape
    if dbeta_is_grad_out:
        needs[2] = False
    args = (grad_out, z, gamma, beta, mean, rstd, ctx.num_groups, ctx.activation)
    if _traced(z):  # the custom op, which has a fake kernel
        dz, dgamma, dbeta = fdn_backward(*args, *needs)
    else:  # eager: straight to the backend (the custom op's Python layer costs ~50 us a call)
        dz, dgamma, dbeta = _BACKWARD[_select("fdn_backward", z)](*args, needs)
    if dbeta_is_grad_out:
        dbeta, needs[2] = grad_out, True
    return (dz if needs[0] else None, dgamma if needs[1] else None, dbeta if needs[2] else None, None, None, None)


class _FdnEager(torch.autograd.Function):
    """The eager path to the compiled kernels (the C++ op through the dispatcher, or the Triton
    kernels) inside an autograd.Function, with the same saved tensors and backward as the custom op.
    At SD's smallest level ([2, 1280, 8, 8]) the custom op's Python layer would otherwise cost more
    than the kernels."""

    @staticmethod
    def forward(ctx, z, gamma, beta, num_groups, eps, activation, backend):
        out, mean, rstd = _FORWARD[backend](z, gamma, beta, num_groups, eps, activation)
        _save(ctx, z, gamma, beta, mean, rstd, num_groups, activation)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return (*_backward(ctx, grad_out), None)


torch.library.register_autograd("elr_ext::fdn_forward", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------- public API
def _check_inputs(z, gamma, beta, num_groups, eps, activation):
    check_tensor("z", z, dim=4)
    check_tensor("gamma", gamma)
    check_tensor("beta", beta)
    check_same_dtype_device("z", z, gamma=gamma, beta=beta)
    n, c, h, w = z.shape
    if n == 0:
        raise ValueError(f"z must have a non-empty batch, got shape {list(z.shape)}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 or c % num_groups:
        raise ValueError(f"num_groups={num_groups!r} must be a positive int dividing the {c} channels of z")
    check_shape("gamma", gamma, [(n, c, h, w), (n, c, 1, 1)])
    check_shape("beta", beta, [(n, c, h, w), (n, c, 1, 1)])
    if gamma.shape != beta.shape:
        raise ValueError(f"gamma {list(gamma.shape)} and beta {list(beta.shape)} must have the same shape")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    check_choice("activation", activation, ACTIVATIONS)


def fdn(
    z: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    num_groups: int = 32,
    eps: float = 1e-5,
    activation: str | None = None,
) -> torch.Tensor:
    """Fused FDN (eq. 8): ``act(group_norm(z) * (1 + gamma) + beta)``.

    Args:
        z: features [N, C, H, W], contiguous or channels_last; fp32, fp64, fp16 or bf16.
        gamma, beta: modulation, of z's shape or [N, C, 1, 1], z's dtype and device.
        num_groups: groups of the parameter-free GroupNorm; must divide C.
        eps: added to the variance.
        activation: None or "silu" (fused).

    Autograd saves z, gamma, the per-group mean and rstd (and beta with "silu"): no normalised copy.
    Under torch.autocast it runs in fp32, like F.group_norm under CUDA autocast (elr_ext/_autocast.py).
    """
    if isinstance(z, torch.Tensor) and autocast_dtype(z.device.type, gemm=False) is not None:
        with torch.autocast(z.device.type, enabled=False):  # a GroupNorm under autocast: fp32, as F.group_norm
            return fdn(*autocast_cast(torch.float32, (z, gamma, beta)), num_groups, eps, activation)
    _check_inputs(z, gamma, beta, num_groups, eps, activation)
    args = (z, gamma, beta, num_groups, float(eps), activation or "none")
    if not _traced(z):
        backend = _select("fdn_forward", z)
        if backend != "torch":
            return _FdnEager.apply(*args, backend)
    return fdn_forward(*args)[0]
