"""The Kronecker LoRA CUDA kernels (csrc/kernels/kron_lora.cuh) run on the CPU through tests/cuda_sim
(docs/testing.md, "The CUDA simulator"), against a float64 reference written here that builds
dW = sum_t A_t kron (U_t V_t) with torch.kron (the one place dW is built on the linear path) and
differentiates it with autograd.

Covered: the fused forward (with and without accumulating onto a base y, tmat/smat written out), the
fused backward (saved or recomputed tmat, dx accumulated or written, any subset of dx/dA and the
smat/dt that the weight-gradient GEMMs take), the GEMM path's mixing kernels, and kron_delta
forward/backward. The GEMMs of the ATen wrapper (csrc/cuda/kron_lora.cu: dU = scale * smat^T dy,
dV = dt^T x, the GEMM path's products and dA) run here in torch on the simulated outputs, with the
wrapper's precision (fp32 accumulation and result for fp16/bf16, rounded once), so dx/dA/dU/dV are
checked end to end against the fp64 reference. Shapes: T = 1 and r = 1, non-square factors, odd
sizes, M = 1, 128-bit and scalar IO, several column / K chunks, the widest rank tile (T*r = 128),
the eq. 9 factorisation of the modules (A [n, n, n], n = T = 4, r = 8) and a token count that is
not a multiple of the token tile; fp32, fp16, bf16 (and fp64 where it fits). Every kernel call runs
in a forked child with a timeout, outputs NaN-poisoned (cuda_sim/harness.py).
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
    "eq9": (37, 4, 4, 4, 24, 16, 8),          # eq. 9: n = T = 4, r = 8 (T*r = 32, the padded tile rows)
    "eq9-scalar": (9, 4, 4, 4, 5, 10, 8),     # eq. 9 with rows too short for 128-bit packs
}
# A token count that is not a multiple of the token tile (checked below) at two simulated SM counts
# (different token tiles, so different dA partial counts).
EDGE_SHAPE = (259, 3, 2, 3, 5, 7, 3)


SIM_FUNCTIONS = {
    "elr_kron_sim_device_sm_count": ([], _int),
    "elr_kron_sim_plan": ([_int, _shape_p, _int, _shape_p], _int),
    "elr_kron_sim_kernel_count": ([], _int),
    "elr_kron_sim_kernel_name": ([_int], ctypes.c_char_p),
    "elr_kron_sim_grids": ([_int, _shape_p, _int, _shape_p], _int),
    "elr_kron_sim_bank_conflicts": ([_int, _shape_p, _int, _int, _shape_p], _int),
    "elr_kron_sim_forward": ([_int, _shape_p] + [_vp] * 5 + [_int, _dbl, _vp, _vp], _int),
    "elr_kron_sim_backward": ([_int, _shape_p] + [_vp] * 6 + [_dbl, _vp, _int, _vp, _vp, _vp], _int),
    "elr_kron_sim_mix_forward": ([_int, _shape_p, _vp, _vp, _vp], _int),
    "elr_kron_sim_mix_backward": ([_int, _shape_p, _vp, _vp, _vp], _int),
    "elr_kron_sim_delta": ([_int, _shape_p, _vp, _vp, _vp, _vp], _int),
    "elr_kron_sim_delta_backward": ([_int, _shape_p] + [_vp] * 7, _int),
}


@pytest.fixture(scope="module")
def sim():
    if compiler() is None:
        pytest.skip("no C++ compiler (g++) to build the CUDA simulation")
    try:
        return load_sim("kron_lora_sim", SIM_FUNCTIONS)
    except SimBuildUnavailable as err:
        pytest.skip(f"CUDA simulation unavailable: {err}")


def case_ids(cases):
    return [f"{name}-{str(dtype).split('.')[-1]}" for name, dtype in cases]


def c_shape(shape):
    return (_i64 * 7)(*shape)


def plan(sim, shape, dtype, sm_count=None):
    """The fused tiling of the shape; by default for the SM count the simulated launches use."""
    sms = sim.elr_kron_sim_device_sm_count() if sm_count is None else sm_count
    out = (_i64 * 8)()
    assert sim.elr_kron_sim_plan(DTYPE_CODE[dtype], c_shape(shape), sms, out) == 0
    return {"supported": bool(out[0]), "bm": out[1], "rp": out[2], "ld": out[3], "a_ld": out[4],
            "blocks": out[5], "smem": out[6], "rows_in": out[7]}


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


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def wrapper_mm(a, b):
    """a @ b as the ATen wrapper's mm_acc: fp32 accumulation and result for fp16/bf16."""
    acc = acc_dtype(a.dtype)
    return a.to(acc) @ b.to(acc)


def wrapper_weight_grads(shape, smat2, dt2, dy, x, scale, dtype):
    """dU and dV from the rank-space intermediates as csrc/cuda/kron_lora.cu's grad_U / grad_V:
    dU_cat = scale * smat^T dy, dV = dt^T x, each rounded to the dtype once."""
    M, T, a1, a2, b1, b2, r = shape
    dU = dV = None
    if smat2 is not None:
        duc = wrapper_mm(smat2.reshape(M * a1, T * r).T, dy.reshape(M * a1, b1)) * scale
        dU = duc.reshape(T, r, b1).permute(0, 2, 1).to(dtype)
    if dt2 is not None:
        dV = wrapper_mm(dt2.reshape(M * a2, T * r).T, x.reshape(M * a2, b2)).reshape(T, r, b2).to(dtype)
    return dU, dV


class FusedCase:
    """Inputs, poisoned outputs and the calls of one fused forward + backward problem. The backward
    kernel's outputs are dx, dA and the weight-gradient GEMMs' inputs: dt, and smat when the
    forward's is not passed in (then the kernel recomputes it)."""

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
        self.saved = self.outputs(shared(self.dx0))
        self.recomputed = self.outputs(poisoned((M, a2 * b2), dtype))

    def outputs(self, dx):
        M, T, a1, a2, _, _, r = self.shape
        return {"dx": dx, "dA": poisoned((T, a1, a2), self.dtype),
                "smat": poisoned((M * a1, T * r), self.dtype), "dt": poisoned((M * a2, T * r), self.dtype)}

    def forward(self, lib, y, accumulate, tmat=None, smat=None):
        inputs = map(ptr, (self.x, self.A, self.U, self.V))
        rc = lib.elr_kron_sim_forward(DTYPE_CODE[self.dtype], self.cshape, *inputs, ptr(y), int(accumulate),
                                      self.scale, ptr(tmat), ptr(smat))
        assert rc == 0, f"forward returned {rc}"

    def backward(self, lib, outs, accumulate_dx, use_saved, want=("dx", "dA", "dU", "dV")):
        """The kernel call the ATen wrapper makes for the gradients in `want`: smat only for dU
        without a saved smat, dt only for dV."""
        kernel = {"dx": "dx" in want, "dA": "dA" in want, "smat": "dU" in want and not use_saved,
                  "dt": "dV" in want}
        args = [ptr(outs[name]) if kernel[name] else None for name in ("dx", "dA", "smat", "dt")]
        inputs = map(ptr, (self.dy, self.x, self.A, self.U, self.V))
        rc = lib.elr_kron_sim_backward(DTYPE_CODE[self.dtype], self.cshape, *inputs,
                                       ptr(self.tmat) if use_saved else None, self.scale, args[0],
                                       int(accumulate_dx), *args[1:])
        assert rc == 0, f"backward returned {rc}"

    def run_all(self, lib):
        self.forward(lib, self.y, False, self.tmat, self.smat)
        self.forward(lib, self.y_acc, True)
        self.backward(lib, self.saved, accumulate_dx=True, use_saved=True)
        self.backward(lib, self.recomputed, accumulate_dx=False, use_saved=False)

    def weight_grads(self, outs, use_saved):
        smat = self.smat if use_saved else outs["smat"]
        return wrapper_weight_grads(self.shape, smat, outs["dt"], self.dy, self.x, self.scale, self.dtype)

    def check(self):
        ref, eager = reference_results(self.x, self.A, self.U, self.V, self.dy, self.scale, self.dtype)
        tag = f"{self.shape} {self.dtype}"
        assert_close(self.y, ref[0], eager[0], f"{tag}: y")
        assert_close(self.y_acc, self.y0.double() + ref[0], self.y0 + eager[0], f"{tag}: y accumulated")
        assert_close(self.tmat, ref[5], eager[5], f"{tag}: tmat")
        assert_close(self.smat, ref[6], eager[6], f"{tag}: smat")
        # The recomputed tmat/smat are the forward's bits, so everything downstream is too.
        assert torch.equal(self.recomputed["smat"], self.smat.reshape(self.recomputed["smat"].shape)), \
            f"{tag}: the backward's recomputed smat differs from the forward's"
        for name in ("dA", "dt"):
            assert torch.equal(self.saved[name], self.recomputed[name]), \
                f"{tag}: {name} differs between saved and recomputed tmat/smat"
        assert_close(self.recomputed["dx"], ref[1], eager[1], f"{tag}: dx")
        assert_close(self.saved["dx"], self.dx0.double() + ref[1], self.dx0 + eager[1],
                     f"{tag}: dx accumulated")
        assert_close(self.recomputed["dA"], ref[2], eager[2], f"{tag}: dA")
        # dt is rounded to the dtype where the unfused path stores it.
        dt_eager = eager_dt(self.x, self.A, self.U, self.V, self.dy, self.scale)
        dt_ref = eager_dt(*(t.double() for t in (self.x, self.A, self.U, self.V, self.dy)), self.scale)
        assert_close(self.recomputed["dt"], dt_ref, dt_eager, f"{tag}: dt")
        for use_saved, outs in ((True, self.saved), (False, self.recomputed)):
            dU, dV = self.weight_grads(outs, use_saved)
            how = "saved" if use_saved else "recomputed"
            assert_close(dU, ref[3], eager[3], f"{tag}: dU ({how} smat)")
            assert_close(dV, ref[4], eager[4], f"{tag}: dV")


def eager_dt(x, A, U, V, dy, scale):
    """dt [M*a2, T*r] = A^T ds with ds = scale * dy U_cat^T, as the unfused path computes it."""
    T, a1, a2 = A.shape
    b1, r = U.shape[1:]
    ds = scale * torch.einsum("mik,tks->mits", dy.reshape(-1, a1, b1), U)
    return torch.einsum("tip,mits->mpts", A, ds).reshape(-1, T * r)


# ---- Fused path -----------------------------------------------------------------------------------
FUSED_CASES = [(name, dtype) for name in SHAPES for dtype in (torch.float32, torch.float64, torch.float16)]
FUSED_CASES += [(name, torch.bfloat16) for name in ("odd", "vec", "rank128", "eq9", "eq9-scalar")]


@pytest.mark.parametrize("name,dtype", FUSED_CASES, ids=case_ids(FUSED_CASES))
def test_fused_forward_backward_match_fp64_reference(sim, name, dtype):
    shape = SHAPES[name]
    assert plan(sim, shape, dtype)["supported"]
    case = FusedCase(shape, dtype)
    run_in_child(lambda: case.run_all(sim))
    case.check()


@pytest.mark.slow
@pytest.mark.parametrize("sm_count", [4, 16], ids=["4SMs", "16SMs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_fused_tile_edge_and_determinism(sim, dtype, sm_count):
    """M not a multiple of the token tile (the last block has fewer tokens), the token tile the
    planner picks for the SM count (more SMs: smaller tiles, more dA partials), and a second
    backward giving the same bits (no float atomics)."""
    p = plan(sim, EDGE_SHAPE, dtype, sm_count)
    M = EDGE_SHAPE[0]
    assert p["supported"] and p["bm"] > 1 and M % p["bm"] != 0, p
    assert p["blocks"] >= 2 * sm_count, p  # the planner's floor of two blocks per SM
    case = FusedCase(EDGE_SHAPE, dtype)
    again = {name: poisoned(t.shape, dtype) for name, t in case.recomputed.items()}

    def child():
        sim.elr_cuda_sim_set_sm_count(sm_count)
        case.forward(sim, case.y, False, case.tmat, case.smat)
        case.forward(sim, case.y_acc, True)
        case.backward(sim, case.saved, accumulate_dx=True, use_saved=True)
        sim.elr_cuda_sim_reset_stats()
        case.backward(sim, case.recomputed, accumulate_dx=False, use_saved=False)
        sim.elr_cuda_sim_stats(ctypes.cast(stats.data_ptr(), _shape_p))
        case.backward(sim, again, accumulate_dx=False, use_saved=False)

    stats = torch.zeros(6, dtype=torch.int64).share_memory_()
    run_in_child(child)
    # The tile kernel and the fixed-order dA sum (one block per dA element).
    T, a1, a2 = EDGE_SHAPE[1:4]
    assert stats[0] == 2 and stats[1] == p["blocks"] + T * a1 * a2, f"launches / blocks: {stats}"
    case.check()
    for name, t in again.items():
        assert torch.equal(t, case.recomputed[name]), f"{name}: a second run differs (not deterministic)"


@pytest.mark.parametrize("want", [("dx",), ("dA",), ("dU",), ("dV",), ("dA", "dV")],
                         ids=["dx", "dA", "dU", "dV", "dA+dV"])
@pytest.mark.parametrize("use_saved", [True, False], ids=["saved", "recomputed"])
def test_fused_backward_writes_only_requested_outputs(sim, want, use_saved):
    """The kernel writes exactly the outputs the wrapper asks for; the wrapper's GEMMs then give
    dU / dV from them."""
    case = FusedCase(SHAPES["odd"], torch.float32)

    def child():
        case.forward(sim, case.y, False, case.tmat, case.smat)
        case.backward(sim, case.recomputed, accumulate_dx=False, use_saved=use_saved, want=want)

    run_in_child(child)
    ref, eager = reference_results(case.x, case.A, case.U, case.V, case.dy, case.scale, case.dtype)
    written = {"dx": "dx" in want, "dA": "dA" in want, "smat": "dU" in want and not use_saved,
               "dt": "dV" in want}
    for name, expected in written.items():
        got = case.recomputed[name]
        if expected:
            assert not torch.isnan(got).any(), f"{name} requested but left unwritten"
        else:
            assert torch.isnan(got).all(), f"{name} was written though not requested"
    for i, name in ((1, "dx"), (2, "dA")):
        if name in want:
            assert_close(case.recomputed[name], ref[i], eager[i], f"{name} alone")
    dU, dV = case.weight_grads(case.recomputed, use_saved)
    if "dU" in want:
        assert_close(dU, ref[3], eager[3], "dU alone")
    if "dV" in want:
        assert_close(dV, ref[4], eager[4], "dV alone")


def test_fused_predicate(sim):
    """T*r <= 128 and a1, a2 <= 32, and a one-token tile within 48 KiB of shared memory; the
    predicate does not depend on the SM count, the tile does."""
    f32, f64 = torch.float32, torch.float64
    assert plan(sim, (64, 4, 4, 4, 320, 320, 32), f32)["supported"]       # T*r = 128
    assert not plan(sim, (64, 3, 4, 4, 320, 320, 43), f32)["supported"]   # T*r = 129
    assert not plan(sim, (64, 2, 33, 2, 40, 40, 4), f32)["supported"]     # a1 = 33
    assert not plan(sim, (64, 2, 2, 33, 40, 40, 4), f32)["supported"]     # a2 = 33
    wide = (64, 2, 16, 16, 80, 80, 64)                                     # fits in fp32, not in fp64
    assert plan(sim, wide, f32)["supported"] and not plan(sim, wide, f64)["supported"]
    for dtype in (f32, f64, torch.float16, torch.bfloat16):
        for sms in (1, 80, 132):
            p = plan(sim, (4096, 4, 4, 4, 320, 320, 16), dtype, sms)
            assert p["supported"] and p["smem"] <= 48 * 1024, (dtype, sms, p)
            assert p["blocks"] * p["bm"] >= 4096, (dtype, sms, p)
            assert p["ld"] % 2 == 1 and p["a_ld"] % 2 == 1, p  # the odd strides of the shared tiles
    # The fused entry points refuse what the predicate refuses.
    x = torch.zeros(1)
    rc = sim.elr_kron_sim_forward(0, c_shape((2, 3, 4, 4, 8, 8, 43)), *[ptr(x)] * 5, 0, 1.0, None, None)
    assert rc == -2


# ---- GEMM path: the mixing kernels, with the wrapper's GEMMs done by torch around them ---------------
GEMM_SHAPES = {"odd": (7, 3, 2, 3, 5, 7, 3), "T1-r1": (4, 1, 3, 2, 3, 4, 1), "wide-A": (3, 2, 34, 5, 2, 3, 3),
               "eq9-r40": (5, 4, 4, 4, 6, 5, 40)}  # eq. 9 with T*r = 160: past the fused path's 128
GEMM_CASES = [(n, d) for n in GEMM_SHAPES for d in (torch.float32, torch.float64, torch.float16)]
GEMM_CASES += [(n, torch.bfloat16) for n in ("odd", "eq9-r40")]


def wrapper_grad_A(ds, tmat, shape):
    """The GEMM path's dA as csrc/cuda/kron_lora.cu computes it: one [a1, M*r] x [M*r, a2] product
    per term on term-major copies of ds and tmat, fp32 result for fp16/bf16."""
    M, T, a1, a2, _, _, r = shape
    ds_t = ds.reshape(M, a1, T, r).permute(2, 1, 0, 3).reshape(T, a1, M * r)
    tm_t = tmat.reshape(M, a2, T, r).permute(2, 1, 0, 3).reshape(T, a2, M * r)
    acc = acc_dtype(ds.dtype)
    return torch.bmm(ds_t.to(acc), tm_t.to(acc).transpose(1, 2)).to(ds.dtype)


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
    # Backward: ds = scale * dy U_cat^T; dt by the kernel; dx, dA, dU, dV by the wrapper's GEMMs.
    ds = ((dy2 @ u_cat.T) * scale).contiguous()
    dt = poisoned((M * a2, R), dtype)

    def child():
        assert sim.elr_kron_sim_mix_backward(code, cs, ptr(A), ptr(ds), ptr(dt)) == 0

    run_in_child(child)
    dx = dt @ v_cat
    dA = wrapper_grad_A(ds, tmat, shape)
    dU, dV = wrapper_weight_grads(shape, smat, dt, dy, x, scale, dtype)

    ref, eager = reference_results(x, A, U, V, dy, scale, dtype)
    tag = f"{shape} {dtype}"
    # Each kernel on its own inputs (tight), then the composition against the fp64 reference.
    exact = {
        "smat": (smat, torch.einsum("tip,mpts->mits", A.double(), tmat.double().reshape(M, a2, T, r))),
        "dt": (dt, torch.einsum("tip,mits->mpts", A.double(), ds.double().reshape(M, a1, T, r))),
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
DELTA_CASES += [(n, torch.bfloat16) for n in ("odd", "square")]


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
