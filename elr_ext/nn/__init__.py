"""Modules built on the ops."""

from .counting import count_parameters
from .fdn import FDN
from .attention import LowRankAttnProcessor
from .kron_lora import (KronLoRAConv2d, KronLoRALinear, factorization, kron_lora_state_dict, kronecker_splits, load_kron_lora,
                        save_kron_lora)
from .lowrank import LowRankConv2d, LowRankLinear

__all__ = ["count_parameters", "FDN", "KronLoRALinear", "KronLoRAConv2d", "factorization", "kronecker_splits", "kron_lora_state_dict", "save_kron_lora",
           "load_kron_lora", "LowRankLinear", "LowRankConv2d", "LowRankAttnProcessor"]


def __getattr__(name):
    # The Stage II adapter builds on diffusers (the "train" extra): imported on first use, so that
    # `import elr_ext` works without diffusers.
    if name in ("LocalControlAdapter", "FDNResnetBlock"):
        from . import control_adapter

        return getattr(control_adapter, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
