"""Unordered-set weights for attention sampling without replacement (Kool, van Hoof & Welling, ICLR 2020).

The ordered estimator's weights depend on the order in which the Gumbel top-k sampler drew the positions; the set
alone is what we observed. Averaging them over the orders of the sampled set S (Rao-Blackwell) gives

    c_s = P(first draw = s | S) = a_s * I(S \\ s) / I(S),       rho_s = c_s / a_s = I(S \\ s) / I(S) >= 1,

unbiased (E[c_i 1(i in S)] = a_i), never of higher variance than the ordered weights, summing to 1 over S, and
exact (c = a) when S holds all the mass. Here, with r_j = a_j / a(outside S),

    I(A) = int_0^1 prod_{j in A} (1 - u^{r_j}) du,        I(empty) = 1,

is the probability that the top-|A| Plackett-Luce draws form A when only A and the outside compete (u is the CDF
value of the largest Gumbel key outside S). Substituting u = exp(-e^y) turns it into a smooth integral over the
real line whose integrand decays on both sides,

    I(A) = int exp(y - e^y) prod_{j in A} (1 - exp(-exp(y + log r_j))) dy,

which the trapezoid rule integrates to ~1e-14 (geometric convergence). Everything is done in log space in float64:
the outside mass as a masked log-sum-exp (never `1 - sum a`), the log-factors l_j(y) = log(1 - exp(-exp(x))) by a
stable formula, log I as a log-sum-exp over the grid. Derivation, grid rule and accuracy table:
research/lower-variance-estimators.md (section 3); the weights are Kool et al.'s `p(s) R(S, s)`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

# The grid starts at y_lo = -max(max_j log r_j, 0) - 40. Each factor grows with y, so the integral below any y_lo
# holds at most e^(y_lo + 1) of the whole: below e^-39 here.
_TAIL = 40.0
_NEGLIGIBLE = -700.0  # e^-700 = 1e-304: negligible next to 1, and still a normal double


def quadrature_step(n: int) -> float:
    """Trapezoid step in the log variable: the integrand's peak narrows like 1/sqrt(n + 1)."""
    return min(0.1, 0.7 / math.sqrt(n + 1.0))


def quadrature_upper(n: int) -> float:
    """Upper end of the grid, y_hi = log(3n + 60): the integrand there is below exp(-(3n + 60))."""
    return math.log(3.0 * n + 60.0)


def grid_size(n: int, max_log_ratio: float = 0.0) -> int:
    """Number of grid points M for a set of n positions whose largest log r_j is `max_log_ratio`.

    The cost of the weights is O(n M) per sample; M is about 450 at n = 10, 520 at n = 64 and 1070 at n = 256 for
    flat attention, and grows by 1 / step per unit of `max_log_ratio` above 0 (very peaked attention).
    """
    lower = -max(max_log_ratio, 0.0) - _TAIL
    return int(math.floor((quadrature_upper(n) - lower) / quadrature_step(n))) + 1


def _log1mexp_exp(x: Tensor) -> Tensor:
    """log(1 - exp(-exp(x))) for every real x, never -inf for finite x. Overwrites x (saves a large buffer).

    log(-expm1(-e^x)) is accurate wherever e^x is a normal double (expm1 keeps full relative precision for tiny
    e^x, so this already equals the note's x - e^x / 2 branch on [-700, -30]). Below x = -700 the value is x to
    double precision: evaluate at max(x, -700) and add back the excess x - max(x, -700). This keeps log 0 and
    subnormal numbers (~10x slower on x86) out of every operation.
    """
    clamped = x.clamp_min(_NEGLIGIBLE)
    excess = x.sub_(clamped)  # (x - clamped) <= 0, zero unless x < -700
    return clamped.exp_().neg_().expm1_().neg_().log_().add_(excess)


def _logsumexp_(s: Tensor, dim: int) -> Tensor:
    """log-sum-exp of finite values along `dim`, overwriting s; terms below e^-700 of the largest count as e^-700.

    That changes the sum by at most M e^-700 relative, and skips the slow path of exp() deep in underflow.
    """
    top = s.amax(dim, keepdim=True)
    return s.sub_(top).clamp_min_(_NEGLIGIBLE).exp_().sum(dim).log_() + top.squeeze(dim)


def _check(log_attention: Tensor, indices: Tensor) -> None:
    if log_attention.dim() != 2 or not log_attention.is_floating_point():
        raise ValueError(
            f"Expected log_attention of shape (B, K), floating point. Got shape {tuple(log_attention.shape)}, "
            f"dtype {log_attention.dtype}."
        )
    if indices.dim() != 2 or indices.dtype != torch.long:
        raise ValueError(
            f"Expected indices of shape (B, n), dtype torch.long. Got shape {tuple(indices.shape)}, "
            f"dtype {indices.dtype}."
        )
    b, k = log_attention.shape
    if indices.shape[0] != b or not 1 <= indices.shape[1] <= k:
        raise ValueError(
            f"Expected indices (B, n) with B = {b} and 1 <= n <= K = {k}. Got shape {tuple(indices.shape)}."
        )
    if torch.isnan(log_attention).any() or torch.isposinf(log_attention).any():
        raise ValueError("log_attention contains NaN or +inf; pass log(attention) of a probability vector.")


@torch.no_grad()
def unordered_weights(log_attention: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Unordered-set weights `c` and `rho = c / a` of the sampled sets, each (B, n) float64.

    log_attention (B, K): log a, normalised (log-probabilities; masked positions -inf). indices (B, n): the sampled
    positions, distinct in each row, in any order (the result follows the column order; the weights depend on the
    set only). Computed in float64 on the device of `log_attention`, without gradients, and without any Python loop
    over samples or set elements.

    - c_s = P(first draw = s | S) = a_s rho_s; sum_s c_s = 1 (a free self-check, exact to ~1e-14).
    - A row whose outside mass is zero (N = K, or every unsampled position masked) is exact: c = a, rho = 1.
    - A masked position in the set (possible only in such a row) gets c = 0, rho = 1.
    - rho grows like 1 / P(s in S) for tiny a_s and overflows to inf only when a_s underflows (below ~1e-308);
      c stays finite and in [0, 1] (it is formed in log space).

    The grid is one common 1-D grid y (M,) for the whole batch, broadcast against (B, n): the step and the upper
    end depend on n only, and the lower end is the lowest of the rows' own `-max(max_j log r_j, 0) - 40`. A row
    whose own lower end is higher just gets extra points where its integrand is below e^-39 of its integral, which
    changes nothing; the trapezoid rule's accuracy does not depend on where the grid starts.
    """
    _check(log_attention, indices)
    log_a = log_attention.detach().to(torch.float64)  # (B, K)
    indices = indices.to(log_a.device)
    b, n = indices.shape
    in_set = torch.zeros(log_a.shape, dtype=torch.bool, device=log_a.device).scatter_(1, indices, True)  # (B, K)
    if bool((in_set.sum(1) != n).any()):
        raise ValueError("indices repeat a position within a row; expected a set drawn without replacement.")

    log_outside = log_a.masked_fill(in_set, -math.inf).logsumexp(1)  # (B,) L = log a(S^c), -inf if empty
    exact = torch.isneginf(log_outside)  # (B,) nothing outside S carries mass: c = a
    log_a_set = log_a.gather(1, indices)  # (B, n) log a_s
    if bool(exact.all()):  # e.g. N = K: no integral to compute
        return log_a_set.exp(), torch.ones_like(log_a_set)
    member = torch.isfinite(log_a_set) & ~exact[:, None]  # (B, n) set members that enter the integral
    log_r = torch.where(member, log_a_set - log_outside[:, None], torch.zeros_like(log_a_set))  # (B, n) log r_j

    step = quadrature_step(n)
    upper = quadrature_upper(n)
    top_log_r = log_r.masked_fill(~member, 0.0).amax(1).clamp_min(0.0)  # (B,) max(max_j log r_j, 0)
    lower = -float(top_log_r.max()) - _TAIL  # the batch's lowest y_lo
    m = int(math.floor((upper - lower) / step)) + 1
    y = upper - step * torch.arange(m - 1, -1, -1, dtype=torch.float64, device=log_a.device)  # (M,) ascending

    log_factor = _log1mexp_exp(log_r[:, :, None] + y)  # (B, n, M) l_j(y)
    if not bool(member.all()):
        log_factor.masked_fill_(~member[:, :, None], 0.0)  # excluded members: factor 1
    log_weight = y - torch.exp(y) + math.log(step)  # (M,) log of exp(y - e^y) dy
    log_total = log_weight + log_factor.sum(1)  # (B, M) log of the integrand of I(S), times dy
    log_i = _logsumexp_(log_total.clone(), -1)  # (B,) log I(S)
    # Leave one out as T - l_s, in place: (B, n, M). The subtraction cancels at most eps * |l_s|, the order of the
    # rounding already in log a_s; the tests find relative error 1e-13 at a_s = 1e-304 (as with prefix + suffix sums).
    log_i_without = _logsumexp_(log_factor.neg_().add_(log_total[:, None, :]), -1)  # (B, n) log I(S \ s)
    log_rho = log_i_without - log_i[:, None]  # (B, n)

    log_rho = log_rho.masked_fill(exact[:, None], 0.0)
    c = torch.exp(log_a_set + log_rho)  # (B, n); 0 for masked members (log a = -inf)
    return c, torch.exp(log_rho)
