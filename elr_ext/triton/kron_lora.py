"""Kronecker LoRA GEMM (eq. 9) in Triton: the fused small-factor path of the `triton` backend of
elr_ext/ops/kron_lora.py.

    forward(x, A, U, V, weight, bias, scale, save)  -> y, tmat, smat
    backward(grad_y, x, A, U, V, tmat, smat, weight, scale, needs) -> dx, dA, dU, dV, dweight, dbias

Index conventions are csrc/kernels/kron_lora_common.h's: rank column j = t * r + s over all T * r
(term, rank) pairs, X_m = x_m viewed [a2, b2], tmat [M, a2, T*r], smat [M, a1, T*r],
V_cat[j, q] = V[t, s, q], U_cat[j, k] = U[t, k, s].

Forward. The base x W^T + bias is one cuBLAS call (torch.addmm); one kernel then adds the Kronecker
term onto y in place. A program owns BM tokens and every rank column: for each p < a2 it computes
tmat_p = X[:, p, :] V_cat^T ([BM, b2] x [b2, T*r] on the tensor cores, x read once in all), rounds
it to x's dtype as a stored tmat would be, and mixes it into smat[m, i, j] += A[t_j, i, p] tmat_p[m, j]
(registers, [BM, a1, T*r]); smat is rounded the same way, and y[m, i*b1 + k] += scale * smat U_cat
([BM*a1, T*r] x [T*r, b1]). So tmat and smat never leave the chip unless autograd saves them, and
the returned ones are the values the forward used (a backward that recomputes them gets the same
bits).

Backward. One kernel per BM tokens: ds = scale * dY U_cat^T (on chip, fp32), dt_p = sum_i A[t, i, p]
ds[:, i, :] for each p, dx (+)= dt_p V_cat (onto the base dy W from cuBLAS), and the block's partial
dA[t, i, p] = sum_{m, s} ds tmat_p (written per block and summed in a fixed order: no atomics, the
same bits every run). dt goes to an fp32 workspace when dV is needed. The weight gradients are
long-K reductions over tokens: dU_cat = scale * smat^T dY and dV_cat = dt^T X run as a split-K
kernel with a fixed split count and a fixed-order sum of the partials.

Shapes outside the fused path (more than 128 rank columns, or a1 * T*r too large for the register
tile) return None from `supported`; elr_ext/ops/kron_lora.py then uses the reference, which is
cuBLAS batched GEMMs through torch.einsum.

Precision: fp32 accumulation (fp64 for fp64); tl.dot on fp32 data uses IEEE fp32 unless torch allows
TF32 (elr_ext.triton.dot_precision). Triton 3.8's interpreter multiplies bf16 operands of tl.dot as
raw integers, so when interpreting, bf16 operands are converted to fp32 before each tl.dot: same
tiling and indexing, exact products either way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRETED, cast_rn, check_device, configs, dot_precision, num_sms

MAX_RANK_COLS = 128  # T * r
MAX_MIX_TILE = 1024  # next_pow2(a1) * next_pow2(T * r): the [BM, a1, T*r] register tile per token


def supported(A: torch.Tensor, U: torch.Tensor) -> bool:
    """Whether the fused kernels take these factors (else the caller uses the reference)."""
    T, a1, _ = A.shape
    rank_cols = T * U.shape[2]
    return rank_cols <= MAX_RANK_COLS and _pow2(a1) * _pow2(rank_cols) <= MAX_MIX_TILE


def _pow2(v: int) -> int:
    return max(16, triton.next_power_of_2(v))


def _pow2_small(v: int) -> int:
    return triton.next_power_of_2(max(v, 1))


def _acc_type(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _prune_bm(tiles, named_args, **kwargs):
    """Keep the [BM, a1, T*r] register tile at or under 16K values (and at least one tile)."""
    budget = 16384
    args = {**named_args, **kwargs}  # A1_P and R_P arrive as keywords
    kept = [c for c in tiles if c.kwargs["BM"] * args["A1_P"] * args["R_P"] <= budget]
    return kept or tiles[:1]


def _token_configs():
    gpu = [triton.Config({"BM": bm, "BK": bk}, num_warps=w, num_stages=s)
           for bm, bk, w, s in ((16, 32, 4, 2), (16, 64, 4, 3), (32, 32, 4, 3), (32, 64, 8, 3),
                                (64, 32, 8, 3))]
    return configs(gpu, triton.Config({"BM": 16, "BK": 16}, num_warps=1))


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:  # the interpreter's tl.dot mishandles bf16 operands
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


# ------------------------------------------------------------------------------------ forward
@triton.autotune(configs=_token_configs(), key=["M", "a2", "b1", "b2", "R_P", "A1_P"],
                 restore_value=["y_ptr"], prune_configs_by={"early_config_prune": _prune_bm})
@triton.jit
def _forward_kernel(
    x_ptr, A_ptr, U_ptr, V_ptr, y_ptr, tmat_ptr, smat_ptr,
    M, T, a1, a2, b1, b2, r, scale,
    WRITE_Y: tl.constexpr, ACCUMULATE: tl.constexpr, SAVE: tl.constexpr,
    ACC_TY: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    R_P: tl.constexpr, A1_P: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr,
):
    pid = tl.program_id(0)
    io_ty = x_ptr.dtype.element_ty
    R = T * r
    d_in = a2 * b2
    d_out = a1 * b1
    ms = pid * BM + tl.arange(0, BM)
    m_ok = ms < M
    m64 = ms.to(tl.int64)
    js = tl.arange(0, R_P)
    j_ok = js < R
    tj = js // r
    sj = js - tj * r
    i_s = tl.arange(0, A1_P)
    i_ok = i_s < a1

    smat = tl.zeros([BM, A1_P, R_P], ACC_TY)
    for p in range(0, a2):
        tm = tl.zeros([BM, R_P], ACC_TY)
        for q0 in range(0, b2, BK):
            qs = q0 + tl.arange(0, BK)
            q_ok = qs < b2
            xt = tl.load(x_ptr + m64[:, None] * d_in + p * b2 + qs[None, :],
                         mask=m_ok[:, None] & q_ok[None, :], other=0.0)
            vt = tl.load(V_ptr + js[None, :] * b2 + qs[:, None],
                         mask=q_ok[:, None] & j_ok[None, :], other=0.0)
            tm = _dot(xt, vt, tm, PREC, UPCAST)
        tm = cast_rn(tm, io_ty).to(ACC_TY)  # rounded where the unfused path stores tmat
        if SAVE:
            tl.store(tmat_ptr + (m64[:, None] * a2 + p) * R + js[None, :], tm.to(io_ty),
                     mask=m_ok[:, None] & j_ok[None, :])
        a_p = tl.load(A_ptr + tj[None, :] * (a1 * a2) + i_s[:, None] * a2 + p,
                      mask=i_ok[:, None] & j_ok[None, :], other=0.0).to(ACC_TY)
        smat += tm[:, None, :] * a_p[None, :, :]
    smat_io = cast_rn(smat, io_ty)  # rounded where the unfused path stores smat
    if SAVE:
        off = (m64[:, None, None] * a1 + i_s[None, :, None]) * R + js[None, None, :]
        ok = m_ok[:, None, None] & i_ok[None, :, None] & j_ok[None, None, :]
        tl.store(smat_ptr + off, smat_io, mask=ok)

    if WRITE_Y:  # y[m, i*b1 + k] (+)= scale * sum_j smat[m, i, j] U_cat[j, k]
        s2 = tl.reshape(smat_io, [BM * A1_P, R_P])
        rows = tl.arange(0, BM * A1_P)
        rm = pid * BM + rows // A1_P
        ri = rows % A1_P
        row_ok = (rm < M) & (ri < a1)
        row_off = rm.to(tl.int64) * d_out + ri * b1
        for k0 in range(0, b1, BK):
            ks = k0 + tl.arange(0, BK)
            k_ok = ks < b1
            ut = tl.load(U_ptr + tj[:, None] * (b1 * r) + ks[None, :] * r + sj[:, None],
                         mask=j_ok[:, None] & k_ok[None, :], other=0.0)
            yk = _dot(s2, ut, tl.zeros([BM * A1_P, BK], ACC_TY), PREC, UPCAST) * scale
            mask = row_ok[:, None] & k_ok[None, :]
            y_at = y_ptr + row_off[:, None] + ks[None, :]
            if ACCUMULATE:
                yk += tl.load(y_at, mask=mask, other=0.0).to(ACC_TY)
            tl.store(y_at, cast_rn(yk, io_ty), mask=mask)


# ------------------------------------------------------------------------------------ backward
@triton.autotune(configs=_token_configs(), key=["M", "a2", "b1", "b2", "R_P", "A1_P"],
                 restore_value=["dx_ptr"], prune_configs_by={"early_config_prune": _prune_bm})
@triton.jit
def _backward_kernel(
    dy_ptr, A_ptr, U_ptr, V_ptr, tmat_ptr, dx_ptr, dt_ptr, dA_part_ptr,
    M, T, a1, a2, b1, b2, r, scale,
    NEED_DX: tl.constexpr, ACCUMULATE_DX: tl.constexpr, NEED_DT: tl.constexpr, NEED_DA: tl.constexpr,
    ACC_TY: tl.constexpr, PREC: tl.constexpr, PREC_ACC: tl.constexpr, UPCAST: tl.constexpr,
    R_P: tl.constexpr, A1_P: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr,
):
    """ds = scale dY U_cat^T; per p: dt_p = A_p^T ds, dx (+)= dt_p V_cat, dA_part[pid, p] = ds^T tmat_p
    (per rank column j; the host sums the blocks and the ranks of each term)."""
    pid = tl.program_id(0)
    io_ty = dy_ptr.dtype.element_ty
    R = T * r
    d_in = a2 * b2
    d_out = a1 * b1
    js = tl.arange(0, R_P)
    j_ok = js < R
    tj = js // r
    sj = js - tj * r
    i_s = tl.arange(0, A1_P)
    i_ok = i_s < a1

    # ds rows (m, i) of the block, [BM * A1_P, R_P]
    rows = tl.arange(0, BM * A1_P)
    rm = pid * BM + rows // A1_P
    ri = rows % A1_P
    row_ok = (rm < M) & (ri < a1)
    row_off = rm.to(tl.int64) * d_out + ri * b1
    ds = tl.zeros([BM * A1_P, R_P], ACC_TY)
    for k0 in range(0, b1, BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < b1
        dyt = tl.load(dy_ptr + row_off[:, None] + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                      other=0.0)
        ut = tl.load(U_ptr + tj[None, :] * (b1 * r) + ks[:, None] * r + sj[None, :],
                     mask=k_ok[:, None] & j_ok[None, :], other=0.0)
        ds = _dot(dyt, ut, ds, PREC, UPCAST)
    ds3 = tl.reshape(ds * scale, [BM, A1_P, R_P])

    ms = pid * BM + tl.arange(0, BM)
    m_ok = ms < M
    m64 = ms.to(tl.int64)
    for p in range(0, a2):
        a_p = tl.load(A_ptr + tj[None, :] * (a1 * a2) + i_s[:, None] * a2 + p,
                      mask=i_ok[:, None] & j_ok[None, :], other=0.0).to(ACC_TY)
        dt = tl.sum(ds3 * a_p[None, :, :], axis=1)  # [BM, R_P]
        if NEED_DT:
            tl.store(dt_ptr + (m64[:, None] * a2 + p) * R + js[None, :], dt,
                     mask=m_ok[:, None] & j_ok[None, :])
        if NEED_DX:  # dx[m, p*b2 + q] (+)= sum_j dt[m, j] V_cat[j, q]
            for q0 in range(0, b2, BK):
                qs = q0 + tl.arange(0, BK)
                q_ok = qs < b2
                vt = tl.load(V_ptr + js[:, None] * b2 + qs[None, :], mask=j_ok[:, None] & q_ok[None, :],
                             other=0.0).to(ACC_TY)
                dxq = tl.dot(dt, vt, input_precision=PREC_ACC)
                mask = m_ok[:, None] & q_ok[None, :]
                dx_at = dx_ptr + m64[:, None] * d_in + p * b2 + qs[None, :]
                if ACCUMULATE_DX:
                    dxq += tl.load(dx_at, mask=mask, other=0.0).to(ACC_TY)
                tl.store(dx_at, cast_rn(dxq, io_ty), mask=mask)
        if NEED_DA:
            tm = tl.load(tmat_ptr + (m64[:, None] * a2 + p) * R + js[None, :],
                         mask=m_ok[:, None] & j_ok[None, :], other=0.0).to(ACC_TY)
            part = tl.sum(ds3 * tm[:, None, :], axis=0)  # [A1_P, R_P]
            tl.store(dA_part_ptr + ((pid * a2 + p) * a1 + i_s[:, None]) * R + js[None, :], part,
                     mask=i_ok[:, None] & j_ok[None, :])


def _rank_grad_configs():
    gpu = [triton.Config({"BJ": bj, "BN": bn, "BK": bk}, num_warps=w, num_stages=s)
           for bj, bn, bk, w, s in ((32, 64, 32, 4, 3), (64, 64, 32, 4, 3), (64, 128, 32, 8, 3),
                                    (128, 64, 32, 8, 3), (32, 128, 64, 4, 3))]
    return configs(gpu, triton.Config({"BJ": 16, "BN": 16, "BK": 16}, num_warps=1))


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


def _launch_forward(x, A, U, V, y, tmat, smat, scale, write_y, accumulate, save):
    T, a1, a2, b1, b2, r = _shape(A, U, V)
    M = x.shape[0]
    grid = lambda meta: (triton.cdiv(M, meta["BM"]),)  # noqa: E731
    _forward_kernel[grid](
        x, A, U, V, y if y is not None else x, tmat if save else x, smat if save else x,
        M, T, a1, a2, b1, b2, r, float(scale),
        WRITE_Y=write_y, ACCUMULATE=accumulate, SAVE=save,
        ACC_TY=_acc_type(x.dtype), PREC=dot_precision(x.dtype) if x.dtype == torch.float32 else "ieee",
        UPCAST=_upcast(x.dtype), R_P=_pow2(T * r), A1_P=_pow2_small(a1),
    )


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


def _rank_grad(P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """P^T Q in the accumulation dtype, for P [rows, R], Q [rows, n] (a split-K reduction)."""
    rows, R = P.shape
    ncol = Q.shape[1]
    acc = torch.float64 if P.dtype == torch.float64 else torch.float32
    tiles = triton.cdiv(R, 64) * triton.cdiv(ncol, 64)
    splits = _splits(rows, tiles, P.device)
    per_split = triton.cdiv(rows, splits)
    splits = triton.cdiv(rows, per_split)
    out = torch.empty((splits, R, ncol), dtype=acc, device=P.device)
    grid = lambda meta: (triton.cdiv(R, meta["BJ"]), triton.cdiv(ncol, meta["BN"]), splits)  # noqa: E731
    # fp32 / fp64 P (dt, or smat of an fp32 call): Q is converted up to it; half P: a native half dot
    prec = dot_precision(Q.dtype) if P.dtype in (torch.float32, torch.float64) else "ieee"
    _rank_grad_kernel[grid](P, Q, out, rows, R, ncol, per_split, PREC=prec, UPCAST=_upcast(P.dtype))
    return out.sum(0)


def backward(grad_y, x, A, U, V, tmat, smat, weight, scale: float, needs):
    """(dx, dA, dU, dV, dweight, dbias), None where `needs` is False. tmat / smat are the forward's
    (recomputed here, bit for bit, when empty)."""
    check_device("kron_lora", x)
    need_dx, need_dA, need_dU, need_dV, need_dw, need_db = (bool(n) for n in needs)
    T, a1, a2, b1, b2, r = _shape(A, U, V)
    M, R = x.shape[0], T * r
    dtype = x.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
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

    dt = torch.empty((M, a2, R), dtype=acc, device=x.device) if need_dV else None
    blocks_max = triton.cdiv(M, 16)  # BM >= 16 in every configuration
    dA_part = torch.empty((blocks_max, a2, a1, R), dtype=acc, device=x.device) if need_dA else None
    if need_dx or need_dA or need_dV:
        grid = lambda meta: (triton.cdiv(M, meta["BM"]),)  # noqa: E731
        placeholder = grad_y
        _backward_kernel[grid](
            grad_y, A, U, V, tmat if tmat is not None else placeholder, dx if dx is not None else placeholder,
            dt if dt is not None else placeholder, dA_part if dA_part is not None else placeholder,
            M, T, a1, a2, b1, b2, r, float(scale),
            NEED_DX=need_dx, ACCUMULATE_DX=need_dx and weight is not None, NEED_DT=need_dV, NEED_DA=need_dA,
            ACC_TY=_acc_type(dtype), PREC=dot_precision(dtype) if dtype == torch.float32 else "ieee",
            PREC_ACC=dot_precision(dtype), UPCAST=_upcast(dtype), R_P=_pow2(R), A1_P=_pow2_small(a1),
        )
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
