"""The in-memory patch reader: zero padding outside the image, [0, 1] floats, mean-downsampled views."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ats_model.contracts import to_unit_float
from ats_model.memory_reader import InMemoryReader, crop


@settings(max_examples=150, deadline=None)
@given(st.integers(-30, 40), st.integers(-30, 40), st.integers(1, 30), st.integers(1, 30))
def test_crop_equals_slicing_of_a_zero_padded_image(y0, x0, h, w):
    image = np.arange(2 * 20 * 25, dtype=np.uint16).reshape(2, 20, 25) + 1
    padded = np.pad(image, ((0, 0), (40, 80), (40, 80)))
    expected = padded[:, y0 + 40 : y0 + 40 + h, x0 + 40 : x0 + 40 + w]
    np.testing.assert_array_equal(crop(image, (y0, x0, h, w)), expected)


def test_read_returns_unit_floats_in_request_order():
    images = [np.full((1, 10, 10), 255, np.uint8), np.zeros((1, 10, 10), np.uint8)]
    reader = InMemoryReader(images)
    boxes = torch.tensor([[[0, 0, 4, 4], [8, 8, 4, 4]], [[0, 0, 4, 4], [-10, -10, 4, 4]]])
    out = reader([0, 1], boxes)
    assert out.shape == (2, 2, 1, 4, 4) and out.dtype == torch.float32
    assert float(out[0, 0].min()) == 1.0 and float(out[0, 1].sum()) == 4.0  # 2x2 inside, the rest padded
    assert float(out[1].abs().sum()) == 0.0 and reader.patches_read == 4


def test_low_res_is_the_mean_of_the_pixels_present():
    image = np.zeros((1, 5, 5), np.uint8)
    image[0, 4, 4] = 255
    low = InMemoryReader([image]).low_res([0], 2)  # 3x3; the corner block holds one pixel
    assert low.shape == (1, 1, 3, 3) and float(low[0, 0, 2, 2]) == pytest.approx(1.0)


def test_unit_float_and_bad_shapes():
    assert to_unit_float(np.array([65535], np.uint16))[0] == 1.0
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        InMemoryReader([np.zeros((4, 4))])
