"""Source openers: pixels equal an independent decoder, arrays stay lazy, bad input raises typed errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from pipeline.errors import CorruptImageError, ImageNotFoundError, UnsupportedImageError
from pipeline.sources import composite, image_stem, open_source
from tests.pipeline.files import open_fds, rgb, truncate, write_png, write_tiled_tiff


def test_png_rgb_gray_and_16bit(tmp_path: Path) -> None:
    pixels = rgb(40, 50)
    src = open_source(write_png(tmp_path / "a.png", pixels))
    assert (src.reader, src.stem, src.array.shape, src.dtype) == ("pil", "a", (3, 40, 50), np.uint8)
    assert np.array_equal(src.array.compute(), pixels.transpose(2, 0, 1))
    gray = pixels[..., 0]
    src = open_source(write_png(tmp_path / "g.png", gray))
    assert src.array.shape == (1, 40, 50) and np.array_equal(src.array.compute()[0], gray)
    deep = np.random.default_rng(1).integers(0, 65536, (30, 20), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    src = open_source(tmp_path / "d.png")
    assert src.dtype == np.uint16 and np.array_equal(src.array.compute()[0], deep)


@pytest.mark.parametrize("fill", [0, 255])
def test_rgba_is_composited_onto_the_fill(tmp_path: Path, fill: int) -> None:
    rgba = np.random.default_rng(2).integers(0, 256, (16, 24, 4), dtype=np.uint8)
    rgba[0, :, 3] = 255  # opaque row: kept exactly
    rgba[1, :, 3] = 0  # transparent row: the fill
    src = open_source(write_png(tmp_path / "rgba.png", rgba), fill=fill)
    out = src.array.compute()  # (3, H, W)
    assert out.shape == (3, 16, 24) and src.fill == fill
    assert np.array_equal(out[:, 0], rgba[0, :, :3].T)
    assert np.all(out[:, 1] == fill)
    a = rgba[..., 3:].astype(float) / 255
    expected = np.floor(rgba[..., :3] * a + fill * (1 - a) + 0.5).transpose(2, 0, 1)
    assert np.abs(out.astype(float) - expected).max() <= 1


def test_composite_is_exact_for_opaque_and_transparent() -> None:
    rgba = np.array([[[10, 20, 30, 255], [10, 20, 30, 0]]], np.uint8)
    assert composite(rgba, 200).tolist() == [[[10, 20, 30], [200, 200, 200]]]


def test_jpeg_equals_pil_decoder(tmp_path: Path) -> None:
    Image.fromarray(rgb(64, 48)).save(tmp_path / "p.jpg", quality=80)
    src = open_source(tmp_path / "p.jpg")
    assert np.array_equal(src.array.compute(), np.asarray(Image.open(tmp_path / "p.jpg")).transpose(2, 0, 1))


def test_tiled_tiff_is_lazy_and_exact(tmp_path: Path) -> None:
    pixels = rgb(300, 200, seed=3)
    src = open_source(write_tiled_tiff(tmp_path / "t.tif", pixels, tile=64, pyramid=True))
    assert src.reader == "tifffile" and src.array.shape == (3, 300, 200)
    assert src.array.chunksize == (3, 64, 64)  # native tiles: one dask chunk per TIFF tile, nothing read yet
    assert np.array_equal(src.array.compute(), pixels.transpose(2, 0, 1))
    assert np.array_equal(src.array[:, 100:170, 30:99].compute(), pixels[100:170, 30:99].transpose(2, 0, 1))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux /proc/self/fd")
def test_tiff_handles_are_closed(tmp_path: Path) -> None:
    pixels = rgb(200, 150, seed=8)
    path = write_tiled_tiff(tmp_path / "fd.tif", pixels, tile=64, pyramid=True)
    src = open_source(path)  # reads metadata and probes the corner tiles
    assert open_fds(path) == 0
    with src:
        assert np.array_equal(src.array.compute(), pixels.transpose(2, 0, 1))
        assert open_fds(path) == 1  # one handle, shared by dask's reading threads
    assert open_fds(path) == 0
    assert np.array_equal(src.array[:, :64, :64].compute(), pixels[:64, :64].transpose(2, 0, 1))  # reopens
    src.close()
    assert open_fds(path) == 0
    cut = truncate(write_tiled_tiff(tmp_path / "cut.tif", rgb(256, 256)), 0.6)
    with pytest.raises(CorruptImageError):
        open_source(cut)  # fails in the corner probe
    assert open_fds(cut) == 0


def test_tiff_gray_planar_and_mpp(tmp_path: Path) -> None:
    gray = np.random.default_rng(4).integers(0, 4096, (130, 70), dtype=np.uint16)
    src = open_source(write_tiled_tiff(tmp_path / "g.tiff", gray, resolution=(20000, 20000), resolutionunit="CENTIMETER"))
    assert src.array.shape == (1, 130, 70) and src.dtype == np.uint16
    assert np.array_equal(src.array.compute()[0], gray)
    assert src.mpp == pytest.approx(0.5)
    planar = rgb(50, 40, seed=5).transpose(2, 0, 1).copy()  # (3, H, W) stored as separate planes
    tifffile.imwrite(tmp_path / "p.tif", planar, photometric="rgb", planarconfig="separate")
    src = open_source(tmp_path / "p.tif")
    assert np.array_equal(src.array.compute(), planar)
    tifffile.imwrite(tmp_path / "dpi.tif", gray, resolution=(72, 72), resolutionunit="INCH")
    assert open_source(tmp_path / "dpi.tif").mpp is None  # a 72-dpi default says nothing about pixel size


def test_tiff_stack_is_refused(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "z.tif", np.zeros((4, 32, 32), np.uint8), photometric="minisblack", metadata={"axes": "ZYX"})
    with pytest.raises(UnsupportedImageError, match="one plane"):
        open_source(tmp_path / "z.tif")


def test_npy_layouts(tmp_path: Path) -> None:
    hwc = rgb(30, 20, seed=6)
    for name, arr, expected in [("hw", hwc[..., 0], hwc[None, ..., 0]), ("hwc", hwc, hwc.transpose(2, 0, 1)),
                                ("chw", hwc.transpose(2, 0, 1), hwc.transpose(2, 0, 1))]:
        np.save(tmp_path / f"{name}.npy", arr)
        src = open_source(tmp_path / f"{name}.npy")
        assert src.reader == "npy" and np.array_equal(src.array.compute(), expected), name
    np.save(tmp_path / "f.npy", np.linspace(0, 1, 600, dtype=np.float32).reshape(20, 30))
    assert open_source(tmp_path / "f.npy").dtype == np.float32


@pytest.mark.parametrize("make, error, match", [
    (lambda d: d / "missing.png", ImageNotFoundError, "does not exist"),
    (lambda d: d, UnsupportedImageError, "folder"),
    (lambda d: _write(d / "notes.txt", b"hello"), UnsupportedImageError, "unknown suffix"),
    (lambda d: _write(d / "fake.png", b"this is not a png"), UnsupportedImageError, "not an image"),
    (lambda d: truncate(write_png(d / "cut.png", rgb(200, 200))), CorruptImageError, "truncated or damaged"),
    (lambda d: _truncated_jpeg(d / "cut.jpg"), CorruptImageError, "truncated or damaged"),
    (lambda d: truncate(write_tiled_tiff(d / "cut.tif", rgb(256, 256)), 0.6), CorruptImageError, "truncated"),
    (lambda d: _write(d / "bad.tif", b"II*\x00garbage"), CorruptImageError, "truncated or damaged"),
    (lambda d: truncate(_npy(d / "cut.npy")), CorruptImageError, "numpy.save"),
    (lambda d: _write(d / "x.svs", b"not a slide at all"), (UnsupportedImageError, CorruptImageError), "Convert|damaged"),
])
def test_bad_input_raises_typed_errors_naming_the_fix(tmp_path: Path, make, error, match) -> None:
    with pytest.raises(error, match=match):
        open_source(make(tmp_path))


def test_image_stem_drops_one_suffix_or_ome_tiff() -> None:
    assert [image_stem(p) for p in ["d/a.png", "b.OME.TIFF", "c.ome.tif", "x.y.tif", "noext"]] == [
        "a", "b", "c", "x.y", "noext"]


def test_missing_file_is_a_file_not_found_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        open_source(tmp_path / "nope.tif")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncated_jpeg(path: Path) -> Path:
    Image.fromarray(rgb(256, 256)).save(path, quality=95)
    return truncate(path, 0.4)


def _npy(path: Path) -> Path:
    np.save(path, rgb(100, 100))
    return path


# --- real files (the `samples` fixture, tests/conftest.py) --------------------------------------------------------------------------------------------------

@pytest.mark.network
def test_real_aperio_svs_through_openslide(samples) -> None:
    src = open_source(samples["cmu_small_region.svs"])
    assert (src.reader, src.array.shape, src.mpp) == ("openslide", (3, 2967, 2220), 0.499)
    with openslide.OpenSlide(str(samples["cmu_small_region.svs"])) as slide:
        region = np.asarray(slide.read_region((1000, 700), 0, (333, 250)))  # (x, y), (w, h)
    assert region[..., 3].min() == 255
    with src:
        assert np.array_equal(src.array[:, 700:950, 1000:1333].compute(), region[..., :3].transpose(2, 0, 1))
    if Path("/proc/self/fd").is_dir():
        assert open_fds(samples["cmu_small_region.svs"]) == 0  # OpenSlide's handle is closed with the source


@pytest.mark.network
def test_real_pyramidal_tiff_lazily(samples) -> None:
    src = open_source(samples["slide.tiff"])
    assert src.reader == "tifffile" and src.array.shape == (3, 2500, 2500) and src.array.chunksize == (3, 128, 128)
    with tifffile.TiffFile(samples["slide.tiff"]) as tif:
        assert len(tif.series[0].levels) == 6
        expected = tif.series[0].asarray()[1200:1500, 2300:2500]
    assert np.array_equal(src.array[:, 1200:1500, 2300:2500].compute(), expected.transpose(2, 0, 1))


@pytest.mark.network
def test_real_jpeg(samples) -> None:
    src = open_source(samples["bmng.jpg"])
    assert src.array.shape == (3, 2700, 5400) and src.reader == "pil"


@pytest.mark.parametrize("extrasamples, dtype", [("unassalpha", np.uint8), ("assocalpha", np.uint16)])
def test_tiff_alpha_is_composited(tmp_path: Path, extrasamples: str, dtype) -> None:
    top = np.iinfo(dtype).max
    rgba = np.random.default_rng(7).integers(0, top, (64, 96, 4), dtype=dtype, endpoint=True)
    rgba[:10, :, 3] = top
    rgba[10:20, :, 3] = 0
    if extrasamples == "assocalpha":
        rgba[..., :3] = (rgba[..., :3].astype(np.uint64) * rgba[..., 3:] // top).astype(dtype)
    write_tiled_tiff(tmp_path / "a.tif", rgba, tile=32, photometric="rgb", extrasamples=[extrasamples])
    src = open_source(tmp_path / "a.tif", fill=100)
    out = src.array.compute()
    assert out.shape == (3, 64, 96) and out.dtype == dtype
    assert np.array_equal(out[:, :10], rgba[:10, :, :3].transpose(2, 0, 1))
    assert np.all(out[:, 10:20] == 100)
