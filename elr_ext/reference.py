"""Pure-PyTorch definitions of the ops: the ground truth every fast path is tested against.

Written for clarity, with the paper's equation numbers. Differentiable by autograd. Reductions are
done in fp32 for fp16/bf16 inputs (fp64 for fp64), as the kernels do.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every backend sums, normalises and keeps statistics in: float64 for float64 inputs,
    float32 for float32 / float16 / bfloat16 (acc_t<T> of csrc/kernels/accumulate.h in C++)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def group_stats(z: torch.Tensor, num_groups: int, eps: float = 1e-5):
    """Per-(sample, group) mean and 1/sqrt(var + eps) of z [N, C, H, W], each [N, G].

    Two passes (mean, then the mean of squared deviations), never E[x^2] - E[x]^2. An empty group
    (H * W == 0 or C == 0) has the statistics of a constant: mean 0, variance 0, so rstd is
    1/sqrt(eps) (computed in fp64, rounded once), on every backend."""
    n = z.shape[0]
    grouped = z.reshape(n, num_groups, -1).to(accumulation_dtype(z.dtype))
    if grouped.shape[-1] == 0:
        mean = grouped.sum(dim=-1)  # zeros, still in the autograd graph
        return mean, torch.full_like(mean, math.inf if eps == 0 else 1 / math.sqrt(eps))
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
    """The analytic gradient of FDN (docs/method.md, "Eq. 8"), given the forward's mean and rstd:

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


def kron_delta(A, U, V):
    """The Kronecker LoRA update (eq. 9): dW = sum_t A_t kron (U_t V_t), [a1*b1, a2*b2].

    A [T, a1, a2], U [T, b1, r], V [T, r, b2]. Only the conv path builds dW (it is small next to a
    convolution); the linear path never does (kron_lora_linear)."""
    return sum(torch.kron(A[t], U[t] @ V[t]) for t in range(A.shape[0]))


def kron_lora_intermediates(x2d, A, U, V):
    """The rank-space products of kron_lora_linear for x2d [M, a2*b2]: with X_m = x_m viewed [a2, b2],
    tmat[m] = X_m V_t^T for every term ([M, a2, T*r]) and smat[m] = A_t tmat[m] ([M, a1, T*r])."""
    T, a1, a2 = A.shape
    r, b2 = V.shape[1], V.shape[2]
    X = x2d.reshape(-1, a2, b2)
    tmat = torch.einsum("mpq,tsq->mpts", X, V)  # X V_t^T
    smat = torch.einsum("tip,mpts->mits", A, tmat)  # A_t (X V_t^T)
    return tmat.reshape(-1, a2, T * r), smat.reshape(-1, a1, T * r)


def kron_lora_linear(x, A, U, V, weight=None, bias=None, scale: float = 1.0):
    """y = x W^T + bias + scale * x dW^T with dW = sum_t A_t kron (U_t V_t) (eq. 9), never building dW:
    (A kron B) vec(X) = vec(B X A^T) gives Y_m = sum_t A_t X_m V_t^T U_t^T."""
    T, a1, a2 = A.shape
    b1, r = U.shape[1], U.shape[2]
    lead = x.shape[:-1]
    _, smat = kron_lora_intermediates(x.reshape(-1, x.shape[-1]), A, U, V)
    delta = torch.einsum("mits,tks->mik", smat.reshape(-1, a1, T, r), U).reshape(*lead, a1 * b1)
    y = scale * delta
    if weight is not None:
        y = y + torch.nn.functional.linear(x, weight)
    if bias is not None:
        y = y + bias
    return y


def kron_lora_linear_backward(grad_y, x2d, A, U, V, weight=None, scale: float = 1.0):
    """The analytic gradients of kron_lora_linear for x2d [M, d_in] and grad_y [M, d_out]
    (csrc/kernels/kron_lora_common.h): returns (dx, dA, dU, dV, dweight, dbias); dweight is None
    without a weight."""
    T, a1, a2 = A.shape
    b1, r = U.shape[1], U.shape[2]
    b2 = V.shape[2]
    X = x2d.reshape(-1, a2, b2)
    dY = grad_y.reshape(-1, a1, b1)
    tmat, smat = kron_lora_intermediates(x2d, A, U, V)
    tmat, smat = tmat.reshape(-1, a2, T, r), smat.reshape(-1, a1, T, r)
    ds = scale * torch.einsum("mik,tks->mits", dY, U)
    dU = scale * torch.einsum("mik,mits->tks", dY, smat)
    dA = torch.einsum("mits,mpts->tip", ds, tmat)
    dt = torch.einsum("tip,mits->mpts", A, ds)
    dV = torch.einsum("mpts,mpq->tsq", dt, X)
    dx = torch.einsum("mpts,tsq->mpq", dt, V).reshape(x2d.shape)
    dweight = None
    if weight is not None:
        dx = dx + grad_y @ weight
        dweight = grad_y.t() @ x2d
    return dx, dA, dU, dV, dweight, grad_y.sum(0)


def kron_delta_backward(grad, A, U, V):
    """The analytic gradients of kron_delta for grad [a1*b1, a2*b2]: (dA, dU, dV)."""
    T, a1, a2 = A.shape
    b1, b2 = U.shape[1], V.shape[2]
    G = grad.reshape(a1, b1, a2, b2)
    B = U @ V  # [T, b1, b2]
    dA = torch.einsum("ikpq,tkq->tip", G, B)
    dB = torch.einsum("ikpq,tip->tkq", G, A)
    return dA, dB @ V.transpose(1, 2), U.transpose(1, 2) @ dB


# ---------------------------------------------------------------------------------- lowrank_proj
def lowrank_proj_with_hidden(x, downs, ups, biases=None):
    """K low-rank projections of one input (eq. 2: K = W_K tau = A B tau, with W_j = A_j B_j, the
    SVD initialisation A = U_k S_k, B = V_k^T of section 2.2.1).

    x [..., in]; downs[j] = B_j [r_j, in]; ups[j] = A_j [out_j, r_j]; biases None or a list of K
    entries, each None or b_j [out_j]. One product for all down-projections,
    h = x [B_1; ...; B_K]^T  [..., sum r_j], then y_j = h_j A_j^T + b_j with h_j h's j-th column block.
    Returns ((y_1, ..., y_K), h); h is what autograd needs besides x."""
    biases = [None] * len(downs) if biases is None else list(biases)
    h = x @ torch.cat(list(downs)).T
    hs = h.split([B.shape[0] for B in downs], dim=-1)
    ys = tuple(F.linear(h_j, A_j, b_j) for h_j, A_j, b_j in zip(hs, ups, biases))
    return ys, h


def lowrank_proj(x, downs, ups, biases=None):
    """y_j = x B_j^T A_j^T + b_j for j = 1..K (eq. 2), the weights W_j = A_j B_j never built."""
    return lowrank_proj_with_hidden(x, downs, ups, biases)[0]


def lowrank_proj_backward(grad_ys, x2d, h, downs, ups):
    """The analytic gradients of lowrank_proj for x2d [M, in], h = x2d [B_1; ...; B_K]^T [M, R] and
    grad_ys[j] [M, out_j]: dA_j = dy_j^T h_j; dh_j = dy_j A_j; dB = dh^T x; dx = dh B; db_j = sum_m dy_j.
    Returns (dx, [dB_j], [dA_j], [db_j]); dh is rounded to x's dtype, as autograd of the unfused
    product rounds it."""
    hs = h.split([B.shape[0] for B in downs], dim=-1)
    dh = torch.cat([dy @ A for dy, A in zip(grad_ys, ups)], dim=-1)
    dx = dh @ torch.cat(list(downs))
    ddown = (dh.T @ x2d).split([B.shape[0] for B in downs], dim=0)
    dups = [dy.T @ h_j for dy, h_j in zip(grad_ys, hs)]
    dbiases = [dy.sum(0) for dy in grad_ys]
    return dx, list(ddown), dups, dbiases
