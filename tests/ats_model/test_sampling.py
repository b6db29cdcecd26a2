"""`sample` draws in Plackett–Luce draw order, batched and seedable; empirical frequencies match exactly computed
probabilities within tolerances derived from the standard error (fixed seed)."""
from __future__ import annotations

import math

import pytest
import torch

from ats_model.sampling import sample
from tests.ats_model.enumeration import draw_probabilities, draws

M = 200_000  # draws per frequency check
Z = 5.0  # |freq - p| < Z standard errors per cell; 5 sigma over <= 64 cells: false alarm odds ~ 4e-5 per check


def _frequencies(indices: torch.Tensor, tuples: torch.Tensor, k: int) -> torch.Tensor:
    """Fraction of rows equal to each tuple, by encoding tuples as base-k integers."""
    n = tuples.shape[1]
    base = k ** torch.arange(n - 1, -1, -1)
    codes = (indices * base).sum(1)
    table = torch.bincount(codes, minlength=k**n).double() / indices.shape[0]
    return table[(tuples * base).sum(1)]


@pytest.mark.parametrize("replace", [False, True], ids=["without", "with"])
@pytest.mark.parametrize("k,n", [(4, 2), (4, 3), (5, 2)])
def test_draw_order_frequencies_match_plackett_luce(k, n, replace):
    logits = torch.tensor([[1.2, -0.3, 0.4, 0.0, -1.0][:k]], dtype=torch.float64)
    gen = torch.Generator().manual_seed(1234)
    indices = sample(logits.expand(M, k), n, replace=replace, generator=gen)  # (M, n)
    tuples = draws(k, n, replace)
    p = draw_probabilities(torch.softmax(logits, 1), tuples, replace)[0]  # (T,)
    freq = _frequencies(indices, tuples, k)
    se = torch.sqrt(p * (1 - p) / M)
    assert float(freq.sum()) == pytest.approx(1.0)  # no draw outside the enumerated tuples (no repeats w/o repl.)
    assert bool(((freq - p).abs() < Z * se).all()), f"max z = {float(((freq - p).abs() / se).max()):.2f}"


def test_batched_rows_use_their_own_logits():
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    indices = sample(logits.repeat(2000, 1), 1, replace=False, generator=torch.Generator().manual_seed(0))
    first = indices[:, 0].reshape(2000, 2)
    assert (first[:, 0] == 0).float().mean() > 0.95 and (first[:, 1] == 2).float().mean() > 0.95


def test_seeded_generator_is_reproducible():
    logits = torch.randn(4, 30)
    a = sample(logits, 5, replace=False, generator=torch.Generator().manual_seed(7))
    b = sample(logits, 5, replace=False, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.dtype == torch.long and a.shape == (4, 5)


def test_without_replacement_never_repeats_and_never_draws_masked():
    logits = torch.randn(64, 10)
    logits[:, 7:] = -math.inf
    indices = sample(logits, 7, replace=False, generator=torch.Generator().manual_seed(1))
    assert (indices < 7).all()
    assert all(len(set(row.tolist())) == 7 for row in indices)
    with_repl = sample(logits, 50, replace=True, generator=torch.Generator().manual_seed(1))
    assert (with_repl < 7).all()


def test_too_many_samples_raise_with_the_fix():
    logits = torch.zeros(2, 5)
    logits[1, 2:] = -math.inf
    with pytest.raises(ValueError, match="Lower n_patches"):
        sample(logits, 3, replace=False)
    with pytest.raises(ValueError, match="Lower n_patches"):
        sample(torch.zeros(1, 4), 5, replace=False)
    sample(logits, 30, replace=True)  # with replacement any n works while one position is unmasked


@pytest.mark.parametrize(
    "logits,match", [(torch.zeros(4), r"\(B, K\)"), (torch.tensor([[0.0, float("nan")]]), "NaN")]
)
def test_bad_logits_are_rejected(logits, match):
    with pytest.raises(ValueError, match=match):
        sample(logits, 1, replace=False)


@pytest.mark.gpu
def test_cuda_sampling_frequencies():
    logits = torch.tensor([[1.0, 0.0, -1.0]], device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    indices = sample(logits.expand(M, 3), 1, replace=False, generator=gen).cpu()
    p = torch.softmax(logits.cpu().double(), 1)[0]
    freq = torch.bincount(indices[:, 0], minlength=3).double() / M
    assert bool(((freq - p).abs() < Z * torch.sqrt(p * (1 - p) / M)).all())
