"""Source images -> lazy dask arrays (C, H, W) in their stored dtype, plus the metadata the writer keeps.

One opener per family, picked by suffix:
- PNG/JPEG/BMP/WebP through PIL. These formats have no random access, so PIL decodes the whole image once at
  open (which is also how truncation is caught); RGBA and LA are composited onto the fill value.
- TIFF (strips, tiles, pyramidal BigTIFF) through tifffile's `aszarr` -> zarr -> dask: only the tiles a dask chunk
  needs are decoded, never the whole image. Vendor TIFFs that OpenSlide recognises (Philips, Ventana) go to OpenSlide.
- Whole-slide vendor formats (.svs, .ndpi, .mrxs, ...) through OpenSlide (pipeline/slides.py): level 0 read tile by
  tile with `read_region`, alpha composited onto the fill value; mpp from `openslide.mpp-x`.
- `.npy` memory-mapped: (H, W), (H, W, C) or (C, H, W) (the channel axis is the shorter of first and last).

TIFF and OpenSlide arrays open their file on the first read of pixels and keep that one handle for the threads
reading it; `open_source` itself leaves no handle open (metadata and the corner probe close theirs), and
`SourceImage.close()` (or `with open_source(p) as src:`) closes the one a compute opened.

Which files to open (folders, CSV lists) is pipeline/source_lists.py's job; this module opens one image.
Nothing here decides parallelism; the arrays are computed by whoever writes them.
"""
from __future__ import annotations

import math
import struct
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np

from pipeline.errors import CorruptImageError, ImageNotFoundError, UnsupportedImageError

PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".jpe", ".bmp", ".webp")
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".tf2")
OPENSLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".vms", ".vmu", ".scn", ".svslide", ".bif", ".dcm")
NPY_SUFFIXES = (".npy",)
SUPPORTED_SUFFIXES = PIL_SUFFIXES + TIFF_SUFFIXES + OPENSLIDE_SUFFIXES + NPY_SUFFIXES
SOURCE_CHUNK_PX = 1024  # dask chunk edge for sources without native tiles; the writer rechunks to its zarr chunks
PIL_CONVERT = {"PA": "RGBA", "RGBa": "RGBA", "La": "LA", "1": "L", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB",
               "HSV": "RGB"}
MAX_MICROSCOPY_MPP = 50.0  # TIFF resolution tags above this (e.g. 72 dpi defaults) say nothing about pixel size
# What reading a damaged TIFF raises: tifffile's TiffFileError (a ValueError) for bad structure, IndexError/KeyError
# for missing pages or tags, TypeError for malformed tag values, OSError/EOFError/struct.error for short reads,
# zlib.error and imagecodecs' codec errors (RuntimeError subclasses) for damaged tile data.
TIFF_ERRORS = (OSError, EOFError, ValueError, LookupError, TypeError, RuntimeError, struct.error, zlib.error)


@dataclass(frozen=True, slots=True)
class GeoInfo:
    """Where a georeferenced raster lies: its CRS ("EPSG:<code>", "" when the file defines its own) and the GDAL
    geotransform (x0, dx, rx, y0, ry, dy): world x = x0 + col dx + row rx, y = y0 + col ry + row dy, for the pixel
    corner (col, row); `nodata` from the GDAL_NODATA tag when present; `linear_unit` "metre" when the CRS is
    projected in metres (ProjLinearUnitsGeoKey 9001, or without that key a metre CRS `_metre_crs` knows; never Web
    Mercator), else "" (degrees, Web Mercator, unknown)."""

    crs: str
    transform: tuple[float, float, float, float, float, float]
    nodata: float | None = None
    linear_unit: str = ""

    @property
    def mpp(self) -> float | None:
        """The level-0 pixel size in micrometres (metres x 1e6; the side of a square of the pixel's area), for a CRS
        in metres; None otherwise. This is how a raster's ground sample distance joins the one resolution mechanism
        (pipeline.resolution)."""
        if self.linear_unit != "metre":
            return None
        _, dx, rx, _, ry, dy = self.transform
        area = abs(dx * dy - rx * ry)
        return math.sqrt(area) * 1e6 if area > 0 and math.isfinite(area) else None


@dataclass(frozen=True, slots=True)
class SourceImage:
    """An opened source: a lazy (C, H, W) array in the stored dtype and what the pyramid writer records."""

    path: str
    stem: str
    array: da.Array  # (C, H, W)
    mpp: float | None  # micrometres per pixel at level 0, when the file says so
    fill: int  # value RGBA was composited onto; also the pyramid's fill for pixels outside the image
    reader: str  # "pil", "tifffile", "openslide" or "npy"
    file: LazyLevel0 | None = field(default=None, repr=False, compare=False)  # what `array` reads from, if a file
    geo: GeoInfo | None = None  # a GeoTIFF's coordinate reference system and geotransform

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    def close(self) -> None:
        """Close the file handle that computing `array` opened (TIFF, OpenSlide); computing again reopens it."""
        if self.file is not None:
            self.file.close()

    def __enter__(self) -> SourceImage:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def image_stem(path: str | Path) -> str:
    """The file name without its suffix (`.ome.tif`/`.ome.tiff` count as one): what the image id is made from."""
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def composite(pixels: np.ndarray, fill: int, *, associated: bool = False) -> np.ndarray:
    """(..., C+1) unsigned ints with alpha last -> (..., C) composited onto `fill`, rounded half up; opaque pixels
    are kept exactly. `associated`: the colour is already multiplied by alpha (TIFF ExtraSamples = 1)."""
    top = np.uint64(np.iinfo(pixels.dtype).max)
    colour = pixels[..., :-1].astype(np.uint64)
    alpha = pixels[..., -1:].astype(np.uint64)
    background = np.uint64(fill) * (top - alpha)
    if associated:
        mixed = np.minimum(colour + (background + top // 2) // top, top)
    else:
        mixed = (colour * alpha + background + top // 2) // top
    return mixed.astype(pixels.dtype)


def open_source(path: str | Path, *, fill: int | None = None) -> SourceImage:
    """Open `path` lazily. `fill` (default: the file's background suggestion, else 0) is what alpha is composited
    onto and what the pyramid reads outside the image."""
    p = Path(path)
    if not p.exists():
        raise ImageNotFoundError(f"Source image {str(p)!r} does not exist. Check the path (CSV paths are relative "
                                 "to the CSV's own folder).")
    if p.is_dir():
        raise UnsupportedImageError(f"{str(p)!r} is a folder, not an image. Pass it as a SOURCE argument on its own "
                                    "to ingest the images inside it.")
    suffix = p.suffix.lower()
    if suffix in NPY_SUFFIXES:
        return _open_npy(p, fill)
    if suffix in PIL_SUFFIXES:
        return _open_pil(p, fill)
    from pipeline.slides import open_openslide, openslide_vendor  # whole-slide formats live in their own module

    if suffix in OPENSLIDE_SUFFIXES or (suffix in TIFF_SUFFIXES and openslide_vendor(p)):
        return open_openslide(p, fill)
    if suffix in TIFF_SUFFIXES:
        return _open_tiff(p, fill)
    if openslide_vendor(p):
        return open_openslide(p, fill)
    raise UnsupportedImageError(f"{str(p)!r} has an unknown suffix {suffix!r}. Supported: "
                                f"{', '.join(SUPPORTED_SUFFIXES)}; convert it to one of them (e.g. a tiled TIFF).")


def corrupt_error(p: Path, exc: BaseException) -> CorruptImageError:
    return CorruptImageError(f"{str(p)!r} could not be decoded ({type(exc).__name__}: {exc}); it is truncated or "
                             "damaged. Re-export or re-download it.")


def source_chunks(c: int, h: int, w: int, edge: int = SOURCE_CHUNK_PX) -> tuple[int, int, int]:
    return (c, min(h, edge), min(w, edge))


class LazyLevel0:
    """Array-like view of a file's level 0 for `da.from_array`. The file is opened on the first read of pixels (not
    when the view is made), shared by the reading threads, and closed by `close()`; a read after `close()` reopens
    it. Pickles without the open handle. Subclasses define `_open` and `__getitem__`."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path = path
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)
        self._lock = threading.Lock()
        self._opened: tuple[Any, Any] | None = None  # (handle to close, what __getitem__ reads)

    def _open(self) -> tuple[Any, Any]:
        raise NotImplementedError

    def _reader(self) -> Any:
        with self._lock:
            if self._opened is None:
                self._opened = self._open()
            return self._opened[1]

    def close(self) -> None:
        with self._lock:
            opened, self._opened = self._opened, None
        if opened is not None:
            opened[0].close()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_opened")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.Lock(), _opened=None)


def lazy_array(level0: LazyLevel0, chunks: tuple[int, ...], p: Path, tag: str) -> da.Array:
    """A dask array over `level0`; `meta` is given so that dask does not read (and open the file) to infer it."""
    return da.from_array(level0, chunks=chunks, asarray=False, fancy=False,
                         meta=np.empty((0,) * level0.ndim, level0.dtype),
                         name=f"{tag}-{p.resolve()}-{p.stat().st_mtime_ns}")


# --- PIL: PNG / JPEG -----------------------------------------------------------------------------------------------

def _open_pil(p: Path, fill: int | None) -> SourceImage:
    from PIL import Image, UnidentifiedImageError

    fill = 0 if fill is None else fill
    try:
        with Image.open(p) as im:
            im.load()  # decodes everything: truncated or damaged data fails here, at open
            pixels = _pil_to_hwc(im, fill)
    except UnidentifiedImageError as exc:
        raise UnsupportedImageError(f"{str(p)!r} is not an image PIL can identify ({exc}). Check that the file is "
                                    "really a PNG/JPEG, or convert it.") from exc
    except Image.DecompressionBombError as exc:
        raise UnsupportedImageError(f"{str(p)!r} is too large to decode whole with PIL ({exc}). Convert it to a tiled "
                                    "pyramidal TIFF (e.g. `vips tiffsave in out.tif --tile --pyramid --bigtiff`).") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise corrupt_error(p, exc) from exc
    chw = np.ascontiguousarray(pixels.transpose(2, 0, 1))  # (H, W, C) -> (C, H, W)
    array = da.from_array(chw, chunks=source_chunks(*chw.shape), name=f"pil-{p.resolve()}-{p.stat().st_mtime_ns}")
    return SourceImage(str(p), image_stem(p), array, None, fill, "pil")


def _pil_to_hwc(im: Any, fill: int) -> np.ndarray:
    """PIL image -> (H, W, C): grayscale C=1, colour C=3 (alpha composited onto `fill`), 16-bit kept 16-bit."""
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode in PIL_CONVERT:
        im = im.convert(PIL_CONVERT[im.mode])
    mode = im.mode
    arr = np.asarray(im)
    if mode in ("RGBA", "LA"):
        return composite(arr if arr.ndim == 3 else arr[..., None], fill)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


# --- tifffile: TIFF / BigTIFF / pyramidal ------------------------------------------------------------------------

def _tiff_zarr(tif: Any) -> Any:
    """The first series' level 0 of an open TiffFile as a zarr array (tiles decoded on read)."""
    import zarr

    z = zarr.open(tif.series[0].aszarr(level=0), mode="r")
    return z["0"] if isinstance(z, zarr.Group) else z  # some tifffile versions expose the levels as a group


class _TiffLevel0(LazyLevel0):
    """The first series' level 0 in its stored axis order; each read decodes only the tiles it touches."""

    def _open(self) -> tuple[Any, Any]:
        import tifffile

        tif = tifffile.TiffFile(self.path)
        try:
            return tif, _tiff_zarr(tif)
        except BaseException:
            tif.close()
            raise

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        return np.asarray(self._reader()[key])


def _open_tiff(p: Path, fill: int | None) -> SourceImage:
    import tifffile

    fill = 0 if fill is None else fill
    try:
        with tifffile.TiffFile(p) as tif:  # metadata only; pixels are read through _TiffLevel0
            z = _tiff_zarr(tif)
            shape, dtype, chunks = z.shape, np.dtype(z.dtype), z.chunks
            axes = tif.series[0].axes
            extrasamples = tuple(int(e) for e in (tif.pages[0].extrasamples or ()))
            geo = tiff_geo(tif)
            mpp = geo.mpp if geo else _tiff_mpp(tif)  # a raster's resolution tags are not micrometres
    except TIFF_ERRORS as exc:
        raise corrupt_error(p, exc) from exc
    level0 = _TiffLevel0(p, shape, dtype)
    chw = _tiff_alpha(_tiff_to_chw(lazy_array(level0, chunks, p, "tiff"), axes, p), extrasamples, fill)
    try:
        probe_corners(chw, p)
    except TIFF_ERRORS as exc:
        raise corrupt_error(p, exc) from exc
    finally:
        level0.close()  # the probe's handle; writing the array opens one, which SourceImage.close() closes
    return SourceImage(str(p), image_stem(p), chw, mpp, fill, "tifffile", level0, geo)


def _tiff_to_chw(arr: da.Array, axes: str, p: Path) -> da.Array:
    """Squeeze singleton axes and order the rest as (C, Y, X); refuse stacks (Z, T, several pages)."""
    keep = [i for i, (ax, n) in enumerate(zip(axes, arr.shape)) if n > 1 or ax in "YX"]
    squeezed_axes = "".join(axes[i] for i in keep)
    arr = arr.reshape(tuple(arr.shape[i] for i in keep))
    if set(squeezed_axes) - set("SCYX") or not {"Y", "X"} <= set(squeezed_axes) or len(squeezed_axes) > 3:
        raise UnsupportedImageError(f"{str(p)!r} holds a {squeezed_axes} stack (axes {axes}); only single 2-D images "
                                    "(with samples/channels) are supported. Export one plane per file.")
    if len(squeezed_axes) == 2:
        return arr.transpose(squeezed_axes.index("Y"), squeezed_axes.index("X"))[None]
    c = next(i for i, ax in enumerate(squeezed_axes) if ax in "SC")
    return arr.transpose(c, squeezed_axes.index("Y"), squeezed_axes.index("X"))  # (C, Y, X)


def _tiff_alpha(arr: da.Array, extra: tuple[int, ...], fill: int) -> da.Array:
    """RGBA / gray+alpha TIFFs (one alpha ExtraSample) composited onto `fill`, lazily, chunk by chunk."""
    if len(extra) != 1 or extra[0] not in (1, 2) or arr.shape[0] not in (2, 4) or arr.dtype.kind != "u":
        return arr
    associated = extra[0] == 1

    def block(chw: np.ndarray) -> np.ndarray:  # (C+1, h, w) -> (C, h, w)
        return composite(chw.transpose(1, 2, 0), fill, associated=associated).transpose(2, 0, 1)

    whole_c = arr.rechunk({0: -1})
    return whole_c.map_blocks(block, chunks=((arr.shape[0] - 1,), *whole_c.chunks[1:]), dtype=arr.dtype)


def probe_corners(arr: da.Array, p: Path) -> None:
    """Decode the first and last chunk so a truncated file fails at open, not halfway through a write."""
    _, h, w = arr.shape
    ch, cw = arr.chunks[1][0], arr.chunks[2][0]
    arr[:, :ch, :cw].compute(scheduler="synchronous")
    arr[:, h - arr.chunks[1][-1]:, w - arr.chunks[2][-1]:].compute(scheduler="synchronous")


GEO_USER_DEFINED = 32767  # GeoTIFF's code for "defined by other keys", not an EPSG code
GEO_LINEAR_METRE = 9001  # ProjLinearUnitsGeoKey's code for the metre
WEB_MERCATOR = 3857  # metres on the map, not on the ground (they shrink by cos(latitude)): no resolution


def _metre_crs(code: int) -> bool:
    """EPSG codes of common projected CRSs in metres whose pixel is about its size on the ground: WGS 84 / UTM
    (326xx, 327xx), ETRS89 / UTM (258xx), NAD83 / UTM (269xx), ETRS89-LAEA (3035), Lambert-93 (2154). Not Web
    Mercator (3857): its metres shrink on the ground by cos(latitude), so its pixel size is no resolution."""
    return (32601 <= code <= 32660 or 32701 <= code <= 32760 or 25828 <= code <= 25838 or 26901 <= code <= 26923
            or code in (3035, 2154))


def tiff_geo(tif: Any) -> GeoInfo | None:
    """The CRS and geotransform of a GeoTIFF (ModelTransformation, or ModelTiepoint + ModelPixelScale), else None."""
    if not tif.is_geotiff:
        return None
    meta = tif.geotiff_metadata or {}
    if "ModelTransformation" in meta:
        m = np.asarray(meta["ModelTransformation"], dtype=np.float64).reshape(4, 4)
        transform = (m[0, 3], m[0, 0], m[0, 1], m[1, 3], m[1, 0], m[1, 1])
    elif "ModelTiepoint" in meta and "ModelPixelScale" in meta:
        i, j, _, x, y, _ = (float(v) for v in np.asarray(meta["ModelTiepoint"]).ravel()[:6])
        sx, sy = (float(v) for v in np.asarray(meta["ModelPixelScale"]).ravel()[:2])
        transform = (x - i * sx, sx, 0.0, y + j * sy, 0.0, -sy)
    else:
        return None
    code = meta.get("ProjectedCSTypeGeoKey", meta.get("GeographicTypeGeoKey"))
    try:
        code = int(code) if code is not None else None
    except (TypeError, ValueError):
        code = None
    crs = f"EPSG:{code}" if code and code != GEO_USER_DEFINED else ""
    try:
        unit_key = int(meta.get("ProjLinearUnitsGeoKey", 0) or 0)
    except (TypeError, ValueError):
        unit_key = 0
    projected = "ProjectedCSTypeGeoKey" in meta
    metre = projected and code != WEB_MERCATOR and (unit_key == GEO_LINEAR_METRE if unit_key
                                                    else bool(code) and _metre_crs(code or 0))
    nodata = None
    tag = tif.pages[0].tags.get(42113)  # GDAL_NODATA, ASCII
    if tag is not None:
        try:
            nodata = float(str(tag.value).strip().strip("\x00"))
        except ValueError:
            nodata = None
    return GeoInfo(crs, tuple(float(v) for v in transform), nodata,  # type: ignore[arg-type]
                   "metre" if metre else "")


def _tiff_mpp(tif: Any) -> float | None:
    """Micrometres per pixel from an Aperio description or from resolution tags in inch/centimetre units."""
    page = tif.pages[0]
    description = page.description or ""
    if "|MPP = " in description:
        try:
            return float(description.split("|MPP = ", 1)[1].split("|", 1)[0])
        except ValueError:
            pass
    tags = page.tags
    if "XResolution" not in tags or "ResolutionUnit" not in tags:
        return None
    num, den = tags["XResolution"].value
    unit = int(tags["ResolutionUnit"].value)
    if not num or not den or unit not in (2, 3):
        return None
    per_unit_um = 25400.0 if unit == 2 else 10000.0
    mpp = per_unit_um * den / num
    return mpp if 0 < mpp <= MAX_MICROSCOPY_MPP else None


# --- .npy ------------------------------------------------------------------------------------------------------

def _open_npy(p: Path, fill: int | None) -> SourceImage:
    try:
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise CorruptImageError(f"{str(p)!r} is not a readable .npy array ({exc}); it is truncated or damaged. "
                                "Save it again with numpy.save.") from exc
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "biuf" or arr.ndim not in (2, 3):
        raise UnsupportedImageError(f"{str(p)!r} holds a {getattr(arr, 'ndim', '?')}-d {getattr(arr, 'dtype', '?')} "
                                    "array; expected a numeric (H, W), (H, W, C) or (C, H, W) array. Save one image "
                                    "per file.")
    if arr.dtype.kind == "b":
        arr = arr.view(np.uint8)
    if arr.ndim == 2:
        arr = arr[None]  # (H, W) -> (1, H, W)
    elif arr.shape[-1] < arr.shape[0]:
        arr = arr.transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)
    array = da.from_array(arr, chunks=source_chunks(*arr.shape), name=f"npy-{p.resolve()}-{p.stat().st_mtime_ns}")
    return SourceImage(str(p), image_stem(p), array, None, 0 if fill is None else fill, "npy")

