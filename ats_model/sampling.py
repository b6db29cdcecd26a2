"""Draw patch positions from an attention distribution.

With replacement: N independent categorical draws. Without replacement: the Gumbel top-k trick, which draws
exactly as sequential sampling does (Plackett–Luce): the position with the largest `logit + Gumbel` key is the first
draw, the second largest the second draw, and so on. The column order of the result IS that draw order, and the
ordered estimator in `estimator.py` depends on it.

Masked positions (logits `-inf`, e.g. padding of a smaller image in a batch) are never drawn.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _check(logits: Tensor, n: int, replace: bool) -> None:
    if logits.dim() != 2:
        raise ValueError(f"Expected logits of shape (B, K). Got shape {tuple(logits.shape)}.")
    if not logits.is_floating_point():
        raise ValueError(f"Expected floating-point logits. Got dtype {logits.dtype}.")
    if n < 1:
        raise ValueError(f"Expected n >= 1 samples. Got {n}.")
    if torch.isnan(logits).any() or torch.isposinf(logits).any():
        raise ValueError("Logits contain NaN or +inf; check the attention network's output.")
    finite = torch.isfinite(logits).sum(dim=1)  # (B,)
    needed = 1 if replace else n
    if bool((finite < needed).any()):
        fewest = int(finite.min())
        raise ValueError(
            f"Cannot draw n={n} positions {'with' if replace else 'without'} replacement from a row with only "
            f"{fewest} unmasked position(s). Lower n_patches or use a larger low-resolution view."
        )


def gumbel_like(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard Gumbel noise with the shape, dtype and device of `logits`."""
    u = torch.rand(logits.shape, dtype=logits.dtype, device=logits.device, generator=generator)
    tiny = torch.finfo(logits.dtype).tiny
    return -torch.log(-torch.log(u.clamp_min(tiny)))  # u in [tiny, 1): the result is finite


def sample(logits: Tensor, n: int, *, replace: bool, generator: torch.Generator | None = None) -> Tensor:
    """Draw `n` positions per row from `softmax(logits)`.

    logits (B, K) unnormalised log-probabilities; `-inf` masks a position.
    Returns (B, n) int64. Without replacement the columns are in draw order and `n` may not exceed the number of
    unmasked positions (ValueError).
    """
    _check(logits, n, replace)
    with torch.no_grad():
        if replace:
            probs = torch.softmax(logits, dim=1)  # (B, K)
            return torch.multinomial(probs, n, replacement=True, generator=generator)  # (B, n)
        keys = logits + gumbel_like(logits, generator)  # (B, K); masked stay -inf
        return torch.topk(keys, n, dim=1, largest=True, sorted=True).indices  # (B, n), draw order
