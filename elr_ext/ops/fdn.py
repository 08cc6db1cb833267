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
- planning: the fake kernels allocate the workspaces of the backend elr_ext.backends.planned_backend
  names (`workspaces` has the table). No FLOP formula: FDN is memory-bound (a few operations per
  element moved), and torch.utils.flop_counter counts only products, convolutions and attention
  (group_norm has no formula either), so a planner times it by its bytes.
"""

from __future__ import annotations

import importlib.util

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .. import backends, reference
from .._autocast import autocast_cast, autocast_dtype
from .._checks import check_choice, check_same_dtype_device, check_shape, check_tensor
from ..backends import Workspace, acc_values, align256, byte_workspace

ACTIVATIONS = (None, "silu")
_ACTIVATION_CODE = {"none": 0, "silu": 1}


def _layout_of(z: torch.Tensor) -> torch.memory_format:
    """The memory format the kernels produce outputs in (channels_last stays channels_last)."""
    if not z.is_contiguous() and z.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _select(native_op: str, z: torch.Tensor) -> str:
    return backends.choose("fdn", native_op, z)


# ------------------------------------------------------------- planning: what each backend allocates
def workspaces(op: str, *args, backend: str | None = None, **kwargs) -> list:
    """The transient tensors `backend` (default: backends.current_planned_backend()) allocates for one
    call of elr_ext::<op> with these arguments besides the outputs, as the list of those alive
    together at the wrapper's peak (the fake kernels allocate them beside the outputs). acc is the
    accumulation type (fp32; fp64 for fp64); splits = max(1, min(64, ceil((C/G)*H*W / 4096))), the
    blocks per group of csrc/kernels/fdn.cuh (max_group_splits):

    fdn_forward
      cuda    copies of z, gamma, beta not already in the kernels' layout (fdn_contiguous: z's
              memory format; broadcast gamma / beta as [N, C]), and the byte workspace
              align256(N*G*splits*3*sizeof(acc)) of the per-block (count, mean, M2) (none when
              H*W == 0)
      cpu     the same copies; NCHW nothing else; NHWC with the split plan (NhwcPlan: a channel
              tile of all rows over 256 KiB) the per-row-block group statistics [N*blocks*G] x 3
              fp64, then the larger of the tasks' scratch (5*C acc + 2*C fp64 each, one task per
              thread) and the per-channel mean / scale (/ beta) [N, C] acc
      triton  copies of inputs whose (h, w) strides do not flatten, and the partials
              [N*G, splits, 2] acc of elr_ext/triton/fdn.py (_plan, for the planned SM count)
    fdn_backward (nothing when no gradient is needed or H*W == 0, except the cpu copies)
      cuda    copies of grad_out, z, gamma (and beta with SiLU), mean / rstd, and the byte
              workspace align256(N*G*splits*2*sizeof(acc)), plus align256(N*col_splits*C*2*sizeof(acc))
              for broadcast gamma in NHWC (col_splits = max(1, min(64, ceil(H*W / 64))))
      cpu     the same copies (made before any early return); NHWC: the per-channel statistics
              (and broadcast gamma / beta) [N, C] acc, and with the split plan the per-row-block
              sums 2 x [N*blocks, C] fp64, then the larger of the tasks' scratch and the per-channel
              coefficients 2 x [N, C] acc
      triton  the copies, partials [N*G, splits, 2] acc and, broadcast, [N, C, splits, 2] acc
    torch     the reference's intermediates, measured by running it (backends.transient_peak)

    Left out, named here: per-task buffers of the CPU kernels bounded by a constant (the NCHW
    chunks on the stack, the fused NHWC plan's tile of about 128 channels) and O(C) vectors. Under
    symbolic sizes (torch.compile with dynamic shapes) the list is empty: computing it would guard
    on the shapes."""
    backend = backend or backends.current_planned_backend()
    if backends.has_symbolic_sizes(args + tuple(kwargs.values())):
        return []
    return [w for w in _WORKSPACES[op](backend, *args, **kwargs) if w.nbytes > 0]


_MEASURED = "reference intermediates"  # the torch backend's workspace, measured


def _broadcast(z, gamma) -> bool:
    """fdn_make_shape's affine_broadcast: gamma / beta [N, C, 1, 1] on an H*W != 1 map."""
    return tuple(gamma.shape) == (z.shape[0], z.shape[1], 1, 1) and z.shape[2] * z.shape[3] != 1


def _native_copies(z, full, affine) -> list:
    """The copies fdn_contiguous makes: of the full-size tensors {name: t} not contiguous in z's
    layout, and of the affine ones, which are [N, C] when broadcast."""
    layout, broadcast = _layout_of(z), _broadcast(z, affine["gamma"])
    copies = [Workspace(f"{name} copy", tuple(t.shape), t.dtype) for name, t in full.items()
              if not t.is_contiguous(memory_format=layout)]
    for name, t in affine.items():
        if broadcast:
            kept = t.reshape(z.shape[0], z.shape[1]).is_contiguous()
        else:
            kept = t.is_contiguous(memory_format=layout)
        copies += [] if kept else [Workspace(f"{name} copy", tuple(t.shape), t.dtype)]
    return copies


def _stat_copies(mean, rstd) -> list:
    """mean.contiguous(), rstd.contiguous() of the backward wrappers (the forward's are contiguous)."""
    return [Workspace(f"{name} copy", tuple(t.shape), t.dtype) for name, t in (("mean", mean), ("rstd", rstd))
            if not t.is_contiguous()]


def _cuda_splits(z, num_groups) -> int:
    """max_group_splits of csrc/kernels/fdn.cuh: blocks per group, at most 64, 4096 values or more each."""
    return max(1, min(64, -(-(z.shape[1] // num_groups * z.shape[2] * z.shape[3]) // 4096)))


def _forward_cuda_workspaces(z, gamma, beta, num_groups):
    copies = _native_copies(z, {"z": z}, {"gamma": gamma, "beta": beta})
    if z.numel() == 0:
        return copies
    nbytes = z.shape[0] * num_groups * _cuda_splits(z, num_groups) * 3 * backends.acc_bytes(z.dtype)
    return copies + [byte_workspace("block statistics", align256(nbytes))]


def _backward_cuda_workspaces(grad_out, z, gamma, beta, mean, rstd, num_groups, activation):
    affine = {"gamma": gamma, **({"beta": beta} if activation == "silu" else {})}
    copies = _native_copies(z, {"grad_out": grad_out, "z": z}, affine)
    copies += _stat_copies(mean, rstd)
    N, C, H, W = z.shape
    acc_bytes = backends.acc_bytes(z.dtype)
    nbytes = align256(N * num_groups * _cuda_splits(z, num_groups) * 2 * acc_bytes)
    if _broadcast(z, gamma) and _layout_of(z) == torch.channels_last:
        nbytes += align256(N * max(1, min(64, -(-(H * W) // 64))) * C * 2 * acc_bytes)
    return copies + [byte_workspace("block partial sums", nbytes)]


def _nhwc_split_blocks(z, num_groups) -> int:
    """Row blocks per sample of NhwcPlan (csrc/kernels/fdn.h), 1 for the fused plan (a channel tile of
    every row within 256 KiB)."""
    _, C, H, W = z.shape
    cpg, hw = max(1, C // num_groups), max(1, H * W)
    groups = min(num_groups, -(-128 // cpg))
    if hw * groups * cpg * backends.acc_bytes(z.dtype) <= 256 * 1024:
        return 1
    return -(-hw // min(hw, max(-(-hw // 16), -(-16384 // max(1, C)))))


def _nhwc_task_scratch(z, units) -> list:
    """NhwcScratch(C) of every task of the split plan's parallel loop over `units` row blocks."""
    tasks = backends.cpu_parallel_tasks(units, z.numel())
    return [acc_values("task lanes", tasks * 5 * z.shape[1], z.dtype),
            Workspace("task totals", (tasks * 2 * z.shape[1],), torch.float64)]


def _forward_cpu_workspaces(z, gamma, beta, num_groups):
    copies = _native_copies(z, {"z": z}, {"gamma": gamma, "beta": beta})
    N, C = z.shape[:2]
    blocks = _nhwc_split_blocks(z, num_groups)
    if _layout_of(z) != torch.channels_last or C == 0 or blocks == 1:
        return copies
    vectors = 3 if _broadcast(z, gamma) else 2
    channels = acc_values("per-channel mean, scale, beta", vectors * N * C, z.dtype)
    return (copies + [Workspace("row-block statistics", (N * blocks * num_groups, 3), torch.float64)]
            + backends.larger(_nhwc_task_scratch(z, N * blocks), [channels]))


def _backward_cpu_workspaces(grad_out, z, gamma, beta, mean, rstd, num_groups, activation, needs):
    affine = {"gamma": gamma, **({"beta": beta} if activation == "silu" else {})}
    copies = _native_copies(z, {"grad_out": grad_out, "z": z}, affine)
    copies += _stat_copies(mean, rstd)
    N, C = z.shape[:2]
    if _layout_of(z) != torch.channels_last or C == 0 or not any(needs):
        return copies
    stats = acc_values("per-channel statistics", (4 if _broadcast(z, gamma) else 2) * N * C, z.dtype)
    blocks = _nhwc_split_blocks(z, num_groups)
    if blocks == 1:
        return copies + [stats]
    sums = Workspace("row-block sums", (2 * N * blocks * C,), torch.float64)
    coefficients = acc_values("per-channel coefficients", 2 * N * C, z.dtype)
    return copies + [stats, sums] + backends.larger(_nhwc_task_scratch(z, N * blocks), [coefficients])


def _triton_copies(tensors) -> list:
    """The copies _addressable makes (elr_ext/triton/fdn.py): of tensors whose (h, w) do not flatten."""
    if importlib.util.find_spec("triton") is None:
        return []
    from ..triton.fdn import _nc_hw_strides

    return [Workspace(f"{name} copy", tuple(t.shape), t.dtype) for name, t in tensors.items()
            if _nc_hw_strides(t) is None]


def _triton_splits(z, num_groups) -> int:
    """The pixel splits of elr_ext/triton/fdn.py: _plan, with its rule for a GPU of the planned SM
    count (chunks of at least 2048 values, about four programs per SM)."""
    N, C, H, W = z.shape
    hw = H * W
    wanted = -(-4 * backends.planned_sm_count() // (N * num_groups))
    splits = max(1, min(wanted, max(1, C // num_groups * hw // 2048), hw, 64))
    return -(-hw // -(-hw // splits))


def _forward_triton_workspaces(z, gamma, beta, num_groups):
    copies = _triton_copies({"z": z, "gamma": gamma, "beta": beta})
    if z.numel() == 0:
        return copies
    values = z.shape[0] * num_groups * _triton_splits(z, num_groups) * 2
    return copies + [acc_values("group partials", values, z.dtype)]


def _backward_triton_workspaces(grad_out, z, gamma, beta, mean, rstd, num_groups, activation):
    affine = {"gamma": gamma, **({"beta": beta} if activation == "silu" else {})}
    copies = _triton_copies({"z": z, "grad_out": grad_out, **affine}) + _stat_copies(mean, rstd)
    splits = _triton_splits(z, num_groups)
    partials = [acc_values("group partials", z.shape[0] * num_groups * splits * 2, z.dtype)]
    if gamma.shape != z.shape:
        partials.append(acc_values("channel partials", z.shape[0] * z.shape[1] * splits * 2, z.dtype))
    return copies + partials


def _forward_workspaces(backend, z, gamma, beta, num_groups, eps, activation):
    if backend == "torch":
        return backends.transient_peak(_MEASURED, _forward_torch, z, gamma, beta, num_groups, eps, activation)
    if backend == "cpu":
        return _forward_cpu_workspaces(z, gamma, beta, num_groups)
    if backend == "triton":
        return _forward_triton_workspaces(z, gamma, beta, num_groups)
    return _forward_cuda_workspaces(z, gamma, beta, num_groups)


def _backward_workspaces(backend, grad_out, z, gamma, beta, mean, rstd, num_groups, activation, needs_z,
                         needs_gamma, needs_beta):
    needs = (needs_z, needs_gamma, needs_beta)
    if backend == "torch":
        return backends.transient_peak(_MEASURED, _backward_torch, grad_out, z, gamma, beta, mean, rstd,
                                       num_groups, activation, list(needs))
    if backend == "cpu":
        return _backward_cpu_workspaces(grad_out, z, gamma, beta, mean, rstd, num_groups, activation, needs)
    if not any(needs) or z.numel() == 0:
        return []
    if backend == "triton":
        return _backward_triton_workspaces(grad_out, z, gamma, beta, mean, rstd, num_groups, activation)
    return _backward_cuda_workspaces(grad_out, z, gamma, beta, mean, rstd, num_groups, activation)


_WORKSPACES = {"fdn_forward": _forward_workspaces, "fdn_backward": _backward_workspaces}
PLAN_WORKSPACES = backends.tracker_hooks(workspaces, _WORKSPACES)


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
def _forward_fake(z, gamma, beta, num_groups, eps, activation):
    # the planned backend's workspaces (sized first: the torch backend's are measured by running it),
    # then the outputs, then the workspaces alive beside them and freed, as the wrappers do
    scratch = workspaces("fdn_forward", z, gamma, beta, num_groups, eps, activation)
    out = torch.empty_like(z, memory_format=_layout_of(z))
    stats = z.new_empty((z.shape[0], num_groups), dtype=reference.accumulation_dtype(z.dtype))
    outputs = out, stats, torch.empty_like(stats)
    backends.allocate(scratch, z.device)
    return outputs


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
def _backward_fake(grad_out, z, gamma, beta, mean, rstd, num_groups, activation, needs_z, needs_gamma,
                   needs_beta):
    scratch = workspaces("fdn_backward", grad_out, z, gamma, beta, mean, rstd, num_groups, activation,
                         needs_z, needs_gamma, needs_beta)
    dz = torch.empty_like(z, memory_format=_layout_of(z)) if needs_z else z.new_empty(0)
    broadcast = gamma.shape != z.shape
    layout = torch.contiguous_format if broadcast else _layout_of(z)
    dgamma = torch.empty_like(gamma, memory_format=layout) if needs_gamma else z.new_empty(0)
    dbeta = torch.empty_like(gamma, memory_format=layout) if needs_beta else z.new_empty(0)
    backends.allocate(scratch, z.device)
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
