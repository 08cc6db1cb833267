"""The FDN CUDA kernels (csrc/kernels/fdn.cuh), run on the CPU through tests/cuda_sim
(docs/testing.md, "The CUDA simulator"), against a float64 PyTorch implementation of eq. 8 written
here; and the simulator's launch checks (the dynamic shared memory limit and its opt-in, per
simulated arch).

Every kernel call runs in a forked child with a timeout: a kernel that hangs fails its test instead
of blocking the suite (the simulator itself aborts at once on a barrier or shuffle that not every
thread reaches). The child touches no torch code: it calls the ctypes library on pointers prepared
by the parent, writing into shared-memory outputs that the parent poisoned with NaN, then checks.
The launchers size their grids by the SM count the simulated device reports: the small default
(4) for most tests, the GPUs' own (harness.SM_COUNTS: 80, 108, 132) where the grid depends on it.
"""

from __future__ import annotations

import ctypes
import math

import pytest
import torch
import torch.nn.functional as F

from cuda_sim.build import SimBuildUnavailable, compiler, load_fdn_sim
from cuda_sim.harness import (ARCH_SHARED_OPTIN_BYTES, DEFAULT_DYNAMIC_SHARED_BYTES, SM_COUNTS, assert_close, ptr,
                              run_in_child, simulated_device)

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
        assert rc == 0, f"elr_fdn_sim_forward returned {rc} (-1: dtype; > 0: the cudaError_t of a refused launch)"

    def backward(self, lib, dz=True, dgamma=True, dbeta=True, with_beta=True):
        rc = lib.elr_fdn_sim_backward(*self.dims(), ptr(self.dout), ptr(self.z), ptr(self.gamma),
                                      ptr(self.beta) if with_beta else None, ptr(self.mean), ptr(self.rstd),
                                      ptr(self.dz) if dz else None, ptr(self.dgamma) if dgamma else None,
                                      ptr(self.dbeta) if dbeta else None)
        assert rc == 0, f"elr_fdn_sim_backward returned {rc} (-1: dtype; > 0: the cudaError_t of a refused launch)"

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


# ---- The simulated device: SM count --------------------------------------------------------------
# The launchers split each group (n, g) over blocks until there are about kBlocksPerSm = 4 blocks per
# SM (at most ceil(group size / 4096) and 64 per group), and the NHWC broadcast dgamma/dbeta kernel
# its pixel range likewise (at most ceil(HW / 64) and 64 splits per (n, 32-channel tile)). A grid
# sized so for a real GPU has hundreds of blocks per kernel, too many to simulate in a test (each
# 256-thread block costs milliseconds), so: the geometry at Stable Diffusion's shapes on 80 / 108 /
# 132 SMs with launches counted but not run, and the results at the same blocks per group on fewer
# groups.
SD_SHAPES = [(2, 320, 64, 64, 32), (2, 640, 32, 32, 32), (2, 1280, 16, 16, 32), (8, 320, 64, 64, 32)]


def pack_width(shape, layout, broadcast, dtype=torch.float32):
    """The elements per pack the launchers pick for 16-byte aligned tensors (pick_vec)."""
    n, c, h, w, g = shape
    v = 16 // torch.empty(0, dtype=dtype).element_size()
    if layout == NCHW:
        return v if ((h * w) if broadcast else (c // g * h * w)) % v == 0 else 1
    return v if (c // g) % v == 0 else 1


def group_splits(shape, sm_count, vec):
    """Blocks per group (gridDim.y of the group kernels), as make_tiling picks them."""
    n, c, h, w, g = shape
    gsize = c // g * h * w
    splits = max(1, min(math.ceil(4 * sm_count / (n * g)), math.ceil(gsize / 4096), 64))
    packs = gsize // vec
    return math.ceil(packs / math.ceil(packs / splits))


def col_splits(shape, sm_count):
    """Pixel-range splits of the NHWC broadcast dgamma/dbeta kernel."""
    n, c, h, w, g = shape
    wanted = math.ceil(4 * sm_count / (n * math.ceil(c / 32)))
    rows = math.ceil(h * w / max(1, min(wanted, math.ceil(h * w / 64), 64)))
    return math.ceil(h * w / rows)


class GeometryCase:
    """One FDN problem for launches that are counted, not run: every tensor argument is the same
    16-byte aligned placeholder (nothing reads or writes it), so the launchers see aligned pointers
    and pick the packs they would for real tensors."""

    PLACEHOLDER = torch.zeros(16)

    def __init__(self, shape, layout, broadcast):
        self.shape, self.layout, self.broadcast = shape, layout, broadcast
        self.stats = torch.zeros(2, 6, dtype=torch.int64).share_memory_()

    def run(self, lib):
        assert lib.elr_cuda_sim_get_geometry_only() == 1, "placeholder tensors: the kernels must not run"
        n, c, h, w, g = self.shape
        dims = (DTYPE_CODE[torch.float32], n, c, h * w, g, self.layout, int(self.broadcast), 1)
        p = ptr(self.PLACEHOLDER)
        for row, call in enumerate((lambda: lib.elr_fdn_sim_forward(*dims, 1e-5, *[p] * 6),
                                    lambda: lib.elr_fdn_sim_backward(*dims, *[p] * 9))):
            lib.elr_cuda_sim_reset_stats()
            assert call() == 0
            lib.elr_cuda_sim_stats(ctypes.cast(self.stats[row].data_ptr(), ctypes.POINTER(ctypes.c_int64)))


@pytest.mark.parametrize("sm_count", SM_COUNTS)
def test_launch_geometry_on_the_gpus_sm_counts(sim, sm_count):
    """Stable Diffusion's FDN shapes on a simulated 80 / 108 / 132-SM GPU: every launch accepted, the
    group kernels' grid (N*G, blocks per group) and the broadcast kernels' grids as sized for that
    GPU (5 / 7 / 9 blocks per group for the 320-channel block at batch 2)."""
    cases = [GeometryCase(shape, layout, broadcast) for shape in SD_SHAPES for layout in (NCHW, NHWC)
             for broadcast in (False, True)]

    def child():
        for case in cases:
            case.run(sim)

    with simulated_device(sim, sm_count=sm_count, arch=90, geometry_only=True):
        run_in_child(child)
    assert group_splits(SD_SHAPES[0], sm_count, 4) == {80: 5, 108: 7, 132: 9}[sm_count]
    for case in cases:
        n, c, h, w, g = case.shape
        splits = group_splits(case.shape, sm_count, pack_width(case.shape, case.layout, case.broadcast))
        forward, backward = case.stats.tolist()
        tag = f"{case.shape} {'NHWC' if case.layout else 'NCHW'} broadcast={case.broadcast}"
        assert forward[:5] == [2, 2 * n * g * splits, n * g, splits, 1], f"{tag}: forward {forward}"
        kernels, blocks, grid_y = 2, 2 * n * g * splits, splits
        if case.broadcast and case.layout == NCHW:
            kernels, blocks = 3, blocks + n * c
        elif case.broadcast:
            cols = col_splits(case.shape, sm_count)
            kernels, blocks, grid_y = 3, blocks + n * math.ceil(c / 32) * cols, max(splits, cols)
            if cols > 1:
                kernels, blocks = 4, blocks + math.ceil(n * c / 256)
        assert backward[:2] == [kernels, blocks] and backward[3] == grid_y, f"{tag}: backward {backward}"


DEVICE_CASES = [(SM_COUNTS[0], NCHW, False), (SM_COUNTS[1], NHWC, True), (SM_COUNTS[2], NHWC, False),
                (SM_COUNTS[2], NCHW, True)]


@pytest.mark.parametrize("sm_count,layout,broadcast", DEVICE_CASES,
                         ids=[f"{sms}sm-{'nhwc' if lay else 'nchw'}-{'broadcast' if b else 'full'}"
                              for sms, lay, b in DEVICE_CASES])
def test_blocks_per_group_of_the_gpus_match_fp64(sim, sm_count, layout, broadcast):
    """The kernels at the blocks per group an 80 / 108 / 132-SM GPU gives Stable Diffusion's
    320-channel block at batch 2 (5 / 7 / 9), on 4 groups of 33124 elements: a device of that many
    SMs gives 4 groups the same split."""
    splits = group_splits(SD_SHAPES[0], sm_count, 4)
    shape = (1, 16, 91, 91, 4)
    assert group_splits(shape, splits, pack_width(shape, layout, broadcast)) == splits
    case = Case(shape, layout, torch.float32, broadcast, act=1)
    stats = torch.zeros(6, dtype=torch.int64).share_memory_()

    def child():
        case.forward(sim)
        sim.elr_cuda_sim_stats(ctypes.cast(stats.data_ptr(), ctypes.POINTER(ctypes.c_int64)))
        case.backward(sim)

    with simulated_device(sim, sm_count=splits):
        sim.elr_cuda_sim_reset_stats()
        run_in_child(child)
    assert stats[3] == splits, f"forward gridDim.y {stats[3]}, wanted {splits}"
    case.check()


# ---- The simulated device: dynamic shared memory limits ------------------------------------------
KB = 1024
# (arch, dynamic shared bytes, cudaFuncSetAttribute value or -1 for none, whether the attribute call
# succeeds, whether the launch runs)
SHARED_CASES = [
    (80, DEFAULT_DYNAMIC_SHARED_BYTES, -1, True, True),       # 48 KB needs no opt-in
    (80, DEFAULT_DYNAMIC_SHARED_BYTES + 4, -1, True, False),  # one float more does
    (80, 64 * KB, 64 * KB, True, True),
    (80, 96 * KB, 64 * KB, True, False),  # more than the kernel opted in to
    (80, ARCH_SHARED_OPTIN_BYTES[80], ARCH_SHARED_OPTIN_BYTES[80], True, True),
    (80, ARCH_SHARED_OPTIN_BYTES[80] + 4, ARCH_SHARED_OPTIN_BYTES[80] + 4, False, False),
    (70, 96 * KB, 96 * KB, True, True),
    (75, 64 * KB, 64 * KB, True, True),
    (75, 96 * KB, 96 * KB, False, False),
    (90, ARCH_SHARED_OPTIN_BYTES[90], ARCH_SHARED_OPTIN_BYTES[90], True, True),
    (90, 228 * KB, 228 * KB, False, False),
]
CUDA_ERROR_INVALID_VALUE = 1


@pytest.mark.parametrize("arch,nbytes,opt_in,attr_ok,launch_ok", SHARED_CASES,
                         ids=[f"sm{a}-{b}B-optin{o}" for a, b, o, _, _ in SHARED_CASES])
def test_dynamic_shared_memory_over_48kb_needs_the_opt_in(sim, capfd, arch, nbytes, opt_in, attr_ok, launch_ok):
    """As on a GPU: a launch with more than 48 KB of dynamic shared memory is refused with
    cudaErrorInvalidValue (nothing runs) unless cudaFuncSetAttribute(kernel,
    cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) raised the kernel's limit first, which the
    arch caps (96 KB sm_70, 64 KB sm_75, 163 KB sm_80, 227 KB sm_90)."""
    n = nbytes // 4
    out = torch.full((n,), float("nan"), dtype=torch.float32).share_memory_()
    status = torch.full((3,), -1, dtype=torch.int32).share_memory_()
    with simulated_device(sim, arch=arch):
        run_in_child(lambda: sim.elr_cuda_sim_shared_roundtrip(n, opt_in, ptr(out), ptr(status)),
                     allow_launch_failures=not launch_ok)
    attr_error, launch_error, refused = status.tolist()
    assert attr_error == (0 if attr_ok else CUDA_ERROR_INVALID_VALUE), f"cudaFuncSetAttribute returned {attr_error}"
    if launch_ok:
        assert launch_error == 0 and refused == 0, f"launch refused: {capfd.readouterr().err[-500:]}"
        assert torch.equal(out, torch.arange(n - 1, -1, -1, dtype=torch.float32) + 0.5)
    else:
        assert launch_error == CUDA_ERROR_INVALID_VALUE and refused == 1, (launch_error, refused)
        assert torch.isnan(out).all(), "a refused launch ran"
        err = capfd.readouterr().err
        assert "cudaFuncAttributeMaxDynamicSharedMemorySize" in err and f"{nbytes} bytes" in err, err[-500:]


def test_refused_launch_fails_the_test(sim):
    """The harness turns a refused launch into a test failure even when the caller ignores the
    error code."""
    n = (DEFAULT_DYNAMIC_SHARED_BYTES + 4) // 4
    out = torch.full((n,), float("nan"), dtype=torch.float32).share_memory_()
    status = torch.zeros(3, dtype=torch.int32).share_memory_()
    with pytest.raises(AssertionError, match="refused.*cudaErrorInvalidValue"):
        run_in_child(lambda: sim.elr_cuda_sim_shared_roundtrip(n, -1, ptr(out), ptr(status)))
