"""The unbiased attention-sampling estimator of `sum_i a_i f_i` and its gradient.

Every estimator here has the same shape: detached weights `c` on the N sampled features,

    F = sum_m c_m f_{I_m}                                   (forward)
    dF/df_{I_m}  -> c_m g                                   (feature gradient)
    dF/da_{I_m}  -> rho_m <g, f_{I_m}>,  rho_m = c_m / a_{I_m}  (attention gradient, scattered to position I_m)

with `E[sum of c over the draws that hit i] = a_i`, which makes the forward and both gradients unbiased for a
fixed upstream `g` (the lemma in research/lower-variance-estimators.md). What differs is `c`:

- with replacement:          c_m = 1 / N
- without, "ordered":        c_m = (p_m + (N - 1 - m) a_{I_m}) / N,  p_m = attention not yet drawn before draw m
                             (the forward of the paper's Eq. 14-15 averaged over the N prefixes; `rho_m` is the
                             design's `(p_m / a_{I_m} + N - 1 - m) / N`)
- without, "unordered":      c_s = P(first draw = s | sampled set), the ordered weights averaged over the orders
                             of the set (Kool et al. 2020; `unordered.py`). The default: same sampler, no extra
                             patch, never of higher variance than "ordered" (Rao-Blackwell)

Plain autograd through the forward is not enough: it gives no attention gradient at N = 1 and a biased one above.
The 2019 reference code's attention gradient is biased for N >= 2; ports that use inclusive cumsums bias even the
forward. Unbiasedness of everything here is proven by exact enumeration in tests/ats_model/test_estimator.py.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ats_model.unordered import unordered_weights

ESTIMATORS = ("ordered", "unordered")


def _guard(x: Tensor) -> Tensor:
    """Clamp a divisor away from underflow; values above sqrt(tiny) (1e-19 in float32) are unchanged."""
    return x.clamp_min(torch.finfo(x.dtype).tiny ** 0.5)


def _in_set(shape: torch.Size, indices: Tensor) -> Tensor:
    """(B, K) boolean mask of the sampled positions."""
    mask = torch.zeros(shape, dtype=torch.bool, device=indices.device)
    return mask.scatter_(1, indices, True)


def ordered_weights(attention: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Weights `c` and `rho = c / a` (each (B, n)) of the ordered without-replacement estimator.

    `p_m` is summed from what is still left (mass outside the set plus the suffix of the drawn masses), never as
    `1 - cumsum`, which loses all precision in float32 once attention is peaked.
    """
    n = indices.shape[1]
    drawn = attention.gather(1, indices)  # (B, n) a_{I_m}
    outside = attention.masked_fill(_in_set(attention.shape, indices), 0).sum(1, keepdim=True)  # (B, 1)
    suffix = drawn.flip(1).cumsum(1).flip(1)  # (B, n) sum_{j >= m} a_{I_j}
    left = (outside + suffix).clamp_min(0)  # (B, n) p_m
    later = torch.arange(n - 1, -1, -1, device=attention.device, dtype=attention.dtype)  # (n,) N - 1 - m
    c = (left + later * drawn) / n
    rho = (left / _guard(drawn) + later) / n
    return c, rho


def replacement_weights(attention: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Weights of the with-replacement estimator: c = 1/N, rho = 1/(N a)."""
    n = indices.shape[1]
    drawn = attention.gather(1, indices)  # (B, n)
    return torch.full_like(drawn, 1.0 / n), 1.0 / (n * _guard(drawn))


def unordered_set_weights(attention: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Weights of the unordered-set estimator, computed in float64 from log(attention), cast back.

    rho = I(S minus s) / I(S) grows like 1 / a_s for a vanishing a_s; it is capped at 1 / sqrt(tiny) of the
    attention's dtype, the same underflow guard as the ordered weights' division (normal values unchanged)."""
    log_attention = torch.log(attention.detach().double())  # (B, K); masked positions -> -inf
    c, rho = unordered_weights(log_attention, indices)
    cap = 1.0 / torch.finfo(attention.dtype).tiny ** 0.5
    return c.to(attention.dtype), rho.clamp_max(cap).to(attention.dtype)


class _WeightedSum(torch.autograd.Function):
    """F = sum_m c_m f_m with the score-function attention gradient rho_m <g, f_m - mu> (mu = 0 without a baseline)."""

    @staticmethod
    def forward(
        ctx, attention: Tensor, features: Tensor, indices: Tensor, c: Tensor, rho: Tensor, baseline: Tensor
    ) -> Tensor:
        ctx.save_for_backward(features, indices, c, rho, baseline)
        ctx.attention_shape, ctx.attention_dtype = attention.shape, attention.dtype
        w = c.reshape(*c.shape, *([1] * (features.dim() - 2)))  # (B, n) -> (B, n, 1, ...)
        return (w * features).sum(1)  # (B, n, *F) -> (B, *F)

    @staticmethod
    def backward(ctx, g: Tensor):
        features, indices, c, rho, baseline = ctx.saved_tensors
        g = g.unsqueeze(1)  # (B, *F) -> (B, 1, *F)
        grad_attention = grad_features = None
        if ctx.needs_input_grad[0]:
            h = ((features - baseline) * g).flatten(2).sum(2)  # (B, n) <g, f_m - mu>
            grad_attention = torch.zeros(ctx.attention_shape, dtype=h.dtype, device=h.device)
            grad_attention.scatter_add_(1, indices, rho * h)  # (B, K); repeated draws add up
            grad_attention = grad_attention.to(ctx.attention_dtype)
        if ctx.needs_input_grad[1]:
            w = c.reshape(*c.shape, *([1] * (features.dim() - 2)))  # (B, n, 1, ...)
            grad_features = w * g  # (B, n, *F)
        return grad_attention, grad_features, None, None, None, None


def _validate(attention: Tensor, indices: Tensor, features: Tensor, replace: bool, estimator: str) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"Expected estimator in {ESTIMATORS}. Got {estimator!r}.")
    if attention.dim() != 2:
        raise ValueError(f"Expected attention of shape (B, K). Got {tuple(attention.shape)}.")
    if indices.dim() != 2 or indices.shape[0] != attention.shape[0] or indices.dtype != torch.long:
        raise ValueError(
            f"Expected int64 indices of shape (B, n) with B = {attention.shape[0]}, as returned by sample(). "
            f"Got {indices.dtype} {tuple(indices.shape)}."
        )
    if features.dim() < 3 or tuple(features.shape[:2]) != tuple(indices.shape):
        raise ValueError(
            f"Expected features of shape (B, n, *F) = ({indices.shape[0]}, {indices.shape[1]}, ...), one row per "
            f"sampled index. Got {tuple(features.shape)}."
        )
    if not replace and indices.shape[1] > 1:
        ordered = indices.sort(1).values
        if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
            raise ValueError("replace=False but a row of indices repeats a position; sample with replace=False.")


def expected(
    attention: Tensor,
    indices: Tensor,
    features: Tensor,
    *,
    replace: bool,
    estimator: str = "unordered",
    baseline: Tensor | None = None,
) -> Tensor:
    """Unbiased estimate of `sum_i a_i f_i` from the features of the sampled positions.

    attention (B, K) probabilities; indices (B, n) as returned by `sampling.sample` (draw order matters for the
    ordered estimator); features (B, n, *F) of those positions. Returns (B, *F) in the features' dtype,
    differentiable w.r.t. attention and features. `estimator` matters only for replace=False; "unordered" is the
    default (never of higher variance than "ordered", research/lower-variance-estimators.md).

    baseline (*F) or (B, *F), optional: a constant mu (e.g. a detached running mean of past outputs, never a
    function of the current sample) subtracted from the features in the attention gradient, `rho <g, f - mu>`.
    Every estimator's weights sum to 1, so the gradient that reaches the logits through the softmax stays unbiased
    (the raw attention gradient does not) and loses the variance of the features' common offset.
    """
    _validate(attention, indices, features, replace, estimator)
    with torch.no_grad():
        if replace:
            c, rho = replacement_weights(attention, indices)
        elif estimator == "ordered":
            c, rho = ordered_weights(attention, indices)
        else:
            c, rho = unordered_set_weights(attention, indices)
    c, rho = c.to(features.dtype), rho.to(features.dtype)
    if baseline is None:
        mu = features.new_zeros(())
    else:
        mu = baseline.detach().to(features.dtype, copy=True)  # a snapshot: callers update running means in place
        mu = mu.unsqueeze(1) if mu.dim() == features.dim() - 1 else mu  # (B, *F) -> (B, 1, *F); (*F) broadcasts
    return _WeightedSum.apply(attention, features, indices, c, rho, mu)


def topk_average(attention: Tensor, indices: Tensor, features: Tensor) -> Tensor:
    """Deterministic evaluation: `sum_{i in topk} a_i f_i / sum_{i in topk} a_i` (renormalised, not the
    without-replacement estimator fed with the largest indices). Plain autograd. Returns (B, *F)."""
    drawn = attention.gather(1, indices)  # (B, n)
    w = drawn / _guard(drawn.sum(1, keepdim=True))  # (B, n)
    w = w.reshape(*w.shape, *([1] * (features.dim() - 2)))  # (B, n, 1, ...)
    return (w * features).sum(1)  # (B, *F)
