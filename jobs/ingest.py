"""Ingest images into OME-Zarr pyramids plus a Parquet manifest (DESIGN "Public interfaces").

    python jobs/ingest.py --out ROOT SOURCE...            files, folders, or a CSV with path,label[,split]
    python jobs/ingest.py --out ROOT --generate megapixel-mnist --n-train N --n-test M [--size 1500] [--seed S]
    python jobs/ingest.py --fetch-samples [--out ROOT]    fetch the real sample images, print their paths
                                                         (with --out: ingest them too)
    python jobs/ingest.py --smoke-test                    a tiny end-to-end ingest in a temporary folder

ROOT is a folder or s3://bucket/prefix. Each image becomes ROOT/images/<image_id>.zarr, marked complete last; a
rerun skips images that are complete AND were written from the same source (same file size and mtime, or the same
generator recipe), redoes everything else (`--force` redoes all). The manifest is written even when some images
fail; the exit status is 0 only when every image is complete, else 1 with a summary naming each failure (2 for
a bad command line or source list). Parallelism is decided here: `--workers` images in flight (threads), and dask
threads inside each image.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

from pipeline import manifest, pyramid
from pipeline.errors import ImageTooSmallError, PipelineError
from pipeline.storage import Storage, image_key

log = logging.getLogger("ingest")
GENERATORS = ("megapixel-mnist",)


@dataclass(frozen=True, slots=True)
class WriteOptions:
    """How every pyramid is written; the defaults are the design's."""

    chunk: int = 256
    downsample: int = 2
    min_size: int = 256
    max_levels: int | None = None
    shards: int | None = None
    patch_size: int = 32
    force: bool = False

    def __post_init__(self) -> None:
        if self.patch_size < 1:
            raise ValueError(f"Expected --patch-size >= 1. Got {self.patch_size}.")


@dataclass(frozen=True, slots=True)
class Loaded:
    """An opened image: lazy pixels and what the writer records with them."""

    image: da.Array  # (C, H, W)
    fill: int | float = 0
    mpp: float | None = None
    extra: tuple[tuple[str, Any], ...] = ()


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


@dataclass(frozen=True, slots=True)
class Outcome:
    row: manifest.ManifestRow
    skipped: bool


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
    from pipeline.sources import iter_sources, open_source

    def loader(path: str) -> Callable[[], Loaded]:
        def load() -> Loaded:
            src = open_source(path, fill=fill)
            return Loaded(src.array, src.fill, src.mpp, (("reader", src.reader),))
        return load

    taken: set[str] = set()
    tasks = []
    for entry in iter_sources(sources):
        image_id = manifest.safe_image_id(entry.stem, taken)
        absolute = str(Path(entry.path).resolve()) if entry.path else entry.path
        tasks.append(IngestTask(
            image_id=image_id, source=absolute, label=(entry.label or "") if entry.listed else label,
            split=entry.split if entry.listed else split, identity=_file_identity(entry.path),
            load=loader(entry.path), extra=(("source", absolute),), error=entry.error))
    return tasks


def generator_tasks(args: argparse.Namespace) -> list[IngestTask]:
    """Megapixel MNIST: n_train images from MNIST-train digits, n_test from MNIST-test digits."""
    from pipeline import megapixel_mnist as mm

    config = mm.MegapixelMNISTConfig(size=args.size, n_digits=args.n_digits, n_noise=args.n_noise, seed=args.seed,
                                     n_classes=args.n_classes)
    banks: dict[str, mm.DigitBank] = {}
    if args.n_train:
        banks["train"] = mm.load_bank("train")  # fetched once into GATS_CACHE, shared by every worker
    if args.n_test:
        banks["test"] = mm.load_bank("test")

    def loader(split: str, index: int) -> Callable[[], Loaded]:
        def load() -> Loaded:
            sample = mm.make_image(banks[split], split, index, config)
            boxes = (("digits_yxhw_digit", [list(b) for b in sample.digits]),
                     ("noise_yxhw", [list(b[:4]) for b in sample.noise]))
            return Loaded(da.from_array(sample.image, chunks=(1, args.chunk, args.chunk)), 0, None, boxes)
        return load

    recipe = (f"megapixel-mnist:seed={config.seed}:size={config.size}:n_digits={config.n_digits}:"
              f"n_noise={config.n_noise}" + (f":n_classes={config.n_classes}" if config.n_classes != 10 else ""))
    tasks = []
    for split, n in (("train", args.n_train), ("test", args.n_test)):
        for index in range(n):
            sample_label = mm.label_for(config, split, index)
            tasks.append(IngestTask(
                image_id=mm.image_id(split, index), source=f"{recipe}:split={split}:index={index}",
                label=sample_label, split=split, identity=f"{recipe}:split={split}:index={index}",
                load=loader(split, index), extra=(("source", f"{recipe}:split={split}:index={index}"),)))
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
        downsamples=info.downsamples, mpp=info.mpp, checksum=info.checksum, status="complete")


def ingest_one(root: str, task: IngestTask, opts: WriteOptions) -> Outcome:
    """Write one pyramid (or keep a complete one from the same source); never raises for a bad image."""
    uri = Storage(root).uri(image_key(task.image_id))
    try:
        if task.error is not None:
            raise task.error
        if not opts.force and pyramid.is_complete(root, task.image_id):
            if _stored_gats(root, task.image_id).get("extra", {}).get("identity") == task.identity:
                return Outcome(_row(task, uri, pyramid.open_pyramid(root, task.image_id).info), skipped=True)
            log.info("%s: the stored pyramid came from another source; rewriting it", task.image_id)
        loaded = task.load()
        _, height, width = loaded.image.shape
        if height < opts.patch_size or width < opts.patch_size:
            raise ImageTooSmallError(
                f"{task.source!r} is {height}x{width} px, smaller than one {opts.patch_size}x{opts.patch_size} patch. "
                "Drop it from the sources, or lower --patch-size to the patch size training will use.")
        extra = {**dict(task.extra), **dict(loaded.extra), "identity": task.identity}
        info = pyramid.write_pyramid(
            root, task.image_id, loaded.image, chunk=opts.chunk, downsample=opts.downsample, min_size=opts.min_size,
            max_levels=opts.max_levels, fill_value=loaded.fill, mpp=loaded.mpp, extra_attrs=extra, shards=opts.shards)
        return Outcome(_row(task, info.uri, info), skipped=False)
    except Exception as exc:  # one bad image must not stop the others; the row says why
        kind = type(exc).__name__
        message = str(exc) if isinstance(exc, PipelineError) else f"{exc} (while reading or writing {task.source!r})"
        log.warning("%s failed: %s: %s", task.image_id, kind, message)
        return Outcome(manifest.ManifestRow(image_id=task.image_id, uri=uri, source=task.source, label=task.label or "",
                                            split=task.split, status="failed", error=f"{kind}: {message}"),
                       skipped=False)


def run_ingest(root: str, tasks: Sequence[IngestTask], classes: Sequence[str], opts: WriteOptions, *,
               workers: int, progress: bool = True) -> list[Outcome]:
    """Ingest every task with `workers` images in flight, then write the manifest (always); outcomes in task order."""
    from tqdm import tqdm

    outcomes: dict[int, Outcome] = {}
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ingest") as pool, \
            tqdm(total=len(tasks), desc="ingest", unit="image", disable=not progress) as bar:
        futures = {pool.submit(ingest_one, root, task, opts): i for i, task in enumerate(tasks)}
        for future in as_completed(futures):
            outcome = future.result()
            outcomes[futures[future]] = outcome
            bar.update(1)
            bar.set_postfix(failed=sum(o.row.status == "failed" for o in outcomes.values()), refresh=False)
    ordered = [outcomes[i] for i in range(len(tasks))]
    manifest.write_manifest(root, [o.row for o in ordered], classes)
    return ordered


def summarize(root: str, outcomes: Sequence[Outcome]) -> str:
    failed = [o.row for o in outcomes if o.row.status == "failed"]
    skipped = sum(o.skipped for o in outcomes)
    lines = [f"{len(outcomes) - len(failed)}/{len(outcomes)} images complete in {root} ({skipped} already complete, "
             f"skipped); manifest: {Storage(root).uri(manifest.MANIFEST_KEY)}"]
    if failed:
        lines.append(f"{len(failed)} failed:")
        lines += [f"  {row.image_id} ({row.source}): {row.error}" for row in failed]
    return "\n".join(lines)


# --- command line ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="*", metavar="SOURCE", help="image files, folders, or CSVs path,label[,split]")
    p.add_argument("--out", help="ROOT: a folder or s3://bucket/prefix (endpoint from AWS_ENDPOINT_URL)")
    p.add_argument("--generate", choices=GENERATORS, help="generate a dataset instead of reading SOURCEs")
    p.add_argument("--n-train", type=int, default=0, help="generated training images (MNIST-train digits)")
    p.add_argument("--n-test", type=int, default=0, help="generated test images (MNIST-test digits)")
    p.add_argument("--size", type=int, default=1500, help="generated canvas side in pixels")
    p.add_argument("--n-digits", type=int, default=5, help="digits per generated image (a strict majority is the label)")
    p.add_argument("--n-noise", type=int, default=50, help="digit-sized line-noise patterns per generated image")
    p.add_argument("--n-classes", type=int, default=10,
                   help="generated labels and digits from classes 0..K-1 only (10: every digit, the paper)")
    p.add_argument("--seed", type=int, default=0, help="generator seed")
    p.add_argument("--label", default="unlabeled", help="label of SOURCE files/folders (CSV rows carry their own)")
    p.add_argument("--split", default="train", choices=("train", "val", "test"), help="split of SOURCE files/folders")
    p.add_argument("--chunk", type=int, default=256, help="zarr chunk side in pixels")
    p.add_argument("--shards", type=int, default=None, help="zarr shard side in pixels (a multiple of --chunk)")
    p.add_argument("--downsample", type=int, default=2, help="factor between pyramid levels")
    p.add_argument("--min-size", type=int, default=256,
                   help="low-res budget: add levels until both sides are <= this many pixels")
    p.add_argument("--max-levels", type=int, default=None, help="at most this many levels")
    p.add_argument("--fill", type=int, default=None,
                   help="value outside the image and under transparency (default: the slide's background, else 0)")
    p.add_argument("--patch-size", type=int, default=32, help="images smaller than one patch fail")
    p.add_argument("--force", action="store_true", help="rewrite complete images too")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="images written concurrently")
    p.add_argument("--fetch-samples", action="store_true",
                   help="fetch the real sample images into GATS_CACHE and print their paths (with --out: ingest them)")
    p.add_argument("--smoke-test", action="store_true", help="tiny end-to-end ingest in a temporary folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def smoke_test(workers: int) -> int:
    """Ingest a small RGBA PNG, an .npy and three tiny generated images; check pixels and manifest; 0 when fine."""
    from PIL import Image

    with tempfile.TemporaryDirectory(prefix="gats-ingest-smoke-") as tmp:
        rng = np.random.default_rng(0)
        rgba = rng.integers(0, 256, (70, 90, 4), dtype=np.uint8)
        rgba[..., 3] = 255
        Image.fromarray(rgba, "RGBA").save(f"{tmp}/rgba.png")
        gray = rng.integers(0, 65536, (300, 260), dtype=np.uint16)
        np.save(f"{tmp}/gray.npy", gray)
        root = f"{tmp}/root"
        opts = WriteOptions(chunk=64, min_size=32)
        outcomes = run_ingest(root, source_tasks([f"{tmp}/rgba.png", f"{tmp}/gray.npy"], label="x", split="train",
                                                 fill=None), ["x"], opts, workers=workers, progress=False)
        gen = build_parser().parse_args(["--generate", "megapixel-mnist", "--n-train", "2", "--n-test", "1",
                                         "--size", "200", "--n-noise", "5", "--chunk", "64"])
        outcomes += run_ingest(f"{tmp}/mnist", generator_tasks(gen), [str(d) for d in range(10)], opts,
                               workers=workers, progress=False)
        ok = all(o.row.status == "complete" for o in outcomes)
        ok &= np.array_equal(np.asarray(pyramid.open_pyramid(root, "rgba").arrays[0][:]), rgba[..., :3].transpose(2, 0, 1))
        ok &= np.array_equal(np.asarray(pyramid.open_pyramid(root, "gray").arrays[0][:]), gray[None])
        ok &= [r.image_id for r in manifest.read_manifest(root)[0]] == ["rgba", "gray"]
    print("smoke test passed" if ok else "smoke test FAILED")
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.workers < 1:
        parser.error(f"Expected --workers >= 1. Got {args.workers}.")
    dask.config.set(scheduler="threads", num_workers=max(1, (os.cpu_count() or 1) // args.workers))
    if args.smoke_test:
        return smoke_test(args.workers)
    sources = list(args.sources)
    if args.fetch_samples:
        from pipeline.datasets import fetch_samples

        paths = [str(p) for p in fetch_samples().values()]
        print("\n".join(paths))
        if not args.out:
            return 0
        sources += paths
    if not args.out:
        parser.error("--out ROOT is required (a folder or s3://bucket/prefix).")
    if args.generate and sources:
        parser.error("Give either SOURCEs or --generate, not both: ingest them into separate ROOTs.")
    if not args.generate and not sources:
        parser.error("Nothing to ingest: give SOURCE files/folders/CSVs or --generate megapixel-mnist.")
    try:
        opts = WriteOptions(chunk=args.chunk, downsample=args.downsample, min_size=args.min_size,
                            max_levels=args.max_levels, shards=args.shards, patch_size=args.patch_size,
                            force=args.force)
        if args.generate:
            if args.n_train < 0 or args.n_test < 0 or args.n_train + args.n_test == 0:
                parser.error("Expected --n-train and/or --n-test > 0 with --generate.")
            tasks, classes = generator_tasks(args), [str(d) for d in range(args.n_classes)]
        else:
            tasks = source_tasks(sources, label=args.label, split=args.split, fill=args.fill)
            classes = sorted({t.label for t in tasks if t.error is None and t.label})
    except (PipelineError, ValueError) as exc:
        print(f"ingest: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    log.info("ingesting %d images into %s with %d workers", len(tasks), args.out, args.workers)
    outcomes = run_ingest(args.out, tasks, classes, opts, workers=args.workers, progress=not args.no_progress)
    print(summarize(args.out, outcomes))
    return 0 if all(o.row.status == "complete" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
