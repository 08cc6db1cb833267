"""The Triton kernels (the `triton` backend of the three ops) against the fp64 reference: forward and
backward, odd shapes, fp32 and bf16 (fp64 for gradcheck), outputs and workspaces poisoned with NaN
so every element must be written, and the dispatch (GPU_DISPATCH, ELR_EXT_BACKEND=triton).

Where does it run? On a CUDA device of sm_80+ directly. On the CPU the kernels need Triton's
interpreter, and Triton decides interpreted or compiled when a kernel is *defined*, i.e. from
TRITON_INTERPRET at the first import of elr_ext.triton. Setting it inside this pytest process would
leak into every other test file (the `triton` backend would appear among their CPU backends), so
without a GPU `test_interpreter_suite` reruns this file in a subprocess that has TRITON_INTERPRET=1
from the start; there the kernel tests run and the subprocess test skips itself. What the
interpreter would not catch (tl.dot shape rules, layouts, register spills) is
tests/test_triton_aot.py's: it compiles the kernels for sm_80 / sm_90 on the host.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import types

import pytest
import torch

import elr_ext
from elr_ext import backends, reference
from helpers import EMPTY_FDN_CASES, assert_close_to_ref, check_fdn_on_empty_groups

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if backends.unavailable_reason("triton", "cuda") is None else "cpu"
RUNS_HERE = backends.unavailable_reason("triton", DEVICE) is None
kernels_here = pytest.mark.skipif(not RUNS_HERE, reason="no GPU and no TRITON_INTERPRET=1 here: "
                                                        "test_interpreter_suite runs these in a subprocess")


# ---------------------------------------------------------------------------------- the subprocess
@pytest.mark.skipif(RUNS_HERE, reason="the Triton kernels run in this process")
def test_interpreter_suite():
    env = dict(os.environ, TRITON_INTERPRET="1")
    command = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider",
               "-W", "ignore::RuntimeWarning", "-k", "not interpreter_suite and not without_triton_knobs"]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    tail = proc.stdout[-8000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, f"the interpreter run failed:\n{tail}"
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, tail


# ------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def poisoned_allocations():
    """Every torch.empty / empty_like / new_empty inside the block comes back full of NaN, so an output
    (or workspace) element the kernels forget to write shows up in the comparison."""
    real_empty, real_empty_like, real_new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty
    assert "new_empty" not in torch.Tensor.__dict__  # inherited from the C base, restored by deleting

    def fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() and t.numel() else t

    torch.empty = lambda *a, **k: fill(real_empty(*a, **k))
    torch.empty_like = lambda *a, **k: fill(real_empty_like(*a, **k))
    torch.Tensor.new_empty = lambda self, *a, **k: fill(real_new_empty(self, *a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like
        del torch.Tensor.new_empty


@pytest.fixture
def triton_calls(monkeypatch):
    """Counts the calls that reach the Triton host functions (so a silent fallback to the reference
    cannot pass for a Triton result)."""
    from elr_ext.triton import fdn, kron_lora, lowrank_proj

    counts = {}
    for module in (fdn, kron_lora, lowrank_proj):
        for name in ("forward", "backward"):
            real = getattr(module, name)
            key = f"{module.__name__.rsplit('.', 1)[1]}.{name}"
            counts[key] = 0

            def spy(*args, _real=real, _key=key, **kwargs):
                counts[_key] += 1
                return _real(*args, **kwargs)

            monkeypatch.setattr(module, name, spy)
    return counts


def run_triton(fn, *args, **kwargs):
    with elr_ext.use_backend("triton"), poisoned_allocations():
        return fn(*args, **kwargs)


def grads_triton(out, inputs, grad):
    with elr_ext.use_backend("triton"), poisoned_allocations():
        return torch.autograd.grad(out, inputs, grad)


def to(dtype, *tensors):
    return [None if t is None else t.to(device=DEVICE, dtype=dtype) for t in tensors]


# ------------------------------------------------------------------------------------------ FDN
# (N, C, H, W, G): C/G = 10 with a prime H*W, G = 1, G = C, 1x1 spatial, a split-sized group
FDN_SHAPES = [(2, 20, 5, 7, 2), (1, 6, 3, 3, 1), (2, 4, 2, 3, 4), (1, 8, 1, 1, 2), (1, 3, 17, 9, 3)]
FDN_VARIANTS = ["full", "broadcast+silu", "channels_last+silu", "channels_last+broadcast"]
# every (variant, dtype) on two shapes, every shape on several variants: 16 cases, not 40 (the
# interpreter runs about a thousand Triton ops a second)
FDN_CASES = [(variant, dtype, FDN_SHAPES[(i + k) % len(FDN_SHAPES)])
             for i, (variant, dtype) in enumerate((v, d) for v in FDN_VARIANTS
                                                  for d in (torch.float32, torch.bfloat16))
             for k in (0, 2)]


def fdn_inputs(shape, dtype, broadcast, channels_last):
    n, c, h, w, _ = shape
    z = torch.randn(n, c, h, w, dtype=torch.float64) * 3 + 1.5  # offset mean: exercises the two-pass stats
    aff = (n, c, 1, 1) if broadcast else (n, c, h, w)
    gamma, beta = torch.randn(aff, dtype=torch.float64) * 0.5, torch.randn(aff, dtype=torch.float64) * 0.5
    ts = to(dtype, z, gamma, beta)
    if channels_last:
        ts = [t.contiguous(memory_format=torch.channels_last) if t.shape == ts[0].shape else t for t in ts]
    return [t.requires_grad_() for t in ts]


@kernels_here
@pytest.mark.parametrize("variant,dtype,shape", FDN_CASES)
def test_fdn_matches_fp64_reference(variant, dtype, shape, triton_calls):
    broadcast, channels_last = "broadcast" in variant, "channels_last" in variant
    activation = "silu" if "silu" in variant else None
    groups = shape[-1]
    z, gamma, beta = fdn_inputs(shape, dtype, broadcast, channels_last)
    out = run_triton(elr_ext.fdn, z, gamma, beta, num_groups=groups, activation=activation)
    grad = torch.randn(out.shape, dtype=torch.float64).to(device=DEVICE, dtype=dtype)

    ref_in = [t.detach().double().requires_grad_() for t in (z, gamma, beta)]
    ref = reference.fdn(*ref_in, num_groups=groups, activation=activation)
    eager_in = [t.detach().clone().requires_grad_() for t in (z, gamma, beta)]
    eager = reference.fdn_eager(*eager_in, num_groups=groups, activation=activation)
    assert_close_to_ref(out, ref, eager, "out")
    if channels_last and shape[2] * shape[3] > 1 and shape[1] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last), "channels_last in, channels_last out"

    grads = grads_triton(out, (z, gamma, beta), grad)
    ref_grads = torch.autograd.grad(ref, ref_in, grad.double())
    eager_grads = torch.autograd.grad(eager, eager_in, grad)
    for name, g, r, e in zip(("dz", "dgamma", "dbeta"), grads, ref_grads, eager_grads):
        assert_close_to_ref(g, r, e, name)
    assert triton_calls["fdn.forward"] == 1 and triton_calls["fdn.backward"] == 1


@kernels_here
@pytest.mark.parametrize("broadcast,activation", [(False, "silu"), (True, None)])
def test_fdn_gradcheck_fp64(broadcast, activation):
    z, gamma, beta = fdn_inputs((2, 6, 3, 2, 3), torch.float64, broadcast, False)
    fn = lambda z, g, b: run_triton(elr_ext.fdn, z, g, b, num_groups=3, activation=activation)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (z, gamma, beta), eps=1e-6, atol=1e-7, fast_mode=True)


@kernels_here
@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True)])
def test_fdn_backward_computes_only_what_is_needed(needs):
    for broadcast in (False, True):
        z, gamma, beta = fdn_inputs((2, 8, 3, 3, 4), torch.float32, broadcast, False)
        for t, need in zip((z, gamma, beta), needs):
            t.requires_grad_(need)
        run_triton(elr_ext.fdn, z, gamma, beta, num_groups=4, activation="silu").sum().backward()
        assert [t.grad is not None for t in (z, gamma, beta)] == list(needs)


@kernels_here
@pytest.mark.parametrize("case", EMPTY_FDN_CASES)
def test_fdn_empty_groups_have_the_statistics_of_a_constant(case, triton_calls):
    """What every backend gives for H * W == 0 or C == 0 (tests/test_fdn.py checks the others)."""
    for dtype, activation, eps in ((torch.float32, None, 1e-5), (torch.bfloat16, "silu", 1e-6)):
        check_fdn_on_empty_groups("triton", case, dtype, activation, eps, poisoned_allocations, DEVICE)
    assert triton_calls["fdn.forward"] == 4 and triton_calls["fdn.backward"] == 2


@kernels_here
def test_fdn_statistics_are_two_pass():
    """A large common offset (mean 1e4, std 1) ruins E[x^2] - E[x]^2 in fp32; the split two-pass
    statistics with Chan's combine keep rstd to fp32 accuracy."""
    z = (torch.randn(2, 8, 9, 7, dtype=torch.float64) + 1e4).to(DEVICE, torch.float32)
    from elr_ext.triton import fdn as triton_fdn

    gamma = torch.zeros_like(z)
    with poisoned_allocations():
        _, mean, rstd = triton_fdn.forward(z, gamma, gamma, 2, 1e-5, "none")
    _, mean64, rstd64 = reference.fdn_with_stats(z.double(), gamma.double(), gamma.double(), 2)
    assert torch.allclose(mean.double(), mean64, rtol=1e-6), (mean, mean64)
    assert torch.allclose(rstd.double(), rstd64, rtol=1e-4), (rstd, rstd64)


# ------------------------------------------------------------------------------- Kronecker LoRA
# (T, a1, a2, b1, b2, r): T = r = 1, non-square odd factors, the paper's T = a1 = a2 = n, a2 = b1 = 1
KRON_FACTORS = [(1, 2, 3, 5, 7, 1), (3, 2, 3, 5, 7, 3), (4, 4, 4, 16, 20, 8), (2, 3, 1, 1, 9, 2)]


def kron_inputs(factors, M, dtype, base):
    T, a1, a2, b1, b2, r = factors
    d_in, d_out = a2 * b2, a1 * b1
    x = torch.randn(M, d_in, dtype=torch.float64)
    A = torch.randn(T, a1, a2, dtype=torch.float64)
    U = torch.randn(T, b1, r, dtype=torch.float64) / r ** 0.5
    V = torch.randn(T, r, b2, dtype=torch.float64) / b2 ** 0.5
    weight = torch.randn(d_out, d_in, dtype=torch.float64) / d_in ** 0.5 if base else None
    bias = torch.randn(d_out, dtype=torch.float64) if base else None
    return to(dtype, x, A, U, V, weight, bias)


def kron_dense(x, A, U, V, weight, bias, scale):
    """The unfused definition: build dW, one dense product."""
    w = scale * sum(torch.kron(A[t], U[t] @ V[t]) for t in range(A.shape[0]))
    y = x @ (w + (weight if weight is not None else 0)).t()
    return y + bias if bias is not None else y


@kernels_here
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("factors", KRON_FACTORS)
@pytest.mark.parametrize("base,save,M", [(False, False, 5), (True, True, 37), (True, False, 18)])
def test_kron_lora_matches_dense_fp64_reference(dtype, factors, base, save, M, triton_calls):
    check_kron_lora(dtype, factors, base, save, M, triton_calls)


@kernels_here
@pytest.mark.parametrize("dtype,factors", [(torch.float32, (4, 16, 16, 20, 20, 8)), (torch.bfloat16, (8, 8, 8, 5, 3, 16))],
                         ids=["balanced-320", "eq9-n8-r16"])
def test_kron_lora_sd_factorisations(dtype, factors, triton_calls):
    """The balanced split of 320 (16 x 20: eight i-blocks here) and eq. 9's n = T = 8 at r = 16
    (128 rank columns)."""
    check_kron_lora(dtype, factors, True, False, 21, triton_calls)


def check_kron_lora(dtype, factors, base, save, M, triton_calls):
    leaves = [t for t in kron_inputs(factors, M, dtype, base) if t is not None]
    ours = [t.requires_grad_() for t in leaves]
    ref_in = [t.detach().double().requires_grad_() for t in leaves]
    eager_in = [t.detach().clone().requires_grad_() for t in leaves]

    def unpack(ts):
        return (*ts[:4], ts[4] if base else None, ts[5] if base else None)

    x3 = ours[0].view(M, 1, -1)  # leading dims are flattened by the op
    out = run_triton(elr_ext.kron_lora_linear, x3, *unpack(ours)[1:], scale=0.75, save_intermediates=save)
    out = out.view(M, -1)
    ref = kron_dense(*unpack(ref_in), 0.75)
    eager = reference.kron_lora_linear(*unpack(eager_in), scale=0.75)  # unfused einsum, same dtype
    assert_close_to_ref(out, ref, eager, "y")
    grad = torch.randn(out.shape, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
    names = "x A U V W b".split()
    ref_grads = torch.autograd.grad(ref, ref_in, grad.double())
    for name, g, rg, eg in zip(names, grads_triton(out, ours, grad), ref_grads,
                               torch.autograd.grad(eager, eager_in, grad)):
        assert_close_to_ref(g, rg, eg, f"d{name}")
    assert triton_calls["kron_lora.forward"] == 1 and triton_calls["kron_lora.backward"] == 1


@kernels_here
def test_kron_lora_gradcheck_fp64():
    x, A, U, V, weight, bias = kron_inputs((2, 2, 3, 3, 2, 2), 5, torch.float64, True)
    inputs = [t.requires_grad_() for t in (x, A, U, V, weight, bias)]
    fn = lambda *ts: run_triton(elr_ext.kron_lora_linear, *ts, scale=0.5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, fast_mode=True)


@kernels_here
@pytest.mark.parametrize("needs", [(True, False, False, False), (False, True, False, False),
                                   (False, False, True, False), (False, False, False, True)])
def test_kron_lora_backward_computes_only_what_is_needed(needs):
    x, A, U, V, _, _ = kron_inputs((2, 3, 2, 4, 5, 2), 7, torch.float32, False)
    ref = [t.detach().double().requires_grad_(need) for t, need in zip((x, A, U, V), needs)]
    for t, need in zip((x, A, U, V), needs):
        t.requires_grad_(need)
    out = run_triton(elr_ext.kron_lora_linear, x, A, U, V, scale=1.5)
    grad = torch.randn_like(out)
    (g,) = grads_triton(out, [t for t in (x, A, U, V) if t.requires_grad], grad)
    (rg,) = torch.autograd.grad(kron_dense(*ref, None, None, 1.5), [t for t in ref if t.requires_grad],
                                grad.double())
    assert torch.allclose(g.double(), rg, rtol=1e-4, atol=1e-4)


@kernels_here
def test_kron_lora_backward_is_deterministic():
    x, A, U, V, weight, _ = kron_inputs((4, 4, 4, 16, 20, 8), 35, torch.float32, True)
    leaves = [t.requires_grad_() for t in (x, A, U, V)]
    grad = torch.randn(35, 64, device=DEVICE)
    runs = []
    for _ in range(2):
        out = run_triton(elr_ext.kron_lora_linear, *leaves, weight)
        runs.append(grads_triton(out, leaves, grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@kernels_here
def test_kron_lora_large_factors_use_the_reference(triton_calls):
    """T*r beyond the fused kernels' 128 rank columns: the triton backend computes with the reference."""
    x, A, U, V, _, _ = kron_inputs((2, 2, 2, 3, 3, 80), 4, torch.float32, False)
    out = run_triton(elr_ext.kron_lora_linear, x, A, U, V)
    assert torch.allclose(out, reference.kron_lora_linear(x, A, U, V), rtol=1e-5, atol=1e-5)
    assert triton_calls["kron_lora.forward"] == 0


# ------------------------------------------------------------------------------- low-rank proj
@kernels_here
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ranks,outs,with_bias", [((3,), (11,), (True,)),
                                                  ((5, 3, 7), (11, 17, 6), (True, False, True))])
@pytest.mark.parametrize("M", [1, 45])
def test_lowrank_proj_matches_fp64_reference(dtype, ranks, outs, with_bias, M, triton_calls):
    d_in = 23
    x = torch.randn(M, 2 * d_in, dtype=torch.float64)[:, ::2]  # a non-contiguous row stride
    downs = [torch.randn(r, d_in, dtype=torch.float64) / d_in ** 0.5 for r in ranks]
    ups = [torch.randn(o, r, dtype=torch.float64) / r ** 0.5 for o, r in zip(outs, ranks)]
    biases = [torch.randn(o, dtype=torch.float64) if b else None for o, b in zip(outs, with_bias)]
    leaves = [t for t in (x, *downs, *ups, *biases) if t is not None]
    ours = [t.requires_grad_() for t in to(dtype, *leaves)]
    ref_in = [t.detach().double().requires_grad_() for t in ours]
    eager_in = [t.detach().clone().requires_grad_() for t in ours]
    K = len(ranks)

    def unpack(ts):
        it = iter(ts[1 + 2 * K:])
        return ts[0], ts[1:1 + K], ts[1 + K:1 + 2 * K], [next(it) if b else None for b in with_bias]

    outs_t = run_triton(elr_ext.lowrank_proj, *unpack(ours))
    refs = reference.lowrank_proj(*unpack(ref_in))
    eagers = reference.lowrank_proj(*unpack(eager_in))
    for j, (o, r, e) in enumerate(zip(outs_t, refs, eagers)):
        assert_close_to_ref(o, r, e, f"y_{j}")
    grads = [torch.randn(o.shape, dtype=torch.float64).to(device=DEVICE, dtype=dtype) for o in outs_t]
    for i, (g, rg, eg) in enumerate(zip(grads_triton(outs_t, ours, grads),
                                        torch.autograd.grad(refs, ref_in, [g.double() for g in grads]),
                                        torch.autograd.grad(eagers, eager_in, grads))):
        assert_close_to_ref(g, rg, eg, f"grad of input {i}")
    assert triton_calls["lowrank_proj.forward"] == 1 and triton_calls["lowrank_proj.backward"] == 1


@kernels_here
def test_lowrank_proj_gradcheck_fp64():
    x = torch.randn(6, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    downs = [torch.randn(r, 5, dtype=torch.float64, device=DEVICE, requires_grad=True) for r in (2, 3)]
    ups = [torch.randn(o, r, dtype=torch.float64, device=DEVICE, requires_grad=True)
           for o, r in ((4, 2), (3, 3))]
    bias = torch.randn(4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    def fn(x, b0, b1, a0, a1, c):
        return run_triton(elr_ext.lowrank_proj, x, [b0, b1], [a0, a1], [c, None])

    assert torch.autograd.gradcheck(fn, (x, *downs, *ups, bias), eps=1e-6, atol=1e-7, fast_mode=True)


# ------------------------------------------------------------------------------------ dispatch
@kernels_here
def test_environment_variable_forces_triton(monkeypatch, triton_calls):
    monkeypatch.setenv("ELR_EXT_BACKEND", "triton")
    z, gamma, beta = fdn_inputs((1, 4, 2, 2, 2), torch.float32, False, False)
    elr_ext.fdn(z, gamma, beta, num_groups=2)
    x, A, U, V, _, _ = kron_inputs((1, 2, 2, 2, 2, 1), 3, torch.float32, False)
    elr_ext.kron_lora_linear(x, A, U, V)
    elr_ext.lowrank_proj(x, [torch.ones_like(x[:1])], [torch.ones_like(x[:2, :1])])
    for op in ("fdn", "kron_lora", "lowrank_proj"):
        assert triton_calls[f"{op}.forward"] == 1, op


def test_gpu_dispatch_table(monkeypatch):
    """GPU_DISPATCH picks triton for fp16/bf16 Kronecker LoRA from sm_80 on, nothing elsewhere; the
    table is consulted only for CUDA devices (the capability is faked: no GPU needed)."""
    monkeypatch.setitem(backends._capability, 0, (8, 0))
    cuda0 = torch.device("cuda", 0)
    assert backends.table_choice("kron_lora", cuda0, torch.bfloat16) == "triton"
    assert backends.table_choice("kron_lora", cuda0, torch.float16) == "triton"
    assert backends.table_choice("kron_lora", cuda0, torch.float32) is None
    assert backends.table_choice("fdn", cuda0, torch.bfloat16) is None
    assert backends.table_choice("kron_lora", torch.device("cpu"), torch.bfloat16) is None
    monkeypatch.setitem(backends._capability, 0, (7, 0))
    assert backends.table_choice("kron_lora", cuda0, torch.bfloat16) is None
    for (op, dtype), entry in backends.GPU_DISPATCH.items():
        assert op in ("fdn", "kron_lora", "lowrank_proj") and hasattr(torch, dtype), (op, dtype)
        assert all(backend in ("cuda", "triton") and arch >= (8, 0) or backend == "cuda"
                   for arch, backend in entry.items()), entry


def test_triton_is_unavailable_on_the_cpu_without_the_interpreter():
    reason = backends.unavailable_reason("triton", "cpu")
    assert (reason is None) == INTERPRETING, reason


# ------------------------------------------------------------------------------ launch device
def test_device_of_makes_a_cuda_tensors_device_current(monkeypatch):
    """Triton launches on the current CUDA device: device_of(t) must make t's device current (a
    fake torch.cuda.device records it: no GPU needed), and leave CPU tensors alone."""
    import elr_ext.triton as et

    entered = []

    class Recorder:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("exit")

    monkeypatch.setattr(torch.cuda, "device", Recorder)
    with et.device_of(types.SimpleNamespace(device=torch.device("cuda", 1))):
        assert entered == [torch.device("cuda", 1)]
    assert entered == [torch.device("cuda", 1), "exit"]
    entered.clear()
    with et.device_of(torch.zeros(1)):
        pass
    assert entered == []


def test_launch_runs_the_kernel_on_its_first_tensors_device(monkeypatch):
    import elr_ext.triton as et

    log = []

    @contextlib.contextmanager
    def device_of(t):
        log.append(("enter", t))
        yield
        log.append(("exit", t))

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: log.append(("run", grid, args, kwargs))

    monkeypatch.setattr(et, "device_of", device_of)
    first, second = torch.zeros(1), torch.ones(1)
    et.launch(Kernel(), (3,), 7, first, second, BLOCK=4)
    assert [entry[0] for entry in log] == ["enter", "run", "exit"]
    assert log[0][1] is first and log[1] == ("run", (3,), (7, first, second), {"BLOCK": 4})


@kernels_here
def test_every_kernel_launch_enters_its_tensors_device(monkeypatch):
    """Each Triton launch of the three ops happens inside device_of(t) for a tensor on the device of
    all its tensor arguments (a launch that bypassed elr_ext.triton.launch would run outside)."""
    import triton

    import elr_ext.triton as et
    from elr_ext.triton import fdn, kron_lora, lowrank_proj

    current = []

    @contextlib.contextmanager
    def device_of(t):
        current.append(t.device)
        try:
            yield
        finally:
            current.pop()

    monkeypatch.setattr(et, "device_of", device_of)
    launched = set()

    class Spy:
        def __init__(self, kernel, name):
            self._kernel, self._name = kernel, name

        def __getattr__(self, attr):
            return getattr(self._kernel, attr)

        def __getitem__(self, grid):
            run = self._kernel[grid]

            def checked(*args, **kwargs):
                devices = {a.device for a in args if isinstance(a, torch.Tensor)}
                assert current and devices == {current[-1]}, (self._name, current, devices)
                launched.add(self._name)
                return run(*args, **kwargs)

            return checked

    kernels = set()
    for module in (fdn, kron_lora, lowrank_proj):
        for name, value in list(vars(module).items()):
            if isinstance(value, triton.runtime.Autotuner):
                monkeypatch.setattr(module, name, Spy(value, f"{module.__name__}.{name}"))
                kernels.add(f"{module.__name__}.{name}")

    with elr_ext.use_backend("triton"):  # forward and backward
        for broadcast in (False, True):
            z, gamma, beta = fdn_inputs((1, 4, 3, 2, 2), torch.float32, broadcast, False)
            elr_ext.fdn(z, gamma, beta, num_groups=2, activation="silu").sum().backward()
        x, A, U, V, weight, _ = kron_inputs((2, 3, 2, 4, 5, 2), 6, torch.float32, True)
        for t in (x, A, U, V):
            t.requires_grad_()
        elr_ext.kron_lora_linear(x, A, U, V, weight).sum().backward()
        x = torch.randn(5, 6, requires_grad=True)
        down, up = torch.randn(3, 6, requires_grad=True), torch.randn(4, 3, requires_grad=True)
        sum(y.sum() for y in elr_ext.lowrank_proj(x, [down], [up])).backward()
    assert launched == kernels


# ------------------------------------------------------------------------------ Triton versions
def test_interpreted_is_read_without_triton_knobs():
    """Tritons before 3.4 (torch 2.4-2.7) have no triton.knobs: elr_ext.triton then reads
    TRITON_INTERPRET as their triton.jit does, instead of failing to import."""
    script = ("import triton, triton.language\n"
              "del triton.knobs\n"
              "import elr_ext.triton\n"
              "assert not hasattr(triton, 'knobs')\n"
              "print(elr_ext.triton.INTERPRETED)\n")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for value, expected in (("1", "True"), (None, "False")):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        if value is not None:
            env["TRITON_INTERPRET"] = value
        proc = subprocess.run([sys.executable, "-W", "ignore::RuntimeWarning", "-c", script], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert proc.stdout.split() == [expected], proc.stdout
