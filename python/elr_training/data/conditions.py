"""Condition maps (canny, sketch, segmentation) and Uni-ControlNet's condition dropout.

Each condition type is a fixed number of channels in [0, 1]; several types are concatenated on the
channel axis in the order given (the order is part of a trained adapter's contract):

    canny   1 channel   OpenCV Canny, thresholds 100/200 by default, on the image at training size
    sketch  1 channel   XDoG (Winnemoeller et al. 2012, "XDoG: an eXtended difference-of-Gaussians"),
                        a learning-free line drawing: S = (1 + p) G_sigma - p G_{k sigma} on the grey
                        image in [0, 1], T = 1 where S >= eps else 1 + tanh(phi (S - eps)); lines = 1 - T
    seg     3 channels  a colour-coded segmentation map: read from the data when given, else predicted
                        by a segmentation model the user points to (--segmentation-model, a local
                        transformers folder); the synthetic scenes carry their exact masks

Maps given with the data are read as they are (resized to the training size); missing maps are
computed from the image after it was resized, so the thresholds act on what the model sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

CONDITION_CHANNELS = {"canny": 1, "sketch": 1, "seg": 3}


def condition_channels(types: Sequence[str]) -> int:
    check_condition_types(types)
    return sum(CONDITION_CHANNELS[t] for t in types)


def check_condition_types(types: Sequence[str]) -> None:
    if not types:
        raise ValueError(f"condition_types must name at least one of {sorted(CONDITION_CHANNELS)}")
    unknown = [t for t in types if t not in CONDITION_CHANNELS]
    if unknown:
        raise ValueError(f"condition_types: unknown {unknown}; known: {sorted(CONDITION_CHANNELS)}")
    if len(set(types)) != len(types):
        raise ValueError(f"condition_types: {list(types)} names a type twice")


@dataclass
class ConditionSettings:
    canny_low_threshold: int = 100
    canny_high_threshold: int = 200
    xdog_sigma: float = 0.8
    xdog_k: float = 1.6
    xdog_p: float = 20.0
    xdog_eps: float = 0.1
    xdog_phi: float = 10.0
    segmentation_model: Optional[str] = None  # local transformers folder (AutoModelForSemanticSegmentation)


def canny_map(image: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> float32 [1, H, W] in {0, 1}: the edges the edge metrics measure against."""
    from ..metrics import canny_edges

    return (canny_edges(image, low, high) > 0).astype(np.float32)[None]


def xdog_map(image: np.ndarray, sigma=0.8, k=1.6, p=20.0, eps=0.1, phi=10.0) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> float32 [1, H, W] in [0, 1], lines = 1 (XDoG, see the module docstring)."""
    import cv2

    grey = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    sharpened = (1 + p) * cv2.GaussianBlur(grey, (0, 0), sigma) - p * cv2.GaussianBlur(
        grey, (0, 0), sigma * k
    )
    tone = np.where(sharpened >= eps, 1.0, 1.0 + np.tanh(phi * (sharpened - eps)))
    return (1.0 - tone).astype(np.float32)[None]


def given_map(kind: str, image: np.ndarray) -> np.ndarray:
    """A condition read from the data (uint8 [H, W] or [H, W, 3]) as float32 [C, H, W] in [0, 1]."""
    image = np.asarray(image)
    if CONDITION_CHANNELS[kind] == 1:
        if image.ndim == 3:
            image = image[..., :3].max(axis=-1)  # lines stored as RGB or as white-on-black either way
        return (image.astype(np.float32) / 255.0)[None]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.moveaxis(image[..., :3].astype(np.float32) / 255.0, -1, 0)


class SegmentationModel:
    """A local semantic-segmentation model (transformers AutoModelForSemanticSegmentation folder):
    `class_ids(image)` gives its argmax classes [H, W] (what the IoU metric compares), calling it gives
    them colour-coded like the given masks (the seg condition). Loaded once per data worker."""

    def __init__(self, folder: str):
        import os

        if not os.path.isdir(folder):
            raise FileNotFoundError(f"--segmentation-model {folder}: no such folder")
        from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

        self.processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        self.model = AutoModelForSemanticSegmentation.from_pretrained(folder, local_files_only=True).eval()
        rng = np.random.default_rng(0)
        self.palette = rng.integers(0, 256, size=(max(self.model.config.num_labels, 1), 3)).astype(np.uint8)

    @property
    def num_classes(self) -> int:
        return self.model.config.num_labels

    @torch.no_grad()
    def class_ids(self, image: np.ndarray) -> np.ndarray:
        inputs = self.processor(images=image, return_tensors="pt")
        logits = self.model(**inputs).logits
        logits = torch.nn.functional.interpolate(
            logits, size=image.shape[:2], mode="bilinear", align_corners=False
        )
        return logits.argmax(1)[0].numpy()

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self.palette[self.class_ids(image)]


class ConditionMaker:
    """Builds the concatenated condition tensor of one sample from its image and given maps."""

    def __init__(self, types: Sequence[str], settings: ConditionSettings = ConditionSettings()):
        check_condition_types(types)
        self.types, self.settings = list(types), settings
        self._segmenter = None

    @property
    def channels(self) -> int:
        return condition_channels(self.types)

    def __call__(self, image: np.ndarray, given: dict) -> np.ndarray:
        s = self.settings
        maps = []
        for kind in self.types:
            if kind in given and given[kind] is not None:
                maps.append(given_map(kind, given[kind]))
            elif kind == "canny":
                maps.append(canny_map(image, s.canny_low_threshold, s.canny_high_threshold))
            elif kind == "sketch":
                maps.append(xdog_map(image, s.xdog_sigma, s.xdog_k, s.xdog_p, s.xdog_eps, s.xdog_phi))
            elif kind == "seg":
                if s.segmentation_model is None:
                    raise MissingCondition(
                        "this sample has no segmentation map and no --segmentation-model was given"
                    )
                if self._segmenter is None:
                    self._segmenter = SegmentationModel(s.segmentation_model)
                maps.append(given_map("seg", self._segmenter(image)))
        return np.concatenate(maps, axis=0)


class MissingCondition(ValueError):
    """A condition the sample lacks and that cannot be computed; the sample is skipped and counted."""


@dataclass
class ConditionDropout:
    """Uni-ControlNet's dropout (src/train/util.py keep_and_drop): the caption is emptied with
    probability drop_text; then, with one draw, all conditions are kept (keep_all), all zeroed
    (drop_all), or each zeroed on its own with probability drop_each. Stage 1 uses no dropout.

    With a single condition type, "each" is that one condition, and Uni-ControlNet's rule would drop it
    in drop_all + (1 - keep_all - drop_all) * drop_each of the steps (half of them with the defaults):
    there the condition is dropped with drop_all only. Measured on the tiny default (canny, lr 3e-3,
    one backbone): edge NMSE with control 1.76 (400 steps, Uni-ControlNet's rule) -> 1.44 (300 steps,
    this rule), against 1.69 without control; config.py lists the other levers."""

    drop_text: float = 0.5
    keep_all: float = 0.1
    drop_all: float = 0.1
    drop_each: float = 0.5

    def __post_init__(self):
        for name in ("drop_text", "keep_all", "drop_all", "drop_each"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"condition dropout {name} must be in [0, 1], got {value}")
        if self.keep_all + self.drop_all > 1.0:
            raise ValueError(f"keep_all + drop_all must be <= 1, got {self.keep_all} + {self.drop_all}")

    def __call__(
        self, captions: list, conditions: torch.Tensor, types: Sequence[str], generator: torch.Generator
    ):
        """Returns (captions, conditions) with dropout applied per sample. `generator` makes the draws
        reproducible (the training loop seeds it from the step, so a resumed run draws the same)."""
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        n = len(captions)
        # The draws and the decisions on them are real values even while elr_ext.plan traces the step
        # on fake tensors: which captions and conditions are dropped is decided here, on the CPU.
        with unset_fake_temporarily():
            u_text, u_mode = torch.rand(n, generator=generator), torch.rand(n, generator=generator)
            u_each = torch.rand(n, len(types), generator=generator)
            captions = ["" if u_text[i] < self.drop_text else c for i, c in enumerate(captions)]
            keep = torch.ones(n, len(types), dtype=torch.bool)
            drop_all = (u_mode >= self.keep_all) & (u_mode < self.keep_all + self.drop_all)
            each = u_mode >= self.keep_all + self.drop_all
            keep[drop_all] = False
            if len(types) > 1:  # one condition: dropped with drop_all only (see the class docstring)
                keep[each] = u_each[each] >= self.drop_each
            channel_keep = torch.cat(
                [keep[:, i : i + 1].expand(n, CONDITION_CHANNELS[t]) for i, t in enumerate(types)], 1
            )
        return captions, conditions * channel_keep[:, :, None, None].to(conditions.dtype)
