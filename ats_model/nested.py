"""Nested attention sampling (regions -> patches), issue 14: the estimator and its evaluation modes, torch only.

The target is `Phi = sum_r A_r sum_p b^r_p f_{r,p}`: A = softmax(Z) over R regions (coarse attention), b^r =
softmax(y^r) over the P positions of region r (fine attention on that region alone). The estimator is two
compositions of the single-level `sample` and `expected` (research/nested-ats.md, sections 2-3), no new autograd:

    T = sample(Z, M)                    (B, M) regions, draw order      -> y_T per slot (B, M, P)
    S = sample(y_T, N)                  (B*M, N) fresh noise per slot   -> features f (B, M, N, *F)
    F = expected(b_T, S, f)             (B, M, *F) inner estimate per slot
    Phi_hat = expected(A, T, F)         (B, *F)

Autograd then gives exactly the proven gradients: the outer attention gradient uses the inner *estimate* F_k, and
the upstream gradient reaching slot k is the outer forward weight c_k g. Unbiased for the forward and for the
gradients to Z, every y^r and f, with or without replacement at each level, with either estimator ("ordered",
"unordered") at a level without replacement, and for the count allocation (`allocation="counts"`: T = M*N region
draws with replacement merged into counts c_r; a drawn region gets c_r inner draws, capped at its valid positions
without replacement, and keeps the outer weight c_r / T). Proof by exact enumeration: tests/ats_model/test_nested.py.

What the proof needs and this module guarantees: samplers draw from the same smoothed, masked distributions the
estimators weigh with (`smoothed_attention` returns both); indices reach `expected` in draw order; the number of
inner draws of a slot depends on its region only (never on its own draws): without replacement it is capped at the
region's valid positions, which is unbiased (the exact inner when every valid position is drawn).

Evaluation modes (section 5): "sampled" (optionally averaged over S draws by the caller), "topk" (top M regions by
A, top N positions by b^r in each, renormalised weights), "exact_inner" (sampled regions, every position of each)
and "exact" (every region and position; callers check `check_budget` first). Regulariser: `nested_entropy`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from ats_model.ats import ExactEvaluationTooLargeError, masked_entropy
from ats_model.estimator import ESTIMATORS, expected
from ats_model.sampling import sample

ALLOCATIONS = ("fixed", "counts")
NESTED_MODES = ("sampled", "topk", "exact_inner", "exact")


class TooFewRegionsError(ValueError):
    """Sampling regions without replacement asked for more regions than an image has."""


class NestedExactTooLargeError(ExactEvaluationTooLargeError):
    """An exact (or exact-inner) nested evaluation would need more memory than the configured budget."""


@dataclass(frozen=True, slots=True)
class NestedSampling:
    """How many regions and patches to draw, and how (research/nested-ats.md; WOR/WOR is the recommended default).

    allocation "fixed": M = n_regions region draws, N = n_patches_per_region inner draws for every slot.
    allocation "counts": T = n_regions * n_patches_per_region region draws with replacement (the same patch budget),
    merged into counts c_r; region r gets c_r inner draws (capped at its valid positions without replacement).
    """

    n_regions: int = 4
    n_patches_per_region: int = 2
    outer_replace: bool = False
    inner_replace: bool = False
    outer_estimator: str = "unordered"  # for outer_replace=False: "unordered" (lower variance) or "ordered"
    inner_estimator: str = "unordered"  # for inner_replace=False
    allocation: str = "fixed"
    region_smoothing: float = 0.0  # e in A (1 - e) + e / R_valid
    position_smoothing: float = 0.0  # e in b (1 - e) + e / P_valid

    def __post_init__(self) -> None:
        if self.n_regions < 1 or self.n_patches_per_region < 1:
            raise ValueError(
                f"Expected n_regions >= 1 and n_patches_per_region >= 1. Got {self.n_regions}, "
                f"{self.n_patches_per_region}."
            )
        for name in ("outer_estimator", "inner_estimator"):
            if getattr(self, name) not in ESTIMATORS:
                raise ValueError(f"Expected {name} in {ESTIMATORS}. Got {getattr(self, name)!r}.")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"Expected allocation in {ALLOCATIONS}. Got {self.allocation!r}.")
        if self.allocation == "counts" and not self.outer_replace:
            raise ValueError("allocation='counts' draws regions with replacement; set outer_replace=True.")
        for name in ("region_smoothing", "position_smoothing"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"Expected {name} in [0, 1). Got {getattr(self, name)}.")

    @property
    def n_region_draws(self) -> int:
        """Outer sample size: M (fixed) or T = M * N (counts)."""
        if self.allocation == "counts":
            return self.n_regions * self.n_patches_per_region
        return self.n_regions


@dataclass(frozen=True)
class RegionDraw:
    """The outer draw, organised in slots; each slot gets its own inner draw."""

    regions: Tensor  # (B, M) region of each slot. fixed: the draws in draw order; counts: the distinct drawn
    #                  regions by id, padding slots (target 0) repeating a drawn region
    draws: Tensor  # (B, T) the outer sample in draw order, as `expected` sees it (fixed: T = M, = regions)
    slot_of_draw: Tensor  # (B, T) the slot whose inner estimate each draw carries (fixed: 0 .. M-1)
    targets: Tensor  # (B, M) inner draws wanted per slot before capping: N (fixed), c_r (counts), 0 for padding


@dataclass(frozen=True)
class PositionDraw:
    """The inner draws of every slot, in draw order: slot (b, k) drew `positions[b, k, :sizes[b, k]]`."""

    positions: Tensor  # (B, M, L) int64, L = the largest size; the columns past a slot's size repeat its first draw
    sizes: Tensor  # (B, M) int64 inner draws per slot (0 for padding slots)

    def mask(self) -> Tensor:
        """(B, M, L) bool: the columns that are draws."""
        cols = torch.arange(self.positions.shape[2], device=self.sizes.device)  # (L,)
        return cols < self.sizes[:, :, None]  # (B, M, L)


# -----------------------------------------------------------------------------
# distributions and entropies

def smoothed_attention(logits: Tensor, smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
    """softmax over the last dim, smoothed over the unmasked entries: `a (1 - e) + e / K_valid`, 0 where masked.

    logits (..., K), -inf masks. Returns (attention, log_attention), both (..., K): sample on `log_attention`,
    estimate with `attention`, so that both see the same distribution. A row with no finite logit gives zeros
    (log -inf), never NaN."""
    valid = torch.isfinite(logits)  # (..., K)
    any_valid = valid.any(-1, keepdim=True)  # (..., 1)
    log_a = torch.log_softmax(logits.masked_fill(~any_valid, 0.0), dim=-1)  # (..., K)
    log_a = log_a.masked_fill(~any_valid, -math.inf)
    attention = log_a.exp()
    if smoothing > 0:
        k_valid = valid.sum(-1, keepdim=True).clamp_min(1)  # (..., 1)
        attention = (attention * (1 - smoothing) + smoothing / k_valid) * valid
        log_a = torch.log(attention)
    return attention, log_a


def entropy(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dim (unsmoothed), masked entries count 0: (..., K) -> (...)."""
    attention, log_attention = smoothed_attention(logits)  # (..., K)
    k = logits.shape[-1]
    return masked_entropy(attention.reshape(-1, k), log_attention.reshape(-1, k)).reshape(logits.shape[:-1])


def joint_entropy(region_logits: Tensor, position_logits: Tensor) -> Tensor:
    """Exact H(q) of q_{r,p} = A_r b^r_p: H(A) + sum_r A_r H(b^r). region_logits (B, R), position_logits (B, R, P)
    of every region -> (B,)."""
    attention, _ = smoothed_attention(region_logits)  # (B, R)
    return entropy(region_logits) + (attention * entropy(position_logits)).sum(1)  # (B,)


def nested_entropy(
    region_logits: Tensor, region_attention: Tensor, regions: RegionDraw, slot_position_logits: Tensor,
    cfg: NestedSampling,
) -> Tensor:
    """The regulariser H(A) + (outer estimate of sum_r A_r H(b^r)), unbiased for H(q) and its Z and y gradients.

    region_logits (B, R); region_attention (B, R) the distribution the regions were drawn from; slot_position_logits
    (B, M, P) the position logits of each slot's region. H(A) is exact; the second term is the outer estimator on
    values H(b^{R_k}). With smoothing the regions' entropies are weighted by the smoothed A that drew them (exactly
    H(q) without smoothing). Returns (B,)."""
    slot_entropy = entropy(slot_position_logits).unsqueeze(-1)  # (B, M, 1)
    return entropy(region_logits) + outer_expected(region_attention, regions, slot_entropy, cfg).squeeze(-1)


# -----------------------------------------------------------------------------
# drawing regions and positions

def _groups(sizes: Tensor) -> Iterator[tuple[int, Tensor]]:
    """(n, flat row indices) for every nonzero size n in `sizes` (B, M), rows of the flattened (B*M) slots."""
    flat = sizes.flatten()
    for n in flat.unique().tolist():
        if n > 0:
            yield n, (flat == n).nonzero().squeeze(1)


def region_draw_from_draws(draws: Tensor, cfg: NestedSampling) -> RegionDraw:
    """Organise an outer sample (B, T) into slots: one per draw (fixed) or one per distinct region (counts)."""
    b, t = draws.shape
    if cfg.allocation == "fixed":
        slots = torch.arange(t, device=draws.device).expand(b, t)  # (B, M)
        return RegionDraw(draws, draws, slots, torch.full_like(draws, cfg.n_patches_per_region))
    ordered, order = draws.sort(dim=1)  # (B, T)
    new = torch.ones_like(ordered, dtype=torch.bool)
    new[:, 1:] = ordered[:, 1:] != ordered[:, :-1]  # (B, T) first draw of each distinct region
    slot_sorted = new.long().cumsum(1) - 1  # (B, T) slot of each sorted draw
    m = int(new.sum(1).max())
    regions = ordered[:, :1].expand(b, m).clone().scatter_(1, slot_sorted, ordered)  # (B, M); padding: 1st region
    counts = torch.zeros(b, m, dtype=torch.long, device=draws.device).scatter_add_(
        1, slot_sorted, torch.ones_like(slot_sorted))  # (B, M) c_r, 0 for padding
    slot_of_draw = torch.empty_like(draws).scatter_(1, order, slot_sorted)  # (B, T) back to draw order
    return RegionDraw(regions, draws, slot_of_draw, counts)


def draw_regions(
    region_log_attention: Tensor, cfg: NestedSampling, generator: torch.Generator | None = None
) -> RegionDraw:
    """The outer draw from log A (B, R) (log of the smoothed attention; -inf masks a region)."""
    valid = torch.isfinite(region_log_attention).sum(1)  # (B,)
    if not cfg.outer_replace and bool((valid < cfg.n_regions).any()):
        raise TooFewRegionsError(
            f"Cannot draw n_regions={cfg.n_regions} regions without replacement from an image with only "
            f"{int(valid.min())} region(s). Lower n_regions, use smaller regions, or set outer_replace=True."
        )
    draws = sample(region_log_attention.detach(), cfg.n_region_draws, replace=cfg.outer_replace,
                   generator=generator)  # (B, T), draw order
    return region_draw_from_draws(draws, cfg)


def inner_sizes(slot_position_logits: Tensor, targets: Tensor, replace: bool) -> Tensor:
    """Inner draws per slot (B, M): the target, capped at the slot's valid positions without replacement."""
    valid = torch.isfinite(slot_position_logits).sum(-1)  # (B, M)
    if bool(((targets > 0) & (valid == 0)).any()):
        raise ValueError(
            "A drawn region has no unmasked position. Mask (-inf) the logit of every region without a valid "
            "position before drawing regions, as NestedATSModel does."
        )
    return targets if replace else torch.minimum(targets, valid)


def draw_positions(
    slot_position_log_attention: Tensor, regions: RegionDraw, cfg: NestedSampling,
    generator: torch.Generator | None = None,
) -> PositionDraw:
    """The inner draws: log b per slot (B, M, P) -> positions per slot, independent noise per slot (row)."""
    b, m, _ = slot_position_log_attention.shape
    sizes = inner_sizes(slot_position_log_attention, regions.targets, cfg.inner_replace)  # (B, M)
    flat = slot_position_log_attention.detach().flatten(0, 1)  # (B*M, P)
    positions = torch.zeros(b * m, max(int(sizes.max()), 1), dtype=torch.long, device=flat.device)  # (B*M, L)
    for n, rows in _groups(sizes):  # one group (every row) unless sizes were capped or counts differ
        drawn = sample(flat[rows], n, replace=cfg.inner_replace, generator=generator)  # (rows, n) draw order
        positions[rows, :n] = drawn
        positions[rows, n:] = drawn[:, :1]
    return PositionDraw(positions.reshape(b, m, -1), sizes)  # (B, M, L)


def topk_regions(region_attention: Tensor, cfg: NestedSampling) -> RegionDraw:
    """The M regions of largest A (B, R); a slot beyond an image's valid regions gets target 0 and repeats the top
    region (so that nothing outside the image is read)."""
    m = min(cfg.n_regions, region_attention.shape[1])
    top = torch.topk(region_attention.detach(), m, dim=1)  # (B, M)
    targets = torch.where(top.values > 0, cfg.n_patches_per_region, 0)  # (B, M)
    regions = torch.where(targets > 0, top.indices, top.indices[:, :1])  # (B, M)
    slots = torch.arange(m, device=regions.device).expand_as(regions)
    return RegionDraw(regions, regions, slots, targets)


def valid_regions(region_logits: Tensor, n_positions: int) -> RegionDraw:
    """Every unmasked region of every image, one slot each, for exact evaluation: (B, R) -> slots (B, R_max),
    padding slots (target 0) repeating the first region. Each slot targets every position."""
    valid = torch.isfinite(region_logits)  # (B, R)
    order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices  # (B, R) valid first
    m = max(int(valid.sum(1).max()), 1)
    keep = valid.gather(1, order[:, :m])  # (B, M)
    regions = torch.where(keep, order[:, :m], order[:, :1])  # (B, M)
    slots = torch.arange(m, device=regions.device).expand_as(regions)
    return RegionDraw(regions, regions, slots, torch.where(keep, n_positions, 0))


def topk_positions(slot_position_attention: Tensor, regions: RegionDraw) -> PositionDraw:
    """The targets' worth of positions of largest b in every slot (B, M, P), positive attention only."""
    width = min(int(regions.targets.max()), slot_position_attention.shape[2])
    top = torch.topk(slot_position_attention.detach(), max(width, 1), dim=2)  # (B, M, L)
    sizes = torch.minimum(regions.targets, (top.values > 0).sum(2))  # (B, M)
    return PositionDraw(top.indices, sizes)


def all_positions(slot_position_logits: Tensor, regions: RegionDraw) -> PositionDraw:
    """Every valid position of every slot with a positive target, valid ones first (for the exact inner)."""
    valid = torch.isfinite(slot_position_logits)  # (B, M, P)
    order = torch.sort((~valid).to(torch.uint8), dim=2, stable=True).indices  # (B, M, P) valid first
    sizes = torch.where(regions.targets > 0, valid.sum(2), 0)  # (B, M)
    return PositionDraw(order, sizes)


# -----------------------------------------------------------------------------
# estimators

def inner_expected(
    slot_position_attention: Tensor, positions: PositionDraw, features: Tensor, *, replace: bool, estimator: str
) -> Tensor:
    """The inner estimate of every slot: b per slot (B, M, P), features (B, M, L, *F) -> (B, M, *F).

    Slots are batched as (B*M) rows of `expected`, one call per distinct inner size; padding slots give 0."""
    b, m, width = positions.positions.shape
    attention = slot_position_attention.flatten(0, 1)  # (B*M, P)
    indices = positions.positions.flatten(0, 1)  # (B*M, L)
    feats = features.flatten(0, 1)  # (B*M, L, *F)
    if bool((positions.sizes == width).all()):
        out = expected(attention, indices, feats, replace=replace, estimator=estimator)  # (B*M, *F)
        return out.reshape(b, m, *features.shape[3:])
    out = feats.new_zeros(b * m, *features.shape[3:])  # (B*M, *F)
    for n, rows in _groups(positions.sizes):
        est = expected(attention[rows], indices[rows, :n], feats[rows, :n], replace=replace, estimator=estimator)
        out = out.index_copy(0, rows, est)  # (B*M, *F)
    return out.reshape(b, m, *features.shape[3:])


def outer_expected(region_attention: Tensor, regions: RegionDraw, values: Tensor, cfg: NestedSampling) -> Tensor:
    """The outer estimate: A (B, R), one value per slot (B, M, *F) -> (B, *F). Each outer draw carries its slot's
    value (counts: a region drawn c_r times carries it c_r times: weight c_r / T, gradient summed by autograd)."""
    index = regions.slot_of_draw.reshape(*regions.slot_of_draw.shape, *([1] * (values.dim() - 2)))  # (B, T, 1..)
    carried = values.gather(1, index.expand(-1, -1, *values.shape[2:]))  # (B, T, *F)
    return expected(region_attention, regions.draws, carried, replace=cfg.outer_replace,
                    estimator=cfg.outer_estimator)  # (B, *F)


def nested_expected(
    region_attention: Tensor, regions: RegionDraw, slot_position_attention: Tensor, positions: PositionDraw,
    features: Tensor, cfg: NestedSampling,
) -> Tensor:
    """Unbiased estimate of Phi from the drawn patches' features.

    region_attention (B, R) and slot_position_attention (B, M, P) (b of each slot's region, gathered per slot;
    autograd sums the paths of a region in several slots) are the distributions the draws came from; features
    (B, M, L, *F) of `positions`. Returns (B, *F), differentiable w.r.t. both attentions and the features."""
    inner = inner_expected(slot_position_attention, positions, features, replace=cfg.inner_replace,
                           estimator=cfg.inner_estimator)  # (B, M, *F)
    return outer_expected(region_attention, regions, inner, cfg)  # (B, *F)


def _weighted_sum(weights: Tensor, features: Tensor, dim: int) -> Tensor:
    """sum over `dim` of weights (..., n) times features (..., n, *F)."""
    w = weights.reshape(*weights.shape, *([1] * (features.dim() - weights.dim())))
    return (w * features).sum(dim)


def exact_inner_expected(
    region_attention: Tensor, regions: RegionDraw, slot_position_attention: Tensor, positions: PositionDraw,
    features: Tensor, cfg: NestedSampling,
) -> Tensor:
    """Sampled regions, exact inner: F_k = sum_p b_p f_p over the positions listed (`all_positions`), then the outer
    estimator. Unbiased; the variance is the outer term alone. Arguments as in `nested_expected`."""
    weights = slot_position_attention.gather(2, positions.positions) * positions.mask()  # (B, M, L)
    return outer_expected(region_attention, regions, _weighted_sum(weights, features, 2), cfg)  # (B, *F)


def _renormalised(weights: Tensor) -> Tensor:
    """weights (..., n) / their sum over the last dim, the sum guarded against 0 as the estimators guard divisors."""
    return weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny ** 0.5)


def nested_topk_average(
    region_attention: Tensor, regions: RegionDraw, slot_position_attention: Tensor, positions: PositionDraw,
    features: Tensor,
) -> Tensor:
    """Deterministic: sum_{r in T} (A_r / sum_T A) sum_{p in S_r} (b^r_p / sum_{S_r} b^r) f_{r,p}, renormalised at
    both levels (never the WOR estimator fed top-k indices). Regions from `topk_regions`, positions from
    `topk_positions`; plain autograd. Returns (B, *F)."""
    wb = _renormalised(slot_position_attention.gather(2, positions.positions) * positions.mask())  # (B, M, L)
    wa = _renormalised(region_attention.gather(1, regions.regions) * (positions.sizes > 0))  # (B, M)
    return _weighted_sum(wa, _weighted_sum(wb, features, 2), 1)  # (B, *F)


def nested_exact(region_attention: Tensor, position_attention: Tensor, features: Tensor) -> Tensor:
    """Phi itself: A (B, R), b of every region (B, R, P), features of every position (B, R, P, *F) -> (B, *F)."""
    return _weighted_sum(region_attention, _weighted_sum(position_attention, features, 2), 1)


def check_budget(needed_bytes: float, budget_mb: float, mode: str, what: str, instead: str) -> None:
    """Raise NestedExactTooLargeError naming the budget and the mode to use instead when `needed_bytes` exceeds it."""
    needed_mb = needed_bytes / 2**20
    if needed_mb > budget_mb:
        raise NestedExactTooLargeError(
            f"mode={mode!r} needs {what} ({needed_mb:.0f} MB), over the budget of {budget_mb:.0f} MB. Use "
            f"mode={instead!r}, a smaller batch, or raise exact_budget_mb."
        )
