"""The training application's data, conditions and metrics (python/elr_training)."""

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))

from elr_training.metrics import canny_edges, edge_nmse, segmentation_iou  # noqa: E402


def _square_image(size=32, lo=20, hi=220):
    image = np.full((size, size, 3), lo, np.uint8)
    image[8:24, 10:22] = hi
    return image


def test_edge_nmse_zero_on_own_edges_one_on_blank_image():
    image = _square_image()
    edges = canny_edges(image)
    assert edges.any()
    assert edge_nmse(image, edges) == 0.0
    assert edge_nmse(image, (edges > 0).astype(np.int64)) == 0.0  # {0, 1} maps are read as such
    assert edge_nmse(np.full_like(image, 90), edges) == 1.0  # no edges at all: every target pixel missed
    # floats in [0, 1] and CHW tensors are the same image
    chw = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    assert edge_nmse(chw, edges) == 0.0


def test_edge_nmse_counts_misses_and_false_edges():
    image = _square_image()
    edges = (canny_edges(image) > 0).astype(np.float64)
    shifted = np.roll(image, 3, axis=1)  # same square 3 px to the right: a few edges overlap
    gen = (canny_edges(shifted) > 0).astype(np.float64)
    expected = np.mean((gen - edges) ** 2) / np.mean(edges ** 2)
    assert edge_nmse(shifted, edges) == pytest.approx(expected)
    assert expected > 1.0
    assert np.isnan(edge_nmse(image, np.zeros((32, 32), np.uint8)))
    with pytest.raises(ValueError, match="condition_edges is 16x16"):
        edge_nmse(image, np.zeros((16, 16), np.uint8))


def test_segmentation_iou_by_hand():
    true = np.array([[0, 0, 1, 1], [0, 0, 1, 1]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 1, 2]])
    # class 0: inter 3, union 4; class 1: inter 3, union 5; class 2: inter 0, union 1; class 3 absent
    assert segmentation_iou(pred, true, num_classes=4) == pytest.approx((3 / 4 + 3 / 5 + 0) / 3)
    assert segmentation_iou(true, true, num_classes=2) == 1.0
    assert segmentation_iou(torch.from_numpy(pred), torch.from_numpy(true), 4) == pytest.approx(0.45)
    with pytest.raises(ValueError, match="pred_mask holds ids outside"):
        segmentation_iou(pred, true, num_classes=2)
    ignored = true.copy()
    ignored[:, 1] = 255
    # column 1 left out: class 0 inter 2 union 2, class 1 inter 3 union 4, class 2 inter 0 union 1
    assert segmentation_iou(pred, ignored, num_classes=4, ignore_index=255) == pytest.approx((1 + 3 / 4 + 0) / 3)
