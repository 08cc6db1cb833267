"""The three ops under torch.autocast (CPU, bf16): the rule of the built-in op each one replaces
(elr_ext/_autocast.py). Values against the fp64 reference on the inputs as autocast casts them,
gradients of fp32 parameters in fp32, fp64 inputs untouched, and the same error as without autocast
on bad input."""

import importlib

import pytest
import torch

import elr_ext
from elr_ext import reference

BF16 = torch.bfloat16


def _bf16_tol(ref: torch.Tensor) -> float:
    # one bf16 rounding of inputs and output, sums of a few dozen terms: a few bf16 ulps of the scale
    return 0.05 * float(ref.abs().max()) + 1e-3


def _cast64(t):
    return t.detach().to(BF16).double()


def test_kron_lora_linear_runs_in_the_autocast_dtype_and_grads_stay_fp32():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 64)
    A = torch.randn(2, 4, 8, requires_grad=True)
    U = torch.randn(2, 16, 3, requires_grad=True)
    V = torch.randn(2, 3, 8, requires_grad=True)
    weight, bias = torch.randn(64, 64), torch.randn(64)
    with torch.autocast("cpu", dtype=BF16):
        y = elr_ext.kron_lora_linear(x, A, U, V, weight, bias, scale=0.5)
    assert y.dtype == BF16
    ref = reference.kron_lora_linear(*(_cast64(t) for t in (x, A, U, V, weight, bias)), scale=0.5)
    assert (y.double() - ref).abs().max() <= _bf16_tol(ref)
    y.float().pow(2).sum().backward()
    for name, p in (("A", A), ("U", U), ("V", V)):
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("rank_space", [True, False], ids=["rank-space", "weight-grad"])
def test_kron_lora_conv2d_runs_in_the_autocast_dtype(rank_space, monkeypatch):
    ops = importlib.import_module("elr_ext.ops.kron_lora_conv2d")

    monkeypatch.setattr(ops, "_RANK_SPACE_MIN_RATIO", 0.0 if rank_space else float("inf"))
    torch.manual_seed(3)
    x = torch.randn(2, 8, 6, 6)
    A = torch.randn(2, 2, 8, requires_grad=True)
    U = torch.randn(2, 6, 3, requires_grad=True)
    V = torch.randn(2, 3, 9, requires_grad=True)
    weight, bias = torch.randn(12, 8, 3, 3), torch.randn(12)
    with torch.autocast("cpu", dtype=BF16):
        y = elr_ext.kron_lora_conv2d(x, A, U, V, weight, bias, 0.5, 1, 1)
    assert y.dtype == BF16
    delta = sum(torch.kron(a, u @ v) for a, u, v in zip(*(_cast64(t) for t in (A, U, V))))
    ref = torch.nn.functional.conv2d(_cast64(x), _cast64(weight) + 0.5 * delta.view(12, 8, 3, 3), _cast64(bias),
                                     1, 1)
    assert (y.double() - ref).abs().max() <= _bf16_tol(ref)
    y.float().pow(2).sum().backward()
    for name, p in (("A", A), ("U", U), ("V", V)):
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


def test_lowrank_proj_runs_in_the_autocast_dtype():
    torch.manual_seed(1)
    x = torch.randn(4, 6, 32, requires_grad=True)
    downs = [torch.randn(5, 32, requires_grad=True), torch.randn(3, 32, requires_grad=True)]
    ups = [torch.randn(16, 5, requires_grad=True), torch.randn(8, 3, requires_grad=True)]
    biases = [torch.randn(16), None]
    with torch.autocast("cpu", dtype=BF16):
        ys = elr_ext.lowrank_proj(x, downs, ups, biases)
    assert [y.dtype for y in ys] == [BF16, BF16]
    refs = reference.lowrank_proj(_cast64(x), [_cast64(d) for d in downs], [_cast64(u) for u in ups],
                                  [_cast64(biases[0]), None])
    for y, ref in zip(ys, refs):
        assert (y.double() - ref).abs().max() <= _bf16_tol(ref)
    sum(y.float().sum() for y in ys).backward()
    assert x.grad.dtype == torch.float32
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in downs + ups)


def test_fdn_runs_in_fp32_like_group_norm_under_cuda_autocast():
    torch.manual_seed(2)
    z = torch.randn(2, 32, 4, 4, dtype=BF16, requires_grad=True)
    gamma = torch.randn(2, 32, 4, 4, requires_grad=True)
    beta = torch.randn(2, 32, 4, 4, dtype=BF16)
    with torch.autocast("cpu", dtype=BF16):
        out = elr_ext.fdn(z, gamma, beta, num_groups=8, activation="silu")
    assert out.dtype == torch.float32
    ref = reference.fdn(z.detach().double(), gamma.detach().double(), beta.double(), 8, activation="silu")
    assert (out.double() - ref).abs().max() <= 1e-4 * float(ref.abs().max()) + 1e-5
    out.sum().backward()
    assert z.grad.dtype == BF16 and gamma.grad.dtype == torch.float32


def test_fp64_inputs_are_not_cast():
    x = torch.randn(3, 16, dtype=torch.float64)
    A, U, V = (torch.randn(1, 2, 4, dtype=torch.float64), torch.randn(1, 8, 2, dtype=torch.float64),
               torch.randn(1, 2, 4, dtype=torch.float64))
    with torch.autocast("cpu", dtype=BF16):
        y = elr_ext.kron_lora_linear(x, A, U, V)
        (h,) = elr_ext.lowrank_proj(x, [torch.randn(2, 16, dtype=torch.float64)], [torch.randn(5, 2, dtype=torch.float64)])
    assert y.dtype == torch.float64 and h.dtype == torch.float64
    torch.testing.assert_close(y, reference.kron_lora_linear(x, A, U, V))


def test_bad_input_under_autocast_names_the_argument():
    x = torch.randn(3, 16)
    A, U, V = torch.randn(1, 2, 4), torch.randn(1, 8, 2), torch.randn(1, 3, 4)  # V's rank 3 != U's 2
    with torch.autocast("cpu", dtype=BF16), pytest.raises(ValueError, match="V must be"):
        elr_ext.kron_lora_linear(x, A, U, V)
    with torch.autocast("cpu", dtype=BF16), pytest.raises(TypeError, match="downs must be a list"):
        elr_ext.lowrank_proj(x, torch.randn(2, 16), [torch.randn(5, 2)])
    with torch.autocast("cpu", dtype=BF16), pytest.raises(ValueError, match="gamma"):
        elr_ext.fdn(torch.randn(2, 8, 2, 2), torch.randn(2, 8, 2, 2), torch.randn(2, 8, 1, 1), num_groups=4)
