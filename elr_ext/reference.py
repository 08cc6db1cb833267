"""Pure-PyTorch definitions of the ops: the ground truth every fast path is tested against.

Written for clarity, with the paper's equation numbers. Differentiable by autograd. Reductions are
done in fp32 for fp16/bf16 inputs (fp64 for fp64), as the kernels do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def group_stats(z: torch.Tensor, num_groups: int, eps: float = 1e-5):
    """Per-(sample, group) mean and 1/sqrt(var + eps) of z [N, C, H, W], each [N, G].

    Two passes (mean, then the mean of squared deviations), never E[x^2] - E[x]^2."""
    n = z.shape[0]
    grouped = z.reshape(n, num_groups, -1).to(accumulation_dtype(z.dtype))
    mean = grouped.mean(dim=-1)
    var = (grouped - mean.unsqueeze(-1)).square().mean(dim=-1)
    return mean, torch.rsqrt(var + eps)


def fdn_with_stats(z, gamma, beta, num_groups: int = 32, eps: float = 1e-5, activation: str | None = None):
    """FDN (eq. 8) returning (out, mean, rstd):

        FDN(Z, c) = norm(Z) * (1 + gamma(c)) + beta(c),   norm = GroupNorm(num_groups, affine=False)

    then the optional activation (Uni-ControlNet applies SiLU right after FDN)."""
    n = z.shape[0]
    acc = accumulation_dtype(z.dtype)
    mean, rstd = group_stats(z, num_groups, eps)
    grouped = z.reshape(n, num_groups, -1).to(acc)
    zhat = ((grouped - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)).reshape(z.shape)
    out = zhat * (1 + gamma.to(acc)) + beta.to(acc)
    if activation == "silu":
        out = F.silu(out)
    return out.to(z.dtype), mean, rstd


def fdn(z, gamma, beta, num_groups: int = 32, eps: float = 1e-5, activation: str | None = None):
    """FDN (eq. 8). z [N, C, H, W]; gamma, beta of z's shape or [N, C, 1, 1]."""
    return fdn_with_stats(z, gamma, beta, num_groups, eps, activation)[0]


def fdn_eager(z, gamma, beta, num_groups: int = 32, eps: float = 1e-5, activation: str | None = None):
    """FDN as a user writes it in eager PyTorch (Uni-ControlNet's FDN.forward): group_norm, mul,
    add, in the input dtype. The baseline of the benchmark and the same-dtype arm of the tolerance
    rule."""
    out = F.group_norm(z, num_groups, eps=eps) * (1 + gamma) + beta
    return F.silu(out) if activation == "silu" else out


def fdn_backward(grad_out, z, gamma, beta, mean, rstd, num_groups: int, activation: str | None = None):
    """The analytic gradient of FDN (DESIGN.md 2.1), given the forward's mean and rstd:

        g = dout * act'(pre),  pre = zhat * (1 + gamma) + beta
        dbeta = g,  dgamma = g * zhat,  dzhat = g * (1 + gamma)
        dz = rstd * (dzhat - mean_g(dzhat) - zhat * mean_g(dzhat * zhat))

    dgamma and dbeta are summed over H, W when gamma/beta are [N, C, 1, 1]. beta may be None when
    there is no activation. Returns (dz, dgamma, dbeta) in the inputs' dtype."""
    n = z.shape[0]
    acc = mean.dtype
    grouped = z.reshape(n, num_groups, -1).to(acc)
    zhat = ((grouped - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)).reshape(z.shape)
    g = grad_out.to(acc)
    if activation == "silu":
        pre = zhat * (1 + gamma.to(acc)) + beta.to(acc)
        s = torch.sigmoid(pre)
        g = g * s * (1 + pre * (1 - s))
    dzhat = (g * (1 + gamma.to(acc))).reshape(n, num_groups, -1)
    zhat_g = zhat.reshape(n, num_groups, -1)
    dz = rstd.unsqueeze(-1) * (
        dzhat - dzhat.mean(-1, keepdim=True) - zhat_g * (dzhat * zhat_g).mean(-1, keepdim=True)
    )
    dgamma, dbeta = g * zhat, g
    if gamma.shape != z.shape:
        dgamma, dbeta = dgamma.sum((2, 3), keepdim=True), dbeta.sum((2, 3), keepdim=True)
    return dz.reshape(z.shape).to(z.dtype), dgamma.to(z.dtype), dbeta.to(z.dtype)
