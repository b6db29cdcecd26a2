"""Training data over an ingested ROOT: the manifest as examples, per-worker shards and batches, the low-res views,
and the patch fetchers (a direct PatchReader, or the Ray patch servers).

    examples, classes = load_split(root, "train")         complete manifest rows of a split, labels as indices
    splits = load_splits(cfg.data, seed)                  train / val / test: the manifest's val split, or a
                                                          carved fraction of train (whole groups), caps applied
    shard_indices(n, rank, world, epoch, seed)            an equal-length slice per worker (DDP needs equal steps)
    views = LowResViews(reader, scale)                     whole low-res levels, read once per worker and cached
    views = LowResViews(reader, scale, view=Requested(8, ..), patch=Requested(0.5, ..))   per image: the level
                                                          nearest 8 um/px, and the patch frame (level-0 px per patch
                                                          px, the level read); cfg.data.view_resolution gives them
    fetcher = DirectFetcher(reader) | ServerFetcher(PatchClient(servers))
    fetcher = DirectFetcher(InMemoryImages(reader, image_ids))   data.in_memory: level 0 read whole into RAM first
    pending = fetcher.submit(image_ids, boxes)            one request per server for only these boxes
    ready, pending = fetcher.wait_any(pending)             whichever server answered first (ray.wait)
    read = patch_reader_fn(fetcher)                        the model's PatchReadFn (blocking) over a fetcher
    read_regions = region_reader_fn(fetcher)               the nested model's RegionReadFn: level-0 region boxes
                                                          read at the level whose exact factor is the downsample

Groups (the manifest `group`: patient, site) are the units that must not straddle splits: with `data.grouped` a
carved validation set takes whole groups, and a group found in two of the manifest's own splits is refused with a
`GroupLeakError` naming it (an image without a group is its own unit).

Pixels reach the nets as float32 in [0, 1] (ats_model.contracts.to_unit_float). Boxes are level-0 (y0, x0, h, w)
everywhere; each batch carries its views' exact level factors (`low_scale`) for the cell-to-box mapping, and with
data.patch_um_per_px each image's patch frame (`patch_scale`, `patch_level`; pipeline.resolution): the model plans
in the frame (`Batch.frame_scale`), its boxes are scaled to level 0, and the fetchers read them at the patch level,
resampled to the patch size (`patch_read_args`).
"""
from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from ats_model.contracts import PatchReadFn, to_unit_float
from ats_model.geometry import scale_boxes
from ats_model.memory_reader import crop
from ats_model.nested_model import RegionReadFn
from pipeline import resolution
from pipeline.manifest import ManifestRow, read_manifest
from pipeline.reader import PatchReader, level_for_factor
from pipeline.resolution import resample
from training import config as C


class GroupLeakError(ValueError):
    """The manifest puts one group (patient, site) in two splits: a model would be tested on what it trained on."""


@dataclass(frozen=True, slots=True)
class Example:
    image_id: str
    label: int
    height: int
    width: int
    channels: int
    group: str = ""
    band_mean: tuple[float, ...] = ()  # the manifest's per-band statistics ((): not recorded)
    band_std: tuple[float, ...] = ()
    dtype: str = ""  # the stored dtype ("uint8", "uint16", ...)


@dataclass(frozen=True, slots=True)
class Splits:
    train: list[Example]
    val: list[Example]  # empty: no validation set
    test: list[Example]
    classes: tuple[str, ...]
    val_source: str  # "manifest", "carved" or "" (none)


def check_groups(rows: Sequence[ManifestRow], root: str = "") -> None:
    """Raise GroupLeakError when a non-empty group has complete images in more than one split."""
    splits: dict[str, set[str]] = {}
    for r in rows:
        if r.group and r.status == "complete":
            splits.setdefault(r.group, set()).add(r.split)
    leaks = {g: sorted(s) for g, s in splits.items() if len(s) > 1}
    if leaks:
        named = "; ".join(f"{g!r} in {', '.join(s)}" for g, s in sorted(leaks.items())[:10])
        raise GroupLeakError(
            f"{len(leaks)} group(s) of the manifest{f' of {root}' if root else ''} have images in more than one "
            f"split: {named}{' ...' if len(leaks) > 10 else ''}. Put each group's images in one split (fix the "
            "split column of the CSV and re-run jobs/ingest.py), or set data.grouped=false to accept the leak.")


def _examples(rows: Sequence[ManifestRow], classes: Sequence[str], split: str) -> list[Example]:
    index = {c: i for i, c in enumerate(classes)}
    return [Example(r.image_id, index[r.label], int(r.height), int(r.width), int(r.channels), r.group, r.band_mean,
                    r.band_std, r.dtype or "") for r in rows if r.split == split and r.status == "complete"]


def pooled_band_stats(examples: Sequence[Example | ManifestRow],
                      root: str = "") -> tuple[list[float], list[float]]:
    """Per-band mean and std (C,) over the pixels of all `examples` (or complete manifest rows), from each image's
    statistics weighted by its level-0 area (law of total variance: var = E[var_i] + Var[mean_i]); what
    model.band_scaled scales by. ValueError naming the fix when an image has none recorded, the band counts
    differ, or a band is constant over all of them."""
    if not examples:
        raise ValueError("model.band_scaled needs training images to measure; the training split is empty.")
    missing = [e.image_id for e in examples if not e.band_mean or len(e.band_std) != len(e.band_mean)]
    if missing:
        raise ValueError(
            f"model.band_scaled needs per-band statistics in the manifest; {len(missing)} training images have none "
            f"(e.g. {missing[:3]}). Re-run jobs/ingest.py with the same sources and --out {root or 'ROOT'}: it "
            "records them for complete images without rewriting them.")
    bands = {len(e.band_mean) for e in examples}
    if len(bands) != 1:
        raise ValueError(f"Expected every training image to have the same band count. Got {sorted(bands)}: ingest "
                         "images of one band layout per dataset, or set model.band_scaled=false.")
    area = np.array([e.height * e.width for e in examples], np.float64)[:, None]  # (n, 1)
    w = area / area.sum()
    mean = np.array([e.band_mean for e in examples])  # (n, C)
    std = np.array([e.band_std for e in examples])
    pooled = (w * mean).sum(0)  # (C,)
    var = (w * (std ** 2 + (mean - pooled) ** 2)).sum(0)
    constant = [c for c, v in enumerate(var.tolist()) if not v > 0]
    if constant:
        raise ValueError(f"Bands {constant} are constant over the training split (std 0): they carry no signal and "
                         "cannot be standardised. Drop them at ingest, or set model.band_scaled=false.")
    return pooled.tolist(), np.sqrt(var).tolist()


def band_scaling(model: C.ModelConfig, train: Sequence[Example], root: str = "") -> tuple[bool, str]:
    """model.band_scaled resolved, and why: as set when true or false; auto (None) is on when a training image is
    stored in another dtype than uint8 (dividing uint16 by 65535 crushes 12-bit data into [0, 0.06]) and the
    statistics can be pooled, off for uint8 data (already in [0, 1] with a useful spread), for the cnn baseline
    (no attention or feature net), and when statistics are missing or a band is constant (the reason says which)."""
    if model.band_scaled is not None:
        return model.band_scaled, "set"
    if model.name == "cnn":
        return False, "auto: the cnn baseline has no nets to scale"
    wide = sorted({e.dtype for e in train if e.dtype and e.dtype != "uint8"})
    if not wide:
        return False, "auto: the training images are uint8"
    try:
        pooled_band_stats(train, root)
    except ValueError as exc:
        return False, f"auto: off, the statistics cannot be used ({exc})"
    return True, f"auto: the training images are {', '.join(wide)}"


def with_band_scaling(cfg: C.TrainConfig, train: Sequence[Example], resume: str | None = None
                      ) -> tuple[C.TrainConfig, str]:
    """`cfg` with model.band_scaled true or false (band_scaling), and the reason; what the driver logs as params
    and the workers build and checkpoint. Resuming from a checkpoint folder, auto takes the checkpoint's value (its
    nets have, or lack, the scaling layers)."""
    if cfg.model.band_scaled is None and resume:
        from training import checkpoint

        saved = checkpoint.load(resume).config.model.band_scaled
        if saved is not None:
            return cfg.replace(model={"band_scaled": saved}), "auto: as in the checkpoint resumed from"
    on, why = band_scaling(cfg.model, train, cfg.data.root)
    return cfg.replace(model={"band_scaled": on}), why


def _no_images(root: str, split: str) -> ValueError:
    return ValueError(f"No complete images in split {split!r} of {root}: check data.train_split/data.test_split "
                      f"or run jobs/ingest.py --out {root}.")


def load_split(root: str, split: str, max_n: int = 0, *, grouped: bool = True
               ) -> tuple[list[Example], tuple[str, ...]]:
    """Complete images of `split` in manifest order (at most `max_n` when > 0), and the class order. With `grouped`,
    a group in two splits of the manifest raises GroupLeakError."""
    rows, classes = read_manifest(root)
    if grouped:
        check_groups(rows, root)
    examples = _examples(rows, classes, split)
    if not examples:
        raise _no_images(root, split)
    return (examples[:max_n] if max_n else examples), classes


def carve(groups: Sequence[str], fraction: float, seed: int, *, grouped: bool = True) -> tuple[list[int], list[int]]:
    """(train indices, validation indices), both sorted, splitting items whose groups are `groups` (n,). Units (a
    group; an item without a group, or every item when not `grouped`) are taken in a seeded random order, and each
    goes to validation when that brings its size closer to round(fraction * n) (at least one unit: the smallest,
    when every unit is too large); the rest stay in train. Deterministic in (groups, fraction, seed); never splits a
    unit; raises ValueError when train would be empty."""
    n = len(groups)
    units: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        units.setdefault(g if grouped and g else f"\0{i}", []).append(i)  # \0: never a manifest group
    names = sorted(units)
    order = [names[k] for k in np.random.default_rng([seed, 0x7A1]).permutation(len(names))]
    target = max(1, round(fraction * n))
    val: list[int] = []
    for name in order:
        if abs(len(val) + len(units[name]) - target) < abs(len(val) - target):
            val += units[name]
    if not val:
        val = list(units[min(order, key=lambda name: len(units[name]))])
    if len(val) >= n:
        raise ValueError(f"Carving a validation fraction of {fraction} from {n} images in {len(units)} group(s) "
                         "leaves no training image: lower data.val_fraction or add images (or groups).")
    chosen = set(val)
    return [i for i in range(n) if i not in chosen], sorted(val)


def load_splits(data: C.DataConfig, seed: int) -> Splits:
    """Train, validation and test examples of data.root (complete rows, manifest order) and the class order.
    Validation: the manifest's `data.val_split` rows when there are any, else a carved `data.val_fraction` of the
    train split (seeded by `seed`; whole groups with `data.grouped`), else none. Carving uses the whole train split,
    then `data.max_train` caps train and `data.max_test` caps test and validation."""
    rows, classes = read_manifest(data.root)
    if data.grouped:
        check_groups(rows, data.root)
    train, test = _examples(rows, classes, data.train_split), _examples(rows, classes, data.test_split)
    for split, found in ((data.train_split, train), (data.test_split, test)):
        if not found:
            raise _no_images(data.root, split)
    val = _examples(rows, classes, data.val_split) if data.val_split else []
    source = "manifest" if val else ""
    if not val and data.val_fraction > 0:
        keep, held = carve([e.group for e in train], data.val_fraction, seed, grouped=data.grouped)
        train, val, source = [train[i] for i in keep], [train[i] for i in held], "carved"
    cap = lambda xs, n: xs[:n] if n else xs  # noqa: E731
    return Splits(cap(train, data.max_train), cap(val, data.max_test), cap(test, data.max_test), classes, source)


def examples_of(data: C.DataConfig, split: str, seed: int, max_n: int = 0) -> tuple[list[Example], tuple[str, ...]]:
    """The examples of one split as training saw them: the train or validation split as `load_splits` makes them
    (a carved validation set is excluded from train), any other split straight from the manifest."""
    if split in (data.train_split, data.val_split):
        splits = load_splits(dataclasses.replace(data, max_train=0, max_test=0), seed)
        examples = splits.train if split == data.train_split else splits.val
        if not examples:
            raise ValueError(f"No validation images in {data.root}: the manifest has no {split!r} rows and "
                             "data.val_fraction is 0. Evaluate --split test, or set data.val_fraction.")
        return (examples[:max_n] if max_n else examples), splits.classes
    return load_split(data.root, split, max_n, grouped=data.grouped)


def class_weights(examples: Sequence[Example], n_classes: int) -> Tensor:
    """Inverse class frequency, n / (n_classes * n_c); classes absent from the split get weight 1."""
    counts = np.bincount([e.label for e in examples], minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, len(examples) / (n_classes * np.maximum(counts, 1)), 1.0)
    return torch.tensor(weights, dtype=torch.float32)


def shard_indices(n: int, rank: int, world: int, *, epoch: int = 0, seed: int = 0, shuffle: bool = True,
                  pad: bool = True) -> list[int]:
    """This worker's example indices: a per-epoch permutation, padded by wrapping to a multiple of `world` (so every
    worker runs the same number of steps), then every world-th item from `rank`. pad=False for evaluation."""
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    if pad and n % world:
        order = np.concatenate([order, order[: world - n % world]])
    return order[rank::world].tolist()


def batched(items: Sequence[Any], batch_size: int) -> list[list[Any]]:
    return [list(items[s:s + batch_size]) for s in range(0, len(items), batch_size)]


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """`tensor` on `device`; to a GPU through pinned host memory with a non-blocking copy (the copy overlaps what
    the GPU is still doing; the first kernel that reads it waits for it on the same stream)."""
    if device.type != "cuda" or tensor.is_cuda:  # (torch.device("cuda") != a tensor's "cuda:0": ask the tensor)
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@dataclass(slots=True)
class Batch:
    image_ids: list[str]
    labels: Tensor  # (B,) int64
    low: Tensor  # (B, C, h, w) float32 in [0, 1], zero-padded to the largest view in the batch
    low_hw: Tensor  # (B, 2) each image's own view size
    level0_hw: Tensor  # (B, 2)
    low_scale: Tensor  # (B, 2) float64 level-0 pixels per view pixel: the view level's exact stored factor
    tissue: Tensor | None = None  # (B, h, w) float32 foreground on the view (0 in padding), when data.min_tissue > 0
    min_tissue: float = 0.0  # data.min_tissue: the foreground share a cell's patch needs
    patch_scale: Tensor | None = None  # (B,) float64 level-0 px per patch px (data.patch_um_per_px); None: 1
    patch_level: tuple[int, ...] = ()  # the level each image's patches are read at (pipeline.resolution)

    def to(self, device: torch.device) -> Batch:
        """The tensors the nets see (labels, view) on `device`; sizes, factors and the mask stay on the CPU."""
        if device.type == "cpu":
            return self
        return dataclasses.replace(self, labels=to_device(self.labels, device), low=to_device(self.low, device))

    @property
    def masking(self) -> dict[str, Any]:
        """The keyword arguments that mask attention cells by foreground (ATSModel.plan's tissue, min_tissue)."""
        return {"tissue": self.tissue, "min_tissue": self.min_tissue}

    @property
    def frame_scale(self) -> Tensor:
        """(B, 2) float64 patch-frame pixels per view pixel: what ATSModel takes as low_scale, so its boxes are
        patch-frame boxes (ats_model.geometry.scale_boxes makes them level-0); low_scale without patch_scale."""
        return self.low_scale if self.patch_scale is None else self.low_scale / self.patch_scale[:, None]

    def level0_boxes(self, boxes: Tensor) -> Tensor:
        """Boxes (b, n, 4) of this batch's first b images, planned in their patch frames (frame_scale) -> level-0
        boxes (ats_model.geometry.scale_boxes); the boxes themselves without patch frames."""
        if self.patch_scale is None:
            return boxes
        return scale_boxes(boxes, self.patch_scale[:boxes.shape[0]].to(boxes.device))


class LowResViews:
    """The pyramid level nearest `scale` of each image (or nearest the `view` resolution), read whole once and kept
    (it is small by construction); with `min_tissue` > 0 also each image's stored foreground mask on that level
    (PatchReader.mask); with a `patch` resolution each image's patch frame (pipeline.resolution): level-0 pixels per
    patch pixel and the level its patches are read at."""

    def __init__(self, reader: PatchReader, scale: float, min_tissue: float = 0.0, *,
                 view: resolution.Requested | None = None, patch: resolution.Requested | None = None) -> None:
        self.reader, self.scale, self.min_tissue = reader, scale, min_tissue
        self.view_resolution, self.patch_resolution = view, patch
        self.cache: dict[str, _View] = {}

    def view(self, image_id: str) -> tuple[Tensor, tuple[float, float]]:
        """(view (C, h, w) float32 in [0, 1], its level's exact factor (fy, fx) over level 0)."""
        entry = self._entry(image_id)
        return entry.pixels, entry.factor

    def _entry(self, image_id: str) -> _View:
        if image_id not in self.cache:
            info = self.reader.info(image_id)
            level = (resolution.view_level(info.downsamples, info.mpp, self.view_resolution, image_id)
                     if self.view_resolution else self.reader.level_for_scale(image_id, self.scale))
            factor = tuple(float(f) for f in info.downsamples[level])
            mask = (torch.from_numpy(self.reader.mask(image_id, level).astype(np.float32))  # (h, w)
                    if self.min_tissue > 0 else None)
            scale, patch_level = 1.0, 0
            if self.patch_resolution:
                scale = resolution.patch_scale(info.mpp, self.patch_resolution, image_id)
                patch_level = resolution.patch_level(info.downsamples, scale)
            self.cache[image_id] = _View(to_unit_float(self.reader.low_res(image_id, level)), factor,  # type: ignore
                                         mask, scale, patch_level)
        return self.cache[image_id]

    def batch(self, examples: Sequence[Example]) -> Batch:
        entries = [self._entry(e.image_id) for e in examples]
        views = [v.pixels for v in entries]
        c = views[0].shape[0]
        hw = torch.tensor([v.shape[1:] for v in views], dtype=torch.long)  # (B, 2)
        low = torch.zeros(len(views), c, int(hw[:, 0].max()), int(hw[:, 1].max()))  # (B, C, h, w)
        tissue = torch.zeros(low.shape[0], *low.shape[2:]) if self.min_tissue > 0 else None  # (B, h, w)
        for i, v in enumerate(views):
            low[i, :, : v.shape[1], : v.shape[2]] = v
            if tissue is not None:
                tissue[i, : v.shape[1], : v.shape[2]] = entries[i].mask
        patch_scale = (torch.tensor([v.patch_scale for v in entries], dtype=torch.float64)  # (B,)
                       if self.patch_resolution else None)
        return Batch([e.image_id for e in examples], torch.tensor([e.label for e in examples]), low, hw,
                     torch.tensor([[e.height, e.width] for e in examples], dtype=torch.long),
                     torch.tensor([v.factor for v in entries], dtype=torch.float64), tissue, self.min_tissue,
                     patch_scale, tuple(v.patch_level for v in entries) if self.patch_resolution else ())


@dataclass(frozen=True, slots=True)
class _View:
    """One image's cached view and frame (LowResViews)."""

    pixels: Tensor  # (C, h, w) float32 in [0, 1]
    factor: tuple[float, float]  # the view level's exact factor over level 0
    mask: Tensor | None  # (h, w) float32 foreground on the view, when min_tissue > 0
    patch_scale: float  # level-0 px per patch px (1: level 0)
    patch_level: int  # the level patches are read at


class InMemoryImages:
    """Level 0 of every image read whole into RAM once; `read` has PatchReader.read's contract (level 0 only).

    For datasets that fit in memory (`data.in_memory`), and the RAM-fed reference of the I/O benchmarks."""

    def __init__(self, reader: PatchReader, image_ids: Sequence[str]) -> None:
        self.images = {i: reader.low_res(i, 0) for i in dict.fromkeys(image_ids)}  # (C, H, W) raw dtype each

    def read(self, image_id: str, boxes: np.ndarray, level: int = 0,
             out_hw: tuple[int, int] | None = None) -> np.ndarray:
        if level != 0:
            raise ValueError(f"data.in_memory holds level 0 only, and {image_id!r} is read at level {level} "
                             "(data.patch_um_per_px or the nested model): set data.in_memory=false.")
        image = self.images[image_id]
        out = np.stack([crop(image, b) for b in np.asarray(boxes).reshape(-1, 4)])  # (n, C, h, w)
        return out if out_hw is None else resample(out, out_hw)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.images.values())


# --- patch fetchers ------------------------------------------------------------------------------------------------

@dataclass(slots=True)
class IOCounters:
    """Per-worker totals: seconds blocked waiting for pixels, patches and (nested model) region crops received."""

    wait_s: float = 0.0
    patches: int = 0
    regions: int = 0


@dataclass(slots=True)
class Pending:
    positions: list[int]  # rows of the step's batch this request answers
    ref: Any = None  # a Ray ObjectRef or a Future, or None when `patches` is already here
    patches: np.ndarray | None = None  # (b, N, C, h, w) raw dtype
    regions: bool = False  # region crops (counted as IOCounters.regions), not patches


@dataclass
class DirectFetcher:
    """Reads patches in this process with a PatchReader or InMemoryImages (no servers).

    With `overlap` (the default) each image's boxes are read in one background thread, in batch order, and
    `wait_any` hands back each image as soon as it is read, so the feature net runs on the first images while the
    later ones are still being read and decoded (the same pattern as the servers' micro-batches). Without it, one
    blocking read of the whole batch."""

    reader: PatchReader | InMemoryImages
    io: IOCounters = field(default_factory=IOCounters)
    overlap: bool = True
    _pool: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)

    def submit(self, image_ids: Sequence[str], boxes: np.ndarray, levels: Sequence[int] | None = None, *,
               out_hw: tuple[int, int] | None = None, regions: bool = False) -> list[Pending]:
        """Read each image's boxes (level-0) at level 0, or at `levels` (one per image), resampled to `out_hw` when
        given (PatchReader.read); `regions`: region crops, counted as such."""
        lv = list(levels) if levels is not None else [0] * len(image_ids)
        args = [(i, b, l, out_hw) for i, b, l in zip(image_ids, boxes, lv)]
        if self.overlap and len(image_ids) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="patch-read")
            return [Pending([pos], ref=self._pool.submit(self.reader.read, *a), regions=regions)
                    for pos, a in enumerate(args)]
        start = time.perf_counter()
        patches = np.stack([self.reader.read(*a) for a in args])  # (B, N, C, h, w)
        self.io.wait_s += time.perf_counter() - start
        return [Pending(list(range(len(image_ids))), patches=patches, regions=regions)]

    def downsamples(self, image_id: str) -> tuple[tuple[float, float], ...]:
        """The exact factor of each pyramid level of an image."""
        if isinstance(self.reader, InMemoryImages):
            raise ValueError("data.in_memory holds level 0 only, and the nested model reads regions at a coarser "
                             "level: set data.in_memory=false.")
        return self.reader.info(image_id).downsamples

    def wait_any(self, pending: list[Pending]) -> tuple[list[Pending], list[Pending]]:
        first = pending[0]  # one FIFO thread: the first submitted is the first finished
        if first.patches is None:
            start = time.perf_counter()
            first.patches = first.ref.result()[None]  # (N, C, h, w) -> (1, N, C, h, w)
            self.io.wait_s += time.perf_counter() - start
        return pending[:1], pending[1:]

    def result(self, p: Pending) -> np.ndarray:
        _count(self.io, p, p.patches)
        return p.patches

    def close(self) -> None:
        """Stop the read thread (waits for a read in progress)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


@dataclass
class ServerFetcher:
    """Reads through the Ray patch servers with `pipeline.serving.PatchClient`'s non-blocking API: one `read_many`
    call per server holding any of the step's images, answers taken in arrival order (ray.wait); times the waits."""

    client: Any  # pipeline.serving.PatchClient (imported lazily: only pipeline/serving.py imports ray)
    io: IOCounters = field(default_factory=IOCounters)
    _downsamples: dict[str, tuple[tuple[float, float], ...]] = field(default_factory=dict, init=False, repr=False)

    def submit(self, image_ids: Sequence[str], boxes: np.ndarray, levels: Sequence[int] | None = None, *,
               out_hw: tuple[int, int] | None = None, regions: bool = False) -> list[Pending]:
        """As DirectFetcher.submit, through the servers."""
        lv = list(levels) if levels is not None else [0] * len(image_ids)
        requests = [(image_id, b, l, out_hw) for image_id, b, l in zip(image_ids, boxes, lv)]
        return [Pending(list(p.indices), ref=p, regions=regions) for p in self.client.submit(requests)]

    def downsamples(self, image_id: str) -> tuple[tuple[float, float], ...]:
        """The exact factor of each pyramid level of an image (asked of its server once, then kept)."""
        if image_id not in self._downsamples:
            self._downsamples[image_id] = tuple(self.client.info(image_id).downsamples)
        return self._downsamples[image_id]

    def wait_any(self, pending: list[Pending]) -> tuple[list[Pending], list[Pending]]:
        start = time.perf_counter()
        ready, _ = self.client.wait_any([p.ref for p in pending])
        self.io.wait_s += time.perf_counter() - start
        done = {id(r) for r in ready}
        return [p for p in pending if id(p.ref) in done], [p for p in pending if id(p.ref) not in done]

    def result(self, p: Pending) -> np.ndarray:
        start = time.perf_counter()
        answers = self.client.result(p.ref)  # [(request index, patches (N, C, h, w))] in p's order, checked
        self.io.wait_s += time.perf_counter() - start
        patches = np.stack([a[1] for a in answers])  # (b, N, C, h, w)
        _count(self.io, p, patches)
        return patches

    def close(self) -> None:
        pass


def _count(io: IOCounters, p: Pending, pixels: np.ndarray) -> None:
    if p.regions:
        io.regions += int(np.prod(pixels.shape[:2]))
    else:
        io.patches += int(np.prod(pixels.shape[:2]))


def read_all(fetcher: DirectFetcher | ServerFetcher, image_ids: Sequence[str], boxes: Tensor,
             levels: Sequence[int] | None = None, *, out_hw: tuple[int, int] | None = None,
             regions: bool = False) -> Tensor:
    """Blocking read: level-0 boxes (B, N, 4) -> float32 pixels (B, N, C, h, w) in [0, 1], in request order; at
    level 0, or at `levels` (one per image), resampled to `out_hw` when given."""
    pending = fetcher.submit(list(image_ids), boxes.detach().cpu().numpy(), levels, out_hw=out_hw, regions=regions)
    out: list[np.ndarray | None] = [None] * len(image_ids)
    while pending:
        ready, pending = fetcher.wait_any(pending)
        for p in ready:
            for pos, patches in zip(p.positions, fetcher.result(p)):
                out[pos] = patches
    return to_unit_float(np.stack(out))  # type: ignore[arg-type]


def patch_reader_fn(fetcher: DirectFetcher | ServerFetcher, batch: Batch | None = None,
                    patch_hw: tuple[int, int] | None = None) -> PatchReadFn:
    """The core's reader contract `read(image_ids, boxes (B, N, 4)) -> (B, N, C, h, w)` over a fetcher; with a
    `batch` that has patch frames, each image's level-0 boxes are read at its patch level and resampled to
    `patch_hw` (patch_read_args)."""
    extra = patch_read_args(batch, patch_hw) if batch is not None else {}
    return lambda image_ids, boxes: read_all(fetcher, image_ids, boxes, **extra)


def patch_read_args(batch: Batch, patch_hw: tuple[int, int] | None) -> dict[str, Any]:
    """The fetcher arguments that read a batch's patches in its frames: each image's patch level and the patch size
    (data.patch_um_per_px), or none (level 0, as the boxes say)."""
    if batch.patch_scale is None:
        return {}
    return {"levels": list(batch.patch_level), "out_hw": tuple(int(v) for v in patch_hw)}  # type: ignore[union-attr]


def region_reader_fn(fetcher: DirectFetcher | ServerFetcher) -> RegionReadFn:
    """The nested model's contract `read(image_ids (U,), boxes (U, 4) level-0, downsample) -> (U, C, h/d, w/d)`
    over a fetcher: each region is one request read at the level whose exact factor is `downsample` (crops past the
    image's edge are the image's fill value), counted as regions, not patches."""

    def read(image_ids: Sequence[str], boxes: Tensor, downsample: int) -> Tensor:
        levels = [level_for_factor(fetcher.downsamples(i), downsample, i) for i in image_ids]
        crops = read_all(fetcher, image_ids, boxes[:, None], levels, regions=True)  # (U, 1, C, h, w)
        return crops[:, 0]  # (U, C, h, w)

    return read
