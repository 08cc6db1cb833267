"""The ops: one module per op, each holding its schema, fake kernel, autograd and dispatch."""

from .fdn import fdn
from .kron_lora import kron_delta, kron_lora_conv2d, kron_lora_linear
from .lowrank_proj import lowrank_proj

__all__ = ["fdn", "kron_lora_linear", "kron_lora_conv2d", "kron_delta", "lowrank_proj"]
