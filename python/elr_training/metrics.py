"""The metrics of the paper's section 3.2, in one place for training validation, evaluate.py and the
benchmarks: per image (edge NMSE, boundary F-score, segmentation IoU), over a set of samples (their
means, FID, CLIP score), and the control-versus-no-control verdict.

Every set-level metric is a dict: {"value": float, "available": True, ...details} when measured, or
{"value": None, "available": False, "reason": "..."} when it cannot be measured honestly here (no
weights given, package missing, too few samples). A metric that needs pretrained weights (Inception
for FID, CLIP for the CLIP scores) is never computed with random weights: without a local path it is
reported unavailable.

edge_nmse
    The paper extracts Canny edges from the generated image and measures the normalised mean squared
    error against the condition's edge map. Exactly:

        E_gen  = Canny(gray(generated), low, high) / 255        in {0, 1}, thresholds 100/200 by default
        E_cond = condition_edges scaled to [0, 1]                (binary maps in {0, 1} or {0, 255})
        NMSE   = mean((E_gen - E_cond)^2) / mean(E_cond^2)

    0 is a perfect match; an image with no edges at all scores exactly 1; edges in the wrong places
    score above 1. The ratio is undefined when the condition has no edges: NaN is returned then, so
    a data-set mean can skip it with nanmean instead of crashing.

edge_f_score
    The boundary F-measure of the Berkeley segmentation benchmark (BSDS; Martin, Fowlkes & Malik 2004),
    which forgives a small shift that NMSE counts twice (one missed and one spurious edge):

        match  = a one-to-one matching of generated edge pixels to condition edge pixels, each pair at
                 most `max_distance` pixels apart (Euclidean), with as many pairs as possible
        P = matched / generated edge pixels,  R = matched / condition edge pixels,  F = 2PR / (P + R)

    BSDS finds the matching with a min-cost assignment (correspondPixels); the number of matched pixels,
    which is all P and R use, is that of a maximum bipartite matching, computed here with
    Hopcroft-Karp (scipy). The default 1.5 px accepts a shift to any of the 8 neighbours. 1 is a
    perfect match; no generated edges give 0; NaN when the condition has no edges (as NMSE).

segmentation_iou
    Mean intersection over union over the classes present in either mask (a class absent from both
    says nothing about the prediction and is left out of the mean). Synthetic data: pred = every pixel
    of the generated image labelled with the class of the nearest palette colour (RGB distance), true
    = the exact mask. Real data: pred and true are the user's segmentation model run on the generated
    image and on the data set's image.

FID
    torchmetrics FrechetInceptionDistance (2048-d pool features, torch-fidelity's InceptionV3) with the
    weights file the user gives; real = the data set's images, generated = the model's, both uint8 RGB.

CLIP score
    torchmetrics CLIPScore with a local CLIP folder: 100 * max(cos(image, prompt), 0) averaged; reported
    / 100 (cosine, the scale of the paper's 0.82) and as Hessel et al.'s CLIP-S = 2.5 * that. The sketch
    CLIP score puts the sketch condition image in place of the prompt (image-image cosine).

Set-level means skip the samples where a metric is undefined (NaN: a condition without edges, an
empty mask) and say how many they skipped.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch

__all__ = [
    "edge_nmse", "edge_f_score", "edge_maps", "canny_edges", "segmentation_iou", "to_uint8_image",
    "measured", "unavailable", "mean_edge_nmse", "mean_edge_f_score", "mean_segmentation_iou",
    "palette_segmentation", "segment_like_reference", "frechet_inception_distance", "clip_score",
    "CONTROL_METRICS", "control_verdict",
]


def to_uint8_image(image, name: str = "image") -> np.ndarray:
    """An image as uint8 [H, W] or [H, W, C].

    Accepts numpy arrays, torch tensors and PIL images; [H, W], [H, W, C] or [C, H, W] with C in
    (1, 3, 4); uint8 as is, floats in [0, 1] (values outside are clipped), bool as {0, 255}.
    """
    if hasattr(image, "mode") and hasattr(image, "size"):  # PIL.Image without importing PIL here
        image = np.asarray(image)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
        image = np.moveaxis(image, 0, -1)  # CHW -> HWC
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
        raise ValueError(
            f"{name}: expected [H, W], [H, W, C] or [C, H, W] with C in (1, 3, 4), got shape "
            f"{tuple(image.shape)}"
        )
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.bool_:
        return image.astype(np.uint8) * 255
    if np.issubdtype(image.dtype, np.floating):
        return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    raise ValueError(f"{name}: expected uint8, bool or floats in [0, 1], got dtype {image.dtype}")


def canny_edges(image, low_threshold: int = 100, high_threshold: int = 200) -> np.ndarray:
    """Canny edges of an image (any form `to_uint8_image` accepts) as uint8 {0, 255} [H, W]."""
    import cv2  # OpenCV is needed only where edges are computed

    image = to_uint8_image(image)
    if image.ndim == 3:
        image = cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2GRAY)
    return cv2.Canny(np.ascontiguousarray(image), low_threshold, high_threshold)


def edge_maps(generated, condition_edges, low_threshold: int = 100, high_threshold: int = 200, name="edge_nmse"):
    """(Canny of the generated image, the condition's edge map), both float64 [H, W] in [0, 1]."""
    gen = canny_edges(generated, low_threshold, high_threshold).astype(np.float64) / 255.0
    cond = to_uint8_image(_as_map(condition_edges), "condition_edges")
    if cond.ndim == 3:  # an edge map stored as RGB: all channels carry the same map
        cond = cond[..., 0]
    cond = cond.astype(np.float64) / 255.0
    if gen.shape != cond.shape:
        raise ValueError(
            f"{name}: generated image is {gen.shape[0]}x{gen.shape[1]} but condition_edges is "
            f"{cond.shape[0]}x{cond.shape[1]}; resize one of them first"
        )
    return gen, cond


def edge_nmse(generated, condition_edges, low_threshold: int = 100, high_threshold: int = 200) -> float:
    """mean((Canny(generated) - edges)^2) / mean(edges^2), both maps in [0, 1]; NaN if the edges are empty.

    generated: the generated image (uint8, or floats in [0, 1]; HWC, CHW or HW; numpy, torch or PIL).
    condition_edges: the edge map it was conditioned on ({0, 1}, {0, 255} or floats in [0, 1]), same H, W.
    """
    gen, cond = edge_maps(generated, condition_edges, low_threshold, high_threshold, "edge_nmse")
    energy = float(np.mean(cond * cond))
    if energy == 0.0:
        return float("nan")
    return float(np.mean((gen - cond) ** 2) / energy)


def edge_f_score(
    generated,
    condition_edges,
    max_distance: float = 1.5,
    low_threshold: int = 100,
    high_threshold: int = 200,
    details: bool = False,
):
    """BSDS boundary F-score of Canny(generated) against the condition's edge map (module docstring).

    Edge pixels are the values >= 0.5 of either map. Returns F, or with `details=True` a dict with
    f_score, precision, recall, matched, generated_pixels and condition_pixels. NaN when the condition
    has no edge pixel; F = 0 when the generated image has none.
    """
    if not (max_distance >= 0 and np.isfinite(max_distance)):
        raise ValueError(f"edge_f_score: max_distance must be a finite number >= 0, got {max_distance!r}")
    gen, cond = edge_maps(generated, condition_edges, low_threshold, high_threshold, "edge_f_score")
    matched, n_gen, n_cond = match_edge_pixels(gen >= 0.5, cond >= 0.5, max_distance)
    if n_cond == 0:
        f = precision = recall = float("nan")
    elif n_gen == 0 or matched == 0:
        precision = 0.0 if n_gen else float("nan")
        recall, f = 0.0, 0.0
    else:
        precision, recall = matched / n_gen, matched / n_cond
        f = 2 * precision * recall / (precision + recall)
    if not details:
        return float(f)
    return {
        "f_score": float(f),
        "precision": float(precision),
        "recall": float(recall),
        "matched": int(matched),
        "generated_pixels": int(n_gen),
        "condition_pixels": int(n_cond),
    }


def match_edge_pixels(a: np.ndarray, b: np.ndarray, max_distance: float):
    """(pairs in a maximum one-to-one matching of the True pixels of `a` to those of `b` at most
    `max_distance` apart, pixels of a, pixels of b). Bool maps of one shape."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_bipartite_matching

    ya, xa = np.nonzero(a)
    yb, xb = np.nonzero(b)
    if len(ya) == 0 or len(yb) == 0:
        return 0, len(ya), len(yb)
    index_b = np.full(b.shape, -1, dtype=np.int64)
    index_b[yb, xb] = np.arange(len(yb))
    reach = int(np.floor(max_distance))
    rows, cols = [], []
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            if dy * dy + dx * dx > max_distance * max_distance:
                continue
            y, x = ya + dy, xa + dx
            inside = (y >= 0) & (y < b.shape[0]) & (x >= 0) & (x < b.shape[1])
            j = np.full(len(ya), -1, dtype=np.int64)
            j[inside] = index_b[y[inside], x[inside]]
            hit = j >= 0
            rows.append(np.nonzero(hit)[0])
            cols.append(j[hit])
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    graph = csr_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(len(ya), len(yb)))
    match = maximum_bipartite_matching(graph, perm_type="column")
    return int(np.count_nonzero(match >= 0)), len(ya), len(yb)


def _as_map(edges):
    """Edge maps given as 0/1 integers are scaled to 0/255 so that `to_uint8_image` reads them right."""
    if isinstance(edges, torch.Tensor):
        edges = edges.detach().cpu().numpy()
    edges = np.asarray(edges)
    if np.issubdtype(edges.dtype, np.integer) and edges.dtype != np.uint8:
        edges = edges.astype(np.int64)
        if edges.max(initial=0) <= 1:
            edges = edges * 255
        edges = np.clip(edges, 0, 255).astype(np.uint8)
    elif edges.dtype == np.uint8 and edges.max(initial=0) <= 1:
        edges = edges * np.uint8(255)
    return edges


def segmentation_iou(pred_mask, true_mask, num_classes: int, ignore_index: int | None = None) -> float:
    """Mean IoU over the classes present in either mask. Masks: integer class ids [H, W] (numpy or torch).

    Pixels where `true_mask == ignore_index` are left out. Ids must lie in [0, num_classes).
    """
    pred = np.asarray(pred_mask.detach().cpu() if isinstance(pred_mask, torch.Tensor) else pred_mask)
    true = np.asarray(true_mask.detach().cpu() if isinstance(true_mask, torch.Tensor) else true_mask)
    if pred.shape != true.shape:
        raise ValueError(f"segmentation_iou: pred_mask has shape {pred.shape} but true_mask has {true.shape}")
    if not (np.issubdtype(pred.dtype, np.integer) and np.issubdtype(true.dtype, np.integer)):
        raise ValueError(
            f"segmentation_iou: masks must hold integer class ids, got {pred.dtype} and {true.dtype}"
        )
    if num_classes < 1:
        raise ValueError(f"segmentation_iou: num_classes must be >= 1, got {num_classes}")
    keep = np.ones(true.shape, dtype=bool) if ignore_index is None else true != ignore_index
    pred, true = pred[keep].astype(np.int64), true[keep].astype(np.int64)
    for name, mask in (("pred_mask", pred), ("true_mask", true)):
        if mask.size and (mask.min() < 0 or mask.max() >= num_classes):
            raise ValueError(
                f"segmentation_iou: {name} holds ids outside [0, {num_classes}): "
                f"min {mask.min()}, max {mask.max()}"
            )
    if true.size == 0:
        return float("nan")
    # Confusion counts in one bincount: row = true class, column = predicted class.
    confusion = np.bincount(true * num_classes + pred, minlength=num_classes * num_classes)
    confusion = confusion.reshape(num_classes, num_classes)
    intersection = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
    present = union > 0
    return float(np.mean(intersection[present] / union[present]))


# ----------------------------------------------------------------------------------------------
# Over a set of samples: every metric a dict {"value", "available", ...details}


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


def mean_over_samples(values: Sequence[float], empty_reason: str, **details) -> dict:
    """The mean of per-sample values, those that are NaN (undefined for that sample) left out and
    counted; unavailable (with `empty_reason`) when every one is NaN."""
    defined = [v for v in values if not math.isnan(v)]
    if not defined:
        return unavailable(empty_reason, num_samples=len(values))
    return measured(float(np.mean(defined)), num_samples=len(defined), skipped_empty=len(values) - len(defined),
                    std=float(np.std(defined)), **details, per_sample=[float(v) for v in values])


def _check_pairs(name: str, generated: Sequence, references: Sequence, what: str) -> None:
    if len(generated) != len(references):
        raise ValueError(f"{name}: {len(generated)} generated images but {len(references)} {what}")


def mean_edge_nmse(generated: Sequence, condition_edges: Sequence, low_threshold: int = 100,
                   high_threshold: int = 200) -> dict:
    """Mean edge NMSE over the samples whose condition has edges (see the module docstring)."""
    _check_pairs("mean_edge_nmse", generated, condition_edges, "edge maps")
    values = [edge_nmse(g, e, low_threshold, high_threshold) for g, e in zip(generated, condition_edges)]
    return mean_over_samples(values, "no condition edge map has any edge pixel",
                             canny_thresholds=[low_threshold, high_threshold])


def mean_edge_f_score(generated: Sequence, condition_edges: Sequence, max_distance: float = 1.5,
                      low_threshold: int = 100, high_threshold: int = 200) -> dict:
    """Mean BSDS boundary F-score (tolerance `max_distance` px) over the samples whose condition has edges."""
    _check_pairs("mean_edge_f_score", generated, condition_edges, "edge maps")
    values = [edge_f_score(g, e, max_distance, low_threshold, high_threshold) for g, e in zip(generated, condition_edges)]
    return mean_over_samples(values, "no condition edge map has any edge pixel", max_distance_px=max_distance,
                             canny_thresholds=[low_threshold, high_threshold])


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
    return mean_over_samples(values, "every true mask is empty (all pixels ignored)", num_classes=num_classes)


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
