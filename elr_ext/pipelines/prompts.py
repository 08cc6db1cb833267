"""Text conditioning of the three Stable Diffusion families, one home for the pipelines and the
training stages.

    text = encode_text(tokenizers, text_encoders, ["a red circle"], device)
    added = added_cond_kwargs(unet, text.pooled, time_ids([(32, 32)], [(0, 0)], (32, 32)))
    unet(sample, t, encoder_hidden_states=text.states, added_cond_kwargs=added)

SD 1.x / 2.x: one CLIP text encoder, its last hidden states; no pooled embedding, no added
conditioning. SDXL: two encoders (CLIPTextModel, CLIPTextModelWithProjection), each one's
penultimate hidden states concatenated on features, the second one's projected pooled embedding
(`text_embeds`) and six micro-conditioning time ids (original size, crop top-left, target size,
each (height, width)) added to the time embedding (UNet config addition_embed_type="text_time").
This is what diffusers' StableDiffusionXLPipeline.encode_prompt and _get_add_time_ids compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

Size = Tuple[int, int]


@dataclass
class TextStates:
    """What a UNet takes of the text: `states` [N, L, D] (encoder_hidden_states) and, for SDXL,
    `pooled` [N, P] (added_cond_kwargs["text_embeds"]); None for one-encoder families."""

    states: torch.Tensor
    pooled: Optional[torch.Tensor] = None

    def repeat_interleave(self, n: int) -> "TextStates":
        pooled = None if self.pooled is None else self.pooled.repeat_interleave(n, dim=0)
        return TextStates(self.states.repeat_interleave(n, dim=0), pooled)

    def __getitem__(self, index) -> "TextStates":
        return TextStates(self.states[index], None if self.pooled is None else self.pooled[index])

    @staticmethod
    def cat(parts: Sequence["TextStates"]) -> "TextStates":
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return TextStates(torch.cat([p.states for p in parts]), pooled)

    def zeros_like(self) -> "TextStates":
        return TextStates(torch.zeros_like(self.states), None if self.pooled is None else torch.zeros_like(self.pooled))


def uses_added_conditioning(unet) -> bool:
    """True for an SDXL-style UNet (addition_embed_type="text_time")."""
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def encode_text(tokenizers: Sequence, text_encoders: Sequence, prompts: List[str], device) -> TextStates:
    """The text states of `prompts`, padded to each tokenizer's model_max_length. One encoder: its
    last hidden states. Two (SDXL): each one's penultimate hidden states, concatenated, and the
    pooled output of the last one (CLIPTextModelWithProjection: the projected embedding)."""
    tokenizers, text_encoders = list(tokenizers), list(text_encoders)
    if len(tokenizers) != len(text_encoders) or not text_encoders:
        raise ValueError(f"encode_text needs one tokenizer per text encoder, got {len(tokenizers)} tokenizers "
                         f"for {len(text_encoders)} text encoders")
    prompts = list(prompts)
    if len(text_encoders) == 1:
        return TextStates(text_encoders[0](_token_ids(tokenizers[0], prompts, device))[0])
    states, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        output = encoder(_token_ids(tokenizer, prompts, device), output_hidden_states=True)
        pooled = output[0]  # the last encoder's: text_embeds of CLIPTextModelWithProjection
        states.append(output.hidden_states[-2])
    if pooled.dim() != 2:
        raise ValueError(f"the last text encoder ({type(text_encoders[-1]).__name__}) gives no pooled embedding "
                         "[N, D]; SDXL's second encoder is a CLIPTextModelWithProjection")
    return TextStates(torch.cat(states, dim=-1), pooled)


def _token_ids(tokenizer, prompts: List[str], device) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def time_ids(original_sizes: Sequence[Size], crops_top_left: Sequence[Size], target_size: Size,
             device=None, dtype=torch.float32) -> torch.Tensor:
    """SDXL's micro-conditioning, one row per sample: (original h, w, crop top, left, target h, w)."""
    if len(original_sizes) != len(crops_top_left):
        raise ValueError(f"time_ids: {len(original_sizes)} original sizes for {len(crops_top_left)} crops")
    rows = [list(o) + list(c) + list(target_size) for o, c in zip(original_sizes, crops_top_left)]
    for row in rows:
        if len(row) != 6:
            raise ValueError(f"time_ids: each size and crop is (height, width); got the row {row}")
    return torch.tensor(rows, device=device, dtype=dtype)


def added_cond_kwargs(unet, pooled: Optional[torch.Tensor], ids: Optional[torch.Tensor]) -> Optional[dict]:
    """The UNet's added_cond_kwargs: {"text_embeds", "time_ids"} for SDXL, None for the others."""
    if not uses_added_conditioning(unet):
        return None
    if pooled is None or ids is None:
        raise ValueError("the UNet has addition_embed_type='text_time' (SDXL): it needs the pooled text embedding "
                         "and the time ids; encode the prompts with both of its text encoders")
    return {"text_embeds": pooled, "time_ids": ids.to(device=pooled.device, dtype=pooled.dtype)}
