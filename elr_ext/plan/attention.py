"""Attention as the planned card runs it.

On fake CPU tensors F.scaled_dot_product_attention takes the CPU kernels, and on meta tensors the
math path, which materialises the [B, H, Lq, Lk] score matrix (2 GiB for one [2, 5, 4096, 64] call)
that no GPU kernel holds. For a GPU plan, `card_attention(spec)` replaces
F.scaled_dot_product_attention for the step with the kernel PyTorch's dispatcher picks on that card:

- flash attention (sm_80 and newer; fp16 / bf16; no mask; head dim <= 256): saves the output and
  the fp32 log-sum-exp [B, H, Lq];
- otherwise the memory-efficient kernel (sm_50 and newer, any float dtype, masks): the same saves;
- the math path only where neither applies.

Their backward workspaces (FLASH_WORKSPACES) are what the kernels allocate besides dq, dk, dv,
read from their sources: flash-attention 2's mha_bwd keeps softmax_d [B, H, Lq rounded up to 128]
and the fp32 dq accumulator [B, Lq rounded to 128, H, head dim rounded to 32]; the CUTLASS
memory-efficient backward accumulates dq in fp32 [B, Lq, H, head dim] for 16-bit inputs.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .devices import DeviceSpec


def _register_cpu_flash_flops() -> None:
    """FlopCounterMode has formulas for the CUDA attention kernels, none for the CPU flash kernel a CPU
    plan runs: the same products, so the same counts."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu in flop_registry:
        return

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu, get_raw=True)
    def _forward(query, key, value, *args, out_val=None, **kwargs) -> int:
        return sdpa_flop_count(query.shape, key.shape, value.shape)

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward, get_raw=True)
    def _backward(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


_register_cpu_flash_flops()


def _round(n: int, m: int) -> int:
    return -(-n // m) * m


def _flash_backward_workspace(args, kwargs):
    q = args[1]
    b, h, lq, d = q.shape
    return [((b, h, _round(lq, 128)), torch.float32), ((b, _round(lq, 128), h, _round(d, 32)), torch.float32)]


def _efficient_backward_workspace(args, kwargs):
    q = args[1]
    if q.dtype == torch.float32:
        return []
    b, h, lq, d = q.shape
    return [((b, lq, h, d), torch.float32)]


FLASH_WORKSPACES = {
    "_scaled_dot_product_flash_attention_backward": _flash_backward_workspace,
    "_scaled_dot_product_efficient_attention_backward": _efficient_backward_workspace,
}


def _kernel(spec: DeviceSpec, query, attn_mask, dropout_p) -> str:
    same = query.dtype in (torch.float16, torch.bfloat16)
    if spec.flash_attention and same and attn_mask is None and query.shape[-1] <= 256:
        return "flash"
    return "efficient"


@contextlib.contextmanager
def card_attention(spec: DeviceSpec):
    """F.scaled_dot_product_attention runs the card's kernel while the context is open."""
    original = F.scaled_dot_product_attention

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if enable_gqa or query.dim() != 4:
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa)
        if _kernel(spec, query, attn_mask, dropout_p) == "flash":
            return torch.ops.aten._scaled_dot_product_flash_attention(
                query, key, value, dropout_p, is_causal, False, scale=scale)[0]
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill(~attn_mask, float("-inf"))
        if attn_mask is not None:
            attn_mask = attn_mask.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, attn_mask, grad, dropout_p, is_causal, scale=scale)[0]

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
