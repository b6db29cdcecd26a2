"""Where the attention goes on images whose objects are known: `attention_on_objects`, logged every epoch.

Megapixel MNIST's generator records each image's digit boxes (`PyramidInfo.objects`: level-0 (y0, x0, h, w,
digit)). The metric is the attention mass on the cells whose level-0 centre lies inside a box of the image's own
class (the digits that decide the label), averaged over a fixed set of test images: flat attention scores the
boxes' share of the cells (~0.1% on the paper's images), attention that has found the label digits approaches 1.
It shows the attention converge in the MLflow UI long before the test error moves (the paper's Figure 3 as a
curve). Only for ats and uniform (attention on a grid of cells); other models log nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from training.data import Example, LowResViews
from training.models import StreamingATS, unwrap

MAX_IMAGES = 64  # test images the metric averages over (the first ones with objects, fixed for the whole run)


@dataclass(frozen=True, slots=True)
class Annotated:
    example: Example
    boxes: np.ndarray  # (n, 4) level-0 (y0, x0, h, w) of the objects of the image's own class


def annotated(examples: Sequence[Example], classes: Sequence[str], reader, limit: int = MAX_IMAGES
              ) -> list[Annotated]:
    """The first `limit` examples with at least one recorded object of their own class (an object's class index
    printed is the class name, as Megapixel MNIST's digits and labels), with those boxes. Stops
    at the first image that records no objects at all: a dataset without them costs one pyramid open."""
    out = []
    for example in examples:
        objects = reader.info(example.image_id).objects
        if len(out) == limit or not objects:
            break
        own = np.array([o[:4] for o in objects if str(o[4]) == classes[example.label]], dtype=np.float64).reshape(-1, 4)
        if len(own):
            out.append(Annotated(example, own))
    return out


def cells_in_boxes(grid_hw: tuple[int, int], centre0_yx: tuple[float, float], step_yx: tuple[float, float],
                   boxes: np.ndarray) -> np.ndarray:
    """(Ha, Wa) bool: the cells whose level-0 centre, `centre0 + step * (row, col)`, lies in a box (n, 4)
    (y0, x0, h, w) (half-open: y0 <= cy < y0 + h)."""
    ha, wa = grid_hw
    cy = centre0_yx[0] + step_yx[0] * np.arange(ha)  # (Ha,) level-0
    cx = centre0_yx[1] + step_yx[1] * np.arange(wa)  # (Wa,)
    inside = np.zeros((ha, wa), dtype=bool)
    for y0, x0, h, w in boxes:
        inside |= ((cy >= y0) & (cy < y0 + h))[:, None] & ((cx >= x0) & (cx < x0 + w))[None, :]
    return inside


def mass_on_boxes(attention: np.ndarray, centre0_yx: tuple[float, float], step_yx: tuple[float, float],
                  boxes: np.ndarray) -> float:
    """Attention mass (Ha, Wa) on the cells `cells_in_boxes` picks."""
    return float(attention[cells_in_boxes(attention.shape, centre0_yx, step_yx, boxes)].sum())


@torch.no_grad()
def attention_on_objects(model: torch.nn.Module, images: Sequence[Annotated], views: LowResViews, device,
                         batch_size: int = 16) -> float | None:
    """The mean attention mass on each image's own-class objects; None when there are none or the model has no
    cell attention (not ats / uniform)."""
    net = unwrap(model)
    if not images or not isinstance(net, StreamingATS):
        return None
    spec = net.ats.attention_net.grid
    masses = []
    for start in range(0, len(images), batch_size):
        part = images[start:start + batch_size]
        batch = views.batch([a.example for a in part]).to(device)
        maps = net.attention_maps(batch, None)  # (Ha, Wa) per image; the fetcher is unused for ats / uniform
        for i, (a, attention) in enumerate(zip(part, maps)):
            fy, fx = (float(v) for v in batch.low_scale[i])  # level-0 px per view px: cell centres on level 0
            masses.append(mass_on_boxes(attention, (spec.offset_yx[0] * fy, spec.offset_yx[1] * fx),
                                        (spec.stride_yx[0] * fy, spec.stride_yx[1] * fx), a.boxes))
    return float(np.mean(masses))
