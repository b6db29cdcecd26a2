"""A small generated task where attention must find a few tiny objects (tests and the in-memory demo).

Each image is a noisy empty canvas holding `n_objects` small glyphs of one class: horizontal bars (class 0) or
vertical bars (class 1). Both glyphs light the same number of pixels, so after 8x mean downsampling they are the
same blob: the class is unreadable at low resolution and must be read from full-resolution patches, while the blobs
themselves are easy to find. With K = (size/8)^2 cells and objects covering a handful, uniform sampling rarely
sees an object; attention sampling learns to look at them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class BarsTask:
    size: int = 192
    glyph: int = 12
    n_objects: int = 3
    noise: int = 40  # background pixels uniform in [0, noise]
    seed: int = 0


def glyph(cls: int, size: int) -> np.ndarray:
    """Bars every third row (class 0) or column (class 1) of a size x size square, uint8 255 on 0."""
    g = np.zeros((size, size), dtype=np.uint8)
    if cls == 0:
        g[1::3, 1:-1] = 255
    else:
        g[1:-1, 1::3] = 255
    return g


def make_image(task: BarsTask, index: int, split: str) -> tuple[np.ndarray, int, np.ndarray]:
    """One image (1, size, size) uint8, its label and the object boxes (n_objects, 4) (y0, x0, h, w).

    Seeded by (seed, split, index), so each image is reproducible on its own."""
    split_code = {"train": 0, "test": 1}[split]
    rng = np.random.default_rng([task.seed, split_code, index])
    label = int(rng.integers(2))
    image = rng.integers(0, task.noise + 1, size=(task.size, task.size), dtype=np.uint8)
    boxes: list[tuple[int, int, int, int]] = []
    while len(boxes) < task.n_objects:
        y, x = (int(v) for v in rng.integers(0, task.size - task.glyph, size=2))
        gap = task.glyph + 2
        if all(abs(y - by) >= gap or abs(x - bx) >= gap for by, bx, _, _ in boxes):
            boxes.append((y, x, task.glyph, task.glyph))
            image[y : y + task.glyph, x : x + task.glyph] = np.maximum(
                image[y : y + task.glyph, x : x + task.glyph], glyph(label, task.glyph)
            )
    return image[None], label, np.asarray(boxes)


def make_split(task: BarsTask, n: int, split: str) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray]]:
    images, labels, boxes = [], [], []
    for i in range(n):
        image, label, box = make_image(task, i, split)
        images.append(image)
        labels.append(label)
        boxes.append(box)
    return images, np.asarray(labels), boxes


def mass_on_objects(attention: np.ndarray, boxes: np.ndarray, factor: int) -> float:
    """Fraction of an (Ha, Wa) stride-1 attention map on the low-res cells that overlap the objects' level-0 boxes
    (the view downsampled by `factor`)."""
    on = np.zeros(attention.shape, dtype=bool)
    for y, x, h, w in boxes:
        on[y // factor : (y + h - 1) // factor + 1, x // factor : (x + w - 1) // factor + 1] = True
    return float(attention[on].sum() / attention.sum())
