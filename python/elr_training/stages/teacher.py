"""Stage 0: the tiny teacher UNet trained from scratch as a plain text-to-image model (the built-in
default only; with --pretrained the pretrained UNet is the teacher).

    L = w(lambda_t) ||eps - eps_teacher(x_t, t, text)||^2
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from elr_ext.nn import count_parameters

from ..losses import drop_text, noisy_inputs, timestep_weights, weighted_mse
from ..models import Components, encode_batch_images, encode_prompts, save_model_folder, unwrap
from ..sampling import generate, image_grid, pixels_to_uint8
from .base import Stage


class TeacherStage(Stage):
    number = 0

    def __init__(self, config, components: Components, device, say):
        if not components.is_tiny:
            raise ValueError(
                "stage 0 trains the tiny built-in teacher; with --pretrained the pretrained UNet is "
                "the teacher: run --stage 1"
            )
        self.config, self.components, self.device = config, components, device
        self.unet = components.unet
        self.unet.train()
        say(f"stage 0: teacher UNet, {count_parameters(self.unet):,} parameters, all trained")

    def trained_module(self) -> nn.Module:
        return self.unet

    def trained_names(self) -> List[str]:
        return [n for n, p in unwrap(self.unet).named_parameters() if p.requires_grad]

    def frozen_modules(self) -> List[nn.Module]:
        return []

    def compile_frozen(self) -> None:
        pass  # nothing frozen besides the text encoder

    def enable_gradient_checkpointing(self) -> None:
        unwrap(self.unet).enable_gradient_checkpointing()

    def loss(self, model, batch: dict, generator: torch.Generator) -> Tuple[torch.Tensor, Dict[str, float]]:
        captions = drop_text(batch["captions"], self.config.text_dropout, generator)
        text = encode_prompts(self.components, captions, self.device, batch)
        latents = encode_batch_images(self.components, batch, self.device, generator)
        noisy, t, _, target = noisy_inputs(self.components.noise_scheduler, latents, generator)
        prediction = model(noisy, t, **text.unet_kwargs()).sample
        loss = weighted_mse(prediction, target, timestep_weights(self.config, self.components.noise_scheduler, t))
        return loss, {"loss": loss.item()}

    @torch.no_grad()
    def validate(self, samples: List[dict], step: int) -> Tuple[np.ndarray, Dict[str, float]]:
        pixels = torch.stack([s["pixel_values"] for s in samples])
        images = generate(
            self.components, self.unet, None, [s["caption"] for s in samples], None,
            self.config.num_inference_steps, self.config.guidance_scale, seed=self.config.seed,
            size=pixels.shape[-2:],
        )
        return image_grid({"data": pixels_to_uint8(pixels), "teacher": images}), {}

    def save(self, folder: str) -> None:
        save_model_folder(self.components, self.unet, folder)

    def report(self, validation_metrics: Dict[str, float]) -> dict:
        return {}

    def verdict(self, validation_metrics: Dict[str, float]) -> Optional[str]:
        return None
