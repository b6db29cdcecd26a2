"""Seconds per image of `training.predict.predict` (ATS-10, top-k) against image size, 1 MP .. 1 GP, next to what a
tiling tool pays: the same feature net on every tile of a regular grid over the whole image.

    PYTHONPATH=. .venv/bin/python benchmarks/predict_speed.py --json /tmp/predict_speed.json      the real run
    PYTHONPATH=. .venv/bin/python benchmarks/predict_speed.py --smoke                              < 60 s (the test)
    options: --sides 1000 4000 16000 32000 --repeats 3 --view 250 --top-k 10 --tile-budget-s 600 --scratch DIR --keep

Images: the Megapixel-MNIST-like pyramids of benchmarks/cost_vs_size.py (its `make_pyramids`: 5 real MNIST digits
and 50 line-noise patterns on a black canvas, written block by block with `pipeline.megapixel_mnist.lazy_image`,
never whole in RAM), one root per side under a scratch folder in /tmp (removed at the end unless --keep; a --scratch
folder given is reused and never removed), each with a one-row manifest (split test) so `predict(..., data=ROOT)`
predicts exactly that image. The model: ATS, `mnist_tanh` attention, `lenet1` features, 50 px patches, N = 10, built
untrained (torch seed 0; weights do not change the cost) and saved with `training.checkpoint.save`, one checkpoint
per side whose `data.low_scale` = view / side, so the view is the pyramid level nearest --view px (250 px for sides
1000 * 2^k), as cost_vs_size picks its "fixed view" for ATS.

Per side, two fresh processes, each with torch.set_num_threads(1), printing the load average at start and end:
  predict  the model loaded once (not timed), then --repeats calls of `predict(loaded, OUT, data=ROOT,
           options=PredictOptions(mode="topk", top_k=K))`, each into a new OUT folder, timed whole. The split comes
           from timers wrapped, in that process only, around the library's own calls (training/predict.py is not
           changed): `LowResViews.batch` (view read), `ATSModel.plan` and `ATSModel.attention_map` (attention net,
           top-k cells, boxes; the map again for the exports), `PatchReader.read` (the patch reads, whatever path
           reaches them: DirectFetcher), `ATSModel.features` (feature net), `ATSModel.head`,
           `exports.write_geojson`, `save_overlay` (PNG), `exports.write_attention_zarr`, `exports.write_predictions`;
           "other" is the rest of the call (out folder check, manifest read, top-K boxes for the export, softmax,
           head, predictions.parquet); opening the image's pyramid falls in the view read. Each wrapped piece must be
           called once per image (attention: once or twice), or the run fails. Reported: the repeat with the median
           total (median_low) and its split; the first call (imports such as matplotlib's) is shown too.
  tiling   the same checkpoint's `lenet1` on every 50x50 tile of a stride-50 grid over level 0 (ceil(side/50)^2
           tiles; edge tiles padded by the reader), read with `PatchReader.read` in blocks of 32x32 tiles (1024 tiles,
           a 1600 px square: chunk-friendly), features computed and averaged. A sample of blocks spread over the image
           is timed first (after one untimed warm-up block); when the whole grid is estimated to fit in
           --tile-budget-s, it is run whole (as many passes, up to --repeats, as fit; median_low reported), else
           the estimate (per-tile time of the sample x tiles) is reported as "est. from K tiles".
"""
from __future__ import annotations

import argparse
import functools
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
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cost_vs_size import PATCH, image_id, make_pyramids  # noqa: E402
from benchmarks.machine import load_average  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
N_PATCHES, N_CLASSES, MODEL_SEED = 10, 10, 0
PIECES = ("view", "attention", "patches", "features", "head", "geojson", "png", "zarr", "predictions")


@dataclass(frozen=True, slots=True)
class Settings:
    sides: tuple[int, ...]
    repeats: int
    view: int
    top_k: int
    tile_budget_s: float  # per side, all tiling passes together
    block: int  # tiles per side of one read block (block x block tiles per PatchReader.read)
    sample_blocks: int  # blocks timed to estimate the whole grid


FULL = Settings(sides=(1000, 4000, 16000, 32000), repeats=3, view=250, top_k=10, tile_budget_s=600.0, block=32,
                sample_blocks=8)
SMOKE = Settings(sides=(400, 800), repeats=1, view=64, top_k=10, tile_budget_s=0.05, block=8, sample_blocks=2)


# --- set-up: pyramids, manifests, checkpoints ------------------------------------------------------------------------

def side_root(scratch: Path, side: int) -> Path:
    return scratch / f"side-{side}"


def prepare(scratch: Path, s: Settings) -> dict[int, dict[str, Any]]:
    """Per side: its pyramid (cost_vs_size.make_pyramids), a one-row manifest and an untrained ATS-10 checkpoint whose
    view is the level nearest s.view px. Returns side -> {root, image_id, checkpoint, level, view_hw}."""
    import torch

    from pipeline.manifest import ManifestRow, write_manifest
    from pipeline.reader import PatchReader
    from pipeline.storage import Storage, image_key
    from training import checkpoint
    from training import config as C
    from training.models import build_model

    classes = tuple(str(c) for c in range(N_CLASSES))
    model_cfg = C.ModelConfig(name="ats", attention_net="mnist_tanh", feature_net="lenet1", patch_hw=(PATCH, PATCH),
                              n_patches=N_PATCHES)
    torch.manual_seed(MODEL_SEED)
    model = build_model(model_cfg, 1, N_CLASSES)  # untrained: the cost does not depend on the weights
    state = model.core.state_dict()
    setup: dict[int, dict[str, Any]] = {}
    for side in s.sides:
        root = side_root(scratch, side)
        root.mkdir(parents=True, exist_ok=True)
        label = make_pyramids(str(root), [side])[side]
        iid = image_id(side)
        reader = PatchReader(str(root))
        info = reader.info(iid)
        write_manifest(str(root), [ManifestRow(
            image_id=iid, uri=Storage(str(root)).uri(image_key(iid)), source=f"generated:{iid}", label=str(label),
            split="test", height=info.height, width=info.width, channels=info.channels, dtype=info.dtype,
            levels=info.levels, downsamples=info.downsamples, mpp=info.mpp, checksum=info.checksum)], classes)
        low_scale = min(1.0, s.view / max(info.height, info.width))
        config = C.TrainConfig(data=C.DataConfig(root=str(root), low_scale=low_scale), model=model_cfg,
                               runtime=C.RuntimeConfig(eval_mode="topk"))
        ckpt = scratch / f"checkpoint-{side}"
        ckpt.mkdir(exist_ok=True)
        checkpoint.save(ckpt, config=config, model=state, optimizer={}, epoch=0, classes=classes, in_channels=1,
                        budget_used_s=0.0)
        level = reader.level_for_scale(iid, low_scale)
        setup[side] = {"root": str(root), "image_id": iid, "checkpoint": str(ckpt), "level": level,
                       "view_hw": list(info.shapes[level]), "label": str(label)}
    return setup


# --- child: predict --------------------------------------------------------------------------------------------------

class Timers:
    """Wall seconds and call counts of wrapped callables, per name; a call nested in one of the same name (e.g. a
    wrapped method calling another wrapped under the same name) is not counted twice."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._depth: dict[str, int] = {}

    def reset(self) -> None:
        self.seconds = {name: 0.0 for name in PIECES}
        self.calls = {name: 0 for name in PIECES}

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._depth.get(name, 0):
                return fn(*args, **kwargs)
            self._depth[name] = 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth[name] = 0
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
                self.calls[name] = self.calls.get(name, 0) + 1

        return timed


def run_predict(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    load_start = load_average()
    print(f"  predict {job['side']} px: load average at start {load_start}", file=sys.stderr, flush=True)
    import pipeline.exports as exports
    import training.predict as tp
    from pipeline.reader import PatchReader
    from training.data import LowResViews

    start = time.perf_counter()
    loaded = tp.load_model(job["checkpoint"])
    model_load_s = time.perf_counter() - start
    core = loaded.module.core
    timers = Timers()
    LowResViews.batch = timers.wrap("view", LowResViews.batch)  # type: ignore[method-assign]
    core.plan = timers.wrap("attention", core.plan)  # attention net, top-k cells, boxes
    core.attention_map = timers.wrap("attention", core.attention_map)  # the unsmoothed map for the exports
    core.features = timers.wrap("features", core.features)
    core.head = timers.wrap("head", core.head)
    PatchReader.read = timers.wrap("patches", PatchReader.read)  # type: ignore[method-assign]
    tp.save_overlay = timers.wrap("png", tp.save_overlay)
    exports.write_geojson = timers.wrap("geojson", exports.write_geojson)
    exports.write_attention_zarr = timers.wrap("zarr", exports.write_attention_zarr)
    exports.write_predictions = timers.wrap("predictions", exports.write_predictions)
    options = tp.PredictOptions(mode="topk", top_k=job["top_k"], split="test")
    runs = []
    with tempfile.TemporaryDirectory(prefix="predict-out-", dir=job["scratch"]) as outs:
        for r in range(job["repeats"]):
            timers.reset()
            out = Path(outs) / f"out-{r}"
            start = time.perf_counter()
            report = tp.predict(loaded, out, data=job["root"], options=options)
            total = time.perf_counter() - start
            if not report.ok or len(report.predictions) != 1:
                raise RuntimeError(f"predict failed on {job['image_id']}: {report.summary()}")
            wrong = {k: n for k, n in timers.calls.items() if k != "attention" and n != 1}
            if wrong or timers.calls["attention"] not in (1, 2):
                raise RuntimeError(f"expected one call of each timed piece per image (attention: plan, and maybe "
                                   f"attention_map); got {timers.calls}: the predict path changed, update the timers "
                                   "in benchmarks/predict_speed.py")
            pred = report.predictions[0]
            runs.append({"total_s": total, "inference_s": pred.seconds, "pieces_s": dict(timers.seconds),
                         "calls": dict(timers.calls),
                         "other_s": total - sum(timers.seconds.values()), "predicted": pred.predicted,
                         "outputs": [Path(p).name for p in pred.outputs]})
    load_end = load_average()
    print(f"  predict {job['side']} px: load average at end {load_end}", file=sys.stderr, flush=True)
    return {"kind": "predict", "side": job["side"], "threads": torch.get_num_threads(), "model_load_s": model_load_s,
            "runs": runs, "load_start": load_start, "load_end": load_end}


# --- child: tiling ---------------------------------------------------------------------------------------------------

def run_tiling(job: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    load_start = load_average()
    print(f"  tiling  {job['side']} px: load average at start {load_start}", file=sys.stderr, flush=True)
    from ats_model.contracts import to_unit_float
    from pipeline.reader import PatchReader
    from training.predict import load_model

    net = load_model(job["checkpoint"]).module.core.feature_net.eval()
    reader = PatchReader(job["root"])
    iid, b = job["image_id"], job["block"]
    info = reader.info(iid)
    ny, nx = math.ceil(info.height / PATCH), math.ceil(info.width / PATCH)
    n_tiles = ny * nx
    blocks = [(by, bx) for by in range(math.ceil(ny / b)) for bx in range(math.ceil(nx / b))]

    def block_boxes(by: int, bx: int) -> np.ndarray:
        ty, tx = np.meshgrid(np.arange(by * b, min((by + 1) * b, ny)), np.arange(bx * b, min((bx + 1) * b, nx)),
                             indexing="ij")
        ty, tx = ty.ravel(), tx.ravel()
        return np.stack([ty * PATCH, tx * PATCH, np.full_like(ty, PATCH), np.full_like(ty, PATCH)], 1)  # (n, 4)

    def run(chosen: list[tuple[int, int]]) -> dict[str, float]:
        """Read, featurise and average the tiles of `chosen` blocks; wall, read and net seconds, tiles."""
        read_s = net_s = 0.0
        total = torch.zeros(net.out_dim, dtype=torch.float64)
        tiles = 0
        start = time.perf_counter()
        with torch.no_grad():
            for by, bx in chosen:
                t0 = time.perf_counter()
                pixels = to_unit_float(reader.read(iid, block_boxes(by, bx)))  # (n, C, 50, 50) float32 in [0, 1]
                t1 = time.perf_counter()
                total += net(pixels).sum(0, dtype=torch.float64)  # (D,)
                net_s += time.perf_counter() - t1
                read_s += t1 - t0
                tiles += pixels.shape[0]
            mean = total / max(tiles, 1)  # the image's feature: what a tiling tool pools over
        return {"s": time.perf_counter() - start, "read_s": read_s, "net_s": net_s, "tiles": tiles,
                "mean_norm": float(mean.norm())}

    picks = sorted({int(round(i)) for i in np.linspace(0, len(blocks) - 1, min(job["sample_blocks"], len(blocks)))})
    warm = run([blocks[picks[0]]])  # untimed: first-call costs of torch and zarr
    sample = run([blocks[i] for i in picks])
    estimate_s = sample["s"] / sample["tiles"] * n_tiles
    passes = min(job["repeats"], int(job["budget_s"] // estimate_s)) if estimate_s > 0 else job["repeats"]
    full = [run(blocks) for _ in range(passes)]
    for f in full:
        assert f["tiles"] == n_tiles, (f["tiles"], n_tiles)
    load_end = load_average()
    print(f"  tiling  {job['side']} px: load average at end {load_end}", file=sys.stderr, flush=True)
    return {"kind": "tiling", "side": job["side"], "threads": torch.get_num_threads(), "tiles": n_tiles,
            "blocks": len(blocks), "block_tiles": b * b, "warmup": warm, "sample": sample, "estimate_s": estimate_s,
            "passes": full, "budget_s": job["budget_s"], "load_start": load_start, "load_end": load_end}


# --- parent ----------------------------------------------------------------------------------------------------------

def run_child(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    """`job` in a fresh interpreter; its stderr (the load-average lines) is passed through."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, __file__, "--one", json.dumps(job)], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, text=True, timeout=timeout)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{job['kind']} at {job['side']} px failed (exit {done.returncode}):\n{done.stdout[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def median_run(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run whose `key` is the (low) median: its parts add up to its total."""
    target = statistics.median_low([r[key] for r in runs])
    return next(r for r in runs if r[key] == target)


def summarise(side: int, setup: dict[str, Any], pred: dict[str, Any], tile: dict[str, Any]) -> dict[str, Any]:
    med = median_run(pred["runs"], "total_s")
    if tile["passes"]:
        tiling_s, measured, tiles_timed = median_run(tile["passes"], "s")["s"], True, tile["tiles"]
    else:
        tiling_s, measured, tiles_timed = tile["estimate_s"], False, tile["sample"]["tiles"]
    return {"side": side, "megapixels": side * side / 1e6, "view_hw": setup["view_hw"], "level": setup["level"],
            "predict_s": med["total_s"], "predict_first_s": pred["runs"][0]["total_s"],
            "predict_all_s": [r["total_s"] for r in pred["runs"]], "split_s": {**med["pieces_s"],
                                                                                "other": med["other_s"]},
            "inference_s": med["inference_s"], "model_load_s": pred["model_load_s"],
            "tiling_s": tiling_s, "tiling_measured": measured, "tiling_passes": len(tile["passes"]),
            "tiling_tiles_timed": tiles_timed, "tiles": tile["tiles"], "tiling_estimate_s": tile["estimate_s"],
            "tiling_all_s": [p["s"] for p in tile["passes"]],
            "tiling_read_net_s": ([median_run(tile["passes"], "s")[k] for k in ("read_s", "net_s")] if measured
                                  else [tile["sample"][k] / tile["sample"]["tiles"] * tile["tiles"]
                                        for k in ("read_s", "net_s")]),
            "ratio": tiling_s / med["total_s"],
            "load": {"predict": [pred["load_start"], pred["load_end"]],
                     "tiling": [tile["load_start"], tile["load_end"]]},
            "raw": {"predict": pred, "tiling": tile}}


def fmt_s(x: float) -> str:
    """Seconds with 4 significant digits (at most 4 decimals), thousands separated."""
    decimals = 4 if x <= 0 else min(4, max(0, 3 - math.floor(math.log10(x))))
    return f"{x:,.{decimals}f}"


def fmt_ratio(x: float) -> str:
    return f"{x:,.0f}x" if x >= 1000 else f"{x:,.1f}x" if x >= 10 else f"{x:,.2f}x"


def ms(x: float) -> str:
    return f"{1000 * x:,.1f}"


def report(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| side | MP | view | predict s/image | 1st call s | view read ms | attention ms | patch reads ms | "
           "feature net ms | exports ms (GeoJSON / PNG / zarr) | other ms | tiling s/image | tiles | "
           "tiling / predict | load 1-min start → end |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        sp = r["split_s"]
        other = sp["other"] + sp["head"] + sp["predictions"]
        exports = sp["geojson"] + sp["png"] + sp["zarr"]
        tiling = fmt_s(r["tiling_s"]) + ("" if r["tiling_measured"] else f" (est. from {r['tiling_tiles_timed']:,} "
                                                                          "tiles)")
        load = f"{r['load']['predict'][0].split()[0]} → {r['load']['tiling'][1].split()[0]}"
        mp = f"{r['megapixels']:,.{0 if r['megapixels'] >= 10 else 2}f}"
        out.append(f"| {r['side']:,} | {mp} | {r['view_hw'][0]} px | {fmt_s(r['predict_s'])} | "
                   f"{fmt_s(r['predict_first_s'])} | {ms(sp['view'])} | {ms(sp['attention'])} | "
                   f"{ms(sp['patches'])} | {ms(sp['features'])} | {ms(exports)} ({ms(sp['geojson'])} / "
                   f"{ms(sp['png'])} / {ms(sp['zarr'])}) | {ms(other)} | {tiling} | {r['tiles']:,} | "
                   f"{fmt_ratio(r['ratio'])} | {load} |")
    for line in out:
        print(line)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="sides 400 and 800, 1 repeat, tiny tile budget, < 60 s")
    parser.add_argument("--sides", type=int, nargs="+", help=f"image sides in px (default {FULL.sides})")
    parser.add_argument("--repeats", type=int, help="predict calls (and tiling passes, budget allowing) per side; "
                        "the median is reported (default 3)")
    parser.add_argument("--view", type=int, help="the view: the pyramid level nearest this side (default 250)")
    parser.add_argument("--top-k", type=int, help="K of mode topk (default 10)")
    parser.add_argument("--tile-budget-s", type=float, help="tiling seconds allowed per side; beyond, estimated "
                        "from a sample (default 600)")
    parser.add_argument("--scratch", type=Path, help="pyramids and checkpoints here (reused; never removed); "
                        "default a new folder in /tmp, removed at the end unless --keep")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one child job (JSON)
    args = parser.parse_args(argv)
    if args.one:
        job = json.loads(args.one)
        result = run_predict(job) if job["kind"] == "predict" else run_tiling(job)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    base = SMOKE if args.smoke else FULL
    s = Settings(sides=tuple(args.sides or base.sides), repeats=args.repeats or base.repeats,
                 view=args.view or base.view, top_k=args.top_k or base.top_k,
                 tile_budget_s=base.tile_budget_s if args.tile_budget_s is None else args.tile_budget_s,
                 block=base.block, sample_blocks=base.sample_blocks)
    if s.repeats < 1 or s.top_k < 1 or min(s.sides) < PATCH or s.tile_budget_s < 0:
        parser.error("expected --repeats >= 1, --top-k >= 1, sides >= 50 px and --tile-budget-s >= 0")
    own = args.scratch is None
    scratch = Path(tempfile.mkdtemp(prefix="gats-predict-speed-", dir="/tmp")) if own else args.scratch.resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print(f"load average at start: {load_average()}; sides {', '.join(map(str, s.sides))} px; ATS-{N_PATCHES} "
          f"(mnist_tanh, lenet1, {PATCH} px patches, untrained), mode topk K = {s.top_k}; view ~{s.view} px; "
          f"{s.repeats} repeat(s); tiling budget {s.tile_budget_s:g} s per side; scratch {scratch}\n", flush=True)
    try:
        setup = prepare(scratch, s)
        rows = []
        for side in s.sides:
            common = {"side": side, "root": setup[side]["root"], "image_id": setup[side]["image_id"],
                      "checkpoint": setup[side]["checkpoint"], "scratch": str(scratch), "repeats": s.repeats}
            print(f"{side:,} px: load average {load_average()}", flush=True)
            pred = run_child({**common, "kind": "predict", "top_k": s.top_k}, timeout=1800)
            tile = run_child({**common, "kind": "tiling", "budget_s": s.tile_budget_s, "block": s.block,
                              "sample_blocks": s.sample_blocks}, timeout=3600 + 2 * s.tile_budget_s)
            row = summarise(side, setup[side], pred, tile)
            rows.append(row)
            how = (f"{row['tiling_passes']} pass(es) of {row['tiles']:,} tiles" if row["tiling_measured"] else
                   f"estimated from {row['tiling_tiles_timed']:,} tiles (whole grid est. "
                   f"{row['tiling_estimate_s']:,.1f} s > budget)")
            print(f"{side:,} px: predict {row['predict_s']:.3f} s/image (all: "
                  f"{', '.join(f'{x:.3f}' for x in row['predict_all_s'])}), tiling {row['tiling_s']:,.2f} s ({how}), "
                  f"ratio {row['ratio']:,.1f}x; load predict {' → '.join(row['load']['predict'])}, tiling "
                  f"{' → '.join(row['load']['tiling'])}", flush=True)
        print(f"\nSeconds per image, 1 torch thread, CPU; predict = training.predict.predict (topk, K = {s.top_k}), "
              f"median of {s.repeats}, model load excluded; tiling = lenet1 on every {PATCH}x{PATCH} tile of "
              "level 0:\n")
        table = report(rows)
        wall = time.perf_counter() - start
        print(f"\nwall time {wall:.0f} s; load average at end: {load_average()}")
        if args.json:
            args.json.write_text(json.dumps({"settings": asdict(s), "wall_s": wall, "rows": rows, "table": table},
                                            indent=1))
            print(f"results: {args.json}")
    finally:
        if own and not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            print(f"scratch kept: {scratch}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
