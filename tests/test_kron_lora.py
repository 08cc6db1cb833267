"""Kronecker LoRA GEMM (eq. 9): every backend that runs here against an fp64 reference that builds
dW with torch.kron (this file is the only place the linear path's dW is built), gradients, memory,
torch.compile, the peers (peft and LyCORIS LoKr), the modules, bad input."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

import elr_ext
from elr_ext.nn import (KronLoRAConv2d, KronLoRALinear, factorization, kronecker_splits, load_kron_lora,
                         save_kron_lora)
from helpers import assert_close_to_ref

BACKENDS = [b for b in elr_ext.available_backends("cpu")
            if b == "torch" or b in elr_ext.backends.native_implementations("kron_lora_forward")]

# (T, a1, a2, b1, b2, r): T=1, r=1, non-square factors, odd sizes, the paper's T = a1 = a2 = n
FACTORS = [(1, 2, 3, 5, 7, 1), (3, 2, 3, 5, 7, 3), (1, 4, 4, 6, 8, 4), (4, 4, 4, 16, 20, 8), (2, 3, 1, 1, 9, 2)]


def make_factors(T, a1, a2, b1, b2, r, dtype=torch.float64):
    A = torch.randn(T, a1, a2, dtype=torch.float64)
    U = torch.randn(T, b1, r, dtype=torch.float64) / r ** 0.5
    V = torch.randn(T, r, b2, dtype=torch.float64) / b2 ** 0.5
    return [t.to(dtype) for t in (A, U, V)]


def dense_delta(A, U, V):
    return sum(torch.kron(A[t], U[t] @ V[t]) for t in range(A.shape[0]))


def dense_reference(x, A, U, V, weight, bias, scale):
    """The unfused definition: build dW, then one dense product (the test's ground truth)."""
    w = scale * dense_delta(A, U, V) + (weight if weight is not None else 0)
    y = x @ w.t()
    return y + bias if bias is not None else y


def with_backend(backend, fn, *args, **kwargs):
    with elr_ext.use_backend(backend):
        return fn(*args, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("factors", FACTORS)
@pytest.mark.parametrize("base", [False, True])
def test_forward_and_backward_match_dense_fp64_reference(backend, dtype, factors, base):
    T, a1, a2, b1, b2, r = factors
    d_in, d_out = a2 * b2, a1 * b1
    x = torch.randn(2, 3, d_in, dtype=torch.float64)
    A, U, V = make_factors(*factors)
    weight = torch.randn(d_out, d_in, dtype=torch.float64) / d_in ** 0.5 if base else None
    bias = torch.randn(d_out, dtype=torch.float64) if base else None
    scale = 0.75
    leaves = [t for t in (x, A, U, V, weight, bias) if t is not None]
    ours_in = [t.to(dtype).requires_grad_() for t in leaves]
    ref_in = [t.detach().to(dtype).double().requires_grad_() for t in ours_in]
    eager_in = [t.detach().clone().requires_grad_() for t in ours_in]

    def unpack(ts):
        return (*ts[:4], ts[4] if base else None, ts[5] if base else None)

    out = with_backend(backend, elr_ext.kron_lora_linear, *unpack(ours_in), scale=scale)
    ref = dense_reference(*unpack(ref_in), scale)
    eager = elr_ext.reference.kron_lora_linear(*unpack(eager_in), scale=scale)  # unfused einsum, same dtype
    assert_close_to_ref(out, ref, eager, "y")
    grad = torch.randn_like(ref).to(dtype)
    for name, g, rg, eg in zip("x A U V W b".split(), torch.autograd.grad(out, ours_in, grad),
                               torch.autograd.grad(ref, ref_in, grad.double()), torch.autograd.grad(eager, eager_in, grad)):
        assert_close_to_ref(g, rg, eg, f"d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("factors", [(1, 2, 3, 5, 7, 1), (3, 2, 2, 3, 4, 2)])
def test_gradcheck_fp64(backend, factors):
    T, a1, a2, b1, b2, r = factors
    x = torch.randn(3, a2 * b2, dtype=torch.float64, requires_grad=True)
    A, U, V = (t.requires_grad_() for t in make_factors(*factors))
    weight = torch.randn(a1 * b1, a2 * b2, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(a1 * b1, dtype=torch.float64, requires_grad=True)
    fn = lambda *a: with_backend(backend, elr_ext.kron_lora_linear, *a, scale=1.3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, A, U, V, weight, bias))
    assert torch.autograd.gradcheck(lambda *a: with_backend(backend, elr_ext.kron_delta, *a), (A, U, V))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_x_and_only_x_needing_grad(backend):
    A, U, V = make_factors(2, 2, 2, 3, 4, 2, torch.float32)
    x = torch.randn(8, 5, dtype=torch.float32).t()[:, :8].T  # [8, 5] viewed, non-contiguous slice below
    x = torch.randn(5, 16)[:, ::2].requires_grad_()  # [5, 8], stride 2
    y = with_backend(backend, elr_ext.kron_lora_linear, x, A, U, V)
    torch.testing.assert_close(y, x.detach() @ dense_delta(A, U, V).t(), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(5, 6) @ dense_delta(A, U, V), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kron_delta_matches_torch_kron(backend):
    A, U, V = make_factors(3, 2, 3, 5, 7, 2, torch.float32)
    torch.testing.assert_close(with_backend(backend, elr_ext.kron_delta, A, U, V), dense_delta(A, U, V))


MEMORY_PROBE = """
import re, sys, torch, elr_ext
backend, what = sys.argv[1], sys.argv[2]
d = 2048  # dW would be d*d fp32 = 16 MiB; everything else here is < 0.3 MiB
A = torch.randn(4, 4, 4, requires_grad=True)
U = torch.randn(4, d // 4, 8, requires_grad=True)
V = torch.randn(4, 8, d // 4, requires_grad=True)
x = torch.randn(8, d, requires_grad=True)
def step():
    with elr_ext.use_backend(backend):
        out = elr_ext.kron_delta(A, U, V) if what == "delta" else elr_ext.kron_lora_linear(x, A, U, V)
        out.sum().backward()
step()
open("/proc/self/clear_refs", "w").write("5")
rss = lambda key: int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))
before = rss("VmRSS")
step()
print((rss("VmHWM") - before) * 1024)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_dw_sized_tensor_is_allocated(backend):
    """Peak memory of forward + backward stays far below one dW (16 MiB); the positive control
    (kron_delta, which builds dW) shows the probe sees a dW-sized allocation."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")

    def peak(what):
        res = subprocess.run([sys.executable, "-c", MEMORY_PROBE, backend, what], capture_output=True, text=True,
                             env=env, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        return int(res.stdout.split()[-1])

    dw_bytes = 2048 * 2048 * 4
    assert peak("delta") >= dw_bytes, "the probe must see a dW-sized allocation when one happens"
    assert peak("linear") < dw_bytes / 4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("factors", [(2, 2, 2, 4, 16, 2), (4, 4, 4, 4, 4, 8)])
@pytest.mark.parametrize("saves", [False, True])
def test_rank_space_products_are_saved_only_on_request(backend, factors, saves):
    """By default autograd keeps no rank-space product (the backward recomputes them); with
    save_intermediates=True it keeps tmat and smat. Both give the reference's gradients."""
    T, a1, a2, b1, b2, r = factors
    x = torch.randn(5, a2 * b2, requires_grad=True)
    A, U, V = (t.requires_grad_() for t in make_factors(*factors, dtype=torch.float32))
    saved = []
    with elr_ext.use_backend(backend), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                                                 lambda t: t):
        y = elr_ext.kron_lora_linear(x, A, U, V, save_intermediates=saves)
    rank_space = [t for t in saved if t.dim() == 3 and t.shape[-1] == T * r and t.shape[1] in (a1, a2)]
    assert len(rank_space) == 2 and all(t.shape[0] == (5 if saves else 0) for t in rank_space)
    grads = torch.autograd.grad(y.square().sum(), (x, A, U, V))
    ref = [x.detach().double().requires_grad_()] + [t.detach().double().requires_grad_() for t in (A, U, V)]
    ref_grads = torch.autograd.grad(dense_reference(*ref, None, None, 1.0).square().sum(), ref)
    for g, g64 in zip(grads, ref_grads):
        # fp32 against fp64: absolute tolerance at the gradient's scale (small entries are sums of large terms)
        torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-5 * (1 + g64.abs().max().item()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    layer = KronLoRALinear(torch.nn.Linear(24, 20), terms=2, rank=3)
    torch.nn.init.normal_(layer.U)
    x = torch.randn(4, 7, 24)
    with elr_ext.use_backend(backend):
        eager = layer(x)
        eager.square().mean().backward()
        grads = [p.grad.clone() for p in (layer.A, layer.U, layer.V)]
        layer.zero_grad()
        compiled = torch.compile(layer, fullgraph=True)(x)
        compiled.square().mean().backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for p, g in zip((layer.A, layer.U, layer.V), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    A, U, V = (t.requires_grad_() for t in make_factors(2, 2, 3, 4, 5, 2, torch.float32))
    x = torch.randn(6, 15, requires_grad=True)
    w, b = torch.randn(8, 15, requires_grad=True), torch.randn(8, requires_grad=True)
    with elr_ext.use_backend(backend):
        torch.library.opcheck(torch.ops.elr_ext.kron_lora_forward.default, (x, A, U, V, w, b, 0.5, True))
        torch.library.opcheck(torch.ops.elr_ext.kron_lora_forward.default, (x, A, U, V, None, None, 0.5, False))
        torch.library.opcheck(torch.ops.elr_ext.kron_delta.default, (A, U, V))


# ------------------------------------------------------------------------------------------- peers
def assert_matches_peer(ours, theirs, name):
    """Same values up to fp32 rounding at the tensor's scale (the peers sum in another order)."""
    scale = theirs.abs().max().item()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{name}: {m}")


def _peft_lokr_layer(d_in, d_out, r):
    peft = pytest.importorskip("peft")
    base = torch.nn.Sequential(torch.nn.Linear(d_in, d_out))
    model = peft.get_peft_model(base, peft.LoKrConfig(r=r, alpha=2 * r, target_modules=["0"]))
    layer = model.base_model.model[0]
    for name in ("lokr_w1", "lokr_w2_a", "lokr_w2_b"):
        torch.nn.init.normal_(getattr(layer, name)["default"])
    return layer


def test_peft_lokr_gives_the_same_outputs_and_gradients():
    layer = _peft_lokr_layer(64, 96, 4)
    w1, w2a, w2b = (getattr(layer, n)["default"] for n in ("lokr_w1", "lokr_w2_a", "lokr_w2_b"))
    base = layer.get_base_layer()
    ours = KronLoRALinear(torch.nn.Linear(64, 96), terms=1, rank=4, alpha=8,
                          out_factors=tuple((w1.shape[0], w2a.shape[0])), in_factors=tuple((w1.shape[1], w2b.shape[1])))
    with torch.no_grad():
        ours.base.weight.copy_(base.weight)
        ours.base.bias.copy_(base.bias)
        ours.A.copy_(w1[None])
        ours.U.copy_(w2a[None])
        ours.V.copy_(w2b[None])
    assert ours.scale == layer.scaling["default"]
    x = torch.randn(5, 64)
    theirs_y, ours_y = layer(x), ours(x)
    assert_matches_peer(ours_y, theirs_y, "y")
    g = torch.randn_like(ours_y)
    theirs_grads = torch.autograd.grad(theirs_y, (w1, w2a, w2b), g)
    ours_grads = torch.autograd.grad(ours_y, (ours.A, ours.U, ours.V), g)
    for t, o in zip(theirs_grads, ours_grads):
        assert_matches_peer(o[0], t, "gradient")


@pytest.mark.parametrize("bypass", [False, True])
def test_lycoris_lokr_gives_the_same_outputs_and_gradients(bypass):
    lokr = pytest.importorskip("lycoris.modules.lokr")
    base = torch.nn.Linear(64, 96)
    module = lokr.LokrModule("probe", base, multiplier=1.0, lora_dim=4, alpha=8, factor=-1, bypass_mode=bypass)
    module.apply_to()
    params = dict(module.named_parameters())
    w1, w2a, w2b = params["lokr_w1"], params["lokr_w2_a"], params["lokr_w2_b"]
    for p in (w1, w2a, w2b):
        torch.nn.init.normal_(p)
    ours = KronLoRALinear(torch.nn.Linear(64, 96), terms=1, rank=4, alpha=8,
                          out_factors=tuple((w1.shape[0], w2a.shape[0])), in_factors=tuple((w1.shape[1], w2b.shape[1])))
    with torch.no_grad():
        ours.base.weight.copy_(base.weight)
        ours.base.bias.copy_(base.bias)
        ours.A.copy_(w1[None])
        ours.U.copy_(w2a[None])
        ours.V.copy_(w2b[None])
    assert ours.scale == pytest.approx(float(module.scale))
    x = torch.randn(5, 64)
    theirs_y, ours_y = base(x), ours(x)  # apply_to routes base.forward through the LoKr module
    assert_matches_peer(ours_y, theirs_y, "y")
    g = torch.randn_like(ours_y)
    for t, o in zip(torch.autograd.grad(theirs_y, (w1, w2a, w2b), g),
                    torch.autograd.grad(ours_y, (ours.A, ours.U, ours.V), g)):
        assert_matches_peer(o[0], t, "gradient")


# ------------------------------------------------------------------------------------------ modules
def test_factorization_is_balanced_like_lokr():
    assert factorization(320) == (16, 20) and factorization(1280) == (32, 40) and factorization(7) == (1, 7)
    assert factorization(320, 4) == (4, 80) and factorization(10240) == (80, 128)


def test_default_split_is_eq9_with_n_terms():
    """A_i n x n, u_i (d_out/n) x r, v_i r x (d_in/n) with n = terms; factor=n picks another n and
    factor=-1 LoKr's balanced split."""
    layer = KronLoRALinear(torch.nn.Linear(320, 640), terms=4, rank=8)
    assert [list(p.shape) for p in (layer.A, layer.U, layer.V)] == [[4, 4, 4], [4, 160, 8], [4, 8, 80]]
    layer = KronLoRALinear(torch.nn.Linear(320, 640), terms=4, rank=8, factor=8)
    assert [list(p.shape) for p in (layer.A, layer.U, layer.V)] == [[4, 8, 8], [4, 80, 8], [4, 8, 40]]
    layer = KronLoRALinear(torch.nn.Linear(320, 640), terms=4, rank=8, factor=-1)
    assert [list(p.shape) for p in (layer.A, layer.U, layer.V)] == [[4, 20, 16], [4, 32, 8], [4, 8, 20]]
    conv = KronLoRAConv2d(torch.nn.Conv2d(320, 640, 3, padding=1), terms=4, rank=8)
    assert [list(p.shape) for p in (conv.A, conv.U, conv.V)] == [[4, 4, 4], [4, 160, 8], [4, 8, 720]]


def test_an_n_that_does_not_divide_names_the_nearest_that_does():
    with pytest.raises(ValueError, match=r"n=4 \(terms\) does not divide d_out=30.*nearest n that divides both is 5"):
        KronLoRALinear(torch.nn.Linear(40, 30), terms=4, rank=4)
    with pytest.raises(ValueError, match="factor=-1"):
        KronLoRALinear(torch.nn.Linear(40, 30), terms=4, rank=4)
    with pytest.raises(ValueError, match="factor must be None"):
        KronLoRALinear(torch.nn.Linear(40, 32), terms=4, rank=4, factor=0)
    assert kronecker_splits(30, 107, 4, strict=False) == ((5, 6), (1, 107))
    assert kronecker_splits(427, 320, 4, strict=False) == ((7, 61), (4, 80))


def test_linear_adapter_is_zero_at_init_merges_and_round_trips(tmp_path):
    base = torch.nn.Linear(40, 30)
    layer = KronLoRALinear(base, terms=4, rank=4, factor=-1)
    x = torch.randn(3, 40)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, base.weight, base.bias))
    assert [p for p in layer.parameters() if p.requires_grad] == [layer.A, layer.U, layer.V]
    torch.nn.init.normal_(layer.U)
    y = layer(x)
    weight = base.weight.clone()
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(base.weight, weight, rtol=1e-6, atol=1e-6)
    model = torch.nn.Sequential(layer)
    save_kron_lora(model, str(tmp_path / "adapter.safetensors"))
    fresh = torch.nn.Sequential(KronLoRALinear(base, terms=4, rank=4, factor=-1))
    load_kron_lora(fresh, str(tmp_path / "adapter.safetensors"))
    torch.testing.assert_close(fresh(x), y)
    wrong = torch.nn.Sequential(KronLoRALinear(torch.nn.Linear(40, 30), terms=2, rank=4, factor=-1))
    before = [p.clone() for p in wrong.parameters()]
    with pytest.raises(ValueError, match="shape"):
        load_kron_lora(wrong, str(tmp_path / "adapter.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(before, wrong.parameters())), "nothing half-loaded"


def test_conv_adapter_matches_the_dense_updated_convolution():
    conv = torch.nn.Conv2d(6, 8, 3, stride=2, padding=1)
    layer = KronLoRAConv2d(conv, terms=2, rank=2)
    torch.nn.init.normal_(layer.U)
    x = torch.randn(2, 6, 9, 9)
    weight = conv.weight + layer.scale * dense_delta(layer.A, layer.U, layer.V).view_as(conv.weight)
    torch.testing.assert_close(layer(x), torch.nn.functional.conv2d(x, weight, conv.bias, 2, 1), rtol=1e-5, atol=1e-5)
    layer(x).sum().backward()
    assert conv.weight.grad is None and layer.A.grad is not None


CONV_CASES = [  # (in, out, kernel, stride, padding, dilation, bias)
    (6, 8, 3, 1, 1, 1, True),
    (6, 8, 3, 2, 1, 1, False),
    (4, 6, 3, 1, 2, 2, True),
    (6, 4, 1, 1, 0, 1, True),
    (4, 6, (3, 1), (2, 1), (1, 0), 1, True),
]


@pytest.mark.parametrize("rank_space", [True, False], ids=["rank-space", "weight-grad"])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "in{}-out{}-k{}-s{}-p{}-d{}-bias{}".format(*c))
def test_kron_lora_conv2d_gradcheck(case, rank_space, monkeypatch):
    ops = importlib.import_module("elr_ext.ops.kron_lora_conv2d")

    # both backward paths at these small shapes: the ratio rule would pick the weight gradient
    monkeypatch.setattr(ops, "_RANK_SPACE_MIN_RATIO", 0.0 if rank_space else float("inf"))
    cin, cout, k, stride, padding, dilation, has_bias = case
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation, bias=has_bias).double()
    layer = KronLoRAConv2d(conv, terms=2, rank=2).double()
    A, U, V = (torch.randn_like(t, requires_grad=True) for t in (layer.A, layer.U, layer.V))
    x = torch.randn(3, cin, 7, 6, dtype=torch.float64, requires_grad=True)

    def f(x, A, U, V):
        return elr_ext.kron_lora_conv2d(x, A, U, V, conv.weight, conv.bias, 0.7, stride, padding, dilation)

    assert torch.autograd.gradcheck(f, (x, A, U, V))
    # against the fp64 reference: the dense updated weight through F.conv2d's own autograd
    weight = conv.weight + 0.7 * dense_delta(A, U, V).view_as(conv.weight)
    ref = torch.nn.functional.conv2d(x, weight, conv.bias, stride, padding, dilation)
    out = f(x, A, U, V)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(out, (x, A, U, V), g), torch.autograd.grad(ref, (x, A, U, V), g)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "in{}-out{}-k{}-s{}-p{}-d{}-bias{}".format(*c))
def test_conv_patches_are_unfolds_columns_token_major(case):
    from elr_ext.ops.kron_lora_conv2d import _patches

    cin, _, k, stride, padding, dilation, _ = case
    pair = [(v, v) if isinstance(v, int) else tuple(v) for v in (k, stride, padding, dilation)]
    x = torch.randn(2, cin, 7, 6)
    cols = torch.nn.functional.unfold(x, *pair[:1], dilation=pair[3], padding=pair[2], stride=pair[1])
    assert torch.equal(_patches(x, *pair), cols.transpose(1, 2).reshape(-1, cols.shape[1]))
    assert torch.equal(_patches(x.to(memory_format=torch.channels_last), *pair), _patches(x, *pair))


def test_kron_lora_conv2d_backward_chunks_over_samples(monkeypatch):
    """The unfolded input is taken a few samples at a time: the summed chunks give the same gradients."""
    ops = importlib.import_module("elr_ext.ops.kron_lora_conv2d")

    torch.manual_seed(1)
    conv = torch.nn.Conv2d(4, 6, 3, padding=1).double()
    A, U, V = torch.randn(2, 2, 6, dtype=torch.float64), torch.randn(2, 3, 2, dtype=torch.float64), \
        torch.randn(2, 2, 6, dtype=torch.float64)
    x = torch.randn(5, 4, 6, 6, dtype=torch.float64)

    def grads():
        factors = [t.clone().requires_grad_() for t in (A, U, V)]
        elr_ext.kron_lora_conv2d(x, *factors, conv.weight, conv.bias, 1.0, 1, 1).pow(2).sum().backward()
        return [t.grad for t in factors]

    monkeypatch.setattr(ops, "_RANK_SPACE_MIN_RATIO", 0.0)
    whole = grads()
    monkeypatch.setattr(ops, "_UNFOLD_BYTES", 2 * 36 * 36 * 8)  # two samples per chunk: chunks of 2, 2, 1
    for got, want in zip(grads(), whole):
        torch.testing.assert_close(got, want)


def test_conv_adapter_forms_the_weight_gradient_only_for_narrow_layers(monkeypatch):
    """On the rank-space path torch's conv weight-gradient is never called, on narrow layers it is;
    the frozen weight gets no gradient either way; grouped convs go through the weight gradient of
    the built dW and still match the reference."""
    ops = importlib.import_module("elr_ext.ops.kron_lora_conv2d")

    monkeypatch.setattr(ops, "_RANK_SPACE_MIN_RATIO", 0.0)  # the rank-space path at this small shape
    calls = []
    real = torch.nn.grad.conv2d_weight
    monkeypatch.setattr(torch.nn.grad, "conv2d_weight", lambda *a, **k: calls.append(1) or real(*a, **k))
    conv = torch.nn.Conv2d(8, 8, 3, padding=1)
    layer = KronLoRAConv2d(conv, terms=2, rank=2)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    layer(x).sum().backward()
    assert not calls and conv.weight.grad is None and layer.A.grad is not None and x.grad is not None
    monkeypatch.setattr(ops, "_RANK_SPACE_MIN_RATIO", 12.0)  # the rule: 8 channels, T*r = 4 -> weight gradient
    layer(x).sum().backward()
    assert calls and conv.weight.grad is None

    grouped = torch.nn.Conv2d(8, 8, 3, padding=1, groups=2)
    glayer = KronLoRAConv2d(grouped, terms=2, rank=2)
    torch.nn.init.normal_(glayer.U)
    weight = grouped.weight + glayer.scale * dense_delta(glayer.A, glayer.U, glayer.V).view_as(grouped.weight)
    torch.testing.assert_close(glayer(x), torch.nn.functional.conv2d(x, weight, grouped.bias, 1, 1, 1, 2),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, call", [
    ("weight", lambda x, A, U, V, w: elr_ext.kron_lora_conv2d(x, A, U, V, w[:, :, :1])),
    ("weight", lambda x, A, U, V, w: elr_ext.kron_lora_conv2d(x, A, U, V, w[0])),
    ("x", lambda x, A, U, V, w: elr_ext.kron_lora_conv2d(x[:, :2], A, U, V, w)),
    ("bias", lambda x, A, U, V, w: elr_ext.kron_lora_conv2d(x, A, U, V, w, torch.randn(3))),
    ("stride", lambda x, A, U, V, w: elr_ext.kron_lora_conv2d(x, A, U, V, w, stride=(1, 1, 1))),
    ("padding", lambda x, A, U, V, w: elr_ext.kron_lora_conv2d(x, A, U, V, w, padding="same")),
    ("padding", lambda x, A, U, V, w: elr_ext.kron_lora_conv2d(x, A, U, V, w, padding=-1)),
    ("stride", lambda x, A, U, V, w: elr_ext.kron_lora_conv2d(x, A, U, V, w, stride=0)),
    ("dilation", lambda x, A, U, V, w: elr_ext.kron_lora_conv2d(x, A, U, V, w, dilation=(1, 0))),
    ("V", lambda x, A, U, V, w: elr_ext.kron_lora_conv2d(x, A, U, V[:, :1], w)),
])
def test_kron_lora_conv2d_bad_input_names_the_argument(name, call):
    conv = torch.nn.Conv2d(4, 6, 3)
    layer = KronLoRAConv2d(conv, terms=2, rank=2)
    with pytest.raises((ValueError, TypeError), match=name):
        call(torch.randn(2, 4, 5, 5), layer.A.detach(), layer.U.detach(), layer.V.detach(), conv.weight.detach())


BAD_INPUTS = [
    ("d_in", lambda x, A, U, V: elr_ext.kron_lora_linear(x[:, :-1], A, U, V)),
    ("weight", lambda x, A, U, V: elr_ext.kron_lora_linear(x, A, U, V, weight=torch.randn(3, 3))),
    ("bias", lambda x, A, U, V: elr_ext.kron_lora_linear(x, A, U, V, bias=torch.randn(5))),
    ("U", lambda x, A, U, V: elr_ext.kron_lora_linear(x, A, U[:1], V)),
    ("V", lambda x, A, U, V: elr_ext.kron_lora_linear(x, A, U, V[:, :1])),
    ("A", lambda x, A, U, V: elr_ext.kron_lora_linear(x, A.double(), U, V)),
    ("A", lambda x, A, U, V: elr_ext.kron_lora_linear(x, A[0], U, V)),
    ("V", lambda x, A, U, V: elr_ext.kron_lora_linear(x, A, U, V.to("meta"))),
    ("rank", lambda x, A, U, V: KronLoRALinear(torch.nn.Linear(4, 4), rank=0)),
    ("terms", lambda x, A, U, V: KronLoRALinear(torch.nn.Linear(4, 4), terms=0)),
    ("in_factors", lambda x, A, U, V: KronLoRALinear(torch.nn.Linear(4, 4), in_factors=(3, 1))),
]


@pytest.mark.parametrize("argument,call", BAD_INPUTS)
def test_bad_input_names_the_argument(argument, call):
    A, U, V = make_factors(2, 2, 3, 4, 5, 2, torch.float32)
    with pytest.raises((ValueError, TypeError), match=argument):
        call(torch.randn(3, 15), A, U, V)
