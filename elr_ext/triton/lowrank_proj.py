"""Fused low-rank projections (eq. 2, docs/method.md) in Triton: the `triton` backend of
elr_ext/ops/lowrank_proj.py.

    forward(x, downs, ups, biases) -> ([y_j], h)
    backward(grad_ys, x, h, downs, ups, needs_x, needs_downs, needs_ups, needs_biases)
        -> (dx, dB stacked [R, in], [dA_j], [db_j]), empty tensors where not needed

The op is GEMMs only: h = x [B_1; ...; B_K]^T (one GEMM for all the down-projections), then
y_j = h_j A_j^T + b_j with the bias added in the GEMM's epilogue (no second pass over y_j). All of
them run on one strided Triton GEMM (tensor cores for fp16/bf16, grouped tile order for L2 reuse);
h_j, dh_j and the stacked downs are strided views, never copied. The backward's token-long
reductions (dA_j = dy_j^T h_j and dB = dh^T x, whose outputs are only rank-sized) split their
K = M dimension over programs and sum the fp32 partials in a fixed order: the same bits every run.

Rounding is elr_ext/ops/lowrank_proj.py's: accumulation in fp32 (fp64 for fp64); h and dh stored in
x's dtype, as the unfused pair of nn.Linear rounds them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import accumulation_dtype
from . import (INTERPRETED, cast_rn, check_device, configs, dot_precision, gpu_config, launch, num_sms,
               tl_accumulation_dtype)


def _gemm_configs():
    gpu = [gpu_config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, w, s)
           for bm, bn, bk, w, s in ((128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4),
                                    (64, 64, 64, 4, 3), (32, 64, 32, 4, 4), (128, 256, 32, 8, 3),
                                    (64, 64, 32, 8, 3), (64, 128, 32, 8, 3))]
    return configs(gpu, triton.Config({"BM": 16, "BN": 16, "BK": 16, "GROUP_M": 2}, num_warps=1))


# IEEE fp32 (and fp64) dots run on the FMA units with their operand fragments in registers: tiles of
# at most this many fp32 accumulators per thread and BK = 32 compile without spilling (ptxas -v at
# SD shapes; 32 per thread, 64 x 64 on 4 warps, spilled 16 bytes on sm_90; docs/triton.md).
_FMA_ACCUMULATORS_PER_THREAD = 16


def _prune(tiles, named_args, **kwargs):
    """Tensor-core dots keep every tile; FMA dots the ones within the register budget above."""
    dtype = named_args["a_ptr"].dtype
    if dtype not in (torch.float32, torch.float64) or kwargs["PREC"] == "tf32":
        return tiles
    limit = _FMA_ACCUMULATORS_PER_THREAD // (2 if dtype == torch.float64 else 1)
    kept = [c for c in tiles if c.kwargs["BK"] <= 32
            and c.kwargs["BM"] * c.kwargs["BN"] // (32 * c.num_warps) <= limit]
    return kept or tiles[:1]


@triton.autotune(configs=_gemm_configs(), key=["M", "N", "K", "K_PER_SPLIT", "PREC"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _gemm_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr,
    M, N, K, K_PER_SPLIT,
    S_AM, S_AK, S_BK, S_BN, S_CS, S_CM, S_CN,
    HAS_BIAS: tl.constexpr, ACC_TY: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """c[split] = a[:, k-range] @ b[k-range, :] (+ bias[n]) for split = program_id(1); strided operands."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    tiles_m = tl.cdiv(M, BM)
    tiles_n = tl.cdiv(N, BN)
    # grouped order: GROUP_M row tiles share their b columns in L2
    per_group = GROUP_M * tiles_n
    group = pid // per_group
    first_m = group * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    ms = pid_m * BM + tl.arange(0, BM)
    ns = pid_n * BN + tl.arange(0, BN)
    m_ok = ms < M
    n_ok = ns < N
    m64 = ms.to(tl.int64)
    n64 = ns.to(tl.int64)
    k_lo = split * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    acc = tl.zeros([BM, BN], ACC_TY)
    for k0 in range(k_lo, k_hi, BK):
        ks = k0 + tl.arange(0, BK)
        k_ok = ks < k_hi
        k64 = ks.to(tl.int64)
        a = tl.load(a_ptr + m64[:, None] * S_AM + k64[None, :] * S_AK, mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        b = tl.load(b_ptr + k64[:, None] * S_BK + n64[None, :] * S_BN, mask=k_ok[:, None] & n_ok[None, :],
                    other=0.0)
        if UPCAST:  # Triton 3.8's interpreter multiplies bf16 tl.dot operands as raw integers
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    if HAS_BIAS:  # the fused epilogue: y_j = h_j A_j^T + b_j in one pass
        acc += tl.load(bias_ptr + ns, mask=n_ok, other=0.0).to(ACC_TY)[None, :]
    c = c_ptr + split * S_CS + m64[:, None] * S_CM + n64[None, :] * S_CN
    tl.store(c, cast_rn(acc, c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None, bias: torch.Tensor | None = None,
          long_k: bool = False) -> torch.Tensor:
    """a [M, K] @ b [K, N] (+ bias) into out (any strides; allocated in a's dtype when None).
    long_k: split K over programs (a rank-sized output of a token-long reduction), fp32 partials
    summed in a fixed order."""
    M, K = a.shape
    N = b.shape[1]
    if out is None:
        out = a.new_empty((M, N))
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.copy_(bias.expand(M, N)) if bias is not None else out.zero_()
    acc_ty = tl_accumulation_dtype(a.dtype)
    prec = dot_precision(a.dtype) if a.dtype == torch.float32 else "ieee"
    upcast = INTERPRETED and a.dtype == torch.bfloat16
    splits = 1
    if long_k:
        min_k = 64 if a.device.type == "cpu" else 1024
        tiles = triton.cdiv(M, 64) * triton.cdiv(N, 64)
        splits = max(1, min(triton.cdiv(4 * num_sms(a.device), tiles), triton.cdiv(K, min_k), 64))
    per_split = triton.cdiv(K, splits)
    splits = triton.cdiv(K, per_split)
    target = out if splits == 1 else torch.empty((splits, M, N), dtype=accumulation_dtype(a.dtype), device=a.device)
    s_cs = 0 if splits == 1 else target.stride(0)
    s_cm, s_cn = (out.stride(0), out.stride(1)) if splits == 1 else (target.stride(1), target.stride(2))
    grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]), splits)  # noqa: E731
    launch(
        _gemm_kernel, grid, a, b, target, bias if (bias is not None and splits == 1) else a,
        M, N, K, per_split,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), s_cs, s_cm, s_cn,
        HAS_BIAS=bias is not None and splits == 1, ACC_TY=acc_ty, PREC=prec, UPCAST=upcast,
    )
    if splits > 1:
        total = target.sum(0)
        if bias is not None:
            total += bias
        out.copy_(total)
    return out


def _stacked(downs) -> torch.Tensor:
    """[B_1; ...; B_K] as one [R, in] matrix: a view when the downs lie back to back in one buffer
    (slices of one stacked parameter), else a copy of R x in elements (small next to x)."""
    if len(downs) == 1:
        return downs[0]
    first = downs[0]
    offset = first.storage_offset()
    adjacent = True
    for B in downs:
        adjacent = adjacent and B.is_contiguous() and B.untyped_storage().data_ptr() == \
            first.untyped_storage().data_ptr() and B.storage_offset() == offset
        offset += B.numel()
    rows = sum(B.shape[0] for B in downs)
    if adjacent:
        return first.as_strided((rows, first.shape[1]), (first.shape[1], 1))
    return torch.cat(list(downs))


def _blocks(t: torch.Tensor, ranks) -> list:
    return list(t.split(list(ranks), dim=1))


def forward(x, downs, ups, biases):
    """([y_j [M, out_j]], h [M, R]); biases[j] empty for no bias."""
    check_device("lowrank_proj", x)
    ranks = [B.shape[0] for B in downs]
    h = _gemm(x, _stacked(downs).t())  # one GEMM for every down-projection
    ys = [_gemm(h_j, A.t(), bias=b if b.numel() else None)  # the bias in the GEMM's epilogue
          for h_j, A, b in zip(_blocks(h, ranks), ups, biases)]
    return ys, h


def backward(grad_ys, x, h, downs, ups, needs_x, needs_downs, needs_ups, needs_biases):
    check_device("lowrank_proj", x)
    ranks = [B.shape[0] for B in downs]
    M = x.shape[0]
    absent = lambda: x.new_empty(0)  # noqa: E731  a fresh one each: custom-op outputs may not alias
    grad_ys = [g if g.stride(-1) == 1 else g.contiguous() for g in grad_ys]
    dups = [_gemm(dy.t(), h_j, long_k=True) if need else absent()
            for dy, h_j, need in zip(grad_ys, _blocks(h, ranks), needs_ups)]
    dbiases = [dy.sum(0) if need else absent() for dy, need in zip(grad_ys, needs_biases)]
    dx, ddown = absent(), absent()
    if needs_x or needs_downs:
        dh = x.new_empty((M, sum(ranks)))
        for dy, A, dh_j in zip(grad_ys, ups, _blocks(dh, ranks)):
            _gemm(dy, A, out=dh_j)  # dh_j = dy_j A_j, rounded to x's dtype as the unfused path does
        if needs_downs:
            ddown = _gemm(dh.t(), x, long_k=True)
        if needs_x:
            dx = _gemm(dh, _stacked(downs))
    return dx, ddown, dups, dbiases
