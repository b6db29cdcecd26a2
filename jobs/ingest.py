"""Ingest images into OME-Zarr pyramids plus a Parquet manifest (DESIGN "Public interfaces"): the command line over
pipeline/ingest.py, which holds the logic and the defaults.

    python jobs/ingest.py --out ROOT SOURCE...            files, folders, or a CSV with path,label[,split][,group]
    python jobs/ingest.py --out ROOT --generate megapixel-mnist --n-train N --n-test M [--size 1500] [--seed S]
    python jobs/ingest.py --fetch-samples [--out ROOT]    fetch the real sample images, print their paths
                                                         (with --out: ingest them too)
    python jobs/ingest.py --smoke-test                    a tiny end-to-end ingest in a temporary folder

ROOT is a folder or s3://bucket/prefix. Each image becomes ROOT/images/<image_id>.zarr, marked complete last; a
rerun skips images that are complete AND were written from the same source (same file size and mtime, or the same
generator recipe), redoes everything else (`--force` redoes all). The manifest is written even when some images
fail; the exit status is 0 only when every image is complete, else 1 with a summary naming each failure (2 for
a bad command line or source list). Parallelism is decided here: `--workers` images in flight (threads), and dask
threads inside each image. Progress: a bar on a terminal, else a plain line every ~10% of the images.

Stopping: SIGTERM or SIGINT (Ctrl-C) stops the ingest cleanly: no new images start, writes in flight stop at their
next block (never marked complete), the manifest is written with the rest as failed rows "not finished", the summary
is printed, and the exit status is 128 + the signal (143 for SIGTERM, 130 for SIGINT). A second signal exits at
once. When `--max-storage-failures` images in a row fail because of the storage (the endpoint is gone), ingest
stops the same way with status 1 and a summary naming the endpoint; re-run the same command when it is back.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import dask
import numpy as np

from jobs.progress import Progress
from pipeline import manifest, pyramid
from pipeline.errors import PipelineError, StorageError
from pipeline.ingest import (DEFAULT_LABEL, DEFAULT_SPLIT, MAX_STORAGE_FAILURES, StopRequest, WriteOptions,
                             ingest_generated, ingest_sources)
from pipeline.masks import COMPUTED_METHODS as MASK_METHODS
from pipeline.megapixel_mnist import MegapixelMNISTConfig

log = logging.getLogger("ingest")
GENERATORS = ("megapixel-mnist",)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and each option's default (where it has one) after its help."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.option_strings and action.default is not None and action.default is not False \
                and action.default is not argparse.SUPPRESS:
            return f"{action.help} (default: %(default)s)"
        return action.help


def build_parser() -> argparse.ArgumentParser:
    write, mnist = WriteOptions(), MegapixelMNISTConfig()  # the defaults, defined once in their dataclasses
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("sources", nargs="*", metavar="SOURCE",
                   help="image files, folders, or CSVs path,label[,split][,group][,mpp]")
    p.add_argument("--out", help="ROOT: a folder or s3://bucket/prefix (endpoint from AWS_ENDPOINT_URL)")
    p.add_argument("--generate", choices=GENERATORS, help="generate a dataset instead of reading SOURCEs")
    p.add_argument("--n-train", type=int, default=0, help="generated training images (MNIST-train digits)")
    p.add_argument("--n-test", type=int, default=0, help="generated test images (MNIST-test digits)")
    p.add_argument("--size", type=int, default=mnist.size, help="generated canvas side in pixels")
    p.add_argument("--n-digits", type=int, default=mnist.n_digits,
                   help="digits per generated image (a strict majority is the label)")
    p.add_argument("--n-noise", type=int, default=mnist.n_noise,
                   help="digit-sized line-noise patterns per generated image")
    p.add_argument("--n-classes", type=int, default=mnist.n_classes,
                   help="generated labels and digits from classes 0..K-1 only (10: every digit, the paper)")
    p.add_argument("--seed", type=int, default=mnist.seed, help="generator seed")
    p.add_argument("--label", default=DEFAULT_LABEL, help="label of SOURCE files/folders (CSV rows carry their own)")
    p.add_argument("--split", default=DEFAULT_SPLIT, choices=manifest.SPLITS, help="split of SOURCE files/folders")
    p.add_argument("--chunk", type=int, default=write.chunk, help="zarr chunk side in pixels")
    p.add_argument("--shards", type=int, default=write.shards,
                   help="zarr shard side in pixels (a multiple of --chunk)")
    p.add_argument("--downsample", type=int, default=write.downsample, help="factor between pyramid levels")
    p.add_argument("--min-size", type=int, default=write.min_size,
                   help="low-res budget: add levels until both sides are <= this many pixels")
    p.add_argument("--max-levels", type=int, default=write.max_levels, help="at most this many levels")
    p.add_argument("--fill", type=int, default=write.fill,
                   help="value outside the image and under transparency (default: the slide's background, else 0)")
    p.add_argument("--patch-size", type=int, default=write.patch_size, help="images smaller than one patch fail")
    p.add_argument("--force", action="store_true", default=write.force, help="rewrite complete images too")
    p.add_argument("--mask", choices=MASK_METHODS, default=write.mask,
                   help="store a foreground mask (OME-NGFF label 'tissue'): 'tissue' for H&E slides (Otsu on "
                        "saturation), 'nodata' for rasters (with --nodata), 'alpha' from the last band")
    p.add_argument("--nodata", type=float, default=write.nodata,
                   help="the rasters' nodata value, for --mask nodata (default: each GeoTIFF's GDAL_NODATA)")
    p.add_argument("--mask-dir", default=write.mask_dir,
                   help="a folder of your own masks, <source stem>.png or .tif (non-zero = foreground)")
    p.add_argument("--mpp", type=float, default=write.mpp,
                   help="micrometres per pixel of the images whose file records none (0.25 at 40x, 0.5 at 20x; "
                        "1e7 for 10 m); a CSV's mpp column sets it per image. Training by um/px needs it")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="images written concurrently")
    p.add_argument("--max-storage-failures", type=int, default=MAX_STORAGE_FAILURES,
                   help="stop after this many images in a row failed because of the storage (endpoint gone)")
    p.add_argument("--fetch-samples", action="store_true",
                   help="fetch the real sample images into GATS_CACHE and print their paths (with --out: ingest them)")
    p.add_argument("--smoke-test", action="store_true", help="tiny end-to-end ingest in a temporary folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
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
        options = WriteOptions(chunk=64, min_size=32)
        files = ingest_sources(root, [f"{tmp}/rgba.png", f"{tmp}/gray.npy"], label="x", options=options,
                               workers=workers)
        mnist = ingest_generated(f"{tmp}/mnist", MegapixelMNISTConfig(size=200, n_noise=5), n_train=2, n_test=1,
                                 options=options, workers=workers)
        ok = files.complete and mnist.complete
        level0 = {i: np.asarray(pyramid.open_pyramid(root, i).arrays[0][:]) for i in ("rgba", "gray")}  # (C, H, W)
        ok &= np.array_equal(level0["rgba"], rgba[..., :3].transpose(2, 0, 1))
        ok &= np.array_equal(level0["gray"], gray[None])
        ok &= [r.image_id for r in manifest.read_manifest(root)[0]] == ["rgba", "gray"]
    print("smoke test passed" if ok else "smoke test FAILED")
    return 0 if ok else 1


@contextmanager
def stop_on_signals(stop: StopRequest) -> Iterator[list[int]]:
    """While inside: SIGTERM and SIGINT request a clean stop (`stop.request("interrupted by SIGTERM")`), a second one
    exits at once with 128 + its number. Yields the list of signals received; the old handlers come back after.

    The handler does no I/O (it may interrupt a print of the main thread); run_ingest logs the stop when it sees it.
    Outside the main thread (signals cannot be handled there) nothing is installed.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum: int, frame: object) -> None:
        received.append(signum)
        if stop.is_set():  # the second: the user means it; every pyramid is complete or unmarked, never half-marked
            os.write(2, f"\ningest: second {signal.Signals(signum).name} while stopping: exiting now; re-run the "
                        "same command to finish\n".encode())
            os._exit(128 + signum)
        stop.request(f"interrupted by {signal.Signals(signum).name}")

    old = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield received
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.workers < 1:
        parser.error(f"Expected --workers >= 1. Got {args.workers}.")
    if args.max_storage_failures < 1:
        parser.error(f"Expected --max-storage-failures >= 1. Got {args.max_storage_failures}: the default is "
                     f"{MAX_STORAGE_FAILURES}.")
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
    if args.generate and (args.n_train < 0 or args.n_test < 0 or args.n_train + args.n_test == 0):
        parser.error("Expected --n-train and/or --n-test > 0 with --generate.")

    progress = Progress(enabled=not args.no_progress)

    def on_start(n_images: int) -> None:
        log.info("ingesting %d images into %s with %d workers", n_images, args.out, args.workers)
        progress.start(n_images)

    stop = StopRequest()
    common = {"workers": args.workers, "max_storage_failures": args.max_storage_failures, "stop": stop,
              "on_start": on_start, "on_image": progress.update}
    try:
        with stop_on_signals(stop) as received, progress:
            options = WriteOptions(chunk=args.chunk, downsample=args.downsample, min_size=args.min_size,
                                   max_levels=args.max_levels, shards=args.shards, patch_size=args.patch_size,
                                   fill=args.fill, force=args.force, mask=args.mask, nodata=args.nodata,
                                   mask_dir=args.mask_dir, mpp=args.mpp)
            if args.generate:
                config = MegapixelMNISTConfig(size=args.size, n_digits=args.n_digits, n_noise=args.n_noise,
                                              seed=args.seed, n_classes=args.n_classes)
                report = ingest_generated(args.out, config, n_train=args.n_train, n_test=args.n_test,
                                          options=options, **common)
            else:
                report = ingest_sources(args.out, sources, label=args.label, split=args.split, options=options,
                                        **common)
    except StorageError as exc:  # ROOT could not be read or written outside any one image: not a command-line error
        print(f"ingest: error: {exc}", file=sys.stderr)
        return 1
    except (PipelineError, ValueError) as exc:  # bad options or source list, raised before anything is written
        print(f"ingest: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(report.summary(), flush=True)
    if received:
        return 128 + received[0]  # the shell's convention for "ended by this signal": 143 SIGTERM, 130 SIGINT
    return 0 if report.complete and report.manifest_error is None else 1


if __name__ == "__main__":
    sys.exit(main())
