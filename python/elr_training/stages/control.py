"""Stage 2 (the paper's Stage II): the local control adapter on the frozen backbone (kron: ELR's
Kronecker x low-rank copy of the encoder; full: the Uni-ControlNet-style dense copy).

    L = w(lambda_t) ||eps - eps(x_t, t, text, adapter(x_t, t, text, c))||^2
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from elr_ext.nn import count_parameters

from ..data import ConditionDropout, condition_channels, load_validation_pairs
from ..data.conditions import CONDITION_CHANNELS
from ..evaluation import control_metrics, only
from ..losses import noisy_inputs, timestep_weights, weighted_mse
from ..metrics import control_verdict
from ..models import Components, encode_batch_images, encode_prompts, latent_factor_of, unwrap
from ..run_folder import save_control_model
from ..sampling import condition_to_uint8, generate, image_grid, pixels_to_uint8
from .base import Stage

# validation metric name -> the key of evaluation.control_metrics it reports
VALIDATION_METRICS = {"edge_nmse": "edge_nmse", "edge_f_score": "edge_f_score", "seg_iou": "segmentation_iou"}


class ControlStage(Stage):
    number = 2
    needs_vae_encoder = False  # validation samples and decodes; the saved model is the adapter alone

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
        self.parameter_counts = self.adapter.parameter_counts()
        self.pairs = load_validation_pairs(config)  # --validation-image / --validation-prompt
        if self.pairs:
            say(f"validation pairs: {len(self.pairs)} (--validation-image), sampled at every validation into "
                "samples/pairs-step-N.png")
        say(
            f"stage 2: LocalControlAdapter ({config.adapter}) on {self.types} "
            f"({condition_channels(self.types)} condition channels): {self.parameter_counts['trainable']:,} "
            f"trainable of {self.parameter_counts['total']:,}; backbone {count_parameters(self.unet):,} frozen"
        )

    def trained_module(self) -> nn.Module:
        return self.adapter

    def trained_names(self) -> List[str]:
        return [n for n, _ in unwrap(self.adapter).named_trainable_parameters()]

    def frozen_modules(self) -> List[nn.Module]:
        return [self.unet]

    def compile_frozen(self) -> None:
        self.unet = torch.compile(self.unet)

    def enable_gradient_checkpointing(self) -> None:
        # Gradients flow through the frozen UNet's decoder into the residuals: checkpoint both.
        unwrap(self.unet).enable_gradient_checkpointing()
        adapter = unwrap(self.adapter)
        if getattr(adapter, "_supports_gradient_checkpointing", False):
            adapter.enable_gradient_checkpointing()

    def loss(self, model, batch: dict, generator: torch.Generator) -> Tuple[torch.Tensor, Dict[str, float]]:
        captions, conditions = self.dropout(batch["captions"], batch["conditions"], self.types, generator)
        text = encode_prompts(self.components, captions, self.device, batch)
        latents = encode_batch_images(self.components, batch, self.device, generator)
        scheduler = self.components.noise_scheduler
        noisy, t, _, target = noisy_inputs(scheduler, latents, generator)
        down, mid = model(noisy, t, text.states, conditions.to(self.device), added_cond_kwargs=text.added)
        dtype = self.unet.dtype
        prediction = self.unet(
            noisy.to(dtype),
            t,
            **text.to(dtype).unet_kwargs(),
            down_block_additional_residuals=[r.to(dtype) for r in down],
            mid_block_additional_residual=mid.to(dtype),
        ).sample
        loss = weighted_mse(prediction, target, timestep_weights(self.config, scheduler, t))
        return loss, {"loss": loss.item()}

    @torch.no_grad()
    def validate(self, samples: List[dict], step: int) -> Tuple[Dict[str, np.ndarray], Dict[str, float]]:
        """Generated from each trained condition type alone (all of them when there is one) and, from the
        same noise, by the backbone alone; evaluation.control_metrics of both: edge NMSE and boundary
        F-score against the edge map (the canny condition, or Canny of the data image when no canny map
        is trained), segmentation IoU against the exact masks of the synthetic scenes when seg is trained.
        Pictures: "grid" (the held-out scenes) and, with --validation-image, "pairs" (each user condition
        image, with control and without; the metrics are the held-out scenes' only)."""
        pixels = torch.stack([s["pixel_values"] for s in samples])
        conditions = torch.stack([s["conditions"] for s in samples]).to(self.device)
        captions = [s["caption"] for s in samples]
        adapter = unwrap(self.adapter)
        was_training = adapter.training
        adapter.eval()

        def sample(adapter_or_none, condition):
            return generate(
                self.components, self.unet, adapter_or_none, captions, condition, self.config.num_inference_steps,
                self.config.guidance_scale, self.config.conditioning_scale, seed=self.config.seed,
                size=pixels.shape[-2:],
            )

        controlled = {
            kind: sample(adapter, only(conditions, self.types, kind) if len(self.types) > 1 else conditions)
            for kind in self.types
        }
        free = sample(None, None)
        pictures = {}
        if self.pairs:
            pairs = torch.stack([p["conditions"] for p in self.pairs]).to(self.device)
            prompts = [p["caption"] for p in self.pairs]
            pictures["pairs"] = image_grid({
                "your condition": condition_to_uint8(pairs, self.types),
                "control": generate(self.components, self.unet, adapter, prompts, pairs,
                                    self.config.num_inference_steps, self.config.guidance_scale,
                                    self.config.conditioning_scale, seed=self.config.seed),
                "no control": generate(self.components, self.unet, None, prompts, None,
                                       self.config.num_inference_steps, self.config.guidance_scale,
                                       seed=self.config.seed, size=pairs.shape[-2:]),
            }, max_rows=len(self.pairs))
        adapter.train(was_training)
        measured = {
            "control": control_metrics(controlled, samples, self.types, edges_from_data=True),
            "no_control": control_metrics({kind: free for kind in self.types}, samples, self.types,
                                          edges_from_data=True),
        }
        metrics: Dict[str, float] = {}
        for name, key in VALIDATION_METRICS.items():
            for arm, values in measured.items():
                if values[key]["available"] or name.startswith("edge"):
                    metrics[f"val/{name}_{arm}"] = values[key]["value"]
        metrics["val/edge_nmse_data"] = measured["control"]["edge_nmse_data"]["value"]

        columns = {"condition": condition_to_uint8(conditions, self.types)}
        for kind in self.types:
            columns["control" if len(self.types) == 1 else f"from {kind}"] = controlled[kind]
        columns.update({"no control": free, "data": pixels_to_uint8(pixels)})
        return {"grid": image_grid(columns), **pictures}, metrics

    def save(self, folder: str) -> None:
        save_control_model(folder, unwrap(self.adapter), self.components.source, self.types, self.config.adapter)

    def report(self, validation_metrics: Dict[str, float]) -> dict:
        return {"adapter_parameters": self.parameter_counts, "control_verdict": self.verdict(validation_metrics)}

    def verdict(self, validation_metrics: Dict[str, float]) -> Optional[str]:
        return control_verdict(validation_metrics)
