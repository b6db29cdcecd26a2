"""One optimisation step and one evaluation pass of an ATS model over a patch reader (pure torch).

The jobs call these with readers of their choosing: the in-memory reader in the demo and tests, the Ray-backed
reader in distributed training. Nothing here decides parallelism, logs or parses arguments.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ats_model.ats import ATSModel
from ats_model.contracts import PatchReadFn


@dataclass(frozen=True, slots=True)
class StepResult:
    loss: float
    errors: int
    count: int


def train_step(
    model: ATSModel,
    optimiser: torch.optim.Optimizer,
    low: Tensor,
    read: PatchReadFn,
    image_ids: Sequence,
    level0_hw: Tensor,
    targets: Tensor,
    *,
    class_weights: Tensor | None = None,
    low_scale: Tensor | float | None = None,
    generator: torch.Generator | None = None,
) -> StepResult:
    """Forward (sampling, patch reads), loss, backward and one optimiser step on a batch; `low_scale` is the view's
    exact factor (ATSModel.plan)."""
    model.train()
    optimiser.zero_grad(set_to_none=True)
    out = model(low, read, image_ids, level0_hw, low_scale=low_scale, mode="sampled", generator=generator)
    loss = model.loss(out, targets, class_weights)
    loss.backward()
    optimiser.step()
    errors = int((out.logits.argmax(1) != targets).sum())
    return StepResult(float(loss.detach()), errors, len(targets))


@torch.no_grad()
def evaluate(
    model: ATSModel,
    batches: Sequence[tuple[Tensor, Sequence, Tensor, Tensor]],
    read: PatchReadFn,
    *,
    mode: str = "sampled",
    low_scale: Tensor | float | None = None,
    generator: torch.Generator | None = None,
) -> float:
    """Error rate over `(low, image_ids, level0_hw, targets)` batches in the given evaluation mode."""
    model.eval()
    errors = count = 0
    for low, image_ids, level0_hw, targets in batches:
        out = model(low, read, image_ids, level0_hw, low_scale=low_scale, mode=mode, generator=generator)
        errors += int((out.logits.argmax(1) != targets).sum())
        count += len(targets)
    return errors / max(count, 1)
