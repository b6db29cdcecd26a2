"""Benchmark time per sample and step memory against image size, batch 1: ATS-5/10/50 and U-10 (a fixed-size
low-res view plus N sampled 50 px patches), Deep MIL (every patch of a grid) and a CNN on the whole image at scales
0.25, 0.5 and 1, on Megapixel-MNIST-like images of side 1000 ... 16000 px, and 32000 px (a gigapixel) for ATS/U.

    .venv/bin/python benchmarks/cost_vs_size.py --smoke              # seconds; what tests/benchmarks runs
    nice -n 0 .venv/bin/python benchmarks/cost_vs_size.py            # the full study (tens of minutes)
    .venv/bin/python benchmarks/cost_vs_size.py --device cuda        # GPU timings; skips cleanly without CUDA
    options: --root DIR (pyramids, default .gats/bench/sizes) --view 250 --mem-cap-gb 6 --json OUT --plot PNG
    .venv/bin/python benchmarks/cost_vs_size.py --from-json OUT     # re-print the tables, re-draw the plot

Images: a black 1-channel uint8 canvas with the paper's 5 real MNIST digits and 50 digit-sized line-noise patterns
at every side (a fixed object count: the content per image does not grow with its area), built lazily block by
block (`pipeline.megapixel_mnist.lazy_image`) and stored as an OME-Zarr pyramid (256 px chunks, levels down to
<= 64 px) that is reused when complete. Nothing holds a whole canvas; a 32000 px side is 1 GB of pixels.

What is timed is the training job's step (see benchmarks/cost_step.py): pixels read from the stored pyramid through
`PatchReader` (low-res view + sampled patches; every grid patch; the CNN's level whole), forward, backward, Adam.
Nets are the paper's Megapixel MNIST ones (attention `mnist_tanh`, features `lenet1`, 50x50 level-0 patches); Deep
MIL uses stride = patch (non-overlapping: the cheapest grid its definition allows); the CNN is `build_model("cnn")`.
ATS/U take the pyramid level nearest `--view` px as their view (250 px for sides 1000 * 2^k, 188 px for 1500), so
their cost should not depend on the side. Each configuration runs in a fresh process with torch.set_num_threads(1):
warm-up steps, then the median over the timed steps (as many as fit in a 15 s budget, 3 to 20) and the step memory
of `training.memory.StepMemory` (RSS high-water mark minus resting RSS; on CUDA max_memory_allocated).

Deep MIL and the CNN run under a memory cap (RLIMIT_AS = the address space after the imports + --mem-cap-gb) and are
estimated first: step memory is extrapolated from the largest side measured (proportional to the level's pixels for
the CNN, to the number of grid patches for Deep MIL); an estimate over the cap is not run ("OOM (est. X GB)", and
every larger side too); a run that fails to allocate reads "OOM at cap".
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cost_step import Job, Method, run_job  # noqa: E402
from benchmarks.machine import load_average  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PATCH, N_DIGITS, N_NOISE, SEED = 50, 5, 50, 0  # training.config.ModelConfig().patch_hw; the paper's recipe
METHODS = (Method("ATS-5", "ats", 5), Method("ATS-10", "ats", 10), Method("ATS-50", "ats", 50),
           Method("U-10", "uniform", 10), Method("Deep MIL", "deepmil"), Method("CNN-0.25", "cnn", cnn_scale=0.25),
           Method("CNN-0.5", "cnn", cnn_scale=0.5), Method("CNN-1", "cnn", cnn_scale=1.0))


@dataclass(frozen=True, slots=True)
class Settings:
    sides: tuple[int, ...]  # every method
    giga_sides: tuple[int, ...]  # ATS/U only
    methods: tuple[Method, ...]
    ref_side: int  # targets (a) and (b)
    warmup: int = 2
    min_steps: int = 3
    max_steps: int = 10
    budget_s: float = 15.0  # timed seconds a configuration aims at
    tight_cap: str = ""  # smoke: this method's cap becomes 2x its first step memory, forcing an estimated OOM


FULL = Settings(sides=(1000, 1500, 2000, 4000, 8000, 16000), giga_sides=(32000,), methods=METHODS, ref_side=1500,
                max_steps=20)
SMOKE = Settings(sides=(256, 512), giga_sides=(1024,), methods=tuple(METHODS[i] for i in (1, 4, 7)),
                 ref_side=256, warmup=1, min_steps=2, max_steps=2, budget_s=0.0, tight_cap="CNN-1")


@dataclass(frozen=True, slots=True)
class Cell:
    """One table entry: status ok (measured), oom-est (not run), oom-cap (failed under the cap) or oom-after (not
    run: a smaller side failed under the cap)."""

    status: str
    ms: float = math.nan
    mb: float = math.nan
    est_mb: float = math.nan  # the estimate made before running (nan when there was nothing to extrapolate from)
    steps: int = 0
    raw: dict | None = None

    def text(self) -> str:
        if self.status == "ok":
            return f"{self.ms:,.1f} ms / {self.mb:,.1f} MB"
        if self.status == "oom-est":
            return f"OOM (est. {self.est_mb / 1024:,.1f} GB)"
        return "OOM at cap" if self.status == "oom-cap" else "not run (OOM at a smaller side)"


def image_id(side: int) -> str:
    return f"mmnist-{side}-d{N_DIGITS}-n{N_NOISE}-s{SEED}"  # the recipe is in the name: a new recipe, new pyramids


def make_pyramids(root: str, sides: list[int]) -> dict[int, int]:
    """Write (or reuse, when complete) one pyramid per side; returns side -> label. Prints the time each took."""
    from pipeline import megapixel_mnist as mm
    from pipeline.pyramid import is_complete, write_pyramid

    bank, labels, total = None, {}, time.perf_counter()
    for side in sides:
        config = mm.MegapixelMNISTConfig(size=side, n_digits=N_DIGITS, n_noise=N_NOISE, seed=SEED)
        labels[side] = int(mm.label_for(config, "test", 0))
        if is_complete(root, image_id(side)):
            print(f"pyramid {side:>6} px: reused (complete)", flush=True)
            continue
        bank = bank or mm.load_bank("test")
        start = time.perf_counter()
        lazy = mm.lazy_image(bank, "test", 0, config, chunk=256)  # (1, side, side) uint8, lazy
        info = write_pyramid(root, image_id(side), lazy.image, chunk=256, min_size=64)
        print(f"pyramid {side:>6} px: generated in {time.perf_counter() - start:.1f} s "
              f"({info.levels} levels, {info.shapes[-1][0]} px smallest)", flush=True)
    print(f"pyramids ready in {time.perf_counter() - total:.1f} s (generation only where not reused)\n", flush=True)
    return labels


def run_child(job: Job) -> dict[str, Any]:
    """Run `job` in a fresh interpreter; a child that dies without a result under the cap counts as OOM at cap."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, __file__, "--one", job.to_json()], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1800)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode == 0 and lines:
        return json.loads(lines[-1][len("RESULT "):])
    tail = done.stderr[-2000:]
    if done.returncode < 0 or any(s in tail.lower() for s in ("memory", "bad_alloc", "can't allocate")):
        return {"status": "oom", "error": f"exit {done.returncode}: {tail[-300:]}"}
    raise RuntimeError(f"{job.method.name} at {job.side} px failed (exit {done.returncode}):\n{tail}")


def units(method: Method, side: int) -> float:
    """What step memory grows with: grid patches (Deep MIL, stride = patch, as grid_boxes counts them), or the
    pixels of the level read (CNN)."""
    if method.model == "deepmil":
        return float((math.ceil(max(side - PATCH, 0) / PATCH) + 1) ** 2)
    return float(side * method.cnn_scale) ** 2


def benchmark(s: Settings, root: str, labels: dict[int, int], view: int, cap_gb: float, device: str
              ) -> dict[tuple[str, int], Cell]:
    cells: dict[tuple[str, int], Cell] = {}
    todo = [(m, side) for m in s.methods for side in s.sides + (() if m.capped else s.giga_sides)]
    for method in s.methods:
        cap_mb, last, failed = cap_gb * 1024, None, False  # last: (side, step_mb, ms) measured
        for side in s.sides + (() if method.capped else s.giga_sides):
            est = last[1] * units(method, side) / units(method, last[0]) if (method.capped and last) else math.nan
            if failed or est > cap_mb:
                cells[(method.name, side)] = Cell("oom-after" if failed else "oom-est", est_mb=est)
                why = "a smaller side failed" if failed else f"estimated step memory {est / 1024:,.2f} GB > cap"
                print(f"[{len(cells)}/{len(todo)}] {method.name:<8} {side:>6} px: not run, {why} "
                      f"({cap_mb / 1024:,.2f} GB)", flush=True)
                continue
            job = Job(method, side, image_id(side), labels[side], root, view, s.warmup, s.min_steps, s.max_steps,
                      s.budget_s, cap_mb / 1024, device)
            raw = run_child(job)
            if raw["status"] == "no-cuda":
                raise SystemExit("CUDA is not available in the child process: run without --device cuda.")
            if raw["status"] == "ok":
                cell = Cell("ok", raw["median_ms"], raw["step_mb"], est, len(raw["times_s"]), raw)
                last = (side, cell.mb, cell.ms)
                if method.name == s.tight_cap:
                    cap_mb = 2 * cell.mb
            else:
                cell, failed = Cell("oom-cap", est_mb=est, raw=raw), True
            cells[(method.name, side)] = cell
            note = "" if math.isnan(est) else f", estimate was {est:,.1f} MB"
            what = (f"{cell.ms:,.1f} ms/sample (median of {cell.steps}), step memory {cell.mb:,.1f} MB, "
                    f"level {raw['level']} {raw['level_hw'][0]}x{raw['level_hw'][1]}" if cell.status == "ok"
                    else f"OOM at cap {cap_mb / 1024:,.2f} GB ({raw.get('error', '')[:120]})")
            print(f"[{len(cells)}/{len(todo)}] {method.name:<8} {side:>6} px: {what}{note}", flush=True)
    return cells


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.inf


def report(s: Settings, cells: dict[tuple[str, int], Cell], cap_gb: float) -> list[str]:
    """The markdown table, the ratios and the targets; returns the lines (also printed)."""
    sides = s.sides + s.giga_sides
    out = ["| method | " + " | ".join(f"{x:,} px" for x in sides) + " |", "|---|" + "---:|" * len(sides)]
    for m in s.methods:
        row = [cells[(m.name, x)].text() if (m.name, x) in cells else "n/a" for x in sides]
        out.append(f"| {m.name} | " + " | ".join(row) + " |")
    out += ["", "Timed steps per configuration (median taken over these):", "",
            "| method | " + " | ".join(f"{x:,}" for x in sides) + " |", "|---|" + "---:|" * len(sides)]
    for m in s.methods:
        out.append(f"| {m.name} | " + " | ".join(str(cells[(m.name, x)].steps) if (m.name, x) in cells else "-"
                                                 for x in sides) + " |")
    ok = [c.raw for c in cells.values() if c.status == "ok"]
    if ok:
        out += ["", f"Step memory: {ok[0]['memory_method']}. torch threads: {ok[0]['threads']}. Address space after "
                    f"the imports: {statistics.median(r['vm_after_imports_mb'] for r in ok) / 1024:.2f} GB; "
                    f"cap: that + {cap_gb:g} GB."]
    out += ["", "| side | Deep MIL / ATS-10 time | memory | CNN-1 / ATS-10 time | memory |",
            "|---:|---:|---:|---:|---:|"]
    for x in sides:
        a = cells.get(("ATS-10", x))
        pairs = []
        for other in ("Deep MIL", "CNN-1"):
            o = cells.get((other, x))
            both = a and o and a.status == o.status == "ok"
            pairs += ([f"{_ratio(o.ms, a.ms):,.1f}x", f"{_ratio(o.mb, a.mb):,.1f}x"] if both else ["-", "-"])
        if a and a.status == "ok" and pairs != ["-"] * 4:
            out.append(f"| {x:,} | " + " | ".join(pairs) + " |")
    out += ["", "Targets:"] + targets(s, cells)
    for line in out:
        print(line)
    return out


def targets(s: Settings, cells: dict[tuple[str, int], Cell]) -> list[str]:
    lines = []
    a = cells.get(("ATS-10", s.ref_side))
    for label, other, t_min, m_min in (("(a) vs Deep MIL", "Deep MIL", 25, 30), ("(b) vs CNN-1", "CNN-1", 10, 10)):
        o = cells.get((other, s.ref_side))
        if not (a and o and a.status == o.status == "ok"):
            lines.append(f"- {label} at {s.ref_side} px: not measured (one of the two did not run)")
            continue
        rt, rm = _ratio(o.ms, a.ms), _ratio(o.mb, a.mb)
        met = "met" if rt >= t_min and rm >= m_min else "MISSED"
        lines.append(f"- {label} at {s.ref_side} px: >= {t_min}x less time and >= {m_min}x less step memory: "
                     f"{met} (measured {rt:,.1f}x time, {rm:,.1f}x memory)")
    runs = [(x, c) for x in s.sides + s.giga_sides if (c := cells.get(("ATS-10", x))) and c.status == "ok"]
    if len(runs) >= 2:  # (c) over the sides whose view has the smallest side's size (1500 px gets 188 px, not 250)
        (x0, c0), (xn, cn) = runs[0], runs[-1]
        same = [(x, c) for x, c in runs if c.raw["level_hw"] == c0.raw["level_hw"]]
        parts, met, dips = [], True, []
        for what, key in (("time", "ms"), ("step memory", "mb")):
            ratios = [(max(getattr(c, key), 1e-9) / max(getattr(c0, key), 1e-9), x) for x, c in same]
            (lo, x_lo), (hi, x_hi) = min(ratios), max(ratios)
            met &= hi <= 1.2  # growth: no side costs more than 1.2x the smallest side
            if lo < 1 / 1.2:
                dips.append(f"{what} {lo:.2f}x at {x_lo:,} px")
            parts.append(f"{what} {xn:,} px / {x0:,} px = {getattr(cn, key) / max(getattr(c0, key), 1e-9):.2f}x, "
                         f"range {lo:.2f}x ({x_lo:,} px) to {hi:.2f}x ({x_hi:,} px)")
        left_out = [f"{x:,} px (view {c.raw['level_hw'][0]} px)" for x, c in runs if (x, c) not in same]
        lines.append(f"- (c) ATS-10 time and step memory at most 1.2x the {x0:,} px figure up to {xn:,} px (sides with "
                     f"the same {c0.raw['level_hw'][0]} px view{'; not ' + ', '.join(left_out) if left_out else ''}):"
                     f" {'met' if met else 'MISSED'} ({'; '.join(parts)})")
        if dips:
            lines.append(f"  read as a symmetric 1.2x band it is missed: some larger side was cheaper by more than "
                         f"1.2x ({'; '.join(dips)}), i.e. the spread of this machine's timings")
    return lines


def plot(s: Settings, cells: dict[tuple[str, int], Cell], cap_gb: float, path: Path) -> None:
    """Log-log time and step memory vs side; OOM sides drawn as x at the value extrapolated from the last run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for i, m in enumerate(s.methods):
        color = f"C{i}"
        ok = [(x, c) for (name, x), c in sorted(cells.items(), key=lambda kv: kv[0][1]) if name == m.name
              and c.status == "ok"]
        bad = [(x, c) for (name, x), c in cells.items() if name == m.name and c.status != "ok"]
        for ax, key in zip(axes, ("ms", "mb")):
            if ok:
                ax.plot([x for x, _ in ok], [getattr(c, key) for _, c in ok], "o-", color=color, label=m.name)
            if ok and bad:
                x_last, c_last = ok[-1]
                xs = sorted(x for x, _ in bad)
                ys = [getattr(c_last, key) * units(m, x) / units(m, x_last) for x in xs]
                ax.plot([x_last] + xs, [getattr(c_last, key)] + ys, ":", color=color)
                ax.plot(xs, ys, "x", color=color, markersize=9, mew=2)
    axes[1].axhline(cap_gb * 1024, color="gray", ls=":", label=f"cap {cap_gb:g} GB")
    for ax, label in zip(axes, ("time per sample (ms)", "step memory (MB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(s.sides + s.giga_sides, [f"{x:,}" for x in s.sides + s.giga_sides], fontsize=8)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("image side (px)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title("x: OOM (value extrapolated from the largest side run)", fontsize=9)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sides in a temporary folder, seconds")
    parser.add_argument("--root", default=str(REPO / ".gats" / "bench" / "sizes"), help="where the pyramids live")
    parser.add_argument("--view", type=int, default=250, help="ATS/U low-res view: the level nearest this side")
    parser.add_argument("--mem-cap-gb", type=float, default=6.0, help="Deep MIL / CNN memory cap per process")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", type=Path, help="write the raw results here")
    parser.add_argument("--plot", type=Path, help="default docs/img/cost_vs_size.png (smoke: the temp folder)")
    parser.add_argument("--from-json", type=Path, help="re-print the tables and re-draw the plot of a --json run")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one Job (JSON) in this process
    args = parser.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_job(Job.from_json(args.one))), flush=True)
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("--device cuda: CUDA is not available here; nothing to do.")
            return 0
    s = SMOKE if args.smoke else FULL
    if args.from_json:
        nan = math.nan
        cells = {(r["method"], r["side"]): Cell(r["status"], *(nan if r[k] is None else r[k] for k in
                                                              ("ms", "mb", "est_mb")), r["steps"], r["raw"])
                 for r in json.loads(args.from_json.read_text())}
        report(s, cells, args.mem_cap_gb)
        plot(s, cells, args.mem_cap_gb, args.plot or REPO / "docs" / "img" / "cost_vs_size.png")
        return 0
    root = tempfile.mkdtemp(prefix="gats-cost-") if args.smoke else str(Path(args.root).resolve())
    view = 64 if args.smoke else args.view
    plot_path = args.plot or (Path(root) / "cost_vs_size.png" if args.smoke else REPO / "docs" / "img" /
                              "cost_vs_size.png")
    start = time.perf_counter()
    print(f"load average at start: {load_average()}; device {args.device}; batch 1; view {view} px; patches "
          f"{PATCH} px; cap {args.mem_cap_gb:g} GB; pyramids in {root}\n", flush=True)
    labels = make_pyramids(root, sorted(set(s.sides + s.giga_sides)))
    cells = benchmark(s, root, labels, view, args.mem_cap_gb, args.device)
    print(f"\nTime per sample (median, ms) / step memory (MB), batch 1, {args.device}:\n")
    report(s, cells, args.mem_cap_gb)
    plot(s, cells, args.mem_cap_gb, plot_path)
    print(f"\nplot: {plot_path}")
    if args.json:
        rows = [{"method": m, "side": x, **{k: (None if isinstance(v, float) and math.isnan(v) else v)
                                            for k, v in asdict(c).items()}} for (m, x), c in cells.items()]
        args.json.write_text(json.dumps(rows, indent=1))
        print(f"raw results: {args.json}")
    if args.smoke and args.plot:
        shutil.rmtree(root, ignore_errors=True)  # the temporary pyramids
    elif args.smoke:
        print(f"(smoke: pyramids and plot left in {root})")
    print(f"wall time {time.perf_counter() - start:.0f} s; load average at end: {load_average()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
