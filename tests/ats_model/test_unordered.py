"""The unordered-set weights against Plackett-Luce enumeration.

Reference: P(first draw = s | S) by summing the Plackett-Luce probability of every order of the set S (in log space,
float64, the mass not yet drawn summed from what is left), never the inclusion-exclusion closed form, which cancels.
Unbiasedness: exact expectations over every ordered draw of N out of K.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from ats_model.unordered import grid_size, quadrature_step, unordered_weights

KS = (4, 5, 6, 7)


def _ns(k: int) -> list[int]:
    return sorted({1, 2, 3, k})


def _log_attention(k: int, scale: float, seed: int, rows: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(scale * torch.randn(rows, k, generator=g, dtype=torch.float64), 1)  # (rows, K)


def _log_order_probability(log_a: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """log P(the first draws are `orders`, in that order) under Plackett-Luce. log_a (K,), orders (T, n) -> (T,)."""
    k = log_a.shape[0]
    t, n = orders.shape
    left = torch.ones(t, k, dtype=torch.bool)  # positions not yet drawn
    total = torch.zeros(t, dtype=torch.float64)
    for m in range(n):  # n <= 7: a loop over draw steps in the reference only
        log_left = log_a.expand(t, k).masked_fill(~left, -math.inf).logsumexp(1)  # (T,) mass not yet drawn
        total = total + log_a[orders[:, m]] - log_left
        left[torch.arange(t), orders[:, m]] = False
    return total


def reference_weights(log_a: torch.Tensor, subset: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, log rho) for one set: c_s = P(first = s | S) by enumerating the orders of S; log_a (K,)."""
    orders = torch.tensor(list(itertools.permutations(subset)), dtype=torch.long)  # (n!, n)
    log_p = _log_order_probability(log_a, orders)  # (n!,)
    log_set = log_p.logsumexp(0)  # log P(S)
    log_c = torch.stack([log_p[orders[:, 0] == s].logsumexp(0) for s in subset]) - log_set  # (n,)
    return log_c.exp(), log_c - log_a[list(subset)]


def _all_sets(log_a: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every set of n positions of every row: (R, K) log attention rows, (R, n) indices, (R, n) reference c."""
    rows, idx, ref = [], [], []
    for row in log_a:
        finite = [i for i in range(row.shape[0]) if math.isfinite(row[i])]
        for subset in itertools.combinations(finite, n):
            rows.append(row)
            idx.append(subset)
            ref.append(reference_weights(row, subset)[0])
    return torch.stack(rows), torch.tensor(idx, dtype=torch.long), torch.stack(ref)


# ---------------------------------------------------------------------------------------------------- (a) reference
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("scale", [1.0, 3.0, 30.0])
def test_weights_equal_first_draw_probability_given_the_set(k: int, scale: float) -> None:
    log_a = _log_attention(k, scale, seed=100 * k + int(scale), rows=3)  # a batch whose rows differ
    for n in _ns(k):
        rows, idx, ref = _all_sets(log_a, n)
        c, rho = unordered_weights(rows, idx)
        assert c.dtype == rho.dtype == torch.float64 and c.shape == rho.shape == idx.shape
        torch.testing.assert_close(c, ref, rtol=1e-11, atol=1e-12)
        torch.testing.assert_close(rho * rows.gather(1, idx).exp(), c, rtol=1e-13, atol=0)


def test_weights_depend_on_the_set_only_not_on_column_order() -> None:
    log_a = _log_attention(7, 3.0, seed=1)
    idx = torch.tensor([[5, 0, 3, 2]])
    perm = torch.tensor([2, 0, 3, 1])
    c, rho = unordered_weights(log_a, idx)
    c_p, rho_p = unordered_weights(log_a, idx[:, perm])
    torch.testing.assert_close(c_p, c[:, perm], rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(rho_p, rho[:, perm], rtol=1e-14, atol=0)


def test_batch_rows_are_independent() -> None:
    """A row's weights do not change when batched with rows of very different spread (the shared grid)."""
    log_a = torch.cat([_log_attention(7, 1.0, seed=2), _log_attention(7, 30.0, seed=3)])
    idx = torch.tensor([[1, 4, 6], [0, 2, 5]])
    c, rho = unordered_weights(log_a, idx)
    for r in range(2):
        c_r, rho_r = unordered_weights(log_a[r : r + 1], idx[r : r + 1])
        torch.testing.assert_close(c[r], c_r[0], rtol=1e-13, atol=1e-15)


# ------------------------------------------------------------------------------------------------------- (b) sum to 1
@pytest.mark.parametrize("k,n,scale", [(7, 3, 1.0), (7, 3, 30.0), (1024, 64, 1.0), (1024, 64, 3.0), (4096, 256, 1.0)])
def test_weights_sum_to_one(k: int, n: int, scale: float) -> None:
    g = torch.Generator().manual_seed(k + n)
    logits = scale * torch.randn(4, k, generator=g, dtype=torch.float64)
    keys = logits - torch.log(-torch.log(torch.rand(4, k, generator=g, dtype=torch.float64)))  # Gumbel top-k
    idx = keys.topk(n, dim=1).indices
    c, rho = unordered_weights(torch.log_softmax(logits, 1), idx)
    torch.testing.assert_close(c.sum(1), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-12)
    assert bool((c >= 0).all()) and bool((rho >= 1 - 1e-12).all())


# ---------------------------------------------------------------------------------------------- (c) unbiasedness
def _ordered_draws(log_a: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ordered n-tuple of distinct positions (T, n) and its Plackett-Luce probability (T,)."""
    k = log_a.shape[0]
    draws = torch.tensor(list(itertools.permutations(range(k), n)), dtype=torch.long)
    return draws, _log_order_probability(log_a, draws).exp()


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("scale", [1.0, 3.0, 30.0])
def test_unbiased_by_exact_enumeration(k: int, scale: float) -> None:
    log_a = _log_attention(k, scale, seed=7 * k + int(scale))[0]  # (K,)
    a = log_a.exp()
    f = torch.randn(k, 3, generator=torch.Generator().manual_seed(k), dtype=torch.float64)  # (K, D)
    for n in _ns(k):
        draws, prob = _ordered_draws(log_a, n)  # (T, n), (T,)
        assert abs(float(prob.sum()) - 1) < 1e-12
        c, _ = unordered_weights(log_a.expand(draws.shape[0], k), draws)  # (T, n)
        forward = (c[:, :, None] * f[draws]).sum(1)  # (T, D) sum_s c_s f_s
        torch.testing.assert_close(prob @ forward, a @ f, rtol=0, atol=1e-12)
        inclusion = torch.zeros(draws.shape[0], k, dtype=torch.float64).scatter_(1, draws, c)  # (T, K) c_i 1(i in S)
        torch.testing.assert_close(prob @ inclusion, a, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------- (d) edge cases
@pytest.mark.parametrize("k", KS)
def test_full_set_is_exact(k: int) -> None:
    log_a = _log_attention(k, 3.0, seed=k, rows=2)
    idx = torch.stack([torch.randperm(k, generator=torch.Generator().manual_seed(r)) for r in range(2)])
    c, rho = unordered_weights(log_a, idx)
    assert torch.equal(c, log_a.gather(1, idx).exp())
    assert torch.equal(rho, torch.ones_like(rho))


def test_masked_positions_carry_no_mass() -> None:
    """Masked (-inf) positions outside the set do not enter L: same weights as the problem without them."""
    full = _log_attention(7, 2.0, seed=11)[0]
    keep = torch.tensor([0, 2, 3, 5, 6])
    masked = torch.full((7,), -math.inf, dtype=torch.float64)
    masked[keep] = full[keep] - full[keep].logsumexp(0)
    for subset in [(0, 3), (2, 5, 6), (6,)]:
        c, rho = unordered_weights(masked[None], torch.tensor([subset]))
        ref, log_rho = reference_weights(masked, subset)
        torch.testing.assert_close(c[0], ref, rtol=1e-11, atol=1e-13)
        torch.testing.assert_close(rho[0].log(), log_rho, rtol=0, atol=1e-11)


def test_masked_positions_in_the_set_when_every_finite_one_is_drawn() -> None:
    """n > number of finite positions (padding of a small image): the set holds all the mass, c = a exactly."""
    log_a = torch.tensor([[-0.5, -math.inf, -1.2, -math.inf, -2.0]], dtype=torch.float64)
    log_a = log_a - log_a.logsumexp(1, keepdim=True)
    idx = torch.tensor([[2, 0, 4, 1]])
    c, rho = unordered_weights(log_a, idx)
    assert torch.isfinite(c).all() and torch.isfinite(rho).all()
    assert torch.equal(c, log_a.gather(1, idx).exp())  # 0 for the masked member
    assert c[0, 3] == 0 and abs(float(c.sum()) - 1) < 1e-15


def test_uniform_attention_gives_the_sample_mean() -> None:
    """Ties: uniform attention gives c = 1/N exactly (the classical without-replacement mean)."""
    for k, n in [(7, 3), (1000, 10), (1000, 256)]:
        log_a = torch.full((2, k), -math.log(k), dtype=torch.float64)
        idx = torch.stack([torch.randperm(k, generator=torch.Generator().manual_seed(r))[:n] for r in range(2)])
        c, _ = unordered_weights(log_a, idx)
        torch.testing.assert_close(c, torch.full_like(c, 1.0 / n), rtol=1e-12, atol=0)


def test_tied_logits_match_enumeration() -> None:
    log_a = torch.log_softmax(torch.tensor([1.0, 1.0, 1.0, -2.0, 0.5, 0.5], dtype=torch.float64), 0)
    for subset in [(0, 1), (0, 3, 4), (1, 2, 4, 5)]:
        c, _ = unordered_weights(log_a[None], torch.tensor([subset]))
        torch.testing.assert_close(c[0], reference_weights(log_a, subset)[0], rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("log_tiny", [math.log(1e-12), -40.0, -300.0, -700.0])
def test_near_zero_attention_in_the_set(log_tiny: float) -> None:
    """A member with tiny attention: c stays accurate (relative), rho ~ 1 / P(s in S) stays finite."""
    logits = torch.tensor([0.0, 0.3, -0.5, log_tiny, log_tiny - 5.0, 1.0], dtype=torch.float64)
    log_a = torch.log_softmax(logits, 0)
    for subset in [(3, 5), (0, 3, 4), (1, 2, 3, 5), (3,)]:
        c, rho = unordered_weights(log_a[None], torch.tensor([subset]))
        ref, log_rho = reference_weights(log_a, subset)
        assert torch.isfinite(c).all() and torch.isfinite(rho).all()
        torch.testing.assert_close(c[0], ref, rtol=1e-11, atol=1e-300)
        torch.testing.assert_close(rho[0].log(), log_rho, rtol=0, atol=1e-11)


def test_float32_input_and_validation() -> None:
    log_a = _log_attention(6, 1.0, seed=5)
    c64, _ = unordered_weights(log_a, torch.tensor([[0, 4]]))
    c32, _ = unordered_weights(log_a.float(), torch.tensor([[0, 4]]))
    assert c32.dtype == torch.float64
    torch.testing.assert_close(c32, c64, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="repeat"):
        unordered_weights(log_a, torch.tensor([[1, 1]]))
    with pytest.raises(ValueError, match="1 <= n <= K"):
        unordered_weights(log_a, torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="torch.long"):
        unordered_weights(log_a, torch.tensor([[0, 1]], dtype=torch.int32))


def test_grid_size_matches_the_rule() -> None:
    assert quadrature_step(10) == 0.1 and quadrature_step(256) == pytest.approx(0.7 / math.sqrt(257))
    assert 400 < grid_size(10) < 500 and 480 < grid_size(64) < 560 and 1000 < grid_size(256) < 1100
    assert grid_size(64, 20.0) == pytest.approx(grid_size(64) + 20.0 / quadrature_step(64), abs=1)


# ---------------------------------------------------------------------------------------------- (e) CUDA
@pytest.mark.gpu
def test_cuda_matches_reference() -> None:
    log_a = _log_attention(6, 3.0, seed=9, rows=2)
    rows, idx, ref = _all_sets(log_a, 3)
    c, rho = unordered_weights(rows.cuda(), idx.cuda())
    assert c.device.type == "cuda" and rho.device.type == "cuda" and c.dtype == torch.float64
    torch.testing.assert_close(c.cpu(), ref, rtol=1e-11, atol=1e-12)
    c_cpu, rho_cpu = unordered_weights(rows, idx)
    torch.testing.assert_close(rho.cpu(), rho_cpu, rtol=1e-12, atol=0)
    # larger sizes, and the exact branch, on the device
    g = torch.Generator().manual_seed(0)
    logits = 3.0 * torch.randn(8, 32400, generator=g, dtype=torch.float64)
    idx = (logits - torch.log(-torch.log(torch.rand(8, 32400, generator=g, dtype=torch.float64)))).topk(256, 1).indices
    c, _ = unordered_weights(torch.log_softmax(logits, 1).cuda(), idx.cuda())
    c_cpu, _ = unordered_weights(torch.log_softmax(logits, 1), idx)
    torch.testing.assert_close(c.cpu(), c_cpu, rtol=1e-12, atol=1e-15)
    full = unordered_weights(log_a.cuda(), torch.arange(6).repeat(2, 1).cuda())[0]
    assert torch.equal(full.cpu(), log_a.exp())
