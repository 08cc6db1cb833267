"""UNet architectures the benchmarks build with random weights (diffusers UNet2DConditionModel
keyword arguments). The tiny built-in model's is elr_ext.tiny.TINY_UNET_CONFIG.

    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel(**SD21_UNET_CONFIG)                      # 768 px: 96 x 96 latents
    unet = UNet2DConditionModel(**{**SD21_UNET_CONFIG, "sample_size": 64})  # 512 px
"""

from __future__ import annotations

# Stable Diffusion 2.1's UNet (stabilityai/stable-diffusion-2-1, unet/config.json): the
# architecture keys (norm_num_groups, flip_sin_to_cos, freq_shift, act_fn are diffusers' defaults,
# spelled out as in the config file).
SD21_UNET_CONFIG = dict(
    sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
    use_linear_projection=True, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0, act_fn="silu",
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
