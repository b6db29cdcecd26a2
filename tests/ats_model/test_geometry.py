"""Property tests of the one coordinate conversion: attention cells -> level-0 boxes."""
from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ats_model.geometry import GridSpec, cell_fractions, cells_to_boxes, grid_boxes, round_half_up


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
    scale = torch.tensor(level0_hw, dtype=torch.float64) / torch.tensor(low_hw, dtype=torch.float64)
    boxes = cells_to_boxes(idx, low_hw, scale[None], patch)
    assert boxes.dtype == torch.long and boxes.shape == (1, idx.shape[1], 4)
    assert (boxes[..., 2] == patch[0]).all() and (boxes[..., 3] == patch[1]).all()
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
    boxes = cells_to_boxes(idx, (s_space, s_space), torch.tensor([[s, s]]), (patch, patch), spec)
    expected = [math.floor(r / 2 * s + i * step + step / 2 - patch / 2 + 0.5) for i in range(s_space)]
    assert boxes[0, :, 0].tolist() == expected
    assert boxes[0, :, 1].tolist() == [expected[0]] * s_space


def test_same_padding_stride_one_centres_on_low_res_pixels():
    # 1500 px at level 3 (factor exactly 8, 188 px): cell 0 centre at 0.5 * 8 = 4, patch 50 starts at -21.
    boxes = cells_to_boxes(torch.tensor([[0, 188 * 188 - 1]]), (188, 188), 8.0, (50, 50))
    assert boxes[0, 0].tolist() == [-21, -21, 50, 50]  # edges: the box keeps its size, the reader pads
    assert boxes[0, 1].tolist() == [1475, 1475, 50, 50]  # centre 187.5 * 8 = 1500, minus 25


def test_the_last_cell_of_an_odd_image_is_centred_on_its_own_block():
    # 1500 / 188 = 7.98 would put the last cell's centre at 1495.9, 4 px off the block [1496, 1504) it averages.
    idx = torch.tensor([[187 * 188 + 187]])
    exact = cells_to_boxes(idx, (188, 188), torch.tensor([[8.0, 8.0]]), (8, 8))
    assert exact[0, 0].tolist() == [1496, 1496, 8, 8]  # exactly the level-0 block the level-3 pixel covers
    drifting = cells_to_boxes(idx, (188, 188), torch.tensor([[1500 / 188, 1500 / 188]]), (8, 8))
    assert drifting[0, 0, :2].tolist() == [1492, 1492]  # the old factor's box: shifted by 4 px


def test_round_half_up_differs_from_bankers_rounding():
    assert round_half_up(torch.tensor([0.5, 1.5, 2.5, -0.5])).tolist() == [1, 2, 3, 0]


def test_per_image_scales_in_one_batch():
    idx = torch.tensor([[5], [5]])
    boxes = cells_to_boxes(idx, (10, 10), torch.tensor([[10, 10], [20, 40]]), (10, 10))
    assert boxes[0, 0].tolist() == [0, 50, 10, 10]
    assert boxes[1, 0].tolist() == [5, 215, 10, 10]


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300), st.integers(1, 64), st.integers(1, 64))
def test_grid_boxes_cover_the_image(h, w, patch, stride_raw):
    stride = max(1, min(stride_raw, patch))
    boxes = grid_boxes((h, w), (patch, patch), (stride, stride))
    assert boxes[0].tolist() == [0, 0, patch, patch]
    assert int((boxes[:, 0] + patch).max()) >= h and int((boxes[:, 1] + patch).max()) >= w
    assert int(boxes[:, 0].max()) < max(h, 1) and int(boxes[:, 1].max()) < max(w, 1)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.floats(1.0, 9.0), st.integers(1, 40), st.integers(0, 2**31 - 1),
       st.sampled_from([GridSpec(), GridSpec((2.0, 1.5), (1.0, 0.75))]))
def test_cell_fractions_are_the_mean_of_the_map_over_each_cells_patch(h, w, scale, patch, seed, spec):
    """Against a per-pixel count: every view pixel whose whole extent lies in the patch's rounded box counts, and the
    box's pixels outside the map count as background."""
    g = torch.Generator().manual_seed(seed)
    fraction = (torch.rand(2, h, w, generator=g) > 0.5).double()  # (2, h, w)
    grid_hw = (max(1, int((h - spec.offset_yx[0]) // spec.stride_yx[0]) + 1),
               max(1, int((w - spec.offset_yx[1]) // spec.stride_yx[1]) + 1))
    got = cell_fractions(fraction, grid_hw, scale, (patch, patch), spec)  # (2, Ha, Wa)
    cells = torch.arange(grid_hw[0] * grid_hw[1])[None]
    boxes = cells_to_boxes(cells, grid_hw, scale, (patch, patch), spec)[0].tolist()  # (K, 4) level-0
    for k, (y0, x0, bh, bw) in enumerate(boxes):
        ys = range(math.floor(y0 / scale + 0.5), max(math.floor((y0 + bh) / scale + 0.5), math.floor(y0 / scale + 0.5) + 1))
        xs = range(math.floor(x0 / scale + 0.5), max(math.floor((x0 + bw) / scale + 0.5), math.floor(x0 / scale + 0.5) + 1))
        for b in range(2):
            inside = sum(float(fraction[b, y, x]) for y in ys for x in xs if 0 <= y < h and 0 <= x < w)
            expected = inside / (len(ys) * len(xs))
            assert math.isclose(float(got[b].flatten()[k]), expected, abs_tol=1e-12), (k, b)


def test_cell_fractions_of_a_full_and_an_empty_map():
    full, empty = torch.ones(1, 8, 8), torch.zeros(1, 8, 8)
    inner = cell_fractions(full, (8, 8), 4.0, (4, 4))  # patches of one view pixel each: all inside
    assert torch.equal(inner, torch.ones(1, 8, 8, dtype=torch.float64))
    assert cell_fractions(empty, (8, 8), 4.0, (4, 4)).abs().max() == 0
    edge = cell_fractions(full, (8, 8), 4.0, (16, 16))  # 4x4-pixel patches: corner cells reach outside the map
    assert edge[0, 0, 0] < 1 and edge[0, 4, 4] == 1
