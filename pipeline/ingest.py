"""Ingest images into OME-Zarr pyramids plus a Parquet manifest: the typed library behind jobs/ingest.py.

    ingest_sources(root, ["slide.svs", "folder/", "list.csv"], options=WriteOptions(chunk=512))
    ingest_generated(root, MegapixelMNISTConfig(size=1500), n_train=5000, n_test=1000, workers=4)

Each image becomes ROOT/images/<image_id>.zarr, marked complete last; then ROOT/manifest.parquet is written, always,
failed rows included (DESIGN "Public interfaces", "Storage layout"). A rerun skips images that are complete, in the
current format (`gats.format` == pipeline.pyramid.GATS_FORMAT) AND were written from the same source (same file size
and mtime, or the same generator recipe) and redoes everything else (`WriteOptions(force=True)` redoes all). One bad
image never stops the others: it becomes a failed row naming why.

Never train on garbage, fail fast (docs/reliability.md): an image is only ever marked complete by its last write, so
a stop at any moment leaves no image marked complete that is not. Two things stop an ingest early, and both leave a
report rather than a traceback: `max_storage_failures` images in a row that failed because of the storage (a
StorageError in the exception's chain: the endpoint is gone, every further image would fail the same way after its
retries), and the caller's `stop` event (the job sets it on SIGTERM / SIGINT). Then no new image starts, writes in
flight stop before their next block (`write_pyramid(cancel=...)`), the manifest is written with every image not
finished as a failed row saying so (a rerun redoes them), and when even that write fails the report says so.

Parallelism is the caller's: `workers` images in flight (threads); dask's scheduler inside each image is set by the
job. Nothing here parses arguments, configures logging or draws progress bars (STYLE: only jobs/ do): `on_start`
and `on_image` tell the caller how many images there are and when each one is done.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask.array as da

from pipeline import manifest, pyramid
from pipeline.errors import ImageTooSmallError, MaskError, PipelineError, StorageError, WriteCancelled, find_error
from pipeline.masks import COMPUTED_METHODS as MASK_METHODS
from pipeline.masks import MaskRule, find_mask_file, load_mask_file
from pipeline.storage import Storage, image_key

if TYPE_CHECKING:
    from pipeline.megapixel_mnist import MegapixelMNISTConfig
    from pipeline.sources import SourceImage

log = logging.getLogger(__name__)
DEFAULT_LABEL = "unlabeled"  # label of SOURCE files and folders (CSV rows carry their own)
DEFAULT_SPLIT = "train"
MAX_STORAGE_FAILURES = 3  # images in a row failed on storage before an ingest stops (--max-storage-failures)
_POLL_S = 0.1  # how often run_ingest looks at its `stop` event while images are in flight


@dataclass(frozen=True, slots=True)
class WriteOptions:
    """How every pyramid is written; the single definition of the write defaults (the design's).

    chunk: zarr chunk side in pixels. downsample: factor between levels. min_size: add levels until both sides are
    <= this. max_levels: at most this many levels (None: no cap). shards: zarr shard side in pixels, a multiple of
    chunk (None: no sharding). patch_size: images smaller than one patch fail. fill: value outside the image and
    under transparency (None: the source's background, else 0). force: rewrite complete images too. mask: the
    foreground mask to store (pipeline.masks: "tissue", "nodata" with `nodata` (None: each GeoTIFF's GDAL_NODATA),
    "alpha"; None: none), or mask_dir: a folder of the user's masks, <source stem>.png/.tif (non-zero = foreground).
    mpp: micrometres per level-0 pixel of the images whose file records none (a CSV's mpp column replaces both).
    """

    chunk: int = 256
    downsample: int = 2
    min_size: int = 256
    max_levels: int | None = None
    shards: int | None = None
    patch_size: int = 32
    fill: int | None = None
    force: bool = False
    mask: str | None = None
    nodata: float | None = None
    mask_dir: str | None = None
    mpp: float | None = None

    def __post_init__(self) -> None:
        if self.mask is not None and self.mask not in MASK_METHODS:
            raise ValueError(f"Expected mask (--mask) one of {MASK_METHODS}. Got {self.mask!r}.")
        if self.mask_dir is not None and self.mask is not None:
            raise ValueError("Give either --mask or --mask-dir, not both: a folder of masks replaces the computed one.")
        if self.nodata is not None and self.mask != "nodata":
            raise ValueError("--nodata VALUE goes with --mask nodata: add --mask nodata, or drop --nodata.")
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
        if self.mpp is not None and not (isinstance(self.mpp, (int, float)) and math.isfinite(self.mpp)
                                         and self.mpp > 0):
            raise ValueError(f"Expected mpp (--mpp) a positive number of micrometres per pixel. Got {self.mpp!r}: "
                             "e.g. 0.25 (40x), 0.5 (20x); 1e7 for 10 m rasters.")


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
    mpp: float | None = None  # a CSV's mpp column: replaces the file's resolution and --mpp


@dataclass(frozen=True, slots=True)
class Outcome:
    """One image: its manifest row, whether a complete copy from the same source was kept, whether it failed because
    the storage did (a StorageError in the exception's chain), and whether it was not finished because the ingest
    stopped (never started, or its write stopped at a block boundary, unmarked)."""

    row: manifest.ManifestRow
    skipped: bool
    storage_failed: bool = False
    not_finished: bool = False
    started: bool = True  # False: a stop came before this image was looked at (its stored pyramid is untouched)


class StopRequest(threading.Event):
    """An Event that also says why it was set: a job's signal handler calls `request("interrupted by SIGTERM")`, and
    run_ingest (given it as `stop`) reports that reason as `IngestReport.stopped`. A plain Event works too."""

    def __init__(self) -> None:
        super().__init__()
        self.reason = "stop requested by the caller"

    def request(self, reason: str) -> None:
        """Set the event; the first reason given is kept."""
        if not self.is_set():
            self.reason = reason
        self.set()


@dataclass(frozen=True, slots=True)
class IngestReport:
    """What one ingest did: the outcomes in task order (the manifest's row order), why it stopped early (None: it did
    not) and why the manifest could not be written (None: it was)."""

    root: str
    outcomes: tuple[Outcome, ...]
    stopped: str | None = None
    manifest_error: str | None = None

    @property
    def complete(self) -> bool:
        """Every image is complete (written now or kept from before)."""
        return all(o.row.status == "complete" for o in self.outcomes)

    @property
    def failed(self) -> tuple[manifest.ManifestRow, ...]:
        """The failed rows, each with its `error`."""
        return tuple(o.row for o in self.outcomes if o.row.status == "failed")

    def summary(self) -> str:
        """A few lines for a person: counts, the manifest's URI, the stop reason (once), and one line per failed
        image naming why; after a stop, the images it held back (failed on storage, not finished) share one line."""
        failed = self.failed
        skipped = sum(o.skipped for o in self.outcomes)
        where = (Storage(self.root).uri(manifest.MANIFEST_KEY) if self.manifest_error is None
                 else "NOT written (below)")
        lines = [f"{len(self.outcomes) - len(failed)}/{len(self.outcomes)} images complete in {self.root} "
                 f"({skipped} already complete, skipped); manifest: {where}"]
        held: list[Outcome] = []
        if self.stopped is not None:
            lines.append(f"stopped early: {self.stopped}. No new images were started and writes in flight stopped at "
                         "their next block, unmarked; re-run the same command to finish (complete images are "
                         "skipped).")
            held = [o for o in self.outcomes if o.storage_failed or o.not_finished]
        if self.manifest_error is not None:
            lines.append(self.manifest_error)
        if held:
            ids = [o.row.image_id for o in held]
            shown = ", ".join(ids[:8]) + (f", ... ({len(ids) - 8} more)" if len(ids) > 8 else "")
            counts = {"failed with StorageError": sum(o.storage_failed for o in held),
                      "not finished": sum(o.not_finished for o in held)}
            why = ", ".join(f"{n} {what}" for what, n in counts.items() if n)
            lines.append(f"{len(held)} not written because of the stop ({why}; each row of the manifest says why): "
                         f"{shown}")
        held_ids = {id(o) for o in held}
        others = [o.row for o in self.outcomes if o.row.status == "failed" and id(o) not in held_ids]
        if others:
            lines.append(f"{len(others)} failed:")
            lines += [f"  {row.image_id} ({row.source}): {row.error}" for row in others]
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
            geo = (("geo", dataclasses.asdict(src.geo)),) if src.geo else ()
            return Loaded(src.array, src.fill, src.mpp, (("reader", src.reader), *geo), source=src)
        return load

    taken: set[str] = set()
    tasks = []
    for entry in iter_sources(sources):
        image_id = manifest.safe_image_id(entry.stem, taken)
        absolute = str(Path(entry.path).resolve()) if entry.path else entry.path
        tasks.append(IngestTask(
            image_id=image_id, source=absolute, label=(entry.label or "") if entry.listed else label,
            split=entry.split if entry.listed else split, identity=_file_identity(entry.path),
            load=loader(entry.path), extra=(("source", absolute),), error=entry.error, group=entry.group,
            mpp=entry.mpp))
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


def _mask_rule(task: IngestTask, options: WriteOptions) -> MaskRule | None | str:
    """The mask the options ask for this image: the user's file from mask_dir, a computed rule, or none; "nodata"
    when the nodata value is to come from the file itself (`_file_nodata`, once it is open)."""
    if options.mask_dir is not None:
        stem = Path(task.source).stem if task.source else task.image_id
        return MaskRule("given", given=load_mask_file(find_mask_file(options.mask_dir, task.image_id, stem)))
    if options.mask == "nodata" and options.nodata is None:
        return "nodata"
    return MaskRule(options.mask, nodata=options.nodata) if options.mask else None


def _file_nodata(task: IngestTask, loaded: Loaded) -> MaskRule:
    """The nodata rule with the value the source file declares (a GeoTIFF's GDAL_NODATA); MaskError without one."""
    nodata = (dict(loaded.extra).get("geo") or {}).get("nodata")
    if nodata is None:
        raise MaskError(f"{task.source!r} declares no nodata value (GDAL_NODATA): pass --nodata VALUE with "
                        "--mask nodata.")
    return MaskRule("nodata", nodata=float(nodata))


def _wanted_mask(options: WriteOptions) -> str | None:
    return "given" if options.mask_dir is not None else options.mask


def _row(task: IngestTask, uri: str, info: pyramid.PyramidInfo) -> manifest.ManifestRow:
    return manifest.ManifestRow(
        image_id=task.image_id, uri=uri, source=task.source, label=task.label, split=task.split,
        height=info.height, width=info.width, channels=info.channels, dtype=info.dtype, levels=info.levels,
        downsamples=info.downsamples, mpp=info.mpp, checksum=info.checksum, status="complete", group=task.group,
        band_mean=info.band_mean, band_std=info.band_std, tissue_fraction=info.tissue_fraction, crs=info.crs,
        geotransform=info.geotransform)


def _failed_row(task: IngestTask, uri: str, error: str) -> manifest.ManifestRow:
    return manifest.ManifestRow(image_id=task.image_id, uri=uri, source=task.source, label=task.label or "",
                                split=task.split, status="failed", error=error, group=task.group)


def _mpp_and_source(task: IngestTask, loaded: Loaded, options: WriteOptions) -> tuple[float | None, str | None]:
    """The resolution to record and where it came from: the CSV's mpp column, else the file's, else --mpp."""
    for value, source in ((task.mpp, "csv"), (loaded.mpp, "file"), (options.mpp, "option")):
        if value is not None:
            return float(value), source
    return None, None


def _mpp_change(stored: dict[str, Any], task: IngestTask, options: WriteOptions) -> tuple[float, str] | None:
    """(mpp, source) to record on a complete pyramid whose stored resolution (gats.mpp; gats.extra.mpp_source, where
    it came from) differs from the one now given: a CSV mpp, or --mpp where the file recorded none; else None. A
    value that came from the file is only replaced by a CSV mpp; a rerun that gives none keeps what is stored."""
    mpp = stored.get("mpp")
    source = (stored.get("extra") or {}).get("mpp_source", "file" if mpp is not None else None)
    given = ((task.mpp, "csv") if task.mpp is not None
             else (options.mpp, "option") if options.mpp is not None and source != "file" else None)
    if given is None or (mpp is not None and math.isclose(mpp, given[0], rel_tol=1e-9)):
        return None
    return float(given[0]), given[1]


def ingest_one(root: str, task: IngestTask, options: WriteOptions, *,
               cancel: threading.Event | None = None) -> Outcome:
    """Write one pyramid (or keep a complete one from the same source); a bad image becomes a failed row.

    When `cancel` is set the image does not start, or its write stops before its next block (unmarked): a failed
    row with `not_finished`. A failure with a StorageError in its chain is flagged `storage_failed`.
    """
    uri = Storage(root).uri(image_key(task.image_id))
    try:
        if cancel is not None and cancel.is_set():
            return Outcome(_failed_row(task, uri, "WriteCancelled: not started: a stop was requested"), skipped=False,
                           not_finished=True, started=False)
        if task.error is not None:
            raise task.error
        if not options.force and pyramid.is_complete(root, task.image_id):
            stored = _stored_gats(root, task.image_id)
            stored_mask = (stored.get("mask") or {}).get("method")
            if stored.get("format") != pyramid.GATS_FORMAT:
                log.info("%s: the stored pyramid has gats.format %s, not the current %d (older level factors or no "
                         "chunk checksums); rewriting it", task.image_id, stored.get("format"), pyramid.GATS_FORMAT)
            elif stored_mask != _wanted_mask(options):
                log.info("%s: the stored pyramid's mask (%s) is not the one asked for (%s); rewriting it",
                         task.image_id, stored_mask, _wanted_mask(options))
            elif stored.get("extra", {}).get("identity") == task.identity:
                change = _mpp_change(stored, task, options)
                if change is not None:  # metadata only: the pixels stay
                    log.info("%s: recording %g um/px (from %s) in place of the stored %s; pixels kept",
                             task.image_id, change[0], change[1], stored.get("mpp"))
                    pyramid.set_resolution(root, task.image_id, *change)
                info = pyramid.info_with_band_stats(pyramid.open_pyramid(root, task.image_id))
                return Outcome(_row(task, uri, info), skipped=True)
            else:
                log.info("%s: the stored pyramid came from another source; rewriting it", task.image_id)
        rule = _mask_rule(task, options)  # a missing or unreadable mask file fails before the image is read
        loaded = task.load()
        try:
            if rule == "nodata":
                rule = _file_nodata(task, loaded)
            _, height, width = loaded.image.shape
            if height < options.patch_size or width < options.patch_size:
                raise ImageTooSmallError(
                    f"{task.source!r} is {height}x{width} px, smaller than one {options.patch_size}x"
                    f"{options.patch_size} patch. Drop it from the sources, or lower --patch-size to the patch size "
                    "training will use.")
            mpp, mpp_source = _mpp_and_source(task, loaded, options)
            extra = {**dict(task.extra), **dict(loaded.extra), "identity": task.identity,
                     **({"mpp_source": mpp_source} if mpp_source else {})}
            info = pyramid.write_pyramid(
                root, task.image_id, loaded.image, chunk=options.chunk, downsample=options.downsample,
                min_size=options.min_size, max_levels=options.max_levels, fill_value=loaded.fill, mpp=mpp,
                extra_attrs=extra, shards=options.shards, cancel=cancel, mask=rule)
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
        not_finished = find_error(exc, WriteCancelled) is not None
        if not_finished:
            log.info("%s not finished: %s", task.image_id, message)
        else:
            log.warning("%s failed: %s: %s", task.image_id, kind, message)
        storage_failed = not not_finished and find_error(exc, StorageError) is not None
        return Outcome(_failed_row(task, uri, f"{kind}: {message}"), skipped=False, storage_failed=storage_failed,
                       not_finished=not_finished)


def run_ingest(root: str, tasks: Sequence[IngestTask], classes: Sequence[str], *,
               options: WriteOptions = WriteOptions(), workers: int = 1,
               max_storage_failures: int = MAX_STORAGE_FAILURES, stop: threading.Event | None = None,
               on_start: Callable[[int], None] | None = None,
               on_image: Callable[[Outcome], None] | None = None) -> IngestReport:
    """Ingest every task with `workers` images in flight, then write the manifest (always); outcomes in task order.

    Stops early (module doc), returning a report whose `stopped` says why, after `max_storage_failures` finished
    images in a row failed because of the storage ("storage unreachable: <endpoint>"), or once `stop` is set (its
    `reason` when it is a StopRequest). Images not finished then are failed rows "not finished: <why>". A manifest
    write that fails with StorageError is recorded in `manifest_error` instead of raised.

    `on_start(n_images)` is called once before the first image, `on_image(outcome)` once per finished image in
    completion order, both in the calling thread. An exception (Ctrl-C, or one raised by a callback) cancels the
    images not yet started, stops those in flight at their next block (each ends complete or unmarked, never
    half-marked) and propagates without writing the manifest.
    """
    _check_int("workers", workers, 1, "images written concurrently")
    _check_int("max_storage_failures", max_storage_failures, 1,
               f"images failed on storage in a row before ingest stops; the default is {MAX_STORAGE_FAILURES}")
    tasks = list(tasks)
    if on_start is not None:
        on_start(len(tasks))
    outcomes: list[Outcome | None] = [None] * len(tasks)
    cancel = threading.Event()  # set once: queued images never start, writes in flight stop at their next block
    stopped: str | None = None
    in_a_row = 0  # finished images that failed on storage, in a row (completion order)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ingest") as pool:
        futures = {pool.submit(ingest_one, root, task, options, cancel=cancel): i for i, task in enumerate(tasks)}
        pending = set(futures)
        try:
            while pending:
                if stopped is None and stop is not None and stop.is_set():
                    stopped = getattr(stop, "reason", None) or "stop requested by the caller"
                if stopped is not None and not cancel.is_set():
                    log.warning("stopping: %s; no new images start, writes in flight stop at their next block",
                                stopped)
                    cancel.set()
                    for future in pending:
                        future.cancel()  # only those not started; they come back done (cancelled) at once
                done, pending = wait(pending, timeout=_POLL_S, return_when=FIRST_COMPLETED)
                for future in done:
                    if future.cancelled():
                        continue
                    outcome = future.result()
                    outcomes[futures[future]] = outcome
                    if on_image is not None:
                        on_image(outcome)
                    in_a_row = in_a_row + 1 if outcome.storage_failed else 0
                    if stopped is None and in_a_row >= max_storage_failures:
                        storage = Storage(root)
                        stopped = (f"storage {'unreachable' if storage.is_s3 else 'failing'}: {storage.endpoint} "
                                   f"({in_a_row} images in a row failed with StorageError)")
        except BaseException:
            cancel.set()
            pool.shutdown(wait=False, cancel_futures=True)  # not a catch: stop queued images, then re-raise
            raise
    kept = _previously_complete(root) if stopped is not None else {}
    report = IngestReport(root, tuple(_finish(root, t, o, stopped, kept) for t, o in zip(tasks, outcomes)), stopped)
    try:
        manifest.write_manifest(root, [o.row for o in report.outcomes], classes)
    except StorageError as exc:
        log.error("the manifest was not written: %s", exc)
        reason = str(exc).rstrip(".")
        return dataclasses.replace(report, manifest_error=f"manifest not written: {reason}; re-run ingest when the "
                                                          "storage is back")
    return report


def _previously_complete(root: str) -> dict[str, manifest.ManifestRow]:
    """The complete rows of the manifest already in ROOT (none when there is none or it cannot be read now)."""
    try:
        rows, _ = manifest.read_manifest(root)
    except (PipelineError, OSError, ValueError):  # no manifest yet, or the storage is the reason for the stop
        return {}
    return {r.image_id: r for r in rows if r.status == "complete"}


def _finish(root: str, task: IngestTask, outcome: Outcome | None, stopped: str | None,
            kept: dict[str, manifest.ManifestRow]) -> Outcome:
    """The outcome to report for `task` once the pool is done: a not-finished image gets a failed row naming the
    stop, so a person reads why and a rerun (which redoes every image not complete) writes it; except an image the
    stop kept from being looked at at all whose previous manifest row (same source) says complete: its pyramid was
    not touched, so that row stays, and a stopped rerun over a finished dataset does not hide its images."""
    if outcome is not None and not outcome.not_finished:
        return outcome
    if stopped is None:
        raise AssertionError(f"{task.image_id} has no outcome although ingest was not stopped")
    before = kept.get(task.image_id)
    if (outcome is None or not outcome.started) and before is not None and before.source == task.source:
        return Outcome(before, skipped=True)
    started = outcome is not None and outcome.started
    when = "its write stopped before the next block, unmarked" if started else "not started"
    row = _failed_row(task, Storage(root).uri(image_key(task.image_id)),
                      f"not finished: {stopped} ({when}); re-run ingest to write it")
    return Outcome(row, skipped=False, not_finished=True)


def ingest_sources(root: str, sources: Sequence[str], *, label: str = DEFAULT_LABEL, split: str = DEFAULT_SPLIT,
                   options: WriteOptions = WriteOptions(), workers: int = 1,
                   max_storage_failures: int = MAX_STORAGE_FAILURES, stop: threading.Event | None = None,
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
    return run_ingest(root, tasks, classes, options=options, workers=workers,
                      max_storage_failures=max_storage_failures, stop=stop, on_start=on_start, on_image=on_image)


def ingest_generated(root: str, config: MegapixelMNISTConfig, *, n_train: int, n_test: int,
                     options: WriteOptions = WriteOptions(), workers: int = 1,
                     max_storage_failures: int = MAX_STORAGE_FAILURES, stop: threading.Event | None = None,
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
    return run_ingest(root, tasks, classes, options=options, workers=workers,
                      max_storage_failures=max_storage_failures, stop=stop, on_start=on_start, on_image=on_image)
