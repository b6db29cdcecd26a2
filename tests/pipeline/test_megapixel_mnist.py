"""Megapixel MNIST: the paper's recipe with real digits, reproducible per image, streamed."""
from __future__ import annotations

import types
from collections import Counter

import numpy as np
import pytest

from pipeline import megapixel_mnist as mm


@pytest.fixture(scope="module")
def toy_bank() -> mm.DigitBank:
    """One distinct 28x28 glyph per class (class c fills row c): every pasted digit is identifiable exactly."""
    images = np.zeros((10, 28, 28), np.uint8)
    for c in range(10):
        images[c, 2 * c + 2, 4:24] = 200 + c
        images[c, 4:24, 14] = 200 + c
    return mm.DigitBank(images, np.arange(10, dtype=np.uint8))


def _boxes_overlap(a: mm.Box, b: mm.Box) -> bool:
    return a.y0 < b.y0 + b.h and b.y0 < a.y0 + a.h and a.x0 < b.x0 + b.w and b.x0 < a.x0 + a.w


@pytest.mark.parametrize("n_digits", [1, 2, 3, 5, 7])
def test_label_is_a_strict_majority_of_real_pasted_digits(toy_bank: mm.DigitBank, n_digits: int) -> None:
    config = mm.MegapixelMNISTConfig(size=300, n_digits=n_digits, n_noise=10, seed=1)
    for index in range(20):
        s = mm.make_image(toy_bank, "train", index, config)
        counts = Counter(b.digit for b in s.digits)
        assert len(s.digits) == n_digits and counts[int(s.label)] == n_digits // 2 + 1
        assert all(c < counts[int(s.label)] for d, c in counts.items() if d != int(s.label))
        assert s.label == mm.label_for(config, "train", index)
        for b in s.digits:  # the pixels in each digit box are exactly that class's glyph
            assert np.array_equal(s.image[0, b.y0:b.y0 + 28, b.x0:b.x0 + 28], toy_bank.images[b.digit])


def test_layout_digits_never_overlap_anything_and_noise_sits_in_its_boxes(toy_bank: mm.DigitBank) -> None:
    config = mm.MegapixelMNISTConfig(size=400, n_digits=5, n_noise=50, seed=2)
    for index in range(10):
        s = mm.make_image(toy_bank, "test", index, config)
        assert s.image.shape == (1, 400, 400) and s.image.dtype == np.uint8 and len(s.noise) == 50
        for i, a in enumerate(s.digits):
            assert all(not _boxes_overlap(a, b) for b in s.digits[i + 1:] + s.noise)
        for b in s.digits + s.noise:
            assert 0 <= b.y0 <= 400 - 28 and 0 <= b.x0 <= 400 - 28 and (b.h, b.w) == (28, 28)
        covered = np.zeros((400, 400), bool)
        for b in s.digits + s.noise:
            covered[b.y0:b.y0 + 28, b.x0:b.x0 + 28] = True
        assert not s.image[0][~covered].any()  # background is empty
        assert all(s.image[0, b.y0:b.y0 + 28, b.x0:b.x0 + 28].any() for b in s.noise)  # every noise patch drawn


def test_each_image_depends_only_on_seed_split_and_index(toy_bank: mm.DigitBank) -> None:
    config = mm.MegapixelMNISTConfig(size=200, n_noise=20, seed=7)
    streamed = list(mm.generate("train", 5, mm.MegapixelMNISTConfig(size=200, n_noise=20, seed=7), bank=toy_bank))
    alone = mm.make_image(toy_bank, "train", 3, config)
    assert np.array_equal(streamed[3].image, alone.image) and streamed[3].digits == alone.digits
    assert [s.image_id for s in streamed] == [f"mmnist-train-{i:05d}" for i in range(5)]
    other_seed = mm.make_image(toy_bank, "train", 3, mm.MegapixelMNISTConfig(size=200, n_noise=20, seed=8))
    other_split = mm.make_image(toy_bank, "test", 3, config)
    assert not np.array_equal(other_seed.image, alone.image) and not np.array_equal(other_split.image, alone.image)


def test_generate_streams(toy_bank: mm.DigitBank) -> None:
    stream = mm.generate("train", 10**6, mm.MegapixelMNISTConfig(size=200, n_noise=2), bank=toy_bank)
    assert isinstance(stream, types.GeneratorType)
    image_id, image, label, boxes = next(stream)  # unpacks as a tuple
    assert image_id == "mmnist-train-00000" and image.shape == (1, 200, 200) and label.isdigit()
    assert [b.digit >= 0 for b in boxes] == [True] * 5 + [False] * 2


@pytest.mark.network
def test_paper_defaults_with_real_digits_from_the_right_split(mnist_train, mnist_test) -> None:
    banks = {"train": mm.DigitBank(*mnist_train), "test": mm.DigitBank(*mnist_test)}
    for split, (images, labels) in (("train", mnist_train), ("test", mnist_test)):
        s = next(mm.generate(split, 1, bank=banks[split]))
        assert s.image.shape == (1, 1500, 1500) and len(s.digits) == 5 and len(s.noise) == 50
        for b in s.digits:
            crop = s.image[0, b.y0:b.y0 + 28, b.x0:b.x0 + 28]
            same_class = images[labels == b.digit]
            assert (same_class == crop).all(axis=(1, 2)).any(), f"{split} digit not found among MNIST-{split}"
    assert mm.MegapixelMNISTConfig().n_majority == 3


def test_label_distribution_is_roughly_uniform(toy_bank: mm.DigitBank) -> None:
    config = mm.MegapixelMNISTConfig(size=200, n_noise=0)
    labels = Counter(mm.label_for(config, "train", i) for i in range(2000))
    assert set(labels) == {str(d) for d in range(10)} and min(labels.values()) > 150


@pytest.mark.parametrize("n_classes", [2, 3])
def test_n_classes_draws_labels_and_every_digit_from_the_first_classes(toy_bank: mm.DigitBank, n_classes: int) -> None:
    config = mm.MegapixelMNISTConfig(size=300, n_digits=3, n_noise=5, seed=1, n_classes=n_classes)
    labels = Counter()
    for index in range(60):
        s = mm.make_image(toy_bank, "train", index, config)
        labels[s.label] += 1
        assert all(0 <= b.digit < n_classes for b in s.digits) and s.label == mm.label_for(config, "train", index)
        assert Counter(b.digit for b in s.digits)[int(s.label)] == 2
    assert set(labels) == {str(d) for d in range(n_classes)}


def test_n_classes_10_is_the_default_recipe(toy_bank: mm.DigitBank) -> None:
    a = mm.MegapixelMNISTConfig(size=200, n_digits=3, n_noise=5)
    b = mm.MegapixelMNISTConfig(size=200, n_digits=3, n_noise=5, n_classes=10)
    for index in range(5):
        assert np.array_equal(mm.make_image(toy_bank, "test", index, a).image,
                              mm.make_image(toy_bank, "test", index, b).image)


@pytest.mark.parametrize("kwargs, match", [
    ({"size": 20}, "size >= 28"),
    ({"n_classes": 1}, r"n_classes in \[2, 10\]"),
    ({"n_classes": 11}, r"n_classes in \[2, 10\]"),
    ({"n_digits": 0}, "n_digits >= 1"),
    ({"n_noise": -1}, "n_noise >= 0"),
    ({"size": 100, "n_digits": 2}, "at most 1 digits.*--size"),
    ({"size": 199, "n_digits": 8}, "--n-digits"),
])
def test_config_validation_names_the_fix(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        mm.MegapixelMNISTConfig(**kwargs)


def test_bank_needs_every_class() -> None:
    with pytest.raises(ValueError, match="Missing"):
        mm.DigitBank(np.zeros((3, 28, 28), np.uint8), np.array([0, 1, 2], np.uint8))


@pytest.mark.parametrize("size, chunk", [(300, 64), (256, 256), (210, 48)])
def test_lazy_image_matches_make_image_block_by_block(toy_bank: mm.DigitBank, size: int, chunk: int) -> None:
    config = mm.MegapixelMNISTConfig(size=size, n_digits=3, n_noise=30, seed=4)
    for index in range(3):
        eager = mm.make_image(toy_bank, "train", index, config)
        lazy = mm.lazy_image(toy_bank, "train", index, config, chunk=chunk)
        assert (lazy.image_id, lazy.label, lazy.boxes) == (eager.image_id, eager.label, eager.boxes)
        assert lazy.image.shape == (1, size, size) and lazy.image.dtype == np.uint8
        assert lazy.image.chunks[1][0] == min(chunk, size) and lazy.image.numblocks[1] == -(-size // chunk)
        assert np.array_equal(lazy.image.compute(), eager.image)  # objects cut by block edges included


def test_lazy_image_rejects_a_bad_chunk(toy_bank: mm.DigitBank) -> None:
    with pytest.raises(ValueError, match="chunk >= 1"):
        mm.lazy_image(toy_bank, "train", 0, mm.MegapixelMNISTConfig(size=100, n_digits=1, n_noise=1), chunk=0)
