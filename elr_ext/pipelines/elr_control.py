"""ELRControlPipeline: text-to-image generation controlled by local condition maps (Stage II,
section 2.4): the frozen backbone UNet takes the LocalControlAdapter's residuals at every step.

    pipe = ELRControlPipeline(vae=None, text_encoder=te, tokenizer=tok, unet=unet, adapter=adapter,
                              scheduler=DDIMScheduler(...))
    images = pipe("a red circle on a gray background", condition=edges, num_inference_steps=50).images
    pipe.save_pretrained(folder); ELRControlPipeline.from_pretrained(folder)

vae=None: the model works in pixel space (the tiny built-in configuration); with a VAE the adapter's
latent_factor must be the VAE's downsampling factor. adapter=None samples the backbone alone (plain
text-to-image, e.g. to compare with and without control, or to look at a Stage I student).

`ControlPipelineBase` holds everything but the text conditioning: the condition maps, the size
checks, the initial noise, the guided sampling loop with the adapter's residuals and the decoding.
ELRControlPipeline (one text encoder: SD 1.x / 2.x and the tiny model) and ELRControlXLPipeline
(elr_control_xl.py: SDXL's two encoders, pooled embedding and time ids) add only their text inputs.
"""

from __future__ import annotations

import inspect
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from ..nn.control_adapter import LocalControlAdapter
from .prompts import check_text_encoders, encode_text, uses_added_conditioning

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def vae_downsampling(vae) -> int:
    """The image-to-latent factor of a diffusers AutoencoderKL (8 for Stable Diffusion); 1 without a VAE
    (pixel space)."""
    return 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)


def unet_downsampling(unet) -> int:
    """The UNet's total downsampling: 2 per down block that has a downsampler. Image sizes must be
    multiples of this times the latent factor."""
    return 2 ** sum(1 for block in unet.down_blocks if getattr(block, "downsamplers", None))


def condition_to_tensor(condition) -> torch.Tensor:
    """One condition map as a float tensor [N, C, H, W] with values in [0, 1]: a tensor [C, H, W] or
    [N, C, H, W] is taken as it is; a PIL image or a uint8 / float array [H, W], [H, W, C] or
    [N, H, W, C] is converted (uint8 divided by 255)."""
    if isinstance(condition, torch.Tensor):
        if condition.dim() == 3:
            condition = condition.unsqueeze(0)
        if condition.dim() != 4:
            raise ValueError(f"a condition tensor must be [C, H, W] or [N, C, H, W], got {list(condition.shape)}")
        return condition.float() if not condition.is_floating_point() else condition
    if not isinstance(condition, np.ndarray):
        try:
            import PIL.Image
        except ImportError:  # pragma: no cover
            PIL = None
        if PIL is None or not isinstance(condition, PIL.Image.Image):
            raise TypeError(f"condition must be a tensor, a numpy array or a PIL image, got {type(condition).__name__}")
        condition = np.asarray(condition)
    array = condition.astype(np.float32) / 255.0 if condition.dtype == np.uint8 else condition.astype(np.float32)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise ValueError(f"a condition array must be [H, W], [H, W, C] or [N, H, W, C], got {list(condition.shape)}")
    return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))


def texts_per_prompt(name: str, texts, count: int) -> List[str]:
    """One text for each of `count` prompts, from one text for all of them or a list with one each;
    `name` is the argument's, for the error."""
    if isinstance(texts, str):
        return [texts] * count
    texts = list(texts)
    if len(texts) != count:
        raise ValueError(f"{name} has {len(texts)} entries for {count} prompts")
    bad = [t for t in texts if not isinstance(t, str)]
    if bad:
        raise ValueError(f"{name} must hold texts, got {type(bad[0]).__name__} {bad[0]!r}")
    return texts


def negative_prompts(negative_prompt, count: int) -> List[str]:
    """The unconditional branch's texts: "" for each prompt by default, one text for all, or a list
    with one per prompt."""
    return [""] * count if negative_prompt is None else texts_per_prompt("negative_prompt", negative_prompt, count)


class ControlPipelineBase(DiffusionPipeline):
    """What the control pipelines share: classifier-free guided sampling with local control
    (Uni-ControlNet's sampling: the condition maps drive the adapter in the unconditional branch as
    well, so guidance sharpens the text and keeps the structure), any diffusers scheduler, and the
    decoding. A subclass registers its components with `_register_control` and supplies
    `text_inputs`, the UNet's text conditioning for both branches."""

    _optional_components = ["vae", "adapter"]
    # decode an fp16 VAE whose config sets force_upcast in fp32 (SDXL's VAE overflows in fp16)
    upcast_fp16_vae = False

    def _register_control(self, **components) -> None:
        vae, unet, adapter = components["vae"], components["unet"], components["adapter"]
        factor = vae_downsampling(vae)
        if adapter is not None and adapter.config.latent_factor != factor:
            where = "pixel space (vae=None)" if vae is None else "the VAE's downsampling"
            raise ValueError(f"adapter.config.latent_factor={adapter.config.latent_factor} but {where} gives {factor}")
        if vae is not None and vae.config.latent_channels != unet.config.in_channels:
            raise ValueError(f"the VAE's latent_channels={vae.config.latent_channels} but the UNet takes "
                             f"in_channels={unet.config.in_channels}")
        self.register_modules(**components)
        self.latent_factor = factor
        self.image_processor = VaeImageProcessor(vae_scale_factor=factor, do_normalize=True)

    # ------------------------------------------------------------------ inputs
    def text_inputs(self, prompts: List[str], device, num_images_per_prompt: int, negative_prompt, guidance: bool,
                    height: int, width: int, **options) -> Tuple[torch.Tensor, Optional[dict]]:
        """(encoder_hidden_states, added_cond_kwargs or None) for the UNet and the adapter, the
        unconditional half first when guiding."""
        raise NotImplementedError

    def prepare_condition(self, condition, batch: int, num_images_per_prompt: int, device, dtype):
        """Each condition map as [batch * num_images_per_prompt, C, H, W] (a list when the adapter
        takes several maps). A map of batch 1 serves every prompt."""
        maps = list(condition) if isinstance(condition, (list, tuple)) else [condition]
        prepared = []
        for i, c in enumerate(maps):
            c = condition_to_tensor(c).to(device=device, dtype=dtype)
            if c.shape[0] == 1:
                c = c.expand(batch, -1, -1, -1)
            elif c.shape[0] != batch:
                raise ValueError(f"condition map {i} has batch {c.shape[0]}; expected 1 or the {batch} prompts")
            prepared.append(c.repeat_interleave(num_images_per_prompt, dim=0))
        return prepared if isinstance(condition, (list, tuple)) else prepared[0]

    def prepare_control(self, condition, height, width, batch: int, num_images_per_prompt: int, device, dtype,
                        guidance: bool):
        """(condition for both guidance branches or None, height, width): the condition is required with an
        adapter and refused without one; the size defaults to the condition's (or the UNet's sample size)
        and must fit the latent factor times the UNet's downsampling."""
        if self.adapter is None:
            if condition is not None:
                raise ValueError("condition was given but the pipeline has no adapter (adapter=None) to take it")
            height = height or self.unet.config.sample_size * self.latent_factor
            width = width or self.unet.config.sample_size * self.latent_factor
        else:
            if condition is None:
                raise ValueError("condition is required: the pipeline's adapter takes condition maps")
            condition = self.prepare_condition(condition, batch, num_images_per_prompt, device, dtype)
            first = condition[0] if isinstance(condition, list) else condition
            height = height or first.shape[-2]
            width = width or first.shape[-1]
            if guidance:  # the same control in both branches
                condition = ([torch.cat([c, c]) for c in condition] if isinstance(condition, list)
                             else torch.cat([condition, condition]))
        step = self.latent_factor * unet_downsampling(self.unet)
        if height % step or width % step:
            raise ValueError(f"image size {height}x{width} is not a multiple of {step} (latent factor "
                             f"{self.latent_factor} x the UNet's total downsampling {step // self.latent_factor})")
        return condition, int(height), int(width)

    def prepare_latents(self, batch: int, height: int, width: int, dtype, device, generator, latents=None):
        """The initial noise [batch, in_channels, height / f, width / f] (drawn, or `latents` checked),
        not yet scaled by the scheduler's init_noise_sigma."""
        shape = (batch, self.unet.config.in_channels, height // self.latent_factor, width // self.latent_factor)
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"{len(generator)} generators for {batch} images; pass one or one per image")
        if latents is None:
            return randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents has shape {list(latents.shape)}; expected {list(shape)} (images x the UNet's "
                             f"in_channels x the image size {height}x{width} / latent factor {self.latent_factor})")
        return latents.to(device=device, dtype=dtype)

    def _step_kwargs(self, generator, eta: float) -> dict:
        params = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    # ------------------------------------------------------------------ sampling
    def control_residuals(self, sample, t, text_states, condition, conditioning_scale: float,
                          added: Optional[dict]):
        """The adapter's (down, mid) residuals in the UNet's dtype, or (None, None) without an adapter.
        An adapter kept in another dtype than the UNet (fp32 beside fp16 / bf16) gets its inputs in
        its own dtype."""
        if self.adapter is None:
            return None, None
        dtype = self.adapter.dtype
        if added is not None:
            added = {k: v.to(dtype) for k, v in added.items()}
        down, mid = self.adapter(sample.to(dtype), t, text_states.to(dtype), condition,
                                 conditioning_scale=conditioning_scale, added_cond_kwargs=added)
        return [r.to(self.unet.dtype) for r in down], mid.to(self.unet.dtype)

    def denoise(self, latents, text_states, added: Optional[dict], condition, num_inference_steps: int,
                guidance_scale: float, conditioning_scale: float, generator, eta: float, device):
        """The sampling loop from the initial noise to the final latents."""
        guidance = guidance_scale > 1.0
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)
        latents = latents * self.scheduler.init_noise_sigma
        step_kwargs = self._step_kwargs(generator, eta)
        timesteps = self.scheduler.timesteps
        with self.progress_bar(total=len(timesteps)) as progress:
            for t in timesteps:
                model_input = torch.cat([latents, latents]) if guidance else latents
                model_input = self.scheduler.scale_model_input(model_input, t)
                down, mid = self.control_residuals(model_input, t, text_states, condition, conditioning_scale, added)
                noise = self.unet(model_input, t, encoder_hidden_states=text_states, added_cond_kwargs=added,
                                  down_block_additional_residuals=down, mid_block_additional_residual=mid,
                                  return_dict=False)[0]
                if guidance:
                    uncond, cond = noise.chunk(2)
                    noise = uncond + guidance_scale * (cond - uncond)
                latents = self.scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
                progress.update()
        return latents

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] (the latents themselves in pixel space). With
        `upcast_fp16_vae`, an fp16 VAE whose config sets force_upcast decodes in fp32 and is cast back
        to fp16 afterwards; a VAE that is safe in fp16 (force_upcast=False) decodes as it is."""
        vae = self.vae
        if vae is None:
            return latents
        forced = bool(getattr(vae.config, "force_upcast", False))
        upcast = self.upcast_fp16_vae and vae.dtype == torch.float16 and forced
        if upcast:
            vae.to(dtype=torch.float32)
        try:
            latents = latents.to(dtype=vae.dtype)
            mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
            if mean is not None and std is not None:
                shape = (1, -1, 1, 1)
                mean = torch.tensor(mean).view(shape).to(latents.device, latents.dtype)
                std = torch.tensor(std).view(shape).to(latents.device, latents.dtype)
                latents = latents * std / vae.config.scaling_factor + mean
            else:
                latents = latents / vae.config.scaling_factor
            image = vae.decode(latents, return_dict=False)[0]
        finally:
            if upcast:
                vae.to(dtype=torch.float16)
        return image

    def generate(self, prompt, condition, *, num_inference_steps: int, guidance_scale: float,
               conditioning_scale: float, negative_prompt, generator, num_images_per_prompt: int, output_type: str,
               height: Optional[int], width: Optional[int], latents: Optional[torch.Tensor], eta: float,
               return_dict: bool, **text_options):
        """The whole generation; `text_options` go to `text_inputs`. The pipelines' __call__ document
        the arguments."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not supported; expected one of {', '.join(OUTPUT_TYPES)}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt is empty: give a text or a list of texts")
        device = self._execution_device
        dtype = self.unet.dtype
        guidance = guidance_scale > 1.0
        images = len(prompts) * num_images_per_prompt

        condition, height, width = self.prepare_control(condition, height, width, len(prompts),
                                                        num_images_per_prompt, device, dtype, guidance)
        text_states, added = self.text_inputs(prompts, device, num_images_per_prompt, negative_prompt, guidance,
                                              height, width, **text_options)
        latents = self.prepare_latents(images, height, width, dtype, device, generator, latents)
        latents = self.denoise(latents, text_states, added, condition, num_inference_steps, guidance_scale,
                               conditioning_scale, generator, eta, device)

        if output_type == "latent":
            image = latents
        else:
            image = self.image_processor.postprocess(self.decode_latents(latents), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)


class ELRControlPipeline(ControlPipelineBase):
    """Local control on a one-text-encoder backbone (SD 1.x / 2.x, the tiny model).

    Components: vae (optional; None = pixel space), text_encoder (transformers CLIPTextModel),
    tokenizer (CLIPTokenizer), unet (the frozen backbone UNet2DConditionModel), adapter
    (elr_ext.nn.LocalControlAdapter; optional: None samples the backbone alone and takes no
    condition), scheduler (any diffusers scheduler). An SDXL UNet needs ELRControlXLPipeline."""

    model_cpu_offload_seq = "text_encoder->adapter->unet->vae"

    def __init__(self, vae, text_encoder, tokenizer, unet, adapter: Optional[LocalControlAdapter], scheduler):
        super().__init__()
        if uses_added_conditioning(unet):
            raise ValueError("the UNet is SDXL's (addition_embed_type='text_time'): it needs the pooled embedding "
                             "and time ids of two text encoders; use ELRControlXLPipeline with text_encoder_2 and "
                             "tokenizer_2")
        check_text_encoders(unet, [text_encoder])
        self._register_control(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, adapter=adapter,
                               scheduler=scheduler)

    def encode_prompt(self, prompt: List[str], device, num_images_per_prompt: int, negative_prompt=None,
                      guidance: bool = True) -> torch.Tensor:
        """Text states [(2 if guidance) * N * n, L, D], the unconditional (negative) half first."""

        def encode(texts: List[str]) -> torch.Tensor:
            states = encode_text([self.tokenizer], [self.text_encoder], texts, device).states
            return states.to(dtype=self.text_encoder.dtype).repeat_interleave(num_images_per_prompt, dim=0)

        states = encode(list(prompt))
        if not guidance:
            return states
        return torch.cat([encode(negative_prompts(negative_prompt, len(prompt))), states])

    def text_inputs(self, prompts, device, num_images_per_prompt, negative_prompt, guidance, height, width):
        return self.encode_prompt(prompts, device, num_images_per_prompt, negative_prompt, guidance), None

    @torch.no_grad()
    def __call__(self, prompt: Union[str, List[str]], condition=None, num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, conditioning_scale: float = 1.0,
                 negative_prompt: Optional[Union[str, List[str]]] = None,
                 generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
                 num_images_per_prompt: int = 1, output_type: str = "pil", height: Optional[int] = None,
                 width: Optional[int] = None, latents: Optional[torch.Tensor] = None, eta: float = 0.0,
                 return_dict: bool = True):
        """Generate images.

        Args:
            prompt: one text or a list (one image set per text).
            condition: the condition map(s): a tensor [N or 1, C, H, W] in [0, 1], a PIL image or an
                array (see `condition_to_tensor`), or a list with one such map per condition type the
                adapter was built for (e.g. [edges, segmentation]). Required with an adapter; without
                one (adapter=None) there is nothing to condition on and it must be None.
            num_inference_steps, guidance_scale: sampling steps; classifier-free guidance weight (<= 1
                turns guidance off).
            conditioning_scale: multiplies the adapter's residuals.
            negative_prompt: the unconditional branch's text (default "").
            generator: torch generator(s) for the initial noise (and stochastic schedulers).
            num_images_per_prompt: images per text.
            output_type: "pil", "np" ([N, H, W, 3] in [0, 1]), "pt" ([N, 3, H, W] in [0, 1]) or
                "latent" (the final latents, not decoded).
            height, width: image size (default: the condition's, or without a condition the UNet's
                sample_size times the latent factor); must be a multiple of latent_factor * the UNet's
                total downsampling.
            latents: initial noise (instead of drawing it).
            eta: DDIM's eta (ignored by schedulers without it).
        """
        return self.generate(prompt, condition, num_inference_steps=num_inference_steps,
                             guidance_scale=guidance_scale, conditioning_scale=conditioning_scale,
                             negative_prompt=negative_prompt, generator=generator,
                             num_images_per_prompt=num_images_per_prompt, output_type=output_type, height=height,
                             width=width, latents=latents, eta=eta, return_dict=return_dict)
