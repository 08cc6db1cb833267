"""The launch plans of the Kronecker LoRA CUDA kernels (csrc/kernels/kron_lora.cuh: kron_grid and
the fused path's make_fused_plan) at the Stable Diffusion UNet shapes, for 80, 108 and 132 SMs
(V100, A100, H100 SXM), without a GPU: the simulation library (tests/cuda_sim/kron_lora_sim.cpp)
exports the grids the launchers use, for any SM count.

The rule: every kernel that does a step's bulk work (work proportional to the tokens) launches at
least 2 blocks per SM at M >= 2048 tokens. The kernels that fall short of it at some shape are
named, with the reason, in EXEMPT; each entry is checked (its grid does not depend on M, its work
is below 1 % of the layer's, and it does fall short somewhere, so the list holds no stale entry).

Also here: the shared-memory bank-conflict degrees of the fused kernels' access patterns, computed
from the header's index helpers for the padded layout and for the unpadded one it replaced, and a
simulated launch of each launcher checking that it launches exactly the grids kron_grid reports.
"""

from __future__ import annotations

import ctypes
import math

import pytest
import torch

from cuda_sim.build import _i64
from cuda_sim.harness import poisoned, ptr, run_in_child
from elr_ext.nn.kron_lora import kronecker_splits
from test_kron_lora_cuda_sim import DTYPE_CODE, _shape_p, c_shape, random_factors, sim  # noqa: F401

SM_COUNTS = (80, 108, 132)
MIN_BLOCKS_PER_SM = 2
BULK_MIN_TOKENS = 2048
TERMS, RANK = 4, 8  # the modules' defaults (KronLoRALinear / KronLoRAConv2d)

# Tokens per UNet level of SD at 512 px, batch 2 (64x64, 32x32, 16x16, 8x8 latents), and the 1280
# level at 8192 tokens (larger batches).
LEVELS = ((320, 8192), (640, 2048), (1280, 512), (1280, 8192), (1280, 128))


def sd_layers():
    """(name, d_out, d_in, M, conv): attention projections, the GEGLU feed-forward (d -> 8d, 4d -> d)
    and 3x3 convolutions (d_in = 9 * channels) of every level."""
    for d, M in LEVELS:
        yield f"linear-{d}", d, d, M, False
        yield f"ff-in-{d}", 8 * d, d, M, False
        yield f"ff-out-{d}", d, 4 * d, M, False
        yield f"conv3x3-{d}", d, 9 * d, M, True


FACTORS = {"eq9": None, "balanced": -1}  # kronecker_splits' factor: eq. 9 with n = T, LoKr's split


def layer_shape(d_out, d_in, M, factor):
    (a1, b1), (a2, b2) = kronecker_splits(d_out, d_in, TERMS, factor)
    return (M, TERMS, a1, a2, b1, b2, RANK)


# Kernels whose work grows with the tokens; the rest are sized by the weights.
TOKEN_KERNELS = {"kron_fused_forward", "kron_fused_backward", "kron_mix_forward", "kron_mix_backward"}

# The kernels that fall short of MIN_BLOCKS_PER_SM at some shape with M >= BULK_MIN_TOKENS.
EXEMPT = {
    "kron_fused_grad_A_sum": "one block per dA element sums the token tiles' partials in a fixed order: "
                             "T*a1*a2 blocks (64 at eq. 9), reading blocks * T*a1*a2 values",
    "kron_delta_product": "B_t = U_t V_t, T*b1*b2 outputs of r MACs: weight-sized, no token dimension",
    "kron_delta_grad_A": "one block per dA element of the conv weight-gradient path: weight-sized",
    "kron_delta_grad_B": "T*b1*b2 outputs of a1*a2 MACs: weight-sized, no token dimension",
    "kron_delta_grad_U": "T*b1*r outputs: weight-sized, no token dimension",
    "kron_delta_grad_V": "T*r*b2 outputs: weight-sized, no token dimension",
}


def kernel_names(sim):
    return [sim.elr_kron_sim_kernel_name(k).decode() for k in range(sim.elr_kron_sim_kernel_count())]


def grids(sim, shape, sm_count, dtype=torch.float16):
    """{kernel name: (blocks, dynamic shared bytes)} as the launchers would start them."""
    names = kernel_names(sim)
    out = (_i64 * (2 * len(names)))()
    assert sim.elr_kron_sim_grids(DTYPE_CODE[dtype], c_shape(shape), sm_count, out) == 0
    return {name: (out[2 * k], out[2 * k + 1]) for k, name in enumerate(names)}


def fused_plan(sim, shape, sm_count, dtype=torch.float16):
    out = (_i64 * 8)()
    assert sim.elr_kron_sim_plan(DTYPE_CODE[dtype], c_shape(shape), sm_count, out) == 0
    return {"supported": bool(out[0]), "bm": out[1], "rp": out[2], "ld": out[3], "a_ld": out[4],
            "blocks": out[5], "smem": out[6]}


def step_kernels(sim, shape, conv):
    """The kernels one training step runs for the layer: the fused path when it fits, else the GEMM
    path's mixing kernels (the wrapper does the rest with cuBLAS); conv layers also build dW
    (kron_delta) and, on narrow layers, take the weight-gradient path (kron_delta_backward)."""
    if fused_plan(sim, shape, 1)["supported"]:
        names = ["kron_fused_forward", "kron_fused_backward", "kron_fused_grad_A_sum"]
    else:
        names = ["kron_mix_forward", "kron_mix_backward"]
    if conv:
        names += ["kron_delta_product", "kron_delta_expand", "kron_delta_grad_A", "kron_delta_grad_B",
                  "kron_delta_grad_U", "kron_delta_grad_V"]
    return names


def kernel_work(name, shape, blocks):
    """Multiply-adds (or values read, for the dA sum) of one launch of a weight-sized kernel."""
    M, T, a1, a2, b1, b2, r = shape
    return {
        "kron_fused_grad_A_sum": blocks * T * a1 * a2,
        "kron_delta_product": T * b1 * b2 * r,
        "kron_delta_expand": T * a1 * b1 * a2 * b2,
        "kron_delta_grad_A": T * a1 * b1 * a2 * b2,
        "kron_delta_grad_B": T * a1 * b1 * a2 * b2,
        "kron_delta_grad_U": T * b1 * b2 * r,
        "kron_delta_grad_V": T * b1 * b2 * r,
    }[name]


def layer_work(shape, conv):
    """The layer's own token work: the convolution's multiply-adds, or for a linear layer the values
    the Kronecker backward reads and writes (dy, x, dx) at the least."""
    M, T, a1, a2, b1, b2, r = shape
    d_out, d_in = a1 * b1, a2 * b2
    return M * d_out * d_in if conv else M * (d_out + 2 * d_in)


def plan_rows():
    for name, d_out, d_in, M, conv in sd_layers():
        for fname, factor in FACTORS.items():
            yield f"{name}-{fname}-M{M}", layer_shape(d_out, d_in, M, factor), conv


def test_token_kernels_reach_two_blocks_per_sm(sim):
    """At M >= 2048 every token-sized kernel of every SD layer launches >= 2 blocks per SM on 80,
    108 and 132 SMs; below that, a fused kernel that falls short already has one token per block."""
    table, short = [], []
    for tag, shape, conv in plan_rows():
        M = shape[0]
        for sms in SM_COUNTS:
            g = grids(sim, shape, sms)
            p = fused_plan(sim, shape, sms)
            row = [f"{tag} {shape[1:]} {sms} SMs:"]
            for name in step_kernels(sim, shape, conv):
                blocks, smem = g[name]
                assert blocks > 0, f"{tag}: {name} gets an empty grid"
                assert smem <= 48 * 1024, f"{tag}: {name} asks for {smem} B of dynamic shared memory"
                row.append(f"{name}={blocks} ({blocks / sms:.1f}/SM)")
                if blocks >= MIN_BLOCKS_PER_SM * sms:
                    continue
                if name in TOKEN_KERNELS:
                    assert M < BULK_MIN_TOKENS, f"{tag} on {sms} SMs: {name} launches {blocks} blocks"
                    if name.startswith("kron_fused"):
                        assert p["bm"] == 1 and M < MIN_BLOCKS_PER_SM * sms, (tag, sms, p)
                elif M >= BULK_MIN_TOKENS:
                    short.append((name, tag, sms, blocks))
            table.append(" ".join(row))
    print("\n".join(table))
    unlisted = sorted({name for name, *_ in short} - set(EXEMPT))
    assert not unlisted, f"kernels below {MIN_BLOCKS_PER_SM} blocks/SM and not in EXEMPT: {unlisted}: {short}"
    stale = sorted(set(EXEMPT) - {name for name, *_ in short})
    assert not stale, f"EXEMPT entries that reach {MIN_BLOCKS_PER_SM} blocks/SM everywhere: {stale}"


def test_exempt_kernels_are_weight_sized_and_small(sim):
    """Each EXEMPT kernel's grid is the same at M and 4M tokens (no token dimension) and its work is
    below 1 % of the layer's token work wherever it falls short."""
    for tag, shape, conv in plan_rows():
        M = shape[0]
        if M < BULK_MIN_TOKENS:
            continue
        bigger = (4 * M,) + shape[1:]
        for sms in SM_COUNTS:
            g, g4 = grids(sim, shape, sms), grids(sim, bigger, sms)
            for name in step_kernels(sim, shape, conv):
                blocks = g[name][0]
                if name not in EXEMPT or blocks >= MIN_BLOCKS_PER_SM * sms:
                    continue
                assert g4[name][0] == blocks, f"{tag}: {name}'s grid grows with M ({blocks} -> {g4[name][0]})"
                work, total = kernel_work(name, shape, g["kron_fused_backward"][0]), layer_work(shape, conv)
                assert work < 0.01 * total, \
                    f"{tag} on {sms} SMs: {name} does {work} of {total} ({EXEMPT[name]})"


def test_fused_tile_shrinks_until_every_sm_has_two_blocks(sim):
    """make_fused_plan: the largest token tile (<= 64 rows) that still gives 2 blocks per SM, for
    every dtype the same plan (fp16/bf16 accumulate in fp32), and a plan that depends on the SM
    count only through that floor."""
    for tag, shape, _ in plan_rows():
        M, _, a1, a2 = shape[:4]
        if not fused_plan(sim, shape, 1)["supported"]:
            continue
        cap = max(1, 64 // max(a1, a2))
        for sms in SM_COUNTS:
            plans = [fused_plan(sim, shape, sms, dt) for dt in (torch.float32, torch.float16, torch.bfloat16)]
            assert plans[0] == plans[1] == plans[2], (tag, plans)
            p = plans[0]
            assert p["bm"] == min(cap, max(1, M // (MIN_BLOCKS_PER_SM * sms))), (tag, sms, p)
            assert p["blocks"] == math.ceil(M / p["bm"]), (tag, sms, p)


# ---- Shared-memory bank conflicts ---------------------------------------------------------------
BANK_PATTERNS = ("dA loop: ds reads", "dA loop: tmat reads", "mix forward: A reads", "mix forward: tmat tile",
                 "mix backward: A reads", "mix backward: ds tile", "small-K tile: rank-tile reads",
                 "long-K tile: output stores")
# The worst degree each pattern may have with the padded layout. The dA loop's tmat reads reach 2
# where a warp straddles two terms (a1*a2 not a multiple of 32, e.g. 20 x 20): the two terms' column
# offsets differ by r. The long-K output stores (16 per thread per tile, once per tile) keep the
# 4x4 micro-tile layout: the four row groups a warp covers start on banks 4 apart.
MAX_DEGREE = dict(zip(BANK_PATTERNS, (1, 2, 1, 1, 1, 1, 1, 4)))


def bank_degrees(sim, shape, sms, unpadded):
    out = (_i64 * len(BANK_PATTERNS))()
    rc = sim.elr_kron_sim_bank_conflicts(DTYPE_CODE[torch.float16], c_shape(shape), sms, int(unpadded), out)
    assert rc == 0, rc
    return dict(zip(BANK_PATTERNS, out))


def test_shared_memory_bank_conflicts(sim):
    """The padded tiles (odd row stride T*r + 1, odd A term stride) at every fused SD shape, against
    the unpadded layout: the dA loop was 4-way (eq. 9) to 32-way (LoKr 32 x 40), the mixing's A reads
    2- to 4-way; now 1 (2 at term-straddling warps)."""
    report = []
    for tag, shape, _ in plan_rows():
        if not fused_plan(sim, shape, 1)["supported"]:
            continue
        for sms in SM_COUNTS:
            after, before = bank_degrees(sim, shape, sms, False), bank_degrees(sim, shape, sms, True)
            for pattern, limit in MAX_DEGREE.items():
                assert after[pattern] <= limit, f"{tag} on {sms} SMs: {pattern} is {after[pattern]}-way"
                assert after[pattern] <= before[pattern], f"{tag}: padding made {pattern} worse"
            pairs = ", ".join(f"{k} {before[k]}->{after[k]}" for k in BANK_PATTERNS)
            report.append(f"{tag} {sms} SMs: {pairs}")
    print("\n".join(report))
    # The unpadded layout, where the analysis says it conflicts (the check can see conflicts).
    eq9 = layer_shape(320, 320, 8192, None)    # A [4, 4, 4], T*r = 32
    lokr = layer_shape(320, 320, 8192, -1)     # A [4, 16, 16]
    assert bank_degrees(sim, eq9, 132, True)["dA loop: tmat reads"] == 4
    assert bank_degrees(sim, lokr, 132, True)["dA loop: tmat reads"] == 16
    assert bank_degrees(sim, lokr, 132, True)["mix forward: A reads"] == 4
    # fp64 accumulators use 8-byte words: the 4-byte model is not applied to them.
    out = (_i64 * len(BANK_PATTERNS))()
    assert sim.elr_kron_sim_bank_conflicts(DTYPE_CODE[torch.float64], c_shape(eq9), 132, 0, out) == -3


# ---- The launchers use these grids --------------------------------------------------------------
def test_simulated_launches_use_the_planned_grids(sim):
    """Each launcher, run in the simulator at a given SM count, starts exactly the blocks kron_grid
    reports (launch statistics), so the plans above are what a GPU gets."""
    shape, sms, dtype = (37, 4, 4, 4, 24, 16, 8), 8, torch.float32  # eq. 9, M not a tile multiple
    M, T, a1, a2, b1, b2, r = shape
    g = grids(sim, shape, sms, dtype)
    assert g["kron_fused_forward"][0] > 1 and g["kron_fused_backward"][0] == g["kron_fused_forward"][0]
    x, A, U, V = random_factors(shape, dtype)
    dy = torch.randn(M, a1 * b1, dtype=dtype)
    grad = torch.randn(a1 * b1, a2 * b2, dtype=dtype)
    y, dx = poisoned((M, a1 * b1), dtype), poisoned((M, a2 * b2), dtype)
    dA, dt = poisoned((T, a1, a2), dtype), poisoned((M * a2, T * r), dtype)
    tmat, smat = poisoned((M * a2, T * r), dtype), poisoned((M * a1, T * r), dtype)
    dW, dAw, dUw, dVw = (poisoned(size, dtype)
                         for size in ((a1 * b1, a2 * b2), (T, a1, a2), (T, b1, r), (T, r, b2)))
    stats = torch.zeros(5, 6, dtype=torch.int64).share_memory_()
    code, cs = DTYPE_CODE[dtype], c_shape(shape)

    def measure(row, call):
        sim.elr_cuda_sim_reset_stats()
        call()
        sim.elr_cuda_sim_stats(ctypes.cast(stats[row].data_ptr(), _shape_p))

    def child():
        sim.elr_cuda_sim_set_sm_count(sms)
        assert sim.elr_kron_sim_device_sm_count() == sms
        measure(0, lambda: sim.elr_kron_sim_forward(code, cs, *map(ptr, (x, A, U, V, y)), 0, 1.0, None, None))
        measure(1, lambda: sim.elr_kron_sim_backward(code, cs, *map(ptr, (dy, x, A, U, V)), None, 1.0,
                                                     ptr(dx), 0, ptr(dA), None, ptr(dt)))
        measure(2, lambda: (sim.elr_kron_sim_mix_forward(code, cs, ptr(A), ptr(tmat), ptr(smat)),
                            sim.elr_kron_sim_mix_backward(code, cs, ptr(A), ptr(smat), ptr(tmat))))
        measure(3, lambda: sim.elr_kron_sim_delta(code, cs, ptr(A), ptr(U), ptr(V), ptr(dW)))
        measure(4, lambda: sim.elr_kron_sim_delta_backward(code, cs, ptr(grad), ptr(A), ptr(U), ptr(V),
                                                           ptr(dAw), ptr(dUw), ptr(dVw)))

    run_in_child(child)
    blocks = {name: b for name, (b, _) in g.items()}
    expected = [
        (1, blocks["kron_fused_forward"]),
        (2, blocks["kron_fused_backward"] + blocks["kron_fused_grad_A_sum"]),
        (2, blocks["kron_mix_forward"] + blocks["kron_mix_backward"]),
        (2, blocks["kron_delta_product"] + blocks["kron_delta_expand"]),
        (5, blocks["kron_delta_product"] + blocks["kron_delta_grad_A"] + blocks["kron_delta_grad_B"]
         + blocks["kron_delta_grad_U"] + blocks["kron_delta_grad_V"]),
    ]
    for row, (launches, total) in enumerate(expected):
        assert stats[row, 0] == launches and stats[row, 1] == total, f"launcher {row}: {stats[row].tolist()}"
    assert stats[0, 2] == blocks["kron_fused_forward"]  # one 1-D grid of that many blocks
