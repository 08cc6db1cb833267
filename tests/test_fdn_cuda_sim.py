"""The FDN CUDA kernels (csrc/kernels/fdn.cuh), run on the CPU through tests/cuda_sim (DESIGN.md 5),
against a float64 PyTorch implementation of eq. 8 written here.

Every kernel call runs in a forked child with a timeout: a kernel that hangs fails its test instead
of blocking the suite (the simulator itself aborts at once on a barrier or shuffle that not every
thread reaches). The child touches no torch code: it calls the ctypes library on pointers prepared
by the parent, writing into shared-memory outputs that the parent poisoned with NaN, then checks.
"""

from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn.functional as F

from cuda_sim.build import SimBuildUnavailable, compiler, load_fdn_sim
from cuda_sim.harness import assert_close, ptr, run_in_child

DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
NCHW, NHWC = 0, 1

# (N, C, H, W, G): G=1 with odd HW; G=C; C/G=4 with HW=35; 1x1 spatial; C/G=8 with HW=24 (128-bit
# packs for every dtype and layout); a group of 8640 elements, over kMinElemsPerBlock, so the
# launchers split each group over several blocks (and the NHWC broadcast reduction over pixels).
SHAPES = [(1, 4, 3, 5, 1), (2, 6, 2, 3, 6), (2, 12, 5, 7, 3), (1, 8, 1, 1, 2), (2, 16, 4, 6, 2)]
SPLIT_SHAPE = (1, 8, 48, 45, 2)
VARIANTS = [(broadcast, act) for broadcast in (False, True) for act in (0, 1)]  # act: 0 none, 1 silu


@pytest.fixture(scope="module")
def sim():
    if compiler() is None:
        pytest.skip("no C++ compiler (g++) to build the CUDA simulation")
    try:
        return load_fdn_sim()
    except SimBuildUnavailable as err:
        pytest.skip(f"CUDA simulation unavailable: {err}")


# ---- Reference (float64, eq. 8) ---------------------------------------------------------------
def fdn_reference(z, gamma, beta, groups, eps, act):
    pre = F.group_norm(z, groups, eps=eps) * (1 + gamma) + beta
    return F.silu(pre) if act else pre


def reference_results(z, gamma, beta, dout, groups, eps, act, dtype):
    """(out, dz, dgamma, dbeta) in float64 and, as the error baseline, in the inputs' dtype; plus
    float64 mean and rstd."""
    results = {}
    for name, cast in (("ref", torch.float64), ("eager", dtype)):
        inputs = [t.detach().to(cast).requires_grad_() for t in (z, gamma, beta)]
        out = fdn_reference(*inputs, groups, eps, act)
        results[name] = (out.detach(), *torch.autograd.grad(out, inputs, dout.to(cast)))
    n = z.shape[0]
    flat = z.double().reshape(n, groups, -1)
    mean = flat.mean(-1)
    rstd = (flat.var(-1, unbiased=False) + eps).rsqrt()
    return results["ref"], results["eager"], mean, rstd


# ---- Running the simulation in a child ------------------------------------------------------------
def poisoned(shape, dtype, layout=NCHW):
    """A NaN-filled output in shared memory (the child's writes reach the parent), in `layout`."""
    t = torch.full(shape, float("nan"), dtype=dtype)
    if layout == NHWC and len(shape) == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.share_memory_()


def in_layout(t, layout):
    return t.contiguous(memory_format=torch.channels_last) if layout == NHWC else t.contiguous()


class Case:
    """Inputs, poisoned outputs and the two ctypes calls of one FDN problem."""

    def __init__(self, shape, layout, dtype, broadcast, act, eps=1e-5):
        n, c, h, w, g = shape
        self.shape, self.layout, self.dtype, self.eps = shape, layout, dtype, eps
        self.broadcast, self.act = broadcast, act
        # Offset mean and non-unit spread: a naive E[x^2] - E[x]^2 would lose digits here.
        self.z = in_layout((torch.randn(n, c, h, w, dtype=torch.float64) * 3 + 1.5).to(dtype), layout)
        aff = (n, c, 1, 1) if broadcast else (n, c, h, w)
        self.gamma = in_layout((torch.randn(aff, dtype=torch.float64) * 0.5).to(dtype), layout)
        self.beta = in_layout((torch.randn(aff, dtype=torch.float64) * 0.5).to(dtype), layout)
        self.dout = in_layout(torch.randn(n, c, h, w, dtype=torch.float64).to(dtype), layout)
        stat = torch.float64 if dtype == torch.float64 else torch.float32
        self.out = poisoned((n, c, h, w), dtype, layout)
        self.mean = poisoned((n, g), stat)
        self.rstd = poisoned((n, g), stat)
        self.dz = poisoned((n, c, h, w), dtype, layout)
        self.dgamma = poisoned(aff, dtype, layout)
        self.dbeta = poisoned(aff, dtype, layout)
        # The kernel's broadcast flag: gamma [N, C, 1, 1] against HW > 1 (as fdn_make_shape decides).
        self.kernel_broadcast = broadcast and h * w != 1

    def dims(self):
        n, c, h, w, g = self.shape
        return (DTYPE_CODE[self.dtype], n, c, h * w, g, self.layout, int(self.kernel_broadcast), self.act)

    def forward(self, lib, out=None):
        out = self.out if out is None else out
        rc = lib.elr_fdn_sim_forward(*self.dims(), self.eps, ptr(self.z), ptr(self.gamma), ptr(self.beta),
                                     ptr(out), ptr(self.mean), ptr(self.rstd))
        assert rc == 0

    def backward(self, lib, dz=True, dgamma=True, dbeta=True, with_beta=True):
        rc = lib.elr_fdn_sim_backward(*self.dims(), ptr(self.dout), ptr(self.z), ptr(self.gamma),
                                      ptr(self.beta) if with_beta else None, ptr(self.mean), ptr(self.rstd),
                                      ptr(self.dz) if dz else None, ptr(self.dgamma) if dgamma else None,
                                      ptr(self.dbeta) if dbeta else None)
        assert rc == 0

    def check(self, grads=("dz", "dgamma", "dbeta")):
        ref, eager, mean, rstd = reference_results(self.z, self.gamma, self.beta, self.dout, self.shape[-1],
                                                   self.eps, self.act, self.dtype)
        layout = "NHWC" if self.layout else "NCHW"
        tag = f"{self.shape} {layout} {self.dtype} broadcast={self.broadcast} act={self.act}"
        rel_stat = 1e-12 if self.dtype == torch.float64 else 1e-5
        for name, got, want in (("mean", self.mean, mean), ("rstd", self.rstd, rstd)):
            assert not torch.isnan(got).any(), f"{tag}: {name} left unwritten"
            scale = want.abs().max().item()
            assert (got.double() - want).abs().max().item() <= rel_stat * scale, f"{tag}: {name}"
        assert_close(self.out, ref[0], eager[0], f"{tag}: out")
        for i, name in enumerate(("dz", "dgamma", "dbeta"), start=1):
            if name in grads:
                assert_close(getattr(self, name), ref[i], eager[i], f"{tag}: {name}")


# ---- Tests ------------------------------------------------------------------------------------------
# bfloat16 differs from float16 only in its conversions: two shapes (one with 128-bit packs) suffice.
SHAPE_DTYPES = [(shape, dtype) for shape in SHAPES for dtype in (torch.float32, torch.float64, torch.float16)]
SHAPE_DTYPES += [(SHAPES[1], torch.bfloat16), (SHAPES[4], torch.bfloat16)]


@pytest.mark.parametrize("layout", [NCHW, NHWC], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape,dtype", SHAPE_DTYPES,
                         ids=[f"{'x'.join(map(str, s))}-{str(d).split('.')[-1]}" for s, d in SHAPE_DTYPES])
def test_forward_backward_match_fp64_reference(sim, shape, dtype, layout):
    cases = [Case(shape, layout, dtype, broadcast, act) for broadcast, act in VARIANTS]

    def child():
        for case in cases:
            case.forward(sim)
            case.backward(sim)

    run_in_child(child)
    for case in cases:
        case.check()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", [NCHW, NHWC], ids=["nchw", "nhwc"])
def test_split_groups_match_and_are_deterministic(sim, layout, dtype):
    """Groups larger than a block's share: several blocks per group (gridDim.y > 1), partials merged
    in a fixed order, so a second run gives the same bits."""
    cases = [Case(SPLIT_SHAPE, layout, dtype, broadcast, act) for broadcast, act in ((False, 1), (True, 0))]
    again = poisoned(cases[0].out.shape, dtype, layout)
    stats = torch.zeros(6, dtype=torch.int64).share_memory_()

    def child():
        sim.elr_cuda_sim_reset_stats()
        for case in cases:
            case.forward(sim)
            case.backward(sim)
        sim.elr_cuda_sim_stats(ctypes.cast(stats.data_ptr(), ctypes.POINTER(ctypes.c_int64)))
        cases[0].forward(sim, out=again)

    run_in_child(child)
    assert stats[3] > 1, f"the split path was not taken (max gridDim.y {stats[3]})"
    for case in cases:
        case.check()
    assert torch.equal(again, cases[0].out), "a second run differs: the reductions are not deterministic"


@pytest.mark.parametrize("broadcast", [False, True], ids=["full", "broadcast"])
@pytest.mark.parametrize("layout", [NCHW, NHWC], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("needs", [(True, False, False), (False, True, True), (False, False, True)],
                         ids=["dz", "dgamma+dbeta", "dbeta"])
def test_backward_writes_only_requested_outputs(sim, needs, layout, broadcast):
    """Null outputs are skipped (left NaN here) and the others still right; beta may be null when
    there is no activation."""
    case = Case((2, 12, 5, 7, 3), layout, torch.float32, broadcast, act=0)

    def child():
        case.forward(sim)
        case.backward(sim, *needs, with_beta=False)

    run_in_child(child)
    wanted = [name for name, need in zip(("dz", "dgamma", "dbeta"), needs) if need]
    case.check(grads=wanted)
    for name, need in zip(("dz", "dgamma", "dbeta"), needs):
        if not need:
            assert torch.isnan(getattr(case, name)).all(), f"{name} was written though not requested"


@pytest.mark.parametrize("layout", [NCHW, NHWC], ids=["nchw", "nhwc"])
def test_nan_stays_in_its_group(sim, layout):
    case = Case((2, 8, 3, 3, 4), layout, torch.float32, broadcast=False, act=1)
    case.z[1, 2, 1, 1] = float("nan")  # sample 1, group 1 (channels 2-3)

    def child():
        case.forward(sim)
        case.backward(sim)

    run_in_child(child)
    inside = torch.zeros(case.z.shape, dtype=torch.bool)
    inside[1, 2:4] = True
    for name in ("out", "dz", "dgamma", "dbeta"):
        t = getattr(case, name)
        assert torch.isnan(t[inside]).all(), f"{name}: the NaN group is not all NaN"
        assert torch.isfinite(t[~inside]).all(), f"{name}: NaN leaked out of its group"
    assert torch.isnan(case.mean[1, 1]) and torch.isfinite(case.mean.flatten()[[0, 1, 2, 3, 4, 6, 7]]).all()
