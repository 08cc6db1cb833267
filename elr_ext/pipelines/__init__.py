"""Generation pipelines (diffusers DiffusionPipeline subclasses)."""

from .elr_control import (ControlPipelineBase, ELRControlPipeline, condition_to_tensor, unet_downsampling,
                          vae_downsampling)
from .elr_control_xl import ELRControlXLPipeline
from .prompts import uses_added_conditioning


def control_pipeline_class(unet):
    """The control pipeline class for a backbone UNet: ELRControlXLPipeline for SDXL's
    (addition_embed_type="text_time"), ELRControlPipeline for the others."""
    return ELRControlXLPipeline if uses_added_conditioning(unet) else ELRControlPipeline


__all__ = ["ControlPipelineBase", "ELRControlPipeline", "ELRControlXLPipeline", "condition_to_tensor",
           "control_pipeline_class", "unet_downsampling", "vae_downsampling"]
