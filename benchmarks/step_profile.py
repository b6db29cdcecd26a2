"""Where a CPU training step of ATS goes (issue 16, item 3), phase by phase, on an ingested Megapixel MNIST.

    PYTHONPATH=. .venv/bin/python benchmarks/step_profile.py --data ROOT [--threads 2] [--batch 16]
    PYTHONPATH=. .venv/bin/python benchmarks/step_profile.py --smoke      # a tiny dataset; what the tests run

The step is the training job's, taken apart: the views of the batch read from the store (LowResViews.batch, cache
emptied), the attention net forward, sampling and boxes (ATSModel.plan), the patch reads and decode (PatchReader
through DirectFetcher, blocking), the feature net forward, the estimator and classifier (head + loss), backward,
Adam. Each phase is timed with perf_counter over `--steps` steps after warm-up (medians, ms per step and per sample).
Then the feature net's convolutions alone, forward + backward on random patches of the same shape, give the FLOP/s
torch reaches on them (FLOPs counted from the layer shapes: 2 x MACs, backward 2x forward), next to what the same
convolutions achieve inside the step; and the step once more in channels-last memory format. Variants are printed
side by side with the load average: `--threads` (torch intra-op threads) and `--batch`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import load_average  # noqa: E402


def conv_flops(net: torch.nn.Module, x: torch.Tensor) -> float:
    """Forward FLOPs (2 x multiply-adds) of every Conv2d in `net` on input `x`, by forward hooks."""
    total = [0.0]

    def hook(module, inputs, output):
        k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        total[0] += 2.0 * output.numel() * k

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        net(x)
    for h in handles:
        h.remove()
    return total[0]


def profile(root: str, batch_size: int, steps: int, channels_last: bool, cfg_overrides: dict) -> dict:
    from ats_model.contracts import to_unit_float
    from pipeline.reader import PatchReader
    from training import config as C
    from training.data import DirectFetcher, LowResViews, load_split
    from training.models import build_model

    cfg = C.from_dict(C.merge({"data": {"root": root, "low_scale": 0.12, "batch_size": batch_size},
                               "model": {"feature_net": "mnist_paper", "feature_dim": 32, "init": "glorot",
                                         "smoothing": 1e-5, "entropy_lambda": 1e-4}}, cfg_overrides))
    reader = PatchReader(root)
    examples, classes = load_split(root, "train", batch_size * (steps + 3))
    views = LowResViews(reader, cfg.data.low_scale)
    model = build_model(cfg.model, 1, len(classes)).core
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    fetcher = DirectFetcher(reader, overlap=False)
    gen = torch.Generator().manual_seed(0)
    phases: dict[str, list[float]] = {k: [] for k in ("views", "attention", "sample", "read", "features", "head",
                                                       "backward", "optimizer", "total")}
    for k in range(steps + 3):
        part = examples[k * batch_size:(k + 1) * batch_size]
        t = [time.perf_counter()]
        views.cache.clear()
        batch = views.batch(part)
        t.append(time.perf_counter())
        logits_map = model.attention_net(batch.low)  # (B, Ha, Wa)
        t.append(time.perf_counter())
        plan = model.plan(batch.low, batch.level0_hw, batch.low_hw, low_scale=batch.low_scale, generator=gen)
        t.append(time.perf_counter())  # plan runs the attention net again: subtract the attention phase below
        pending = fetcher.submit(batch.image_ids, plan.boxes.numpy())
        pixels = to_unit_float(pending[0].patches)  # (B, N, C, P, P)
        if channels_last:
            pixels = pixels.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, pixels.shape[:2])
        t.append(time.perf_counter())
        features = model.features(pixels)  # (B, N, D)
        t.append(time.perf_counter())
        out = model.head(plan, features)
        loss = model.loss(out, batch.labels)
        t.append(time.perf_counter())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t.append(time.perf_counter())
        opt.step()
        t.append(time.perf_counter())
        del logits_map
        if k < 3:
            continue  # warm-up
        d = [b - a for a, b in zip(t, t[1:])]
        for name, value in zip(("views", "attention", "sample", "read", "features", "head", "backward", "optimizer"),
                               (d[0], d[1], max(d[2] - d[1], 0.0), d[3], d[4], d[5], d[6], d[7])):
            phases[name].append(value)
        phases["total"].append(sum(d) - d[1])  # the attention net runs once in a real step (inside plan)
    med = {k: 1000 * statistics.median(v) for k, v in phases.items()}
    # the feature net's convolutions alone, same shapes, forward + backward
    x = torch.rand(batch_size * cfg.model.n_patches, 1, *cfg.model.patch_hw, requires_grad=False)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    flops = 3 * conv_flops(model.feature_net, x)  # forward + backward (2x)
    alone = []
    for k in range(steps + 3):
        t0 = time.perf_counter()
        model.feature_net(x).sum().backward()
        if k >= 3:
            alone.append(time.perf_counter() - t0)
    alone_ms = 1000 * statistics.median(alone)
    in_step_ms = med["features"] + med["backward"]  # the backward phase also holds the attention net's backward
    return {"batch": batch_size, "threads": torch.get_num_threads(), "channels_last": channels_last,
            "ms_per_step": med, "ms_per_sample": med["total"] / batch_size,
            "feature_gflop_per_step": flops / 1e9, "feature_alone_ms": alone_ms,
            "feature_alone_gflops": flops / 1e9 / (alone_ms / 1000),
            "feature_in_step_gflops_upper": flops / 1e9 / (in_step_ms / 1000)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="")
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    p.add_argument("--batch", default="16", help="comma-separated batch sizes")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json", default="")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    overrides: dict = {}
    if args.smoke:
        from benchmarks.smoke_data import tiny_mnist

        args.data = tiny_mnist(tempfile.mkdtemp(prefix="gats-profile-"), 12, 2)
        args.threads, args.batch, args.steps = "1", "2", 2
        overrides = {"data": {"low_scale": 0.25}, "model": {"patch_hw": 32, "n_patches": 4}}
    if not args.data:
        p.error("--data ROOT (an ingested Megapixel MNIST; jobs/ingest.py --generate megapixel-mnist) or --smoke")
    rows = []
    for threads in (int(v) for v in args.threads.split(",")):
        torch.set_num_threads(threads)
        for batch in (int(v) for v in args.batch.split(",")):
            for channels_last in (False, True):
                r = profile(args.data, batch, args.steps, channels_last, overrides)
                r["load_average"] = load_average()
                rows.append(r)
                ms = r["ms_per_step"]
                print(f"threads {threads} batch {batch} channels_last {channels_last}: {r['ms_per_sample']:.1f} ms / "
                      f"sample; per step (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in ms.items()) +
                      f"; feature convs alone {r['feature_alone_gflops']:.1f} GFLOP/s "
                      f"({r['feature_gflop_per_step']:.2f} GFLOP per step), in the step <= "
                      f"{r['feature_in_step_gflops_upper']:.1f}; load {r['load_average']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
