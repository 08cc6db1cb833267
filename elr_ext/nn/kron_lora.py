"""Kronecker LoRA adapters on frozen layers (eq. 9): KronLoRALinear, KronLoRAConv2d, and saving /
loading the adapter's state alone."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from ..ops.kron_lora import kron_delta, kron_lora_linear
from ..ops.kron_lora_conv2d import kron_lora_conv2d


def factorization(dimension: int, factor: int = -1) -> Tuple[int, int]:
    """LoKr's split of `dimension` into (m, n), m <= n, m * n = dimension: m = factor when it divides,
    else the most balanced split with m <= factor (factor = -1: the most balanced split). The same rule
    as LyCORIS / peft LoKr's `factorization`, so their factors map onto ours."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    limit = dimension if factor <= 0 else factor
    m, n = 1, dimension
    while m < n:
        candidate = m + 1
        while dimension % candidate != 0:
            candidate += 1
        if candidate > limit:
            break
        m, n = candidate, dimension // candidate
    return (m, n) if m <= n else (n, m)


def nearest_divisor(dimension: int, n: int) -> int:
    """The divisor of `dimension` closest to n (the larger one on a tie)."""
    best = 1
    for d in range(1, dimension + 1):
        if dimension % d == 0 and (abs(d - n) < abs(best - n) or (abs(d - n) == abs(best - n) and d > best)):
            best = d
    return best


def kronecker_splits(d_out: int, d_in: int, terms: int, factor: Optional[int] = None,
                     strict: bool = True) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """((a1, b1), (a2, b2)) with d_out = a1*b1, d_in = a2*b2 (docs/kron_lora.md).

    factor None: eq. 9, A_i of n x n with n = terms; factor > 0: eq. 9 with n = factor;
    factor = -1: LoKr's balanced split of each dimension (`factorization`). An n that does not divide
    a dimension raises (strict) or, with strict=False, that dimension takes its divisor nearest to n."""
    if factor is not None and (isinstance(factor, bool) or not isinstance(factor, int) or factor == 0 or factor < -1):
        raise ValueError(f"factor must be None (n = terms, eq. 9), an int n >= 1 or -1 (LoKr's balanced split), "
                         f"got {factor!r}")
    if factor == -1:
        return factorization(d_out), factorization(d_in)
    n = terms if factor is None else factor
    splits = []
    for name, dimension in (("d_out", d_out), ("d_in", d_in)):
        a = n
        if dimension % n:
            if strict:
                both = math.gcd(d_out, d_in)
                raise ValueError(
                    f"eq. 9 splits every dimension as n x (d / n), but n={n} "
                    f"({'terms' if factor is None else 'factor'}) does not divide {name}={dimension} "
                    f"(layer {d_in} -> {d_out}); the nearest n that divides both is {nearest_divisor(both, n)} "
                    f"(factor={nearest_divisor(both, n)}), or factor=-1 picks LoKr's balanced split, or give "
                    f"out_factors / in_factors")
            a = nearest_divisor(dimension, n)
        splits.append((a, dimension // a))
    return splits[0], splits[1]


class _KronLoRAMixin:
    """Factors, init and merge shared by the linear and conv adapters. The frozen base layer is
    `self.base`; its weight is viewed as [d_out, d_in]."""

    def _init_factors(self, d_out: int, d_in: int, terms: int, rank: int, alpha: Optional[float],
                      factor: Optional[int], out_factors: Optional[Tuple[int, int]],
                      in_factors: Optional[Tuple[int, int]]):
        for name, value in (("terms", terms), ("rank", rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if out_factors is None or in_factors is None:
            out_split, in_split = kronecker_splits(d_out, d_in, terms, factor)
        a1, b1 = out_factors or out_split
        a2, b2 = in_factors or in_split
        if a1 * b1 != d_out:
            raise ValueError(f"out_factors {out_factors} must multiply to d_out={d_out}")
        if a2 * b2 != d_in:
            raise ValueError(f"in_factors {in_factors} must multiply to d_in={d_in}")
        for p in self.base.parameters():
            p.requires_grad_(False)
        weight = self.base.weight
        kw = {"dtype": weight.dtype, "device": weight.device}
        self.terms, self.rank = terms, rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scale = self.alpha / rank
        self.A = nn.Parameter(torch.empty(terms, a1, a2, **kw))
        self.U = nn.Parameter(torch.zeros(terms, b1, rank, **kw))  # zero: dW = 0 at init
        self.V = nn.Parameter(torch.empty(terms, rank, b2, **kw))
        nn.init.kaiming_uniform_(self.A.view(terms * a1, a2), a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.V.view(terms * rank, b2), a=math.sqrt(5))
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """scale * dW, shaped like the base weight (builds dW: for merging and the conv path)."""
        return (self.scale * kron_delta(self.A, self.U, self.V)).view_as(self.base.weight)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (inference): forward then costs the base layer alone."""
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False


class KronLoRALinear(_KronLoRAMixin, nn.Module):
    """A frozen nn.Linear plus a trainable Kronecker update: y = base(x) + (alpha/rank) * x dW^T with
    dW = sum_t A_t kron (U_t V_t), computed without building dW (elr_ext.kron_lora_linear).

    Args:
        base: the layer to adapt (frozen here).
        terms: T, the number of Kronecker terms (the paper's n).
        rank: r of each U_t V_t.
        alpha: scale = alpha / rank (default alpha = rank).
        factor: how d_out = a1*b1 and d_in = a2*b2 are split (`kronecker_splits`): None (default) is
            eq. 9 with A_t of n x n, n = terms, U_t (d_out/n) x r, V_t r x (d_in/n); an int n >= 1 is
            eq. 9 with that n; -1 is LoKr's balanced split (peft / LyCORIS parity).
        out_factors, in_factors: explicit (a1, b1) and (a2, b2).
    """

    def __init__(self, base: nn.Linear, terms: int = 4, rank: int = 8, alpha: Optional[float] = None,
                 factor: Optional[int] = None, out_factors: Optional[Tuple[int, int]] = None,
                 in_factors: Optional[Tuple[int, int]] = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        self.base = base
        self._init_factors(base.out_features, base.in_features, terms, rank, alpha, factor, out_factors, in_factors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        return kron_lora_linear(x, self.A, self.U, self.V, self.base.weight, self.base.bias, self.scale)

    def extra_repr(self) -> str:
        return (f"terms={self.terms}, rank={self.rank}, alpha={self.alpha}, A={list(self.A.shape)}, "
                f"U={list(self.U.shape)}, V={list(self.V.shape)}, merged={self.merged}")


class KronLoRAConv2d(_KronLoRAMixin, nn.Module):
    """A frozen nn.Conv2d plus a Kronecker update of its weight viewed [out, in/groups*kh*kw]. dW is
    built in the forward (small next to the convolution); the backward goes to the factors without
    the weight gradient (elr_ext.kron_lora_conv2d), except for grouped convs and padding modes other
    than zeros, which go through it. Arguments as KronLoRALinear."""

    def __init__(self, base: nn.Conv2d, terms: int = 4, rank: int = 8, alpha: Optional[float] = None,
                 factor: Optional[int] = None, out_factors: Optional[Tuple[int, int]] = None,
                 in_factors: Optional[Tuple[int, int]] = None):
        super().__init__()
        if not isinstance(base, nn.Conv2d):
            raise TypeError(f"base must be an nn.Conv2d, got {type(base).__name__}")
        self.base = base
        d_in = base.weight[0].numel()
        self._init_factors(base.out_channels, d_in, terms, rank, alpha, factor, out_factors, in_factors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        base = self.base
        if base.groups == 1 and base.padding_mode == "zeros" and not isinstance(base.padding, str):
            # the backward takes the factors' gradients without the weight gradient
            return kron_lora_conv2d(x, self.A, self.U, self.V, base.weight, base.bias, self.scale, base.stride,
                                    base.padding, base.dilation)
        weight = base.weight + self.delta_weight()  # grouped / padded-mode convs: through the weight gradient
        return base._conv_forward(x, weight, base.bias)

    def extra_repr(self) -> str:
        return (f"terms={self.terms}, rank={self.rank}, alpha={self.alpha}, A={list(self.A.shape)}, "
                f"U={list(self.U.shape)}, V={list(self.V.shape)}, merged={self.merged}")


_ADAPTERS = (KronLoRALinear, KronLoRAConv2d)


def kron_lora_state_dict(model: nn.Module) -> dict:
    """The Kronecker factors of every adapter in `model`, by qualified name (the adapter alone)."""
    return {f"{name}.{p}" if name else p: getattr(module, p).detach()
            for name, module in model.named_modules() if isinstance(module, _ADAPTERS) for p in ("A", "U", "V")}


def save_kron_lora(model: nn.Module, path: str) -> None:
    """Write the adapters' factors alone as safetensors (atomically: a temporary name, then rename)."""
    import os

    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in kron_lora_state_dict(model).items()}
    if not state:
        raise ValueError("model has no KronLoRALinear / KronLoRAConv2d adapters to save")
    save_file(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_kron_lora(model: nn.Module, path: str) -> None:
    """Load factors written by save_kron_lora into the matching adapters of `model`. Every adapter
    must be in the file with the same shapes; nothing is changed if one is not."""
    from safetensors.torch import load_file

    state = load_file(path)
    expected = kron_lora_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"adapter file {path} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"{key}: file has shape {list(value.shape)}, model has {list(expected[key].shape)}")
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, value in state.items():
            name, _, param = key.rpartition(".")
            getattr(modules[name], param).copy_(value)
