"""Predict with a trained model: class probabilities per image, plus where the model looked, for QuPath and napari.

    python jobs/predict.py --model RUN_ID|CHECKPOINT_DIR --data ROOT [--split test|all] --out DIR [--mode topk]
    python jobs/predict.py --model RUN_ID|CHECKPOINT_DIR --images FILE|FOLDER|CSV... --out DIR

--model is a checkpoint folder written by jobs/train.py when such a folder exists, else an MLflow run id (its logged
`model/`; --tracking-uri, default $MLFLOW_TRACKING_URI or the project store). --images are ingested first into
DIR/pyramids (OME-Zarr, as jobs/ingest.py does); their label is null unless a CSV `path,label` gives one.

DIR receives, each file written under a temporary name and renamed when complete:
  predictions.parquet          image_id, source, predicted, prob_<class> per class, label, mode, model
  geojson/<image_id>.geojson   the top-K attention boxes (the patches read in topk mode) and contours holding 50% and
                               90% of the attention, in level-0 pixels (QuPath: File > Import objects)
  heatmaps/<image_id>.png      the low-res view with the attention overlaid, predicted class in the title
  heatmaps/<image_id>.zarr     the attention as an OME-NGFF 0.5 image placed exactly over the slide (napari)
Models: ats and uniform fully (cost: the low-res view plus N patch reads per image, never the whole slide); deepmil
reads its whole patch grid and exports its grid attention; cnn has no attention: predictions only.

Exit status: 0 when every image got a prediction; 1 when some failed (a summary names each, with the reason);
2 for bad input (unknown model, out folder not empty without --force, unknown split, ...), with nothing written.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ats_model.ats import MODES
from jobs.progress import Progress
from pipeline.exports import OutputFolderError
from pipeline.masks import COMPUTED_METHODS as MASK_METHODS
from training import checkpoint
from training import config as C
from training.predict import ImageFailure, PredictInputError, PredictOptions, predict
from training.logs import configure_logging


def build_parser() -> argparse.ArgumentParser:
    d = PredictOptions()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", required=True, metavar="RUN_ID|CHECKPOINT_DIR",
                   help="a checkpoint folder (state.pt, config.yaml, epoch.txt) or an MLflow run id")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="ROOT", help="an ingested ROOT (manifest.parquet), a folder or s3://")
    src.add_argument("--images", nargs="+", metavar="FILE|FOLDER", help="image files, folders or CSVs to ingest "
                     "into DIR/pyramids and predict")
    p.add_argument("--out", required=True, metavar="DIR", help="a new or empty local folder for the outputs")
    p.add_argument("--split", default=d.split, help=f"manifest split of --data, or 'all' (default: {d.split})")
    p.add_argument("--mode", choices=MODES, default=d.mode, help=f"evaluation mode (default: {d.mode})")
    p.add_argument("--top-k", type=int, default=d.top_k,
                   help="attention boxes exported per image (default: the model's n_patches)")
    p.add_argument("--mass", dest="masses", type=float, action="append", metavar="FRACTION",
                   help=f"attention mass of a contour, repeatable (default: {' '.join(map(str, d.masses))})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of --mode sampled (default: {d.seed})")
    p.add_argument("--force", action="store_true", help="write into a non-empty DIR: the outputs of the images "
                   "predicted now replace those there, other files stay")
    p.add_argument("--tracking-uri", help="MLflow store of RUN_ID (default: $MLFLOW_TRACKING_URI, else the project "
                   "store)")
    p.add_argument("--mask", choices=MASK_METHODS, default=d.mask,
                   help="foreground mask for --images (needed by a model trained with data.min_tissue > 0)")
    p.add_argument("--nodata", type=float, default=d.nodata, help="the rasters' nodata value, for --mask nodata")
    p.add_argument("--mpp", type=float, default=d.mpp,
                   help="micrometres per pixel of --images files that record none (a model trained by um/px needs it)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines or bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    ingest_bar = Progress("ingest", enabled=not args.no_progress)
    predict_bar = Progress("predict", failed=lambda r: isinstance(r, ImageFailure), enabled=not args.no_progress)
    try:
        options = PredictOptions(mode=args.mode, top_k=args.top_k, split=args.split, force=args.force,
                                 seed=args.seed, masses=tuple(args.masses or PredictOptions().masses),
                                 mask=args.mask, nodata=args.nodata, mpp=args.mpp)
        report = predict(args.model, args.out, data=args.data, images=args.images or (), options=options,
                         tracking_uri=args.tracking_uri, on_start=predict_bar.start, on_image=predict_bar.update,
                         on_ingest_start=ingest_bar.start, on_ingest_image=ingest_bar.update)
    except (PredictInputError, OutputFolderError, checkpoint.CheckpointError, C.ConfigError) as exc:  # name the fix
        print(f"predict: error: {exc}", file=sys.stderr)
        return 2
    finally:
        ingest_bar.close()
        predict_bar.close()
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
