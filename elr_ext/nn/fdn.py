"""FDN as a module: Uni-ControlNet's feature denormalisation with the fused op underneath."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.fdn import fdn


class FDN(nn.Module):
    """Feature denormalisation (eq. 8): ``act(GroupNorm(z) * (1 + gamma(c)) + beta(c))``.

    As Uni-ControlNet's FDN: a parameter-free GroupNorm(num_groups) of the features z, and gamma,
    beta from two 3x3 convolutions of the condition features c (same spatial size as z). The
    normalisation, modulation and optional SiLU run as one fused op (elr_ext.fdn).

    Args:
        channels: channels C of z.
        condition_channels: channels of the condition features c.
        num_groups: GroupNorm groups (32 in Stable Diffusion and Uni-ControlNet).
        eps: GroupNorm epsilon.
        activation: None or "silu" (Uni-ControlNet applies SiLU right after every FDN).
    """

    def __init__(self, channels: int, condition_channels: int, num_groups: int = 32, eps: float = 1e-5,
                 activation: str | None = None, kernel_size: int = 3):
        super().__init__()
        if channels % num_groups:
            raise ValueError(f"num_groups={num_groups} must divide channels={channels}")
        self.channels = channels
        self.num_groups = num_groups
        self.eps = eps
        self.activation = activation
        padding = kernel_size // 2
        self.conv_gamma = nn.Conv2d(condition_channels, channels, kernel_size, padding=padding)
        self.conv_beta = nn.Conv2d(condition_channels, channels, kernel_size, padding=padding)

    def forward(self, z: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        if condition.dim() != 4 or condition.shape[-2:] != z.shape[-2:] or condition.shape[0] != z.shape[0]:
            raise ValueError(
                f"condition must be [N, {self.conv_gamma.in_channels}, H, W] with z's batch and spatial size "
                f"{z.shape[0]}, {list(z.shape[-2:])}; got {list(condition.shape)}"
            )
        gamma = self.conv_gamma(condition)
        beta = self.conv_beta(condition)
        return fdn(z, gamma, beta, self.num_groups, self.eps, self.activation)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_groups={self.num_groups}, eps={self.eps}, activation={self.activation!r}"
