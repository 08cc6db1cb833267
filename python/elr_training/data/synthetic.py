"""Procedural scenes for the built-in default run: coloured shapes on a plain background.

Every scene is a pure function of (seed, index): one to `max_shapes` shapes of four kinds (circle,
square, triangle, cross), eight colours, random positions and sizes that do not overlap, on one of
five background colours, with

- a caption ("a small red circle and a large blue square on a white background"),
- the exact segmentation mask (class 0 = background, 1 + kind for each shape; drawn with the same
  primitives as the image, so the two agree pixel for pixel),
- the edge map: Canny (100/200) of the rendered image. The scene is drawn without anti-aliasing or
  noise, so Canny finds exactly the shape outlines; it is also precisely what the edge NMSE metric
  extracts from a perfect regeneration, which makes the metric 0 on the data itself.

Shape and background colours differ by at least `MIN_GRAY_CONTRAST` grey levels, so every outline
is a strong Canny edge (a step of d grey levels gives a Sobel response of 4d > 200).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

SHAPE_KINDS = ("circle", "square", "triangle", "cross")
NUM_CLASSES = 1 + len(SHAPE_KINDS)  # background + one class per kind

COLOURS = {
    "red": (220, 30, 30),
    "green": (40, 180, 60),
    "blue": (40, 70, 230),
    "yellow": (245, 220, 40),
    "orange": (250, 140, 20),
    "purple": (140, 50, 180),
    "pink": (250, 150, 200),
    "white": (250, 250, 250),
}
BACKGROUNDS = {
    "black": (10, 10, 10),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "dark blue": (20, 30, 90),
    "light green": (170, 230, 170),
}
# The words "dark blue" and "light green" are two caption words each, both in the tiny vocabulary.

# Colours that segmentation condition maps use for each class (background black).
CLASS_COLOURS = np.array([(0, 0, 0), (255, 60, 60), (60, 255, 60), (60, 60, 255), (255, 255, 60)], np.uint8)

MIN_GRAY_CONTRAST = 55


def gray(rgb) -> float:
    """ITU-R 601 luma, the weights OpenCV's RGB2GRAY uses before Canny."""
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b


def render_scene(seed: int, index: int, resolution: int = 32, max_shapes: int = 2):
    """(image uint8 [H, W, 3], mask uint8 [H, W], caption str) of scene `index` of the set `seed`."""
    rng = np.random.default_rng([seed, index])
    background_name = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    background = BACKGROUNDS[background_name]
    image = Image.new("RGB", (resolution, resolution), background)
    mask = Image.new("L", (resolution, resolution), 0)
    draw_image, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)

    colours = [c for c in COLOURS if abs(gray(COLOURS[c]) - gray(background)) >= MIN_GRAY_CONTRAST]
    boxes, phrases = [], []
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        kind = int(rng.integers(len(SHAPE_KINDS)))
        colour = colours[rng.integers(len(colours))]
        large = bool(rng.integers(2))
        # Radius in pixels: small 15-22 %, large 25-33 % of the image side, whatever the resolution.
        low, high = (0.25, 0.33) if large else (0.15, 0.22)
        radius = max(3, int(round(resolution * rng.uniform(low, high))))
        for _attempt in range(30):  # rejection sampling: shapes never overlap, so the mask is exact
            cx, cy = (int(v) for v in rng.integers(radius + 1, resolution - radius - 1, size=2))
            box = (cx - radius - 1, cy - radius - 1, cx + radius + 1, cy + radius + 1)
            if all(box[2] < b[0] or b[2] < box[0] or box[3] < b[1] or b[3] < box[1] for b in boxes):
                break
        else:
            continue
        boxes.append(box)
        for draw, fill in ((draw_image, COLOURS[colour]), (draw_mask, 1 + kind)):
            _draw_shape(draw, SHAPE_KINDS[kind], cx, cy, radius, fill)
        phrases.append(f"a {'large' if large else 'small'} {colour} {SHAPE_KINDS[kind]}")
    caption = " and ".join(phrases) + f" on a {background_name} background"
    return np.asarray(image), np.asarray(mask), caption


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: int, cy: int, r: int, fill) -> None:
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == "square":
        s = int(round(r * 0.85))
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif kind == "cross":
        w = max(1, r // 3)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape kind {kind!r}; known: {SHAPE_KINDS}")


def colourise_mask(mask: np.ndarray) -> np.ndarray:
    """A class-id mask as the colour-coded RGB map segmentation conditions are given as."""
    return CLASS_COLOURS[np.asarray(mask)]


class SyntheticScenes(Dataset):
    """`size` scenes of the set `seed` as samples: {"image": uint8 [H, W, 3], "caption", "mask",
    "conditions_given": {"seg": colour map}}; edge and sketch maps are computed by the caller's
    condition pipeline from the clean image (data/conditions.py), as for any other data."""

    num_classes = NUM_CLASSES

    def __init__(self, size: int = 2048, resolution: int = 32, seed: int = 0, max_shapes: int = 2):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if resolution < 16:
            raise ValueError(f"resolution must be >= 16 for the shapes to fit, got {resolution}")
        self.size, self.resolution, self.seed, self.max_shapes = size, resolution, seed, max_shapes

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(index)
        image, mask, caption = render_scene(self.seed, index, self.resolution, self.max_shapes)
        return {
            "image": image,
            "caption": caption,
            "mask": mask,
            "conditions_given": {"seg": colourise_mask(mask)},
            "key": f"synthetic-{self.seed}-{index}",
        }
