"""Evaluation of a controllable text-to-image model: the samples, generation per condition type, every
metric of elr_training.metrics over them, and the paper's table layouts (Tables 1 to 3).
python/evaluate.py and benchmarks/controllability.py are the scripts around this library; training
validation (elr_training.stages) uses its `control_metrics` too.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from .data.conditions import CONDITION_CHANNELS
from .metrics import (
    canny_edges,
    clip_score,
    frechet_inception_distance,
    mean_edge_f_score,
    mean_edge_nmse,
    mean_segmentation_iou,
    segment_like_reference,
    unavailable,
)
from .run_folder import ControlModel
from .sampling import generate, map_to_uint8, pixels_to_uint8

__all__ = [
    "evaluation_samples", "condition_slice", "only", "generate_images", "control_metrics",
    "evaluate_model", "table2_markdown", "table1_markdown", "format_value",
]


# ----------------------------------------------------------------------------------------------
# The samples, their condition maps, generation


def evaluation_samples(condition_types: Sequence[str], num_samples: int, resolution: int, data: str = "synthetic",
                       data_format: str = "auto", seed: int = 0, max_shapes: int = 2,
                       segmentation_model: Optional[str] = None, caption_column: str = "text") -> List[dict]:
    """Samples with {"image" uint8 [H, W, 3], "caption", "conditions" [C, H, W] in [0, 1], "mask" (synthetic)}.

    The validation set train.py would build for these settings: on synthetic data the held-out scenes
    (seed + VALIDATION_SEED_OFFSET, never trained on); on other data the first `num_samples` readable
    samples, read with the training application's formats and condition maps."""
    from .config import ControlConfig, make_config
    from .data import ConditionMaker, ConditionSettings, build_validation_set

    config, _ = make_config(ControlConfig, dict(
        stage=2, condition_types=list(condition_types), data=data, data_format=data_format, resolution=resolution,
        num_validation_images=num_samples, train_batch_size=1, dataloader_num_workers=0, seed=seed,
        synthetic_size=num_samples, synthetic_max_shapes=max_shapes, caption_column=caption_column,
        segmentation_model=segmentation_model))
    maker = ConditionMaker(list(condition_types), ConditionSettings(segmentation_model=segmentation_model))
    samples = build_validation_set(config, maker)
    for sample in samples:
        sample["image"] = pixels_to_uint8(sample["pixel_values"][None])[0]
    return samples


def condition_slice(condition_types: Sequence[str], kind: str) -> slice:
    """The channels of condition `kind` in the concatenated condition tensor."""
    start = sum(CONDITION_CHANNELS[t] for t in condition_types[:list(condition_types).index(kind)])
    return slice(start, start + CONDITION_CHANNELS[kind])


def only(conditions: torch.Tensor, condition_types: Sequence[str], kind: str) -> torch.Tensor:
    """The condition batch with every map but `kind` zeroed (a dropped condition in training)."""
    kept = torch.zeros_like(conditions)
    s = condition_slice(condition_types, kind)
    kept[:, s] = conditions[:, s]
    return kept


def generate_images(model: ControlModel, samples: List[dict], kind: Optional[str], steps: int,
                    guidance_scale: float, conditioning_scale: float, seed: int, batch_size: int = 8,
                    device: str = "cpu") -> List[np.ndarray]:
    """One image per sample with ELRControlPipeline (DDIM), the condition `kind` alone (None: all
    conditions; no condition at all when the model has no adapter); the noise of sample i is drawn
    from seed + i, so every model sees the same noise."""
    images = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        conditions = torch.stack([s["conditions"] for s in chunk]).to(device)
        if kind is not None:
            conditions = only(conditions, model.condition_types, kind)
        images.extend(generate(model.components, model.components.unet, model.adapter, [s["caption"] for s in chunk],
                               conditions, steps, guidance_scale, conditioning_scale, seed=seed + start,
                               size=conditions.shape[-2:]))
    return images


# ----------------------------------------------------------------------------------------------
# Every metric of a model's generations


def data_images(samples: Sequence[dict]) -> List[np.ndarray]:
    """The samples' own images as uint8 [H, W, 3]."""
    return [s["image"] if "image" in s else pixels_to_uint8(s["pixel_values"][None])[0] for s in samples]


def control_metrics(generated: Dict[str, Sequence], samples: Sequence[dict], condition_types: Sequence[str],
                    segmentation_model: Optional[str] = None, edges_from_data: bool = False) -> Dict[str, dict]:
    """The controllability metrics of images generated per condition type (`generated[kind]`: the
    images drawn from that map alone, one per sample):

      edge_nmse, edge_f_score  the images from the canny map against that map; with
                               edges_from_data and no canny condition, the images of the first type
                               against Canny of the data image instead
      edge_nmse_data           the data images against the same edges (0 on synthetic scenes)
      segmentation_iou         the images from the seg map: on synthetic scenes nearest palette colour
                               against the exact mask; on other data `segmentation_model` run on the
                               generated and on the data image"""
    types = list(condition_types)
    data = data_images(samples)
    metrics: Dict[str, dict] = {}
    if "canny" in types:
        edges = [s["conditions"][condition_slice(types, "canny")][0].cpu().numpy() for s in samples]
        edge_images = generated["canny"]
    elif edges_from_data:
        edges, edge_images = [canny_edges(image) for image in data], generated[types[0]]
    else:
        edges = edge_images = None
    if edges is None:
        metrics["edge_nmse"] = metrics["edge_f_score"] = unavailable("the adapter takes no canny condition")
    else:
        metrics["edge_nmse"] = mean_edge_nmse(edge_images, edges)
        metrics["edge_f_score"] = mean_edge_f_score(edge_images, edges)
        metrics["edge_nmse_data"] = mean_edge_nmse(data, edges)

    synthetic = all("mask" in s for s in samples)
    if "seg" in types and synthetic:
        from .data.synthetic import NUM_CLASSES

        pairs = [segment_like_reference(g, d, s["mask"]) for g, d, s in zip(generated["seg"], data, samples)]
        metrics["segmentation_iou"] = mean_segmentation_iou([p for p, _ in pairs], [t for _, t in pairs], NUM_CLASSES)
        metrics["segmentation_iou"]["method"] = "nearest palette colour of the data image's classes, exact mask"
    elif "seg" in types and segmentation_model:
        from .data.conditions import SegmentationModel

        segment = SegmentationModel(segmentation_model)
        metrics["segmentation_iou"] = mean_segmentation_iou([segment.class_ids(g) for g in generated["seg"]],
                                                            [segment.class_ids(d) for d in data], segment.num_classes)
        metrics["segmentation_iou"]["method"] = f"{segmentation_model} on the generated vs the data image"
    elif "seg" in types:
        metrics["segmentation_iou"] = unavailable("real data needs --segmentation-model (a local transformers "
                                                  "semantic-segmentation folder) to segment the generated images")
    else:
        metrics["segmentation_iou"] = unavailable("the adapter takes no seg condition")
    return metrics


def evaluate_model(model: ControlModel, samples: List[dict], steps: int = 20, guidance_scale: float = 2.0,
                   conditioning_scale: float = 1.0, seed: int = 0, inception_weights: Optional[str] = None,
                   clip_model: Optional[str] = None, segmentation_model: Optional[str] = None,
                   device: str = "cpu", say: Callable = print) -> tuple:
    """Generate once per condition type (that map alone) and measure everything the section 3.2 of
    the paper names. Returns (metrics, generated {kind: images})."""
    types = model.condition_types
    generated: Dict[str, List[np.ndarray]] = {}
    for kind in types:
        if model.adapter is None and generated:  # without control the condition changes nothing
            generated[kind] = generated[types[0]]
            continue
        started = time.perf_counter()
        generated[kind] = generate_images(model, samples, kind if len(types) > 1 else None, steps, guidance_scale,
                                          conditioning_scale, seed, device=device)
        say(f"generated {len(samples)} images from the {kind} condition in {time.perf_counter() - started:.1f} s")
    metrics: Dict[str, object] = {"num_samples": len(samples), "condition_types": list(types)}
    metrics.update(control_metrics(generated, samples, types, segmentation_model))
    data = data_images(samples)
    if all("mask" in s for s in samples):  # the layout agreement of every generation, whatever map drove it
        from .data.synthetic import NUM_CLASSES

        metrics["segmentation_iou_by_condition"] = {}
        for kind, images in generated.items():
            pairs = [segment_like_reference(g, d, s["mask"]) for g, d, s in zip(images, data, samples)]
            metrics["segmentation_iou_by_condition"][kind] = mean_segmentation_iou(
                [p for p, _ in pairs], [t for _, t in pairs], NUM_CLASSES)["value"]

    # image quality over every generated image; CLIP scores
    distinct = {id(images): images for images in generated.values()}.values()
    everything = [image for images in distinct for image in images]
    captions = [s["caption"] for _ in distinct for s in samples]
    metrics["fid"] = frechet_inception_distance(data, everything, inception_weights)
    metrics["clip_score"] = clip_score(everything, captions, clip_model)
    if "sketch" in types:
        sketches = [map_to_uint8(s["conditions"][condition_slice(types, "sketch")]) for s in samples]
        metrics["sketch_clip_score"] = clip_score(generated["sketch"], sketches, clip_model)
    else:
        metrics["sketch_clip_score"] = unavailable("the adapter takes no sketch condition")
    return metrics, generated


# ----------------------------------------------------------------------------------------------
# Markdown tables


def format_value(metric, digits: int = 3) -> str:
    """A table cell: the value, 'n/a' for an unavailable metric, '-' for none at all."""
    if metric is None:
        return "-"
    if isinstance(metric, dict):
        if not metric.get("available", True) or metric.get("value") is None:
            return "n/a"
        metric = metric["value"]
    if isinstance(metric, str):
        return metric
    if isinstance(metric, int) or (isinstance(metric, float) and metric.is_integer() and abs(metric) >= 1000):
        return _count(int(metric))
    return f"{metric:.{digits}f}"


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if abs(n) >= 1e6 else f"{n / 1e3:.1f}K" if abs(n) >= 1e3 else str(n)


def _reasons(columns: Dict[str, dict], keys: Sequence[str]) -> List[str]:
    """Footnotes: why each n/a cell is unavailable (one line per distinct metric and reason)."""
    notes: Dict[str, List[str]] = {}  # reason -> metrics
    for metrics in columns.values():
        for key in keys:
            m = metrics.get(key)
            if isinstance(m, dict) and not m.get("available", True):
                named = notes.setdefault(m.get("reason", ""), [])
                if key not in named:
                    named.append(key)
    return [f"- n/a {', '.join(keys)}: {reason}" for reason, keys in notes.items()]


# (section, label, key, lower_is_better) as in the paper's Table 2; Table 3 is the same rows with
# "Image Quality" split out and a delta column.
TABLE2_ROWS = [
    ("Efficiency", "Memory Cost ↓", "peak_memory", True),
    ("Efficiency", "# Params. ↓ (trainable)", "trainable_params", True),
    ("Efficiency", "# Params. (total)", "total_params", True),
    ("Efficiency", "Training Time ↓ (s/it)", "seconds_per_iteration", True),
    ("Image Quality", "FID ↓", "fid", True),
    ("Image Quality", "CLIP Score ↑ (prompt, cosine)", "clip_score", False),
    ("Controllability", "Sketch Maps (CLIP Score ↑)", "sketch_clip_score", False),
    ("Controllability", "Edge Maps (NMSE ↓)", "edge_nmse", True),
    ("Controllability", "Edge Maps (boundary F ↑, 1.5 px)", "edge_f_score", False),
    ("Controllability", "Segmentation Maps (IoU ↑)", "segmentation_iou", False),
]


def _memory_cell(value) -> str:
    if isinstance(value, dict) and value.get("available", True) and value.get("value") is not None:
        value = value["value"]
    if isinstance(value, (int, float)):
        return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.1f} MiB"
    return format_value(value)


def table2_markdown(columns: Dict[str, dict], delta: Optional[tuple] = None, title: str = "") -> str:
    """Markdown laid out like the paper's Tables 2 and 3: rows grouped Efficiency / Image Quality /
    Controllability, one column per method (name -> {key: metric}); `delta=(a, b)` adds a column
    b - a (Table 3's delta). Rows absent from every column are left out."""
    names = list(columns)
    keys = [row for row in TABLE2_ROWS if any(columns[n].get(row[2]) is not None for n in names)]
    head = ["", "Metric"] + names + (["Δ (" + delta[1] + " − " + delta[0] + ")"] if delta else [])
    lines = ([f"**{title}**", ""] if title else []) + ["| " + " | ".join(head) + " |",
                                                       "|" + "---|" * len(head)]
    previous = None
    for section, label, key, _ in keys:
        cells = [section if section != previous else "", label]
        previous = section
        for n in names:
            value = columns[n].get(key)
            cells.append(_memory_cell(value) if key == "peak_memory" else format_value(value))
        if delta:
            a, b = (columns[d].get(key) for d in delta)
            va = a.get("value") if isinstance(a, dict) else a
            vb = b.get("value") if isinstance(b, dict) else b
            if isinstance(va, (int, float)) and isinstance(vb, (int, float)):
                diff = vb - va
                cells.append(_memory_cell(diff) if key == "peak_memory" and abs(diff) >= 2**20
                             else _count(int(diff)) if key.endswith("params") else f"{diff:+.3f}")
            else:
                cells.append("-")
        lines.append("| " + " | ".join(cells) + " |")
    notes = _reasons(columns, [row[2] for row in keys])
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def table1_markdown(rows: Dict[str, dict], title: str = "") -> str:
    """Markdown laid out like the paper's Table 1: one row per model, FID / CLIP score / # params."""
    lines = ([f"**{title}**", ""] if title else []) + [
        "| Methods | FID ↓ | CLIP Score ↑ | # Parameters ↓ | denoising MSE ↓ |", "|---|---|---|---|---|"]
    for name, metrics in rows.items():
        lines.append(f"| {name} | {format_value(metrics.get('fid'))} | {format_value(metrics.get('clip_score'))} | "
                     f"{format_value(metrics.get('total_params'))} | {format_value(metrics.get('denoising_mse'), 4)} |")
    notes = _reasons(rows, ["fid", "clip_score", "denoising_mse"])
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"
