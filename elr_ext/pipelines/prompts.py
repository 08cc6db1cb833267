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

    @staticmethod
    def cat(parts: Sequence["TextStates"]) -> "TextStates":
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return TextStates(torch.cat([p.states for p in parts]), pooled)

    def zeros_like(self) -> "TextStates":
        return TextStates(torch.zeros_like(self.states), None if self.pooled is None else torch.zeros_like(self.pooled))


def uses_added_conditioning(unet) -> bool:
    """True for an SDXL-style UNet (addition_embed_type="text_time")."""
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def encode_text(tokenizers: Sequence, text_encoders: Sequence, prompts: List[str], device,
                prompts_2: Optional[Sequence[str]] = None) -> TextStates:
    """The text states of `prompts`, padded to each tokenizer's model_max_length. One encoder: its
    last hidden states (with the attention mask where its config sets use_attention_mask, as
    StableDiffusionPipeline does). Two (SDXL): each one's penultimate hidden states, concatenated,
    and the pooled embedding: the first 2-D output among the encoders, which in SDXL is the second
    one's (CLIPTextModelWithProjection's projected `text_embeds`). `prompts_2`: what the second
    encoder reads instead of `prompts` (diffusers' prompt_2), one text per prompt; None: `prompts`."""
    tokenizers, text_encoders = list(tokenizers), list(text_encoders)
    if len(tokenizers) != len(text_encoders) or not text_encoders:
        raise ValueError(f"encode_text needs one tokenizer per text encoder, got {len(tokenizers)} tokenizers "
                         f"for {len(text_encoders)} text encoders")
    prompts = list(prompts)
    if prompts_2 is not None:
        prompts_2 = list(prompts_2)
        if len(text_encoders) != 2:
            raise ValueError(f"prompts_2 is for the second of two text encoders (SDXL); there is "
                             f"{len(text_encoders)}")
        if len(prompts_2) != len(prompts):
            raise ValueError(f"prompts_2 has {len(prompts_2)} texts for {len(prompts)} prompts")
    if len(text_encoders) == 1:
        encoder = text_encoders[0]
        inputs = _tokens(tokenizers[0], prompts)
        mask = None
        if getattr(encoder.config, "use_attention_mask", False):
            mask = inputs.attention_mask.to(device)
        return TextStates(encoder(inputs.input_ids.to(device), attention_mask=mask)[0])
    states, pooled = [], None
    for i, (tokenizer, encoder) in enumerate(zip(tokenizers, text_encoders)):
        texts = prompts if i == 0 or prompts_2 is None else prompts_2
        output = encoder(_tokens(tokenizer, texts).input_ids.to(device), output_hidden_states=True)
        if pooled is None and output[0].dim() == 2:  # text_embeds of a CLIPTextModelWithProjection
            pooled = output[0]
        states.append(output.hidden_states[-2])
    if pooled is None:
        raise ValueError(f"none of the text encoders ({', '.join(type(e).__name__ for e in text_encoders)}) gives "
                         "a pooled embedding [N, D]; SDXL's second encoder is a CLIPTextModelWithProjection")
    return TextStates(torch.cat(states, dim=-1), pooled)


def _tokens(tokenizer, prompts: List[str]):
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt")


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


def check_text_encoders(unet, text_encoders: Sequence) -> None:
    """Raise a ValueError saying what does not fit when `text_encoders` cannot condition `unet`: an
    SDXL UNet (text_time) takes two encoders, the others one; the hidden sizes (summed for SDXL)
    must make the UNet's cross_attention_dim; for SDXL the last encoder's projection_dim plus six
    time ids of addition_time_embed_dim features must make the added embedding's input width."""
    text_encoders = list(text_encoders)
    xl = uses_added_conditioning(unet)
    family = "an SDXL UNet (addition_embed_type='text_time')" if xl else "a UNet without added conditioning"
    if len(text_encoders) != (2 if xl else 1):
        raise ValueError(f"{family} takes {2 if xl else 1} text encoder(s), got {len(text_encoders)}")
    cross = unet.config.cross_attention_dim
    hidden = sum(int(e.config.hidden_size) for e in text_encoders)
    if isinstance(cross, int) and hidden != cross:
        sizes = " + ".join(str(e.config.hidden_size) for e in text_encoders)
        raise ValueError(f"the text encoders' hidden size ({sizes}) does not match the UNet's "
                         f"cross_attention_dim {cross}")
    if xl:
        projection = getattr(text_encoders[-1].config, "projection_dim", None)
        if projection is None or not hasattr(text_encoders[-1], "text_projection"):
            raise ValueError(f"SDXL's second text encoder must give a pooled projection (CLIPTextModelWithProjection), "
                             f"got {type(text_encoders[-1]).__name__}")
        expected = unet.config.projection_class_embeddings_input_dim
        given = int(projection) + 6 * int(unet.config.addition_time_embed_dim)
        if expected is not None and given != expected:
            raise ValueError(f"the pooled embedding ({projection}) and 6 time ids x addition_time_embed_dim "
                             f"({unet.config.addition_time_embed_dim}) give {given} features; the UNet's added "
                             f"embedding takes projection_class_embeddings_input_dim={expected}")
