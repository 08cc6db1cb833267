"""Model parts the stages train on: the tiny built-in configuration (or one of its family-shaped
variants, --architecture tiny-sd15 / tiny-sdxl), a local Stable Diffusion 1.x, 2.x or SDXL folder
(--pretrained), or a folder an earlier stage wrote (--teacher, --backbone).

A model folder has diffusers' pipeline layout: unet/, text_encoder/, tokenizer/, scheduler/ and
vae/ (vae/ is required for --pretrained; the tiny configuration works in pixel space without one),
plus text_encoder_2/ and tokenizer_2/ for SDXL. The family is read from the folder (`detect_family`):
SDXL when the UNet adds the pooled text and time ids to its time embedding
(addition_embed_type "text_time"), otherwise a one-encoder family, SD 1.x or 2.x by the UNet's
cross-attention width. Nothing is downloaded: every part is read with local_files_only, and a
missing file is an error that names it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import nn

# file name alternatives per part; diffusers/transformers read .bin with torch.load(weights_only=True)
REQUIRED_FILES = {
    "unet": [("config.json",), ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")],
    "vae": [("config.json",), ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")],
    "text_encoder": [("config.json",), ("model.safetensors", "pytorch_model.bin")],
    "text_encoder_2": [("config.json",), ("model.safetensors", "pytorch_model.bin")],
    "tokenizer": [("tokenizer_config.json", "vocab.json", "tokenizer.json")],
    "tokenizer_2": [("tokenizer_config.json", "vocab.json", "tokenizer.json")],
    "scheduler": [("scheduler_config.json",)],
}
DECOMPOSED_MARKER = (
    "elr_decompose.json"  # elr_ext.save_decomposed writes it beside a decomposed UNet (stage 1)
)


# diffusers pipeline classes (model_index.json's _class_name) of the families the stages train
KNOWN_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusionImg2ImgPipeline",
                   "StableDiffusionXLImg2ImgPipeline", "ELRControlPipeline", "ELRControlXLPipeline")


@dataclass
class Components:
    unet: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    noise_scheduler: object  # DDPMScheduler with the model's noise schedule, for training
    vae: Optional[nn.Module]
    source: str  # "tiny", a tiny variant's name ("tiny-sdxl") or the folder
    text_encoder_2: Optional[nn.Module] = None  # SDXL's second encoder (CLIPTextModelWithProjection)
    tokenizer_2: Optional[object] = None
    family: str = "tiny"  # what detect_family says: tiny, tiny-sd15, tiny-sdxl, sd1, sd2, sdxl

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def text_encoders(self) -> List[nn.Module]:
        return [self.text_encoder] + ([self.text_encoder_2] if self.text_encoder_2 is not None else [])

    @property
    def tokenizers(self) -> list:
        return [self.tokenizer] + ([self.tokenizer_2] if self.tokenizer_2 is not None else [])

    @property
    def is_tiny(self) -> bool:
        return self.source.startswith("tiny")


@dataclass
class UNetText:
    """What the UNet (and the adapter) take of the text: encoder_hidden_states and, for SDXL,
    added_cond_kwargs (pooled text embedding and the micro-conditioning time ids)."""

    states: torch.Tensor
    added: Optional[dict] = None

    def to(self, dtype: torch.dtype) -> "UNetText":
        added = None if self.added is None else {k: v.to(dtype) for k, v in self.added.items()}
        return UNetText(self.states.to(dtype), added)

    def unet_kwargs(self) -> dict:
        return {"encoder_hidden_states": self.states, "added_cond_kwargs": self.added}


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


def tiny_components(seed: int, architecture: Optional[str] = None, **scheduler_overrides) -> Components:
    """The tiny built-in configuration (architecture None or "tiny": pixel space, one text encoder)
    or a family-shaped variant ("tiny-sd15", "tiny-sdxl": latent space of tiny_vae, SDXL with two
    text encoders), with weights drawn from `seed` (elr_ext.tiny); the noise schedule's config can
    be overridden (prediction_type, beta_schedule)."""
    from diffusers import DDPMScheduler

    from elr_ext import tiny

    name = architecture or "tiny"
    if name != "tiny" and name not in tiny.TINY_VARIANTS:
        raise ValueError(f"--architecture {name!r} has no tiny built-in model; training without --pretrained "
                         f"takes tiny, {', '.join(tiny.TINY_VARIANTS)}")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # the random models are a function of the seed
    try:
        if name == "tiny":
            unet, encoders, vae = tiny.tiny_unet(), [tiny.tiny_text_encoder()], None
        else:
            unet, encoders, vae = tiny.tiny_variant_unet(name), tiny.tiny_variant_text_encoders(name), tiny.tiny_vae()
    finally:
        torch.random.set_rng_state(generator_state)
    schedule = dict(tiny.tiny_scheduler("ddpm").config)
    if name != "tiny":
        schedule["prediction_type"] = tiny.TINY_VARIANTS[name][2]
    return Components(
        unet=unet,
        text_encoder=encoders[0],
        tokenizer=tiny.tiny_tokenizer(),
        noise_scheduler=DDPMScheduler.from_config(
            schedule, **{k: v for k, v in scheduler_overrides.items() if v is not None}
        ),
        vae=vae,
        source=name,
        text_encoder_2=encoders[1] if len(encoders) > 1 else None,
        tokenizer_2=tiny.tiny_tokenizer() if len(encoders) > 1 else None,
        family=name,
    )


def detect_family(folder: str, flag: str) -> str:
    """sdxl, sd1, sd2 or one-encoder (a one-encoder UNet of another width, e.g. a tiny stage's) from
    a model folder's model_index.json and unet/config.json; anything else is an error naming it."""
    import json

    index_path = os.path.join(folder, "model_index.json")
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as f:
            pipeline_class = json.load(f).get("_class_name", "")
        if pipeline_class and pipeline_class not in KNOWN_PIPELINES:
            raise ValueError(f"{flag} {folder}: model_index.json names {pipeline_class}, which is neither Stable "
                             "Diffusion 1.x / 2.x nor SDXL (StableDiffusionPipeline or StableDiffusionXLPipeline)")
    unet_config_path = os.path.join(folder, "unet", "config.json")
    if is_decomposed(folder):  # a stage-1 student: its UNet config sits in the decomposition file
        with open(os.path.join(folder, "unet", DECOMPOSED_MARKER), encoding="utf-8") as f:
            meta = json.load(f)
        unet_config = meta.get("model_config", {})
        unet_class = meta.get("model_class", "UNet2DConditionModel").rsplit(":", 1)[-1]
    elif not os.path.isfile(unet_config_path):
        raise FileNotFoundError(f"{flag} {folder}: missing {unet_config_path} (the unet of a diffusers model folder; "
                                "Stable Diffusion 1.x, 2.x and SDXL folders have one)")
    else:
        with open(unet_config_path, encoding="utf-8") as f:
            unet_config = json.load(f)
        unet_class = unet_config.get("_class_name", "UNet2DConditionModel")
    if unet_class != "UNet2DConditionModel":
        raise ValueError(f"{flag} {folder}: unet/config.json is a {unet_class}; the stages train Stable Diffusion "
                         "1.x, 2.x and SDXL UNets (UNet2DConditionModel)")
    added = unet_config.get("addition_embed_type")
    if added == "text_time":
        return "sdxl"
    if added is not None:
        raise ValueError(f"{flag} {folder}: the UNet has addition_embed_type={added!r}; Stable Diffusion 1.x / 2.x "
                         "have none and SDXL has 'text_time'")
    width = unet_config.get("cross_attention_dim")
    return {768: "sd1", 1024: "sd2"}.get(width, "one-encoder")


def load_vae(path: str, flag: str):
    """An AutoencoderKL from a VAE folder (config.json and weights, e.g. an fp16-safe SDXL VAE) or from
    a model folder's vae/ (--pretrained-vae)."""
    from diffusers import AutoencoderKL

    if not os.path.isdir(path):
        raise FileNotFoundError(f"{flag} {path}: no such folder")
    subfolder = None if os.path.isfile(os.path.join(path, "config.json")) else "vae"
    where = path if subfolder is None else os.path.join(path, "vae")
    for alternatives in REQUIRED_FILES["vae"]:
        if not any(os.path.isfile(os.path.join(where, name)) for name in alternatives):
            names = " or ".join(os.path.join(where, name) for name in alternatives)
            raise FileNotFoundError(f"{flag} {path}: missing {names} (a VAE folder, or a model folder with vae/)")
    return AutoencoderKL.from_pretrained(path, subfolder=subfolder, local_files_only=True)


def load_components(folder: str, flag: str, require_vae: bool = False) -> Components:
    """Every part from a local model folder; the UNet may be a decomposed one (stage 1 output)."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    folder = resolve_model_folder(folder)
    family = detect_family(folder, flag)
    parts = ["unet", "text_encoder", "tokenizer", "scheduler"] + (["vae"] if require_vae else [])
    if family == "sdxl":
        parts += ["text_encoder_2", "tokenizer_2"]
    check_model_folder(
        folder, parts if not is_decomposed(folder) else [p for p in parts if p != "unet"], flag
    )
    vae = None
    if require_vae or os.path.isdir(os.path.join(folder, "vae")):
        check_model_folder(folder, ["vae"], flag)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True)
    second = {}
    if family == "sdxl":
        second = dict(
            text_encoder_2=CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2",
                                                                       local_files_only=True),
            tokenizer_2=AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer_2"), local_files_only=True),
        )
    return Components(
        unet=load_unet(folder),
        text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True),
        tokenizer=AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer"), local_files_only=True),
        noise_scheduler=DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True),
        vae=vae,
        source=folder,
        family=family,
        **second,
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
    for suffix, encoder, tokenizer in (("", components.text_encoder, components.tokenizer),
                                       ("_2", components.text_encoder_2, components.tokenizer_2)):
        if encoder is None:
            continue
        unwrap(encoder).save_pretrained(os.path.join(folder, "text_encoder" + suffix), safe_serialization=True)
        tokenizer.save_pretrained(os.path.join(folder, "tokenizer" + suffix))
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
def encode_prompts(components: Components, captions: List[str], device, batch: Optional[dict] = None,
                   size: Optional[Sequence[int]] = None) -> UNetText:
    """The UNet's text inputs for `captions`: CLIP hidden states padded to the tokenizer's max length
    (as Stable Diffusion); for SDXL also the pooled embedding and the time ids, from each sample's
    original size and crop (`batch["original_sizes"]`, `batch["crops_top_left"]`, as the data
    records them) and the training size; without them (validation) original = target = `size`
    (default: the batch's pixel size), crop (0, 0). A batch read from a latent cache (--cache-latents,
    data/cache.py) brings the text encodings along (`batch["cached_text"]`): they are taken instead of
    running the text encoders, the empty caption's for a caption that text dropout emptied."""
    from elr_ext.pipelines.prompts import added_cond_kwargs, encode_text, time_ids, uses_added_conditioning

    cached = batch.get("cached_text") if batch is not None else None
    if cached is not None:
        text = cached.select(captions, device)
    else:
        text = encode_text(components.tokenizers, components.text_encoders, captions, device)
    if not uses_added_conditioning(components.unet):
        return UNetText(text.states)
    if size is None:
        if batch is not None and "pixel_values" in batch:
            size = batch["pixel_values"].shape[-2:]
        elif batch is not None and "image_size" in batch:  # a cached batch has latents, not pixels
            size = batch["image_size"]
        else:
            raise ValueError("SDXL's time ids need the image size: pass batch or size")
    target = (int(size[0]), int(size[1]))
    originals = [tuple(map(int, s)) for s in batch["original_sizes"]] if batch and "original_sizes" in batch \
        else [target] * len(captions)
    crops = [tuple(map(int, c)) for c in batch["crops_top_left"]] if batch and "crops_top_left" in batch \
        else [(0, 0)] * len(captions)
    ids = time_ids(originals, crops, target, device=device)
    return UNetText(text.states, added_cond_kwargs(components.unet, text.pooled, ids))


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


@torch.no_grad()
def encode_batch_images(components: Components, batch: dict, device,
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """What the UNet denoises for a training batch: `encode_images` of its pixels or, for a batch read
    from a latent cache (--cache-latents), a draw from the cached latent distribution: the same
    distribution and the same draws from `generator` as encoding the pixels would make."""
    if "latent_parameters" in batch:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        latents = DiagonalGaussianDistribution(batch["latent_parameters"].to(device)).sample(generator=generator)
        return latents * components.vae.config.scaling_factor
    return encode_images(components, batch["pixel_values"].to(device), generator)
