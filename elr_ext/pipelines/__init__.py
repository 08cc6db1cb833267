"""Generation pipelines (diffusers DiffusionPipeline subclasses)."""

from .elr_control import ELRControlPipeline, condition_to_tensor, unet_downsampling, vae_downsampling

__all__ = ["ELRControlPipeline", "condition_to_tensor", "unet_downsampling", "vae_downsampling"]
