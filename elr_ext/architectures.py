"""The Stable Diffusion families' architectures, as diffusers / transformers keyword arguments: the
UNet, VAE, text encoder(s) and noise schedule of each, copied from the public model cards'
config.json files (runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1,
stabilityai/stable-diffusion-xl-base-1.0). Benchmarks build them with random weights, and
`train.py --plan --architecture NAME` builds them on tensors without data. The tiny built-in
model's configs are in elr_ext.tiny.

    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel(**SD21_UNET_CONFIG)                        # 768 px: 96 x 96 latents
    unet = UNet2DConditionModel(**{**SD21_UNET_CONFIG, "sample_size": 64})  # 512 px
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# The SD 1.x / 2.x UNet: four levels, cross-attention in the first three (norm_num_groups,
# flip_sin_to_cos, freq_shift and act_fn are diffusers' defaults, spelled out as in the files).
_SD_UNET_COMMON = dict(
    in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0, act_fn="silu",
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
SD15_UNET_CONFIG = dict(_SD_UNET_COMMON, sample_size=64, attention_head_dim=8, cross_attention_dim=768)
SD21_UNET_CONFIG = dict(_SD_UNET_COMMON, sample_size=96, attention_head_dim=(5, 10, 20, 20),
                        cross_attention_dim=1024, use_linear_projection=True)
# SDXL base: three levels, no attention in the first, 1 / 2 / 10 transformer layers per block, the
# pooled text embedding and six micro-conditioning time ids added to the time embedding.
SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0, act_fn="silu",
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)

# AutoencoderKL: the same network in all three families; scaling factor and sample size differ.
_VAE_COMMON = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, act_fn="silu",
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)
SD15_VAE_CONFIG = dict(_VAE_COMMON, sample_size=512, scaling_factor=0.18215)
SD21_VAE_CONFIG = dict(_VAE_COMMON, sample_size=768, scaling_factor=0.18215)
SDXL_VAE_CONFIG = dict(_VAE_COMMON, sample_size=1024, scaling_factor=0.13025)

# CLIP text encoders (transformers CLIPTextConfig): OpenAI CLIP ViT-L/14 (SD 1.5, SDXL's first),
# OpenCLIP ViT-H/14 (SD 2.x), OpenCLIP ViT-bigG/14 (SDXL's second, with the projection).
CLIP_L_TEXT_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                          projection_dim=768)
OPENCLIP_H_TEXT_CONFIG = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                              num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu",
                              projection_dim=512)
OPENCLIP_BIGG_TEXT_CONFIG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                 num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
                                 projection_dim=1280)

# DDPM training schedules (scheduler/scheduler_config.json)
_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@dataclass(frozen=True)
class Architecture:
    name: str
    unet: dict
    vae: Optional[dict]
    text_encoders: tuple  # one CLIPTextConfig dict per encoder (SDXL has two)
    scheduler: dict
    resolution: int  # the family's native training resolution, px

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1) if self.vae else 1


ARCHITECTURES = {
    "sd15": Architecture("sd15", SD15_UNET_CONFIG, SD15_VAE_CONFIG, (CLIP_L_TEXT_CONFIG,),
                         dict(_SCHEDULE, prediction_type="epsilon"), 512),
    "sd21": Architecture("sd21", SD21_UNET_CONFIG, SD21_VAE_CONFIG, (OPENCLIP_H_TEXT_CONFIG,),
                         dict(_SCHEDULE, prediction_type="v_prediction"), 768),
    "sdxl": Architecture("sdxl", SDXL_UNET_CONFIG, SDXL_VAE_CONFIG, (CLIP_L_TEXT_CONFIG, OPENCLIP_BIGG_TEXT_CONFIG),
                         dict(_SCHEDULE, prediction_type="epsilon"), 1024),
}


def architecture(name: str) -> Architecture:
    """A named family; an unknown name is an error that lists the known ones."""
    if name not in ARCHITECTURES:
        raise ValueError(f"--architecture {name!r} is not known; known: {', '.join(ARCHITECTURES)} "
                         "(and tiny, the built-in configuration)")
    return ARCHITECTURES[name]
