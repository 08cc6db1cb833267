"""A diffusers attention processor for low-rank q/k/v projections (eq. 2; docs/method.md, "Eq. 2").

Self-attention computes q, k and v with one elr_ext.lowrank_proj call on the hidden states (K = 3:
one GEMM over the concatenated down-projections); cross-attention computes q from the hidden states
(K = 1) and k, v with one call on the text context (K = 2). The rest follows diffusers'
AttnProcessor2_0 (spatial norm, 4-D input, attention mask, group norm, norm_cross, q/k norms,
residual connection, output rescaling) and runs F.scaled_dot_product_attention. The output
projection is `attn.to_out[0]`, a LowRankLinear after elr_ext.decompose.

Nothing here depends on the UNet's layout: the head count comes from `attn.heads` and the head size
from the width of the k projection, so the processor serves SD 1.x, SD 2.x and SDXL attention alike
(any context width, any number of transformer layers per block).

Projections that are still dense nn.Linear (decompose keeps a layer dense where low rank would not
save parameters) are called as they are, so any mix of low-rank and dense q/k/v works. The fused
path reads the LowRankLinear parameters directly; forward hooks on to_q/to_k/to_v do not run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .lowrank import LowRankLinear, lowrank_proj


def project(x: torch.Tensor, layers) -> list:
    """[layer(x) for layer in layers], with every LowRankLinear among them computed by one
    lowrank_proj call (one GEMM over their concatenated down-projections)."""
    lowrank = [m for m in layers if isinstance(m, LowRankLinear)]
    fused = iter(())
    if lowrank:
        biases = None
        if any(m.bias is not None for m in lowrank):
            biases = tuple(m.bias for m in lowrank)
        fused = iter(lowrank_proj(x, tuple(m.down for m in lowrank), tuple(m.up for m in lowrank), biases))
    return [next(fused) if isinstance(m, LowRankLinear) else m(x) for m in layers]


class LowRankAttnProcessor:
    """Drop-in for diffusers' AttnProcessor2_0 on an `Attention` whose to_q/to_k/to_v are
    LowRankLinear (install with `attn.set_processor(LowRankAttnProcessor())` or the model's
    `set_attn_processor`; elr_ext.decompose does it). Not for attention with added k/v projections
    (IP-adapter, AttnAddedKVProcessor)."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (hidden_states.shape if encoder_hidden_states is None
                                          else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            # scaled_dot_product_attention takes the mask as (batch, heads, query length, key length)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        if encoder_hidden_states is None:  # self-attention: q, k, v from one fused call
            query, key, value = project(hidden_states, (attn.to_q, attn.to_k, attn.to_v))
        else:  # cross-attention: q on the hidden states, k and v fused on the context
            if attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            (query,) = project(hidden_states, (attn.to_q,))
            key, value = project(encoder_hidden_states, (attn.to_k, attn.to_v))

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # attn.scale is head_dim ** -0.5 unless the module was built with scale_qk=False
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                       is_causal=False, scale=attn.scale)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)  # the low-rank output projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
