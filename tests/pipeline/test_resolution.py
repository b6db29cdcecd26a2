"""Physical resolution (pipeline/resolution.py): which level serves a requested um/px, the typed errors when none
can, and the patch resampling that makes a read exact when no level matches."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import ResolutionError
from pipeline.resolution import Requested, patch_level, patch_scale, require_mpp, resample, view_level

FACTORS = [(1.0, 1.0), (2.0, 2.0), (4.0, 4.0), (8.0, 8.0)]


def um(value: float) -> Requested:
    return Requested(value, "data.patch_um_per_px")


@pytest.mark.parametrize(("scale", "level"), [(1.0, 0), (1.9, 0), (1.98, 1), (2.0, 1), (3.0, 1), (4.05, 2),
                                               (7.0, 2), (8.0, 3), (100.0, 3)])
def test_patch_level_is_the_coarsest_level_not_coarser_than_asked(scale, level):
    """Never coarser than asked (beyond 2%): reading a finer level and shrinking keeps the detail; 1.98 (a 0.2525
    um/px scanner asked for 0.5) still takes factor 2, within the tolerance."""
    assert patch_level(FACTORS, scale) == level


def test_patch_scale_and_its_errors_name_the_fix():
    assert patch_scale(0.25, um(0.5), "s") == 2.0 and patch_scale(0.5, um(0.5), "s") == 1.0
    assert patch_scale(0.2525, um(0.25), "s") == 1.0  # 1% finer than the scanner: level 0 as it is, not an error
    with pytest.raises(ResolutionError, match=r"enlarged 2.00x.*Set data.patch_um_per_px=0.5 or more"):
        patch_scale(0.5, um(0.25), "s")  # asking a 20x slide for 40x pixels
    metres = Requested(5e6, "data.patch_m_per_px")  # 5 m asked of a 10 m raster: the message speaks metres
    with pytest.raises(ResolutionError, match=r"has 10 m/px .* coarser than data.patch_m_per_px=5: .* "
                                              r"Set data.patch_m_per_px=10 or more"):
        patch_scale(10e6, metres, "scene")
    for missing in (None, float("nan"), 0.0):
        with pytest.raises(ResolutionError, match="--mpp") as info:
            require_mpp(missing, "slide-7", "data.patch_um_per_px")
        assert "slide-7" in str(info.value) and "mpp column" in str(info.value)
    assert isinstance(info.value, ValueError)  # typed, and still a ValueError for callers that catch that


def test_view_level_is_the_nearest_level_and_level_0_when_finer():
    view = lambda v: Requested(v, "data.view_um_per_px")  # noqa: E731
    assert view_level(FACTORS, 0.25, view(1.0), "s") == 2  # 4x coarser
    assert view_level(FACTORS, 0.5, view(1.0), "s") == 1
    assert view_level(FACTORS, 0.5, view(0.1), "s") == 0  # finer than the scan: the finest there is
    assert view_level(FACTORS, 0.25, view(1.4), "s") == 2  # 5.6x: nearer 4 than 8 in log space
    with pytest.raises(ResolutionError, match="data.view_m_per_px needs one"):
        view_level(FACTORS, None, Requested(1e7, "data.view_m_per_px"), "s")


def test_resample_keeps_constants_and_linear_ramps_and_the_dtype():
    """Constants stay constant in any dtype. Linear ramps stay linear away from the edges: exactly for whole shrink
    factors (the sampled triangle is symmetric about each output centre), within 0.01 input px for 2.5x (the
    sampled triangle's centroid sits off the centre by at most that)."""
    rng = np.random.default_rng(0)
    for dtype in (np.uint8, np.uint16, np.float32):
        const = np.full((2, 3, 83, 83), 77, dtype)
        out = resample(const, (50, 50))
        assert out.dtype == dtype and out.shape == (2, 3, 50, 50) and (out == 77).all()
    ramp = np.broadcast_to(np.arange(100, dtype=np.float64)[None, None, None, :], (1, 1, 4, 100))
    for ratio, atol in ((2, 1e-9), (4, 1e-9), (2.5, 0.011)):
        n = int(100 / ratio)
        out = resample(ramp, (4, n))  # shrink along x only
        centres = (np.arange(n) + 0.5) * ratio - 0.5  # output centres in input pixel-index coordinates
        np.testing.assert_allclose(out[0, 0, 0, 2:-2], centres[2:-2], atol=atol)
    same = rng.integers(0, 255, (1, 3, 50, 50), dtype=np.uint8)
    assert resample(same, (50, 50)) is same


def test_resample_enlarging_interpolates_between_neighbours():
    x = np.array([[[[0.0, 10.0]]]])  # (1, 1, 1, 2)
    out = resample(x, (1, 4))[0, 0, 0]  # output centres at 0.25, 0.75, 1.25, 1.75 in pixel units
    np.testing.assert_allclose(out, [0.0, 2.5, 7.5, 10.0])
