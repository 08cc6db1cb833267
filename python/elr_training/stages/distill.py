"""Stage 1 (the paper's Stage I): student = elr_ext.decompose(copy of the frozen teacher), trained by
knowledge distillation on the teacher's output.

    L = kd_weight w(lambda_t) ||eps_teacher - eps_student||^2                (eq. 3; kd_weight 1)
        + sum_level w_level ||F_teacher - F_student||^2   (optional: down / mid / up block outputs)
        + task_weight w(lambda_t) ||eps - eps_student||^2                   (optional, default 0)
"""

from __future__ import annotations

import copy
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from elr_ext.nn import count_parameters

from ..losses import noisy_inputs, timestep_weights, weighted_mse
from ..models import Components, encode_batch_images, encode_images, encode_prompts, save_model_folder, unwrap
from ..sampling import generate, image_grid, pixels_to_uint8
from .base import Stage

LEVELS = ("down", "mid", "up")


def feature_blocks(unet) -> Dict[str, List[nn.Module]]:
    return {"down": list(unet.down_blocks), "mid": [unet.mid_block], "up": list(unet.up_blocks)}


class FeatureRecorder:
    """Forward hooks that keep the output of every down, mid and up block of a UNet during one call."""

    def __init__(self, unet, levels):
        self.outputs: Dict[Tuple[str, int], torch.Tensor] = {}
        self.handles = []
        for level, blocks in feature_blocks(unet).items():
            if level not in levels:
                continue
            for i, block in enumerate(blocks):
                self.handles.append(block.register_forward_hook(self._keep(level, i)))

    def _keep(self, level: str, index: int):
        def hook(module, inputs, output):
            # down blocks return (hidden_states, skip states): the hidden states are the level's output
            self.outputs[(level, index)] = output[0] if isinstance(output, tuple) else output

        return hook

    def pop(self) -> Dict[Tuple[str, int], torch.Tensor]:
        outputs, self.outputs = self.outputs, {}
        return outputs


def level_weights(spec: Dict[str, object], unet) -> Dict[Tuple[str, int], float]:
    """{'down': 0.1, 'up': [0.1, 0.2, 0.3]} -> weight per (level, block index)."""
    blocks = feature_blocks(unet)
    weights = {}
    for level, value in spec.items():
        if level not in LEVELS:
            raise ValueError(f"--feature-distillation: unknown level {level!r}; levels: {LEVELS}")
        n = len(blocks[level])
        values = value if isinstance(value, (list, tuple)) else [value] * n
        if len(values) != n:
            raise ValueError(
                f"--feature-distillation {level}: {len(values)} weights for {n} {level} block(s)"
            )
        for i, w in enumerate(values):
            if float(w) != 0.0:
                weights[(level, i)] = float(w)
    return weights



class DistillStage(Stage):
    """Stage I: the SVD-initialised low-rank student distilled from the frozen teacher."""

    number = 1

    def __init__(self, config, components: Components, device, say):
        import elr_ext

        self.config, self.components, self.device = config, components, device
        self.teacher = components.unet
        self.teacher.requires_grad_(False).eval()
        policy = {
            k: getattr(config, k)
            for k in ("rank", "rank_ratio", "energy", "param_budget")
            if getattr(config, k) is not None
        }
        if "param_budget" in policy and policy["param_budget"] < 1:  # a fraction of the teacher's parameters
            policy["param_budget"] = int(policy["param_budget"] * count_parameters(self.teacher))
        elif "param_budget" in policy:
            policy["param_budget"] = int(policy["param_budget"])
        self.student = copy.deepcopy(self.teacher)
        self.decomposition = elr_ext.decompose(
            self.student, **policy, include=config.decompose_include, exclude=config.decompose_exclude
        )
        self.student.requires_grad_(True).train()
        say(f"stage 1: student = elr_ext.decompose(copy of teacher, {policy})")
        say(str(self.decomposition))
        self.feature_weights = level_weights(config.feature_distillation, self.teacher)
        levels = {level for level, _ in self.feature_weights}
        self.teacher_features = FeatureRecorder(self.teacher, levels) if levels else None
        self.student_features = FeatureRecorder(self.student, levels) if levels else None
        if self.feature_weights:
            say(f"feature distillation on {sorted(self.feature_weights)}")
        say(f"teacher {count_parameters(self.teacher):,} parameters, student {count_parameters(self.student):,}")

    def trained_module(self) -> nn.Module:
        return self.student

    def trained_names(self) -> List[str]:
        return [n for n, p in unwrap(self.student).named_parameters() if p.requires_grad]

    def frozen_modules(self) -> List[nn.Module]:
        return [self.teacher]

    def compile_frozen(self) -> None:
        self.teacher = torch.compile(self.teacher)

    def enable_gradient_checkpointing(self) -> None:
        unwrap(self.student).enable_gradient_checkpointing()

    def loss(self, model, batch: dict, generator: torch.Generator) -> Tuple[torch.Tensor, Dict[str, float]]:
        # No text dropout in Stage I: the student learns the teacher's conditional prediction.
        text = encode_prompts(self.components, batch["captions"], self.device, batch)
        latents = encode_batch_images(self.components, batch, self.device, generator)
        scheduler = self.components.noise_scheduler
        noisy, t, _, target = noisy_inputs(scheduler, latents, generator)
        with torch.no_grad():
            teacher_out = self.teacher(
                noisy.to(self.teacher.dtype), t, **text.to(self.teacher.dtype).unet_kwargs()
            ).sample
        teacher_feats = self.teacher_features.pop() if self.teacher_features else {}
        student_out = model(noisy, t, **text.unet_kwargs()).sample
        student_feats = self.student_features.pop() if self.student_features else {}
        weights = timestep_weights(self.config, scheduler, t)
        kd = weighted_mse(student_out, teacher_out, weights)
        loss, logs = self.config.kd_weight * kd, {"loss_kd": kd.item()}
        if self.feature_weights:
            feature = sum(
                w * F.mse_loss(student_feats[key].float(), teacher_feats[key].float())
                for key, w in self.feature_weights.items()
            )
            loss = loss + feature
            logs["loss_feature"] = float(feature.detach())
        if self.config.task_loss_weight:
            task = weighted_mse(student_out, target, weights)
            loss = loss + self.config.task_loss_weight * task
            logs["loss_task"] = task.item()
        logs["loss"] = loss.item()
        return loss, logs

    @torch.no_grad()
    def validate(self, samples: List[dict], step: int) -> Tuple[np.ndarray, Dict[str, float]]:
        pixels = torch.stack([s["pixel_values"] for s in samples])
        captions = [s["caption"] for s in samples]
        teacher, student = (
            generate(self.components, unet, None, captions, None, self.config.num_inference_steps,
                     self.config.guidance_scale, seed=self.config.seed, size=pixels.shape[-2:])
            for unet in (self.teacher, self.student)
        )
        # distillation error on fixed noise and timesteps: comparable from one validation to the next
        g = torch.Generator().manual_seed(self.config.seed)
        text = encode_prompts(self.components, captions, self.device, size=pixels.shape[-2:])
        latents = encode_images(self.components, pixels.to(self.device), g)
        noisy, t, _, _ = noisy_inputs(self.components.noise_scheduler, latents, g)
        unwrapped = unwrap(self.student)
        was_training = unwrapped.training
        unwrapped.eval()
        mse = F.mse_loss(
            unwrapped(noisy, t, **text.unet_kwargs()).sample.float(),
            self.teacher(noisy.to(self.teacher.dtype), t, **text.to(self.teacher.dtype).unet_kwargs()).sample.float(),
        )
        unwrapped.train(was_training)
        if self.teacher_features:  # the hooks fired during validation too
            self.teacher_features.pop(), self.student_features.pop()
        image_mse = float(np.mean((teacher.astype(np.float64) - student.astype(np.float64)) ** 2) / 255**2)
        grid = image_grid({"data": pixels_to_uint8(pixels), "teacher": teacher, "student": student})
        return grid, {"val/kd_mse": float(mse), "val/teacher_student_image_mse": image_mse}

    def save(self, folder: str) -> None:
        save_model_folder(self.components, self.student, folder, decomposed=True)

    def report(self, validation_metrics: Dict[str, float]) -> dict:
        return {"decomposition": self.decomposition.to_dict()}

    def verdict(self, validation_metrics: Dict[str, float]) -> Optional[str]:
        return None
