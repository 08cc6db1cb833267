"""ELRControlXLPipeline: local control on an SDXL backbone. The sampling is ELRControlPipeline's
(`ControlPipelineBase`); what differs is SDXL's text conditioning: two text encoders whose
penultimate states are concatenated, the second one's pooled embedding, and the micro-conditioning
time ids (original size, crop top-left, target size), both added to the time embedding of the UNet
and of the adapter's copy of it.

    pipe = ELRControlXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok,
                                tokenizer_2=tok2, unet=unet, adapter=adapter, scheduler=scheduler)
    images = pipe("a red circle", condition=edges, num_inference_steps=30).images

The negative branch follows diffusers' StableDiffusionXLPipeline: without a negative prompt and with
force_zeros_for_empty_prompt (the default) its text states and pooled embedding are zeros, otherwise
the negative prompt ("" by default) is encoded. An fp16 VAE whose config sets force_upcast (SDXL's
own VAE, which overflows in fp16) decodes in fp32; a VAE fine-tuned to be safe in fp16 (with
force_upcast=False) can be passed as the vae component and then decodes in fp16.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch

from ..nn.control_adapter import LocalControlAdapter
from .elr_control import ControlPipelineBase, negative_prompts, texts_per_prompt
from .prompts import (TextStates, added_cond_kwargs, check_text_encoders, encode_text, time_ids,
                      uses_added_conditioning)


class ELRControlXLPipeline(ControlPipelineBase):
    """Local control on an SDXL backbone (a UNet with addition_embed_type="text_time").

    Components: vae (optional; None = pixel space), text_encoder (CLIPTextModel), text_encoder_2
    (CLIPTextModelWithProjection), tokenizer, tokenizer_2 (CLIPTokenizer), unet (the frozen backbone
    UNet2DConditionModel), adapter (elr_ext.nn.LocalControlAdapter built from that UNet; optional:
    None samples the backbone alone), scheduler (any diffusers scheduler).
    force_zeros_for_empty_prompt: zeros for the unconditional branch when no negative prompt is
    given (as SDXL was trained), instead of encoding ""."""

    model_cpu_offload_seq = "text_encoder->text_encoder_2->adapter->unet->vae"
    upcast_fp16_vae = True

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet,
                 adapter: Optional[LocalControlAdapter], scheduler, force_zeros_for_empty_prompt: bool = True):
        super().__init__()
        if not uses_added_conditioning(unet):
            raise ValueError("the UNet has no SDXL added conditioning (addition_embed_type="
                             f"{unet.config.addition_embed_type!r}, not 'text_time'); use ELRControlPipeline")
        missing = [name for name, part in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2),
                                           ("tokenizer", tokenizer), ("tokenizer_2", tokenizer_2)) if part is None]
        if missing:
            raise ValueError(f"an SDXL UNet needs both text encoders and their tokenizers; {', '.join(missing)} "
                             "missing (text_encoder_2: the CLIPTextModelWithProjection that gives the pooled "
                             "embedding)")
        check_text_encoders(unet, [text_encoder, text_encoder_2])
        self._register_control(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                               tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, adapter=adapter,
                               scheduler=scheduler)
        self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)

    def encode_prompt(self, prompt: List[str], device, num_images_per_prompt: int, negative_prompt=None,
                      guidance: bool = True, prompt_2=None, negative_prompt_2=None) -> TextStates:
        """Text states [(2 if guidance) * N * n, L, D] and pooled embeddings [(2 if guidance) * N * n, P],
        the unconditional (negative) half first. prompt_2 / negative_prompt_2: what text_encoder_2
        reads (None: the same texts as text_encoder), as in diffusers."""
        prompt = list(prompt)
        dtype = self.text_encoder_2.dtype

        def encode(texts: List[str], texts_2: Optional[List[str]]) -> TextStates:
            text = encode_text([self.tokenizer, self.tokenizer_2], [self.text_encoder, self.text_encoder_2], texts,
                               device, prompts_2=texts_2)
            return TextStates(text.states.to(dtype), text.pooled.to(dtype)).repeat_interleave(num_images_per_prompt)

        text = encode(prompt, None if prompt_2 is None else texts_per_prompt("prompt_2", prompt_2, len(prompt)))
        if not guidance:
            return text
        if negative_prompt is None and self.config.force_zeros_for_empty_prompt:
            negative = text.zeros_like()
        else:
            negative = encode(negative_prompts(negative_prompt, len(prompt)),
                              None if negative_prompt_2 is None else
                              texts_per_prompt("negative_prompt_2", negative_prompt_2, len(prompt)))
        return TextStates.cat([negative, text])

    def text_inputs(self, prompts, device, num_images_per_prompt, negative_prompt, guidance, height, width,
                    original_size: Optional[Sequence[int]] = None, crops_coords_top_left: Sequence[int] = (0, 0),
                    target_size: Optional[Sequence[int]] = None, prompt_2=None,
                    negative_prompt_2=None) -> Tuple[torch.Tensor, dict]:
        text = self.encode_prompt(prompts, device, num_images_per_prompt, negative_prompt, guidance,
                                  prompt_2=prompt_2, negative_prompt_2=negative_prompt_2)
        original = _size("original_size", original_size or (height, width))
        crop = _size("crops_coords_top_left", crops_coords_top_left)
        target = _size("target_size", target_size or (height, width))
        rows = text.states.shape[0]
        ids = time_ids([original] * rows, [crop] * rows, target, device=device, dtype=text.states.dtype)
        return text.states, added_cond_kwargs(self.unet, text.pooled, ids)

    @torch.no_grad()
    def __call__(self, prompt: Union[str, List[str]], condition=None, num_inference_steps: int = 50,
                 guidance_scale: float = 5.0, conditioning_scale: float = 1.0,
                 negative_prompt: Optional[Union[str, List[str]]] = None,
                 generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
                 num_images_per_prompt: int = 1, output_type: str = "pil", height: Optional[int] = None,
                 width: Optional[int] = None, latents: Optional[torch.Tensor] = None, eta: float = 0.0,
                 original_size: Optional[Tuple[int, int]] = None, crops_coords_top_left: Tuple[int, int] = (0, 0),
                 target_size: Optional[Tuple[int, int]] = None, return_dict: bool = True,
                 prompt_2: Optional[Union[str, List[str]]] = None,
                 negative_prompt_2: Optional[Union[str, List[str]]] = None):
        """Generate images.

        Args:
            prompt: one text or a list (one image set per text); both text encoders read it unless
                prompt_2 is given.
            prompt_2: what text_encoder_2 reads instead of `prompt`: one text for all prompts or one
                per prompt (diffusers' prompt_2).
            condition: the condition map(s), as for ELRControlPipeline: a tensor [N or 1, C, H, W] in
                [0, 1], a PIL image or an array, or a list with one map per condition type of the
                adapter. Required with an adapter, refused without one.
            num_inference_steps, guidance_scale: sampling steps; classifier-free guidance weight (<= 1
                turns guidance off). The control is applied in both guidance branches.
            conditioning_scale: multiplies the adapter's residuals.
            negative_prompt: the unconditional branch's text. None: zeros when the pipeline's
                force_zeros_for_empty_prompt is set, otherwise "".
            negative_prompt_2: what text_encoder_2 reads in the unconditional branch instead of
                negative_prompt: one text or one per prompt. As in diffusers it has no effect where
                that branch is zeros (negative_prompt None and force_zeros_for_empty_prompt set).
            generator: torch generator(s) for the initial noise (and stochastic schedulers).
            num_images_per_prompt: images per text.
            output_type: "pil", "np", "pt" (images in [0, 1]) or "latent" (the final latents).
            height, width: image size (default: the condition's, or the UNet's sample_size times the
                latent factor); a multiple of latent_factor * the UNet's total downsampling.
            latents: initial noise (instead of drawing it).
            eta: DDIM's eta (ignored by schedulers without it).
            original_size, crops_coords_top_left, target_size: SDXL's micro-conditioning, each
                (height, width) / (top, left); defaults (height, width), (0, 0), (height, width).
        """
        return self.generate(prompt, condition, num_inference_steps=num_inference_steps,
                             guidance_scale=guidance_scale, conditioning_scale=conditioning_scale,
                             negative_prompt=negative_prompt, generator=generator,
                             num_images_per_prompt=num_images_per_prompt, output_type=output_type, height=height,
                             width=width, latents=latents, eta=eta, return_dict=return_dict,
                             original_size=original_size, crops_coords_top_left=crops_coords_top_left,
                             target_size=target_size, prompt_2=prompt_2, negative_prompt_2=negative_prompt_2)


def _size(name: str, value: Sequence[int]) -> Tuple[int, int]:
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"{name} must be (height, width) (for the crop: (top, left)), got {value}")
    return value
