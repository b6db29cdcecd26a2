"""Megapixel MNIST (Katharopoulos & Fleuret 2019, section 4.2) built from REAL MNIST digits.

One image: a black `size` x `size` uint8 canvas, 1 channel, with `n_digits` non-overlapping 28x28 MNIST digits, of
which a strict majority (3 of 5) share the label class and the rest come from other classes (possibly the same other
class twice), plus `n_noise` digit-sized patches of random lines that never overlap a digit (they may overlap each
other). The label is the majority digit, as a string. Training images use MNIST-train digits, test images
MNIST-test digits.

Image `index` of a split depends only on (seed, split, index) through its own numpy Generator, so any image can be
made alone, in any order, in any worker; `generate` streams them one at a time. `lazy_image` gives the same
pixels as a lazy dask array painted block by block, for canvases too large to hold (a 32000 px side is 1 GB).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    import dask.array as da

DIGIT_PX = 28
SPLIT_CODES = {"train": 0, "test": 1}
MAX_PLACEMENT_TRIES = 10_000


@dataclass(frozen=True, slots=True)
class MegapixelMNISTConfig:
    """The recipe's knobs; defaults are the paper's."""

    size: int = 1500
    n_digits: int = 5
    n_noise: int = 50
    seed: int = 0
    n_classes: int = 10  # labels and digits drawn from classes 0..n_classes-1 only (10: the paper)

    def __post_init__(self) -> None:
        if not 2 <= self.n_classes <= 10:
            raise ValueError(f"Expected n_classes in [2, 10]. Got {self.n_classes}.")
        if self.size < DIGIT_PX:
            raise ValueError(f"Expected size >= {DIGIT_PX} (one digit). Got {self.size}.")
        if self.n_digits < 1:
            raise ValueError(f"Expected n_digits >= 1. Got {self.n_digits}.")
        if self.n_noise < 0:
            raise ValueError(f"Expected n_noise >= 0. Got {self.n_noise}.")
        # Each digit forbids a (2*28-1)^2 square of top-left corners; keeping that under 3/4 of all corners leaves
        # every later digit and noise patch at least a quarter of the canvas, so rejection sampling always succeeds.
        corners = (self.size - DIGIT_PX + 1) ** 2
        most = int(0.75 * corners // (2 * DIGIT_PX - 1) ** 2)
        if self.n_digits > most:
            raise ValueError(f"Expected at most {most} digits on a {self.size}px canvas. Got {self.n_digits}: raise "
                             "--size or lower --n-digits.")

    @property
    def n_majority(self) -> int:
        """Digits of the label class: the smallest count that strictly outnumbers all others together."""
        return self.n_digits // 2 + 1


class Box(NamedTuple):
    """A placed 28x28 object in level-0 pixels, (y0, x0, h, w); `digit` is -1 for noise."""

    y0: int
    x0: int
    h: int
    w: int
    digit: int


class MegapixelSample(NamedTuple):
    """One generated image; unpacks as (image_id, image, label, boxes): the digits first, then the noise."""

    image_id: str
    image: np.ndarray  # (1, size, size) uint8
    label: str
    boxes: tuple[Box, ...]

    @property
    def digits(self) -> tuple[Box, ...]:
        return tuple(b for b in self.boxes if b.digit >= 0)

    @property
    def noise(self) -> tuple[Box, ...]:
        return tuple(b for b in self.boxes if b.digit < 0)


class DigitBank:
    """MNIST digits of one split, indexed by class, for drawing instances quickly."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        if images.ndim != 3 or images.shape[1:] != (DIGIT_PX, DIGIT_PX) or images.shape[0] != labels.shape[0]:
            raise ValueError(f"Expected images (n, 28, 28) and labels (n,). Got {images.shape} and {labels.shape}.")
        self.images = images
        self.by_class = [np.flatnonzero(labels == c) for c in range(10)]
        missing = [c for c, idx in enumerate(self.by_class) if idx.size == 0]
        if missing:
            raise ValueError(f"Expected every class 0-9 among the digits. Missing {missing}.")

    def draw(self, rng: np.random.Generator, digit: int) -> np.ndarray:
        idx = self.by_class[digit]
        return self.images[idx[rng.integers(idx.size)]]


def image_id(split: str, index: int) -> str:
    return f"mmnist-{split}-{index:05d}"


def rng_for(seed: int, split: str, index: int) -> np.random.Generator:
    """The Generator of one image: independent of every other image's."""
    if split not in SPLIT_CODES:
        raise ValueError(f"Expected split in {sorted(SPLIT_CODES)}. Got {split!r}.")
    return np.random.default_rng([seed, SPLIT_CODES[split], index])


def noise_pattern(rng: np.random.Generator, size: int = DIGIT_PX) -> np.ndarray:
    """A digit-sized patch of 2-4 random bright strokes (2 px wide) between random points: digit-like clutter."""
    patch = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(2, 5))):
        (y0, x0), (y1, x1) = rng.uniform(2, size - 3, size=(2, 2))
        steps = int(max(abs(y1 - y0), abs(x1 - x0)) * 2) + 2
        ys = np.rint(np.linspace(y0, y1, steps)).astype(int)
        xs = np.rint(np.linspace(x0, x1, steps)).astype(int)
        value = int(rng.integers(160, 256))
        for dy, dx in ((0, 0), (1, 0), (0, 1), (1, 1)):
            np.maximum.at(patch, (np.clip(ys + dy, 0, size - 1), np.clip(xs + dx, 0, size - 1)), value)
    return patch


def _place(rng: np.random.Generator, size: int, taken: list[tuple[int, int]], n: int,
           allow_overlap_among_new: bool) -> list[tuple[int, int]]:
    """Top-left corners of `n` 28x28 boxes inside the canvas that do not overlap `taken` (nor each other unless
    allowed). Rejection sampling; the config's limits keep it fast."""
    placed: list[tuple[int, int]] = []
    blockers = np.array(taken, dtype=np.int64).reshape(-1, 2)
    for _ in range(n):
        for _ in range(MAX_PLACEMENT_TRIES):
            y, x = (int(v) for v in rng.integers(0, size - DIGIT_PX + 1, size=2))
            others = blockers if allow_overlap_among_new else np.vstack([blockers, np.array(placed).reshape(-1, 2)])
            if not np.any((np.abs(others[:, 0] - y) < DIGIT_PX) & (np.abs(others[:, 1] - x) < DIGIT_PX)):
                placed.append((y, x))
                break
        else:
            raise ValueError(f"Could not place {n} non-overlapping {DIGIT_PX}px objects on a {size}px canvas. Raise "
                             "--size or lower --n-digits/--n-noise.")
    return placed


def label_for(config: MegapixelMNISTConfig, split: str, index: int) -> str:
    """The label of image `index` without making it: the first draw of the image's own Generator."""
    return str(int(rng_for(config.seed, split, index).integers(config.n_classes)))


def _objects(bank: DigitBank, split: str, index: int, config: MegapixelMNISTConfig
             ) -> tuple[int, list[tuple[Box, np.ndarray]]]:
    """The label and the placed objects (box, 28x28 pixels) of image `index`, digits first, without a canvas."""
    rng = rng_for(config.seed, split, index)
    label = int(rng.integers(config.n_classes))  # first draw, as in label_for
    others = [int(c) for c in rng.integers(config.n_classes - 1, size=config.n_digits - config.n_majority)]
    digits = [label] * config.n_majority + [c + (c >= label) for c in others]  # others skip the label class
    digits = [digits[i] for i in rng.permutation(len(digits))]
    digit_corners = _place(rng, config.size, [], len(digits), allow_overlap_among_new=False)
    objects = [(Box(y, x, DIGIT_PX, DIGIT_PX, digit), bank.draw(rng, digit))
               for digit, (y, x) in zip(digits, digit_corners)]
    noise_corners = _place(rng, config.size, digit_corners, config.n_noise, allow_overlap_among_new=True)
    objects += [(Box(y, x, DIGIT_PX, DIGIT_PX, -1), noise_pattern(rng)) for y, x in noise_corners]
    return label, objects


def _paint(canvas: np.ndarray, objects: list[tuple[Box, np.ndarray]], y0: int, x0: int) -> np.ndarray:
    """Paint the objects that intersect `canvas` (h, w), whose top-left is level-0 pixel (y0, x0): digits are
    pasted, noise is max-blended (noise never overlaps a digit, so the order does not matter)."""
    h, w = canvas.shape
    for box, pixels in objects:
        ty0, ty1 = max(box.y0, y0), min(box.y0 + box.h, y0 + h)
        tx0, tx1 = max(box.x0, x0), min(box.x0 + box.w, x0 + w)
        if ty0 >= ty1 or tx0 >= tx1:
            continue
        window = canvas[ty0 - y0:ty1 - y0, tx0 - x0:tx1 - x0]
        piece = pixels[ty0 - box.y0:ty1 - box.y0, tx0 - box.x0:tx1 - box.x0]
        if box.digit >= 0:
            window[...] = piece
        else:
            np.maximum(window, piece, out=window)
    return canvas


def make_image(bank: DigitBank, split: str, index: int, config: MegapixelMNISTConfig) -> MegapixelSample:
    """Image `index` of `split`: the same pixels every time for the same (config, split, index)."""
    label, objects = _objects(bank, split, index, config)
    canvas = _paint(np.zeros((config.size, config.size), np.uint8), objects, 0, 0)
    return MegapixelSample(image_id(split, index), canvas[None], str(label), tuple(b for b, _ in objects))


class LazySample(NamedTuple):
    """`make_image`'s sample with the pixels as a lazy dask array (1, size, size) uint8: nothing is held whole."""

    image_id: str
    image: da.Array
    label: str
    boxes: tuple[Box, ...]


def lazy_image(bank: DigitBank, split: str, index: int, config: MegapixelMNISTConfig, *, chunk: int = 256
               ) -> LazySample:
    """The same pixels as `make_image`, as a dask array of (1, chunk, chunk) blocks, each painting only the objects
    that intersect it: a 32000 px (1 GB) canvas costs a few blocks of memory at a time (pass it to write_pyramid)."""
    import dask.array as da

    if chunk < 1:
        raise ValueError(f"Expected chunk >= 1 pixels. Got {chunk}.")
    label, objects = _objects(bank, split, index, config)
    n, size = len(objects), config.size
    corners = np.array([(b.y0, b.x0) for b, _ in objects], dtype=np.int64).reshape(n, 2)  # (n, 2) level-0

    def block(block_info: dict | None = None) -> np.ndarray:
        (_, _), (y0, y1), (x0, x1) = block_info[None]["array-location"]
        near = np.flatnonzero((corners[:, 0] < y1) & (corners[:, 0] + DIGIT_PX > y0)
                              & (corners[:, 1] < x1) & (corners[:, 1] + DIGIT_PX > x0))
        canvas = _paint(np.zeros((y1 - y0, x1 - x0), np.uint8), [objects[i] for i in near], y0, x0)
        return canvas[None]  # (1, h, w)

    sides = (chunk,) * (size // chunk) + ((size % chunk,) if size % chunk else ())
    image = da.map_blocks(block, chunks=((1,), sides, sides), dtype=np.uint8, meta=np.empty((0, 0, 0), np.uint8))
    return LazySample(image_id(split, index), image, str(label), tuple(b for b, _ in objects))


def generate(split: str, n: int, config: MegapixelMNISTConfig = MegapixelMNISTConfig(), *,
             bank: DigitBank | None = None) -> Iterator[MegapixelSample]:
    """Stream images 0..n-1 of `split` one at a time; MNIST-train digits for "train", MNIST-test for "test"."""
    bank = bank or load_bank(split)
    for index in range(n):
        yield make_image(bank, split, index, config)


def load_bank(split: str) -> DigitBank:
    """The digit bank of a split from the cached real MNIST (fetched once)."""
    from pipeline.datasets import mnist

    return DigitBank(*mnist("train" if split == "train" else "test"))
