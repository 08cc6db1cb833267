"""Low-rank layers for the Stage I student UNet (paper 2.2.1, eq. 2): a weight W [out, in] is stored as
W = A B with A = `up` [out, r] and B = `down` [r, in], initialised from the truncated SVD of the
teacher's weight.

Splits of the singular values (`split=`):
    "us"        A = U_k S_k,             B = V_k^T              (the paper's initialisation, default)
    "balanced"  A = U_k sqrt(S_k),       B = sqrt(S_k) V_k^T

The paper's "us" stays the default because the choice does not show in training: distilling a tiny
UNet with AdamW, the two splits ended within 0.5 % of each other, less than the spread between seeds
(Adam's per-parameter normalisation makes the update nearly blind to how S is shared between A and
B). docs/method.md, "Initialisation from the teacher".

Conv layers factor the weight viewed as [out, in * kh * kw]: a conv in -> r with the original kernel,
stride, padding and dilation, then a 1x1 conv r -> out carrying the bias.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_choice, check_positive_int
from ..ops.lowrank_proj import lowrank_proj

SPLITS = ("us", "balanced")


def svd(weight2d: torch.Tensor, dtype: torch.dtype = torch.float64):
    """U, S, Vh of a 2-D weight, computed on the CPU in `dtype` (fp64 by default). LAPACK is several
    times faster on tall matrices than on wide ones (measured 4 s against 11-57 s for a 1280 x 11520
    fp64 conv weight), so a wide weight is decomposed transposed."""
    w = weight2d.detach().to(device="cpu", dtype=dtype)
    if w.shape[0] >= w.shape[1]:
        return torch.linalg.svd(w, full_matrices=False)
    U, S, Vh = torch.linalg.svd(w.t(), full_matrices=False)
    return Vh.t(), S, U.t()


def split_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int, split: str = "us"):
    """(up [out, rank], down [rank, in]) from an SVD, the singular values split as `split` says."""
    check_choice("split", split, SPLITS)
    U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    if split == "us":
        return U * S, Vh
    root = S.sqrt()
    return U * root, root.unsqueeze(1) * Vh


def _check_rank(rank: int, full_rank: int, what: str) -> None:
    check_positive_int("rank", rank)
    if rank > full_rank:
        raise ValueError(f"rank={rank} is above the full rank {full_rank} of {what}")


class LowRankLinear(nn.Module):
    """y = x B^T A^T + bias with A = `up` [out, rank], B = `down` [rank, in], through
    elr_ext.lowrank_proj (one projection; the attention processor fuses q, k, v into one call).

    Build one from a trained layer with `LowRankLinear.from_linear(linear, rank, split="us")`; the
    constructor alone initialises like nn.Linear does (kaiming-uniform factors)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        check_positive_int("in_features", in_features)
        check_positive_int("out_features", out_features)
        _check_rank(rank, min(in_features, out_features), f"a [{out_features}, {in_features}] linear layer")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.up = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.up, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, split: str = "us", svd_dtype: torch.dtype = torch.float64,
                    factors: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None) -> "LowRankLinear":
        """The rank-`rank` truncated SVD of `linear` (computed in `svd_dtype` on the CPU, cast to the
        layer's dtype and device); `factors` passes an SVD (U, S, Vh) already computed."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        check_choice("split", split, SPLITS)
        weight = linear.weight
        module = cls(linear.in_features, linear.out_features, rank, bias=linear.bias is not None,
                     device=weight.device, dtype=weight.dtype)
        up, down = split_factors(*(factors or svd(weight, svd_dtype)), rank, split)
        _copy_factors(module, up, down, linear)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        biases = None if self.bias is None else (self.bias,)
        return lowrank_proj(x, (self.down,), (self.up,), biases)[0]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}")


class LowRankConv2d(nn.Module):
    """A Conv2d factored through rank r: conv in -> r with the original kernel, stride, padding and
    dilation (`down` [r, in, kh, kw]), then a 1x1 conv r -> out (`up` [out, r, 1, 1]) plus `bias`.
    groups=1 only (decompose keeps grouped convs dense)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, rank: int, stride=1, padding=0, dilation=1,
                 bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None):
        super().__init__()
        check_positive_int("in_channels", in_channels)
        check_positive_int("out_channels", out_channels)
        check_choice("padding_mode", padding_mode, ("zeros", "reflect", "replicate", "circular"))
        # nn.Conv2d normalises kernel_size/stride/padding/dilation and derives the padding for the
        # non-zero padding modes; a throwaway meta-device conv gives the same attributes here.
        ref = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, 1, bias, padding_mode,
                        device="meta")
        kh, kw = ref.kernel_size
        _check_rank(rank, min(out_channels, in_channels * kh * kw),
                    f"a [{out_channels}, {in_channels}, {kh}, {kw}] conv layer")
        self.in_channels, self.out_channels, self.rank = in_channels, out_channels, rank
        self.kernel_size, self.stride, self.padding, self.dilation = ref.kernel_size, ref.stride, ref.padding, ref.dilation
        self.padding_mode = padding_mode
        self._reversed_padding_repeated_twice = ref._reversed_padding_repeated_twice
        kw_ = {"device": device, "dtype": dtype}
        self.down = nn.Parameter(torch.empty(rank, in_channels, kh, kw, **kw_))
        self.up = nn.Parameter(torch.empty(out_channels, rank, 1, 1, **kw_))
        self.bias = nn.Parameter(torch.empty(out_channels, **kw_)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.up, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.down[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int, split: str = "us", svd_dtype: torch.dtype = torch.float64,
                  factors: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None) -> "LowRankConv2d":
        """The rank-`rank` truncated SVD of `conv`'s weight viewed [out, in * kh * kw] (computed in
        `svd_dtype` on the CPU, cast to the layer's dtype and device)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"conv has groups={conv.groups}; LowRankConv2d supports groups=1 only")
        check_choice("split", split, SPLITS)
        weight = conv.weight
        module = cls(conv.in_channels, conv.out_channels, conv.kernel_size, rank, conv.stride, conv.padding,
                     conv.dilation, conv.bias is not None, conv.padding_mode, device=weight.device, dtype=weight.dtype)
        up, down = split_factors(*(factors or svd(weight.flatten(1), svd_dtype)), rank, split)
        _copy_factors(module, up.reshape(module.up.shape), down.reshape(module.down.shape), conv)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            h = F.conv2d(x, self.down, None, self.stride, 0, self.dilation)
        else:
            h = F.conv2d(x, self.down, None, self.stride, self.padding, self.dilation)
        return F.conv2d(h, self.up, self.bias)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, rank={self.rank}, "
             f"stride={self.stride}, padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s + f", bias={self.bias is not None}"


@torch.no_grad()
def _copy_factors(module: nn.Module, up: torch.Tensor, down: torch.Tensor, dense: nn.Module) -> None:
    """Fill `module` from the factors and the dense layer's bias; trainability and train/eval mode
    follow the dense layer."""
    module.up.copy_(up)
    module.down.copy_(down)
    trainable = dense.weight.requires_grad
    module.up.requires_grad_(trainable)
    module.down.requires_grad_(trainable)
    if dense.bias is not None:
        module.bias.copy_(dense.bias)
        module.bias.requires_grad_(dense.bias.requires_grad)
    module.train(dense.training)
