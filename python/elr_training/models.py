"""Model parts the stages train on: the tiny built-in configuration, a local Stable Diffusion 2.1
folder (--pretrained), or a folder an earlier stage wrote (--teacher, --backbone).

A model folder has diffusers' pipeline layout: unet/, text_encoder/, tokenizer/, scheduler/ and
vae/ (vae/ is required for --pretrained; the tiny configuration works in pixel space without one).
Nothing is downloaded: every part is read with local_files_only, and a missing file is an error
that names it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn

# file name alternatives per part; diffusers/transformers read .bin with torch.load(weights_only=True)
REQUIRED_FILES = {
    "unet": [("config.json",), ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")],
    "vae": [("config.json",), ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")],
    "text_encoder": [("config.json",), ("model.safetensors", "pytorch_model.bin")],
    "tokenizer": [("tokenizer_config.json", "vocab.json", "tokenizer.json")],
    "scheduler": [("scheduler_config.json",)],
}
DECOMPOSED_MARKER = (
    "elr_decompose.json"  # elr_ext.save_decomposed writes it beside a decomposed UNet (stage 1)
)


@dataclass
class Components:
    unet: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    noise_scheduler: object  # DDPMScheduler with the model's noise schedule, for training
    vae: Optional[nn.Module]
    source: str  # "tiny" or the folder

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type


def latent_factor_of(components: Components) -> int:
    """Image size / latent size: the VAE's downsampling (8 for Stable Diffusion), 1 in pixel space."""
    from elr_ext.pipelines import vae_downsampling

    return vae_downsampling(components.vae)


def weight_dtype_of(mixed_precision: str) -> torch.dtype:
    """The dtype frozen models run in under --mixed-precision (what trains keeps fp32 master weights)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def check_model_folder(folder: str, parts: List[str], flag: str) -> None:
    """Raise FileNotFoundError naming the first missing file of the given parts."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{flag} {folder}: no such folder")
    for part in parts:
        for alternatives in REQUIRED_FILES[part]:
            if not any(os.path.isfile(os.path.join(folder, part, name)) for name in alternatives):
                names = " or ".join(os.path.join(folder, part, name) for name in alternatives)
                raise FileNotFoundError(
                    f"{flag} {folder}: missing {names} (the {part} of a diffusers model folder)"
                )
        if part == "tokenizer":
            tok = os.path.join(folder, "tokenizer")
            if not os.path.isfile(os.path.join(tok, "tokenizer.json")):
                for name in ("vocab.json", "merges.txt"):
                    if not os.path.isfile(os.path.join(tok, name)):
                        raise FileNotFoundError(
                            f"{flag} {folder}: missing {os.path.join(tok, name)} "
                            f"(a CLIP tokenizer needs vocab.json and merges.txt, or tokenizer.json)"
                        )


def resolve_model_folder(path: str) -> str:
    """A run folder of an earlier stage holds its model in model/; a model folder is taken as is."""
    if os.path.isdir(os.path.join(path, "model")) and not os.path.isdir(os.path.join(path, "unet")):
        return os.path.join(path, "model")
    return path


def tiny_components(seed: int, **scheduler_overrides) -> Components:
    """The tiny built-in configuration with weights drawn from `seed` (elr_ext.tiny); the noise
    schedule's config can be overridden (prediction_type, beta_schedule)."""
    from diffusers import DDPMScheduler

    from elr_ext import tiny

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # the random text encoder and UNet are a function of the seed
    try:
        unet, text_encoder = tiny.tiny_unet(), tiny.tiny_text_encoder()
    finally:
        torch.random.set_rng_state(generator_state)
    return Components(
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=tiny.tiny_tokenizer(),
        noise_scheduler=DDPMScheduler.from_config(
            tiny.tiny_scheduler("ddpm").config,
            **{k: v for k, v in scheduler_overrides.items() if v is not None},
        ),
        vae=None,
        source="tiny",
    )


def load_components(folder: str, flag: str, require_vae: bool = False) -> Components:
    """Every part from a local model folder; the UNet may be a decomposed one (stage 1 output)."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import AutoTokenizer, CLIPTextModel

    folder = resolve_model_folder(folder)
    parts = ["unet", "text_encoder", "tokenizer", "scheduler"] + (["vae"] if require_vae else [])
    check_model_folder(
        folder, parts if not is_decomposed(folder) else [p for p in parts if p != "unet"], flag
    )
    vae = None
    if require_vae or os.path.isdir(os.path.join(folder, "vae")):
        check_model_folder(folder, ["vae"], flag)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True)
    return Components(
        unet=load_unet(folder),
        text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True),
        tokenizer=AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer"), local_files_only=True),
        noise_scheduler=DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True),
        vae=vae,
        source=folder,
    )


def is_decomposed(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "unet", DECOMPOSED_MARKER))


def load_unet(folder: str) -> nn.Module:
    from diffusers import UNet2DConditionModel

    if is_decomposed(folder):
        import elr_ext

        return elr_ext.load_decomposed(None, os.path.join(folder, "unet"))
    return UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)


def save_model_folder(components: Components, unet: nn.Module, folder: str, decomposed: bool = False) -> None:
    """Writes a model folder (diffusers layout, safetensors) that --teacher / --backbone read back."""
    os.makedirs(folder, exist_ok=True)
    unet = unwrap(unet)
    if decomposed:
        import elr_ext

        elr_ext.save_decomposed(unet, os.path.join(folder, "unet"))
    else:
        unet.save_pretrained(os.path.join(folder, "unet"), safe_serialization=True)
    unwrap(components.text_encoder).save_pretrained(
        os.path.join(folder, "text_encoder"), safe_serialization=True
    )
    components.tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    components.noise_scheduler.save_pretrained(os.path.join(folder, "scheduler"))
    if components.vae is not None:
        unwrap(components.vae).save_pretrained(os.path.join(folder, "vae"), safe_serialization=True)
    elif os.path.isdir(os.path.join(folder, "vae")):
        shutil.rmtree(os.path.join(folder, "vae"))


def unwrap(module: nn.Module) -> nn.Module:
    """The module under DDP / torch.compile wrappers."""
    while True:
        if hasattr(module, "module") and isinstance(module.module, nn.Module):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module


@torch.no_grad()
def encode_prompts(components: Components, captions: List[str], device) -> torch.Tensor:
    """CLIP hidden states of the captions, padded to the tokenizer's max length (as Stable Diffusion)."""
    tokens = components.tokenizer(
        captions,
        padding="max_length",
        max_length=components.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return components.text_encoder(tokens.input_ids.to(device))[0]


@torch.no_grad()
def encode_images(
    components: Components, pixel_values: torch.Tensor, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Pixels in [-1, 1] -> what the UNet denoises: VAE latents (scaled, drawn with `generator`) or,
    without a VAE, the pixels."""
    if components.vae is None:
        return pixel_values
    vae = components.vae
    latents = vae.encode(pixel_values.to(vae.dtype)).latent_dist.sample(generator=generator)
    return latents * vae.config.scaling_factor
