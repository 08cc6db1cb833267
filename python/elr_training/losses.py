"""The diffusion training objective's pieces, shared by the three stages: noising a batch, the per-sample
timestep weight w(lambda_t), the weighted MSE and caption dropout.

"eps" in the stages' docstrings is the model's output in the scheduler's parameterisation (epsilon, or
v for SD 2.1's v-prediction). Every random draw comes from the `generator` the training loop seeds
from (seed, micro-step, process), so a resumed run draws exactly what an unbroken run would.
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F


def noisy_inputs(scheduler, latents: torch.Tensor, generator: torch.Generator):
    """(noisy latents, timesteps, noise, target) with every draw from `generator` (on the CPU, then moved,
    so that the draws do not depend on the device)."""
    n = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator).to(
        latents.device
    )
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    elif scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(
            f"prediction_type {scheduler.config.prediction_type!r} is not supported for training"
        )
    return noisy, timesteps, noise, target


def timestep_weights(config, scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """w(lambda_t) per sample: 1 (constant) or min-SNR-gamma (Hang et al. 2023), in the form for the
    scheduler's parameterisation (min(SNR, g) / SNR for epsilon, min(SNR, g) / (SNR + 1) for v)."""
    if config.loss_weighting == "constant":
        return torch.ones(timesteps.shape[0], device=timesteps.device)
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=config.snr_gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights).mean()


def drop_text(captions: List[str], probability: float, generator: torch.Generator) -> List[str]:
    if probability <= 0:
        return list(captions)
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():  # real draws even while elr_ext.plan traces the step on fake tensors
        draws = torch.rand(len(captions), generator=generator)
        return ["" if u < probability else c for u, c in zip(draws, captions)]
