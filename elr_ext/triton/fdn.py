"""FDN (eq. 8) in Triton: the `triton` backend of elr_ext/ops/fdn.py, with its contract.

    forward(z, gamma, beta, G, eps, activation) -> out, mean [N, G], rstd [N, G]
    backward(grad_out, z, gamma, beta, mean, rstd, G, activation, needs) -> dz, dgamma, dbeta

Work split. A group of SD's largest level holds C/G * H * W = 10 * 4096 values and there are only
N * G = 64 groups, far fewer than an H100's 132 SMs want; so every kernel runs on a grid of
(N * G) x S programs, where split s owns the columns hw in [s * hw_per_split, ...) of all the
group's channels. Forward: (1) per split, the mean and the sum of squared deviations of its chunk
(two passes over the chunk, the second mostly from L2); (2) per split, the group's statistics
combined from the S partials (Chan et al.'s pairwise formula: never E[x^2] - E[x]^2), then
normalise, modulate, activate and store; split 0 also stores mean and rstd. Backward: (1) per
split, g = dout * act'(pre) and the partial sums of dzhat and dzhat * zhat, writing full-size
dgamma = g * zhat and dbeta = g on the way (or per-channel partial sums for [N, C, 1, 1] affines);
(2) per split, dz = rstd * (dzhat - mean(dzhat) - zhat * mean(dzhat * zhat)), with split 0 also
summing the per-channel partials. Every reduction has a fixed order: results do not change from
run to run.

Layouts. Tensors are addressed through (n, c, hw) strides, which covers contiguous and
channels_last alike (hw = h * W + w flattens whenever stride_h == W * stride_w), and a [N, C, 1, 1]
affine is read once per channel. Outputs follow elr_ext/ops/fdn.py: out and dz in z's layout,
full-size dgamma / dbeta in z's layout, broadcast ones contiguous.

Precision: statistics and all arithmetic in fp32 (fp64 for fp64 inputs): the dtype of the mean
buffer, which the kernels read as their accumulation type; outputs rounded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.fdn import _layout_of  # the memory format of every backend's outputs
from ..reference import accumulation_dtype, group_stats
from . import cast_rn, check_device, configs, gpu_config, launch, num_sms

_ACTIVATION_CODE = {"none": 0, "silu": 1}


def _tile_configs():
    gpu = [
        gpu_config({"BLOCK_C": bc, "BLOCK_HW": bhw}, w, 3)
        for bc, bhw, w in ((1, 1024, 4), (2, 512, 4), (4, 256, 4), (8, 128, 4), (16, 64, 4), (32, 32, 4),
                           (4, 512, 8), (16, 128, 8), (64, 32, 8))
    ]
    return configs(gpu, triton.Config({"BLOCK_C": 4, "BLOCK_HW": 16}, num_warps=1))


def _prune(tiles, named_args, **kwargs):
    """Drop tiles wider in channels than the group (idle lanes), keeping at least one."""
    cpg = named_args["CPG"]
    kept = [c for c in tiles if c.kwargs["BLOCK_C"] <= max(triton.next_power_of_2(cpg), 1)]
    return kept or tiles[:1]


_TUNE = dict(configs=_tile_configs(), key=["CPG", "HW_PER_SPLIT", "Z_S_HW"],
             prune_configs_by={"early_config_prune": _prune})


# ------------------------------------------------------------------------------------ kernels
@triton.autotune(**_TUNE)
@triton.jit
def _stats_partial_kernel(
    z_ptr, part_ptr,
    G, CPG, HW, HW_PER_SPLIT, SPLITS,
    Z_S_N, Z_S_C, Z_S_HW,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """part[row, split] = (mean, sum of squared deviations) of the split's chunk, row = n * G + g."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    acc_ty = part_ptr.dtype.element_ty
    n = row // G
    g = row - n * G
    base = z_ptr + n.to(tl.int64) * Z_S_N + (g * CPG).to(tl.int64) * Z_S_C
    hw_lo = split * HW_PER_SPLIT
    hw_hi = tl.minimum(hw_lo + HW_PER_SPLIT, HW)
    count = (CPG * (hw_hi - hw_lo)).to(acc_ty)

    total = tl.zeros([BLOCK_C, BLOCK_HW], acc_ty)
    for c0 in range(0, CPG, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        for h0 in range(hw_lo, hw_hi, BLOCK_HW):
            hs = h0 + tl.arange(0, BLOCK_HW)
            mask = (cs < CPG)[:, None] & (hs < hw_hi)[None, :]
            x = tl.load(base + cs[:, None] * Z_S_C + hs[None, :] * Z_S_HW, mask=mask, other=0.0)
            total += x.to(acc_ty)
    mean = tl.sum(tl.sum(total, axis=1), axis=0) / count

    sq = tl.zeros([BLOCK_C, BLOCK_HW], acc_ty)
    for c0 in range(0, CPG, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        for h0 in range(hw_lo, hw_hi, BLOCK_HW):
            hs = h0 + tl.arange(0, BLOCK_HW)
            mask = (cs < CPG)[:, None] & (hs < hw_hi)[None, :]
            x = tl.load(base + cs[:, None] * Z_S_C + hs[None, :] * Z_S_HW, mask=mask, other=0.0)
            d = tl.where(mask, x.to(acc_ty) - mean, 0.0)
            sq += d * d
    m2 = tl.sum(tl.sum(sq, axis=1), axis=0)
    out = part_ptr + (row * SPLITS + split) * 2
    tl.store(out, mean)
    tl.store(out + 1, m2)


@triton.autotune(**_TUNE)
@triton.jit
def _forward_apply_kernel(
    z_ptr, gamma_ptr, beta_ptr, out_ptr, part_ptr, mean_ptr, rstd_ptr,
    G, CPG, HW, HW_PER_SPLIT, SPLITS, eps,
    Z_S_N, Z_S_C, Z_S_HW,
    GM_S_N, GM_S_C, GM_S_HW,
    BT_S_N, BT_S_C, BT_S_HW,
    O_S_N, O_S_C, O_S_HW,
    ACTIVATION: tl.constexpr, BROADCAST: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    acc_ty = mean_ptr.dtype.element_ty
    n = row // G
    g = row - n * G

    # The group's statistics from the S partials: mean = sum(n_s mean_s) / n,
    # M2 = sum(M2_s + n_s (mean_s - mean)^2). Every split computes the same numbers.
    ss = tl.arange(0, BLOCK_S)
    valid = ss < SPLITS
    p_mean = tl.load(part_ptr + (row * SPLITS + ss) * 2, mask=valid, other=0.0)
    p_m2 = tl.load(part_ptr + (row * SPLITS + ss) * 2 + 1, mask=valid, other=0.0)
    p_cnt = tl.where(valid, CPG * (tl.minimum((ss + 1) * HW_PER_SPLIT, HW) - ss * HW_PER_SPLIT), 0).to(acc_ty)
    total = (CPG * HW).to(acc_ty)
    mean = tl.sum(p_cnt * p_mean, axis=0) / total
    dev = tl.where(valid, p_mean - mean, 0.0)
    m2 = tl.sum(p_m2 + p_cnt * dev * dev, axis=0)
    rstd = 1.0 / tl.sqrt(m2 / total + eps)  # tl.sqrt: IEEE for fp64, within an ulp or two for fp32
    if split == 0:
        tl.store(mean_ptr + row, mean)
        tl.store(rstd_ptr + row, rstd)

    c_base = (g * CPG).to(tl.int64)
    n64 = n.to(tl.int64)
    hw_lo = split * HW_PER_SPLIT
    hw_hi = tl.minimum(hw_lo + HW_PER_SPLIT, HW)
    for c0 in range(0, CPG, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        cmask = cs < CPG
        if BROADCAST:  # [N, C, 1, 1]: one value per channel
            gm = tl.load(gamma_ptr + n64 * GM_S_N + (c_base + cs) * GM_S_C, mask=cmask, other=0.0)
            bt = tl.load(beta_ptr + n64 * BT_S_N + (c_base + cs) * BT_S_C, mask=cmask, other=0.0)
            gm = gm.to(acc_ty)[:, None]
            bt = bt.to(acc_ty)[:, None]
        for h0 in range(hw_lo, hw_hi, BLOCK_HW):
            hs = h0 + tl.arange(0, BLOCK_HW)
            mask = cmask[:, None] & (hs < hw_hi)[None, :]
            cc = (c_base + cs)[:, None]
            x = tl.load(z_ptr + n64 * Z_S_N + cc * Z_S_C + hs[None, :] * Z_S_HW, mask=mask, other=0.0)
            x = x.to(acc_ty)
            if not BROADCAST:
                gm = tl.load(gamma_ptr + n64 * GM_S_N + cc * GM_S_C + hs[None, :] * GM_S_HW, mask=mask,
                             other=0.0).to(acc_ty)
                bt = tl.load(beta_ptr + n64 * BT_S_N + cc * BT_S_C + hs[None, :] * BT_S_HW, mask=mask,
                             other=0.0).to(acc_ty)
            y = (x - mean) * rstd * (1.0 + gm) + bt
            if ACTIVATION == 1:  # SiLU
                y = y * tl.sigmoid(y)
            tl.store(out_ptr + n64 * O_S_N + cc * O_S_C + hs[None, :] * O_S_HW,
                     cast_rn(y, out_ptr.dtype.element_ty), mask=mask)


@triton.autotune(**_TUNE)
@triton.jit
def _backward_partial_kernel(
    dy_ptr, z_ptr, gamma_ptr, beta_ptr, mean_ptr, rstd_ptr,
    part_ptr, chan_part_ptr, dgamma_ptr, dbeta_ptr,
    G, CPG, HW, HW_PER_SPLIT, SPLITS,
    Z_S_N, Z_S_C, Z_S_HW,
    DY_S_N, DY_S_C, DY_S_HW,
    GM_S_N, GM_S_C, GM_S_HW,
    BT_S_N, BT_S_C, BT_S_HW,
    DG_S_N, DG_S_C, DG_S_HW,
    ACTIVATION: tl.constexpr, BROADCAST: tl.constexpr, NEED_DGAMMA: tl.constexpr, NEED_DBETA: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """part[row, split] = (sum dzhat, sum dzhat * zhat) over the chunk; full-size dgamma / dbeta
    written directly, broadcast ones as per-channel partials chan_part[n, c, split, {dgamma, dbeta}]."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    acc_ty = mean_ptr.dtype.element_ty
    n = row // G
    g = row - n * G
    mean = tl.load(mean_ptr + row)
    rstd = tl.load(rstd_ptr + row)
    c_base = (g * CPG).to(tl.int64)
    n64 = n.to(tl.int64)
    hw_lo = split * HW_PER_SPLIT
    hw_hi = tl.minimum(hw_lo + HW_PER_SPLIT, HW)

    sum_dzh = tl.zeros([BLOCK_C, BLOCK_HW], acc_ty)
    sum_dzh_zh = tl.zeros([BLOCK_C, BLOCK_HW], acc_ty)
    for c0 in range(0, CPG, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        cmask = cs < CPG
        cc = (c_base + cs)[:, None]
        if BROADCAST:
            gm = tl.load(gamma_ptr + n64 * GM_S_N + (c_base + cs) * GM_S_C, mask=cmask, other=0.0)
            gm = gm.to(acc_ty)[:, None]
            if ACTIVATION == 1:
                bt = tl.load(beta_ptr + n64 * BT_S_N + (c_base + cs) * BT_S_C, mask=cmask,
                             other=0.0).to(acc_ty)[:, None]
            chan_dgamma = tl.zeros([BLOCK_C, BLOCK_HW], acc_ty)
            chan_dbeta = tl.zeros([BLOCK_C, BLOCK_HW], acc_ty)
        for h0 in range(hw_lo, hw_hi, BLOCK_HW):
            hs = h0 + tl.arange(0, BLOCK_HW)
            mask = cmask[:, None] & (hs < hw_hi)[None, :]
            x = tl.load(z_ptr + n64 * Z_S_N + cc * Z_S_C + hs[None, :] * Z_S_HW, mask=mask, other=0.0)
            x = x.to(acc_ty)
            gy = tl.load(dy_ptr + n64 * DY_S_N + cc * DY_S_C + hs[None, :] * DY_S_HW, mask=mask,
                         other=0.0).to(acc_ty)
            if not BROADCAST:
                gm = tl.load(gamma_ptr + n64 * GM_S_N + cc * GM_S_C + hs[None, :] * GM_S_HW, mask=mask,
                             other=0.0).to(acc_ty)
                if ACTIVATION == 1:
                    bt = tl.load(beta_ptr + n64 * BT_S_N + cc * BT_S_C + hs[None, :] * BT_S_HW, mask=mask,
                                 other=0.0).to(acc_ty)
            zh = tl.where(mask, (x - mean) * rstd, 0.0)
            if ACTIVATION == 1:  # d silu(p)/dp = s (1 + p (1 - s)), s = sigmoid(p)
                pre = zh * (1.0 + gm) + bt
                s = tl.sigmoid(pre)
                gy = gy * s * (1.0 + pre * (1.0 - s))
            dzh = gy * (1.0 + gm)
            sum_dzh += dzh
            sum_dzh_zh += dzh * zh
            if BROADCAST:
                chan_dgamma += gy * zh
                chan_dbeta += gy
            else:
                dg_off = n64 * DG_S_N + cc * DG_S_C + hs[None, :] * DG_S_HW
                if NEED_DGAMMA:
                    tl.store(dgamma_ptr + dg_off, cast_rn(gy * zh, dgamma_ptr.dtype.element_ty), mask=mask)
                if NEED_DBETA:
                    tl.store(dbeta_ptr + dg_off, cast_rn(gy, dbeta_ptr.dtype.element_ty), mask=mask)
        if BROADCAST:
            if NEED_DGAMMA or NEED_DBETA:
                out = chan_part_ptr + ((n64 * G * CPG + c_base + cs) * SPLITS + split) * 2
                tl.store(out, tl.sum(chan_dgamma, axis=1), mask=cmask)
                tl.store(out + 1, tl.sum(chan_dbeta, axis=1), mask=cmask)
    out = part_ptr + (row * SPLITS + split) * 2
    tl.store(out, tl.sum(tl.sum(sum_dzh, axis=1), axis=0))
    tl.store(out + 1, tl.sum(tl.sum(sum_dzh_zh, axis=1), axis=0))


@triton.autotune(**_TUNE)
@triton.jit
def _backward_apply_kernel(
    dy_ptr, z_ptr, gamma_ptr, beta_ptr, mean_ptr, rstd_ptr,
    part_ptr, chan_part_ptr, dz_ptr, dgamma_ptr, dbeta_ptr,
    G, CPG, HW, HW_PER_SPLIT, SPLITS,
    Z_S_N, Z_S_C, Z_S_HW,
    DY_S_N, DY_S_C, DY_S_HW,
    GM_S_N, GM_S_C, GM_S_HW,
    BT_S_N, BT_S_C, BT_S_HW,
    DZ_S_N, DZ_S_C, DZ_S_HW,
    ACTIVATION: tl.constexpr, BROADCAST: tl.constexpr, NEED_DZ: tl.constexpr,
    NEED_DGAMMA: tl.constexpr, NEED_DBETA: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    acc_ty = mean_ptr.dtype.element_ty
    n = row // G
    g = row - n * G
    c_base = (g * CPG).to(tl.int64)
    n64 = n.to(tl.int64)
    ss = tl.arange(0, BLOCK_S)
    valid = ss < SPLITS

    if BROADCAST:  # split 0 sums the per-channel partials of dgamma / dbeta over the splits
        if split == 0:
            if NEED_DGAMMA or NEED_DBETA:
                for c0 in range(0, CPG, BLOCK_C):
                    cs = c0 + tl.arange(0, BLOCK_C)
                    cmask = cs < CPG
                    m2d = cmask[:, None] & valid[None, :]
                    src = chan_part_ptr + ((n64 * G * CPG + c_base + cs)[:, None] * SPLITS + ss[None, :]) * 2
                    dst = n64 * G * CPG + c_base + cs  # [N, C, 1, 1] contiguous
                    if NEED_DGAMMA:
                        dg = tl.sum(tl.load(src, mask=m2d, other=0.0), axis=1)
                        tl.store(dgamma_ptr + dst, cast_rn(dg, dgamma_ptr.dtype.element_ty), mask=cmask)
                    if NEED_DBETA:
                        db = tl.sum(tl.load(src + 1, mask=m2d, other=0.0), axis=1)
                        tl.store(dbeta_ptr + dst, cast_rn(db, dbeta_ptr.dtype.element_ty), mask=cmask)

    if NEED_DZ:
        mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        total = (CPG * HW).to(acc_ty)
        sums = part_ptr + (row * SPLITS + ss) * 2
        mean_dzh = tl.sum(tl.load(sums, mask=valid, other=0.0), axis=0) / total
        mean_dzh_zh = tl.sum(tl.load(sums + 1, mask=valid, other=0.0), axis=0) / total
        hw_lo = split * HW_PER_SPLIT
        hw_hi = tl.minimum(hw_lo + HW_PER_SPLIT, HW)
        for c0 in range(0, CPG, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            cmask = cs < CPG
            cc = (c_base + cs)[:, None]
            if BROADCAST:
                gm = tl.load(gamma_ptr + n64 * GM_S_N + (c_base + cs) * GM_S_C, mask=cmask,
                             other=0.0).to(acc_ty)[:, None]
                if ACTIVATION == 1:
                    bt = tl.load(beta_ptr + n64 * BT_S_N + (c_base + cs) * BT_S_C, mask=cmask,
                                 other=0.0).to(acc_ty)[:, None]
            for h0 in range(hw_lo, hw_hi, BLOCK_HW):
                hs = h0 + tl.arange(0, BLOCK_HW)
                mask = cmask[:, None] & (hs < hw_hi)[None, :]
                x = tl.load(z_ptr + n64 * Z_S_N + cc * Z_S_C + hs[None, :] * Z_S_HW, mask=mask,
                            other=0.0).to(acc_ty)
                gy = tl.load(dy_ptr + n64 * DY_S_N + cc * DY_S_C + hs[None, :] * DY_S_HW, mask=mask,
                             other=0.0).to(acc_ty)
                if not BROADCAST:
                    gm = tl.load(gamma_ptr + n64 * GM_S_N + cc * GM_S_C + hs[None, :] * GM_S_HW, mask=mask,
                                 other=0.0).to(acc_ty)
                    if ACTIVATION == 1:
                        bt = tl.load(beta_ptr + n64 * BT_S_N + cc * BT_S_C + hs[None, :] * BT_S_HW, mask=mask,
                                     other=0.0).to(acc_ty)
                zh = (x - mean) * rstd
                if ACTIVATION == 1:
                    pre = zh * (1.0 + gm) + bt
                    s = tl.sigmoid(pre)
                    gy = gy * s * (1.0 + pre * (1.0 - s))
                dzh = gy * (1.0 + gm)
                dz = rstd * (dzh - mean_dzh - zh * mean_dzh_zh)
                tl.store(dz_ptr + n64 * DZ_S_N + cc * DZ_S_C + hs[None, :] * DZ_S_HW,
                         cast_rn(dz, dz_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------ host side
def _nc_hw_strides(t: torch.Tensor):
    """(stride_n, stride_c, stride_hw) of a 4-D tensor whose (h, w) flatten into one index, else None."""
    _, _, h, w = t.shape
    sn, sc, sh, sw = t.stride()
    if w == 1:  # hw = h
        return sn, sc, sh
    if h == 1 or sh == w * sw:  # hw = h * W + w, one stride sw
        return sn, sc, sw
    return None


def _addressable(t: torch.Tensor, layout: torch.memory_format) -> tuple[torch.Tensor, tuple]:
    """t and its (n, c, hw) strides, made `layout`-contiguous first if its strides do not flatten."""
    strides = _nc_hw_strides(t)
    if strides is None:
        t = t.contiguous(memory_format=layout)
        strides = _nc_hw_strides(t)
    return t, strides


def _plan(z: torch.Tensor, num_groups: int) -> tuple[int, int]:
    """(hw_per_split, splits): enough programs to fill the device (about four per SM), but chunks of
    at least 2048 values so each program amortises its statistics combine (16 when interpreting)."""
    n, c, h, w = z.shape
    hw, cpg, rows = h * w, c // num_groups, n * num_groups
    min_chunk = 16 if z.device.type == "cpu" else 2048
    want = triton.cdiv(4 * num_sms(z.device), rows)
    max_by_size = max(1, (cpg * hw) // min_chunk)
    splits = max(1, min(want, max_by_size, hw, 64))
    hw_per_split = triton.cdiv(hw, splits)
    return hw_per_split, triton.cdiv(hw, hw_per_split)


def forward(z, gamma, beta, num_groups: int, eps: float, activation: str):
    """FDN forward on the triton backend: (out in z's layout, mean [N, G], rstd [N, G])."""
    check_device("fdn", z)
    n, c, h, w = z.shape
    layout = _layout_of(z)
    z, zs = _addressable(z, layout)
    gamma, gs = _addressable(gamma, layout)
    beta, bs = _addressable(beta, layout)
    broadcast = gamma.shape != z.shape
    acc = accumulation_dtype(z.dtype)
    out = torch.empty(z.shape, dtype=z.dtype, device=z.device, memory_format=layout)
    if z.numel() == 0:  # empty groups: nothing to normalise; the statistics of a constant
        return (out, *group_stats(z, num_groups, eps))
    mean = torch.empty((n, num_groups), dtype=acc, device=z.device)
    rstd = torch.empty_like(mean)
    hw_per_split, splits = _plan(z, num_groups)
    cpg, hw = c // num_groups, h * w
    part = torch.empty((n * num_groups, splits, 2), dtype=acc, device=z.device)
    grid = (n * num_groups, splits)
    launch(_stats_partial_kernel, grid, z, part, num_groups, cpg, hw, hw_per_split, splits, *zs)
    launch(
        _forward_apply_kernel, grid,
        z, gamma, beta, out, part, mean, rstd, num_groups, cpg, hw, hw_per_split, splits, float(eps),
        *zs, *gs, *bs, *_nc_hw_strides(out),
        ACTIVATION=_ACTIVATION_CODE[activation], BROADCAST=broadcast, BLOCK_S=triton.next_power_of_2(splits),
    )
    return out, mean, rstd


def backward(grad_out, z, gamma, beta, mean, rstd, num_groups: int, activation: str, needs):
    """FDN backward on the triton backend: (dz, dgamma, dbeta), None where `needs` is False.
    beta may be None without an activation (it only enters through SiLU's derivative)."""
    check_device("fdn", z)
    needs_z, needs_gamma, needs_beta = (bool(x) for x in needs)
    n, c, h, w = z.shape
    layout = _layout_of(z)
    broadcast = gamma.shape != z.shape
    dz = torch.empty(z.shape, dtype=z.dtype, device=z.device, memory_format=layout) if needs_z else None
    affine_layout = torch.contiguous_format if broadcast else layout

    def affine_grad():
        return torch.empty(gamma.shape, dtype=z.dtype, device=z.device, memory_format=affine_layout)

    dgamma = affine_grad() if needs_gamma else None
    dbeta = affine_grad() if needs_beta else None
    if not (needs_z or needs_gamma or needs_beta) or z.numel() == 0:
        zero = lambda t: t.zero_() if t is not None else None  # noqa: E731  sums over nothing
        return dz, zero(dgamma), zero(dbeta)

    z, zs = _addressable(z, layout)
    grad_out, ds = _addressable(grad_out, layout)
    gamma, gs = _addressable(gamma, layout)
    if activation == "silu":
        beta, bs = _addressable(beta, layout)
    else:  # never read
        beta, bs = gamma, gs
    mean, rstd = mean.contiguous(), rstd.contiguous()
    hw_per_split, splits = _plan(z, num_groups)
    cpg, hw = c // num_groups, h * w
    acc = mean.dtype
    part = torch.empty((n * num_groups, splits, 2), dtype=acc, device=z.device)
    chan_part = torch.empty((n, c, splits, 2), dtype=acc, device=z.device) if broadcast else part
    dgamma_arg = dgamma if dgamma is not None else part  # a placeholder pointer when not written
    dbeta_arg = dbeta if dbeta is not None else part
    full_grad = dgamma if dgamma is not None else dbeta
    dg_strides = _nc_hw_strides(full_grad) if (full_grad is not None and not broadcast) else (0, 0, 0)
    act = _ACTIVATION_CODE[activation]
    grid = (n * num_groups, splits)
    launch(
        _backward_partial_kernel, grid,
        grad_out, z, gamma, beta, mean, rstd, part, chan_part, dgamma_arg, dbeta_arg,
        num_groups, cpg, hw, hw_per_split, splits,
        *zs, *ds, *gs, *bs, *dg_strides,
        ACTIVATION=act, BROADCAST=broadcast, NEED_DGAMMA=needs_gamma, NEED_DBETA=needs_beta,
    )
    if needs_z or broadcast:
        launch(
            _backward_apply_kernel, grid,
            grad_out, z, gamma, beta, mean, rstd, part, chan_part,
            dz if dz is not None else part, dgamma_arg, dbeta_arg,
            num_groups, cpg, hw, hw_per_split, splits,
            *zs, *ds, *gs, *bs, *(_nc_hw_strides(dz) if dz is not None else (0, 0, 0)),
            ACTIVATION=act, BROADCAST=broadcast, NEED_DZ=needs_z, NEED_DGAMMA=needs_gamma,
            NEED_DBETA=needs_beta, BLOCK_S=triton.next_power_of_2(splits),
        )
    return dz, dgamma, dbeta
