"""The ops: one module per op, each holding its schema, fake kernel, autograd and dispatch."""

from .fdn import fdn
from .kron_lora import kron_delta, kron_lora_linear
from .kron_lora_conv2d import kron_lora_conv2d
from .lowrank_proj import lowrank_proj

__all__ = ["fdn", "kron_lora_linear", "kron_lora_conv2d", "kron_delta", "lowrank_proj"]
