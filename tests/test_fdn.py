"""FDN (eq. 8): every backend that runs here against the fp64 reference, gradients, the memory
contract, torch.compile, bad input."""

from __future__ import annotations

import warnings

import pytest
import torch

import elr_ext
from elr_ext import reference
from helpers import EMPTY_FDN_CASES, assert_close_to_ref, check_fdn_on_empty_groups, cpu_backends

BACKENDS = cpu_backends()

# (N, C, H, W, G): G=1, G=C, C/G=10 and 48 (not multiples of 32), H*W odd / prime, N=1, 1x1 spatial
SHAPES = [
    (2, 64, 8, 8, 32),
    (1, 4, 3, 5, 1),
    (2, 6, 2, 3, 6),
    (2, 40, 5, 7, 4),
    (1, 8, 1, 1, 2),
    (3, 96, 13, 11, 2),
]


def make_inputs(shape, dtype, broadcast=False, channels_last=False, requires_grad=False):
    n, c, h, w, _ = shape
    z = torch.randn(n, c, h, w, dtype=torch.float64) * 3 + 1.5  # offset mean: exercises the two-pass stats
    aff = (n, c, 1, 1) if broadcast else (n, c, h, w)
    gamma = torch.randn(aff, dtype=torch.float64) * 0.5
    beta = torch.randn(aff, dtype=torch.float64) * 0.5
    tensors = [z, gamma, beta]
    if channels_last:
        tensors = [t.contiguous(memory_format=torch.channels_last) if t.shape == z.shape else t for t in tensors]
    return [t.to(dtype).requires_grad_(requires_grad) for t in tensors]


def run_fdn(backend, z, gamma, beta, groups, activation):
    with elr_ext.use_backend(backend):
        return elr_ext.fdn(z, gamma, beta, num_groups=groups, activation=activation)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", ["full", "broadcast+silu", "channels_last+silu", "channels_last+broadcast"])
def test_forward_and_backward_match_fp64_reference(backend, dtype, shape, variant):
    broadcast, channels_last = "broadcast" in variant, "channels_last" in variant
    activation = "silu" if "silu" in variant else None
    groups = shape[-1]
    z, gamma, beta = make_inputs(shape, dtype, broadcast, channels_last, requires_grad=True)
    out = run_fdn(backend, z, gamma, beta, groups, activation)
    grad_out = torch.randn_like(out.double()).to(dtype).double()  # the reference sees the same rounded values

    ref_inputs = [t.detach().double().requires_grad_() for t in (z, gamma, beta)]
    ref = reference.fdn(*ref_inputs, num_groups=groups, activation=activation)
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad_out)
    eager_inputs = [t.detach().clone().requires_grad_() for t in (z, gamma, beta)]
    eager = reference.fdn_eager(*eager_inputs, num_groups=groups, activation=activation)
    eager_grads = torch.autograd.grad(eager, eager_inputs, grad_out.to(dtype))

    assert_close_to_ref(out, ref, eager, "out")
    if channels_last and shape[2] * shape[3] > 1 and shape[1] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last), "channels_last in, channels_last out"
    grads = torch.autograd.grad(out, (z, gamma, beta), grad_out.to(dtype))
    for name, g, r, e in zip(("dz", "dgamma", "dbeta"), grads, ref_grads, eager_grads):
        assert_close_to_ref(g, r, e, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("broadcast", [False, True])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("shape", [(2, 6, 3, 2, 3), (1, 4, 1, 3, 4), (2, 8, 2, 2, 1)])
def test_gradcheck_fp64(backend, broadcast, activation, shape):
    inputs = make_inputs(shape, torch.float64, broadcast, requires_grad=True)
    fn = lambda z, g, b: run_fdn(backend, z, g, b, shape[-1], activation)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("needs", [(True, False, False), (False, True, True), (False, False, True)])
def test_backward_computes_only_what_is_needed(backend, needs):
    z, gamma, beta = make_inputs((2, 8, 4, 4, 4), torch.float64)
    for t, need in zip((z, gamma, beta), needs):
        t.requires_grad_(need)
    out = run_fdn(backend, z, gamma, beta, 4, "silu")
    out.sum().backward()
    for t, need in zip((z, gamma, beta), needs):
        assert (t.grad is not None) == need


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("broadcast", [False, True])
def test_saved_tensors_respect_the_memory_contract(backend, activation, broadcast):
    """Autograd keeps at most z + gamma (+ beta for SiLU) + O(N*G): never a normalised copy of z."""
    n, c, h, w, g = 2, 32, 8, 8, 8
    z, gamma, beta = make_inputs((n, c, h, w, g), torch.float32, broadcast, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run_fdn(backend, z, gamma, beta, g, activation)
    budget = z.numel() + gamma.numel() + (beta.numel() if activation == "silu" else 0) + 4 * n * g
    assert sum(t.numel() for t in saved) <= budget, [tuple(t.shape) for t in saved]
    stored_ids = {id(t) for t in saved}
    assert id(z) in stored_ids or any(t.data_ptr() == z.data_ptr() for t in saved), "z itself is saved"
    big = [t for t in saved if t.numel() == z.numel()]
    for t in big:  # every full-size saved tensor is an input, not a new (normalised) tensor
        assert any(t.data_ptr() == x.data_ptr() for x in (z, gamma, beta)), "a new full-size tensor was saved"


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_stays_in_its_group(backend):
    z, gamma, beta = make_inputs((2, 8, 3, 3, 4), torch.float32)
    z[1, 2, 1, 1] = float("nan")  # sample 1, group 1 (channels 2-3)
    out = run_fdn(backend, z, gamma, beta, 4, None)
    assert torch.isnan(out[1, 2:4]).all()
    mask = torch.ones_like(out, dtype=torch.bool)
    mask[1, 2:4] = False
    assert torch.isfinite(out[mask]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("case", EMPTY_FDN_CASES)
def test_empty_groups_have_the_statistics_of_a_constant(backend, dtype, case):
    """H * W == 0 or C == 0: the same outputs, statistics and gradients on every backend (triton's
    run is tests/test_triton.py's, under the interpreter)."""
    for activation, eps in ((None, 1e-5), ("silu", 1e-6)):
        check_fdn_on_empty_groups(backend, case, dtype, activation, eps)


class TinyControlBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.fdn = elr_ext.nn.FDN(16, 4, num_groups=4, activation="silu")

    def forward(self, x, cond):
        return self.conv(self.fdn(x, cond))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    model = TinyControlBlock()
    x, cond = torch.randn(2, 16, 8, 8), torch.randn(2, 4, 8, 8)
    with elr_ext.use_backend(backend):
        eager = model(x, cond)
        eager.square().mean().backward()
        eager_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        compiled = torch.compile(model, fullgraph=True)(x, cond)
        compiled.square().mean().backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


def test_fdn_module_is_uni_controlnet_fdn():
    module = elr_ext.nn.FDN(64, 8, activation="silu")
    x, cond = torch.randn(2, 64, 6, 6), torch.randn(2, 8, 6, 6)
    expected = torch.nn.functional.silu(
        torch.nn.functional.group_norm(x, 32) * (1 + module.conv_gamma(cond)) + module.conv_beta(cond)
    )
    torch.testing.assert_close(module(x, cond), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="condition"):
        module(x, torch.randn(2, 8, 5, 6))


BAD_INPUTS = [
    ("num_groups", lambda z, g, b: elr_ext.fdn(z, g, b, num_groups=5)),
    ("num_groups", lambda z, g, b: elr_ext.fdn(z, g, b, num_groups=0)),
    ("gamma", lambda z, g, b: elr_ext.fdn(z, g[:, :4], b, num_groups=4)),
    ("beta", lambda z, g, b: elr_ext.fdn(z, g, b[..., :2], num_groups=4)),
    ("gamma", lambda z, g, b: elr_ext.fdn(z, g.double(), b, num_groups=4)),
    ("beta", lambda z, g, b: elr_ext.fdn(z, g, b.to("meta"), num_groups=4)),
    ("z", lambda z, g, b: elr_ext.fdn(z[0], g[0], b[0], num_groups=4)),
    ("z", lambda z, g, b: elr_ext.fdn(z[:0], g[:0], b[:0], num_groups=4)),
    ("z", lambda z, g, b: elr_ext.fdn(z.int(), g, b, num_groups=4)),
    ("activation", lambda z, g, b: elr_ext.fdn(z, g, b, num_groups=4, activation="gelu")),
    ("eps", lambda z, g, b: elr_ext.fdn(z, g, b, num_groups=4, eps=-1.0)),
]


@pytest.mark.parametrize("argument,call", BAD_INPUTS)
def test_bad_input_names_the_argument(argument, call):
    z, gamma, beta = make_inputs((2, 8, 3, 3, 4), torch.float32)
    with pytest.raises((ValueError, TypeError), match=argument):
        call(z, gamma, beta)


def test_requested_backend_that_cannot_run_warns_once_and_falls_back():
    z, gamma, beta = make_inputs((1, 4, 2, 2, 2), torch.float32)
    elr_ext.backends._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with elr_ext.use_backend("cuda"):
            out1 = elr_ext.fdn(z, gamma, beta, num_groups=2)
            out2 = elr_ext.fdn(z, gamma, beta, num_groups=2)
    messages = [str(w.message) for w in caught if "requested" in str(w.message)]
    assert len(messages) == 1 and "'cuda'" in messages[0]
    torch.testing.assert_close(out1, out2)


def test_backend_env_var_is_honoured(monkeypatch):
    monkeypatch.setenv("ELR_EXT_BACKEND", "torch")
    assert elr_ext.backends.select("fdn", torch.device("cpu"), ("cpu", "torch")) == "torch"
    monkeypatch.setenv("ELR_EXT_BACKEND", "tpu")
    with pytest.raises(ValueError, match="ELR_EXT_BACKEND"):
        elr_ext.backends.select("fdn", torch.device("cpu"), ("cpu", "torch"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["full", "broadcast", "channels_last"])
def test_opcheck_schema_fake_kernel_and_autograd_registration(backend, variant):
    """torch.library.opcheck: the fake kernels agree with the real ones (shapes, strides, dtypes),
    and the ops trace through AOT autograd with dynamic shapes."""
    z, gamma, beta = make_inputs((2, 8, 3, 5, 4), torch.float32, variant == "broadcast", variant == "channels_last",
                                 requires_grad=True)
    with elr_ext.use_backend(backend):
        torch.library.opcheck(torch.ops.elr_ext.fdn_forward.default, (z, gamma, beta, 4, 1e-5, "silu"))
        out, mean, rstd = torch.ops.elr_ext.fdn_forward(z, gamma, beta, 4, 1e-5, "silu")
        args = (torch.randn_like(out), z.detach(), gamma.detach(), beta.detach(), mean, rstd, 4, "silu", True, True, True)
        torch.library.opcheck(torch.ops.elr_ext.fdn_backward.default, args)
