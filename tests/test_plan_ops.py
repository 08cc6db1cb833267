"""What a memory / time planner sees of the ops (elr_ext.backends.planned_backend): the fake kernels'
outputs against the cpu backend's, the workspaces they allocate against each op file's `workspaces`
and against sizes worked out by hand from the C++ wrappers, and the FLOP formulas against
FlopCounterMode, hand counts and an unfused computation of the same algorithm."""

from __future__ import annotations

import importlib
import threading
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import FlopCounterMode, flop_registry

import elr_ext
from elr_ext import backends

kron = importlib.import_module("elr_ext.ops.kron_lora")
fdn = importlib.import_module("elr_ext.ops.fdn")
lowrank = importlib.import_module("elr_ext.ops.lowrank_proj")
ops = torch.ops.elr_ext

NATIVE_OPS = ("kron_lora_forward", "kron_lora_backward", "kron_delta", "kron_delta_backward", "fdn_forward",
              "fdn_backward", "lowrank_proj_forward", "lowrank_proj_backward")
pytestmark = pytest.mark.skipif(
    backends.unavailable_reason("cpu", "cpu") is not None
    or any("cpu" not in backends.native_implementations(op) for op in NATIVE_OPS),
    reason="the compiled cpu backend is not available")

# op name -> (op file, the fake kernel as registered)
FAKES = {
    "kron_lora_forward": (kron, kron._forward_fake), "kron_lora_backward": (kron, kron._backward_fake),
    "kron_delta": (kron, kron._delta_fake), "kron_delta_backward": (kron, kron._delta_backward_fake),
    "fdn_forward": (fdn, fdn._forward_fake), "fdn_backward": (fdn, fdn._backward_fake),
    "lowrank_proj_forward": (lowrank, lowrank._forward_fake),
    "lowrank_proj_backward": (lowrank, lowrank._backward_fake),
}


# ------------------------------------------------------------------------------------ the calls
def kron_factors(T, a1, a2, b1, b2, r, dtype):
    return tuple(torch.randn(shape).to(dtype) for shape in ((T, a1, a2), (T, b1, r), (T, r, b2)))


def kron_forward_args(shape, dtype=torch.float32, save=False, base=True):
    M, T, a1, a2, b1, b2, r = shape
    A, U, V = kron_factors(T, a1, a2, b1, b2, r, dtype)
    x = torch.randn(M, a2 * b2).to(dtype)
    weight = torch.randn(a1 * b1, a2 * b2).to(dtype) if base else None
    bias = torch.randn(a1 * b1).to(dtype) if base else None
    return (x, A, U, V, weight, bias, 0.5, save)


def kron_backward_args(shape, dtype=torch.float32, saved=False, mask=(True,) * 6):
    x, A, U, V, weight, _, scale, _ = kron_forward_args(shape, dtype)
    with elr_ext.use_backend("cpu"):
        y, tmat, smat = ops.kron_lora_forward(x, A, U, V, weight, None, scale, saved)
    if not saved:
        tmat, smat = kron.no_intermediates(x, A, U)
    return (torch.randn_like(y), x, A, U, V, tmat, smat, weight, scale, list(mask))


def delta_args(shape, dtype=torch.float32):
    return kron_factors(*shape[1:], dtype)


def delta_backward_args(shape, dtype=torch.float32, mask=(True,) * 3):
    _, T, a1, a2, b1, b2, r = shape
    return (torch.randn(a1 * b1, a2 * b2).to(dtype), *kron_factors(T, a1, a2, b1, b2, r, dtype), list(mask))


def fdn_forward_args(shape, groups, broadcast=False, channels_last=False, activation="none"):
    z = torch.randn(shape)
    if channels_last:
        z = z.contiguous(memory_format=torch.channels_last)
    gamma = torch.randn(shape[:2] + (1, 1) if broadcast else shape)
    return (z, gamma, torch.randn_like(gamma), groups, 1e-5, activation)


def fdn_backward_args(shape, groups, broadcast=False, channels_last=False, activation="silu",
                      needs=(True,) * 3):
    z, gamma, beta, _, eps, _ = fdn_forward_args(shape, groups, broadcast, channels_last)
    with elr_ext.use_backend("cpu"):
        out, mean, rstd = ops.fdn_forward(z, gamma, beta, groups, eps, activation)
    return (torch.randn_like(out), z, gamma, beta, mean, rstd, groups, activation, *needs)


def lowrank_forward_args(M, d_in, ranks, outs, adjacent=False):
    stacked = torch.randn(sum(ranks), d_in)
    downs = list(stacked.split(list(ranks))) if adjacent else [torch.randn(r, d_in) for r in ranks]
    ups = [torch.randn(o, r) for o, r in zip(outs, ranks)]
    biases = [torch.randn(o) if j % 2 else torch.empty(0) for j, o in enumerate(outs)]
    return (torch.randn(M, d_in), downs, ups, biases)


def lowrank_backward_args(M, d_in, ranks, outs, adjacent=False, needs_x=True, needs_downs=True):
    x, downs, ups, biases = lowrank_forward_args(M, d_in, ranks, outs, adjacent)
    with elr_ext.use_backend("cpu"):
        ys, h = ops.lowrank_proj_forward(x, downs, ups, biases)
    K = len(ranks)
    return ([torch.randn_like(y) for y in ys], x, h, downs, ups, needs_x, needs_downs, [True] * K, [True] * K)


FUSED = (37, 2, 3, 4, 5, 6, 2)  # (M, T, a1, a2, b1, b2, r): the fused CUDA path
GEMM = (11, 2, 40, 2, 2, 3, 2)  # a1 > 32: the CUDA batched-GEMM path
BLOCKED = (300, 4, 4, 4, 8, 8, 8)  # several CPU token blocks

CASES = {
    "kron-fwd-fused": ("kron_lora_forward", lambda: kron_forward_args(FUSED)),
    "kron-fwd-fused-save": ("kron_lora_forward", lambda: kron_forward_args(FUSED, save=True)),
    "kron-fwd-gemm-save-bf16": ("kron_lora_forward",
                                lambda: kron_forward_args(GEMM, torch.bfloat16, save=True)),
    "kron-fwd-blocked-nobase": ("kron_lora_forward", lambda: kron_forward_args(BLOCKED, base=False)),
    "kron-bwd-fused": ("kron_lora_backward", lambda: kron_backward_args(FUSED)),
    "kron-bwd-fused-saved": ("kron_lora_backward", lambda: kron_backward_args(FUSED, saved=True)),
    "kron-bwd-fused-dU": ("kron_lora_backward", lambda: kron_backward_args(FUSED, mask=(0, 0, 1, 0, 0, 0))),
    "kron-bwd-gemm-bf16": ("kron_lora_backward", lambda: kron_backward_args(GEMM, torch.bfloat16)),
    "kron-bwd-gemm-saved-dx-dV": ("kron_lora_backward", lambda: kron_backward_args(GEMM, saved=True,
                                                                                    mask=(1, 0, 0, 1, 0, 0))),
    "kron-bwd-blocked-dA-dU": ("kron_lora_backward",
                               lambda: kron_backward_args(BLOCKED, mask=(0, 1, 1, 0, 0, 1))),
    "delta": ("kron_delta", lambda: delta_args(FUSED)),
    "delta-bwd": ("kron_delta_backward", lambda: delta_backward_args(FUSED)),
    "delta-bwd-dV": ("kron_delta_backward", lambda: delta_backward_args(FUSED, mask=(False, False, True))),
    "fdn-fwd": ("fdn_forward", lambda: fdn_forward_args((2, 8, 5, 7), 4)),
    "fdn-fwd-nhwc-broadcast-silu": ("fdn_forward",
                                    lambda: fdn_forward_args((2, 64, 96, 96), 32, True, True, "silu")),
    "fdn-bwd": ("fdn_backward", lambda: fdn_backward_args((2, 8, 5, 7), 4)),
    "fdn-bwd-nhwc-broadcast": ("fdn_backward", lambda: fdn_backward_args((2, 64, 96, 96), 32, True, True)),
    "fdn-bwd-dgamma": ("fdn_backward",
                       lambda: fdn_backward_args((2, 8, 5, 7), 4, needs=(False, True, False))),
    "lowrank-fwd": ("lowrank_proj_forward", lambda: lowrank_forward_args(20, 16, (4, 2, 3), (8, 8, 5))),
    "lowrank-fwd-adjacent": ("lowrank_proj_forward",
                             lambda: lowrank_forward_args(20, 16, (4, 2), (8, 5), True)),
    "lowrank-bwd": ("lowrank_proj_backward", lambda: lowrank_backward_args(20, 16, (4, 2, 3), (8, 8, 5))),
    "lowrank-bwd-dB": ("lowrank_proj_backward",
                       lambda: lowrank_backward_args(20, 16, (4, 1), (8, 5), needs_x=False)),
}


def fake_args(mode, args):
    return tree_map(lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t, args)


def described(out):
    return [(tuple(t.shape), t.dtype) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("case", CASES)
def test_fake_outputs_match_the_cpu_backend(case):
    op, make = CASES[case]
    args = make()
    with elr_ext.use_backend("cpu"):
        real = getattr(ops, op)(*args)
    for backend in backends.BACKENDS:
        with FakeTensorMode() as mode, backends.planned_backend(backend):
            fake = getattr(ops, op)(*fake_args(mode, args))
        assert described(fake) == described(real), (backend, case)


# ----------------------------------------------------------------------------- the workspaces
class AllocatedBytes(TorchDispatchMode):
    """The bytes of the storages the ops run inside it create that are alive, and their peak; the
    inputs' storages (views of them) are not counted."""

    def __init__(self, inputs):
        super().__init__()
        self.live = self.peak = 0
        self.seen = weakref.WeakKeyDictionary()
        for t in tree_flatten(list(inputs))[0]:
            if isinstance(t, torch.Tensor):
                self.seen[t.untyped_storage()] = True

    def _free(self, nbytes):
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage() not in self.seen:
                storage = t.untyped_storage()
                self.seen[storage] = True
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, storage.nbytes())
        return out


def storage_bytes(out):
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tree_flatten(out)[0]
                if isinstance(t, torch.Tensor)}
    return sum(storages.values())


@pytest.mark.parametrize("backend", ["cuda", "cpu"])
@pytest.mark.parametrize("case", CASES)
def test_fake_kernel_peak_is_outputs_plus_workspaces(case, backend):
    """Called directly (a dispatch mode does not see inside an op it intercepts), the fake kernel
    holds its outputs and the planned backend's workspaces at once, and nothing else."""
    op, make = CASES[case]
    module, fake_kernel = FAKES[op]
    with FakeTensorMode() as mode:
        args = fake_args(mode, make())
        with backends.planned_backend(backend, sm_count=4), AllocatedBytes(args) as allocated:
            out = fake_kernel(*args)
            expected = module.workspaces(op, *args)
        assert allocated.peak == storage_bytes(out) + sum(w.nbytes for w in expected), expected
        assert allocated.live == storage_bytes(out)


# the torch backend's function behind each custom op, called with the op's arguments
TORCH_BACKEND = {
    "kron_lora_forward": kron._forward_torch, "kron_lora_backward": kron._backward_torch,
    "kron_delta": kron._delta_torch, "kron_delta_backward": kron._delta_backward_torch,
    "fdn_forward": fdn._forward_torch, "fdn_backward": lambda *a: fdn._backward_torch(*a[:8], list(a[8:])),
    "lowrank_proj_forward": lowrank._forward_torch, "lowrank_proj_backward": lowrank._backward_torch,
}


@pytest.mark.parametrize("case", ["kron-fwd-fused-save", "kron-bwd-fused", "kron-bwd-fused-dU", "delta-bwd",
                                  "fdn-fwd", "fdn-bwd", "lowrank-fwd", "lowrank-bwd"])
def test_torch_backend_plan_peak_is_the_measured_peak(case):
    """planned_backend("torch"): the fake kernel's peak is that of the reference backend run on real
    tensors (called directly: the custom op would hide its inner ops from the mode)."""
    op, make = CASES[case]
    args = make()
    with AllocatedBytes(args) as real:
        TORCH_BACKEND[op](*args)
    with FakeTensorMode() as mode:
        fargs = fake_args(mode, args)
        with backends.planned_backend("torch"), AllocatedBytes(fargs) as planned:
            FAKES[op][1](*fargs)
    assert planned.peak == real.peak > 0


def nbytes(op, *args, backend, sm_count=4, threads=None, monkeypatch=None):
    if threads is not None:
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    module = FAKES[op][0]
    with backends.planned_backend(backend, sm_count=sm_count):
        return sum(w.nbytes for w in module.workspaces(op, *args))


def test_kron_lora_workspaces_by_hand(monkeypatch):
    M, T, a1, a2, b1, b2, r = shape = (2000, 2, 3, 4, 5, 6, 2)
    R, f32 = T * r, 4
    # CUDA fused forward: nothing; GEMM path (a1 = 40 > 32): tmat [M*a2, R] and smat [M*a1, R]
    assert nbytes("kron_lora_forward", *kron_forward_args(shape), backend="cuda") == 0
    assert nbytes("kron_lora_forward", *kron_forward_args((10, 2, 40, 2, 2, 3, 2)), backend="cuda") == \
        10 * 2 * 4 * f32 + 10 * 40 * 4 * f32
    # CUDA fused backward, 4 SMs: tile bm = min(64 // 4, 2000 // 8) = 16 tokens (fits: 2636 fp32 of
    # shared memory), 125 tiles; smat and dt recomputed, dA partials align256(125 * T*a1*a2 * 4)
    args = kron_backward_args(shape)
    assert nbytes("kron_lora_backward", *args, backend="cuda") == M * a1 * R * f32 + M * a2 * R * f32 + 12032
    # CUDA GEMM backward, M = 11, a1 = 40, a2 = 2: tmat [22, R], smat and ds [440, R], then the
    # term-major copies of ds [T, 40, M*r] and tmat [T, 2, M*r], larger than dt [22, R]
    args = kron_backward_args((11, 2, 40, 2, 2, 3, 2))
    assert nbytes("kron_lora_backward", *args, backend="cuda") == (22 * 4 + 2 * 440 * 4 + 2 * (40 + 2) * 22) * f32
    # CPU backward, 4 threads, M = 1000: 64-token blocks, 16 blocks in 8 chunks of 92 partial sums
    # (R*b1 + R*b2 + a1*a2*R); grain 32768 // (1000 * 39 // 8) = 6 units, so 2 tasks, each with
    # tmat, dt (64*a2*R) and smat, ds (64*a1*R) rows
    args = kron_backward_args((1000,) + shape[1:])
    assert nbytes("kron_lora_backward", *args, backend="cpu", threads=4, monkeypatch=monkeypatch) == \
        8 * 92 * f32 + 2 * (2 * 64 * a2 * R + 2 * 64 * a1 * R) * f32
    # CPU forward, M = 5000, bf16: 79 blocks, grain 13, 4 tasks of tmat + smat rows and the fp32
    # copies of the block's x and y rows
    args = kron_forward_args((5000,) + shape[1:], torch.bfloat16)
    assert nbytes("kron_lora_forward", *args, backend="cpu", threads=4, monkeypatch=monkeypatch) == \
        4 * (64 * (a1 + a2) * R + 64 * (a2 * b2 + a1 * b1)) * f32


def test_kron_delta_workspaces_by_hand():
    shape = (0, 2, 3, 4, 5, 6, 2)  # B_t = U_t V_t: T*b1*b2 = 60 fp32
    assert nbytes("kron_delta", *delta_args(shape), backend="cuda") == 256
    assert nbytes("kron_delta_backward", *delta_backward_args(shape), backend="cuda") == 512
    assert nbytes("kron_delta", *delta_args(shape), backend="cpu") == 240
    assert nbytes("kron_delta_backward", *delta_backward_args(shape, torch.float64), backend="cpu") == 480
    assert nbytes("kron_delta_backward", *delta_backward_args(shape, mask=(False,) * 3), backend="cuda") == 0


def test_fdn_workspaces_by_hand(monkeypatch):
    # [2, 64, 128, 128], G = 32: groups of 2 * 16384 values, 8 blocks each
    args = fdn_forward_args((2, 64, 128, 128), 32)
    assert nbytes("fdn_forward", *args, backend="cuda") == 2 * 32 * 8 * 3 * 4
    args = fdn_backward_args((2, 64, 128, 128), 32)
    assert nbytes("fdn_backward", *args, backend="cuda") == 2 * 32 * 8 * 2 * 4
    # NHWC with broadcast gamma: the column kernel's partials too, min(64, 16384 / 64) splits
    args = fdn_backward_args((2, 64, 128, 128), 32, broadcast=True, channels_last=True)
    assert nbytes("fdn_backward", *args, backend="cuda") == 2 * 32 * 8 * 2 * 4 + 2 * 64 * 64 * 2 * 4
    # a z that is a slice of a wider tensor is copied first: [2, 64, 8, 8] fp32; groups of 128 values
    z, gamma, beta, *_ = fdn_forward_args((2, 128, 8, 8), 32)
    assert nbytes("fdn_forward", z[:, :64], gamma[:, :64].contiguous(), beta[:, :64].contiguous(), 32, 1e-5,
                  "none", backend="cuda") == 2 * 64 * 64 * 4 + align(2 * 32 * 1 * 3 * 4)
    # CPU, NHWC: a tile of every row is 4 MB, so the split plan: 1024-row blocks, 16 per sample; the
    # row blocks' statistics (3 fp64 per group), then 4 tasks' lanes (5*C fp32) and totals (2*C fp64)
    args = fdn_forward_args((2, 64, 128, 128), 32, broadcast=True, channels_last=True)
    assert nbytes("fdn_forward", *args, backend="cpu", threads=4, monkeypatch=monkeypatch) == \
        2 * 16 * 32 * 3 * 8 + 4 * (5 * 64 * 4 + 2 * 64 * 8)
    assert nbytes("fdn_forward", *fdn_forward_args((2, 64, 128, 128), 32), backend="cpu") == 0


def align(n):
    return -(-n // 256) * 256


def test_lowrank_proj_workspaces_by_hand():
    args = lowrank_forward_args(100, 64, (8, 4), (32, 16))
    stacked = 12 * 64 * 4
    for backend in ("cuda", "cpu"):
        assert nbytes("lowrank_proj_forward", *args, backend=backend) == stacked  # 2*M >= R: one GEMM
        assert nbytes("lowrank_proj_backward", *lowrank_backward_args(100, 64, (8, 4), (32, 16)),
                      backend=backend) == 100 * 12 * 4 + stacked  # dh, the stacked downs for dx
    few_tokens = lowrank_forward_args(5, 64, (8, 4), (32, 16))  # 2*M < R: one GEMM per down, no copy
    assert nbytes("lowrank_proj_forward", *few_tokens, backend="cuda") == 0
    one_buffer = lowrank_forward_args(100, 64, (8, 4), (32, 16), adjacent=True)  # stacking them is a view
    assert nbytes("lowrank_proj_forward", *one_buffer, backend="cuda") == 0


def test_tracker_hooks_give_the_workspaces():
    args = kron_backward_args(FUSED)
    with backends.planned_backend("cuda", sm_count=4):
        hooked = kron.PLAN_WORKSPACES["kron_lora_backward"](args, {})
        assert hooked == [(w.shape, w.dtype) for w in kron.workspaces("kron_lora_backward", *args)]
    assert set(fdn.PLAN_WORKSPACES) == {"fdn_forward", "fdn_backward"}
    assert set(lowrank.PLAN_WORKSPACES) == {"lowrank_proj_forward", "lowrank_proj_backward"}


def test_planned_backend_nests_and_defaults_to_cuda():
    assert backends.current_planned_backend() == "cuda"
    assert backends.planned_sm_count() == backends.DEFAULT_PLANNED_SM_COUNT
    with backends.planned_backend("cpu"):
        with backends.planned_backend("torch", sm_count=80):
            assert (backends.current_planned_backend(), backends.planned_sm_count()) == ("torch", 80)
        assert backends.current_planned_backend() == "cpu"
        seen = []
        thread = threading.Thread(target=lambda: seen.append(backends.current_planned_backend()))
        thread.start()
        thread.join()
        assert seen == ["cuda"]
    assert backends.current_planned_backend() == "cuda"
    with pytest.raises(ValueError, match="not a backend"), backends.planned_backend("gpu"):
        pass


# --------------------------------------------------------------------------------------- FLOPs
SMALL = (3, 2, 3, 4, 5, 6, 2)  # (M, T, a1, a2, b1, b2, r): R = 4, d_in = 24, d_out = 15, a1*a2*R = 48

FLOP_CASES = {  # case -> (op, arguments, FLOPs by hand)
    # per token: tmat d_in*R, the A-mixing 48, y d_out*R, the base d_in*d_out
    "kron-fwd": ("kron_lora_forward", lambda: kron_forward_args(SMALL),
                 2 * 3 * (4 * 24 + 48 + 4 * 15 + 24 * 15)),
    "kron-fwd-nobase": ("kron_lora_forward", lambda: kron_forward_args(SMALL, base=False),
                        2 * 3 * (4 * 24 + 48 + 4 * 15)),
    # tmat and smat again, dU, ds, dA, dt, dV, dx, and grad_y W, grad_y^T x
    "kron-bwd": ("kron_lora_backward", lambda: kron_backward_args(SMALL),
                 2 * 3 * (96 + 48 + 60 + 60 + 48 + 48 + 96 + 96 + 360 + 360)),
    "kron-bwd-saved": ("kron_lora_backward", lambda: kron_backward_args(SMALL, saved=True),
                       2 * 3 * (60 + 60 + 48 + 48 + 96 + 96 + 360 + 360)),
    "kron-bwd-dU": ("kron_lora_backward", lambda: kron_backward_args(SMALL, mask=(0, 0, 1, 0, 0, 0)),
                    2 * 3 * (96 + 48 + 60)),
    "kron-bwd-dx-dbias": ("kron_lora_backward", lambda: kron_backward_args(SMALL, mask=(1, 0, 0, 0, 0, 1)),
                          2 * 3 * (60 + 48 + 96 + 360)),
    # B = U V (T*b1*b2*r = 120), then T*d_out*d_in = 720
    "delta": ("kron_delta", lambda: delta_args(SMALL), 2 * (120 + 720)),
    "delta-bwd": ("kron_delta_backward", lambda: delta_backward_args(SMALL),
                  2 * ((120 + 720) + 720 + 2 * 120)),
    "delta-bwd-dV": ("kron_delta_backward", lambda: delta_backward_args(SMALL, mask=(False, False, True)),
                     2 * (720 + 120)),
    # M = 3, in = 6, ranks (2, 1), outs (4, 5): h = 6*3, ys = 2*4 + 1*5 per token
    "lowrank-fwd": ("lowrank_proj_forward", lambda: lowrank_forward_args(3, 6, (2, 1), (4, 5)),
                    2 * 3 * (18 + 13)),
    "lowrank-bwd": ("lowrank_proj_backward", lambda: lowrank_backward_args(3, 6, (2, 1), (4, 5)),
                    2 * 3 * (13 + 13 + 18 + 18)),
    "lowrank-bwd-dB": ("lowrank_proj_backward",
                       lambda: lowrank_backward_args(3, 6, (2, 1), (4, 5), needs_x=False),
                       2 * 3 * (13 + 13 + 18)),
}


@pytest.mark.parametrize("case", FLOP_CASES)
def test_flop_counter_counts_the_formula(case):
    name, make, by_hand = FLOP_CASES[case]
    op = getattr(ops, name)
    args = make()
    with elr_ext.use_backend("cpu"), FlopCounterMode(display=False) as counter:
        out = op(*args)
    assert counter.get_total_flops() == flop_registry[op](*args, out_val=out) == by_hand
    with FakeTensorMode() as mode, FlopCounterMode(display=False) as counter:  # as a planner counts
        op(*fake_args(mode, args))
    assert counter.get_total_flops() == by_hand


def unfused_kron_lora(x, A, U, V, weight, bias, scale):
    """The fused algorithm written out: tmat = X V^T, the A-contraction, then U^T; no dW."""
    a2 = A.shape[2]
    X = x.reshape(x.shape[0], a2, V.shape[2])
    tmat = torch.einsum("mpq,tsq->mpts", X, V)
    smat = torch.einsum("tip,mpts->mits", A, tmat)
    delta = torch.einsum("mits,tks->mik", smat, U).reshape(x.shape[0], -1)
    return scale * delta + (F.linear(x, weight, bias) if weight is not None else 0)


@pytest.mark.parametrize("shape", [SMALL, FUSED, BLOCKED, GEMM])
@pytest.mark.parametrize("base", [False, True])
def test_kron_lora_forward_flops_equal_the_unfused_products(shape, base):
    args = kron_forward_args(shape, base=base)
    with elr_ext.use_backend("cpu"), FlopCounterMode(display=False) as fused:
        ops.kron_lora_forward(*args)
    with FlopCounterMode(display=False) as unfused:
        unfused_kron_lora(*args[:7])
    assert fused.get_total_flops() == unfused.get_total_flops() > 0
