"""The stage interface: everything python/train.py's loop asks of a stage, and nothing else.

A stage builds its models from the loaded components, names what trains, computes the loss of a
batch, validates (a picture and metrics), saves its model folder and reports what metrics.json adds
for it. The loop (elr_training.loop) and train.py's set-up and finish call only these methods, so a new
stage is a new subclass, registered in elr_training.stages.STAGES.
"""

from __future__ import annotations

import abc
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn


class Stage(abc.ABC):
    number: int  # the --stage value
    # --cache-latents: whether the VAE's encoder is still needed once the cache is built (validation
    # encodes images, or the saved model folder holds the VAE); a stage that only decodes frees it
    needs_vae_encoder: bool = True

    @abc.abstractmethod
    def __init__(self, config, components, device, say) -> None:
        """Build the stage's models from `components` (elr_training.models.Components); `say` prints on
        the main process."""

    @abc.abstractmethod
    def trained_module(self) -> nn.Module:
        """The module the optimiser trains (accelerate prepares and wraps it)."""

    @abc.abstractmethod
    def trained_names(self) -> List[str]:
        """The names, in trained_module().named_parameters(), of the tensors that train (and that a
        checkpoint stores)."""

    @abc.abstractmethod
    def frozen_modules(self) -> List[nn.Module]:
        """The models that do not train (a teacher, a backbone): kept in the run's low precision."""

    @abc.abstractmethod
    def compile_frozen(self) -> None:
        """Put torch.compile around the frozen models (--compile)."""

    @abc.abstractmethod
    def enable_gradient_checkpointing(self) -> None:
        """--gradient-checkpointing: on every module the gradients flow through."""

    @abc.abstractmethod
    def loss(self, model, batch: dict, generator: torch.Generator) -> Tuple[torch.Tensor, Dict[str, float]]:
        """The loss of one batch with `model` (the prepared trained module) and the values to log; every
        random draw from `generator`."""

    @abc.abstractmethod
    def validate(self, samples: List[dict], step: int) -> Tuple[np.ndarray, Dict[str, float]]:
        """A picture (uint8 [H, W, 3]) and metrics ('val/<name>') on the fixed validation samples."""

    @abc.abstractmethod
    def save(self, folder: str) -> None:
        """Write the trained model folder."""

    @abc.abstractmethod
    def report(self, validation_metrics: Dict[str, float]) -> dict:
        """What metrics.json adds for this stage beyond the loop's numbers."""

    @abc.abstractmethod
    def verdict(self, validation_metrics: Dict[str, float]) -> Optional[str]:
        """The sentence the run ends with, or None."""
