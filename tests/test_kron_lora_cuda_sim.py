"""The Kronecker LoRA CUDA kernels (csrc/kernels/kron_lora.cuh) run on the CPU through tests/cuda_sim
(DESIGN.md 5), against a float64 reference written here that builds dW = sum_t A_t kron (U_t V_t)
with torch.kron (the one place dW is built on the linear path) and differentiates it with autograd.

Covered: the fused forward (with and without accumulating onto a base y, tmat/smat written out), the
fused backward (saved or recomputed tmat/smat, dx accumulated or written, any subset of dx/dA/dU/dV),
the GEMM path's mixing kernels (the GEMMs around them done by torch here, as the ATen wrapper does
with cuBLAS), and kron_delta forward/backward. Shapes: T = 1 and r = 1, non-square factors, odd
sizes, M = 1, 128-bit and scalar IO, several column / K chunks, the widest rank tile (T*r = 128) and
a token count that is not a multiple of the token tile (with split weight-gradient reductions).
Every kernel call runs in a forked child with a timeout, outputs NaN-poisoned (cuda_sim/harness.py).
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from cuda_sim.build import SimBuildUnavailable, _dbl, _i64, _int, _vp, compiler, load_sim
from cuda_sim.harness import assert_close, poisoned, ptr, run_in_child, shared

DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_shape_p = ctypes.POINTER(_i64)

# (M, T, a1, a2, b1, b2, r)
SHAPES = {
    "T1-r1": (5, 1, 2, 3, 4, 5, 1),           # one term, rank 1, a1 != a2, b1 != b2
    "odd": (7, 3, 2, 3, 5, 7, 3),             # odd everything, T*r = 9 padded to 12 columns
    "M1": (1, 3, 2, 3, 5, 7, 3),              # a single token
    "vec": (3, 2, 4, 4, 8, 16, 4),            # rows of b1, b2 take 128-bit packs in every dtype
    "rank128": (2, 4, 2, 3, 8, 24, 32),       # T*r = 128: the widest fused tile, in-block split-K
    "chunks": (2, 3, 2, 3, 520, 40, 3),       # several y column chunks and x K chunks, with tails
    "chunks-scalar": (3, 2, 3, 2, 300, 37, 4),  # the same through the scalar (non-128-bit) path
}
# A token count that is not a multiple of the token tile (checked below), with row-split
# weight-gradient reductions.
EDGE_SHAPE = (259, 3, 2, 3, 5, 7, 3)


@pytest.fixture(scope="module")
def sim():
    if compiler() is None:
        pytest.skip("no C++ compiler (g++) to build the CUDA simulation")
    try:
        return load_sim("kron_lora_sim", {
            "elr_kron_sim_plan": ([_int, _shape_p, _shape_p], _int),
            "elr_kron_sim_forward": ([_int, _shape_p] + [_vp] * 5 + [_int, _dbl, _vp, _vp], _int),
            "elr_kron_sim_backward": ([_int, _shape_p] + [_vp] * 7 + [_dbl, _vp, _int, _vp, _vp, _vp], _int),
            "elr_kron_sim_mix_forward": ([_int, _shape_p, _vp, _vp, _vp], _int),
            "elr_kron_sim_mix_backward": ([_int, _shape_p, _vp, _vp, _vp], _int),
            "elr_kron_sim_mix_grad_A": ([_int, _shape_p, _vp, _vp, _vp], _int),
            "elr_kron_sim_delta": ([_int, _shape_p, _vp, _vp, _vp, _vp], _int),
            "elr_kron_sim_delta_backward": ([_int, _shape_p] + [_vp] * 7, _int),
        })
    except SimBuildUnavailable as err:
        pytest.skip(f"CUDA simulation unavailable: {err}")


def case_ids(cases):
    return [f"{name}-{str(dtype).split('.')[-1]}" for name, dtype in cases]


def c_shape(shape):
    return (_i64 * 7)(*shape)


def plan(sim, shape, dtype):
    out = (_i64 * 5)()
    assert sim.elr_kron_sim_plan(DTYPE_CODE[dtype], c_shape(shape), out) == 0
    return {"supported": bool(out[0]), "bm": out[1], "rp": out[2], "blocks": out[3], "smem": out[4]}


# ---- Reference (float64, eq. 9) and the unfused eager path in the inputs' dtype ------------------
def kron_delta_reference(A, U, V):
    return sum(torch.kron(A[t], U[t] @ V[t]) for t in range(A.shape[0]))


def rank_intermediates(x, A, V):
    """tmat [M, a2, T*r] and smat [M, a1, T*r] as the unfused eager path stores them (einsum in
    x's dtype, column j = t * r + s)."""
    T, a1, a2 = A.shape
    r, b2 = V.shape[1:]
    t = torch.einsum("mpq,tsq->mpts", x.reshape(-1, a2, b2), V)
    s = torch.einsum("tip,mpts->mits", A, t)
    return t.reshape(-1, a2, T * r), s.reshape(-1, a1, T * r)


def kron_eager(x, A, U, V, scale):
    """The kron term through the rank-r intermediates, never building dW (same dtype baseline)."""
    T, a1, _ = A.shape
    b1, r = U.shape[1:]
    t, s = rank_intermediates(x, A, V)
    y = torch.einsum("mits,tks->mik", s.reshape(-1, a1, T, r), U).reshape(x.shape[0], a1 * b1)
    return y * scale, t, s


def reference_results(x, A, U, V, dy, scale, dtype):
    """{'ref': float64 via torch.kron, 'eager': unfused path in dtype}: each (y, dx, dA, dU, dV, tmat, smat)
    with y the kron term alone (scale * x dW^T)."""
    results = {}
    for name in ("ref", "eager"):
        cast = torch.float64 if name == "ref" else dtype
        leaves = [t.detach().to(cast).requires_grad_() for t in (x, A, U, V)]
        if name == "ref":
            y = scale * leaves[0] @ kron_delta_reference(*leaves[1:]).T
            tmat, smat = rank_intermediates(leaves[0], leaves[1], leaves[3])
        else:
            y, tmat, smat = kron_eager(*leaves, scale)
        grads = torch.autograd.grad(y, leaves, dy.to(cast))
        results[name] = (y.detach(), *grads, tmat.detach(), smat.detach())
    return results["ref"], results["eager"]


def random_factors(shape, dtype):
    M, T, a1, a2, b1, b2, r = shape
    x = torch.randn(M, a2 * b2, dtype=torch.float64)
    A = torch.randn(T, a1, a2, dtype=torch.float64)
    U = torch.randn(T, b1, r, dtype=torch.float64) * 0.5
    V = torch.randn(T, r, b2, dtype=torch.float64) / b2**0.5
    return [t.to(dtype).contiguous() for t in (x, A, U, V)]


class FusedCase:
    """Inputs, poisoned outputs and the calls of one fused forward + backward problem."""

    def __init__(self, shape, dtype, scale=0.75):
        M, T, a1, a2, b1, b2, r = shape
        R = T * r
        self.shape, self.dtype, self.scale = shape, dtype, scale
        self.cshape = c_shape(shape)
        self.x, self.A, self.U, self.V = random_factors(shape, dtype)
        self.dy = torch.randn(M, a1 * b1, dtype=torch.float64).to(dtype)
        self.y0 = torch.randn(M, a1 * b1, dtype=torch.float64).to(dtype)   # the base x W^T + bias
        self.dx0 = torch.randn(M, a2 * b2, dtype=torch.float64).to(dtype)  # the base dy W
        self.y = poisoned((M, a1 * b1), dtype)       # written (no base)
        self.y_acc = shared(self.y0)                 # accumulated onto the base
        self.tmat = poisoned((M, a2, R), dtype)
        self.smat = poisoned((M, a1, R), dtype)
        # Backward with the saved tmat/smat, dx accumulated; and recomputing them, dx written.
        self.saved = {"dx": shared(self.dx0), "dA": poisoned((T, a1, a2), dtype),
                      "dU": poisoned((T, b1, r), dtype), "dV": poisoned((T, r, b2), dtype)}
        self.recomputed = {"dx": poisoned((M, a2 * b2), dtype), "dA": poisoned((T, a1, a2), dtype),
                           "dU": poisoned((T, b1, r), dtype), "dV": poisoned((T, r, b2), dtype)}

    def forward(self, lib, y, accumulate, tmat=None, smat=None):
        inputs = map(ptr, (self.x, self.A, self.U, self.V))
        rc = lib.elr_kron_sim_forward(DTYPE_CODE[self.dtype], self.cshape, *inputs, ptr(y), int(accumulate),
                                      self.scale, ptr(tmat), ptr(smat))
        assert rc == 0, f"forward returned {rc}"

    def backward(self, lib, grads, accumulate_dx, use_saved, want=("dx", "dA", "dU", "dV")):
        outs = [ptr(grads[name]) if name in want else None for name in ("dx", "dA", "dU", "dV")]
        inputs = map(ptr, (self.dy, self.x, self.A, self.U, self.V))
        saved = (ptr(self.tmat), ptr(self.smat)) if use_saved else (None, None)
        rc = lib.elr_kron_sim_backward(DTYPE_CODE[self.dtype], self.cshape, *inputs, *saved, self.scale,
                                       outs[0], int(accumulate_dx), *outs[1:])
        assert rc == 0, f"backward returned {rc}"

    def run_all(self, lib):
        self.forward(lib, self.y, False, self.tmat, self.smat)
        self.forward(lib, self.y_acc, True)
        self.backward(lib, self.saved, accumulate_dx=True, use_saved=True)
        self.backward(lib, self.recomputed, accumulate_dx=False, use_saved=False)

    def check(self, grads=("dx", "dA", "dU", "dV")):
        ref, eager = reference_results(self.x, self.A, self.U, self.V, self.dy, self.scale, self.dtype)
        tag = f"{self.shape} {self.dtype}"
        assert_close(self.y, ref[0], eager[0], f"{tag}: y")
        assert_close(self.y_acc, self.y0.double() + ref[0], self.y0 + eager[0], f"{tag}: y accumulated")
        assert_close(self.tmat, ref[5], eager[5], f"{tag}: tmat")
        assert_close(self.smat, ref[6], eager[6], f"{tag}: smat")
        for i, name in enumerate(("dx", "dA", "dU", "dV"), start=1):
            if name not in grads:
                continue
            assert_close(self.recomputed[name], ref[i], eager[i], f"{tag}: {name} (tmat/smat recomputed)")
            if name == "dx":
                assert_close(self.saved[name], self.dx0.double() + ref[i], self.dx0 + eager[i],
                             f"{tag}: dx accumulated")
            else:
                # The recomputed tmat/smat are the forward's bits, so the weight gradients are too.
                assert torch.equal(self.saved[name], self.recomputed[name]), \
                    f"{tag}: {name} differs between saved and recomputed tmat/smat"


# ---- Fused path -----------------------------------------------------------------------------------
FUSED_CASES = [(name, dtype) for name in SHAPES for dtype in (torch.float32, torch.float64, torch.float16)]
FUSED_CASES += [("odd", torch.bfloat16), ("vec", torch.bfloat16)]


@pytest.mark.parametrize("name,dtype", FUSED_CASES, ids=case_ids(FUSED_CASES))
def test_fused_forward_backward_match_fp64_reference(sim, name, dtype):
    shape = SHAPES[name]
    assert plan(sim, shape, dtype)["supported"]
    case = FusedCase(shape, dtype)
    run_in_child(lambda: case.run_all(sim))
    case.check()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_fused_tile_edge_split_reductions_and_determinism(sim, dtype):
    """M not a multiple of the token tile (the last block has fewer tokens), several row splits in the
    dU / dV reductions, and a second backward giving the same bits (no float atomics)."""
    p = plan(sim, EDGE_SHAPE, dtype)
    M = EDGE_SHAPE[0]
    assert p["supported"] and p["bm"] > 1 and M % p["bm"] != 0, p
    case = FusedCase(EDGE_SHAPE, dtype)
    again = {name: poisoned(t.shape, dtype) for name, t in case.recomputed.items()}

    def child():
        case.forward(sim, case.y, False, case.tmat, case.smat)
        case.forward(sim, case.y_acc, True)
        case.backward(sim, case.saved, accumulate_dx=True, use_saved=True)
        sim.elr_cuda_sim_reset_stats()
        case.backward(sim, case.recomputed, accumulate_dx=False, use_saved=False)
        sim.elr_cuda_sim_stats(ctypes.cast(stats.data_ptr(), _shape_p))
        case.backward(sim, again, accumulate_dx=False, use_saved=False)

    stats = torch.zeros(6, dtype=torch.int64).share_memory_()
    run_in_child(child)
    assert stats[2] >= p["blocks"] and stats[3] > 1, f"expected token tiles and split reductions: {stats}"
    case.check()
    for name, t in again.items():
        assert torch.equal(t, case.recomputed[name]), f"{name}: a second run differs (not deterministic)"


@pytest.mark.parametrize("want", [("dx",), ("dA",), ("dU",), ("dV",), ("dA", "dV")],
                         ids=["dx", "dA", "dU", "dV", "dA+dV"])
@pytest.mark.parametrize("use_saved", [True, False], ids=["saved", "recomputed"])
def test_fused_backward_writes_only_requested_outputs(sim, want, use_saved):
    case = FusedCase(SHAPES["odd"], torch.float32)

    def child():
        case.forward(sim, case.y, False, case.tmat, case.smat)
        case.backward(sim, case.recomputed, accumulate_dx=False, use_saved=use_saved, want=want)

    run_in_child(child)
    ref, eager = reference_results(case.x, case.A, case.U, case.V, case.dy, case.scale, case.dtype)
    for i, name in enumerate(("dx", "dA", "dU", "dV"), start=1):
        if name in want:
            assert_close(case.recomputed[name], ref[i], eager[i], f"{name} alone")
        else:
            assert torch.isnan(case.recomputed[name]).all(), f"{name} was written though not requested"


def test_fused_predicate(sim):
    """T*r <= 128 and a1, a2 <= 32, and a one-token tile within 48 KiB of shared memory."""
    f32, f64 = torch.float32, torch.float64
    assert plan(sim, (64, 4, 4, 4, 320, 320, 32), f32)["supported"]       # T*r = 128
    assert not plan(sim, (64, 3, 4, 4, 320, 320, 43), f32)["supported"]   # T*r = 129
    assert not plan(sim, (64, 2, 33, 2, 40, 40, 4), f32)["supported"]     # a1 = 33
    assert not plan(sim, (64, 2, 2, 33, 40, 40, 4), f32)["supported"]     # a2 = 33
    wide = (64, 2, 16, 16, 80, 80, 64)                                     # fits in fp32, not in fp64
    assert plan(sim, wide, f32)["supported"] and not plan(sim, wide, f64)["supported"]
    for dtype in (f32, f64, torch.float16):
        p = plan(sim, (4096, 4, 4, 4, 320, 320, 16), dtype)
        assert p["supported"] and p["smem"] <= 48 * 1024 and p["blocks"] * p["bm"] >= 4096
    # The fused entry points refuse what the predicate refuses.
    x = torch.zeros(1)
    rc = sim.elr_kron_sim_forward(0, c_shape((2, 3, 4, 4, 8, 8, 43)), *[ptr(x)] * 5, 0, 1.0, None, None)
    assert rc == -2


# ---- GEMM path: the mixing kernels, with the GEMMs done by torch around them -------------------------
GEMM_SHAPES = {"odd": (7, 3, 2, 3, 5, 7, 3), "T1-r1": (4, 1, 3, 2, 3, 4, 1), "wide-A": (3, 2, 34, 5, 2, 3, 3)}
GEMM_CASES = [(n, d) for n in GEMM_SHAPES for d in (torch.float32, torch.float64, torch.float16)]


@pytest.mark.parametrize("name,dtype", GEMM_CASES, ids=case_ids(GEMM_CASES))
def test_gemm_path_matches_fp64_reference(sim, name, dtype):
    shape = GEMM_SHAPES[name]
    M, T, a1, a2, b1, b2, r = shape
    R, scale, code, cs = T * r, 0.5, DTYPE_CODE[dtype], c_shape(shape)
    x, A, U, V = random_factors(shape, dtype)
    dy = torch.randn(M, a1 * b1, dtype=torch.float64).to(dtype)
    v_cat = V.reshape(R, b2)                                    # V_cat[j, q] = V[t, s, q]
    u_cat = U.permute(0, 2, 1).reshape(R, b1).contiguous()      # U_cat[j, k] = U[t, k, s]
    x2, dy2 = x.reshape(M * a2, b2), dy.reshape(M * a1, b1)

    # Forward: tmat = X V_cat^T (cuBLAS in the wrapper), smat by the mixing kernel, y = scale * smat U_cat.
    tmat = (x2 @ v_cat.T).contiguous()
    smat = poisoned((M * a1, R), dtype)

    def child_forward():
        assert sim.elr_kron_sim_mix_forward(code, cs, ptr(A), ptr(tmat), ptr(smat)) == 0

    run_in_child(child_forward)
    y = (smat @ u_cat) * scale
    # Backward: ds = scale * dy U_cat^T; dt and dA by the kernels; dx, dU, dV by GEMMs.
    ds = ((dy2 @ u_cat.T) * scale).contiguous()
    dt = poisoned((M * a2, R), dtype)
    dA = poisoned((T, a1, a2), dtype)

    def child():
        assert sim.elr_kron_sim_mix_backward(code, cs, ptr(A), ptr(ds), ptr(dt)) == 0
        assert sim.elr_kron_sim_mix_grad_A(code, cs, ptr(ds), ptr(tmat), ptr(dA)) == 0

    run_in_child(child)
    dx = dt @ v_cat
    dU = (scale * (smat.T @ dy2)).reshape(T, r, b1).permute(0, 2, 1)
    dV = (dt.T @ x2).reshape(T, r, b2)

    ref, eager = reference_results(x, A, U, V, dy, scale, dtype)
    tag = f"{shape} {dtype}"
    # Each kernel on its own inputs (tight), then the composition against the fp64 reference.
    exact = {
        "smat": (smat, torch.einsum("tip,mpts->mits", A.double(), tmat.double().reshape(M, a2, T, r))),
        "dt": (dt, torch.einsum("tip,mits->mpts", A.double(), ds.double().reshape(M, a1, T, r))),
        "dA": (dA, torch.einsum("mits,mpts->tip", ds.double().reshape(M, a1, T, r),
                                tmat.double().reshape(M, a2, T, r))),
    }
    for what, (got, want) in exact.items():
        want = want.reshape(got.shape)
        assert not torch.isnan(got).any(), f"{tag}: {what} left unwritten"
        tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, torch.finfo(dtype).eps)
        err = (got.double() - want).abs().max().item()
        assert err <= tol * (want.abs().max().item() + 1e-30), f"{tag}: {what} error {err:.3e}"
    assert_close(y.reshape(M, a1 * b1), ref[0], eager[0], f"{tag}: y")
    for i, (what, got) in enumerate((("dx", dx.reshape(M, -1)), ("dA", dA), ("dU", dU), ("dV", dV)), start=1):
        assert_close(got, ref[i], eager[i], f"{tag}: {what}")


# ---- kron_delta ---------------------------------------------------------------------------------------
DELTA_SHAPES = {"T1-r1": (0, 1, 2, 3, 4, 5, 1), "odd": (0, 3, 2, 3, 5, 7, 3), "square": (0, 4, 4, 4, 6, 6, 2)}
DELTA_CASES = [(n, d) for n in DELTA_SHAPES for d in (torch.float32, torch.float64, torch.float16)]


@pytest.mark.parametrize("name,dtype", DELTA_CASES, ids=case_ids(DELTA_CASES))
def test_kron_delta_forward_backward_match_fp64_reference(sim, name, dtype):
    shape = DELTA_SHAPES[name]
    _, T, a1, a2, b1, b2, r = shape
    code, cs = DTYPE_CODE[dtype], c_shape(shape)
    _, A, U, V = random_factors((1,) + shape[1:], dtype)
    grad = torch.randn(a1 * b1, a2 * b2, dtype=torch.float64).to(dtype)
    dW = poisoned((a1 * b1, a2 * b2), dtype)
    dA, dU, dV = poisoned((T, a1, a2), dtype), poisoned((T, b1, r), dtype), poisoned((T, r, b2), dtype)
    dA_only = poisoned((T, a1, a2), dtype)
    dV_only = poisoned((T, r, b2), dtype)

    def child():
        assert sim.elr_kron_sim_delta(code, cs, ptr(A), ptr(U), ptr(V), ptr(dW)) == 0
        args = (code, cs, ptr(grad), ptr(A), ptr(U), ptr(V))
        assert sim.elr_kron_sim_delta_backward(*args, ptr(dA), ptr(dU), ptr(dV)) == 0
        assert sim.elr_kron_sim_delta_backward(*args, ptr(dA_only), None, None) == 0
        assert sim.elr_kron_sim_delta_backward(*args, None, None, ptr(dV_only)) == 0

    run_in_child(child)
    results = {}
    for which, cast in (("ref", torch.float64), ("eager", dtype)):
        leaves = [t.to(cast).requires_grad_() for t in (A, U, V)]
        out = kron_delta_reference(*leaves)
        results[which] = (out.detach(), *torch.autograd.grad(out, leaves, grad.to(cast)))
    ref, eager = results["ref"], results["eager"]
    tag = f"{shape[1:]} {dtype}"
    for i, (what, got) in enumerate((("dW", dW), ("dA", dA), ("dU", dU), ("dV", dV))):
        assert_close(got, ref[i], eager[i], f"{tag}: {what}")
    assert torch.equal(dA_only, dA) and torch.equal(dV_only, dV), f"{tag}: partial masks change the results"
