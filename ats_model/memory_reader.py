"""An in-memory patch reader: the same callable contract as the Ray-backed one, over numpy arrays.

`read(image_ids, boxes) -> Tensor (B, N, C, h, w)`: boxes `(y0, x0, h, w)` in level-0 pixels, pixels outside the
image read as 0, values scaled to float32 in [0, 1] by the dtype's maximum (DESIGN.md, "The math"). Used by the
tests and the in-memory demo; training passes a reader backed by the pipeline's patch servers.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ats_model.contracts import to_unit_float


def crop(image: np.ndarray, box: Sequence[int], fill: float = 0) -> np.ndarray:
    """One box of a (C, H, W) image as (C, h, w), `fill` where the box leaves the image."""
    y0, x0, h, w = (int(v) for v in box)
    c, height, width = image.shape
    out = np.full((c, h, w), fill, dtype=image.dtype)
    ys, ye = max(y0, 0), min(y0 + h, height)
    xs, xe = max(x0, 0), min(x0 + w, width)
    if ys < ye and xs < xe:
        out[:, ys - y0 : ye - y0, xs - x0 : xe - x0] = image[:, ys:ye, xs:xe]
    return out


class InMemoryReader:
    """Patch reader over a list of (C, H, W) arrays; image ids are list positions."""

    def __init__(self, images: Sequence[np.ndarray]):
        for i, image in enumerate(images):
            if image.ndim != 3:
                raise ValueError(f"Expected (C, H, W) arrays. Image {i} has shape {image.shape}.")
        self.images = list(images)
        self.patches_read = 0

    def level0_hw(self, image_ids: Sequence[int]) -> Tensor:
        """(B, 2) int64 level-0 sizes."""
        return torch.tensor([self.images[int(i)].shape[1:] for i in image_ids], dtype=torch.long)

    def __call__(self, image_ids: Sequence[int], boxes: Tensor) -> Tensor:
        boxes_np = boxes.detach().cpu().numpy()  # (B, N, 4)
        out = np.stack(
            [np.stack([crop(self.images[int(i)], box) for box in row]) for i, row in zip(image_ids, boxes_np)]
        )  # (B, N, C, h, w)
        self.patches_read += boxes_np.shape[0] * boxes_np.shape[1]
        return to_unit_float(out)

    def low_res(self, image_ids: Sequence[int], factor: int) -> Tensor:
        """(B, C, ceil(H/f), ceil(W/f)) float32 view: the mean over each f x f block of the pixels present."""
        views = []
        for i in image_ids:
            x = to_unit_float(self.images[int(i)]).unsqueeze(0)  # (1, C, H, W)
            ones = torch.ones_like(x[:, :1])
            summed = torch.nn.functional.avg_pool2d(x, factor, ceil_mode=True, divisor_override=1)
            count = torch.nn.functional.avg_pool2d(ones, factor, ceil_mode=True, divisor_override=1)
            views.append((summed / count)[0])  # (C, h, w)
        return torch.stack(views)
