"""Training data over an ingested ROOT: the manifest as examples, per-worker shards and batches, the low-res views,
and the patch fetchers (a direct PatchReader, or the Ray patch servers).

    examples, classes = load_split(root, "train")         complete manifest rows of a split, labels as indices
    shard_indices(n, rank, world, epoch, seed)            an equal-length slice per worker (DDP needs equal steps)
    views = LowResViews(reader, scale)                     whole low-res levels, read once per worker and cached
    fetcher = DirectFetcher(reader) | ServerFetcher(PatchClient(servers))
    fetcher = DirectFetcher(InMemoryImages(reader, image_ids))   data.in_memory: level 0 read whole into RAM first
    pending = fetcher.submit(image_ids, boxes)            one request per server for only these boxes
    ready, pending = fetcher.wait_any(pending)             whichever server answered first (ray.wait)
    read = patch_reader_fn(fetcher)                        the model's PatchReadFn (blocking) over a fetcher

Pixels reach the nets as float32 in [0, 1] (ats_model.contracts.to_unit_float). Boxes are level-0 (y0, x0, h, w)
everywhere; each batch carries its views' exact level factors (`low_scale`) for the cell-to-box mapping.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from ats_model.contracts import PatchReadFn, to_unit_float
from ats_model.memory_reader import crop
from pipeline.manifest import read_manifest
from pipeline.reader import PatchReader


@dataclass(frozen=True, slots=True)
class Example:
    image_id: str
    label: int
    height: int
    width: int
    channels: int


def load_split(root: str, split: str, max_n: int = 0) -> tuple[list[Example], tuple[str, ...]]:
    """Complete images of `split` in manifest order (at most `max_n` when > 0), and the class order."""
    rows, classes = read_manifest(root)
    index = {c: i for i, c in enumerate(classes)}
    examples = [Example(r.image_id, index[r.label], int(r.height), int(r.width), int(r.channels))
                for r in rows if r.split == split and r.status == "complete"]
    if not examples:
        raise ValueError(f"No complete images in split {split!r} of {root}: check data.train_split/data.test_split "
                         f"or run jobs/ingest.py --out {root}.")
    return (examples[:max_n] if max_n else examples), classes


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


@dataclass(slots=True)
class Batch:
    image_ids: list[str]
    labels: Tensor  # (B,) int64
    low: Tensor  # (B, C, h, w) float32 in [0, 1], zero-padded to the largest view in the batch
    low_hw: Tensor  # (B, 2) each image's own view size
    level0_hw: Tensor  # (B, 2)
    low_scale: Tensor  # (B, 2) float64 level-0 pixels per view pixel: the view level's exact stored factor

    def to(self, device: torch.device) -> Batch:
        """The tensors the nets see (labels, view) on `device`; sizes and factors stay on the CPU."""
        if device.type == "cpu":
            return self
        return Batch(self.image_ids, self.labels.to(device), self.low.to(device), self.low_hw, self.level0_hw,
                     self.low_scale)


class LowResViews:
    """The pyramid level nearest `scale` of each image, read whole once and kept (it is small by construction)."""

    def __init__(self, reader: PatchReader, scale: float) -> None:
        self.reader, self.scale = reader, scale
        self.cache: dict[str, tuple[Tensor, tuple[float, float]]] = {}

    def view(self, image_id: str) -> tuple[Tensor, tuple[float, float]]:
        """(view (C, h, w) float32 in [0, 1], its level's exact factor (fy, fx) over level 0)."""
        if image_id not in self.cache:
            level = self.reader.level_for_scale(image_id, self.scale)
            factor = tuple(float(f) for f in self.reader.info(image_id).downsamples[level])
            self.cache[image_id] = (to_unit_float(self.reader.low_res(image_id, level)), factor)  # type: ignore
        return self.cache[image_id]

    def batch(self, examples: Sequence[Example]) -> Batch:
        views, factors = zip(*(self.view(e.image_id) for e in examples))
        c = views[0].shape[0]
        hw = torch.tensor([v.shape[1:] for v in views], dtype=torch.long)  # (B, 2)
        low = torch.zeros(len(views), c, int(hw[:, 0].max()), int(hw[:, 1].max()))  # (B, C, h, w)
        for i, v in enumerate(views):
            low[i, :, : v.shape[1], : v.shape[2]] = v
        return Batch([e.image_id for e in examples], torch.tensor([e.label for e in examples]), low, hw,
                     torch.tensor([[e.height, e.width] for e in examples], dtype=torch.long),
                     torch.tensor(factors, dtype=torch.float64))


class InMemoryImages:
    """Level 0 of every image read whole into RAM once; `read` has PatchReader.read's contract (level 0 only).

    For datasets that fit in memory (`data.in_memory`), and the RAM-fed reference of the I/O benchmarks."""

    def __init__(self, reader: PatchReader, image_ids: Sequence[str]) -> None:
        self.images = {i: reader.low_res(i, 0) for i in dict.fromkeys(image_ids)}  # (C, H, W) raw dtype each

    def read(self, image_id: str, boxes: np.ndarray, level: int = 0) -> np.ndarray:
        if level != 0:
            raise ValueError(f"InMemoryImages holds level 0 only. Got level={level}.")
        image = self.images[image_id]
        return np.stack([crop(image, b) for b in np.asarray(boxes).reshape(-1, 4)])  # (n, C, h, w)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.images.values())


# --- patch fetchers ------------------------------------------------------------------------------------------------

@dataclass(slots=True)
class IOCounters:
    """Per-worker totals: seconds blocked waiting for pixels, patches received, bytes read by this process."""

    wait_s: float = 0.0
    patches: int = 0


@dataclass(slots=True)
class Pending:
    positions: list[int]  # rows of the step's batch this request answers
    ref: Any = None  # a Ray ObjectRef or a Future, or None when `patches` is already here
    patches: np.ndarray | None = None  # (b, N, C, h, w) raw dtype


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

    def submit(self, image_ids: Sequence[str], boxes: np.ndarray) -> list[Pending]:
        if self.overlap and len(image_ids) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="patch-read")
            return [Pending([pos], ref=self._pool.submit(self.reader.read, i, b))
                    for pos, (i, b) in enumerate(zip(image_ids, boxes))]
        start = time.perf_counter()
        patches = np.stack([self.reader.read(i, b) for i, b in zip(image_ids, boxes)])  # (B, N, C, h, w)
        self.io.wait_s += time.perf_counter() - start
        return [Pending(list(range(len(image_ids))), patches=patches)]

    def wait_any(self, pending: list[Pending]) -> tuple[list[Pending], list[Pending]]:
        first = pending[0]  # one FIFO thread: the first submitted is the first finished
        if first.patches is None:
            start = time.perf_counter()
            first.patches = first.ref.result()[None]  # (N, C, h, w) -> (1, N, C, h, w)
            self.io.wait_s += time.perf_counter() - start
        return pending[:1], pending[1:]

    def result(self, p: Pending) -> np.ndarray:
        self.io.patches += int(np.prod(p.patches.shape[:2]))
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

    def submit(self, image_ids: Sequence[str], boxes: np.ndarray) -> list[Pending]:
        requests = [(image_id, b) for image_id, b in zip(image_ids, boxes)]
        return [Pending(list(p.indices), ref=p) for p in self.client.submit(requests)]

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
        self.io.patches += int(np.prod(patches.shape[:2]))
        return patches

    def close(self) -> None:
        pass


def read_all(fetcher: DirectFetcher | ServerFetcher, image_ids: Sequence[str], boxes: Tensor) -> Tensor:
    """Blocking read: level-0 boxes (B, N, 4) -> float32 pixels (B, N, C, h, w) in [0, 1], in request order."""
    pending = fetcher.submit(list(image_ids), boxes.detach().cpu().numpy())
    out: list[np.ndarray | None] = [None] * len(image_ids)
    while pending:
        ready, pending = fetcher.wait_any(pending)
        for p in ready:
            for pos, patches in zip(p.positions, fetcher.result(p)):
                out[pos] = patches
    return to_unit_float(np.stack(out))  # type: ignore[arg-type]


def patch_reader_fn(fetcher: DirectFetcher | ServerFetcher) -> PatchReadFn:
    """The core's reader contract `read(image_ids, boxes (B, N, 4)) -> (B, N, C, h, w)` over a fetcher."""
    return lambda image_ids, boxes: read_all(fetcher, image_ids, boxes)
