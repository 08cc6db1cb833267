"""Parameter counts: the one way elr_ext, the benchmarks and the training application count."""

from __future__ import annotations

from typing import Iterable, Union

from torch import nn


def count_parameters(*sources: Union[nn.Module, Iterable[nn.Parameter]], trainable_only: bool = False) -> int:
    """Elements of the distinct parameters of `sources` (modules, or iterables of parameters such as
    adapter.trainable_parameters()). A parameter reached twice (shared by two modules, or in two
    sources) counts once: by its storage where it has data, by identity on the meta device and for
    the fake tensors of elr_ext.plan (which have no data pointer). trainable_only: only those with requires_grad.

        count_parameters(unet)                       # total
        count_parameters(unet, trainable_only=True)  # trainable
        count_parameters(unet, adapter)              # the whole system, shared weights once
    """
    from torch._subclasses.fake_tensor import is_fake

    seen, total = set(), 0
    for source in sources:
        for p in source.parameters() if isinstance(source, nn.Module) else source:
            if trainable_only and not p.requires_grad:
                continue
            key = ("id", id(p)) if p.is_meta or is_fake(p) else (p.device, p.data_ptr(), p.numel())
            if key not in seen:
                seen.add(key)
                total += p.numel()
    return total
