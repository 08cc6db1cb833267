"""train.py --plan: one optimiser step of the configured stage on tensors without data
(elr_ext.plan), then the peak memory by kind, FLOPs, a roofline time on --plan-device, whether it
fits, and if not, the settings that would.

The models come from configs only: a --pretrained folder's config files (no weights are read), a
named --architecture (elr_ext.architectures: sd15, sd21, sdxl), or the tiny built-in one (or its
tiny-sd15 / tiny-sdxl variants). The step
is the stage's own: its loss (text encoder, VAE encoder, teacher or backbone, the trained model),
backward, gradient clipping, the optimiser of --optimizer, with --mixed-precision,
--train-batch-size, --resolution and --gradient-checkpointing as training would run them. Stage 2
plans the adapter on the dense UNet of the model (what training does without --backbone).

With --cache-latents the step is the cached run's: the batch holds what the cache stores (the VAE's
latent distribution parameters, the text encodings and the empty caption's), the text encoders and
the VAE's encoder are not on the device (training keeps them on the CPU or frees them), and the VAE's
decoder is. The cache itself need not exist yet: a plan reads no data.
"""

from __future__ import annotations

import dataclasses
import json
import os
from types import SimpleNamespace
from typing import List

import torch

from .models import Components, tiny_components, weight_dtype_of

CONFIG_FILES = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
                "scheduler": "scheduler_config.json"}


class ShapeTokenizer:
    """Token ids of the right shape (all zeros) for a model whose tokenizer files are not at hand."""

    def __init__(self, model_max_length: int):
        self.model_max_length = model_max_length

    def __call__(self, captions, padding=None, max_length=None, truncation=None, return_tensors=None):
        length = max_length or self.model_max_length
        return SimpleNamespace(input_ids=torch.zeros(len(captions), length, dtype=torch.long))


def planned_components(config) -> Components:
    """The stage's starting models, built from configs (call under elr_ext.plan: every weight is fake)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from .models import detect_family

    if config.pretrained:
        folder = config.pretrained
        family = detect_family(folder, "--pretrained")
        files = dict(CONFIG_FILES, **({"text_encoder_2": "config.json"} if family == "sdxl" else {}))
        for part, name in files.items():
            path = os.path.join(folder, part, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"--pretrained {folder}: missing {path} (the {part} config --plan builds from)")
        encoders, tokenizers = [], []
        for suffix in ("", "_2") if family == "sdxl" else ("",):
            text_config = CLIPTextConfig.from_pretrained(os.path.join(folder, "text_encoder" + suffix))
            encoders.append(_text_encoder(text_config, projection=suffix == "_2"))
            tokenizers.append(_tokenizer(os.path.join(folder, "tokenizer" + suffix), text_config))
        return Components(
            unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(os.path.join(folder, "unet"))),
            text_encoder=encoders[0], tokenizer=tokenizers[0],
            noise_scheduler=DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True),
            vae=AutoencoderKL.from_config(AutoencoderKL.load_config(os.path.join(folder, "vae"))), source=folder,
            text_encoder_2=encoders[1] if len(encoders) > 1 else None,
            tokenizer_2=tokenizers[1] if len(tokenizers) > 1 else None, family=family)
    if config.architecture is None or config.architecture.startswith("tiny"):
        return tiny_components(config.seed, config.architecture)
    from elr_ext.architectures import architecture

    arch = architecture(config.architecture)
    configs = [CLIPTextConfig(**c) for c in arch.text_encoders]
    encoders = [_text_encoder(c, projection=i == 1) for i, c in enumerate(configs)]
    tokenizers = [ShapeTokenizer(c.max_position_embeddings) for c in configs]
    return Components(unet=UNet2DConditionModel(**arch.unet), text_encoder=encoders[0], tokenizer=tokenizers[0],
                      noise_scheduler=DDPMScheduler(**arch.scheduler), vae=AutoencoderKL(**arch.vae),
                      source=f"--architecture {arch.name}",
                      text_encoder_2=encoders[1] if len(encoders) > 1 else None,
                      tokenizer_2=tokenizers[1] if len(tokenizers) > 1 else None,
                      family="sdxl" if len(encoders) > 1 else arch.name)


def _text_encoder(text_config, projection: bool):
    """SDXL's second encoder carries the projection whose output is the pooled embedding."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(text_config)


def _tokenizer(folder: str, text_config):
    if os.path.isdir(folder):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return ShapeTokenizer(text_config.max_position_embeddings)


def planned_batch(config, components) -> dict:
    """The batch the step trains on: pixels and captions, or with --cache-latents what a batch read from
    the cache holds (data/cache.py LatentCache.collate)."""
    from .data import condition_channels

    b, side = config.train_batch_size, config.resolution
    batch = {"captions": ["a photo"] * b}
    if config.cache_latents:
        batch.update(cached_inputs(components, b, side, batch["captions"]))
    if "latent_parameters" not in batch:  # pixels, also in a cache made without a VAE
        batch["pixel_values"] = torch.zeros(b, 3, side, side)
    if hasattr(config, "condition_types"):
        batch["conditions"] = torch.zeros(b, condition_channels(config.condition_types), side, side)
    return batch


def cached_inputs(components, batch_size: int, side: int, captions: List[str]) -> dict:
    """A cached batch's encodings, shaped as the encoders would make them: latent_parameters (mean and
    log-variance, [B, 2 x latent channels, side / f, side / f]) where there is a VAE, and cached_text
    (the states [B, L, D], SDXL's pooled [B, P], the empty caption's [1, ...])."""
    from .data.cache import CachedText
    from .models import latent_factor_of

    out = {"image_size": (side, side)}
    if components.vae is not None:
        latent = side // latent_factor_of(components)
        out["latent_parameters"] = torch.zeros(batch_size, 2 * components.vae.config.latent_channels, latent, latent)
    length = components.tokenizer.model_max_length
    width = sum(int(e.config.hidden_size) for e in components.text_encoders)
    pooled = None
    if components.text_encoder_2 is not None:
        pooled = torch.zeros(batch_size, int(components.text_encoder_2.config.projection_dim))
    out["cached_text"] = CachedText(list(captions), torch.zeros(batch_size, length, width), pooled,
                                    torch.zeros(1, length, width), None if pooled is None else pooled[:1].clone())
    return out


def set_planned_encoders_aside(components) -> None:
    """--cache-latents: the text encoders and the VAE's encoder are not on the device in a cached run
    (kept on the CPU or freed); dropped here so that the plan holds none of their tensors."""
    from .data.cache import free_vae_encoder

    if components.vae is not None:
        free_vae_encoder(components.vae)
    components.text_encoder = components.text_encoder_2 = None


def build_planned_step(config, place_models):
    """A function that builds the stage and returns elr_ext.plan.PlannedStep (elr_ext.plan.plan_step
    calls it under its fake-tensor mode)."""
    from elr_ext.plan import PlannedStep
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from .optim import make_optimizer
    from .stages import STAGES

    def build():
        device = torch.device("cpu")
        components = planned_components(config)
        stage = STAGES[config.stage](config, components, device, lambda *a, **k: None)
        batch = planned_batch(config, components)  # before a cached run's encoders are set aside
        if config.cache_latents:
            set_planned_encoders_aside(components)
        model = place_models(config, stage, components, device)
        named = dict(model.named_parameters())
        params = [named[n] for n in stage.trained_names()]
        with unset_fake_temporarily():  # bitsandbytes builds its code books from real values
            optimizer = make_optimizer(config, params)
        if config.optimizer == "adamw" and config.plan_device != "cpu":
            for group in optimizer.param_groups:
                group["foreach"] = True  # what torch.optim picks for CUDA tensors
        generator = torch.Generator().manual_seed(config.seed)
        models = {"trained": model, **{f"frozen{i}": m for i, m in enumerate(
            [*components.text_encoders, components.vae, *stage.frozen_modules()]) if m is not None and m is not model}}
        return PlannedStep(models=models, loss=lambda: stage.loss(model, batch, generator)[0],
                           optimizer=optimizer, max_grad_norm=config.max_grad_norm)

    return build


def describe_run(config) -> str:
    source = config.pretrained or config.architecture or "tiny"
    return (f"stage {config.stage} on {source}, batch {config.train_batch_size}, {config.resolution} px, "
            f"mixed precision {config.mixed_precision}, optimizer {config.optimizer}"
            + (", gradient checkpointing" if config.gradient_checkpointing else "")
            + (", from the latent cache" if config.cache_latents else ""))


def plan_config(config, place_models):
    from elr_ext.plan import plan_step

    autocast = weight_dtype_of(config.mixed_precision)
    return plan_step(build_planned_step(config, place_models), device=config.plan_device,
                     autocast_dtype=None if autocast == torch.float32 else autocast, description=describe_run(config))


def savings(config) -> List[dict]:
    """Settings to try when a plan does not fit, each adding to the one before: gradient
    checkpointing, the 8-bit optimiser, then halving the batch (with gradient accumulation keeping
    the effective batch)."""
    steps, current = [], {}
    if not config.gradient_checkpointing:
        current = {**current, "gradient_checkpointing": True}
        steps.append(current)
    if config.optimizer == "adamw":
        current = {**current, "optimizer": "adamw8bit"}
        steps.append(current)
    batch, accumulation = config.train_batch_size, config.gradient_accumulation_steps
    while batch > 1:
        batch, accumulation = batch // 2, accumulation * 2
        current = {**current, "train_batch_size": batch, "gradient_accumulation_steps": accumulation}
        steps.append(current)
    return steps


def flags(changes: dict) -> str:
    out = []
    for name, value in changes.items():
        flag = "--" + name.replace("_", "-")
        out.append(flag if value is True else f"{flag} {value}")
    return " ".join(out)


def check_plannable(config) -> None:
    """Refuse, before anything is built, what a plan cannot know: stage 1's ranks under --energy or
    --param-budget come from the teacher's singular values, and a plan reads no weights."""
    if config.stage != 1:
        return
    for field in ("energy", "param_budget"):
        value = getattr(config, field, None)
        if value is not None:
            raise ValueError(f"--plan cannot plan stage 1 with --{field.replace('_', '-')} {value:g}: that policy "
                             "picks each layer's rank from the teacher's singular values, and a plan reads no "
                             "weights; plan with a fixed rank instead (--rank-ratio R or --rank K, e.g. "
                             "--rank-ratio 0.33)")


def run_plan(config, place_models, say=print) -> dict:
    """Plan, print, and when it does not fit try savings() until one fits; writes <output_dir>/plan.json."""
    from elr_ext.plan import device_spec

    if config.plan_device != "cpu":
        device_spec(config.plan_device)  # an unknown card fails before anything is built
    check_plannable(config)
    plan = plan_config(config, place_models)
    say(plan.format())
    result = {"plan": plan.to_dict(), "fits_with": None}
    if plan.fits is False:
        for changes in savings(config):
            trial = plan_config(dataclasses.replace(config, **changes), place_models)
            say(f"  with {flags(changes)}: peak {trial.peak_bytes / 2 ** 30:.2f} GiB, "
                f"{'fits' if trial.fits else 'does not fit'}")
            if trial.fits:
                result["fits_with"] = {"changes": changes, "plan": trial.to_dict()}
                break
        if result["fits_with"] is None:
            say(f"  nothing tried fits on {config.plan_device}; the peak holds {plan.peak.split}")
    os.makedirs(config.output_dir, exist_ok=True)
    path = os.path.join(config.output_dir, "plan.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)
    say(f"wrote {path}")
    return result
