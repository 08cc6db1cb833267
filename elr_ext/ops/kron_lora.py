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
- planning: the fake kernels allocate the workspaces of the backend elr_ext.backends.planned_backend
  names (`workspaces` has the table), and torch.utils.flop_counter formulas count the FLOPs of the
  fused algorithm (next to each fake kernel).
- the convolution adapter, a composite of these ops, is elr_ext/ops/kron_lora_conv2d.py.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch
from torch.utils.flop_counter import register_flop_formula

from .. import backends, reference
from .._autocast import autocast_cast, autocast_dtype
from .._checks import check_same_dtype_device, check_tensor
from ..backends import Workspace, acc_values, align256, byte_workspace


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


# ------------------------------------------------------------- planning: what each backend allocates
def workspaces(op: str, *args, backend: str | None = None, **kwargs) -> list:
    """The transient tensors `backend` (default: backends.current_planned_backend()) allocates for one
    call of elr_ext::<op> with these arguments besides the outputs, as the list of those alive
    together at the wrapper's peak (the fake kernels allocate them beside the outputs). M tokens,
    R = T*r, "dtype" x's (A's) dtype, acc the accumulation type (fp32; fp64 for fp64):

    kron_lora_forward
      cuda fused     none: tmat / smat stay on chip (saved ones are outputs)
      cuda GEMM      tmat [M*a2, R], smat [M*a1, R] in dtype; when saved they replace the [M, ...]
                     outputs allocated first, so both pairs are alive at the peak
      cpu            per task: tmat and smat block rows, mb*(a1 + a2)*R acc, plus acc copies of the
                     block's x and y rows (mb*(d_in + d_out)) for fp16/bf16; mb = 256 // max(a1, a2)
                     tokens, one task per thread (backends.cpu_parallel_tasks)
      triton         none; factors outside its fused path run on cuda, as the dispatcher would
    kron_lora_backward (output_mask = dx, dA, dU, dV, dweight, dbias)
      cuda fused     smat [M*a1, R] (dU and none saved), dt [M*a2, R] (dV) in dtype, and when dA the
                     byte workspace align256(blocks*T*a1*a2*sizeof(acc)) of kron_lora.cuh, blocks
                     = ceil(M / bm) of make_fused_plan (bm: the token tile for the planned SM count)
      cuda GEMM      tmat [M*a2, R] (recomputed for dA, or for dU without a saved smat), smat
                     [M*a1, R] (dU, none saved), ds [M*a1, R]; then the larger of the term-major
                     copies of ds and tmat ([T, a1, M*r] + [T, a2, M*r], dA) and dt [M*a2, R] (dx or dV)
      cpu            the partial sums of the token chunks, chunks * (R*b1 [dU] + R*b2 [dV] +
                     a1*a2*R [dA]) acc, and per task the block rows of tmat, smat, ds, dt that the
                     mask needs (mb*a2*R or mb*a1*R acc each) plus acc copies of x, dy, dx rows for
                     fp16/bf16
      triton         tmat, smat [M, a2|a1, R] in dtype (recomputed), dt [M, a2, R] acc (dx or dV),
                     dA partials [ceil(M/16), a2, a1, R] acc (dA), then the larger split-K partials
                     [splits, R, b1] (dU) or [splits, R, b2] (dV) acc
    kron_delta        cuda: byte workspace align256(T*b1*b2*sizeof(acc)) (B_t = U_t V_t);
                      cpu: B [T, b1, b2] acc; triton: the cuda kernels (it has none)
    kron_delta_backward  cuda: twice kron_delta's byte workspace (B and dB); cpu: one [T, b1, b2] acc
                      (B for dA, then dB for dU / dV); triton: cuda
    torch (every op)  the reference's intermediates, measured by running it (backends.transient_peak)

    Left out, named here: copies of the factors (U_cat of the GEMM path, the CPU kernels' acc and
    rearranged copies of A, U, V: a few times the factors' size), the weight-sized fp32 results of
    the dU / dV / dA GEMMs and reductions, and per-task buffers of O(b2) values. Under symbolic sizes
    (torch.compile with dynamic shapes) the list is empty: computing it would guard on the shapes."""
    backend = backend or backends.current_planned_backend()
    if backends.has_symbolic_sizes(args + tuple(kwargs.values())):
        return []
    return [w for w in _WORKSPACES[op](backend, *args, **kwargs) if w.nbytes > 0]


_MEASURED = "reference intermediates"  # the torch backend's workspace, measured


def _dims(x_shape, A_shape, U_shape, V_shape):
    """(M, T, a1, a2, b1, b2, r) of a call."""
    T, a1, a2 = A_shape
    return x_shape[0], T, a1, a2, U_shape[1], V_shape[2], U_shape[2]


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def _if(condition, *workspaces) -> list:
    return list(workspaces) if condition else []


def _cuda_tile_fits(T, a1, a2, R, bm, acc_bytes) -> bool:
    """fused_plan_fits(fused_plan_for<T>(s, bm)) of csrc/kernels/kron_lora.cuh: the tile's 4x4
    micro-tiles within 256 threads and its shared memory within 48 KiB."""
    rp = _round_up(R, 4)
    rows_in, rows_out = _round_up(bm * a2, 4), _round_up(bm * a1, 4)
    stage = max(16 * (max(rows_in, rows_out) + rp), 2048)
    values = (_round_up(rows_in * (rp + 1), 4) + _round_up(rows_out * (rp + 1), 4) + stage
              + _round_up(T * ((a1 * a2) | 1), 4))
    return max(rows_in, rows_out) // 4 * (rp // 4) <= 256 and values * acc_bytes <= 48 * 1024


def _cuda_fused_blocks(M, T, a1, a2, r, dtype, sm_count):
    """The token tiles of the fused CUDA kernels (make_fused_plan), or None where kron_fused_supported
    is false and the wrapper takes the batched-GEMM path."""
    R, acc_bytes = T * r, backends.acc_bytes(dtype)
    if R > 128 or max(a1, a2) > 32 or T * a1 * a2 > 48 * 1024:  # fused_shape_ok
        return None
    if not _cuda_tile_fits(T, a1, a2, R, 1, acc_bytes):
        return None
    largest = min(max(1, 64 // max(a1, a2)), max(1, M // (2 * sm_count)))
    bm = next(bm for bm in range(largest, 0, -1) if _cuda_tile_fits(T, a1, a2, R, bm, acc_bytes))
    return -(-M // bm)


def _triton_takes(A, U) -> bool:
    """Whether the Triton backend's fused kernels take these factors (it is not a candidate otherwise)."""
    if importlib.util.find_spec("triton") is None:
        return False
    from ..triton import kron_lora as triton_kron

    return triton_kron.supported(A, U)


def _forward_cuda_workspaces(x, A, U, V):
    M, T, a1, a2, _, _, r = _dims(x.shape, A.shape, U.shape, V.shape)
    if M == 0 or _cuda_fused_blocks(M, T, a1, a2, r, x.dtype, backends.planned_sm_count()) is not None:
        return []
    return [Workspace("tmat", (M * a2, T * r), x.dtype), Workspace("smat", (M * a1, T * r), x.dtype)]


def _cpu_block_tokens(M, a1, a2) -> int:
    """block_tokens of csrc/kernels/kron_lora.h: about kBlockRows = 256 rows of X and of Y."""
    return min(max(256 // max(a1, a2), 1), max(M, 1))


def _forward_cpu_workspaces(x, A, U, V):
    M, T, a1, a2, b1, b2, r = _dims(x.shape, A.shape, U.shape, V.shape)
    if M == 0:
        return []
    mb, width = _cpu_block_tokens(M, a1, a2), a2 * b2 + a1 * b1
    converted = 0 if x.dtype in (torch.float32, torch.float64) else mb * width
    tasks = backends.cpu_parallel_tasks(-(-M // mb), M * width)
    return [acc_values("block buffers of every task", tasks * (converted + mb * (a1 + a2) * T * r), x.dtype)]


def _forward_workspaces(backend, x, A, U, V, weight, bias, scale, save_intermediates):
    if backend == "torch":
        return backends.transient_peak(_MEASURED, _forward_torch, x, A, U, V, weight, bias, scale,
                                       save_intermediates)
    if backend == "cpu":
        return _forward_cpu_workspaces(x, A, U, V)
    if backend == "triton" and _triton_takes(A, U):
        return []
    return _forward_cuda_workspaces(x, A, U, V)


def _backward_cuda_workspaces(x, A, U, V, tmat, smat, mask):
    M, T, a1, a2, _, _, r = _dims(x.shape, A.shape, U.shape, V.shape)
    dx, dA, dU, dV = mask[:4]
    R, dtype, recompute_s = T * r, x.dtype, dU and smat.numel() == 0
    blocks = _cuda_fused_blocks(M, T, a1, a2, r, dtype, backends.planned_sm_count())
    if blocks is not None:
        partials = align256(blocks * T * a1 * a2 * backends.acc_bytes(dtype))
        return (_if(recompute_s, Workspace("smat", (M * a1, R), dtype))
                + _if(dV, Workspace("dt", (M * a2, R), dtype))
                + _if(dA, byte_workspace("dA partials", partials)))
    recompute_t = (dA or recompute_s) and tmat.numel() == 0
    base = (_if(recompute_t, Workspace("tmat", (M * a2, R), dtype))
            + _if(recompute_s, Workspace("smat", (M * a1, R), dtype)) + [Workspace("ds", (M * a1, R), dtype)])
    term_major = _if(dA, Workspace("ds, term-major", (T, a1, M * r), dtype),
                     Workspace("tmat, term-major", (T, a2, M * r), dtype))
    return base + backends.larger(term_major, _if(dx or dV, Workspace("dt", (M * a2, R), dtype)))


def _backward_cpu_workspaces(x, A, U, V, tmat, smat, mask):
    """csrc/kernels/kron_lora.h: backward_needs, backward_chunks and BackwardPass::scratch."""
    M, T, a1, a2, b1, b2, r = _dims(x.shape, A.shape, U.shape, V.shape)
    dx, dA, dU, dV = mask[:4]
    R, d_in, d_out = T * r, a2 * b2, a1 * b1
    need_ds, need_dt, need_t = dx or dA or dV, dx or dV, dA or (dU and smat.numel() == 0)
    need_x = dV or (need_t and tmat.numel() == 0)
    mb, n_part = _cpu_block_tokens(M, a1, a2), R * b1 * dU + R * b2 * dV + a1 * a2 * R * dA
    blocks = -(-M // mb)
    most = min(max(min(blocks // 2, (1 << 21) // max(n_part, 1)), 1), 64)
    chunks = -(-M // (-(-blocks // most) * mb))
    converted = x.dtype not in (torch.float32, torch.float64)
    rank_rows = mb * R * (a2 * (need_t + need_dt) + a1 * (dU + need_ds))
    per_task = rank_rows + (mb * d_in * (need_x + dx) + mb * d_out) * converted
    tasks = backends.cpu_parallel_tasks(chunks, M * (d_in + d_out))
    return [acc_values("chunk partial sums", chunks * n_part, x.dtype),
            acc_values("block buffers of every task", tasks * per_task, x.dtype)]


def _triton_split_partials(name, rows, R, ncol, dtype):
    """The [splits, R, ncol] partials of elr_ext/triton/kron_lora.py: _rank_grad_call, with _splits'
    rule for a GPU of the planned SM count."""
    tiles = -(-R // 64) * -(-ncol // 64)
    splits = max(1, min(-(-4 * backends.planned_sm_count() // tiles), -(-rows // 256), 64))
    return acc_values(name, -(-rows // -(-rows // splits)) * R * ncol, dtype)


def _backward_triton_workspaces(x, A, U, V, tmat, smat, mask):
    M, T, a1, a2, b1, b2, r = _dims(x.shape, A.shape, U.shape, V.shape)
    dx, dA, dU, dV = mask[:4]
    R, dtype = T * r, x.dtype
    recompute = (dA and tmat.numel() == 0) or (dU and smat.numel() == 0)
    base = (_if(recompute, Workspace("tmat", (M, a2, R), dtype), Workspace("smat", (M, a1, R), dtype))
            + _if(dx or dV, acc_values("dt", M * a2 * R, dtype))
            + _if(dA, acc_values("dA partials", -(-M // 16) * a2 * a1 * R, dtype))
            + _if(dx or dA or dV, acc_values("stand-in pointer", 1, dtype)))
    return base + backends.larger(_if(dU, _triton_split_partials("dU partials", M * a1, R, b1, dtype)),
                                  _if(dV, _triton_split_partials("dV partials", M * a2, R, b2, dtype)))


def _backward_workspaces(backend, grad_y, x, A, U, V, tmat, smat, weight, scale, output_mask):
    if backend == "torch":
        return backends.transient_peak(_MEASURED, _backward_torch, grad_y, x, A, U, V, tmat, smat, weight,
                                       scale, output_mask)
    if x.shape[0] == 0 or not any(output_mask[:4]):  # every wrapper returns before the kernels
        return []
    if backend == "cpu":
        return _backward_cpu_workspaces(x, A, U, V, tmat, smat, output_mask)
    if backend == "triton" and _triton_takes(A, U):
        return _backward_triton_workspaces(x, A, U, V, tmat, smat, output_mask)
    return _backward_cuda_workspaces(x, A, U, V, tmat, smat, output_mask)


def _delta_products(backend, A, U, V, cuda_copies: int):
    """B_t = U_t V_t [T, b1, b2] in acc: on CUDA one byte workspace of `cuda_copies` of them (B, and
    dB in the backward); on the CPU one vector (the backward frees B before it builds dB)."""
    values = A.shape[0] * U.shape[1] * V.shape[2]
    if backend == "cpu":
        return [acc_values("B or dB", values, A.dtype)]
    return [byte_workspace("B, dB", cuda_copies * align256(values * backends.acc_bytes(A.dtype)))]


def _delta_workspaces(backend, A, U, V):
    if backend == "torch":
        return backends.transient_peak(_MEASURED, _delta_torch, A, U, V)
    return _delta_products(backend, A, U, V, cuda_copies=1)


def _delta_backward_workspaces(backend, grad, A, U, V, output_mask):
    if backend == "torch":
        return backends.transient_peak(_MEASURED, _delta_backward_torch, grad, A, U, V, output_mask)
    return _delta_products(backend, A, U, V, cuda_copies=2) if any(output_mask) else []


_WORKSPACES = {"kron_lora_forward": _forward_workspaces, "kron_lora_backward": _backward_workspaces,
               "kron_delta": _delta_workspaces, "kron_delta_backward": _delta_backward_workspaces}
PLAN_WORKSPACES = backends.tracker_hooks(workspaces, _WORKSPACES)


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
def _forward_fake(x, A, U, V, weight, bias, scale, save_intermediates):
    # the planned backend's workspaces (sized first: the torch backend's are measured by running it),
    # then the outputs, then the workspaces alive beside them and freed, as the wrappers do
    scratch = workspaces("kron_lora_forward", x, A, U, V, weight, bias, scale, save_intermediates)
    T, a1, a2 = A.shape
    b1, r = U.shape[1], U.shape[2]
    # the saved intermediates are empty ([0, ...]) when autograd will not need them
    M = x.shape[0] if save_intermediates else 0
    out = x.new_empty((x.shape[0], a1 * b1)), x.new_empty((M, a2, T * r)), x.new_empty((M, a1, T * r))
    backends.allocate(scratch, x.device)
    return out


@register_flop_formula(torch.ops.elr_ext.kron_lora_forward)
def _forward_flops(x_shape, A_shape, U_shape, V_shape, weight_shape, *_, **__) -> int:
    """2 per multiply-add of the fused algorithm, per token: tmat = X V_cat^T (d_in*R), the A-mixing
    smat = A tmat (a1*a2*R), y += scale * smat U_cat (d_out*R), and the base x W^T (d_in*d_out) when
    there is a weight. dW is never built."""
    M, T, a1, a2, b1, b2, r = _dims(x_shape, A_shape, U_shape, V_shape)
    d_in, d_out, R = a2 * b2, a1 * b1, T * r
    base = d_in * d_out if weight_shape is not None else 0
    return 2 * M * (R * (d_in + a1 * a2 + d_out) + base)


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
def _backward_fake(grad_y, x, A, U, V, tmat, smat, weight, scale, output_mask):
    scratch = workspaces("kron_lora_backward", grad_y, x, A, U, V, tmat, smat, weight, scale, output_mask)
    shapes = (x, A, U, V, weight, grad_y[0])
    out = tuple(torch.empty_like(t) if need and t is not None else x.new_empty(0)
                for t, need in zip(shapes, output_mask))
    backends.allocate(scratch, x.device)
    return out


@register_flop_formula(torch.ops.elr_ext.kron_lora_backward)
def _backward_flops(grad_y_shape, x_shape, A_shape, U_shape, V_shape, tmat_shape, smat_shape, weight_shape,
                    scale, output_mask, *_, **__) -> int:
    """2 per multiply-add of the fused backward (kron_lora_common.h; the CPU kernels' backward_needs),
    per token, for the gradients output_mask asks for: tmat = X V_cat^T again (d_in*R, for dA or for
    dU without a saved smat, unless tmat was saved), smat = A tmat again (a1*a2*R, dU without a saved
    smat), dU += smat^T dY (d_out*R), ds = scale * dY U_cat^T (d_out*R, for dx, dA, dV),
    dA += ds tmat (a1*a2*R), dt = A^T ds (a1*a2*R, for dx, dV), dV += dt^T X and dx += dt V_cat
    (d_in*R each), and the base grad_y W (dx with a weight) and grad_y^T x (dweight), d_in*d_out
    each. (The CUDA batched-GEMM path of large factors also forms ds for a dU-only call.)"""
    M, T, a1, a2, b1, b2, r = _dims(x_shape, A_shape, U_shape, V_shape)
    d_in, d_out, R, mix = a2 * b2, a1 * b1, T * r, a1 * a2 * T * r
    dx, dA, dU, dV, dweight = (bool(m) for m in output_mask[:5])
    has_t, has_s = tmat_shape[0] > 0, smat_shape[0] > 0
    recompute_t = (dA or (dU and not has_s)) and not has_t
    macs = (d_in * R * recompute_t + mix * (dU and not has_s) + d_out * R * dU + d_out * R * (dx or dA or dV)
            + mix * dA + mix * (dx or dV) + d_in * R * (dV + dx)
            + d_in * d_out * ((dx and weight_shape is not None) + dweight))
    return 2 * M * macs


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
def _delta_fake(A, U, V):
    scratch = workspaces("kron_delta", A, U, V)
    out = A.new_empty((A.shape[1] * U.shape[1], A.shape[2] * V.shape[2]))
    backends.allocate(scratch, A.device)
    return out


@register_flop_formula(torch.ops.elr_ext.kron_delta)
def _delta_flops(A_shape, U_shape, V_shape, *_, **__) -> int:
    """2 per multiply-add: B_t = U_t V_t (T*b1*r*b2), then every dW element sums T terms
    A[t,i,p] B[t,k,q] (T*d_out*d_in)."""
    T, a1, a2 = A_shape
    b1, r, b2 = U_shape[1], U_shape[2], V_shape[2]
    return 2 * T * b1 * b2 * (r + a1 * a2)


@torch.library.custom_op("elr_ext::kron_delta_backward", mutates_args=())
def kron_delta_backward(
    grad: torch.Tensor, A: torch.Tensor, U: torch.Tensor, V: torch.Tensor, output_mask: list[bool]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dA, dU, dV) of kron_delta, in input order; an empty tensor where output_mask is False."""
    backward = _DELTA_BACKWARD[backends.choose("kron_lora", "kron_delta_backward", A, triton=False)]
    grads = backward(grad, A, U, V, output_mask)
    return tuple(g if g is not None else A.new_empty(0) for g in grads)


@kron_delta_backward.register_fake
def _delta_backward_fake(grad, A, U, V, output_mask):
    scratch = workspaces("kron_delta_backward", grad, A, U, V, output_mask)
    out = tuple(torch.empty_like(t) if need else A.new_empty(0) for t, need in zip((A, U, V), output_mask))
    backends.allocate(scratch, A.device)
    return out


@register_flop_formula(torch.ops.elr_ext.kron_delta_backward)
def _delta_backward_flops(grad_shape, A_shape, U_shape, V_shape, output_mask, *_, **__) -> int:
    """2 per multiply-add, for the gradients output_mask asks for: dA through B = U V (T*b1*r*b2)
    and dA[t,i,p] = sum_{k,q} grad B (T*a1*a2*b1*b2); dU and dV through dB[t,k,q] = sum_{i,p} grad A
    (T*a1*a2*b1*b2, once for both), then dU = dB V^T and dV = U^T dB (T*b1*b2*r each)."""
    T, a1, a2 = A_shape
    b1, r, b2 = U_shape[1], U_shape[2], V_shape[2]
    dA, dU, dV = (bool(m) for m in output_mask)
    product, expand = T * b1 * b2 * r, T * a1 * a2 * b1 * b2
    return 2 * ((product + expand) * dA + expand * (dU or dV) + product * (dU + dV))


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
