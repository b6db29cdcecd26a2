"""Ingest images into OME-Zarr pyramids plus a Parquet manifest: the typed library behind jobs/ingest.py.

    ingest_sources(root, ["slide.svs", "folder/", "list.csv"], options=WriteOptions(chunk=512))
    ingest_generated(root, MegapixelMNISTConfig(size=1500), n_train=5000, n_test=1000, workers=4)

Each image becomes ROOT/images/<image_id>.zarr, marked complete last; then ROOT/manifest.parquet is written, always,
failed rows included (DESIGN "Public interfaces", "Storage layout"). A rerun skips images that are complete, in the
current format (`gats.format` == pipeline.pyramid.GATS_FORMAT) AND were written from the same source (same file size
and mtime, or the same generator recipe) and redoes everything else (`WriteOptions(force=True)` redoes all). One bad
image never stops the others: it becomes a failed row naming why.

Parallelism is the caller's: `workers` images in flight (threads); dask's scheduler inside each image is set by the
job. Nothing here parses arguments, configures logging or draws progress bars (STYLE: only jobs/ do): `on_start`
and `on_image` tell the caller how many images there are and when each one is done.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask.array as da

from pipeline import manifest, pyramid
from pipeline.errors import ImageTooSmallError, PipelineError
from pipeline.storage import Storage, image_key

if TYPE_CHECKING:
    from pipeline.megapixel_mnist import MegapixelMNISTConfig
    from pipeline.sources import SourceImage

log = logging.getLogger(__name__)
DEFAULT_LABEL = "unlabeled"  # label of SOURCE files and folders (CSV rows carry their own)
DEFAULT_SPLIT = "train"


@dataclass(frozen=True, slots=True)
class WriteOptions:
    """How every pyramid is written; the single definition of the write defaults (the design's).

    chunk: zarr chunk side in pixels. downsample: factor between levels. min_size: add levels until both sides are
    <= this. max_levels: at most this many levels (None: no cap). shards: zarr shard side in pixels, a multiple of
    chunk (None: no sharding). patch_size: images smaller than one patch fail. fill: value outside the image and
    under transparency (None: the source's background, else 0). force: rewrite complete images too.
    """

    chunk: int = 256
    downsample: int = 2
    min_size: int = 256
    max_levels: int | None = None
    shards: int | None = None
    patch_size: int = 32
    fill: int | None = None
    force: bool = False

    def __post_init__(self) -> None:
        defaults = {f.name: f.default for f in fields(self)}
        for name, low in (("chunk", 1), ("downsample", 2), ("min_size", 1), ("patch_size", 1)):
            _check_int(name, getattr(self, name), low, f"the default is {defaults[name]}")
        if self.max_levels is not None:
            _check_int("max_levels", self.max_levels, 1, "or None for no cap")
        if self.fill is not None:
            _check_int("fill", self.fill, 0, "a pixel value, or None for the source's background")
        if self.shards is not None:
            _check_int("shards", self.shards, 1, "or None for no sharding")
            if self.shards % self.chunk:
                raise ValueError(f"Expected shards (--shards) a multiple of chunk={self.chunk}. Got {self.shards}: "
                                 f"pass e.g. {4 * self.chunk}, or leave it unset for no sharding.")
        if not isinstance(self.force, bool):
            raise ValueError(f"Expected force (--force) True or False. Got {self.force!r}.")


def _check_int(name: str, value: Any, low: int, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Expected {name} (--{name.replace('_', '-')}) an integer >= {low}. Got {value!r}: "
                         f"pass one ({hint}).")


@dataclass(frozen=True, slots=True)
class Loaded:
    """An opened image: lazy pixels, what the writer records with them, and the source file they are read from (if
    any), which `close()` closes once the pyramid is written."""

    image: da.Array  # (C, H, W)
    fill: int | float = 0
    mpp: float | None = None
    extra: tuple[tuple[str, Any], ...] = ()
    source: SourceImage | None = None

    def close(self) -> None:
        """Close the file handle that writing the pixels opened (TIFF, OpenSlide); nothing for in-memory pixels."""
        if self.source is not None:
            self.source.close()


@dataclass(frozen=True, slots=True)
class IngestTask:
    """One image to write. `load` opens it lazily in the worker; `identity` says which source a pyramid came from."""

    image_id: str
    source: str
    label: str
    split: str
    identity: str
    load: Callable[[], Loaded]
    extra: tuple[tuple[str, Any], ...] = ()
    error: PipelineError | None = None
    group: str = ""  # the manifest `group` (patient, site) from a CSV's group column


@dataclass(frozen=True, slots=True)
class Outcome:
    """One finished image: its manifest row, and whether a complete copy from the same source was kept."""

    row: manifest.ManifestRow
    skipped: bool


@dataclass(frozen=True, slots=True)
class IngestReport:
    """What one ingest did: the outcomes in task order (the manifest's row order)."""

    root: str
    outcomes: tuple[Outcome, ...]

    @property
    def complete(self) -> bool:
        """Every image is complete (written now or kept from before)."""
        return all(o.row.status == "complete" for o in self.outcomes)

    @property
    def failed(self) -> tuple[manifest.ManifestRow, ...]:
        """The failed rows, each with its `error`."""
        return tuple(o.row for o in self.outcomes if o.row.status == "failed")

    def summary(self) -> str:
        """A few lines for a person: counts, the manifest's URI, and one line per failed image naming why."""
        failed = self.failed
        skipped = sum(o.skipped for o in self.outcomes)
        lines = [f"{len(self.outcomes) - len(failed)}/{len(self.outcomes)} images complete in {self.root} "
                 f"({skipped} already complete, skipped); manifest: {Storage(self.root).uri(manifest.MANIFEST_KEY)}"]
        if failed:
            lines.append(f"{len(failed)} failed:")
            lines += [f"  {row.image_id} ({row.source}): {row.error}" for row in failed]
        return "\n".join(lines)


# --- building tasks --------------------------------------------------------------------------------------------

def _file_identity(path: str) -> str:
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return f"file:{p.resolve()}"
    return f"file:{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def source_tasks(sources: Sequence[str], *, label: str, split: str, fill: int | None) -> list[IngestTask]:
    """One task per image named by SOURCE arguments; CSV rows carry their own label and split."""
    from pipeline.source_lists import iter_sources
    from pipeline.sources import open_source

    def loader(path: str) -> Callable[[], Loaded]:
        def load() -> Loaded:
            src = open_source(path, fill=fill)
            return Loaded(src.array, src.fill, src.mpp, (("reader", src.reader),), source=src)
        return load

    taken: set[str] = set()
    tasks = []
    for entry in iter_sources(sources):
        image_id = manifest.safe_image_id(entry.stem, taken)
        absolute = str(Path(entry.path).resolve()) if entry.path else entry.path
        tasks.append(IngestTask(
            image_id=image_id, source=absolute, label=(entry.label or "") if entry.listed else label,
            split=entry.split if entry.listed else split, identity=_file_identity(entry.path),
            load=loader(entry.path), extra=(("source", absolute),), error=entry.error, group=entry.group))
    return tasks


def generator_tasks(config: MegapixelMNISTConfig, *, n_train: int, n_test: int, chunk: int,
                    fill: int = 0) -> list[IngestTask]:
    """Megapixel MNIST: n_train images from MNIST-train digits, n_test from MNIST-test digits, in (chunk, chunk)
    dask blocks; `fill` is the value outside the (black) canvas."""
    from pipeline import megapixel_mnist as mm

    banks: dict[str, mm.DigitBank] = {}
    if n_train:
        banks["train"] = mm.load_bank("train")  # fetched once into GATS_CACHE, shared by every worker
    if n_test:
        banks["test"] = mm.load_bank("test")

    def loader(split: str, index: int) -> Callable[[], Loaded]:
        def load() -> Loaded:
            sample = mm.make_image(banks[split], split, index, config)
            boxes = (("digits_yxhw_digit", [list(b) for b in sample.digits]),
                     ("noise_yxhw", [list(b[:4]) for b in sample.noise]))
            return Loaded(da.from_array(sample.image, chunks=(1, chunk, chunk)), fill, None, boxes)
        return load

    recipe = (f"megapixel-mnist:seed={config.seed}:size={config.size}:n_digits={config.n_digits}:"
              f"n_noise={config.n_noise}" + (f":n_classes={config.n_classes}" if config.n_classes != 10 else ""))
    tasks = []
    for split, n in (("train", n_train), ("test", n_test)):
        for index in range(n):
            tasks.append(IngestTask(
                image_id=mm.image_id(split, index), source=f"{recipe}:split={split}:index={index}",
                label=mm.label_for(config, split, index), split=split,
                identity=f"{recipe}:split={split}:index={index}", load=loader(split, index),
                extra=(("source", f"{recipe}:split={split}:index={index}"),)))
    return tasks


# --- writing ---------------------------------------------------------------------------------------------------

def _stored_gats(root: str, image_id: str) -> dict[str, Any]:
    import zarr

    group = zarr.open_group(Storage(root).zarr_store(image_key(image_id), read_only=True), mode="r")
    return dict(group.attrs.get("gats", {}))


def _row(task: IngestTask, uri: str, info: pyramid.PyramidInfo) -> manifest.ManifestRow:
    return manifest.ManifestRow(
        image_id=task.image_id, uri=uri, source=task.source, label=task.label, split=task.split,
        height=info.height, width=info.width, channels=info.channels, dtype=info.dtype, levels=info.levels,
        downsamples=info.downsamples, mpp=info.mpp, checksum=info.checksum, status="complete", group=task.group)


def ingest_one(root: str, task: IngestTask, options: WriteOptions) -> Outcome:
    """Write one pyramid (or keep a complete one from the same source); a bad image becomes a failed row."""
    uri = Storage(root).uri(image_key(task.image_id))
    try:
        if task.error is not None:
            raise task.error
        if not options.force and pyramid.is_complete(root, task.image_id):
            stored = _stored_gats(root, task.image_id)
            if stored.get("format") != pyramid.GATS_FORMAT:
                log.info("%s: the stored pyramid has gats.format %s, not the current %d (inexact level factors); "
                         "rewriting it", task.image_id, stored.get("format"), pyramid.GATS_FORMAT)
            elif stored.get("extra", {}).get("identity") == task.identity:
                return Outcome(_row(task, uri, pyramid.open_pyramid(root, task.image_id).info), skipped=True)
            else:
                log.info("%s: the stored pyramid came from another source; rewriting it", task.image_id)
        loaded = task.load()
        try:
            _, height, width = loaded.image.shape
            if height < options.patch_size or width < options.patch_size:
                raise ImageTooSmallError(
                    f"{task.source!r} is {height}x{width} px, smaller than one {options.patch_size}x"
                    f"{options.patch_size} patch. Drop it from the sources, or lower --patch-size to the patch size "
                    "training will use.")
            extra = {**dict(task.extra), **dict(loaded.extra), "identity": task.identity}
            info = pyramid.write_pyramid(
                root, task.image_id, loaded.image, chunk=options.chunk, downsample=options.downsample,
                min_size=options.min_size, max_levels=options.max_levels, fill_value=loaded.fill, mpp=loaded.mpp,
                extra_attrs=extra, shards=options.shards)
        finally:
            loaded.close()  # the source file's handle, opened by the write (TIFF, OpenSlide)
        return Outcome(_row(task, info.uri, info), skipped=False)
    except MemoryError:
        raise  # the machine, not this image: stop rather than fail every image that follows
    except Exception as exc:
        # Broad on purpose: the decoders (PIL, tifffile, OpenSlide, imagecodecs), zarr/dask and fsspec/s3fs raise
        # many unrelated types for one unreadable or unwritable image, and one bad image must not stop the others;
        # whatever it was becomes this image's failed row (type and message), and the run goes on. KeyboardInterrupt
        # and SystemExit are BaseExceptions and pass through.
        kind = type(exc).__name__
        message = str(exc) if isinstance(exc, PipelineError) else f"{exc} (while reading or writing {task.source!r})"
        log.warning("%s failed: %s: %s", task.image_id, kind, message)
        return Outcome(manifest.ManifestRow(image_id=task.image_id, uri=uri, source=task.source, label=task.label or "",
                                            split=task.split, status="failed", error=f"{kind}: {message}",
                                            group=task.group),
                       skipped=False)


def run_ingest(root: str, tasks: Sequence[IngestTask], classes: Sequence[str], *,
               options: WriteOptions = WriteOptions(), workers: int = 1,
               on_start: Callable[[int], None] | None = None,
               on_image: Callable[[Outcome], None] | None = None) -> IngestReport:
    """Ingest every task with `workers` images in flight, then write the manifest (always); outcomes in task order.

    `on_start(n_images)` is called once before the first image, `on_image(outcome)` once per finished image in
    completion order, both in the calling thread. An exception (Ctrl-C, or one raised by a callback) cancels the
    images not yet started, waits for those in flight (each ends complete or unmarked, never half-marked) and
    propagates without writing the manifest.
    """
    _check_int("workers", workers, 1, "images written concurrently")
    tasks = list(tasks)
    if on_start is not None:
        on_start(len(tasks))
    outcomes: list[Outcome | None] = [None] * len(tasks)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ingest") as pool:
        futures = {pool.submit(ingest_one, root, task, options): i for i, task in enumerate(tasks)}
        try:
            for future in as_completed(futures):
                outcome = future.result()
                outcomes[futures[future]] = outcome
                if on_image is not None:
                    on_image(outcome)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # not a catch: stop queued images, then re-raise
            raise
    report = IngestReport(root, tuple(o for o in outcomes if o is not None))
    manifest.write_manifest(root, [o.row for o in report.outcomes], classes)
    return report


def ingest_sources(root: str, sources: Sequence[str], *, label: str = DEFAULT_LABEL, split: str = DEFAULT_SPLIT,
                   options: WriteOptions = WriteOptions(), workers: int = 1,
                   on_start: Callable[[int], None] | None = None,
                   on_image: Callable[[Outcome], None] | None = None) -> IngestReport:
    """Ingest image files, folders (their supported images, sorted) and CSVs `path,label[,split][,group]` into ROOT.

    `label` and `split` apply to files and folders; CSV rows carry their own (relative paths resolve against the
    CSV's folder, split defaults to "train"). The class order is the sorted distinct labels. Raises (before writing
    anything) SourceListError for a bad folder or CSV header, ImageNotFoundError for a missing CSV, ValueError for
    bad arguments; a bad image or CSV row becomes a failed row instead.
    """
    if isinstance(sources, str) or not sources:
        raise ValueError(f"Expected a list of SOURCE files, folders or CSVs. Got {sources!r}: pass e.g. [path].")
    if split not in manifest.SPLITS:
        raise ValueError(f"Expected split in {manifest.SPLITS}. Got {split!r}.")
    if not isinstance(label, str) or not label:
        raise ValueError(f"Expected a non-empty string label. Got {label!r}: pass label=str(...).")
    tasks = source_tasks([str(s) for s in sources], label=label, split=split, fill=options.fill)
    classes = sorted({t.label for t in tasks if t.error is None and t.label})
    return run_ingest(root, tasks, classes, options=options, workers=workers, on_start=on_start, on_image=on_image)


def ingest_generated(root: str, config: MegapixelMNISTConfig, *, n_train: int, n_test: int,
                     options: WriteOptions = WriteOptions(), workers: int = 1,
                     on_start: Callable[[int], None] | None = None,
                     on_image: Callable[[Outcome], None] | None = None) -> IngestReport:
    """Generate and ingest Megapixel MNIST: images 0..n_train-1 of "train" and 0..n_test-1 of "test" into ROOT.

    Each image depends only on (config, split, index), so a rerun with the same config skips what is complete. The
    class order is "0".."n_classes-1". `options.fill` (default 0) is read outside the black canvas. Raises ValueError
    for bad counts and DatasetFetchError when MNIST is neither cached nor fetchable, before writing anything.
    """
    for name, n in (("n_train", n_train), ("n_test", n_test)):
        _check_int(name, n, 0, "a number of images")
    if n_train + n_test == 0:
        raise ValueError("Expected n_train and/or n_test > 0 (--n-train/--n-test). Got 0 and 0: ask for some images.")
    tasks = generator_tasks(config, n_train=n_train, n_test=n_test, chunk=options.chunk,
                            fill=0 if options.fill is None else options.fill)
    classes = [str(d) for d in range(config.n_classes)]
    return run_ingest(root, tasks, classes, options=options, workers=workers, on_start=on_start, on_image=on_image)
