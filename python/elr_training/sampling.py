"""Sampling and pictures: images generated with ELRControlPipeline (ELRControlXLPipeline for SDXL;
with or without an adapter), the conversions to uint8 RGB and the one image grid that validation and
evaluation draw.

Every generated image depends only on its seed (one generator per image), not on the batch it is in,
so the same scene gets the same noise whichever model draws it.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .data.conditions import CONDITION_CHANNELS
from .metrics import to_uint8_image
from .models import Components, unwrap

GRID_ROWS = 8  # rows a validation grid shows; the metrics use every sample


def generate(
    components: Components,
    unet,
    adapter,
    captions: List[str],
    condition: Optional[torch.Tensor],
    num_inference_steps: int,
    guidance_scale: float,
    conditioning_scale: float = 1.0,
    seed: int = 0,
    size: Optional[Sequence[int]] = None,
) -> np.ndarray:
    """Sample images with ELRControlPipeline (DDIM); uint8 [N, H, W, 3]. adapter=None samples the UNet
    alone (no condition; `size` (H, W) gives the image size). Image i's noise comes from seed + i."""
    from diffusers import DDIMScheduler

    from elr_ext.pipelines import control_pipeline_class

    unet = unwrap(unet)
    if adapter is not None:
        size = condition.shape[-2:]
    elif size is None:
        raise ValueError("generate without an adapter needs size=(height, width)")
    pipeline_class = control_pipeline_class(unet)
    # SDXL: the second encoder; the unconditional branch encodes "" as the training's caption dropout does
    xl = {} if components.text_encoder_2 is None else dict(
        text_encoder_2=components.text_encoder_2, tokenizer_2=components.tokenizer_2,
        force_zeros_for_empty_prompt=False)
    pipeline = pipeline_class(
        **xl,
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=unet,
        adapter=None if adapter is None else unwrap(adapter),
        # pixel space: x0 clipped to the image range at every step, as DDPM samples; without it the
        # first steps' x0 (error / sqrt(alpha_bar), ~100x) saturates the image. Latents are not
        # bounded: no clipping there.
        scheduler=DDIMScheduler.from_config(components.noise_scheduler.config, clip_sample=components.vae is None),
    )
    pipeline.set_progress_bar_config(disable=True)
    latent_size = tuple(s // pipeline.latent_factor for s in size)
    latents = torch.stack(
        [
            torch.randn((unet.config.in_channels,) + latent_size, generator=torch.Generator().manual_seed(seed + i))
            for i in range(len(captions))
        ]
    )
    images = pipeline(
        list(captions),
        condition=condition if adapter is not None else None,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        conditioning_scale=conditioning_scale,
        height=int(size[0]),
        width=int(size[1]),
        latents=latents.to(unet.device, unet.dtype),
        output_type="np",
    ).images
    return to_uint8(np.asarray(images))


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[N, H, W, 3] floats in [0, 1] -> uint8."""
    return (np.clip(images, 0, 1) * 255 + 0.5).astype(np.uint8)


def pixels_to_uint8(pixel_values: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3]."""
    return to_uint8(((pixel_values.float().cpu() + 1) / 2).permute(0, 2, 3, 1).numpy())


def map_to_uint8(condition_map: torch.Tensor) -> np.ndarray:
    """One condition map [C, H, W] in [0, 1] as uint8 RGB [H, W, 3] (one-channel maps as grey)."""
    array = (condition_map.float().clamp(0, 1) * 255).round().byte().cpu().numpy()
    return np.repeat(array, 3, axis=0).transpose(1, 2, 0) if array.shape[0] == 1 else array.transpose(1, 2, 0)


def condition_to_uint8(conditions: torch.Tensor, types: Sequence[str]) -> np.ndarray:
    """The concatenated condition maps [N, C, H, W] in [0, 1], shown side by side as one RGB picture per
    sample: uint8 [N, H, W * len(types), 3]."""
    pictures, start = [], 0
    for kind in types:
        c = CONDITION_CHANNELS[kind]
        pictures.append(np.stack([map_to_uint8(sample[start : start + c]) for sample in conditions]))
        start += c
    return np.concatenate(pictures, axis=2)


def image_grid(columns: Dict[str, Sequence], height: int = 128, max_rows: int = GRID_ROWS) -> np.ndarray:
    """uint8 [H, W, 3]: one column per entry of `columns` (title -> images, each uint8 or float
    [h, w(, 3)]), one row per sample, titles on top. Images are scaled with nearest neighbour to
    `height` pixels, keeping their aspect ratio (a row of side-by-side condition maps stays wide)."""
    from PIL import Image, ImageDraw

    titles = list(columns)
    rows = min(max_rows, min(len(v) for v in columns.values()))
    tiles = {
        title: [to_uint8_image(columns[title][r], f"{title}[{r}]") for r in range(rows)] for title in titles
    }
    widths = [max(1, round(height * tiles[t][0].shape[1] / tiles[t][0].shape[0])) if rows else height for t in titles]
    pad, header = 2, 14
    grid = Image.new(
        "RGB", (sum(widths) + pad * (len(titles) + 1), header + rows * (height + pad) + pad), (255, 255, 255)
    )
    draw = ImageDraw.Draw(grid)
    x = pad
    for title, width in zip(titles, widths):
        draw.text((x + 2, 1), title[: max(1, width // 7)], fill=(0, 0, 0))
        for r, array in enumerate(tiles[title]):
            tile = Image.fromarray(array if array.ndim == 2 else array[..., :3]).convert("RGB")
            grid.paste(tile.resize((width, height), Image.NEAREST), (x, header + pad + r * (height + pad)))
        x += width + pad
    return np.asarray(grid)
