"""Evaluation of a controllable text-to-image model: the paper's metrics (section 3.2), its table
layouts (Tables 1 to 3) and an image grid. python/evaluate.py is the script around this library.

Every metric is a dict: {"value": float, "available": True, ...details} when measured, or
{"value": None, "available": False, "reason": "..."} when it cannot be measured honestly here
(no weights given, package missing, too few samples). A metric that needs pretrained weights
(Inception for FID, CLIP for the CLIP scores) is never computed with random weights: without a
local path it is reported unavailable.

Definitions (what each number means exactly):

edge NMSE      per sample, elr_training.metrics.edge_nmse: Canny(gray(generated), 100, 200) in {0, 1}
               against the condition's edge map in {0, 1}; NMSE = mean((E_gen - E_cond)^2) /
               mean(E_cond^2), i.e. (missed + spurious edge pixels) / (condition edge pixels).
               0 is a perfect match, an image without edges scores 1. Reported: the mean over
               samples whose condition has edges.
edge F-score   per sample, elr_training.metrics.edge_f_score: the BSDS boundary F-measure of the same two
               maps, edge pixels matched one to one within 1.5 px (a one-pixel shift in any direction
               is a match, not a miss plus a spurious edge); F = 2PR / (P + R), 1 is a perfect match.
seg IoU        per sample, elr_training.metrics.segmentation_iou: mean over the classes present in
               either mask of |pred & true| / |pred | true|. Synthetic data: pred = every pixel of the
               generated image labelled with the class of the nearest palette colour (RGB distance),
               true = the exact mask. Real data: pred and true are the user's segmentation model run
               on the generated image and on the data set's image. Reported: the mean over samples.
FID            torchmetrics FrechetInceptionDistance (2048-d pool features, torch-fidelity's
               InceptionV3) with the weights file the user gives; real = the data set's images,
               generated = the model's, both uint8 RGB.
CLIP score     torchmetrics CLIPScore with a local CLIP folder: 100 * max(cos(image, prompt), 0)
               averaged; we report it / 100 (cosine, the scale of the paper's 0.82) and Hessel et
               al.'s CLIP-S = 2.5 * that (the paper's footnote links jmhessel/clipscore).
sketch CLIP    the same with the sketch condition image in place of the prompt (image-image cosine).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from .metrics import edge_f_score, edge_nmse, segmentation_iou, to_uint8_image

__all__ = [
    "measured", "unavailable", "frechet_inception_distance", "clip_score", "palette_segmentation",
    "mean_edge_nmse", "mean_edge_f_score", "mean_segmentation_iou", "image_grid", "table2_markdown", "table1_markdown",
    "format_value",
]


def measured(value: float, **details) -> dict:
    return {"value": float(value), "available": True, **details}


def unavailable(reason: str, **details) -> dict:
    return {"value": None, "available": False, "reason": reason, **details}


def _as_uint8_batch(images: Sequence) -> torch.Tensor:
    """Images (anything to_uint8_image reads, RGB) as a uint8 tensor [N, 3, H, W]."""
    arrays = []
    for i, image in enumerate(images):
        array = to_uint8_image(image, f"images[{i}]")
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=-1)
        arrays.append(torch.from_numpy(np.array(array[..., :3])).permute(2, 0, 1))  # a copy: PIL arrays are read-only
    return torch.stack(arrays)


# ----------------------------------------------------------------------------------------------
# Controllability: edge NMSE and segmentation IoU (definitions in elr_training.metrics)


def mean_edge_nmse(generated: Sequence, condition_edges: Sequence, low_threshold: int = 100,
                   high_threshold: int = 200) -> dict:
    """Mean edge NMSE over the samples whose condition has edges (see the module docstring)."""
    if len(generated) != len(condition_edges):
        raise ValueError(f"mean_edge_nmse: {len(generated)} generated images but {len(condition_edges)} edge maps")
    values = [edge_nmse(g, e, low_threshold, high_threshold) for g, e in zip(generated, condition_edges)]
    defined = [v for v in values if not math.isnan(v)]
    if not defined:
        return unavailable("no condition edge map has any edge pixel", num_samples=len(values))
    return measured(float(np.mean(defined)), num_samples=len(defined), skipped_empty=len(values) - len(defined),
                    std=float(np.std(defined)), canny_thresholds=[low_threshold, high_threshold],
                    per_sample=[float(v) for v in values])


def mean_edge_f_score(generated: Sequence, condition_edges: Sequence, max_distance: float = 1.5,
                      low_threshold: int = 100, high_threshold: int = 200) -> dict:
    """Mean BSDS boundary F-score (tolerance `max_distance` px) over the samples whose condition has edges."""
    if len(generated) != len(condition_edges):
        raise ValueError(f"mean_edge_f_score: {len(generated)} generated images but {len(condition_edges)} edge maps")
    values = [edge_f_score(g, e, max_distance, low_threshold, high_threshold) for g, e in zip(generated, condition_edges)]
    defined = [v for v in values if not math.isnan(v)]
    if not defined:
        return unavailable("no condition edge map has any edge pixel", num_samples=len(values))
    return measured(float(np.mean(defined)), num_samples=len(defined), skipped_empty=len(values) - len(defined),
                    std=float(np.std(defined)), max_distance_px=max_distance,
                    canny_thresholds=[low_threshold, high_threshold], per_sample=[float(v) for v in values])


def palette_segmentation(image, palette) -> np.ndarray:
    """Label every pixel with the index of the nearest palette colour (Euclidean in RGB).

    image: RGB image (anything to_uint8_image reads); palette: [K, 3] colours (uint8 or 0..255).
    Returns int64 class ids [H, W]."""
    rgb = to_uint8_image(image, "image")
    if rgb.ndim != 3:
        raise ValueError(f"palette_segmentation: image must be RGB, got shape {rgb.shape}")
    colours = np.asarray(palette, dtype=np.float64)
    if colours.ndim != 2 or colours.shape[1] != 3:
        raise ValueError(f"palette_segmentation: palette must be [K, 3], got shape {colours.shape}")
    pixels = rgb[..., :3].reshape(-1, 3).astype(np.float64)
    distances = ((pixels[:, None, :] - colours[None, :, :]) ** 2).sum(-1)
    return distances.argmin(1).reshape(rgb.shape[:2])


def segment_like_reference(generated, reference_image, true_mask) -> tuple:
    """(pred, true) class masks for the synthetic scenes, whose classes are flat colours.

    The palette is read off the data: the median colour of the reference image over each class of
    the exact mask. Every pixel of the generated image gets the class of the nearest palette colour.
    Two classes painted the same colour (a red circle and a red square) cannot be told apart by
    colour: they are merged into one class in both masks for this sample."""
    image = to_uint8_image(reference_image, "reference_image")[..., :3]
    mask = np.asarray(true_mask.detach().cpu() if isinstance(true_mask, torch.Tensor) else true_mask).astype(np.int64)
    if image.shape[:2] != mask.shape:
        raise ValueError(f"segment_like_reference: reference image {image.shape[:2]} and mask {mask.shape} differ")
    first_of_colour, to_merged = {}, np.arange(mask.max() + 1)
    for c in np.unique(mask):
        colour = tuple(int(v) for v in np.median(image[mask == c], axis=0))
        to_merged[c] = first_of_colour.setdefault(colour, int(c))
    classes, colours = list(first_of_colour.values()), list(first_of_colour)
    pred = np.asarray(classes)[palette_segmentation(generated, np.asarray(colours))]
    if pred.shape != mask.shape:
        raise ValueError(f"segment_like_reference: generated image is {pred.shape}, mask is {mask.shape}")
    return pred, to_merged[mask]


def mean_segmentation_iou(pred_masks: Sequence, true_masks: Sequence, num_classes: int,
                          ignore_index: Optional[int] = None) -> dict:
    """Mean over samples of the per-sample mean IoU over classes (see the module docstring)."""
    if len(pred_masks) != len(true_masks):
        raise ValueError(f"mean_segmentation_iou: {len(pred_masks)} predicted masks but {len(true_masks)} true masks")
    values = [segmentation_iou(p, t, num_classes, ignore_index) for p, t in zip(pred_masks, true_masks)]
    defined = [v for v in values if not math.isnan(v)]
    if not defined:
        return unavailable("every true mask is empty (all pixels ignored)", num_samples=len(values))
    return measured(float(np.mean(defined)), num_samples=len(defined), std=float(np.std(defined)),
                    num_classes=num_classes, per_sample=[float(v) for v in values])


# ----------------------------------------------------------------------------------------------
# Image quality: FID and CLIP score, only with real weights


def frechet_inception_distance(real_images: Sequence, generated_images: Sequence,
                               inception_weights: Optional[str], batch_size: int = 16) -> dict:
    """FID between two image sets with torchmetrics (torch-fidelity's InceptionV3, 2048-d features).

    inception_weights: path to torch-fidelity's weight file (pt_inception-2015-12-05, the FID
    reference network); None -> unavailable, never random weights and never a download."""
    if not inception_weights:
        return unavailable("no Inception weights given (--inception-weights PATH to torch-fidelity's "
                           "pt_inception-2015-12-05 .pth); FID needs the reference network")
    if not os.path.isfile(inception_weights):
        return unavailable(f"Inception weights file not found: {inception_weights}")
    if min(len(real_images), len(generated_images)) < 2:
        return unavailable(f"FID needs at least 2 real and 2 generated images, got {len(real_images)} and "
                           f"{len(generated_images)}")
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as exc:
        return unavailable(f"torchmetrics / torch-fidelity not installed ({exc}); pip install torchmetrics torch-fidelity")
    try:
        fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=inception_weights)
    except ModuleNotFoundError as exc:
        return unavailable(f"torch-fidelity not installed ({exc}); pip install torch-fidelity")
    for images, real in ((real_images, True), (generated_images, False)):
        for start in range(0, len(images), batch_size):
            fid.update(_as_uint8_batch(images[start:start + batch_size]), real=real)
    value = float(fid.compute())
    n = min(len(real_images), len(generated_images))
    note = None
    if n < 2048:  # fewer samples than feature dimensions: the covariances are rank-deficient
        note = f"{n} samples < 2048 feature dims: FID is biased upwards; compare only runs with the same count"
    return measured(value, num_real=len(real_images), num_generated=len(generated_images),
                    weights=os.path.abspath(inception_weights), note=note)


class _ProjectedFeatures(torch.nn.Module):
    """CLIPModel whose get_image_features / get_text_features return the projected embeddings as
    tensors. torchmetrics 1.9 expects tensors there; transformers 5 returns an output object whose
    pooler_output holds them."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs):
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def _clip_loader(clip_model: str) -> Callable:
    def load():
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(clip_model, local_files_only=True).eval()
        return _ProjectedFeatures(model), CLIPProcessor.from_pretrained(clip_model, local_files_only=True)
    return load


def clip_score(images: Sequence, targets: Sequence, clip_model: Optional[str], batch_size: int = 16) -> dict:
    """CLIP score of images against prompts (str) or against images (the sketch score), with
    torchmetrics CLIPScore and a local CLIP folder (CLIPModel + CLIPProcessor files).

    value: mean max(cos, 0) in [0, 1]; clip_s_hessel: 2.5 * value; torchmetrics_score: 100 * value."""
    if not clip_model:
        return unavailable("no CLIP model given (--clip-model DIR, a local CLIP folder such as "
                           "openai/clip-vit-large-patch14 saved with save_pretrained)")
    if not os.path.isdir(clip_model):
        return unavailable(f"CLIP model folder not found: {clip_model}")
    if len(images) != len(targets) or not images:
        raise ValueError(f"clip_score: need as many targets as images (>= 1), got {len(images)} and {len(targets)}")
    try:
        from torchmetrics.multimodal.clip_score import CLIPScore
    except ImportError as exc:
        return unavailable(f"torchmetrics not installed ({exc}); pip install torchmetrics")
    metric = CLIPScore(model_name_or_path=_clip_loader(clip_model))
    against_text = isinstance(targets[0], str)
    for start in range(0, len(images), batch_size):
        batch = list(_as_uint8_batch(images[start:start + batch_size]))
        chunk = targets[start:start + batch_size]
        metric.update(batch, list(chunk) if against_text else list(_as_uint8_batch(chunk)))
    score = float(metric.compute())  # torchmetrics: mean of 100 * max(cos, 0)
    return measured(score / 100.0, clip_s_hessel=2.5 * score / 100.0, torchmetrics_score=score,
                    num_samples=len(images), against="prompt" if against_text else "image",
                    model=os.path.abspath(clip_model))


# ----------------------------------------------------------------------------------------------
# The model to evaluate, the samples, generation and every metric


@dataclass
class ControlModel:
    """What evaluate.py generates with: the backbone's parts, the adapter (None: no control) and
    the condition types the adapter takes, in its channel order."""

    components: object  # elr_training.models.Components
    adapter: Optional[torch.nn.Module]
    condition_types: List[str]
    description: dict = field(default_factory=dict)


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _existing(path: Optional[str], *relative_to: str) -> Optional[str]:
    """`path` as given, or relative to one of the folders (run folders store paths as typed at training)."""
    if path is None or os.path.exists(path):
        return path
    for folder in relative_to:
        candidate = os.path.join(folder, path)
        if os.path.exists(candidate):
            return candidate
    return path


def load_control_model(run: Optional[str] = None, adapter: Optional[str] = None, checkpoint: Optional[str] = None,
                       backbone: Optional[str] = None, condition_types: Optional[Sequence[str]] = None,
                       no_control: bool = False, device: str = "cpu") -> ControlModel:
    """The model as train.py leaves it.

    run: a stage-2 run folder (model/adapter/ from save_pretrained, model/control.json naming the
      backbone and the condition types). adapter: an adapter folder itself (control.json is looked
      for beside it). checkpoint: checkpoints/checkpoint-<step>/ of a run: its model.safetensors (the
      trained tensors by name) is loaded into the adapter of the run it belongs to (or --adapter).
    backbone: the frozen model folder (default: the one control.json names; "tiny" is not a
      backbone: a trained run is). no_control: the backbone alone (the "no control" row)."""
    from .models import load_components, resolve_model_folder

    run_dir = run
    if checkpoint and not run_dir and not adapter:
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))  # run/checkpoints/checkpoint-N
    adapter_dir = adapter or (os.path.join(run_dir, "model", "adapter") if run_dir else None)
    control = {}
    for folder in filter(None, [adapter_dir and os.path.dirname(os.path.abspath(adapter_dir)),
                                run_dir and os.path.join(run_dir, "model")]):
        if os.path.isfile(os.path.join(folder, "control.json")):
            control = _read_json(os.path.join(folder, "control.json"))
            break
    base = [os.path.dirname(os.path.abspath(run_dir))] if run_dir else []
    backbone = _existing(backbone or control.get("backbone"), *base, os.getcwd())
    if not backbone or not os.path.isdir(backbone):
        raise FileNotFoundError(f"no backbone: give --backbone (a model folder or a stage-1 run); control.json "
                                f"names {control.get('backbone')!r}")
    components = load_components(resolve_model_folder(backbone), "--backbone")
    types = list(condition_types or control.get("condition_types") or [])
    description = {"backbone": os.path.abspath(backbone), "adapter": None, "checkpoint": None}
    if no_control:
        components.unet.to(device).eval()
        components.text_encoder.to(device).eval()
        return ControlModel(components, None, types or ["canny"], {**description, "control": "none"})

    from elr_ext.nn import LocalControlAdapter

    if not adapter_dir or not os.path.isdir(adapter_dir):
        raise FileNotFoundError(f"no adapter: give --run (a stage-2 run folder), --adapter (its model/adapter) or "
                                f"--checkpoint inside a run; looked for {adapter_dir!r}")
    if not types:
        raise ValueError("the condition types are unknown (no control.json beside the adapter): give --condition-types")
    model = LocalControlAdapter.from_pretrained(adapter_dir)
    description.update(adapter=os.path.abspath(adapter_dir), adapter_kind=model.config.adapter)
    if checkpoint:
        from .checkpoint import load_trained_weights

        load_trained_weights(model, checkpoint)
        description["checkpoint"] = os.path.abspath(checkpoint)
    components.unet.to(device).eval()
    components.text_encoder.to(device).eval()
    if components.vae is not None:
        components.vae.to(device).eval()
    model.to(device).eval()
    return ControlModel(components, model, types, description)


def evaluation_samples(condition_types: Sequence[str], num_samples: int, resolution: int, data: str = "synthetic",
                       data_format: str = "auto", seed: int = 0, max_shapes: int = 2,
                       segmentation_model: Optional[str] = None, caption_column: str = "text") -> List[dict]:
    """Samples with {"image" uint8 [H, W, 3], "caption", "conditions" [C, H, W] in [0, 1], "mask" (synthetic)}.

    Synthetic: the validation split of train.py (scenes of seed + VALIDATION_SEED_OFFSET, never
    trained on). Other data: the first `num_samples` readable samples of the data set, read with the
    training application's formats and condition maps."""
    from types import SimpleNamespace

    from .data import VALIDATION_SEED_OFFSET, ConditionMaker, ConditionSettings, build_validation_set
    from .data.formats import SampleTransform
    from .data.synthetic import SyntheticScenes

    maker = ConditionMaker(list(condition_types), ConditionSettings(segmentation_model=segmentation_model))
    if data == "synthetic" or data_format == "synthetic":
        scenes = SyntheticScenes(num_samples, resolution, seed + VALIDATION_SEED_OFFSET, max_shapes)
        transform = SampleTransform(resolution, maker)
        samples = [transform(scenes[i]) for i in range(num_samples)]
    else:
        config = SimpleNamespace(data=data, data_format=data_format, resolution=resolution,
                                 num_validation_images=num_samples, train_batch_size=1, dataloader_num_workers=0,
                                 seed=seed, synthetic_size=num_samples, synthetic_max_shapes=max_shapes,
                                 caption_column=caption_column)
        samples = build_validation_set(config, maker)
    for sample in samples:
        sample["image"] = ((sample["pixel_values"].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    return samples


def condition_slice(condition_types: Sequence[str], kind: str) -> slice:
    from .data.conditions import CONDITION_CHANNELS

    start = sum(CONDITION_CHANNELS[t] for t in condition_types[:list(condition_types).index(kind)])
    return slice(start, start + CONDITION_CHANNELS[kind])


def only(conditions: torch.Tensor, condition_types: Sequence[str], kind: str) -> torch.Tensor:
    """The condition batch with every map but `kind` zeroed (a dropped condition in training)."""
    kept = torch.zeros_like(conditions)
    s = condition_slice(condition_types, kind)
    kept[:, s] = conditions[:, s]
    return kept


def map_to_uint8(condition_map: torch.Tensor) -> np.ndarray:
    """A condition map [C, H, W] in [0, 1] as uint8 RGB [H, W, 3] (one-channel maps as grey)."""
    array = (condition_map.clamp(0, 1) * 255).round().byte().cpu().numpy()
    return np.repeat(array, 3, axis=0).transpose(1, 2, 0) if array.shape[0] == 1 else array.transpose(1, 2, 0)


def segmentation_ids(folder: str):
    """A function image -> class ids [H, W] from a local transformers segmentation model."""
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    model = AutoModelForSemanticSegmentation.from_pretrained(folder, local_files_only=True).eval()

    @torch.no_grad()
    def segment(image: np.ndarray) -> np.ndarray:
        logits = model(**processor(images=image, return_tensors="pt")).logits
        logits = torch.nn.functional.interpolate(logits, size=image.shape[:2], mode="bilinear", align_corners=False)
        return logits.argmax(1)[0].numpy()
    segment.num_classes = model.config.num_labels
    return segment


def generate_images(model: ControlModel, samples: List[dict], kind: Optional[str], steps: int,
                    guidance_scale: float, conditioning_scale: float, seed: int, batch_size: int = 8,
                    device: str = "cpu") -> List[np.ndarray]:
    """One image per sample with ELRControlPipeline (DDIM), the condition `kind` alone (None: all
    conditions); the noise of sample i is drawn from seed + i, so every model sees the same noise."""
    from types import SimpleNamespace

    from .stages import generate

    settings = SimpleNamespace(num_inference_steps=steps, guidance_scale=guidance_scale)
    images = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        conditions = torch.stack([s["conditions"] for s in chunk]).to(device)
        if kind is not None:
            conditions = only(conditions, model.condition_types, kind)
        images.extend(generate(model.components, model.components.unet, model.adapter, [s["caption"] for s in chunk],
                               conditions, settings, conditioning_scale, seed=seed + start))
    return images


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
    data_images = [s["image"] for s in samples]
    synthetic = all("mask" in s for s in samples)
    metrics: Dict[str, object] = {"num_samples": len(samples), "condition_types": list(types)}

    # edge NMSE: images generated from the edge map, against that map
    if "canny" in types:
        edges = [s["conditions"][condition_slice(types, "canny")][0].numpy() for s in samples]
        metrics["edge_nmse"] = mean_edge_nmse(generated["canny"], edges)
        metrics["edge_nmse_data"] = mean_edge_nmse(data_images, edges)  # the data's own score (0 on synthetic)
        metrics["edge_f_score"] = mean_edge_f_score(generated["canny"], edges)
    else:
        metrics["edge_nmse"] = unavailable("the adapter takes no canny condition")
        metrics["edge_f_score"] = unavailable("the adapter takes no canny condition")

    # segmentation IoU: images generated from the segmentation map
    if "seg" in types and synthetic:
        pairs = [segment_like_reference(g, s["image"], s["mask"]) for g, s in zip(generated["seg"], samples)]
        from .data.synthetic import NUM_CLASSES

        metrics["segmentation_iou"] = mean_segmentation_iou([p for p, _ in pairs], [t for _, t in pairs], NUM_CLASSES)
        metrics["segmentation_iou"]["method"] = "nearest palette colour of the data image's classes, exact mask"
    elif "seg" in types and segmentation_model:
        segment = segmentation_ids(segmentation_model)
        metrics["segmentation_iou"] = mean_segmentation_iou([segment(g) for g in generated["seg"]],
                                                            [segment(d) for d in data_images], segment.num_classes)
        metrics["segmentation_iou"]["method"] = f"{segmentation_model} on the generated vs the data image"
    elif "seg" in types:
        metrics["segmentation_iou"] = unavailable("real data needs --segmentation-model (a local transformers "
                                                  "semantic-segmentation folder) to segment the generated images")
    else:
        metrics["segmentation_iou"] = unavailable("the adapter takes no seg condition")
    if synthetic:  # the layout agreement of every generation, whatever map drove it
        metrics["segmentation_iou_by_condition"] = {}
        for kind, images in generated.items():
            pairs = [segment_like_reference(g, s["image"], s["mask"]) for g, s in zip(images, samples)]
            from .data.synthetic import NUM_CLASSES

            metrics["segmentation_iou_by_condition"][kind] = mean_segmentation_iou(
                [p for p, _ in pairs], [t for _, t in pairs], NUM_CLASSES)["value"]

    # image quality over every generated image; CLIP scores
    distinct = {id(images): images for images in generated.values()}.values()
    everything = [image for images in distinct for image in images]
    captions = [s["caption"] for _ in distinct for s in samples]
    metrics["fid"] = frechet_inception_distance(data_images, everything, inception_weights)
    metrics["clip_score"] = clip_score(everything, captions, clip_model)
    if "sketch" in types:
        sketches = [map_to_uint8(s["conditions"][condition_slice(types, "sketch")]) for s in samples]
        metrics["sketch_clip_score"] = clip_score(generated["sketch"], sketches, clip_model)
    else:
        metrics["sketch_clip_score"] = unavailable("the adapter takes no sketch condition")
    return metrics, generated


# ----------------------------------------------------------------------------------------------
# Outputs: image grid, markdown tables


def image_grid(columns: Dict[str, Sequence], cell: int = 128, max_rows: int = 8):
    """A PIL image: one column per entry of `columns` (title -> images), one row per sample."""
    from PIL import Image, ImageDraw

    titles = list(columns)
    rows = min(max_rows, min(len(v) for v in columns.values()))
    header = 16
    grid = Image.new("RGB", (cell * len(titles), header + cell * rows), "white")
    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(titles):
        draw.text((c * cell + 4, 2), title[: cell // 7], fill="black")
        for r in range(rows):
            array = to_uint8_image(columns[title][r], f"{title}[{r}]")
            image = Image.fromarray(array if array.ndim == 2 else array[..., :3])
            grid.paste(image.convert("RGB").resize((cell, cell), Image.NEAREST), (c * cell, header + r * cell))
    return grid


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
