"""Variance of the attention-sampling estimators: with replacement, ordered and unordered-set weights.

Every estimator is linear in the sampled features, F = sum_s c_s f_s with E[c_i 1(i in S)] = a_i, and its logit
gradient is the weights-detached lemma G_k = c_k h_k 1[k in S] - a_k sum_s c_s h_s, h = <g, f>
(research/lower-variance-estimators.md, section 2). Weights:

- WR:  N draws with replacement, c = 1/N per draw
- ORD: Gumbel top-k, c_m = (p_m + (N - 1 - m) a_{I_m}) / N, p_m = attention not yet drawn before draw m
- US:  Gumbel top-k, c_s = P(first draw = s | set), from `ats_model.unordered.unordered_weights`

Three parts, printed as markdown:
1. exact enumeration of every ordered draw (Plackett-Luce / product probabilities) on the note's grid:
   K in {5,6,7}, N in {1,2,3,4}, D in {1,3}, logits ~ N(0, scale^2) with scale 1 and 3, f, g ~ N(0,1); each
   row is the geometric mean over seeds and D of the per-case ratio of total variances;
2. Monte Carlo at K = 1024, N = 64 (flat and peaked attention);
3. the time of `unordered_weights` per sample at N = 10, 64, 256 (batch 8, K = 32400) on CPU.

Run: python benchmarks/estimator_variance.py [--quick] [--threads T]
"""
from __future__ import annotations

import argparse
import itertools
import math
import statistics
import time

import numpy as np
import torch

from ats_model.unordered import grid_size, unordered_weights


# ------------------------------------------------------------------------------------------------ weights
def ordered_weights(a: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """ORD weights (T, N) of ordered draws (T, N) from attention a (K,); p_m = the attention still left, summed
    over the positions not yet drawn (never 1 - cumsum)."""
    n = draws.shape[1]
    outside_mask = np.ones((draws.shape[0], a.shape[0]), bool)
    np.put_along_axis(outside_mask, draws, False, 1)
    outside = (outside_mask * a).sum(1, keepdims=True)  # (T, 1)
    drawn = a[draws]
    suffix = np.cumsum(drawn[:, ::-1], 1)[:, ::-1]  # (T, N) sum_{j >= m} a_{I_j}
    return (outside + suffix + np.arange(n - 1, -1, -1) * drawn) / n


def us_weights(log_a: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """US weights (T, N) of draws (T, N), through the library function (float64)."""
    la = torch.from_numpy(log_a).expand(draws.shape[0], -1)
    c, _ = unordered_weights(la, torch.from_numpy(draws).long())
    return c.numpy()


# ------------------------------------------------------------------------------------------------ enumeration
def without_replacement(log_a: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Every ordered n-tuple of distinct positions (T, n) and its Plackett-Luce probability (T,)."""
    k = log_a.shape[0]
    draws = np.array(list(itertools.permutations(range(k), n)), dtype=np.int64).reshape(-1, n)
    left = np.ones((draws.shape[0], k), bool)
    log_p = np.zeros(draws.shape[0])
    for m in range(n):  # n <= 4 draw steps
        masked = np.where(left, log_a, -np.inf)
        top = masked.max(1)
        log_left = top + np.log(np.exp(masked - top[:, None]).sum(1))  # log of the attention not yet drawn
        log_p += log_a[draws[:, m]] - log_left
        left[np.arange(draws.shape[0]), draws[:, m]] = False
    return draws, np.exp(log_p)


def with_replacement(a: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Every ordered n-tuple of positions (K^n, n) and its probability."""
    draws = np.array(list(itertools.product(range(a.shape[0]), repeat=n)), dtype=np.int64).reshape(-1, n)
    return draws, a[draws].prod(1)


def dense(draws: np.ndarray, c: np.ndarray, k: int) -> np.ndarray:
    """Weights per position (T, K): sum of c over the draws that hit each position."""
    out = np.zeros((draws.shape[0], k))
    np.add.at(out, (np.repeat(np.arange(draws.shape[0]), draws.shape[1]), draws.ravel()), c.ravel())
    return out


def estimates(weights: np.ndarray, a: np.ndarray, f: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Forward F (T, D) and logit gradient G (T, K) of dense weights (T, K)."""
    h = f @ g  # (K,)
    forward = weights @ f  # (T, D)
    grad = weights * h - a * (weights @ h)[:, None]  # (T, K)
    return forward, grad


def exact_moments(prob: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, float]:
    """Mean and total variance of x (T, ...) under prob (T,)."""
    mean = np.tensordot(prob, x, 1)
    return mean, float(np.tensordot(prob, ((x - mean) ** 2).reshape(x.shape[0], -1).sum(1), 1))


def enumeration_table(quick: bool) -> list[str]:
    scales, ks, ns = (1.0, 3.0), ((5, 6) if quick else (5, 6, 7)), ((1, 2, 3) if quick else (1, 2, 3, 4))
    seeds = range(2 if quick else 20)
    worst_us_ord, worst_bias, worst_sum = 0.0, 0.0, 0.0
    lines = [
        "| scale | K | N | ORD/WR F | ORD/WR G | US/WR F | US/WR G | **US/ORD F** | **US/ORD G** | max US/ORD |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for scale, k, n in itertools.product(scales, ks, ns):
        ratios: dict[str, list[float]] = {key: [] for key in ("ow_f", "ow_g", "uw_f", "uw_g", "uo_f", "uo_g")}
        for seed in seeds:
            rng = np.random.default_rng([seed, k, n, int(scale)])
            z = rng.normal(size=k) * scale
            log_a = z - (z.max() + np.log(np.exp(z - z.max()).sum()))
            a = np.exp(log_a)
            wo_draws, wo_prob = without_replacement(log_a, n)
            c_us = us_weights(log_a, wo_draws)
            worst_sum = max(worst_sum, float(np.abs(c_us.sum(1) - 1).max()))
            schemes = {
                "ORD": (wo_prob, dense(wo_draws, ordered_weights(a, wo_draws), k)),
                "US": (wo_prob, dense(wo_draws, c_us, k)),
            }
            wr_draws, wr_prob = with_replacement(a, n)
            schemes["WR"] = (wr_prob, dense(wr_draws, np.full(wr_draws.shape, 1.0 / n), k))
            for d in (1, 3):
                f, g = rng.normal(size=(k, d)), rng.normal(size=d)
                h = f @ g
                truth_f, truth_g = a @ f, a * (h - a @ h)
                var = {}
                for name, (prob, weights) in schemes.items():
                    forward, grad = estimates(weights, a, f, g)
                    mean_f, var_f = exact_moments(prob, forward)
                    mean_g, var_g = exact_moments(prob, grad)
                    bias_f = np.abs(mean_f - truth_f).max() / (a @ np.abs(f).sum(1))
                    bias_g = np.abs(mean_g - truth_g).max() / (a @ (np.abs(h) + abs(a @ h)))
                    worst_bias = max(worst_bias, float(bias_f), float(bias_g))
                    var[name] = (var_f, var_g)
                for i, axis in enumerate("fg"):
                    ratios[f"ow_{axis}"].append(var["ORD"][i] / var["WR"][i])
                    ratios[f"uw_{axis}"].append(var["US"][i] / var["WR"][i])
                    ratios[f"uo_{axis}"].append(var["US"][i] / var["ORD"][i])
        row_worst = max(ratios["uo_f"] + ratios["uo_g"])
        if n >= 2:
            worst_us_ord = max(worst_us_ord, row_worst)
        gm = {key: math.exp(statistics.fmean(math.log(v) for v in vals)) for key, vals in ratios.items()}
        lines.append(
            f"| {scale:g} | {k} | {n} | {_fmt(gm['ow_f'])} | {_fmt(gm['ow_g'])} | {_fmt(gm['uw_f'])} | "
            f"{_fmt(gm['uw_g'])} | **{_fmt(gm['uo_f'])}** | **{_fmt(gm['uo_g'])}** | {_fmt(row_worst)} |"
        )
    lines += [
        "",
        f"- cases per row: {len(seeds)} seeds x D in {{1,3}}; geometric mean of per-case ratios; "
        "max US/ORD = the largest single-case ratio in the row (F or G).",
        f"- largest Var(US)/Var(ORD) over every case with N >= 2, F or G: {worst_us_ord:.4f} (Rao-Blackwell: <= 1)",
        f"- largest relative bias of E[F], E[G] (WR, ORD, US) over all cases: {worst_bias:.1e}; "
        f"largest |sum_s c_s - 1| (US): {worst_sum:.1e}",
    ]
    return lines


def _fmt(v: float) -> str:
    return f"{v:.3f}" if v >= 0.01 else f"{v:.0e}"


# ------------------------------------------------------------------------------------------------ Monte Carlo
def monte_carlo_rows(quick: bool) -> list[str]:
    k, n, d = 1024, 64, 8
    draws_total, chunks = (400, 4) if quick else (4000, 10)
    lines = [
        f"| K | N | scale | draws | mass in S | ORD/WR F | ORD/WR G | **US/ORD F** | **US/ORD G** |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for scale in (1.0, 3.0):
        gen = torch.Generator().manual_seed(int(1000 * scale) + k + n)
        z = scale * torch.randn(k, generator=gen, dtype=torch.float64)
        log_a = torch.log_softmax(z, 0)
        a = log_a.exp().numpy()
        f = torch.randn(k, d, generator=gen, dtype=torch.float64).numpy()
        g = torch.randn(d, generator=gen, dtype=torch.float64).numpy()
        u = torch.rand(draws_total, k, generator=gen, dtype=torch.float64).clamp_min(1e-300)
        keys = z - torch.log(-torch.log(u))  # Gumbel top-k: columns in draw order
        wo = keys.topk(n, dim=1).indices  # (R, N)
        wr = torch.multinomial(log_a.exp().expand(draws_total, k), n, replacement=True, generator=gen)  # (R, N)
        c_us = torch.cat([unordered_weights(log_a.expand(len(part), k), part)[0] for part in wo.split(500)])
        wo_np = wo.numpy()
        out = {}
        for name, draws, c in [
            ("ORD", wo_np, ordered_weights(a, wo_np)),
            ("US", wo_np, c_us.numpy()),
            ("WR", wr.numpy(), np.full((draws_total, n), 1.0 / n)),
        ]:
            forward, grad = estimates(dense(draws, c, k), a, f, g)
            out[name] = [(_var(forward[p]), _var(grad[p])) for p in np.array_split(np.arange(draws_total), chunks)]
            out[name].append((_var(forward), _var(grad)))
        mass = float(a[wo_np].sum(1).mean())
        cells = []
        for num, den, i in [("ORD", "WR", 0), ("ORD", "WR", 1), ("US", "ORD", 0), ("US", "ORD", 1)]:
            ratio = out[num][-1][i] / out[den][-1][i]
            parts = [x[i] / y[i] for x, y in zip(out[num][:-1], out[den][:-1])]
            cells.append(f"{ratio:.3f} ± {statistics.stdev(parts) / math.sqrt(chunks):.3f}")
        lines.append(
            f"| {k} | {n} | {scale:g} | {draws_total} | {mass:.2f} | {cells[0]} | {cells[1]} | **{cells[2]}** | "
            f"**{cells[3]}** |"
        )
    lines += ["", f"D = {d}; ± is the standard error over {chunks} batches of draws."]
    return lines


def _var(x: np.ndarray) -> float:
    return float(x.var(0, ddof=1).sum())


# ------------------------------------------------------------------------------------------------ cost
def timing_rows(quick: bool) -> list[str]:
    batch, k = 8, 32400
    repeats = 2 if quick else 7
    lines = [
        f"| N | logit scale | grid M (max in batch) | US weights ms/sample | US ms/batch | ORD weights ms/sample |",
        "|---|---|---|---|---|---|",
    ]
    for n, scale in itertools.product((10, 64, 256), (1.0, 3.0)):
        gen = torch.Generator().manual_seed(n)
        z = scale * torch.randn(batch, k, generator=gen, dtype=torch.float64)
        keys = z - torch.log(-torch.log(torch.rand(batch, k, generator=gen, dtype=torch.float64).clamp_min(1e-300)))
        idx = keys.topk(n, dim=1).indices
        log_a = torch.log_softmax(z, 1)
        us = _best_time(lambda: unordered_weights(log_a, idx), repeats)
        a32 = log_a.exp().float()
        ord_time = _best_time(lambda: _ordered_torch(a32, idx), repeats)
        in_set = torch.zeros(batch, k, dtype=torch.bool).scatter_(1, idx, True)
        top = (log_a.gather(1, idx).amax(1) - log_a.masked_fill(in_set, -math.inf).logsumexp(1)).max()
        m = grid_size(n, float(top))
        lines.append(
            f"| {n} | {scale:g} | {m} | {1e3 * us / batch:.3f} | {1e3 * us:.2f} | {1e3 * ord_time / batch:.4f} |"
        )
    lines += [
        "",
        f"CPU, float64, torch threads = {torch.get_num_threads()}, batch {batch}, K = {k}; best of {repeats} "
        "(includes the masked log-sum-exp over K). ORD: the ordered weights in float32, for scale.",
    ]
    return lines


def _ordered_torch(attention: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    n = idx.shape[1]
    drawn = attention.gather(1, idx)
    in_set = torch.zeros(attention.shape, dtype=torch.bool).scatter_(1, idx, True)
    outside = attention.masked_fill(in_set, 0).sum(1, keepdim=True)
    left = outside + drawn.flip(1).cumsum(1).flip(1)
    return (left + torch.arange(n - 1, -1, -1, dtype=attention.dtype) * drawn) / n


def _best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small grid and few draws (smoke test, < 30 s)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print("## Estimator variance: with replacement (WR), ordered (ORD), unordered set (US)\n")
    print("### Exact enumeration over every ordered draw\n")
    print("\n".join(enumeration_table(args.quick)))
    print("\n### Monte Carlo, K = 1024, N = 64\n")
    print("\n".join(monte_carlo_rows(args.quick)))
    print("\n### Cost of the US weights\n")
    print("\n".join(timing_rows(args.quick)))
    print(f"\n(total {time.perf_counter() - start:.1f} s{', --quick' if args.quick else ''})")


if __name__ == "__main__":
    main()
