"""Verify an ingested dataset: re-read every stored chunk, check its crc32c and each image's level-0 checksum.

    python jobs/verify.py ROOT [--images ID ...] [--workers N] [--repair]

ROOT is a folder or s3://bucket/prefix made by jobs/ingest.py. Prints one line per damaged image (which level and
chunk, and why) and a summary; exit status 0 when every complete image verified, 1 when some are damaged or missing,
2 for a bad command line or a ROOT without a manifest. `--repair` removes the damaged pyramids and marks their
manifest rows failed, so training never reads them and the next `jobs/ingest.py` run with the same sources
rewrites exactly those. The work is done by pipeline/verify.py; this file only parses and prints.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from jobs.progress import Progress
from pipeline.errors import PipelineError
from pipeline.verify import repair, verify_root


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", metavar="ROOT", help="a folder or s3://bucket/prefix made by jobs/ingest.py")
    p.add_argument("--images", nargs="+", metavar="ID", help="verify only these image ids")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="images verified concurrently")
    p.add_argument("--repair", action="store_true",
                   help="remove damaged pyramids and mark them failed in the manifest (then re-run ingest)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.workers < 1:
        parser.error(f"Expected --workers >= 1. Got {args.workers}.")
    progress = Progress("verify", failed=lambda check: not check.ok, enabled=not args.no_progress)
    try:
        with progress:
            report = verify_root(args.root, image_ids=args.images, workers=args.workers, on_start=progress.start,
                                 on_image=progress.update)
    except (PipelineError, ValueError) as exc:
        print(f"verify: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    if args.repair and report.damaged:
        removed = repair(args.root, report)
        print(f"repaired: removed {len(removed)} damaged pyramids ({', '.join(removed[:5])}"
              f"{', ...' if len(removed) > 5 else ''}) and marked them failed in the manifest; re-run jobs/ingest.py "
              "with the same sources to rewrite them")
    return 1 if report.damaged else 0


if __name__ == "__main__":
    sys.exit(main())
