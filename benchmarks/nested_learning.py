"""Does nested attention sampling learn what single-level ATS at the coarse view cannot? (issue 14, "Learning")

    .venv/bin/python benchmarks/nested_learning.py --budget-s 360 --eval-every-s 30 --seeds 0 1 \
        --json /tmp/nested_learning.json --png docs/img/nested_learning.png              (~45 min on 2 cores)
    .venv/bin/python benchmarks/nested_learning.py --oracle 1 16      the feature side alone (oracle(); ~1 min)
    .venv/bin/python benchmarks/nested_learning.py --smoke                                 < 60 s (the test)

The task: generated fluorescence-like slides of side 2048 px (RGB): dark glass with 3-5 discs of blue "tissue"
(about half of the slide) whose stain strength varies smoothly (a bilinear field with nodes 48 px apart, so it is
flat inside a patch and rough from one coarse pixel to the next). Inside the tissue sit glyphs of 16 px: five green
bars 3 px apart, horizontal (class 0) or vertical (class 1); the class is readable only at level 0. Training slides
hold 25 to 500 glyphs (uniform), test slides 25: the nets can learn what a glyph is on the dense slides, and the test
asks whether the attention can find the few glyphs of a sparse slide.
- Coarse view (1/64, 32 x 32 px): a glyph is 1.7% of one pixel and moves it by ~1 grey level (up to ~10 where
  glyphs share a pixel), while the stain field moves neighbouring tissue pixels by ~3 (the Laplacian's std): the
  tissue is plain to see, the glyphs are not.
- Fine level (1/8): a glyph is a 2 x 2 block with green raised by up to ~80 over a locally flat background.
So the coarse view can say where tissue is (which regions) but not where the glyphs are; the fine level can. A
single-level model on the coarse view that puts all its attention on tissue draws a patch holding a glyph with
probability about (glyphs x 32^2) / (tissue px): ~1% on a test slide, where a model that sees them can approach 1.

Models, with the same feature net (lenet1, 32-d) on the same 32-px level-0 patches, n = 4 patches per image, the same
attention net architecture (mnist_tanh), every net reading its input scaled per band by the training slides'
statistics (band_stats, nets.BandScaled), batch 8, Adam 3e-3 decayed on a cosine to 1.5e-4 over the budget,
entropy regulariser 1e-3, the same seed, data and wall-clock budget:
  nested       coarse view 1/64 -> M = 2 regions of 256 px (8 x 8 grid) -> fine attention at 1/8 inside each
               (32 x 32 positions, 8 px apart) -> N = 2 patches per region; both levels without replacement.
  ats-coarse   single-level ATS on the coarse view: its cells are 64 px apart, so its 32-px patches (centred on the
               cells) only ever see a quarter of the slide; it can learn where tissue is, not where glyphs are.
  ats-fine     single-level ATS on the whole fine level (256 x 256 view): the reference this demo can still afford at
               side 2048 (at 100k px that view is 12,500^2 px; benchmarks/nested_cost.py measures what it costs).
Each run trains for --budget-s seconds (evaluation excluded) and evaluates every --eval-every-s: the test error
(sampled mode, 200 test slides) and P(patch holds a glyph), the probability that one patch drawn from the model's
attention holds a glyph's centre (nested: from q(r, p) = A_r b^r_p over every region and position), on 16 test slides.
Prints a table per model and seed; --png draws that distribution on three test slides for the first seed's models.

Why n = 4 patches: the signal a glyph sends the feature net is its patch's share of the averaged feature. `--oracle
G N` trains the feature side alone on N patches per slide of which G are on glyphs: measure it before choosing N.

Pixels: the fine and coarse levels of every slide are computed once (mean pooling of level 0 rendered by strips, in
a process pool, cached under --cache) and kept (200 KB per slide); level-0 patches are rendered on demand from each
slide's seeded description, never a whole slide.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import time
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ats_model.ats import ATSConfig, ATSModel
from ats_model.contracts import to_unit_float
from ats_model.geometry import cells_to_boxes
from ats_model.memory_reader import crop
from ats_model.nested import NestedSampling
from ats_model.nested_model import NestedATSConfig, NestedATSModel
from ats_model.nets import BandScaled, create_attention, create_feature

GLASS = np.array([6, 6, 8], np.float32)
TISSUE = np.array([24, 60, 110], np.float32)

GLYPH = np.array([70, 235, 70], np.float32)
STAIN = np.array([14, 40, 45], np.float32)  # what stain strength 1 adds to the tissue colour (-1: subtracts)
STAIN_PITCH = 48  # px between the stain field's nodes: smooth inside a patch, rough at the coarse view
NOISE_TILE = 509  # px; a prime, so the tile's period never lines up with the grids


@dataclass(frozen=True, slots=True)
class Task:
    side: int = 2048
    train_glyphs: tuple[int, int] = (25, 500)  # glyphs per training slide: uniform in this range
    test_glyphs: int = 25  # glyphs per test slide: sparse
    glyph: int = 16
    coarse: int = 64  # level-0 px per coarse px
    fine: int = 8  # level-0 px per fine px
    seed: int = 0


@dataclass(frozen=True, slots=True)
class Scene:
    label: int
    discs: np.ndarray  # (k, 3) cy, cx, r
    glyphs: np.ndarray  # (n, 2) y0, x0 of each glyph box
    stain: np.ndarray  # (gy, gx) stain strength at the nodes of a STAIN_PITCH grid (bilinear in between)
    noise_yx: tuple[int, int]


@lru_cache(maxsize=1)
def _noise_tile() -> np.ndarray:
    return np.random.default_rng(12345).normal(0, 4, (NOISE_TILE, NOISE_TILE, 3)).astype(np.float32)


def glyph_mask(label: int, size: int) -> np.ndarray:
    """(size, size) bool: five-ish bars 3 px apart, horizontal for class 0, vertical for class 1."""
    g = np.zeros((size, size), bool)
    if label == 0:
        g[1::3, 1:-1] = True
    else:
        g[1:-1, 1::3] = True
    return g


def make_scene(task: Task, split: str, index: int) -> Scene:
    rng = np.random.default_rng([task.seed, {"train": 0, "test": 1}[split], index])
    label = int(rng.integers(2))
    s = task.side
    k = int(rng.integers(3, 6))
    r = rng.uniform(0.2, 0.3, k) * s
    centres = rng.uniform(0.15, 0.85, (k, 2)) * s
    discs = np.column_stack([centres, r]).astype(np.float32)
    glyphs: list[tuple[int, int]] = []
    n_glyphs = task.test_glyphs if split == "test" else int(rng.integers(task.train_glyphs[0],
                                                                             task.train_glyphs[1] + 1))
    while len(glyphs) < n_glyphs:
        d = discs[int(rng.integers(k))]
        a, rho = rng.uniform(0, 2 * math.pi), math.sqrt(rng.uniform()) * (d[2] - task.glyph)
        y0, x0 = int(d[0] + rho * math.sin(a)) - task.glyph // 2, int(d[1] + rho * math.cos(a)) - task.glyph // 2
        inside = 0 <= y0 <= s - task.glyph and 0 <= x0 <= s - task.glyph
        if inside and all(abs(y0 - y) > task.glyph + 4 or abs(x0 - x) > task.glyph + 4 for y, x in glyphs):
            glyphs.append((y0, x0))
    g = s // STAIN_PITCH + 2
    stain = rng.uniform(-1, 1, (g, g)).astype(np.float32)
    return Scene(label, discs, np.asarray(glyphs, np.int64), stain,
                 (int(rng.integers(NOISE_TILE)), int(rng.integers(NOISE_TILE))))


def render(task: Task, scene: Scene, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """Level-0 pixels of box (y0, x0, h, w) as (h, w, 3) float32 in [0, 255]; 0 outside the slide."""
    ys, xs = np.arange(y0, y0 + h), np.arange(x0, x0 + w)
    ny, nx = scene.noise_yx
    img = GLASS + _noise_tile()[np.ix_((ys + ny) % NOISE_TILE, (xs + nx) % NOISE_TILE)]  # (h, w, 3)
    tissue = np.zeros((h, w), bool)
    for cy, cx, r in scene.discs:
        tissue |= (ys[:, None] - cy) ** 2 + (xs[None, :] - cx) ** 2 < r * r
    fy, fx = np.clip(ys, 0, task.side - 1) / STAIN_PITCH, np.clip(xs, 0, task.side - 1) / STAIN_PITCH
    iy, ix = fy.astype(int), fx.astype(int)
    wy, wx = (fy - iy)[:, None], (fx - ix)[None, :]
    n = scene.stain
    stain = ((1 - wy) * ((1 - wx) * n[np.ix_(iy, ix)] + wx * n[np.ix_(iy, ix + 1)])
             + wy * ((1 - wx) * n[np.ix_(iy + 1, ix)] + wx * n[np.ix_(iy + 1, ix + 1)]))  # (h, w) in [-1, 1]
    img[tissue] += TISSUE - GLASS + STAIN * stain[tissue][:, None]
    g = task.glyph
    mask = glyph_mask(scene.label, g)
    for gy0, gx0 in scene.glyphs:
        oy, ox = max(gy0, y0), max(gx0, x0)
        ey, ex = min(gy0 + g, y0 + h), min(gx0 + g, x0 + w)
        if oy >= ey or ox >= ex:
            continue
        box = img[oy - y0:ey - y0, ox - x0:ex - x0]
        box[mask[oy - gy0:ey - gy0, ox - gx0:ex - gx0]] = GLYPH
    img[(ys < 0) | (ys >= task.side)] = 0
    img[:, (xs < 0) | (xs >= task.side)] = 0
    return np.clip(img, 0, 255)


def pooled_levels(task: Task, scene: Scene, strip: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """The fine and coarse levels of a slide (3, h, w) uint8, mean-pooled from level 0 rendered in strips."""
    s, f, c = task.side, task.fine, task.coarse
    fine = np.empty((s // f, s // f, 3), np.float32)
    for y in range(0, s, strip):
        block = render(task, scene, y, 0, strip, s)
        fine[y // f:(y + strip) // f] = block.reshape(strip // f, f, s // f, f, 3).mean((1, 3))
    k = c // f
    coarse = fine.reshape(s // c, k, s // c, k, 3).mean((1, 3))
    as_u8 = lambda a: np.rint(a).astype(np.uint8).transpose(2, 0, 1)  # noqa: E731
    return as_u8(fine), as_u8(coarse)


class Slides:
    """A split of generated slides: coarse and fine levels in memory, level 0 rendered on demand (the readers)."""

    def __init__(self, task: Task, split: str, n: int, cache: Path | None = None) -> None:
        self.task = task
        self.scenes = [make_scene(task, split, i) for i in range(n)]
        key = hashlib.sha256(repr((asdict(task), split, n)).encode()).hexdigest()[:16]
        path = cache / f"{split}-{key}.npz" if cache else None
        if path and path.exists():
            with np.load(path) as f:
                self.fine, self.coarse = f["fine"], f["coarse"]
        else:
            with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
                levels = pool.starmap(pooled_levels, [(task, s) for s in self.scenes], chunksize=4)
            self.fine = np.stack([f for f, _ in levels])  # (n, 3, s/8, s/8)
            self.coarse = np.stack([c for _, c in levels])  # (n, 3, s/64, s/64)
            if path:
                path.parent.mkdir(parents=True, exist_ok=True)
                np.savez(path.with_suffix(".tmp.npz"), fine=self.fine, coarse=self.coarse)
                path.with_suffix(".tmp.npz").replace(path)
        self.labels = torch.tensor([s.label for s in self.scenes])

    def level0_hw(self, ids) -> Tensor:
        return torch.full((len(ids), 2), self.task.side, dtype=torch.long)

    def view(self, ids, factor: int) -> Tensor:
        """The whole coarse or fine level of each slide (B, 3, h, w) in [0, 1]."""
        levels = {self.task.coarse: self.coarse, self.task.fine: self.fine}
        if factor not in levels:
            raise ValueError(f"Expected the coarse or fine level's factor {sorted(levels)}. Got {factor}.")
        return to_unit_float(levels[factor][list(ids)])

    def read_patches(self, ids, boxes: Tensor) -> Tensor:
        """(B, N, 4) level-0 boxes -> (B, N, 3, h, w) in [0, 1]."""
        out = [[render(self.task, self.scenes[int(i)], *(int(v) for v in box)) for box in row]
               for i, row in zip(ids, boxes.tolist())]
        arr = np.asarray(out, np.float32).transpose(0, 1, 4, 2, 3) / 255.0
        return torch.from_numpy(arr)

    def read_regions(self, ids, boxes: Tensor, downsample: int) -> Tensor:
        """(U, 4) level-0 boxes -> (U, 3, h/d, w/d) crops of the fine level, 0 outside."""
        if downsample != self.task.fine:
            raise ValueError(f"Expected the fine level's factor {self.task.fine}. Got {downsample}.")
        return to_unit_float(np.stack([crop(self.fine[int(i)], box)
                                       for i, box in zip(ids, (boxes // downsample).tolist())]))


@dataclass(frozen=True, slots=True)
class Setup:
    budget_s: float = 900.0
    eval_every_s: float = 120.0
    n_train: int = 600
    n_test: int = 200
    batch: int = 8
    lr: float = 3e-3  # Adam's, at the start; cosine_lr: decayed to lr / 20 over the budget
    cosine_lr: bool = True
    entropy_lambda: float = 1e-3  # 0.01 flattened the learned attention over the tissue (see docs/benchmarks.md)
    region_px: int = 256
    n_regions: int = 2
    per_region: int = 2
    patch: int = 32
    models: tuple[str, ...] = ("nested", "ats-coarse", "ats-fine")
    band_scaled: bool = True  # nets read (x - mean) / std per band (band_stats); False: raw [0, 1] pixels
    seed: int = 0


def band_stats(data: Slides, patch: int = 32, n_patches: int = 512,
               seed: int = 0) -> dict[str, tuple[list, list]]:
    """Per-band mean and std (C,) in [0, 1] of what each net reads on the training slides: "coarse" and "fine" over
    those whole levels, "patch" over n_patches random level-0 patches of side `patch` (level 0 is rougher than its
    mean-pooled levels, so it gets its own). Ingest records one level's per image (issue 12); here, once per split."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(len(data.scenes), size=n_patches)
    yx = rng.integers(0, data.task.side - patch, size=(n_patches, 2))
    boxes = torch.tensor([[[y, x, patch, patch]] for y, x in yx.tolist()])  # (n, 1, 4)
    patches = data.read_patches(ids.tolist(), boxes)[:, 0]  # (n, 3, patch, patch)
    stat = lambda x: (x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3), correction=0).tolist())  # noqa: E731
    return {"coarse": stat(to_unit_float(data.coarse)), "fine": stat(to_unit_float(data.fine)), "patch": stat(patches)}


def build(name: str, task: Task, setup: Setup, stats: dict[str, tuple[list, list]] | None = None) -> torch.nn.Module:
    """The model `name` with fresh nets seeded by setup.seed; with `stats` (band_stats) every net reads its input
    scaled per band (nets.BandScaled), else raw [0, 1] pixels."""
    torch.manual_seed(setup.seed)
    scaled = lambda net, key: BandScaled(net, *stats[key]) if stats else net  # noqa: E731
    feature = scaled(create_feature("lenet1", 3, out_dim=32), "patch")
    patch = (setup.patch, setup.patch)
    n = setup.n_regions * setup.per_region
    if name == "nested":
        cfg = NestedATSConfig(
            sampling=NestedSampling(n_regions=setup.n_regions, n_patches_per_region=setup.per_region),
            region_px=(setup.region_px, setup.region_px), fine_downsample=task.fine, patch_hw=patch,
            entropy_lambda=setup.entropy_lambda)
        return NestedATSModel(scaled(create_attention("mnist_tanh", 3), "coarse"),
                              scaled(create_attention("mnist_tanh", 3), "fine"), feature, 2, cfg)
    cfg = ATSConfig(n_patches=n, patch_hw=patch, entropy_lambda=setup.entropy_lambda)
    view = "coarse" if name == "ats-coarse" else "fine"
    return ATSModel(scaled(create_attention("mnist_tanh", 3), view), feature, 2, cfg)


def forward(name: str, model, data: Slides, ids, mode: str, gen: torch.Generator):
    """The model's output (NestedATSOutput or ATSOutput) on a batch of slide ids, in `mode`."""
    hw = data.level0_hw(ids)
    if name == "nested":
        out = model(data.view(ids, data.task.coarse), data.read_regions, data.read_patches, ids, hw,
                    coarse_scale=data.task.coarse, mode=mode, generator=gen)
    else:
        factor = data.task.coarse if name == "ats-coarse" else data.task.fine
        out = model(data.view(ids, factor), data.read_patches, ids, hw, low_scale=factor, mode=mode, generator=gen)
    return out


def evaluate(name: str, model, data: Slides, setup: Setup, gen: torch.Generator) -> float:
    model.eval()
    wrong = 0
    with torch.no_grad():
        for start in range(0, len(data.scenes), setup.batch):
            ids = list(range(start, min(start + setup.batch, len(data.scenes))))
            out = forward(name, model, data, ids, "sampled", gen)
            wrong += int((out.logits.argmax(1) != data.labels[ids]).sum())
    model.train()
    return wrong / len(data.scenes)


def _hits(boxes: Tensor, glyph_centres: np.ndarray) -> Tensor:
    """(..., 4) level-0 boxes -> (...) bool: the box holds the centre of one of the glyphs (n, 2)."""
    c = torch.from_numpy(glyph_centres).double()  # (n, 2)
    start, size = boxes[..., None, :2].double(), boxes[..., None, 2:].double()  # (..., 1, 2) each
    return ((c >= start) & (c < start + size)).all(-1).any(-1)


@torch.no_grad()
def joint_attention(name: str, model, data: Slides, ids: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """The distribution one patch is drawn from, over every place the model can read: q (B, K), the level-0 boxes
    (B, K, 4) and q as a map (B, h, w) (nested: q(r, p) = A_r b^r_p over every region and position, on the fine
    grid; single-level: the attention over its view's cells)."""
    task, hw = data.task, data.level0_hw(ids)
    if name == "nested":
        coarse = data.view(ids, task.coarse)
        cells = model.region_cells(coarse)
        own = torch.tensor(coarse.shape[-2:]).expand(len(ids), 2)
        logits, grid = model.region_logits(coarse, hw, task.coarse, own, cells)  # (B, R)
        every = torch.arange(grid[0] * grid[1]).expand(len(ids), -1)  # (B, R)
        fine, _ = model.fine_logits(data.read_regions, ids, hw, every, grid, cells, coarse.device)  # (B, R, P)
        q = torch.softmax(logits, 1)[:, :, None] * torch.softmax(fine, 2)  # (B, R, P)
        positions = torch.arange(cells.n_positions).expand(*every.shape, -1)  # (B, R, P)
        boxes = cells.boxes(model.config.layout, every, positions, grid, model.config.patch_hw)  # (B, R, P, 4)
        (ry, rx), (py, px) = grid, cells.hw
        heat = q.reshape(len(ids), ry, rx, py, px).permute(0, 1, 3, 2, 4).reshape(len(ids), ry * py, rx * px)
        return q.flatten(1), boxes.flatten(1, 2), heat
    factor = task.coarse if name == "ats-coarse" else task.fine
    heat = model.attention_map(data.view(ids, factor))  # (B, Ha, Wa)
    every = torch.arange(heat[0].numel()).expand(len(ids), -1)  # (B, K)
    boxes = cells_to_boxes(every, tuple(heat.shape[-2:]), factor, model.config.patch_hw, model.attention_net.grid)
    return heat.flatten(1), boxes, heat


def hit_probability(name: str, model, data: Slides, ids: list[int]) -> np.ndarray:
    """Per image, the probability that one patch drawn from the model's attention holds a glyph's centre."""
    q, boxes, _ = joint_attention(name, model, data, ids)
    half = data.task.glyph // 2
    return np.array([float((q[k] * _hits(boxes[k], data.scenes[i].glyphs + half)).sum()) for k, i in enumerate(ids)])


def train(name: str, task: Task, setup: Setup, train_data: Slides, test_data: Slides,
          stats: dict[str, tuple[list, list]] | None = None) -> dict:
    model = build(name, task, setup, stats)
    opt = torch.optim.Adam(model.parameters(), lr=setup.lr)
    gen = torch.Generator().manual_seed(setup.seed)
    rng = np.random.default_rng(setup.seed)
    curve, trained, steps, next_eval = [], 0.0, 0, 0.0
    order = rng.permutation(len(train_data.scenes))
    cursor = 0
    while True:
        if trained >= next_eval:
            err = evaluate(name, model, test_data, setup, torch.Generator().manual_seed(1))
            hit = float(hit_probability(name, model, test_data, list(range(min(16, setup.n_test)))).mean())
            curve.append({"train_s": round(trained, 1), "steps": steps, "test_error": err, "p_hit": hit,
                          "load": os.getloadavg()[0]})
            print(f"  {name}: {trained:6.0f} s, {steps:5d} steps, test error {err:.3f}, P(patch holds a glyph) "
                  f"{hit:.3f}, load {os.getloadavg()[0]:.2f}", flush=True)
            next_eval += setup.eval_every_s
            if trained >= setup.budget_s:
                break
        if cursor + setup.batch > len(order):
            order, cursor = rng.permutation(len(train_data.scenes)), 0
        ids = order[cursor:cursor + setup.batch].tolist()
        cursor += setup.batch
        if setup.cosine_lr:
            done = min(trained / setup.budget_s, 1.0)
            for group in opt.param_groups:
                group["lr"] = setup.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * done)))
        start = time.perf_counter()
        out = forward(name, model, train_data, ids, "sampled", gen)
        loss = model.loss(out, train_data.labels[ids])
        opt.zero_grad()
        loss.backward()
        opt.step()
        trained += time.perf_counter() - start
        steps += 1
    return {"model": name, "curve": curve, "ms_per_sample": 1000 * trained / max(steps * setup.batch, 1),
            "model_obj": model}


def save_heatmaps(path: Path, models: dict[str, torch.nn.Module], data: Slides, ids: list[int]) -> None:
    """One row per test slide: the slide at the fine level with its glyphs circled, then per model the distribution
    one patch is drawn from (joint_attention), glyphs circled on it too; nested outlines its top-M regions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task = data.task
    fig, axes = plt.subplots(len(ids), 1 + len(models), figsize=(3.1 * (1 + len(models)), 3.1 * len(ids)), dpi=90,
                             squeeze=False)
    for row, i in enumerate(ids):
        centres = (data.scenes[i].glyphs + task.glyph / 2) / task.side  # (n, 2) as fractions of the side
        axes[row, 0].imshow(data.fine[i].transpose(1, 2, 0), extent=(0, 1, 1, 0))
        axes[row, 0].set_title(f"test slide {i}: class {data.scenes[i].label}", fontsize=8)
        for col, (name, model) in enumerate(models.items(), 1):
            _, _, heat = joint_attention(name, model, data, [i])
            ax = axes[row, col]
            ax.imshow(heat[0].numpy(), cmap="inferno", extent=(0, 1, 1, 0), interpolation="nearest")
            hit = float(hit_probability(name, model, data, [i])[0])
            ax.set_title(f"{name}: P(patch on a glyph) {hit:.2f}", fontsize=8)
            if name == "nested":
                top = model.attention(data.view([i], task.coarse), data.read_regions, [i], data.level0_hw([i]),
                                      coarse_scale=task.coarse)
                layout = model.config.layout
                for box in layout.boxes(top.regions.regions[0], top.region_grid).tolist():
                    y0, x0, h, w = (v / task.side for v in box)
                    ax.add_patch(plt.Rectangle((x0, y0), w, h, fill=False, edgecolor="cyan", linewidth=0.8))
        for ax in axes[row]:
            ax.scatter(centres[:, 1], centres[:, 0], s=40, facecolors="none", edgecolors="lime", linewidths=0.8)
            ax.set_xlim(0, 1), ax.set_ylim(1, 0), ax.axis("off")
    fig.suptitle("Where one patch is drawn from after training (glyphs circled in green; nested: its top regions "
                 "in cyan)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def oracle(task: Task, data: Slides, setup: Setup, glyph_patches: int, n: int, steps: int,
           stats: dict[str, tuple[list, list]] | None = None) -> list[float]:
    """The feature side alone, no attention: lenet1 + a linear head on the plain mean of the features of n 32-px
    patches per slide, `glyph_patches` of them centred (+-7 px) on random glyphs, the rest uniform over the slide.
    Returns the training loss every 50 steps: can one glyph among n patches teach the feature net at all?"""
    torch.manual_seed(setup.seed)
    rng = np.random.default_rng(setup.seed)
    feature, head = create_feature("lenet1", 3, out_dim=32), torch.nn.Linear(32, 2)
    feature = BandScaled(feature, *stats["patch"]) if stats else feature
    opt = torch.optim.Adam([*feature.parameters(), *head.parameters()], lr=setup.lr)
    half, losses = setup.patch // 2, []
    for step in range(steps):
        ids = rng.integers(len(data.scenes), size=setup.batch)
        boxes = []
        for i in ids:
            glyphs = data.scenes[int(i)].glyphs[rng.integers(len(data.scenes[int(i)].glyphs), size=glyph_patches)]
            near = glyphs + task.glyph // 2 - half + rng.integers(-7, 8, size=glyphs.shape)
            rest = rng.integers(0, task.side - setup.patch, size=(n - glyph_patches, 2))
            boxes.append([[*yx, setup.patch, setup.patch] for yx in np.concatenate([near, rest]).tolist()])
        patches = data.read_patches(ids.tolist(), torch.tensor(boxes))  # (B, n, 3, P, P)
        pooled = feature(patches.flatten(0, 1)).reshape(len(ids), n, -1).mean(1)  # (B, 32)
        loss = torch.nn.functional.cross_entropy(head(pooled), data.labels[ids])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            losses.append(round(float(loss.detach()), 3))
    return losses


DEFAULT = Setup()


def first_below(curve: list[dict], level: float) -> float | None:
    """Training seconds at the first evaluation with test error < level (None: never within the budget)."""
    return next((c["train_s"] for c in curve if c["test_error"] < level), None)


def report(results: list[dict], setup: Setup) -> str:
    """Markdown: per model and seed, the test error at each quarter of the budget and its mean over the last quarter's
    evaluations, when it first fell below chance by three standard errors, P(patch holds a glyph) at the start and
    over the last quarter, and the training time per sample."""
    quarters = [setup.budget_s * q / 4 for q in (1, 2, 3, 4)]
    head = " | ".join(f"error at {q:.0f} s" for q in quarters)
    lines = [f"| model | seed | {head} | error, last quarter (mean) | first error < 0.5 - 3 SE | P(patch holds a "
             "glyph): start -> last quarter | ms / sample | steps | load (min-max) |",
             "|---|---:|" + "---:|" * (len(quarters) + 6)]
    for r in results:
        curve = r["curve"]
        n_test = setup.n_test
        learned = first_below(curve, 0.5 - 3 * math.sqrt(0.25 / n_test))
        at = [min((c for c in curve if c["train_s"] >= q - 1e-6), key=lambda c: c["train_s"], default=curve[-1])
              for q in quarters]
        last = [c for c in curve if c["train_s"] >= quarters[2] - 1e-6] or curve[-1:]
        loads = [c["load"] for c in curve]
        lines.append(f"| {r['model']} | {r['seed']} | " + " | ".join(f"{c['test_error']:.3f}" for c in at)
                     + f" | {np.mean([c['test_error'] for c in last]):.3f}"
                     + f" | {'not reached' if learned is None else f'{learned:.0f} s'}"
                     + f" | {curve[0]['p_hit']:.3f} -> {np.mean([c['p_hit'] for c in last]):.3f}"
                     + f" | {r['ms_per_sample']:.1f} | {curve[-1]['steps']} | {min(loads):.2f}-{max(loads):.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a 512-px task, 3 s per model: checks the wiring only")
    parser.add_argument("--budget-s", type=float, help=f"training seconds per run (default {DEFAULT.budget_s})")
    parser.add_argument("--eval-every-s", type=float, help=f"default {DEFAULT.eval_every_s}")
    parser.add_argument("--models", nargs="+", help=f"default {' '.join(DEFAULT.models)}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per model and seed (default 0)")
    parser.add_argument("--n-train", type=int, help=f"default {DEFAULT.n_train}")
    parser.add_argument("--n-test", type=int, help=f"default {DEFAULT.n_test}")
    parser.add_argument("--lr", type=float, help=f"Adam's learning rate (default {DEFAULT.lr})")
    parser.add_argument("--constant-lr", action="store_true", help="no cosine decay of the learning rate")
    parser.add_argument("--entropy-lambda", type=float, help=f"default {DEFAULT.entropy_lambda}")
    parser.add_argument("--raw-pixels", action="store_true",
                        help="nets read raw [0, 1] pixels, not scaled per band (how the first results were made)")
    parser.add_argument("--cache", type=Path, default=Path(".cache/gats/nested_learning"),
                        help="where the generated levels are kept between runs (default %(default)s)")
    parser.add_argument("--oracle", type=int, nargs=2, metavar=("GLYPH_PATCHES", "N"),
                        help="instead: the feature side alone, GLYPH_PATCHES of N patches on glyphs (see oracle())")
    parser.add_argument("--oracle-steps", type=int, default=400)
    parser.add_argument("--json", type=Path, help="write the curves here")
    parser.add_argument("--report", type=Path, help="instead: print the table of curves a --json run wrote")
    parser.add_argument("--png", type=Path, help="heatmaps of the first seed's models on three test slides")
    args = parser.parse_args(argv)
    if args.report:
        saved = json.loads(args.report.read_text())
        print(report(saved["results"], Setup(**{**saved["setup"], "models": tuple(saved["setup"]["models"])})))
        return 0
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    task, setup, cache = Task(), Setup(), args.cache
    if args.smoke:
        task, cache = Task(side=512, train_glyphs=(4, 16), test_glyphs=4), None
        setup = Setup(budget_s=3, eval_every_s=3, n_train=16, n_test=8)
    over = {k: v for k, v in {"budget_s": args.budget_s, "eval_every_s": args.eval_every_s, "n_train": args.n_train,
                              "n_test": args.n_test, "lr": args.lr,
                              "entropy_lambda": args.entropy_lambda,
                              "band_scaled": False if args.raw_pixels else None,
                              "cosine_lr": False if args.constant_lr else None,
                              "models": tuple(args.models) if args.models else None}.items() if v is not None}
    setup = replace(setup, **over)
    print(f"task {asdict(task)}\nsetup {asdict(setup)}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; torch threads "
          f"{torch.get_num_threads()}", flush=True)
    t0 = time.perf_counter()
    train_data, test_data = Slides(task, "train", setup.n_train, cache), Slides(task, "test", setup.n_test, cache)
    print(f"{setup.n_train} train + {setup.n_test} test slides of {task.side} px ready in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    stats = band_stats(train_data, setup.patch) if setup.band_scaled else None
    if stats:
        print("per-band mean and std the nets scale by: " + "; ".join(
            f"{k} {np.round(m, 3).tolist()} {np.round(sd, 3).tolist()}" for k, (m, sd) in stats.items()))
    if args.oracle:
        for seed in args.seeds:
            losses = oracle(task, train_data, replace(setup, seed=seed), *args.oracle, args.oracle_steps, stats)
            print(f"oracle, {args.oracle[0]} of {args.oracle[1]} patches on glyphs, seed {seed}: training loss every "
                  f"50 steps {losses}; load {os.getloadavg()[0]:.2f}")
        return 0
    results, first = [], {}
    for seed in args.seeds:
        for name in setup.models:
            r = train(name, task, replace(setup, seed=seed), train_data, test_data, stats)
            first.setdefault(name, r.pop("model_obj"))
            results.append({**r, "seed": seed})
    if args.png:
        save_heatmaps(args.png, first, test_data, [0, 1, 2])
    print()
    print(report(results, setup))
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        saved = {"task": asdict(task), "setup": asdict(setup), "band_stats": stats, "results": results}
        args.json.write_text(json.dumps(saved, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
