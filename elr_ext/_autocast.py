"""What the three ops do under torch.autocast: what autocast does to the built-in op each one replaces.

- kron_lora_linear and lowrank_proj are GEMMs: like F.linear, every fp32/fp16/bf16 input (weights,
  factors and biases included) is cast to the autocast dtype, and the output has that dtype.
- fdn is a GroupNorm: like F.group_norm under CUDA autocast (its fp32 list), the inputs are cast to
  fp32 and the output is fp32, on every device (CPU autocast would leave group_norm in its input's dtype).

fp64 inputs are left alone (autocast does not cast them either). The op then runs with autocast off,
so the backends see one dtype; gradients reach fp32 parameters in fp32 through the casts.
"""

from __future__ import annotations

from typing import Optional

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16, torch.float32)


def autocast_dtype(device_type: str, gemm: bool) -> Optional[torch.dtype]:
    """The dtype an op runs in under the autocast active on `device_type`, or None when it is off."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
    except RuntimeError:  # a device type autocast does not know (e.g. meta)
        return None
    return torch.get_autocast_dtype(device_type) if gemm else torch.float32


def autocast_cast(dtype: torch.dtype, t):
    """t cast to `dtype` when it is an fp16/bf16/fp32 tensor; lists cast item by item; None kept."""
    if isinstance(t, (list, tuple)):
        return [autocast_cast(dtype, u) for u in t]
    if isinstance(t, torch.Tensor) and t.dtype in _LOW_PRECISION and t.dtype != dtype:
        return t.to(dtype)
    return t
