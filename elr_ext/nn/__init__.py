"""Modules built on the ops."""

from .fdn import FDN
from .kron_lora import (KronLoRAConv2d, KronLoRALinear, factorization, kron_lora_state_dict, load_kron_lora,
                        save_kron_lora)

__all__ = ["FDN", "KronLoRALinear", "KronLoRAConv2d", "factorization", "kron_lora_state_dict", "save_kron_lora",
           "load_kron_lora"]
