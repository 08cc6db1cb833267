"""Controllability metrics of the paper (section 3.2), shared by training validation and evaluate.py.

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
    says nothing about the prediction and is left out of the mean).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["edge_nmse", "edge_f_score", "edge_maps", "canny_edges", "segmentation_iou", "to_uint8_image"]


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
