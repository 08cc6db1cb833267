"""The three stages: what each one trains, its loss, its validation and what it saves.

    stage 0  TeacherStage   the tiny teacher UNet trained from scratch (built-in default only)
    stage 1  DistillStage   student = elr_ext.decompose(copy of the frozen teacher);
                            L = kd_weight w(lambda_t) ||eps_teacher - eps_student||^2 (eq. 3; kd_weight 1)
                                + sum_level w_level ||F_teacher - F_student||^2 (optional, block outputs)
                                + task_weight ||eps - eps_student||^2            (optional, default 0)
    stage 2  ControlStage   frozen backbone + LocalControlAdapter (kron: ELR; full: Uni-ControlNet);
                            L = w(lambda_t) ||eps - eps(x_t, t, text, adapter(x_t, t, text, c))||^2

"eps" is the model's output in the scheduler's parameterisation (epsilon, or v for SD 2.1's
v-prediction): the student matches the teacher's output whatever it predicts.

Every random draw of a step (timesteps, noise, dropout) comes from the `generator` the loop seeds from
(seed, step, process), so a resumed run draws exactly what an unbroken run would.
"""

from __future__ import annotations

import copy
import os
from types import SimpleNamespace
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import ConditionDropout, condition_channels
from .data.conditions import CONDITION_CHANNELS
from .metrics import canny_edges
from .models import Components, encode_images, encode_prompts, save_model_folder, unwrap


# --------------------------------------------------------------------------- shared pieces
GRID_ROWS = 8


def weight_dtype_of(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


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
    draws = torch.rand(len(captions), generator=generator)
    return ["" if u < probability else c for u, c in zip(draws, captions)]


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[N, H, W, 3] floats in [0, 1] -> uint8."""
    return (np.clip(images, 0, 1) * 255 + 0.5).astype(np.uint8)


def pixels_to_uint8(pixel_values: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3]."""
    return to_uint8(((pixel_values.float().cpu() + 1) / 2).permute(0, 2, 3, 1).numpy())


def condition_to_uint8(conditions: torch.Tensor, types: List[str]) -> np.ndarray:
    """The concatenated condition maps shown side by side as one RGB picture per sample."""
    panels, start = [], 0
    for kind in types:
        c = CONDITION_CHANNELS[kind]
        part = conditions[:, start : start + c].float().cpu()
        start += c
        panels.append(part.expand(-1, 3, -1, -1) if c == 1 else part)
    return to_uint8(torch.cat(panels, dim=3).permute(0, 2, 3, 1).numpy())


def image_grid(columns: List[np.ndarray], titles: List[str], scale: int = 4) -> np.ndarray:
    """A grid: one row per sample, one column per entry of `columns` (each uint8 [N, H, W_i, 3]),
    upscaled by `scale` with nearest neighbour so that 32-px images stay readable, titles on top."""
    from PIL import Image, ImageDraw

    rows = columns[0].shape[0]
    height = columns[0].shape[1] * scale
    widths = [c.shape[2] * scale for c in columns]
    pad, title_height = 2, 14
    grid = Image.new(
        "RGB",
        (sum(widths) + pad * (len(columns) + 1), title_height + rows * (height + pad) + pad),
        (255, 255, 255),
    )
    draw = ImageDraw.Draw(grid)
    x = pad
    for column, width, title in zip(columns, widths, titles):
        draw.text((x + 2, 1), title, fill=(0, 0, 0))
        for r in range(rows):
            tile = Image.fromarray(column[r]).resize((width, height), Image.NEAREST)
            grid.paste(tile, (x, title_height + pad + r * (height + pad)))
        x += width + pad
    return np.asarray(grid)


class _TextToImage(nn.Module):
    """Stands in for the adapter when ELRControlPipeline samples a model without control (validation
    of stages 0 and 1): it returns no residuals, so the UNet runs exactly as it is."""

    def __init__(self, latent_factor: int, total_downsampling: int):
        super().__init__()
        self.config = SimpleNamespace(latent_factor=latent_factor)
        self.total_downsampling = total_downsampling
        self.register_buffer("anchor", torch.zeros(()), persistent=False)  # gives the pipeline a device

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    def forward(self, *args, **kwargs):
        return None, None


def latent_factor_of(components: Components) -> int:
    vae = components.vae
    return 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)


def total_downsampling_of(unet) -> int:
    return 2 ** sum(1 for block in unet.down_blocks if getattr(block, "downsamplers", None))


def generate(
    components: Components,
    unet,
    adapter,
    captions: List[str],
    condition: torch.Tensor,
    config,
    conditioning_scale: float = 1.0,
    seed: int = 0,
) -> np.ndarray:
    """Sample images with ELRControlPipeline (DDIM); uint8 [N, H, W, 3]. One generator per image, so
    that an image depends only on its seed and not on the batch it is in."""
    from diffusers import DDIMScheduler

    from elr_ext.pipelines import ELRControlPipeline

    device = condition.device
    unet = unwrap(unet)
    if adapter is None:
        adapter = _TextToImage(latent_factor_of(components), total_downsampling_of(unet)).to(device)
    pipeline = ELRControlPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=unet,
        adapter=unwrap(adapter),
        # pixel space: x0 clipped to the image range at every step, as DDPM
        # samples; without it the first steps' x0 (error / sqrt(alpha_bar), ~100x)
        # saturates the image. Latents are not bounded: no clipping there.
        scheduler=DDIMScheduler.from_config(
            components.noise_scheduler.config, clip_sample=components.vae is None
        ),
    )
    pipeline.set_progress_bar_config(disable=True)
    generators = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(len(captions))]
    latents = torch.stack(
        [
            torch.randn(
                (unet.config.in_channels,)
                + tuple(s // latent_factor_of(components) for s in condition.shape[-2:]),
                generator=g,
            )
            for g in generators
        ]
    )
    images = pipeline(
        list(captions),
        condition=condition,
        num_inference_steps=config.num_inference_steps,
        guidance_scale=config.guidance_scale,
        conditioning_scale=conditioning_scale,
        latents=latents.to(device, unet.dtype),
        output_type="np",
    ).images
    return to_uint8(np.asarray(images))


# --------------------------------------------------------------------------- stage 0
class TeacherStage:
    """Trains the tiny UNet as a plain text-to-image model: the teacher of the built-in default."""

    number = 0

    def __init__(self, config, components: Components, device, say):
        if components.source != "tiny":
            raise ValueError(
                "stage 0 trains the tiny built-in teacher; with --pretrained the pretrained UNet is "
                "the teacher: run --stage 1"
            )
        self.config, self.components, self.device = config, components, device
        self.unet = components.unet
        self.unet.train()
        say(f"stage 0: teacher UNet, {count(self.unet):,} parameters, all trained")

    def trained_module(self) -> nn.Module:
        return self.unet

    def trained_names(self) -> List[str]:
        return [n for n, p in unwrap(self.unet).named_parameters() if p.requires_grad]

    def enable_gradient_checkpointing(self) -> None:
        unwrap(self.unet).enable_gradient_checkpointing()

    def loss(self, model, batch: dict, generator: torch.Generator) -> Tuple[torch.Tensor, Dict[str, float]]:
        captions = drop_text(batch["captions"], self.config.text_dropout, generator)
        text = encode_prompts(self.components, captions, self.device)
        latents = encode_images(self.components, batch["pixel_values"].to(self.device), generator)
        noisy, t, _, target = noisy_inputs(self.components.noise_scheduler, latents, generator)
        prediction = model(noisy, t, encoder_hidden_states=text).sample
        loss = weighted_mse(
            prediction, target, timestep_weights(self.config, self.components.noise_scheduler, t)
        )
        return loss, {"loss": loss.item()}

    @torch.no_grad()
    def validate(self, samples: List[dict], step: int) -> Tuple[np.ndarray, Dict[str, float]]:
        pixels = torch.stack([s["pixel_values"] for s in samples])
        captions = [s["caption"] for s in samples]
        blank = torch.zeros(len(samples), 1, *pixels.shape[-2:], device=self.device)
        images = generate(
            self.components, self.unet, None, captions, blank, self.config, seed=self.config.seed
        )
        grid = image_grid([pixels_to_uint8(pixels)[:GRID_ROWS], images[:GRID_ROWS]], ["data", "teacher"])
        return grid, {}

    def save(self, folder: str) -> None:
        save_model_folder(self.components, self.unet, folder)


# --------------------------------------------------------------------------- stage 1
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


class DistillStage:
    """Stage I (section 2.2): SVD-initialised low-rank student distilled from the frozen teacher."""

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
            policy["param_budget"] = int(policy["param_budget"] * count(self.teacher))
        elif "param_budget" in policy:
            policy["param_budget"] = int(policy["param_budget"])
        self.student = copy.deepcopy(self.teacher)
        self.report = elr_ext.decompose(
            self.student, **policy, include=config.decompose_include, exclude=config.decompose_exclude
        )
        self.student.requires_grad_(True).train()
        say(f"stage 1: student = elr_ext.decompose(copy of teacher, {policy})")
        say(str(self.report))
        self.feature_weights = level_weights(config.feature_distillation, self.teacher)
        levels = {level for level, _ in self.feature_weights}
        self.teacher_features = FeatureRecorder(self.teacher, levels) if levels else None
        self.student_features = FeatureRecorder(self.student, levels) if levels else None
        if self.feature_weights:
            say(f"feature distillation on {sorted(self.feature_weights)}")
        say(f"teacher {count(self.teacher):,} parameters, student {count(self.student):,}")

    def trained_module(self) -> nn.Module:
        return self.student

    def trained_names(self) -> List[str]:
        return [n for n, p in unwrap(self.student).named_parameters() if p.requires_grad]

    def enable_gradient_checkpointing(self) -> None:
        unwrap(self.student).enable_gradient_checkpointing()

    def report_dict(self) -> dict:
        for attribute in ("to_dict", "as_dict"):
            if hasattr(self.report, attribute):
                return getattr(self.report, attribute)()
        return {"report": str(self.report)}

    def loss(self, model, batch: dict, generator: torch.Generator) -> Tuple[torch.Tensor, Dict[str, float]]:
        # No text dropout in Stage I: the student learns the teacher's conditional prediction.
        text = encode_prompts(self.components, batch["captions"], self.device)
        latents = encode_images(self.components, batch["pixel_values"].to(self.device), generator)
        scheduler = self.components.noise_scheduler
        noisy, t, _, target = noisy_inputs(scheduler, latents, generator)
        with torch.no_grad():
            teacher_out = self.teacher(
                noisy.to(self.teacher.dtype), t, encoder_hidden_states=text.to(self.teacher.dtype)
            ).sample
        teacher_feats = self.teacher_features.pop() if self.teacher_features else {}
        student_out = model(noisy, t, encoder_hidden_states=text).sample
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
        blank = torch.zeros(len(samples), 1, *pixels.shape[-2:], device=self.device)
        teacher = generate(
            self.components, self.teacher, None, captions, blank, self.config, seed=self.config.seed
        )
        student = generate(
            self.components, self.student, None, captions, blank, self.config, seed=self.config.seed
        )
        # distillation error on fixed noise and timesteps: comparable from one validation to the next
        g = torch.Generator().manual_seed(self.config.seed)
        text = encode_prompts(self.components, captions, self.device)
        latents = encode_images(self.components, pixels.to(self.device), g)
        noisy, t, _, _ = noisy_inputs(self.components.noise_scheduler, latents, g)
        unwrapped = unwrap(self.student)
        was_training = unwrapped.training
        unwrapped.eval()
        mse = F.mse_loss(
            unwrapped(noisy, t, encoder_hidden_states=text).sample.float(),
            self.teacher(
                noisy.to(self.teacher.dtype), t, encoder_hidden_states=text.to(self.teacher.dtype)
            ).sample.float(),
        )
        unwrapped.train(was_training)
        if self.teacher_features:  # the hooks fired during validation too
            self.teacher_features.pop(), self.student_features.pop()
        image_mse = float(np.mean((teacher.astype(np.float64) - student.astype(np.float64)) ** 2) / 255**2)
        grid = image_grid(
            [pixels_to_uint8(pixels)[:GRID_ROWS], teacher[:GRID_ROWS], student[:GRID_ROWS]],
            ["data", "teacher", "student"],
        )
        return grid, {"val/kd_mse": float(mse), "val/teacher_student_image_mse": image_mse}

    def save(self, folder: str) -> None:
        save_model_folder(self.components, self.student, folder, decomposed=True)


# --------------------------------------------------------------------------- stage 2
class ControlStage:
    """Stage II (section 2.4): the local control adapter on the frozen backbone."""

    number = 2

    def __init__(self, config, components: Components, device, say):
        from elr_ext.nn import LocalControlAdapter

        self.config, self.components, self.device = config, components, device
        self.unet = components.unet
        self.unet.requires_grad_(False).eval()
        self.types = list(config.condition_types)
        self.adapter = LocalControlAdapter.from_unet(
            self.unet,
            condition_channels=[CONDITION_CHANNELS[t] for t in self.types],
            adapter=config.adapter,
            terms=config.kron_terms,
            rank=config.kron_rank,
            factor=config.kron_factor,
            latent_factor=latent_factor_of(components),
        )
        self.adapter.train()
        self.dropout = ConditionDropout(
            drop_text=config.text_dropout,
            keep_all=config.keep_all_conditions,
            drop_all=config.drop_all_conditions,
            drop_each=config.drop_each_condition,
        )
        counts = self.adapter.parameter_counts()
        say(
            f"stage 2: LocalControlAdapter ({config.adapter}) on {self.types} "
            f"({condition_channels(self.types)} condition channels): {counts['trainable']:,} trainable of "
            f"{counts['total']:,}; backbone {count(self.unet):,} frozen"
        )
        self.parameter_counts = counts

    def trained_module(self) -> nn.Module:
        return self.adapter

    def trained_names(self) -> List[str]:
        return [n for n, _ in unwrap(self.adapter).named_trainable_parameters()]

    def enable_gradient_checkpointing(self) -> None:
        # Gradients flow through the frozen UNet's decoder into the residuals: checkpoint both.
        self.unet.enable_gradient_checkpointing()
        adapter = unwrap(self.adapter)
        if getattr(adapter, "_supports_gradient_checkpointing", False):
            adapter.enable_gradient_checkpointing()

    def loss(self, model, batch: dict, generator: torch.Generator) -> Tuple[torch.Tensor, Dict[str, float]]:
        captions, conditions = self.dropout(batch["captions"], batch["conditions"], self.types, generator)
        text = encode_prompts(self.components, captions, self.device)
        latents = encode_images(self.components, batch["pixel_values"].to(self.device), generator)
        scheduler = self.components.noise_scheduler
        noisy, t, _, target = noisy_inputs(scheduler, latents, generator)
        down, mid = model(noisy, t, text, conditions.to(self.device))
        dtype = self.unet.dtype
        prediction = self.unet(
            noisy.to(dtype),
            t,
            encoder_hidden_states=text.to(dtype),
            down_block_additional_residuals=[r.to(dtype) for r in down],
            mid_block_additional_residual=mid.to(dtype),
        ).sample
        loss = weighted_mse(prediction, target, timestep_weights(self.config, scheduler, t))
        return loss, {"loss": loss.item()}

    @torch.no_grad()
    def validate(self, samples: List[dict], step: int) -> Tuple[np.ndarray, Dict[str, float]]:
        """Generated from each trained condition type alone (all of them when there is one) and, from the
        same noise, by the same backbone without control; each condition's metric for both:
        edge NMSE and boundary F-score against the edge map (the canny condition, or Canny of the
        data image when no canny map is trained), segmentation IoU against the exact masks of the
        synthetic scenes when seg is trained."""
        from .evaluation import (
            condition_slice,
            mean_edge_f_score,
            mean_edge_nmse,
            mean_segmentation_iou,
            only,
            segment_like_reference,
        )

        pixels = torch.stack([s["pixel_values"] for s in samples])
        conditions = torch.stack([s["conditions"] for s in samples]).to(self.device)
        captions = [s["caption"] for s in samples]
        adapter = unwrap(self.adapter)
        was_training = adapter.training
        adapter.eval()

        def sample(condition, scale):
            return generate(
                self.components, self.unet, adapter, captions, condition, self.config, scale, seed=self.config.seed
            )

        controlled = {
            kind: sample(only(conditions, self.types, kind) if len(self.types) > 1 else conditions,
                         self.config.conditioning_scale)
            for kind in self.types
        }
        free = sample(conditions, 0.0)
        adapter.train(was_training)
        data = pixels_to_uint8(pixels)
        metrics: Dict[str, float] = {}
        edge_kind = "canny" if "canny" in self.types else self.types[0]
        if "canny" in self.types:
            start = condition_slice(self.types, "canny").start
            edges = [conditions[i, start].cpu().numpy() for i in range(len(samples))]
        else:
            edges = [canny_edges(image) for image in data]
        for name, images in (("control", controlled[edge_kind]), ("no_control", free)):
            metrics[f"val/edge_nmse_{name}"] = mean_edge_nmse(images, edges)["value"]
            metrics[f"val/edge_f_score_{name}"] = mean_edge_f_score(images, edges)["value"]
        metrics["val/edge_nmse_data"] = mean_edge_nmse(data, edges)["value"]
        if "seg" in self.types and all("mask" in s for s in samples):
            from .data.synthetic import NUM_CLASSES

            for name, images in (("control", controlled["seg"]), ("no_control", free)):
                pairs = [segment_like_reference(i, d, s["mask"]) for i, d, s in zip(images, data, samples)]
                metrics[f"val/seg_iou_{name}"] = mean_segmentation_iou(
                    [p for p, _ in pairs], [t for _, t in pairs], NUM_CLASSES
                )["value"]
        rows = slice(0, GRID_ROWS)  # the metrics use every validation sample, the picture the first few
        columns = [condition_to_uint8(conditions[rows], self.types)]
        columns += [controlled[kind][rows] for kind in self.types]
        titles = ["condition"] + (
            ["control"] if len(self.types) == 1 else [f"from {kind}" for kind in self.types]
        )
        grid = image_grid(columns + [free[rows], data[rows]], titles + ["no control", "data"])
        return grid, metrics

    def save(self, folder: str) -> None:
        import json

        os.makedirs(folder, exist_ok=True)
        unwrap(self.adapter).save_pretrained(os.path.join(folder, "adapter"), safe_serialization=True)
        with open(os.path.join(folder, "control.json"), "w") as f:
            json.dump(
                {
                    "backbone": self.components.source,
                    "condition_types": self.types,
                    "adapter": self.config.adapter,
                },
                f,
                indent=2,
            )


STAGES = {0: TeacherStage, 1: DistillStage, 2: ControlStage}

# (metric, words, lower is better) of the control-versus-no-control comparison of stage 2's validation.
CONTROL_METRICS = (
    ("edge_nmse", "edge NMSE", True),
    ("edge_f_score", "edge F-score", False),
    ("seg_iou", "segmentation IoU", False),
)


def control_verdict(metrics: Dict[str, float]) -> str:
    """In words, from stage 2's validation metrics (keys with or without 'val/' / 'validation_'): did
    the control help? One clause per metric with both values and the relative change."""
    def value(key):
        for prefix in ("val/", "validation_"):
            if metrics.get(prefix + key) is not None:
                return float(metrics[prefix + key])
        return None

    clauses, helped = [], []
    for key, words, lower in CONTROL_METRICS:
        with_control, without = value(f"{key}_control"), value(f"{key}_no_control")
        if with_control is None or without is None or not np.isfinite([with_control, without]).all():
            continue
        better = with_control < without if lower else with_control > without
        change = (with_control - without) / abs(without) if without else float("inf")
        helped.append(better)
        clauses.append(
            f"{words} {with_control:.3f} with control vs {without:.3f} without "
            f"({abs(change):.0%} {('lower' if change < 0 else 'higher')}, {'better' if better else 'worse'})"
        )
    if not clauses:
        return "no control metric was measured"
    if all(helped):
        head = "the control helped"
    elif not any(helped):
        head = "the control did not help"
    else:
        head = "the control helped on some metrics only"
    return f"{head}: " + "; ".join(clauses)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
