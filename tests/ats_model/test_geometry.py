"""Property tests of the one coordinate conversion: attention cells -> level-0 boxes."""
from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ats_model.geometry import GridSpec, cells_to_boxes, grid_boxes, level_to_level0, round_half_up


@st.composite
def layouts(draw):
    h_low = draw(st.integers(1, 40))
    w_low = draw(st.integers(1, 40))
    scale_y = draw(st.floats(1.0, 20.0))
    scale_x = draw(st.floats(1.0, 20.0))
    h0, w0 = max(1, math.ceil(h_low * scale_y)), max(1, math.ceil(w_low * scale_x))
    patch = (draw(st.integers(1, 64)), draw(st.integers(1, 64)))
    n = draw(st.integers(1, 8))
    idx = draw(st.lists(st.integers(0, h_low * w_low - 1), min_size=n, max_size=n))
    return (h_low, w_low), (h0, w0), patch, torch.tensor([idx])


@settings(max_examples=200, deadline=None)
@given(layouts())
def test_boxes_have_the_requested_size_and_centres_map_back_to_their_cell(layout):
    low_hw, level0_hw, patch, idx = layout
    boxes = cells_to_boxes(idx, low_hw, torch.tensor([level0_hw]), torch.tensor([low_hw]), patch)
    assert boxes.dtype == torch.long and boxes.shape == (1, idx.shape[1], 4)
    assert (boxes[..., 2] == patch[0]).all() and (boxes[..., 3] == patch[1]).all()
    scale = torch.tensor(level0_hw, dtype=torch.float64) / torch.tensor(low_hw, dtype=torch.float64)
    centre = boxes[..., :2].double() + torch.tensor(patch, dtype=torch.float64) / 2  # (1, n, 2) level 0
    cell = torch.floor(centre / scale).long()  # back to low-res pixels
    rows, cols = idx // low_hw[1], idx % low_hw[1]
    # Rounding the start to an integer moves the centre by at most half a level-0 pixel.
    assert ((cell[..., 0] - rows).abs() <= (0.5 / scale[0]).ceil()).all()
    assert ((cell[..., 1] - cols).abs() <= (0.5 / scale[1]).ceil()).all()
    exact = (centre / scale - torch.stack([rows, cols], -1) - 0.5).abs()  # distance from the cell centre
    assert (exact <= 0.5 / scale + 1e-9).all()


def test_matches_the_design_formula():
    """start = round(o*s + i*step + step/2 - P/2), step = (H_low - r) * s / S, round half up."""
    h_low, h0, patch, r, s_space = 30, 1500, 50, 4, 13
    spec = GridSpec.from_receptive_field((h_low, h_low), r, (s_space, s_space))
    s = h0 / h_low
    step = (h_low - r) * s / s_space
    idx = torch.arange(s_space).unsqueeze(0) * s_space  # cells (i, 0)
    boxes = cells_to_boxes(idx, (s_space, s_space), torch.tensor([[h0, h0]]), torch.tensor([[h_low, h_low]]),
                           (patch, patch), spec)
    expected = [math.floor(r / 2 * s + i * step + step / 2 - patch / 2 + 0.5) for i in range(s_space)]
    assert boxes[0, :, 0].tolist() == expected
    assert boxes[0, :, 1].tolist() == [expected[0]] * s_space


def test_same_padding_stride_one_centres_on_low_res_pixels():
    # 180 -> 1500 (the paper's Megapixel MNIST): cell 0 centre at 1500/180/2 ~ 4.17, patch 50 starts at -21.
    boxes = cells_to_boxes(torch.tensor([[0, 180 * 180 - 1]]), (180, 180), torch.tensor([[1500, 1500]]),
                           torch.tensor([[180, 180]]), (50, 50))
    assert boxes[0, 0].tolist() == [-21, -21, 50, 50]  # edges: the box keeps its size, the reader pads
    assert boxes[0, 1].tolist() == [1471, 1471, 50, 50]  # centre 179.5 * 1500/180 = 1495.83, minus 25


def test_round_half_up_differs_from_bankers_rounding():
    assert round_half_up(torch.tensor([0.5, 1.5, 2.5, -0.5])).tolist() == [1, 2, 3, 0]


def test_per_image_scales_in_one_batch():
    idx = torch.tensor([[5], [5]])
    boxes = cells_to_boxes(idx, (10, 10), torch.tensor([[100, 100], [200, 400]]), torch.tensor([[10, 10], [10, 10]]),
                           (10, 10))
    assert boxes[0, 0].tolist() == [0, 50, 10, 10]
    assert boxes[1, 0].tolist() == [5, 215, 10, 10]


def test_level_to_level0_uses_the_true_factor():
    out = level_to_level0(torch.tensor([[3, 4]]), (2.5, 3.0))
    assert out.tolist() == [[7.5, 12.0]]


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300), st.integers(1, 64), st.integers(1, 64))
def test_grid_boxes_cover_the_image(h, w, patch, stride_raw):
    stride = max(1, min(stride_raw, patch))
    boxes = grid_boxes((h, w), (patch, patch), (stride, stride))
    assert boxes[0].tolist() == [0, 0, patch, patch]
    assert int((boxes[:, 0] + patch).max()) >= h and int((boxes[:, 1] + patch).max()) >= w
    assert int(boxes[:, 0].max()) < max(h, 1) and int(boxes[:, 1].max()) < max(w, 1)
