"""Fused low-rank projections (Stage I student weights, eq. 2; docs/method.md, "Eq. 2"): the whole
Python story of the op.

    h = x [B_1; ...; B_K]^T   [M, R = sum_j r_j]      one GEMM for all down-projections
    y_j = h_j A_j^T + b_j      [M, out_j]              h_j = h[:, off_j : off_j + r_j]

with W_j = A_j B_j stored as ups[j] = A_j [out_j, r_j] and downs[j] = B_j [r_j, in] (different
ranks allowed). Self-attention calls it with K = 3 (q, k, v) on the hidden states; cross-attention
makes two calls (K = 1 for q on the hidden states, K = 2 for k, v on the text context).

- autograd saves x and h only (plus the factors themselves, which are parameters, not
  activations). Backward: dA_j = dy_j^T h_j; dh_j = dy_j A_j; dB = dh^T x; dx = dh B;
  db_j = sum_m dy_j; only the gradients that are needed.
- schema: torch.library custom ops elr_ext::lowrank_proj_forward -> (ys, h) and
  elr_ext::lowrank_proj_backward -> (dx, dB, dAs, dbs), with fake kernels, so torch.compile traces
  them without graph breaks. They take the factors as tensor lists (`Tensor[]`), not concatenated
  in the wrapper: each A_j, b_j reaches the kernel as is (no per-call copy of the ups) and its
  gradient comes back as its own tensor. The downs are stacked inside the kernel (a copy of
  R x in elements, skipped when they already lie back to back in one buffer), and dB comes back
  stacked [R, in] and is split here into views. An absent bias is an empty tensor in the list
  (custom ops take no None inside a list that autograd flows through: Tensor?[] is opaque to
  register_autograd); outputs not computed are empty tensors, as in the other ops.
- dispatch: per call, through elr_ext.backends, in one place: the _FORWARD / _BACKWARD tables
  (compiled cpu / cuda wrappers in csrc/{cpu,cuda}/lowrank_proj.*, the Triton GEMMs in
  elr_ext/triton/lowrank_proj.py, or the reference in elr_ext/reference.py). Eager calls reach the
  backend through an autograd.Function (the custom op's Python layer costs tens of microseconds per
  call, as much as the GEMMs at SD's smallest token counts); traced calls use the custom ops. Both
  share _save and _backward.
- planning: the fake kernels allocate the workspaces of the backend elr_ext.backends.planned_backend
  names (`workspaces` has the table), and torch.utils.flop_counter formulas count the GEMMs' FLOPs
  (next to each fake kernel).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.utils.flop_counter import register_flop_formula

from .. import backends, reference
from .._autocast import autocast_cast, autocast_dtype
from .._checks import check_same_dtype_device, check_tensor
from ..backends import Workspace, acc_values
from .fdn import _traced


def _backend(native_op: str, x: torch.Tensor) -> str:
    return backends.choose("lowrank_proj", native_op, x)


def _empty_like_absent(x: torch.Tensor) -> torch.Tensor:
    """The stand-in for an absent bias or a gradient that was not computed."""
    return x.new_empty(0)


# ------------------------------------------------------------- planning: what each backend allocates
def workspaces(op: str, *args, backend: str | None = None, **kwargs) -> list:
    """The transient tensors `backend` (default: backends.current_planned_backend()) allocates for one
    call of elr_ext::<op> with these arguments besides the outputs, as the list of those alive
    together at the wrapper's peak (the fake kernels allocate them beside the outputs). M tokens,
    R = sum r_j, "dtype" x's dtype, acc the accumulation type (fp32; fp64 for fp64):

    lowrank_proj_forward
      cuda, cpu   the stacked downs [R, in] in dtype when K > 1, they are not one buffer already
                  and the single GEMM is used (csrc/lowrank_proj_gemm.h: lowrank_stack_downs:
                  fp16 / bf16, or 2*M >= R); freed before the y_j are made, so counting it beside
                  them overstates the peak by at most R*in values
      triton      the stacked downs [R, in] when K > 1 and not one buffer (it always stacks)
    lowrank_proj_backward
      cuda, cpu   dh [M, R] in dtype (dx or dB needed), and the stacked downs as in the forward (dx)
      triton      copies of grad_ys whose last stride is not 1, dh [M, R] (dx or dB), then the
                  largest of: the split-K partials and their sum of each dA_j ([splits, out_j, r_j]
                  + [out_j, r_j] acc), those of dB ([splits, R, in] + [R, in] acc), the stacked
                  downs (dx); splits as _gemm(long_k=True) picks them for the planned SM count.
                  The dA_j partials come before dh exists, so they are counted beside more than
                  is alive then
    torch         the reference's intermediates, measured by running it (backends.transient_peak)

    Under symbolic sizes (torch.compile with dynamic shapes) the list is empty: computing it would
    guard on the shapes."""
    backend = backend or backends.current_planned_backend()
    if backends.has_symbolic_sizes(args + tuple(kwargs.values())):
        return []
    return [w for w in _WORKSPACES[op](backend, *args, **kwargs) if w.nbytes > 0]


_MEASURED = "reference intermediates"  # the torch backend's workspace, measured


def _adjacent(downs) -> bool:
    """lowrank_downs_adjacent: the downs lie back to back in one buffer, so stacking them is a view."""
    storage, offset = downs[0].untyped_storage()._cdata, downs[0].storage_offset()
    for B in downs:
        if not B.is_contiguous() or B.untyped_storage()._cdata != storage or B.storage_offset() != offset:
            return False
        offset += B.numel()
    return True


def _stacked_copy(x, downs) -> list:
    """The [R, in] copy of the downs that stacking them makes (none when K = 1 or already one buffer)."""
    if len(downs) == 1 or _adjacent(downs):
        return []
    return [Workspace("stacked downs", (sum(B.shape[0] for B in downs), x.shape[1]), x.dtype)]


def _native_stacks(x, downs) -> bool:
    """lowrank_stack_downs: one GEMM over the stacked downs (else one per down, no copy)."""
    R = sum(B.shape[0] for B in downs)
    return x.dtype in (torch.float16, torch.bfloat16) or 2 * x.shape[0] >= R


def _triton_long_k(name, rows, cols, K, dtype) -> list:
    """The fp32 partials [splits, rows, cols] and their sum of _gemm(long_k=True) in
    elr_ext/triton/lowrank_proj.py, for a GPU of the planned SM count (none when K is not split)."""
    if rows == 0 or cols == 0 or K == 0:
        return []
    tiles = -(-rows // 64) * -(-cols // 64)
    splits = max(1, min(-(-4 * backends.planned_sm_count() // tiles), -(-K // 1024), 64))
    splits = -(-K // -(-K // splits))
    if splits == 1:
        return []
    return [acc_values(f"{name} partials", splits * rows * cols, dtype),
            acc_values(f"{name} sum", rows * cols, dtype)]


def _forward_workspaces(backend, x, downs, ups, biases):
    if backend == "torch":
        return backends.transient_peak(_MEASURED, _forward_torch, x, downs, ups, biases)
    if backend == "triton" or _native_stacks(x, downs):
        return _stacked_copy(x, downs)
    return []


def _backward_triton_workspaces(grad_ys, x, downs, ups, needs_x, needs_downs, needs_ups):
    M, R, dtype = x.shape[0], sum(B.shape[0] for B in downs), x.dtype
    copies = [Workspace(f"grad_ys[{j}] copy", tuple(g.shape), g.dtype) for j, g in enumerate(grad_ys)
              if g.stride(-1) != 1]
    dh = [Workspace("dh", (M, R), dtype)] if needs_x or needs_downs else []
    phases = [_triton_long_k(f"dA_{j}", A.shape[0], A.shape[1], M, dtype)
              for j, (A, need) in enumerate(zip(ups, needs_ups)) if need]
    phases.append(_triton_long_k("dB", R, x.shape[1], M, dtype) if needs_downs else [])
    phases.append(_stacked_copy(x, downs) if needs_x else [])
    return copies + dh + backends.larger(*phases)


def _backward_workspaces(backend, grad_ys, x, h, downs, ups, needs_x, needs_downs, needs_ups, needs_biases):
    if backend == "torch":
        return backends.transient_peak(_MEASURED, _backward_torch, grad_ys, x, h, downs, ups, needs_x,
                                       needs_downs, needs_ups, needs_biases)
    if backend == "triton":
        return _backward_triton_workspaces(grad_ys, x, downs, ups, needs_x, needs_downs, needs_ups)
    if not (needs_x or needs_downs):
        return []
    stacked = _stacked_copy(x, downs) if needs_x and _native_stacks(x, downs) else []
    return [Workspace("dh", (x.shape[0], sum(B.shape[0] for B in downs)), x.dtype)] + stacked


_WORKSPACES = {"lowrank_proj_forward": _forward_workspaces, "lowrank_proj_backward": _backward_workspaces}
PLAN_WORKSPACES = backends.tracker_hooks(workspaces, _WORKSPACES)


# --------------------------------------------------------------------------- backends: forward
def _forward_native(x, downs, ups, biases):
    ys, h = torch.ops.elr_ext_native.lowrank_proj_forward(x, downs, ups, biases)
    return list(ys), h


def _forward_torch(x, downs, ups, biases):
    ys, h = reference.lowrank_proj_with_hidden(x, downs, ups, [b if b.numel() else None for b in biases])
    return [y.contiguous() for y in ys], h.contiguous()


def _forward_triton(x, downs, ups, biases):
    # imported on first use: Triton fixes interpreted or compiled then
    from ..triton import lowrank_proj as triton_lowrank

    return triton_lowrank.forward(x, downs, ups, biases)


_FORWARD = {"cpu": _forward_native, "cuda": _forward_native, "triton": _forward_triton,
            "torch": _forward_torch}


@torch.library.custom_op("elr_ext::lowrank_proj_forward", mutates_args=())
def lowrank_proj_forward(
    x: torch.Tensor, downs: list[torch.Tensor], ups: list[torch.Tensor], biases: list[torch.Tensor]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """x [M, in] -> ([y_j [M, out_j]], h [M, R]); biases[j] is [out_j] or empty (no bias)."""
    ys, h = _FORWARD[_backend("lowrank_proj_forward", x)](x, downs, ups, biases)
    return ys, h


@lowrank_proj_forward.register_fake
def _forward_fake(x, downs, ups, biases):
    # the planned backend's workspaces (sized first: the torch backend's are measured by running it),
    # then the outputs, then the workspaces alive beside them and freed, as the wrappers do
    scratch = workspaces("lowrank_proj_forward", x, downs, ups, biases)
    ranks = sum(B.shape[0] for B in downs)
    out = [x.new_empty((x.shape[0], A.shape[0])) for A in ups], x.new_empty((x.shape[0], ranks))
    backends.allocate(scratch, x.device)
    return out


@register_flop_formula(torch.ops.elr_ext.lowrank_proj_forward)
def _forward_flops(x_shape, downs_shapes, ups_shapes, *_, **__) -> int:
    """2 per multiply-add: h = x [B_1; ...; B_K]^T (in*R per token) and y_j = h_j A_j^T (r_j*out_j)."""
    M, d_in = x_shape
    return 2 * M * (d_in * sum(B[0] for B in downs_shapes) + sum(A[0] * A[1] for A in ups_shapes))


# -------------------------------------------------------------------------- backends: backward
def _backward_native(grad_ys, x, h, downs, ups, needs_x, needs_downs, needs_ups, needs_biases):
    dx, ddown, dups, dbiases = torch.ops.elr_ext_native.lowrank_proj_backward(
        grad_ys, x, h, downs, ups, needs_x, needs_downs, needs_ups, needs_biases
    )
    return dx, ddown, list(dups), list(dbiases)


def _backward_torch(grad_ys, x, h, downs, ups, needs_x, needs_downs, needs_ups, needs_biases):
    dx, ddowns, dups, dbiases = reference.lowrank_proj_backward(grad_ys, x, h, downs, ups)
    # a fresh empty tensor per absent entry: custom op outputs may not alias one another
    return (
        dx.contiguous() if needs_x else _empty_like_absent(x),
        torch.cat(ddowns) if needs_downs else _empty_like_absent(x),
        [g.contiguous() if need else _empty_like_absent(x) for g, need in zip(dups, needs_ups)],
        [g.contiguous() if need else _empty_like_absent(x) for g, need in zip(dbiases, needs_biases)],
    )


def _backward_triton(grad_ys, x, h, downs, ups, needs_x, needs_downs, needs_ups, needs_biases):
    from ..triton import lowrank_proj as triton_lowrank

    return triton_lowrank.backward(grad_ys, x, h, downs, ups, needs_x, needs_downs, needs_ups, needs_biases)


_BACKWARD = {"cpu": _backward_native, "cuda": _backward_native, "triton": _backward_triton,
             "torch": _backward_torch}


@torch.library.custom_op("elr_ext::lowrank_proj_backward", mutates_args=())
def lowrank_proj_backward(
    grad_ys: list[torch.Tensor], x: torch.Tensor, h: torch.Tensor, downs: list[torch.Tensor],
    ups: list[torch.Tensor], needs_x: bool, needs_downs: bool, needs_ups: list[bool],
    needs_biases: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """-> (dx [M, in], dB [R, in] (the downs' gradients stacked), [dA_j], [db_j]); empty where not needed."""
    backend = _backend("lowrank_proj_backward", x)
    dx, ddown, dups, dbiases = _BACKWARD[backend](grad_ys, x, h, downs, ups, needs_x, needs_downs, needs_ups,
                                                  needs_biases)
    return dx, ddown, dups, dbiases


@lowrank_proj_backward.register_fake
def _backward_fake(grad_ys, x, h, downs, ups, needs_x, needs_downs, needs_ups, needs_biases):
    scratch = workspaces("lowrank_proj_backward", grad_ys, x, h, downs, ups, needs_x, needs_downs, needs_ups,
                         needs_biases)
    out = (
        torch.empty_like(x, memory_format=torch.contiguous_format) if needs_x else _empty_like_absent(x),
        x.new_empty((h.shape[1], x.shape[1])) if needs_downs else _empty_like_absent(x),
        [torch.empty_like(A) if need else _empty_like_absent(x) for A, need in zip(ups, needs_ups)],
        [x.new_empty((A.shape[0],)) if need else _empty_like_absent(x) for A, need in zip(ups, needs_biases)],
    )
    backends.allocate(scratch, x.device)
    return out


@register_flop_formula(torch.ops.elr_ext.lowrank_proj_backward)
def _backward_flops(grad_ys_shapes, x_shape, h_shape, downs_shapes, ups_shapes, needs_x, needs_downs,
                    needs_ups, *_, **__) -> int:
    """2 per multiply-add of the gradients asked for: dA_j = dy_j^T h_j (out_j*r_j per token, each
    needed one), dh_j = dy_j A_j (out_j*r_j, for dx or dB), dB = dh^T x and dx = dh [B_1; ...; B_K]
    (in*R each). The bias gradients are sums (no multiply-adds)."""
    M, d_in = x_shape
    R, blocks = h_shape[1], [A[0] * A[1] for A in ups_shapes]
    dups = sum(n for n, need in zip(blocks, needs_ups) if need)
    dh = sum(blocks) if needs_x or needs_downs else 0
    return 2 * M * (dups + dh + d_in * R * (bool(needs_downs) + bool(needs_x)))


# ------------------------------------------------------------------------------------ autograd
def _save(ctx, x, h, downs, ups, biases):
    # x and h are the only activations kept; the factors are parameters (no extra memory)
    ctx.save_for_backward(x, h, *downs, *ups)
    ctx.num_proj = len(downs)
    ctx.has_bias = [b.numel() > 0 for b in biases]


def _backward(ctx, grad_ys, needs_x, needs_downs, needs_ups, needs_biases):
    """(dx, [dB_j or None], [dA_j or None], [db_j or None]) for the saved call."""
    x, h, *factors = ctx.saved_tensors
    K = ctx.num_proj
    downs, ups = factors[:K], factors[K:]
    needs_biases = [need and has for need, has in zip(needs_biases, ctx.has_bias)]
    need_down = any(needs_downs)
    if not (needs_x or need_down or any(needs_ups) or any(needs_biases)):
        return None, [None] * K, [None] * K, [None] * K
    args = (list(grad_ys), x, h, list(downs), list(ups), bool(needs_x), need_down, list(needs_ups),
            needs_biases)
    if _traced(x):  # the custom op, which has a fake kernel
        dx, ddown, dups, dbiases = lowrank_proj_backward(*args)
    else:  # eager: straight to the backend
        dx, ddown, dups, dbiases = _BACKWARD[_backend("lowrank_proj_backward", x)](*args)
    ddowns = ddown.split([B.shape[0] for B in downs]) if need_down else [None] * K
    return (
        dx if needs_x else None,
        [g if need else None for g, need in zip(ddowns, needs_downs)],
        [g if need else None for g, need in zip(dups, needs_ups)],
        [g if need else None for g, need in zip(dbiases, needs_biases)],
    )


def _setup_context(ctx, inputs, output):
    x, downs, ups, biases = inputs
    _, h = output
    ctx.mark_non_differentiable(h)
    _save(ctx, x, h, downs, ups, biases)


def _custom_op_backward(ctx, grad_ys, _grad_h):
    # needs_input_grad arrives with the inputs' structure: (x, [downs], [ups], [biases])
    needs_x, needs_downs, needs_ups, needs_biases = ctx.needs_input_grad
    return _backward(ctx, grad_ys, needs_x, needs_downs, needs_ups, needs_biases)


torch.library.register_autograd(
    "elr_ext::lowrank_proj_forward", _custom_op_backward, setup_context=_setup_context
)


class _LowRankProjEager(torch.autograd.Function):
    """The eager path: the backend called directly inside an autograd.Function, with the same saved
    tensors and backward as the custom op. Inputs are flattened: (x, backend, K, *downs, *ups,
    *biases), the backend chosen by the caller."""

    @staticmethod
    def forward(ctx, x, backend, K, *factors):
        downs, ups, biases = list(factors[:K]), list(factors[K:2 * K]), list(factors[2 * K:])
        ys, h = _FORWARD[backend](x, downs, ups, biases)
        _save(ctx, x, h, downs, ups, biases)
        return tuple(ys)

    @staticmethod
    def backward(ctx, *grad_ys):
        K = ctx.num_proj
        needs = ctx.needs_input_grad
        dx, ddowns, dups, dbiases = _backward(
            ctx, grad_ys, needs[0], needs[3:3 + K], needs[3 + K:3 + 2 * K], needs[3 + 2 * K:]
        )
        return (dx, None, None, *ddowns, *dups, *dbiases)


# ---------------------------------------------------------------------------------- public API
def _check_inputs(x, downs, ups, biases):
    """Validates the arguments; returns (downs, ups, biases) as lists, biases with K entries."""
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must be [..., in], got a 0-D tensor")
    for name, seq in (("downs", downs), ("ups", ups)):
        if isinstance(seq, torch.Tensor) or not isinstance(seq, (list, tuple)):
            raise TypeError(f"{name} must be a list of 2-D tensors, got {type(seq).__name__}")
    K = len(downs)
    if K == 0:
        raise ValueError("downs must hold at least one down-projection B_j [r_j, in], got an empty list")
    if len(ups) != K:
        raise ValueError(f"ups must hold one up-projection A_j [out_j, r_j] per down-projection: "
                         f"got {len(ups)} ups for {K} downs")
    if biases is None:
        biases = [None] * K
    elif isinstance(biases, torch.Tensor) or not isinstance(biases, (list, tuple)):
        raise TypeError(f"biases must be None or a list of K={K} entries (each None or [out_j]), "
                        f"got {type(biases).__name__}")
    elif len(biases) != K:
        raise ValueError(f"biases must be None or a list of K={K} entries (each None or [out_j]), "
                         f"got {len(biases)} entries")
    d_in, dtype, device = x.shape[-1], x.dtype, x.device
    for j, (B, A, b) in enumerate(zip(downs, ups, biases)):
        if (isinstance(B, torch.Tensor) and isinstance(A, torch.Tensor) and B.dim() == 2 and A.dim() == 2
                and B.shape[1] == d_in and A.shape[1] == B.shape[0] >= 1 and A.shape[0] >= 1
                and B.dtype == dtype and A.dtype == dtype and B.device == device and A.device == device
                and (b is None or (isinstance(b, torch.Tensor) and b.shape == A.shape[:1] and b.dtype == dtype
                                   and b.device == device))):
            continue  # the common case, checked at a glance (the eager call is on the hot path)
        check_tensor(f"downs[{j}]", B, dim=2)
        check_tensor(f"ups[{j}]", A, dim=2)
        if b is not None:
            check_tensor(f"biases[{j}]", b, dim=1)
        check_same_dtype_device("x", x, **{f"downs[{j}]": B, f"ups[{j}]": A, f"biases[{j}]": b})
        r = B.shape[0]
        if r < 1 or B.shape[1] != d_in:
            raise ValueError(f"downs[{j}] must be [r_j, in] with r_j >= 1 and in = x.shape[-1] = {d_in}, "
                             f"got {list(B.shape)}")
        if A.shape[1] != r or A.shape[0] < 1:
            raise ValueError(f"ups[{j}] must be [out_j, r_j] with out_j >= 1 and r_j = {r}, the rank of "
                             f"downs[{j}] {list(B.shape)}; got {list(A.shape)}")
        if b is not None and b.shape[0] != A.shape[0]:
            raise ValueError(f"biases[{j}] must be [out_j] = [{A.shape[0]}] (ups[{j}] is {list(A.shape)}), "
                             f"got {list(b.shape)}")
    return list(downs), list(ups), list(biases)


def lowrank_proj(
    x: torch.Tensor,
    downs: Sequence[torch.Tensor],
    ups: Sequence[torch.Tensor],
    biases: Optional[Sequence[Optional[torch.Tensor]]] = None,
) -> tuple[torch.Tensor, ...]:
    """K low-rank projections of one input (eq. 2): ``y_j = x B_j^T A_j^T + b_j``, W_j = A_j B_j never
    built, one GEMM for all the down-projections.

    Args:
        x: [..., in], any leading dims, non-contiguous accepted; fp32, fp64, fp16 or bf16.
        downs: K >= 1 down-projections B_j [r_j, in] (ranks may differ).
        ups: K up-projections A_j [out_j, r_j].
        biases: None, or K entries each None or b_j [out_j].
    Returns:
        the tuple (y_1, ..., y_K), y_j [..., out_j].

    Autograd saves x and the rank-space activations h [M, sum r_j], nothing output-sized.
    Under torch.autocast it runs like F.linear: every input in the autocast dtype (elr_ext/_autocast.py).
    """
    if isinstance(x, torch.Tensor):
        dtype = autocast_dtype(x.device.type, gemm=True)
        if dtype is not None:  # a GEMM under autocast: everything in the autocast dtype, as F.linear does
            with torch.autocast(x.device.type, enabled=False):
                return lowrank_proj(*autocast_cast(dtype, (x, downs, ups, biases)))
    downs, ups, biases = _check_inputs(x, downs, ups, biases)
    # a view where x allows it: the kernels take any row stride
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if any(b is None for b in biases):
        absent = _empty_like_absent(x)
        biases = [absent if b is None else b for b in biases]
    if _traced(x):
        ys, _ = lowrank_proj_forward(x2d, downs, ups, biases)
    else:
        backend = _backend("lowrank_proj_forward", x)
        ys = _LowRankProjEager.apply(x2d, backend, len(downs), *downs, *ups, *biases)
    if x.dim() == 2:
        return tuple(ys)
    return tuple(y.reshape(*x.shape[:-1], y.shape[-1]) for y in ys)
