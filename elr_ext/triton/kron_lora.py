"""Kronecker LoRA GEMM (eq. 9) in Triton: the fused small-factor path of the `triton` backend of
elr_ext/ops/kron_lora.py.

    forward(x, A, U, V, weight, bias, scale, save)  -> y, tmat, smat
    backward(grad_y, x, A, U, V, tmat, smat, weight, scale, needs) -> dx, dA, dU, dV, dweight, dbias

Index conventions are csrc/kernels/kron_lora_common.h's: rank column j = t * r + s over all T * r
(term, rank) pairs, X_m = x_m viewed [a2, b2], tmat [M, a2, T*r], smat [M, a1, T*r],
V_cat[j, q] = V[t, s, q], U_cat[j, k] = U[t, k, s].

Forward. The base x W^T + bias is one cuBLAS call (torch.addmm); one kernel then adds the Kronecker
term onto y in place. A program owns BM tokens, every rank column and an i-block of BI of the a1
rows: for each p < a2 it computes tmat_p = X[:, p, :] V_cat^T ([BM, b2] x [b2, T*r] on the tensor
cores), rounds it to x's dtype as a stored tmat would be, and mixes it into smat[m, i, j] +=
A[t_j, i, p] tmat_p[m, j] (registers, [BM, BI, T*r]); smat is rounded the same way, and
y[m, i*b1 + k] += scale * smat U_cat ([BM*BI, T*r] x [T*r, b1]). When BI < a1 each i-block
recomputes tmat (x comes from L2 the second time). So tmat and smat never leave the chip unless
autograd saves them, and the returned ones are the values the forward used (a backward that
recomputes them gets the same bits).

Backward. One kernel per BM tokens, looping over the i-blocks: ds = scale * dY_i U_cat^T (on chip,
fp32), dt_p += sum_{i in block} A[t, i, p] ds[:, i, :] for each p (summed over the i-blocks in the
fp32 dt buffer, in a fixed order; on chip when one i-block covers a1), dx (+)= dt_p V_cat after the
last i-block (onto the base dy W from cuBLAS), and the block's partial dA[t, i, p] = sum_{m, s} ds
tmat_p (written per block and summed in a fixed order: no atomics, the same bits every run). The
weight gradients are long-K reductions over tokens: dU_cat = scale * smat^T dY and dV_cat = dt^T X
run as a split-K kernel with a fixed split count and a fixed-order sum of the partials.

Registers. The i-block BI and the token block BM are chosen per configuration so that the register
tiles fit a per-thread budget (TILE_BUDGET below; docs/triton.md), which keeps every configuration
the autotuner may pick free of spills (tests/test_triton_aot.py compiles them all for sm_80 and
sm_90 at SD shapes). Shapes outside the fused path (more than 128 rank columns, more than 1024
mixing values per token, or no configuration within the budget, e.g. fp32 at 128 rank columns)
return False from `supported`; elr_ext/ops/kron_lora.py then uses the reference, which is cuBLAS
batched GEMMs through torch.einsum.

Precision: fp32 accumulation (fp64 for fp64); tl.dot on fp32 data uses IEEE fp32 unless torch allows
TF32 (elr_ext.triton.dot_precision). Triton 3.8's interpreter multiplies bf16 operands of tl.dot as
raw integers, so when interpreting, bf16 operands are converted to fp32 before each tl.dot: same
tiling and indexing, exact products either way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import accumulation_dtype
from . import (INTERPRETED, cast_rn, check_device, configs, dot_precision, gpu_config, launch, num_sms,
               tl_accumulation_dtype)

MAX_RANK_COLS = 128  # T * r
MAX_TOKEN_TILE = 1024  # next_pow2(a1) * next_pow2(T * r): the mixing values of one token

# The token kernels (forward, backward) hold a [BM, BI, T*r] mixing tile (BM tokens, BI of the a1
# rows i) in registers, beside per-token [BM, T*r] products and [BM, BK] operand tiles. Registers
# are per thread, so the budget is too: `tile_values` counts fp32 values per thread, and a
# configuration may hold at most TILE_BUDGET of them for its kernel and for the units its dots run
# on (tensor cores for fp16 / bf16 / TF32; FMA units for IEEE fp32, operand fragments in
# registers; fp64 gets half the FMA budget, two registers a value). The numbers come from ptxas
# (-v, sm_80 and sm_90) at SD shapes: within them every configuration compiled without spilling,
# at most 236 registers; tests/test_triton_aot.py checks every configuration kept, and
# docs/triton.md has the measurements.
TILE_BUDGET = {("forward", "tensor"): 64, ("forward", "fma"): 24,
               ("backward", "tensor"): 32, ("backward", "fma"): 14}


def supported(A: torch.Tensor, U: torch.Tensor) -> bool:
    """Whether the fused kernels take these factors (else the caller uses the reference): at most
    MAX_RANK_COLS rank columns and MAX_TOKEN_TILE mixing values per token, and a configuration
    within both kernels' register budgets for A's dtype (IEEE precision assumed for fp32)."""
    T, a1, _ = A.shape
    rank_cols = T * U.shape[2]
    if rank_cols > MAX_RANK_COLS or _pow2_small(a1) * _pow2(rank_cols) > MAX_TOKEN_TILE:
        return False
    r_p, bk = _pow2(rank_cols), 16 if A.dtype in (torch.float32, torch.float64) else 32
    smallest = min(tile_values(c, r_p, bk) for c in _TOKEN_GPU_CONFIGS)
    return all(smallest <= tile_budget(kernel, A.dtype, "ieee") for kernel in ("forward", "backward"))


def _pow2(v: int) -> int:
    return max(16, triton.next_power_of_2(v))


def _pow2_small(v: int) -> int:
    return triton.next_power_of_2(max(v, 1))


def tile_values(config, r_p: int, bk: int) -> int:
    """Register footprint of a token-kernel configuration, in fp32 values per thread: the
    [BM, BI, R_P] mixing tile, two [BM, R_P] per-token products, a [BM, BK] operand tile."""
    bm, bi = config.kwargs["BM"], config.kwargs["BI"]
    return bm * ((bi + 2) * r_p + bk) // (32 * config.num_warps)


def tile_budget(kernel: str, dtype: torch.dtype, prec: str) -> int:
    """TILE_BUDGET for a call of this dtype (and fp32 dot precision); fp64 values take two registers."""
    if dtype == torch.float64:
        return TILE_BUDGET[(kernel, "fma")] // 2
    units = "fma" if dtype == torch.float32 and prec != "tf32" else "tensor"
    return TILE_BUDGET[(kernel, units)]


def _prune_tiles(tiles, named_args, **kwargs):
    """Per (BM, warps, stages): the configuration with the largest i-block BI that fits the
    per-thread budget (none beyond next_pow2(a1): more rows would be masked). `supported` takes
    only shapes that the smallest footprint (BM = 16, BI = 1, 8 warps) fits."""
    args = {**named_args, **kwargs}
    io = args["x_ptr"] if "x_ptr" in args else args["dy_ptr"]
    budget = tile_budget("forward" if "x_ptr" in args else "backward", io.dtype, args["PREC"])
    a1_p, r_p, bk = _pow2_small(args["a1"]), args["R_P"], args["BK"]
    best = {}
    for c in tiles:
        base = (c.kwargs["BM"], c.num_warps, c.num_stages)
        if c.kwargs["BI"] <= a1_p and tile_values(c, r_p, bk) <= budget:
            if base not in best or c.kwargs["BI"] > best[base].kwargs["BI"]:
                best[base] = c
    return list(best.values()) or [min(tiles, key=lambda c: tile_values(c, r_p, bk))]


# (BM, num_warps, num_stages) x the i-block BI; _prune_tiles keeps one BI per row. Large token
# blocks for small tiles (the paper's factors, a1 = n <= 8), and BM = 16 on 8 warps, the smallest
# footprint, for the largest ones (a1 * T*r up to MAX_TOKEN_TILE).
_TOKEN_GPU_CONFIGS = [gpu_config({"BM": bm, "BI": bi}, w, s)
                      for bm, w, s in ((16, 4, 2), (32, 4, 3), (16, 8, 2), (64, 8, 3), (128, 8, 3))
                      for bi in (1, 2, 4, 8, 16, 32)]


def _token_configs():
    return configs(_TOKEN_GPU_CONFIGS, triton.Config({"BM": 16, "BI": 2}, num_warps=1))


_COLS = tl.constexpr(16)  # output columns per step of the y and dx products


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:  # the interpreter's tl.dot mishandles bf16 operands
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


# ------------------------------------------------------------------------------------ forward
# Addressing in the token kernels: one 64-bit base pointer per block of BM tokens, 32-bit offsets
# inside it (_check_offsets bounds them). A tile of 64-bit pointers costs two registers per element.
# The what-to-compute flags are runtime arguments (one compiled kernel serves the forward and the
# backward's recompute, and one every gradient mask), unspecialised so that 1 does not become a
# constant either; the kernel's registers are then those of all flags on.
@triton.autotune(configs=_token_configs(), key=["M", "a1", "a2", "b1", "b2", "R_P", "PREC"],
                 restore_value=["y_ptr"], prune_configs_by={"early_config_prune": _prune_tiles})
@triton.jit(do_not_specialize=["write_y", "accumulate", "save"])
def _forward_kernel(
    x_ptr, A_ptr, U_ptr, V_ptr, y_ptr, tmat_ptr, smat_ptr,
    M, T, a1, a2, b1, b2, r, scale, write_y, accumulate, save,
    ACC_TY: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, R_P: tl.constexpr,
    BM: tl.constexpr, BI: tl.constexpr, BK: tl.constexpr,
):
    """Program (token block, i-block): rows i0 <= i < i0 + BI of smat and of y for BM tokens. Every
    i-block of a token block computes its tmat (the x V_cat^T product: once when BI covers a1,
    cdiv(a1, BI) times otherwise, x then read from L2); the first one stores it when saving."""
    pid = tl.program_id(0)
    pid_i = tl.program_id(1)
    io_ty = x_ptr.dtype.element_ty
    R = T * r
    d_in = a2 * b2
    d_out = a1 * b1
    row0 = pid.to(tl.int64) * BM
    ms = tl.arange(0, BM)
    m_ok = ms < M - pid * BM
    js = tl.arange(0, R_P)
    j_ok = js < R
    tj = js // r
    sj = js - tj * r
    i_s = pid_i * BI + tl.arange(0, BI)
    i_ok = i_s < a1
    x_blk = x_ptr + row0 * d_in
    tmat_blk = tmat_ptr + row0 * (a2 * R)

    smat = tl.zeros([BM, BI, R_P], ACC_TY)
    for p in range(0, a2):
        tm = tl.zeros([BM, R_P], ACC_TY)
        for q0 in range(0, b2, BK):
            qs = q0 + tl.arange(0, BK)
            q_ok = qs < b2
            xt = tl.load(x_blk + ms[:, None] * d_in + (p * b2 + qs)[None, :],
                         mask=m_ok[:, None] & q_ok[None, :], other=0.0)
            vt = tl.load(V_ptr + js[None, :] * b2 + qs[:, None],
                         mask=q_ok[:, None] & j_ok[None, :], other=0.0)
            tm = _dot(xt, vt, tm, PREC, UPCAST)
        tm = cast_rn(tm, io_ty).to(ACC_TY)  # rounded where the unfused path stores tmat
        if (save != 0) & (pid_i == 0):
                tl.store(tmat_blk + (ms[:, None] * a2 + p) * R + js[None, :], tm.to(io_ty),
                         mask=m_ok[:, None] & j_ok[None, :])
        a_p = tl.load(A_ptr + tj[None, :] * (a1 * a2) + i_s[:, None] * a2 + p,
                      mask=i_ok[:, None] & j_ok[None, :], other=0.0).to(ACC_TY)
        smat += tm[:, None, :] * a_p[None, :, :]
    # rows (m, i) of the block, [BM * BI, R_P]: the saved smat and the left operand of the y product
    s2 = tl.reshape(cast_rn(smat, io_ty), [BM * BI, R_P])  # rounded where the unfused path stores smat
    rows = tl.arange(0, BM * BI)
    rm = rows // BI
    ri = pid_i * BI + rows % BI
    row_ok = (rm < M - pid * BM) & (ri < a1)
    if save != 0:
        tl.store(smat_ptr + row0 * (a1 * R) + (rm * a1 + ri)[:, None] * R + js[None, :], s2,
                 mask=row_ok[:, None] & j_ok[None, :])

    if write_y != 0:  # y[m, i*b1 + k] (+)= scale * sum_j smat[m, i, j] U_cat[j, k]
        y_blk = y_ptr + row0 * d_out
        row_off = rm * d_out + ri * b1
        for k0 in range(0, b1, _COLS):
            ks = k0 + tl.arange(0, _COLS)
            k_ok = ks < b1
            ut = tl.load(U_ptr + tj[:, None] * (b1 * r) + ks[None, :] * r + sj[:, None],
                         mask=j_ok[:, None] & k_ok[None, :], other=0.0)
            yk = _dot(s2, ut, tl.zeros([BM * BI, _COLS], ACC_TY), PREC, UPCAST) * scale
            mask = row_ok[:, None] & k_ok[None, :]
            y_at = y_blk + row_off[:, None] + ks[None, :]
            if accumulate != 0:
                yk += tl.load(y_at, mask=mask, other=0.0).to(ACC_TY)
            tl.store(y_at, cast_rn(yk, io_ty), mask=mask)


# ------------------------------------------------------------------------------------ backward
@triton.autotune(configs=_token_configs(), key=["M", "a1", "a2", "b1", "b2", "R_P", "PREC"],
                 restore_value=["dx_ptr"], prune_configs_by={"early_config_prune": _prune_tiles})
@triton.jit(do_not_specialize=["need_dx", "accumulate_dx", "need_dt", "need_da"])
def _backward_kernel(
    dy_ptr, A_ptr, U_ptr, V_ptr, tmat_ptr, dx_ptr, dt_ptr, dA_part_ptr,
    M, T, a1, a2, b1, b2, r, scale, need_dx, accumulate_dx, need_dt, need_da,
    ACC_TY: tl.constexpr, PREC: tl.constexpr, PREC_ACC: tl.constexpr, UPCAST: tl.constexpr,
    R_P: tl.constexpr,
    BM: tl.constexpr, BI: tl.constexpr, BK: tl.constexpr,
):
    """Per i-block of BI rows: ds = scale dY_i U_cat^T, and per p: dt_p += A_p,i^T ds and
    dA_part[pid, p, i] = ds^T tmat_p (per rank column; the host sums the blocks and the ranks of
    each term). dt sums its i-blocks in place in the fp32 dt buffer (a fixed order: the same bits
    every run); after the last one, dx (+)= dt_p V_cat. One i-block (a1 <= BI) keeps dt on chip."""
    pid = tl.program_id(0)
    io_ty = dy_ptr.dtype.element_ty
    R = T * r
    d_in = a2 * b2
    d_out = a1 * b1
    row0 = pid.to(tl.int64) * BM
    js = tl.arange(0, R_P)
    j_ok = js < R
    tj = js // r
    sj = js - tj * r
    ms = tl.arange(0, BM)
    m_ok = ms < M - pid * BM
    rows = tl.arange(0, BM * BI)  # ds rows (m, i) of an i-block
    rm = rows // BI
    dy_blk = dy_ptr + row0 * d_out
    dx_blk = dx_ptr + row0 * d_in
    tmat_blk = tmat_ptr + row0 * (a2 * R)
    dt_blk = dt_ptr + row0 * (a2 * R)
    part_blk = dA_part_ptr + pid.to(tl.int64) * (a2 * a1 * R)
    dt_off = (ms[:, None] * a2) * R + js[None, :]
    mj_ok = m_ok[:, None] & j_ok[None, :]
    n_iblocks = tl.cdiv(a1, BI)

    for ib in range(0, n_iblocks):
        i_s = ib * BI + tl.arange(0, BI)
        i_ok = i_s < a1
        ri = ib * BI + rows % BI
        row_ok = (rm < M - pid * BM) & (ri < a1)
        row_off = rm * d_out + ri * b1
        ds = tl.zeros([BM * BI, R_P], ACC_TY)
        for k0 in range(0, b1, BK):
            ks = k0 + tl.arange(0, BK)
            k_ok = ks < b1
            dyt = tl.load(dy_blk + row_off[:, None] + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                          other=0.0)
            ut = tl.load(U_ptr + tj[None, :] * (b1 * r) + ks[:, None] * r + sj[None, :],
                         mask=k_ok[:, None] & j_ok[None, :], other=0.0)
            ds = _dot(dyt, ut, ds, PREC, UPCAST)
        ds3 = tl.reshape(ds * scale, [BM, BI, R_P])
        last = ib == n_iblocks - 1  # dt complete: dx can be formed
        for p in range(0, a2):
            if (need_dt != 0) | (need_dx != 0):
                a_p = tl.load(A_ptr + tj[None, :] * (a1 * a2) + i_s[:, None] * a2 + p,
                              mask=i_ok[:, None] & j_ok[None, :], other=0.0).to(ACC_TY)
                dt = tl.sum(ds3 * a_p[None, :, :], axis=1)  # [BM, R_P]
                if ib > 0:
                    dt += tl.load(dt_blk + dt_off + p * R, mask=mj_ok, other=0.0)
                if (need_dt != 0) | (ib < n_iblocks - 1):
                    tl.store(dt_blk + dt_off + p * R, dt, mask=mj_ok)
                if (need_dx != 0) & last:  # dx[m, p*b2 + q] (+)= sum_j dt[m, j] V_cat[j, q]
                    for q0 in range(0, b2, _COLS):
                        qs = q0 + tl.arange(0, _COLS)
                        q_ok = qs < b2
                        vt = tl.load(V_ptr + js[:, None] * b2 + qs[None, :],
                                     mask=j_ok[:, None] & q_ok[None, :], other=0.0).to(ACC_TY)
                        dxq = tl.dot(dt, vt, input_precision=PREC_ACC)
                        mask = m_ok[:, None] & q_ok[None, :]
                        dx_at = dx_blk + ms[:, None] * d_in + (p * b2 + qs)[None, :]
                        if accumulate_dx != 0:
                            dxq += tl.load(dx_at, mask=mask, other=0.0).to(ACC_TY)
                        tl.store(dx_at, cast_rn(dxq, io_ty), mask=mask)
            if need_da != 0:
                tm = tl.load(tmat_blk + dt_off + p * R, mask=mj_ok, other=0.0).to(ACC_TY)
                part = tl.sum(ds3 * tm[:, None, :], axis=0)  # [BI, R_P]
                tl.store(part_blk + (p * a1 + i_s[:, None]) * R + js[None, :], part,
                         mask=i_ok[:, None] & j_ok[None, :])
        # the next i-block reads back dt rows that other threads of this program wrote
        tl.debug_barrier()


# (BJ, BN, BK, num_warps, num_stages) of the rank-gradient reduction: an fp32 accumulator of
# BJ * BN / (32 * num_warps) values per thread, 32 or fewer (fp32 operands multiply on the FMA
# units, their [BJ, BK] and [BK, BN] fragments in registers too).
_RANK_GRAD_GPU_CONFIGS = [gpu_config({"BJ": bj, "BN": bn, "BK": bk}, w, s)
                          for bj, bn, bk, w, s in ((32, 64, 32, 4, 3), (64, 64, 32, 4, 3), (64, 128, 32, 8, 3),
                                                   (128, 64, 32, 8, 3), (32, 128, 32, 4, 3))]


def _rank_grad_configs():
    return configs(_RANK_GRAD_GPU_CONFIGS, triton.Config({"BJ": 16, "BN": 16, "BK": 16}, num_warps=1))


@triton.autotune(configs=_rank_grad_configs(), key=["ROWS", "R", "NCOL", "ROWS_PER_SPLIT"])
@triton.jit
def _rank_grad_kernel(
    p_ptr, q_ptr, out_ptr, ROWS, R, NCOL, ROWS_PER_SPLIT,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
    BJ: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """out[split, j, c] = sum over the split's rows of P[row, j] * Q[row, c] (P [ROWS, R], Q [ROWS, NCOL],
    both row-major; Q is converted to P's dtype)."""
    pid_j = tl.program_id(0)
    pid_c = tl.program_id(1)
    split = tl.program_id(2)
    js = pid_j * BJ + tl.arange(0, BJ)
    cs = pid_c * BN + tl.arange(0, BN)
    j_ok = js < R
    c_ok = cs < NCOL
    lo = split * ROWS_PER_SPLIT
    hi = tl.minimum(lo + ROWS_PER_SPLIT, ROWS)
    acc = tl.zeros([BJ, BN], out_ptr.dtype.element_ty)
    for k0 in range(lo, hi, BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < hi
        k64 = ks.to(tl.int64)
        pt = tl.load(p_ptr + k64[None, :] * R + js[:, None], mask=j_ok[:, None] & k_ok[None, :], other=0.0)
        qt = tl.load(q_ptr + k64[:, None] * NCOL + cs[None, :], mask=k_ok[:, None] & c_ok[None, :], other=0.0)
        acc = _dot(pt, qt.to(pt.dtype), acc, PREC, UPCAST)
    tl.store(out_ptr + (split * R + js[:, None]) * NCOL + cs[None, :], acc,
             mask=j_ok[:, None] & c_ok[None, :])


# ------------------------------------------------------------------------------------ host side
def _shape(A, U, V):
    T, a1, a2 = A.shape
    return T, a1, a2, U.shape[1], V.shape[2], U.shape[2]


def _upcast(dtype: torch.dtype) -> bool:
    return INTERPRETED and dtype == torch.bfloat16


def _reduction_block(dtype: torch.dtype, prec: str) -> int:
    """BK, the reduction step of the token kernels' x V_cat^T and dY U_cat^T products: 16 where the
    dot runs on the FMA units (IEEE fp32, fp64), whose operand fragments sit in registers."""
    fma = dtype == torch.float64 or (dtype == torch.float32 and prec != "tf32")
    return 16 if fma or INTERPRETED else 32


def _check_offsets(*extents: int) -> None:
    """The kernels address a block of tokens with 32-bit offsets (see the forward kernel)."""
    largest_bm = max(c.kwargs["BM"] for c in _TOKEN_GPU_CONFIGS)
    if largest_bm * max(extents) >= 2 ** 31:
        raise ValueError(f"elr_ext.triton.kron_lora: {max(extents)} values per token is beyond the fused "
                         "kernels' 32-bit block offsets")


def _forward_call(x, A, U, V, y, tmat, smat, scale, write_y, accumulate, save):
    """(kernel, grid, args, kwargs) of the forward kernel for these operands."""
    T, a1, a2, b1, b2, r = _shape(A, U, V)
    M = x.shape[0]
    _check_offsets(a2 * b2, a1 * b1, max(a1, a2) * T * r)
    grid = lambda meta: (triton.cdiv(M, meta["BM"]), triton.cdiv(a1, meta["BI"]))  # noqa: E731
    args = (x, A, U, V, y if y is not None else x, tmat if save else x, smat if save else x,
            M, T, a1, a2, b1, b2, r, float(scale), int(write_y), int(accumulate), int(save))
    kwargs = dict(ACC_TY=tl_accumulation_dtype(x.dtype),
                  PREC=dot_precision(x.dtype) if x.dtype == torch.float32 else "ieee",
                  UPCAST=_upcast(x.dtype), R_P=_pow2(T * r))
    kwargs["BK"] = _reduction_block(x.dtype, kwargs["PREC"])
    return _forward_kernel, grid, args, kwargs


def _launch_forward(x, A, U, V, y, tmat, smat, scale, write_y, accumulate, save):
    kernel, grid, args, kwargs = _forward_call(x, A, U, V, y, tmat, smat, scale, write_y, accumulate, save)
    launch(kernel, grid, *args, **kwargs)


def forward(x, A, U, V, weight, bias, scale: float, save: bool):
    """y = x W^T + bias + scale * x dW^T for x [M, d_in] (contiguous), with (tmat, smat) when `save`
    (else empty [0, a2, T*r] / [0, a1, T*r])."""
    check_device("kron_lora", x)
    T, a1, a2, b1, b2, r = _shape(A, U, V)
    M, R = x.shape[0], T * r
    if weight is not None:
        y = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
        accumulate = True
    elif bias is not None:
        y = bias.expand(M, a1 * b1).clone(memory_format=torch.contiguous_format)
        accumulate = True
    else:
        y = x.new_empty((M, a1 * b1))
        accumulate = False
    rows = M if save else 0
    tmat = x.new_empty((rows, a2, R))
    smat = x.new_empty((rows, a1, R))
    y = y.contiguous()
    if M > 0:
        _launch_forward(x, A, U, V, y, tmat, smat, scale, True, accumulate, save)
    return y, tmat, smat


def _splits(rows: int, tiles: int, device: torch.device) -> int:
    """Row splits of a long-K weight-gradient reduction: about four programs per SM, at least 256 rows
    each (32 when interpreting). Depends on the shape and the device's SM count only."""
    min_rows = 32 if device.type == "cpu" else 256
    want = triton.cdiv(4 * num_sms(device), max(tiles, 1))
    return max(1, min(want, triton.cdiv(rows, min_rows), 64))


def _rank_grad_call(P: torch.Tensor, Q: torch.Tensor):
    """(kernel, grid, args, kwargs) of the split-K reduction P^T Q (P [rows, R], Q [rows, n]) into
    its [splits, R, n] partials, allocated here (args[2])."""
    rows, R = P.shape
    ncol = Q.shape[1]
    acc = accumulation_dtype(P.dtype)
    tiles = triton.cdiv(R, 64) * triton.cdiv(ncol, 64)
    splits = _splits(rows, tiles, P.device)
    per_split = triton.cdiv(rows, splits)
    splits = triton.cdiv(rows, per_split)
    out = torch.empty((splits, R, ncol), dtype=acc, device=P.device)
    grid = lambda meta: (triton.cdiv(R, meta["BJ"]), triton.cdiv(ncol, meta["BN"]), splits)  # noqa: E731
    # fp32 / fp64 P (dt, or smat of an fp32 call): Q is converted up to it; half P: a native half dot
    prec = dot_precision(Q.dtype) if accumulation_dtype(P.dtype) == P.dtype else "ieee"
    return _rank_grad_kernel, grid, (P, Q, out, rows, R, ncol, per_split), dict(PREC=prec, UPCAST=_upcast(P.dtype))


def _rank_grad(P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """P^T Q in the accumulation dtype (partials summed in a fixed order)."""
    kernel, grid, args, kwargs = _rank_grad_call(P, Q)
    launch(kernel, grid, *args, **kwargs)
    return args[2].sum(0)


def _backward_call(grad_y, A, U, V, tmat, dx, dt, dA_part, scale, accumulate_dx, need_dt):
    """(kernel, grid, args, kwargs) of the backward kernel; tmat / dx / dA_part None where not
    needed, dt [M, a2, T*r] fp32 whenever dx or dt is (the i-blocks sum dt in it), output when
    `need_dt`."""
    T, a1, a2, b1, b2, r = _shape(A, U, V)
    M, R, dtype = grad_y.shape[0], T * r, grad_y.dtype
    _check_offsets(a2 * b2, a1 * b1, max(a1, a2) * R)
    grid = lambda meta: (triton.cdiv(M, meta["BM"]),)  # noqa: E731
    # never dereferenced stand-ins (their flags are off), of the dtypes of the real ones: one
    # signature, so one compiled kernel, for every gradient mask
    acc_stand_in = grad_y.new_empty(1, dtype=accumulation_dtype(dtype))
    args = (grad_y, A, U, V, tmat if tmat is not None else grad_y, dx if dx is not None else grad_y,
            dt if dt is not None else acc_stand_in, dA_part if dA_part is not None else acc_stand_in,
            M, T, a1, a2, b1, b2, r, float(scale),
            int(dx is not None), int(dx is not None and accumulate_dx), int(need_dt), int(dA_part is not None))
    kwargs = dict(ACC_TY=tl_accumulation_dtype(dtype),
                  PREC=dot_precision(dtype) if dtype == torch.float32 else "ieee", PREC_ACC=dot_precision(dtype),
                  UPCAST=_upcast(dtype), R_P=_pow2(R))
    kwargs["BK"] = _reduction_block(dtype, kwargs["PREC"])
    return _backward_kernel, grid, args, kwargs


def backward(grad_y, x, A, U, V, tmat, smat, weight, scale: float, needs):
    """(dx, dA, dU, dV, dweight, dbias), None where `needs` is False. tmat / smat are the forward's
    (recomputed here, bit for bit, when empty)."""
    check_device("kron_lora", x)
    need_dx, need_dA, need_dU, need_dV, need_dw, need_db = (bool(n) for n in needs)
    T, a1, a2, b1, b2, r = _shape(A, U, V)
    M, R = x.shape[0], T * r
    dtype = x.dtype
    acc = accumulation_dtype(dtype)
    dweight = grad_y.t().mm(x) if need_dw else None
    dbias = grad_y.sum(0) if need_db else None
    dx = None
    if need_dx:
        dx = grad_y.mm(weight) if weight is not None else x.new_empty(x.shape)
        dx = dx.contiguous()
    if M == 0:
        zeros = lambda t, need: torch.zeros_like(t) if need else None  # noqa: E731  sums over no tokens
        return dx, zeros(A, need_dA), zeros(U, need_dU), zeros(V, need_dV), dweight, dbias
    if not (need_dx or need_dA or need_dU or need_dV):
        return dx, None, None, None, dweight, dbias

    have_t, have_s = tmat.numel() > 0, smat.numel() > 0
    if (need_dA and not have_t) or (need_dU and not have_s):  # recompute exactly as the forward did
        tmat, smat = x.new_empty((M, a2, R)), x.new_empty((M, a1, R))
        _launch_forward(x, A, U, V, None, tmat, smat, 1.0, False, False, True)
    tmat = tmat.contiguous() if need_dA else None
    smat = smat.contiguous() if need_dU else None

    dt = torch.empty((M, a2, R), dtype=acc, device=x.device) if need_dV or need_dx else None
    blocks_max = triton.cdiv(M, 16)  # BM >= 16 in every configuration
    dA_part = torch.empty((blocks_max, a2, a1, R), dtype=acc, device=x.device) if need_dA else None
    if need_dx or need_dA or need_dV:
        kernel, grid, args, kwargs = _backward_call(grad_y, A, U, V, tmat, dx, dt, dA_part, scale,
                                                    weight is not None, need_dV)
        launch(kernel, grid, *args, **kwargs)
    dA = dU = dV = None
    if need_dA:  # the blocks of the BM the autotuner chose, summed in a fixed order
        used = triton.cdiv(M, _backward_kernel.best_config.kwargs["BM"])
        part = dA_part[:used].sum(0)  # [a2, a1, R]
        dA = part.view(a2, a1, T, r).sum(-1).permute(2, 1, 0).to(dtype).contiguous()
    if need_dU:  # dU_cat [R, b1] = scale * smat^T dY, U[t, k, s] = U_cat[t*r + s, k]
        du_cat = _rank_grad(smat.view(M * a1, R), grad_y.view(M * a1, b1)) * scale
        dU = du_cat.view(T, r, b1).transpose(1, 2).to(dtype).contiguous()
    if need_dV:  # dV_cat [R, b2] = dt^T X
        dv_cat = _rank_grad(dt.view(M * a2, R), x.view(M * a2, b2))
        dV = dv_cat.view(T, r, b2).to(dtype).contiguous()
    return dx, dA, dU, dV, dweight, dbias
