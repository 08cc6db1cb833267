"""ELRControlPipeline: text-to-image generation controlled by local condition maps (Stage II,
section 2.4): the frozen backbone UNet takes the LocalControlAdapter's residuals at every step.

    pipe = ELRControlPipeline(vae=None, text_encoder=te, tokenizer=tok, unet=unet, adapter=adapter,
                              scheduler=DDIMScheduler(...))
    images = pipe("a red circle on a gray background", condition=edges, num_inference_steps=50).images
    pipe.save_pretrained(folder); ELRControlPipeline.from_pretrained(folder)

vae=None: the model works in pixel space (the tiny built-in configuration); with a VAE the adapter's
latent_factor must be the VAE's downsampling factor. adapter=None samples the backbone alone (plain
text-to-image, e.g. to compare with and without control, or to look at a Stage I student).
"""

from __future__ import annotations

import inspect
from typing import List, Optional, Union

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from ..nn.control_adapter import LocalControlAdapter


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


class ELRControlPipeline(DiffusionPipeline):
    """Classifier-free guided sampling with local control (Uni-ControlNet's sampling: the condition
    maps drive the adapter in the unconditional branch as well, so guidance sharpens the text and
    keeps the structure).

    Components: vae (optional; None = pixel space), text_encoder (transformers CLIPTextModel),
    tokenizer (CLIPTokenizer), unet (the frozen backbone UNet2DConditionModel), adapter
    (elr_ext.nn.LocalControlAdapter; optional: None samples the backbone alone and takes no
    condition), scheduler (any diffusers scheduler)."""

    model_cpu_offload_seq = "text_encoder->adapter->unet->vae"
    _optional_components = ["vae", "adapter"]

    def __init__(self, vae, text_encoder, tokenizer, unet, adapter: Optional[LocalControlAdapter], scheduler):
        super().__init__()
        factor = vae_downsampling(vae)
        if adapter is not None and adapter.config.latent_factor != factor:
            where = "pixel space (vae=None)" if vae is None else "the VAE's downsampling"
            raise ValueError(f"adapter.config.latent_factor={adapter.config.latent_factor} but {where} gives {factor}")
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, adapter=adapter,
                              scheduler=scheduler)
        self.latent_factor = factor
        self.image_processor = VaeImageProcessor(vae_scale_factor=factor, do_normalize=True)

    # ------------------------------------------------------------------ inputs
    def encode_prompt(self, prompt: List[str], device, num_images_per_prompt: int, negative_prompt=None,
                      guidance: bool = True) -> torch.Tensor:
        """Text states [(2 if guidance) * N * n, L, D], the unconditional (negative) half first."""

        def encode(texts: List[str]) -> torch.Tensor:
            ids = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(device)
            states = self.text_encoder(ids)[0].to(dtype=self.text_encoder.dtype)
            return states.repeat_interleave(num_images_per_prompt, dim=0)

        states = encode(prompt)
        if not guidance:
            return states
        if negative_prompt is None:
            negative_prompt = [""] * len(prompt)
        elif isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * len(prompt)
        if len(negative_prompt) != len(prompt):
            raise ValueError(f"negative_prompt has {len(negative_prompt)} entries for {len(prompt)} prompts")
        return torch.cat([encode(list(negative_prompt)), states])

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
        return condition, height, width

    def _step_kwargs(self, generator, eta: float) -> dict:
        params = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    # ------------------------------------------------------------------ sampling
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
            output_type: "pil", "np" ([N, H, W, 3] in [0, 1]) or "pt" ([N, 3, H, W] in [0, 1]).
            height, width: image size (default: the condition's, or without a condition the UNet's
                sample_size times the latent factor); must be a multiple of latent_factor * the UNet's
                total downsampling.
            latents: initial noise (instead of drawing it).
            eta: DDIM's eta (ignored by schedulers without it).
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type={output_type!r} is not supported; expected 'pil', 'np' or 'pt'")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        device = self._execution_device
        dtype = self.unet.dtype
        guidance = guidance_scale > 1.0

        text_states = self.encode_prompt(prompts, device, num_images_per_prompt, negative_prompt, guidance)
        condition, height, width = self.prepare_control(condition, height, width, len(prompts),
                                                        num_images_per_prompt, device, dtype, guidance)

        shape = (len(prompts) * num_images_per_prompt, self.unet.config.in_channels, height // self.latent_factor,
                 width // self.latent_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents has shape {list(latents.shape)}; expected {list(shape)}")
        else:
            latents = latents.to(device=device, dtype=dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = latents * self.scheduler.init_noise_sigma
        step_kwargs = self._step_kwargs(generator, eta)

        timesteps = self.scheduler.timesteps
        with self.progress_bar(total=len(timesteps)) as progress:
            for t in timesteps:
                model_input = torch.cat([latents, latents]) if guidance else latents
                model_input = self.scheduler.scale_model_input(model_input, t)
                down = mid = None
                if self.adapter is not None:
                    down, mid = self.adapter(model_input, t, text_states, condition,
                                             conditioning_scale=conditioning_scale)
                # an adapter kept in fp32 beside a bf16/fp16 UNet: its residuals in the UNet's dtype
                if down is not None:
                    down, mid = [r.to(self.unet.dtype) for r in down], mid.to(self.unet.dtype)
                noise = self.unet(model_input, t, encoder_hidden_states=text_states,
                                  down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
                if guidance:
                    uncond, cond = noise.chunk(2)
                    noise = uncond + guidance_scale * (cond - uncond)
                latents = self.scheduler.step(noise, t, latents, **step_kwargs).prev_sample
                progress.update()

        if self.vae is None:
            image = latents
        else:
            image = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
