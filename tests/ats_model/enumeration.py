"""Exact expectations over every possible draw, for proofs of unbiasedness on small cases.

Each draw (an ordered N-tuple of positions) becomes one row of a large batch, weighted by its probability:
Plackett–Luce for sampling without replacement, the product of the attentions with replacement. The weighted
objective `sum_t P_t <g, F_t>` then has, by linearity, exactly `E[<g, F>]` as value and `E[gradient]` as gradient,
so one backward pass yields the expected gradient for the logits, the attention and the features at once.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

Estimator = Callable[[Tensor, Tensor, Tensor], Tensor]  # (attention (R, K), indices (R, n), features (R, n, *F))


def draws(k: int, n: int, replace: bool) -> Tensor:
    """Every ordered N-tuple of positions: (T, n) int64."""
    tuples = itertools.product(range(k), repeat=n) if replace else itertools.permutations(range(k), n)
    return torch.tensor(list(tuples), dtype=torch.long)


def draw_probabilities(attention: Tensor, tuples: Tensor, replace: bool) -> Tensor:
    """Probability of each ordered tuple under each row's attention: (B, K), (T, n) -> (B, T) float64."""
    a = attention.double()
    picked = a[:, tuples]  # (B, T, n)
    if replace:
        return picked.prod(-1)
    # Plackett–Luce: draw m has probability a_{I_m} / (mass not yet drawn), that mass summed over the positions
    # still left (never 1 - cumsum, which cancels to 0 once a heavy position has been drawn).
    k, n = a.shape[1], tuples.shape[1]
    drawn = torch.nn.functional.one_hot(tuples, k).cumsum(1) - torch.nn.functional.one_hot(tuples, k)  # (T, n, K)
    left = (a[:, None, None, :] * (drawn == 0)).sum(-1)  # (B, T, n)
    return (picked / left).prod(-1)


@dataclass(frozen=True)
class Expectation:
    forward: Tensor  # (B, *F)
    grad_logits: Tensor  # (B, K)
    grad_attention: Tensor  # (B, K)
    grad_features: Tensor  # (B, K, *F)


def expectation(
    estimator: Estimator, logits: Tensor, features: Tensor, g: Tensor, n: int, replace: bool
) -> Expectation:
    """Exact E[forward] and E[gradients of <g, forward>] of `estimator` under the sampler, in float64.

    logits (B, K); features (B, K, *F) of every position; g (B, *F) the fixed upstream gradient.
    """
    b, k = logits.shape
    tuples = draws(k, n, replace)  # (T, n)
    t = tuples.shape[0]
    logits = logits.detach().clone().requires_grad_(True)
    features = features.detach().clone().requires_grad_(True)
    attention = torch.softmax(logits, dim=1)  # (B, K)
    attention.retain_grad()
    probs = draw_probabilities(attention.detach(), tuples, replace).reshape(b * t)  # (B*T,)

    rows_attention = attention.repeat_interleave(t, dim=0)  # (B*T, K)
    rows_indices = tuples.repeat(b, 1)  # (B*T, n)
    rows_features = features.repeat_interleave(t, dim=0)  # (B*T, K, *F)
    expand = rows_indices.reshape(b * t, n, *([1] * (features.dim() - 2))).expand(-1, -1, *features.shape[2:])
    picked = rows_features.gather(1, expand)  # (B*T, n, *F)

    out = estimator(rows_attention, rows_indices, picked)  # (B*T, *F)
    weight = probs.reshape(b * t, *([1] * (out.dim() - 1)))
    forward = (weight * out).reshape(b, t, *out.shape[1:]).sum(1)  # (B, *F)
    objective = (weight * out * g.repeat_interleave(t, dim=0)).sum()
    objective.backward()
    return Expectation(forward.detach(), logits.grad, attention.grad, features.grad)


def truth(logits: Tensor, features: Tensor, g: Tensor) -> Expectation:
    """The full model `sum_i a_i f_i` and the gradients of `<g, .>`, by plain autograd in float64."""
    logits = logits.detach().clone().requires_grad_(True)
    features = features.detach().clone().requires_grad_(True)
    attention = torch.softmax(logits, dim=1)
    attention.retain_grad()
    w = attention.reshape(*attention.shape, *([1] * (features.dim() - 2)))
    full = (w * features).sum(1)  # (B, *F)
    (full * g).sum().backward()
    return Expectation(full.detach(), logits.grad, attention.grad, features.grad)
