"""Cost of nested attention sampling (issue 14) against single-level ATS at the same fine view: time per sample and
step memory of one training step, batch 1, on generated square RGB images of side 8k .. 100k px.

    nice -n 10 .venv/bin/python benchmarks/nested_cost.py --json /tmp/nested_cost.json    the full study (~30 min)
    .venv/bin/python benchmarks/nested_cost.py --smoke                                     < 60 s (the test)
    options: --sides 8192 16384 32768 100000 --regions 4 8 16 --per-region 4 --repeats 3 --warmup 1
             --mem-cap-gb 12 --attention mnist_tanh --feature lenet1 --json OUT

Rows (one fresh process each, torch.set_num_threads(1), so the peak memory is the row's own):
  nested M   `NestedATSModel`: coarse view at 1/256 of level 0 (one coarse px per 256-px patch) -> M regions of
             4096 px without replacement -> fine attention at 1/16 inside each distinct drawn region (256 x 256 fine
             px, halo 0) -> N = 4 positions per region without replacement -> M*N patches of 256 px -> features.
  single n   `ATSModel` with its attention view at the same fine resolution, 1/16 of level 0 (the whole image:
             side/16 px square), n = M*N patches of 256 px without replacement (one row per M: n = 16, 32, 64).
  features n the feature net alone on n generated 256-px patches (forward, backward, Adam): the term both models
             share (research/nested-ats.md section 7, beta * M*N), so the attention part can be read off the others.
The same attention net (default `mnist_tanh`, the note's alpha ~ 144 B/px) is the coarse, the fine and the single-level
one; the same feature net (default `lenet1`) for all. Nested rows with M above the region count (8k: 2 x 2 regions)
are "n/a": without replacement M cannot exceed the regions.

Pixels never exist as a whole image: `SyntheticSlide` computes any pixel from its level-0 coordinates (a smooth
per-channel pattern plus bright Gaussian blobs at seeded places, zero outside the image), so the region reads, the
patch reads and the views are formulas evaluated on demand at the requested downsample (point samples at the pixel
centres). The single-level view (6250 x 6250 x 3 float32 = 469 MB at 100k) is what single-level ATS must hold; it is
generated inside each step, as a reader would return it, so it counts in the step's memory; the nested coarse view
and regions likewise. The time spent generating pixels is reported apart ("pixels").

Per row: warm-up steps, then --repeats timed steps (optimizer.zero_grad, forward, loss, backward, Adam step); time =
the median, step memory = `training.memory.StepMemory` over the timed steps (RSS high-water mark minus the settled
RSS before them). The forward is split with hooks on the nets (attention / fine / feature net forward) and timers on
the pixel callbacks; backward and the optimizer step are timed whole. Memory cap: RLIMIT_AS = the address space after
the imports + --mem-cap-gb; a row that fails to allocate (or dies) under it reads "out of memory", and the same model
is not run at a larger side or patch count. The load average is printed before and after every row.

Run time (2 cores under load 3-6): about 5 minutes for every row but single-level at 100k, whose three rows take
~8 minutes each (~130 s per step: mnist_tanh's CPU conv costs ~0.2 s per Mpx up to 5800^2 views and ~1.2 s per Mpx
at 6250^2, user time, not page faults); `--sides 8192 16384 32768` is a 4-minute run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import load_average  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MB = 2**20
REGION_PX, PATCH_PX, COARSE_D, FINE_D, CHANNELS, N_CLASSES = 4096, 256, 256, 16, 3, 2


@dataclass(frozen=True, slots=True)
class Settings:
    sides: tuple[int, ...]
    regions: tuple[int, ...]  # M
    per_region: int  # N
    warmup: int
    repeats: int
    cap_gb: float
    attention: str
    feature: str


FULL = Settings(sides=(8192, 16384, 32768, 100000), regions=(4, 8, 16), per_region=4, warmup=1, repeats=3,
                cap_gb=12.0, attention="mnist_tanh", feature="lenet1")
SMOKE = replace(FULL, sides=(8192, 16384), regions=(2,), repeats=2)


@dataclass(frozen=True, slots=True)
class Job:
    """One row, run in a child: kind nested | single | features."""

    kind: str
    side: int  # 0 for features
    m: int  # regions (nested); the M the patch count pairs with (single, features)
    n_patches: int  # M * N
    per_region: int
    warmup: int
    repeats: int
    cap_gb: float
    attention: str
    feature: str
    seed: int = 0

    @property
    def label(self) -> str:
        return {"nested": f"nested M={self.m}", "single": f"single n={self.n_patches}",
                "features": f"features n={self.n_patches}"}[self.kind]


# -----------------------------------------------------------------------------
# pixels from coordinates

class SyntheticSlide:
    """A square `side` px RGB image that exists only as a formula of level-0 coordinates (float32 in [0, 1]).

    value_c(y, x) = 0.35 + 0.15 sin(2 pi y / Ly_c + phi_c) cos(2 pi x / Lx_c) + colour_c sum_k g_k(y) g_k(x), with
    Gaussian blobs g_k of sigma `blob_px` at seeded centres; zero outside [0, side)^2. Separable, so a (h, w) crop costs
    two small 1-D tables and an outer product. Reads point-sample pixel centres at the requested downsample d."""

    def __init__(self, side: int, n_blobs: int = 12, blob_px: float = 384.0, seed: int = 0) -> None:
        import torch

        g = torch.Generator().manual_seed(seed)
        self.side, self.sigma = side, blob_px
        self.centres = torch.rand(n_blobs, 2, generator=g, dtype=torch.float64) * side  # (K, 2) level-0 (y, x)
        self.periods_y = torch.tensor([5000.0, 7300.0, 11000.0], dtype=torch.float64)[:CHANNELS, None]  # (C, 1)
        self.periods_x = torch.tensor([6100.0, 8900.0, 4700.0], dtype=torch.float64)[:CHANNELS, None]
        self.phase = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)[:CHANNELS, None]
        self.colour = torch.tensor([0.55, 0.25, 0.45])[:CHANNELS, None, None]  # (C, 1, 1)
        self.seconds, self.patches_read, self.regions_read = 0.0, 0, 0

    def render(self, ys: Any, xs: Any) -> Any:
        """ys (B, H), xs (B, W) level-0 coordinates (float64) -> (B, C, H, W) float32."""
        import torch

        start = time.perf_counter()
        two_pi = 2 * math.pi
        sy = torch.sin(two_pi * ys[:, None, :] / self.periods_y + self.phase).float()  # (B, C, H)
        cx = torch.cos(two_pi * xs[:, None, :] / self.periods_x).float()  # (B, C, W)
        gy = torch.exp(-(ys[:, None, :] - self.centres[None, :, 0, None]) ** 2 / (2 * self.sigma**2)).float()
        gx = torch.exp(-(xs[:, None, :] - self.centres[None, :, 1, None]) ** 2 / (2 * self.sigma**2)).float()
        out = torch.einsum("bch,bcw->bchw", sy, cx).mul_(0.15).add_(0.35)  # (B, C, H, W)
        blobs = torch.bmm(gy.transpose(1, 2), gx)  # (B, H, K) @ (B, K, W) -> (B, H, W)
        out.add_(blobs[:, None] * self.colour).clamp_(0.0, 1.0)
        inside_y = ((ys >= 0) & (ys < self.side)).float()  # (B, H)
        inside_x = ((xs >= 0) & (xs < self.side)).float()  # (B, W)
        out.mul_((inside_y[:, :, None] * inside_x[:, None, :])[:, None])  # zero outside the image
        self.seconds += time.perf_counter() - start
        return out

    def crops(self, boxes: Any, downsample: int) -> Any:
        """boxes (U, 4) level-0 (y0, x0, h, w), all the same size -> (U, C, h / d, w / d) at downsample d."""
        import torch

        h, w = int(boxes[0, 2]) // downsample, int(boxes[0, 3]) // downsample
        centre = lambda n: downsample * (torch.arange(n, dtype=torch.float64) + 0.5)  # noqa: E731 (n,)
        ys = boxes[:, 0, None].double() + centre(h)  # (U, h)
        xs = boxes[:, 1, None].double() + centre(w)  # (U, w)
        return self.render(ys, xs)

    def view(self, downsample: int) -> Any:
        """The whole image at 1/downsample: (1, C, ceil(side / d), ceil(side / d))."""
        import torch

        n = -(-self.side // downsample)
        return self.crops(torch.tensor([[0, 0, n * downsample, n * downsample]]), downsample)

    def read_regions(self, image_ids: Any, boxes: Any, downsample: int) -> Any:  # RegionReadFn
        self.regions_read += boxes.shape[0]
        return self.crops(boxes, downsample)

    def read_patches(self, image_ids: Any, boxes: Any) -> Any:  # PatchReadFn: (B, N, 4) -> (B, N, C, h, w)
        b, n = boxes.shape[:2]
        self.patches_read += b * n
        pixels = self.crops(boxes.reshape(b * n, 4), 1)  # (B*N, C, h, w)
        return pixels.reshape(b, n, *pixels.shape[1:])  # (B*N, C, h, w) -> (B, N, C, h, w)


# -----------------------------------------------------------------------------
# one row, in a child process

class _NetTimer:
    """Forward seconds of a module, accumulated through pre/post forward hooks."""

    def __init__(self, module: Any) -> None:
        self.seconds, self._t = 0.0, 0.0
        module.register_forward_pre_hook(lambda *_: setattr(self, "_t", time.perf_counter()))
        module.register_forward_hook(lambda *_: setattr(self, "seconds", self.seconds + time.perf_counter() - self._t))


def _build(job: Job) -> tuple[Any, Callable[[], Any], SyntheticSlide | None, dict[str, _NetTimer], dict[str, Any]]:
    """The model, a forward-and-loss closure, the image, the net timers and facts about the row."""
    import torch

    from ats_model.ats import ATSConfig, ATSModel
    from ats_model.nested import NestedSampling
    from ats_model.nested_model import NestedATSConfig, NestedATSModel
    from ats_model.nets import create_attention, create_feature

    torch.manual_seed(job.seed)
    feature = create_feature(job.feature, CHANNELS)
    target = torch.tensor([0])
    generator = torch.Generator().manual_seed(job.seed)
    patch_hw = (PATCH_PX, PATCH_PX)
    if job.kind == "features":
        head = torch.nn.Linear(feature.out_dim, N_CLASSES)
        model = torch.nn.ModuleDict({"feature": feature, "head": head})
        slide = SyntheticSlide(32768, seed=job.seed)
        boxes = torch.randint(0, 32768 - PATCH_PX, (1, job.n_patches, 2), generator=generator)  # (1, n, 2)
        boxes = torch.cat([boxes, torch.full_like(boxes, PATCH_PX)], -1)  # (1, n, 4)

        def forward() -> tuple[Any, dict[str, float]]:
            patches = slide.read_patches(["img"], boxes)  # (1, n, C, P, P)
            f = feature(patches.flatten(0, 1)).mean(0, keepdim=True)  # (n, D) -> (1, D)
            return torch.nn.functional.cross_entropy(head(f), target), {}

        return model, forward, slide, {"feature net": _NetTimer(feature)}, {"attention_px": 0}

    slide = SyntheticSlide(job.side, seed=job.seed)
    level0_hw = torch.tensor([[job.side, job.side]])
    if job.kind == "nested":
        cfg = NestedATSConfig(NestedSampling(n_regions=job.m, n_patches_per_region=job.per_region),
                              region_px=(REGION_PX, REGION_PX), fine_downsample=FINE_D, halo=0, patch_hw=patch_hw)
        model = NestedATSModel(create_attention(job.attention, CHANNELS), create_attention(job.attention, CHANNELS),
                               feature, N_CLASSES, cfg)
        timers = {"coarse net": _NetTimer(model.coarse_net), "fine net": _NetTimer(model.fine_net),
                  "feature net": _NetTimer(feature)}

        def forward() -> tuple[Any, dict[str, float]]:
            coarse = slide.view(COARSE_D)  # (1, C, ceil(side/256), ...)
            out = model(coarse, slide.read_regions, slide.read_patches, ["img"], level0_hw,
                        coarse_scale=float(COARSE_D), generator=generator)
            return model.loss(out, target), {"attention_px": out.attention_px_per_sample,
                                             "regions_per_sample": out.regions_per_sample,
                                             "coarse_hw": list(coarse.shape[-2:])}

        return model, forward, slide, timers, {}
    model = ATSModel(create_attention(job.attention, CHANNELS), feature, N_CLASSES,
                     ATSConfig(n_patches=job.n_patches, patch_hw=patch_hw, replace=False))
    timers = {"attention net": _NetTimer(model.attention_net), "feature net": _NetTimer(feature)}

    def forward_single() -> tuple[Any, dict[str, float]]:
        view = slide.view(FINE_D)  # (1, C, side/16, side/16): what single-level ATS holds
        out = model(view, slide.read_patches, ["img"], level0_hw, low_scale=float(FINE_D), generator=generator)
        return model.loss(out, target), {"attention_px": view.shape[-2] * view.shape[-1],
                                         "view_hw": list(view.shape[-2:])}

    return model, forward_single, slide, timers, {}


def run_job(job: Job) -> dict[str, Any]:
    import torch

    from ats_model import ats, nested_model  # noqa: F401  (imported before the address space is measured)
    from benchmarks.cost_step import is_allocation_error
    from training.memory import StepMemory, vm_size_mb

    torch.set_num_threads(1)
    out: dict[str, Any] = {**asdict(job), "threads": torch.get_num_threads(), "load_before": load_average()}
    print(f"  {job.label} {job.side:,} px: load average before {out['load_before']}", file=sys.stderr, flush=True)
    out["vm_after_imports_mb"] = vm_base = vm_size_mb()
    limit = int((vm_base + job.cap_gb * 1024) * MB)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    try:
        model, forward, slide, timers, facts = _build(job)
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step() -> dict[str, float]:
            for t in timers.values():
                t.seconds = 0.0
            slide.seconds, slide.patches_read, slide.regions_read = 0.0, 0, 0
            t0 = time.perf_counter()
            optimiser.zero_grad(set_to_none=True)
            loss, extra = forward()
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            optimiser.step()
            t3 = time.perf_counter()
            facts.update(extra, patches_read=slide.patches_read, regions_read=slide.regions_read)
            split = {name: t.seconds for name, t in timers.items()}
            split["pixels"] = slide.seconds
            split["rest of forward"] = (t1 - t0) - sum(split.values())
            return {"total": t3 - t0, **split, "backward": t2 - t1, "optimiser": t3 - t2}

        out["warmup_s"] = [step()["total"] for _ in range(job.warmup)]
        with StepMemory() as mem:
            steps = [step() for _ in range(job.repeats)]
    except (MemoryError, RuntimeError) as error:
        if not is_allocation_error(error):
            raise
        out.update(status="oom", error=f"{type(error).__name__}: {str(error)[:300]}", load_after=load_average())
        print(f"  {job.label} {job.side:,} px: load average after {out['load_after']}", file=sys.stderr, flush=True)
        return out
    out["load_after"] = load_average()
    print(f"  {job.label} {job.side:,} px: load average after {out['load_after']}", file=sys.stderr, flush=True)
    return {**out, **facts, "status": "ok", "times_s": [s["total"] for s in steps],
            "median_ms": 1000 * statistics.median(s["total"] for s in steps),
            "split_ms": {k: 1000 * statistics.median(s[k] for s in steps) for k in steps[0] if k != "total"},
            "step_mb": mem.step_mb, "resting_mb": mem.resting_mb, "memory_method": mem.method}


# -----------------------------------------------------------------------------
# the parent: rows, tables, ratios

def run_child(job: Job) -> dict[str, Any]:
    """`job` in a fresh interpreter (its stderr, the load-average lines, passed through); a child that dies without
    a result counts as out of memory when it was killed or its error names memory."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, __file__, "--one", json.dumps(asdict(job))], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=3600)
    sys.stderr.write("".join(ln + "\n" for ln in done.stderr.splitlines() if "load average" in ln))
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode == 0 and lines:
        return json.loads(lines[-1][len("RESULT "):])
    tail = done.stderr[-2000:]
    if done.returncode < 0 or any(s in tail.lower() for s in ("memory", "bad_alloc", "can't allocate")):
        return {**asdict(job), "status": "oom", "error": f"exit {done.returncode}: {tail[-300:]}"}
    raise RuntimeError(f"{job.label} at {job.side} px failed (exit {done.returncode}):\n{tail}")


def n_regions(side: int) -> int:
    return (-(-side // REGION_PX)) ** 2


def jobs_for(s: Settings) -> list[Job]:
    common = dict(per_region=s.per_region, warmup=s.warmup, repeats=s.repeats, cap_gb=s.cap_gb,
                  attention=s.attention, feature=s.feature)
    out = [Job("features", 0, m, m * s.per_region, **common) for m in s.regions]
    for side in s.sides:
        out += [Job(kind, side, m, m * s.per_region, **common) for kind in ("nested", "single") for m in s.regions]
    return out


def benchmark(s: Settings) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    todo = jobs_for(s)
    for i, job in enumerate(todo, 1):
        failed = [r for r in rows if r["kind"] == job.kind and r["status"] in ("oom", "oom-after")
                  and r["side"] <= job.side and r["n_patches"] <= job.n_patches]
        if job.kind == "nested" and job.m > n_regions(job.side):
            row = {**asdict(job), "status": "n/a", "error": f"M = {job.m} > {n_regions(job.side)} regions"}
        elif failed:
            row = {**asdict(job), "status": "oom-after", "error": "out of memory at a smaller side or patch count"}
        else:
            row = run_child(job)
        rows.append(row)
        what = (f"{row['median_ms']:,.0f} ms/sample, step memory {row['step_mb']:,.0f} MB, attention px "
                f"{row['attention_px']:,.0f}, patches {row['patches_read']}, load {row['load_before']} -> "
                f"{row['load_after']}" if row["status"] == "ok" else f"{row['status']}: {row.get('error', '')[:160]}")
        print(f"[{i}/{len(todo)}] {job.label:<14} {job.side:>7,} px: {what}", flush=True)
    return rows


def _cell(r: dict[str, Any] | None, key: str, fmt: str) -> str:
    if r is None:
        return "-"
    if r["status"] == "ok":
        return format(r[key], fmt)
    return {"oom": "out of memory", "oom-after": "not run (OOM smaller)", "n/a": "n/a"}[r["status"]]


def _ratio(a: dict | None, b: dict | None, key: str) -> float:
    if not (a and b and a["status"] == b["status"] == "ok") or b[key] <= 0:
        return math.nan
    return a[key] / b[key]


def report(s: Settings, rows: list[dict[str, Any]]) -> list[str]:
    """The markdown tables, ratios and targets; returns the lines (also printed)."""
    get = {(r["kind"], r["side"], r["m"]): r for r in rows}
    out = ["| side (px) | model | patches | attention px / sample | regions / sample | time / sample (ms) | "
           "step memory (MB) | load before -> after |", "|---:|---|---:|---:|---:|---:|---:|---|"]
    for side in s.sides:
        for kind in ("nested", "single"):
            for m in s.regions:
                r = get[(kind, side, m)]
                name = (f"nested M={m}, N={s.per_region}" if kind == "nested"
                        else f"single-level 1/{FINE_D}, n={m * s.per_region}")
                ok = r["status"] == "ok"
                out.append(f"| {side:,} | {name} | {r['patches_read'] if ok else '-'} | "
                           f"{_cell(r, 'attention_px', ',.0f')} | "
                           f"{format(r.get('regions_per_sample', 0), '.0f') if ok and kind == 'nested' else '-'} | "
                           f"{_cell(r, 'median_ms', ',.0f')} | {_cell(r, 'step_mb', ',.0f')} | "
                           f"{r['load_before'] + ' -> ' + r['load_after'] if ok else '-'} |")
    out += ["", f"Shared term, the {s.feature} feature net alone on n generated {PATCH_PX}-px patches (forward, "
                "backward, Adam):", "", "| patches | time (ms) | step memory (MB) | load before -> after |",
            "|---:|---:|---:|---|"]
    for m in s.regions:
        r = get[("features", 0, m)]
        out.append(f"| {m * s.per_region} | {_cell(r, 'median_ms', ',.0f')} | {_cell(r, 'step_mb', ',.0f')} | "
                   f"{r.get('load_before', '-')} -> {r.get('load_after', '-')} |")
    out += ["", "Single-level / nested at the same fine view (1/16) and the same patch count n = M*N; 'attention "
                "part' subtracts the feature-net-alone row from both (approximate: peaks are not exactly additive):",
            "", "| side (px) | M (n) | time ratio | step memory ratio | attention-part memory ratio |",
            "|---:|---|---:|---:|---:|"]
    for side in s.sides:
        for m in s.regions:
            nested, single, feats = get[("nested", side, m)], get[("single", side, m)], get[("features", 0, m)]
            if nested["status"] != "ok":
                continue
            if single["status"] == "ok":
                parts = [f"{_ratio(single, nested, 'median_ms'):,.1f}x", f"{_ratio(single, nested, 'step_mb'):,.1f}x"]
                if feats["status"] == "ok" and nested["step_mb"] > feats["step_mb"]:
                    a = (single["step_mb"] - feats["step_mb"]) / (nested["step_mb"] - feats["step_mb"])
                    parts.append(f"{a:,.1f}x")
                else:
                    parts.append("-")
            else:
                cap = s.cap_gb * 1024
                parts = ["-", f"> {cap / nested['step_mb']:,.1f}x (single OOM at {s.cap_gb:g} GB)", "-"]
            out.append(f"| {side:,} | {m} ({m * s.per_region}) | " + " | ".join(parts) + " |")
    out += ["", "Where each step's time goes (median ms per piece; forward pieces by hooks on the nets and timers "
                "on the pixel callbacks; pixels = generating the views, regions and patches):", ""]
    pieces = ["coarse net", "fine net", "attention net", "feature net", "pixels", "rest of forward", "backward",
              "optimiser"]
    out += ["| side (px) | model | " + " | ".join(pieces) + " | total |", "|---:|---|" + "---:|" * (len(pieces) + 1)]
    for side in s.sides:
        for kind in ("nested", "single"):
            for m in s.regions:
                r = get[(kind, side, m)]
                if r["status"] != "ok":
                    continue
                sp = r["split_ms"]
                name = f"nested M={m}" if kind == "nested" else f"single n={m * s.per_region}"
                out.append(f"| {side:,} | {name} | " + " | ".join(
                    f"{sp[p]:,.0f}" if p in sp else "-" for p in pieces) + f" | {r['median_ms']:,.0f} |")
    out += ["", "Targets:"] + targets(s, get)
    ok = [r for r in rows if r["status"] == "ok"]
    if ok:
        vm_gb = statistics.median(r["vm_after_imports_mb"] for r in ok) / 1024
        out += ["", f"Step memory: {ok[0]['memory_method']}. torch threads: {ok[0]['threads']}. Cap: RLIMIT_AS = the "
                    f"address space after the imports (median {vm_gb:.2f} GB) "
                    f"+ {s.cap_gb:g} GB. Nets: attention {s.attention} (coarse, fine and single-level), features "
                    f"{s.feature}; {s.warmup} warm-up + {s.repeats} timed steps per row (median)."]
    for line in out:
        print(line)
    return out


def targets(s: Settings, get: dict[tuple[str, int, int], dict[str, Any]]) -> list[str]:
    lines = []
    for m in s.regions:
        runs = [get[("nested", x, m)] for x in s.sides if get[("nested", x, m)]["status"] == "ok"]
        if len(runs) < 2:
            continue
        parts = []
        for what, key in (("attention px", "attention_px"), ("step memory", "step_mb"), ("time", "median_ms")):
            values = [r[key] for r in runs]
            parts.append(f"{what} max/min {max(values) / max(min(values), 1e-9):.2f}x")
        lines.append(f"- nested M={m} flat in the side ({runs[0]['side']:,} .. {runs[-1]['side']:,} px): "
                     + ", ".join(parts))
    for side in (x for x in s.sides if x >= 32768):
        for m in s.regions:
            nested, single = get[("nested", side, m)], get[("single", side, m)]
            if nested["status"] != "ok":
                continue
            if single["status"] == "ok":
                ratio, text = single["step_mb"] / nested["step_mb"], ""
            elif single["status"] in ("oom", "oom-after"):
                ratio, text = s.cap_gb * 1024 / nested["step_mb"], " (lower bound: single-level out of memory)"
            else:
                continue
            lines.append(f"- {side:,} px, M={m}: >= 10x less step memory than single-level: "
                         f"{'met' if ratio >= 10 else 'MISSED'} ({ratio:,.1f}x{text})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="sides 8192 and 16384, M = 2, < 60 s")
    parser.add_argument("--sides", type=int, nargs="+", help=f"level-0 sides in px (default {FULL.sides})")
    parser.add_argument("--regions", type=int, nargs="+", help=f"M values (default {FULL.regions})")
    parser.add_argument("--per-region", type=int, help=f"N patches per region (default {FULL.per_region})")
    parser.add_argument("--warmup", type=int, help=f"untimed steps per row (default {FULL.warmup})")
    parser.add_argument("--repeats", type=int, help=f"timed steps per row, median reported (default {FULL.repeats})")
    parser.add_argument("--mem-cap-gb", type=float, help=f"per-row address-space cap over the imports (default "
                        f"{FULL.cap_gb:g})")
    parser.add_argument("--attention", help=f"attention net, coarse, fine and single-level (default {FULL.attention})")
    parser.add_argument("--feature", help=f"feature net (default {FULL.feature})")
    parser.add_argument("--json", type=Path, help="write the raw rows here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one Job (JSON), run in this process
    args = parser.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_job(Job(**json.loads(args.one)))), flush=True)
        return 0
    base = SMOKE if args.smoke else FULL
    s = Settings(sides=tuple(args.sides or base.sides), regions=tuple(args.regions or base.regions),
                 per_region=args.per_region or base.per_region,
                 warmup=base.warmup if args.warmup is None else args.warmup, repeats=args.repeats or base.repeats,
                 cap_gb=args.mem_cap_gb or base.cap_gb, attention=args.attention or base.attention,
                 feature=args.feature or base.feature)
    if min(s.sides) < REGION_PX or min(s.regions) < 1 or s.per_region < 1 or s.repeats < 1 or s.warmup < 0:
        parser.error(f"expected sides >= {REGION_PX} px (one region), M >= 1, N >= 1, --repeats >= 1, --warmup >= 0")
    start = time.perf_counter()
    print(f"load average at start: {load_average()}; sides {', '.join(f'{x:,}' for x in s.sides)} px (square, "
          f"{CHANNELS} channels, generated); regions {REGION_PX} px, patches {PATCH_PX} px, coarse 1/{COARSE_D}, "
          f"fine 1/{FINE_D}; M = {', '.join(map(str, s.regions))}, N = {s.per_region} (without replacement at both "
          f"levels); single-level n = M*N; batch 1, CPU, 1 torch thread per row; cap {s.cap_gb:g} GB\n", flush=True)
    rows = benchmark(s)
    print(f"\nTime per sample (median of {s.repeats}) and step memory of one training step, batch 1, CPU:\n")
    report(s, rows)
    if args.json:
        args.json.write_text(json.dumps({"settings": asdict(s), "rows": rows}, indent=1))
        print(f"\nraw results: {args.json}")
    print(f"wall time {time.perf_counter() - start:.0f} s; load average at end: {load_average()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
