"""The patch fetchers of training/data.py: overlapped and blocking direct reads give the same pixels in batch order,
count what they deliver, and pass read errors through; InMemoryImages reads exactly what the store holds."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from training.data import DirectFetcher, InMemoryImages, load_split, read_all


def _boxes(n_images: int, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yx = rng.integers(-16, 180, (n_images, n, 2))
    return np.concatenate([yx, np.full((n_images, n, 2), 32)], axis=2)  # (B, N, 4), some off the edge


def test_overlapped_reads_equal_blocking_reads_in_batch_order(tiny_data):
    from pipeline.reader import PatchReader

    examples, _ = load_split(tiny_data, "train", 5)
    ids = [e.image_id for e in examples]
    boxes = torch.as_tensor(_boxes(len(ids), 6))
    overlapped, blocking = DirectFetcher(PatchReader(tiny_data)), DirectFetcher(PatchReader(tiny_data), overlap=False)
    a, b = read_all(overlapped, ids, boxes), read_all(blocking, ids, boxes)
    assert a.shape == (5, 6, 1, 32, 32) and torch.equal(a, b)
    assert overlapped.io.patches == blocking.io.patches == 30
    ram = DirectFetcher(InMemoryImages(PatchReader(tiny_data), ids))
    assert torch.equal(read_all(ram, ids, boxes), a)


def test_an_overlapped_read_error_reaches_the_caller(tiny_data):
    from pipeline.errors import PipelineError
    from pipeline.reader import PatchReader

    fetcher = DirectFetcher(PatchReader(tiny_data))
    with pytest.raises((PipelineError, FileNotFoundError, KeyError)):
        read_all(fetcher, ["mmnist-train-00000", "no-such-image"], torch.as_tensor(_boxes(2, 2)))


def test_pooled_band_stats_equal_the_statistics_of_all_pixels_together() -> None:
    from training.data import Example, pooled_band_stats

    rng = np.random.default_rng(0)
    images = [rng.random((2, h, w)) * s + o for h, w, s, o in [(10, 30, 0.2, 0.1), (40, 25, 0.5, 0.4), (7, 9, 1, 0)]]
    examples = [Example(f"i{k}", 0, x.shape[1], x.shape[2], 2, "", tuple(x.reshape(2, -1).mean(1)),
                        tuple(x.reshape(2, -1).std(1))) for k, x in enumerate(images)]
    every = np.concatenate([x.reshape(2, -1) for x in images], axis=1)  # (2, all pixels)
    mean, std = pooled_band_stats(examples)
    np.testing.assert_allclose(mean, every.mean(1), rtol=1e-12)
    np.testing.assert_allclose(std, every.std(1), rtol=1e-12)
    with pytest.raises(ValueError, match="Re-run jobs/ingest.py .* --out /data/r"):
        pooled_band_stats([*examples, Example("old", 0, 5, 5, 2)], "/data/r")
    with pytest.raises(ValueError, match="same band count"):
        pooled_band_stats([examples[0], Example("rgb", 0, 5, 5, 3, "", (0.1,) * 3, (0.2,) * 3)])


def test_pooled_band_stats_refuse_a_constant_band_and_an_empty_split() -> None:
    from training.data import Example, pooled_band_stats

    flat = [Example("a", 0, 4, 4, 2, "", (0.2, 0.5), (0.1, 0.0)), Example("b", 0, 4, 4, 2, "", (0.3, 0.5), (0.1, 0.0))]
    with pytest.raises(ValueError, match=r"Bands \[1\] are constant .* model.band_scaled=false"):
        pooled_band_stats(flat)
    with pytest.raises(ValueError, match="training split is empty"):
        pooled_band_stats([])


def test_band_scaling_auto_is_on_for_wider_than_8_bit_data_with_usable_statistics():
    """model.band_scaled unset (None): on for uint16 with statistics; off for uint8, for the cnn, and when the
    statistics are missing or a band is constant (each with its reason); an explicit value is kept."""
    from training import config as C
    from training.data import Example, band_scaling

    def ex(dtype: str, mean=(0.03, 0.05), std=(0.01, 0.02)) -> Example:
        return Example("i", 0, 100, 100, 2, band_mean=mean, band_std=std, dtype=dtype)

    auto, cnn = C.ModelConfig(), C.ModelConfig(name="cnn")
    assert auto.band_scaled is None
    assert band_scaling(auto, [ex("uint16"), ex("uint16")]) == (True, "auto: the training images are uint16")
    assert band_scaling(auto, [ex("uint8")])[0] is False and "uint8" in band_scaling(auto, [ex("uint8")])[1]
    assert band_scaling(cnn, [ex("float32")])[0] is False
    off, why = band_scaling(auto, [ex("uint16", (), ())])
    assert off is False and "no" in why and "jobs/ingest.py" in why
    off, why = band_scaling(auto, [ex("uint16", (0.1, 0.2), (0.0, 0.1))])
    assert off is False and "constant" in why
    assert band_scaling(C.ModelConfig(band_scaled=True), [ex("uint8")]) == (True, "set")
    with pytest.raises(C.ConfigError, match="true, false or null"):
        C.ModelConfig(band_scaled="auto")
