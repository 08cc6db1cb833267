"""lowrank_proj (eq. 2, docs/method.md) on every CPU backend: outputs and gradients against K separate
low-rank products in fp64, fp64 gradcheck, opcheck, torch.compile, what autograd saves, bad input."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import elr_ext
from helpers import assert_close_to_ref, cpu_backends

lowrank_module = importlib.import_module("elr_ext.ops.lowrank_proj")  # the package exports the function

BACKENDS = cpu_backends()
NATIVE = [b for b in BACKENDS if b != "torch"]

# (ranks, outs, which projections have a bias, x layout); d_in is 12 throughout
CONFIGS = {
    "K1": ([3], [7], [True], "contiguous"),
    "K2-ranks-2-5": ([2, 5], [6, 9], [False, False], "row-strided"),
    "K3-ranks-4-1-6": ([4, 1, 6], [5, 8, 3], [True, False, True], "transposed"),
}
D_IN = 12
LEAD = (2, 7)


# x [2, 7, D_IN] as a view of a leaf in three layouts; viewed 2-D it keeps the layout (the kernels
# take any row stride, so nothing is copied)
LAYOUTS = {
    "contiguous": ((*LEAD, D_IN), lambda base: base),
    "row-strided": ((*LEAD, D_IN + 3), lambda base: base[..., :D_IN]),  # rows D_IN + 3 apart
    "transposed": ((D_IN, LEAD[0] * LEAD[1]), lambda base: base.T.reshape(*LEAD, D_IN)),  # column-major
}


def _make_factors(ranks, outs, has_bias, dtype, d_in=D_IN):
    downs = [torch.randn(r, d_in, dtype=dtype) / d_in**0.5 for r in ranks]
    ups = [torch.randn(o, r, dtype=dtype) / r**0.5 for o, r in zip(outs, ranks)]
    biases = [torch.randn(o, dtype=dtype) if hb else None for o, hb in zip(outs, has_bias)]
    return downs, ups, biases


def _leaves(tensors, dtype):
    """Leaf copies in `dtype` that require grad (None stays None)."""
    return [None if t is None else t.detach().to(dtype).requires_grad_(True) for t in tensors]


def _separate_products(x, downs, ups, biases):
    """K unfused low-rank layers: y_j = (x B_j^T) A_j^T + b_j, two nn.Linear each."""
    return [F.linear(F.linear(x, B), A, b) for B, A, b in zip(downs, ups, biases)]


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_separate_low_rank_products(backend, dtype, config):
    ranks, outs, has_bias, layout = CONFIGS[config]
    K = len(ranks)
    base_shape, view = LAYOUTS[layout]
    base = torch.randn(base_shape, dtype=dtype, requires_grad=True)
    x = view(base)
    downs, ups, biases = _make_factors(ranks, outs, has_bias, dtype)
    params = _leaves(downs + ups + biases, dtype)
    with elr_ext.use_backend(backend):
        ys = elr_ext.lowrank_proj(x, params[:K], params[K:2 * K], params[2 * K:])
    assert isinstance(ys, tuple) and len(ys) == K
    grad_ys = [torch.randn_like(y) for y in ys]
    torch.autograd.backward(ys, grad_ys)
    got = [view(base.grad)] + [p.grad for p in params if p is not None]

    # fp64 reference and plain PyTorch in the same dtype: same values, same upstream gradients
    expected = {}
    for name, ref_dtype in (("ref64", torch.float64), ("same", dtype)):
        rx, *rparams = _leaves([x] + downs + ups + biases, ref_dtype)
        rys = _separate_products(rx, rparams[:K], rparams[K:2 * K], rparams[2 * K:])
        torch.autograd.backward(rys, [g.to(ref_dtype) for g in grad_ys])
        expected[name] = (rys, [rx.grad] + [p.grad for p in rparams if p is not None])

    for j, y in enumerate(ys):
        assert y.shape == (*LEAD, outs[j]) and torch.isfinite(y).all()
        assert_close_to_ref(y, expected["ref64"][0][j], expected["same"][0][j], name=f"y[{j}]")
    names = ["dx"] + [f"ddowns[{j}]" for j in range(K)] + [f"dups[{j}]" for j in range(K)] \
        + [f"dbiases[{j}]" for j in range(K) if has_bias[j]]
    for name, g, g64, g_same in zip(names, got, expected["ref64"][1], expected["same"][1], strict=True):
        assert g is not None, f"{name} missing"
        assert_close_to_ref(g, g64, g_same, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_fp64(backend):
    downs, ups, biases = _make_factors([2, 1, 3], [3, 2, 4], [True, False, True], torch.float64, d_in=5)
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    inputs = [t.requires_grad_(True) for t in [x, *downs, *ups, biases[0], biases[2]]]

    def public(x, d0, d1, d2, u0, u1, u2, b0, b2):
        return elr_ext.lowrank_proj(x, [d0, d1, d2], [u0, u1, u2], [b0, None, b2])

    def custom_op(x, d0, d1, d2, u0, u1, u2, b0, b2):  # the path torch.compile traces
        ys, _ = lowrank_module.lowrank_proj_forward(x.reshape(-1, 5), [d0, d1, d2], [u0, u1, u2],
                                                    [b0, x.new_empty(0), b2])
        return tuple(ys)

    with elr_ext.use_backend(backend):
        assert torch.autograd.gradcheck(public, inputs)
        assert torch.autograd.gradcheck(custom_op, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_needed_gradients(backend):
    """Frozen factors get no gradient; what is asked for is still right."""
    downs, ups, biases = _make_factors([2, 3], [4, 5], [True, True], torch.float64, d_in=6)
    x = torch.randn(9, 6, dtype=torch.float64)
    ups[1].requires_grad_(True)
    biases[0].requires_grad_(True)
    with elr_ext.use_backend(backend):
        ys = elr_ext.lowrank_proj(x, downs, ups, biases)
    (ys[0].sum() + ys[1].square().sum()).backward()
    h1 = x @ downs[1].T
    torch.testing.assert_close(ups[1].grad, (2 * ys[1]).detach().T @ h1)
    torch.testing.assert_close(biases[0].grad, torch.full((4,), 9.0, dtype=torch.float64))
    assert all(t.grad is None for t in [x, *downs, ups[0], biases[1]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_autograd_saves_only_x_and_h(backend):
    """The activations kept for backward are x and h [M, sum r_j]; the rest are the factors themselves."""
    ranks, outs = [4, 2, 3], [16, 16, 16]
    downs, ups, biases = _make_factors(ranks, outs, [True] * 3, torch.float32, d_in=16)
    for t in [*downs, *ups, *biases]:
        t.requires_grad_(True)
    x = torch.randn(2, 5, 16, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with elr_ext.use_backend(backend), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ys = elr_ext.lowrank_proj(x, downs, ups, biases)
    params = {(p.data_ptr(), tuple(p.shape)) for p in [*downs, *ups]}
    activations = [t for t in saved if (t.data_ptr(), tuple(t.shape)) not in params]
    shapes = sorted(tuple(t.shape) for t in activations)
    assert shapes == sorted([(10, 16), (10, sum(ranks))]), f"saved activations {shapes}"
    x_saved = next(t for t in activations if t.shape[1] == 16)
    assert x_saved.data_ptr() == x.data_ptr(), "x must be saved as a view, not a copy"
    sum(y.sum() for y in ys).backward()
    assert x.grad is not None and all(t.grad is not None for t in [*downs, *ups, *biases])


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    downs, ups, biases = _make_factors([2, 3], [4, 5], [True, False], torch.float32, d_in=6)
    x = torch.randn(7, 6)
    bias_list = [biases[0], x.new_empty(0)]
    for t in [x, *downs, *ups, biases[0]]:
        t.requires_grad_(True)
    h = x.detach() @ torch.cat(downs).detach().T
    grad_ys = [torch.randn(7, 4), torch.randn(7, 5)]
    with elr_ext.use_backend(backend):
        torch.library.opcheck(torch.ops.elr_ext.lowrank_proj_forward.default, (x, downs, ups, bias_list))
        torch.library.opcheck(
            torch.ops.elr_ext.lowrank_proj_backward.default,
            (grad_ys, x.detach(), h, [d.detach() for d in downs], [u.detach() for u in ups], True, True,
             [True, False], [True, False]),
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_matches_eager(backend):
    downs, ups, biases = _make_factors([3, 2], [8, 6], [False, True], torch.float32, d_in=8)
    params = [t.requires_grad_(True) for t in [*downs, *ups, biases[1]]]
    x = torch.randn(3, 4, 8)

    def fn(x, d0, d1, u0, u1, b1):
        q, k = elr_ext.lowrank_proj(x, [d0, d1], [u0, u1], [None, b1])
        return q.sum(-1) * k.mean(-1)

    torch._dynamo.reset()
    with elr_ext.use_backend(backend):
        eager = fn(x, *params)
        eager_grads = torch.autograd.grad(eager.square().sum(), params)
        compiled = torch.compile(fn, fullgraph=True)(x, *params)
        compiled_grads = torch.autograd.grad(compiled.square().sum(), params)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for g, ge in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(g, ge, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", NATIVE)
def test_downs_lying_back_to_back_and_out_of_order(backend):
    """Downs that are consecutive slices of one buffer are used in place; slices out of order or with
    a gap must be stacked, not taken as one block."""
    stacked = torch.randn(9, 6, dtype=torch.float64)
    ups = [torch.randn(3, 2, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64),
           torch.randn(2, 4, dtype=torch.float64)]
    x = torch.randn(5, 6, dtype=torch.float64)
    layouts = {
        "adjacent": [stacked[0:2], stacked[2:5], stacked[5:9]],
        "out-of-order": [stacked[7:9], stacked[0:3], stacked[3:7]],
        "gap": [stacked[0:2], stacked[3:6], stacked[5:9]],
    }
    for name, downs in layouts.items():
        ups_l = [u[:, : d.shape[0]].contiguous() for u, d in zip(ups, downs)]
        with elr_ext.use_backend(backend):
            ys = elr_ext.lowrank_proj(x, downs, ups_l)
        for y, B, A in zip(ys, downs, ups_l):
            torch.testing.assert_close(y, (x @ B.T) @ A.T, msg=f"layout {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("backend", NATIVE)
def test_few_tokens_one_gemm_per_down(backend, dtype):
    """With fewer tokens than half the stacked rank the compiled op runs one GEMM per down (h) and
    accumulates dx over the downs instead of stacking them (csrc/lowrank_proj_gemm.h)."""
    ranks, outs = [5, 4, 6], [3, 7, 2]
    downs, ups, biases = _make_factors(ranks, outs, [False, True, False], dtype, d_in=9)
    x = torch.randn(3, 9, dtype=dtype)  # 2 * M = 6 < R = 15
    params = _leaves([x] + downs + ups + biases, dtype)
    with elr_ext.use_backend(backend):
        ys = elr_ext.lowrank_proj(params[0], params[1:4], params[4:7], params[7:])
    grad_ys = [torch.randn_like(y) for y in ys]
    torch.autograd.backward(ys, grad_ys)
    expected = {}
    for name, ref_dtype in (("ref64", torch.float64), ("same", dtype)):
        ref = _leaves([x] + downs + ups + biases, ref_dtype)
        rys = _separate_products(ref[0], ref[1:4], ref[4:7], ref[7:])
        torch.autograd.backward(rys, [g.to(ref_dtype) for g in grad_ys])
        expected[name] = rys + [p.grad for p in ref if p is not None]
    got = list(ys) + [p.grad for p in params if p is not None]
    for i, (g, g64, g_same) in enumerate(zip(got, expected["ref64"], expected["same"], strict=True)):
        assert_close_to_ref(g, g64, g_same, name=f"output/gradient {i}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tokens(backend):
    downs, ups, biases = _make_factors([2, 3], [4, 5], [True, False], torch.float32, d_in=6)
    for t in [*downs, *ups, biases[0]]:
        t.requires_grad_(True)
    x = torch.randn(0, 6, requires_grad=True)
    with elr_ext.use_backend(backend):
        ys = elr_ext.lowrank_proj(x, downs, ups, biases)
        assert [tuple(y.shape) for y in ys] == [(0, 4), (0, 5)]
        sum(y.sum() for y in ys).backward()
    assert all(torch.equal(t.grad, torch.zeros_like(t)) for t in [*downs, *ups, biases[0]])


# ------------------------------------------------------------------------------------- bad input
def _good():
    downs, ups, biases = _make_factors([2, 3], [4, 5], [True, False], torch.float32, d_in=6)
    return torch.randn(3, 6), downs, ups, biases


BAD_INPUTS = {
    "rank mismatch": (lambda x, d, u, b: (x, d, [u[0], torch.randn(5, 4)], b), ValueError, "ups[1]"),
    "in mismatch": (lambda x, d, u, b: (x, [d[0], torch.randn(3, 7)], u, b), ValueError, "downs[1]"),
    "x in mismatch": (lambda x, d, u, b: (torch.randn(3, 5), d, u, b), ValueError, "in = x.shape[-1] = 5"),
    "dtype": (lambda x, d, u, b: (x, [d[0], d[1].double()], u, b), TypeError, "downs[1]"),
    "bias dtype": (lambda x, d, u, b: (x, d, u, [b[0].half(), None]), TypeError, "biases[0]"),
    "device": (lambda x, d, u, b: (x, d, [u[0], u[1].to("meta")], b), ValueError, "ups[1]"),
    "K=0": (lambda x, d, u, b: (x, [], [], None), ValueError, "downs"),
    "ups count": (lambda x, d, u, b: (x, d, u[:1], b), ValueError, "ups"),
    "biases length": (lambda x, d, u, b: (x, d, u, [b[0]]), ValueError, "biases"),
    "bias shape": (lambda x, d, u, b: (x, d, u, [torch.randn(5), None]), ValueError, "biases[0]"),
    "downs not a list": (lambda x, d, u, b: (x, d[0], u, b), TypeError, "downs"),
    "1-D up": (lambda x, d, u, b: (x, d, [u[0], torch.randn(5)], b), ValueError, "ups[1]"),
    "integer x": (lambda x, d, u, b: (x.long(), d, u, b), TypeError, "x"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_names_the_argument(case):
    mutate, exc, needle = BAD_INPUTS[case]
    with pytest.raises(exc, match=needle.replace("[", r"\[").replace("]", r"\]")):
        elr_ext.lowrank_proj(*mutate(*_good()))


@pytest.mark.parametrize("backend", NATIVE)
def test_native_checks_name_the_argument(backend):
    """Direct torch.ops calls into the compiled op are checked too."""
    x, downs, ups, _ = _good()
    empty = x.new_empty(0)
    native = torch.ops.elr_ext_native
    with pytest.raises(RuntimeError, match=r"ups\[1\] must be \[out_j, r_j\]"):
        native.lowrank_proj_forward(x, downs, [ups[0], torch.randn(5, 4)], [empty, empty])
    with pytest.raises(RuntimeError, match=r"biases\[0\] must have shape \[4\]"):
        native.lowrank_proj_forward(x, downs, ups, [torch.randn(3), empty])
    with pytest.raises(RuntimeError, match=r"h must have shape \[3, 5\]"):
        native.lowrank_proj_backward([torch.randn(3, 4), torch.randn(3, 5)], x, torch.randn(3, 4), downs, ups,
                                     True, True, [True, True], [False, False])
