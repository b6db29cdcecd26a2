"""Evaluate a trained run on a split in one or more modes, and log the result to MLflow.

    python jobs/evaluate.py --checkpoint DIR [--data ROOT] [--split test] [--mode sampled --mode topk --mode exact]
    python jobs/evaluate.py --run-id RUN_ID  [...]               the model and config logged with an MLflow run
    python jobs/evaluate.py --smoke-test --data ROOT              an untrained tiny model on 4 images

Modes (DESIGN "Evaluation"): `sampled` (as trained), `topk` (deterministic, renormalised), `exact` (the expectation
over every position; refused with a message when it exceeds the model's memory budget). Deep MIL and the CNN are
deterministic: every mode gives their one answer. Reads patches in this process through a PatchReader (no Ray).
Logs a new MLflow run (tag `gats.kind=evaluate`, `gats.source_run_id`) with metrics `<split>_<metric>_<mode>` and
`<split>_<metric>` (the first mode) for each metric of training/metrics.py: error, balanced_accuracy, auc,
recall_<class> (and `<metric>_se` with --repeats R > 1 in sampled mode: the mean over R samplings and its standard
error), the confusion matrix of each mode as artifacts `confusion/<split>_<mode>.csv` and `.png`, and prints a
table. The data ROOT defaults to the one the run was trained on; `--split val` is the validation set training used
(a carved one is carved again, the same way).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from typing import Mapping, Sequence

from ats_model.ats import ExactEvaluationTooLargeError
from training import checkpoint, tracking
from training import config as C
from training.evaluation import evaluate_modes, load_from_run
from training.metrics import write_confusion
from training.logs import configure_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="a checkpoint folder written by jobs/train.py (state.pt, config.yaml, "
                     "epoch.txt)")
    src.add_argument("--run-id", help="an MLflow training run (its model and config.yaml)")
    p.add_argument("--data", help="ROOT to evaluate on (default: the run's data.root)")
    p.add_argument("--split", default="test", help="manifest split (default: test)")
    p.add_argument("--mode", dest="modes", action="append", choices=C.ALL_EVAL_MODES,
                   help="evaluation mode (repeatable; default: sampled, topk)")
    p.add_argument("--max-images", type=int, default=0, help="evaluate at most this many images (0: all)")
    p.add_argument("--repeats", type=int, default=0, help="sampled mode: average over this many samplings and log "
                   "each metric's standard error (default: the config's runtime.eval_repeats)")
    p.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else the project store)")
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: the config's)")
    p.add_argument("--smoke-test", action="store_true", help="an untrained tiny model on 4 images of --data")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging()
    tracking_uri = args.tracking_uri or tracking.default_tracking_uri()
    source_run = ""
    if args.smoke_test:
        if not args.data:
            parser.error("--smoke-test needs --data ROOT.")
        from training.data import load_split
        from training.models import build_model

        cfg = C.smoke(C.TrainConfig()).replace(data={"root": args.data})
        examples, classes = load_split(args.data, cfg.data.test_split, 1)
        model = build_model(cfg.model, examples[0].channels, len(classes))
        args.max_images = args.max_images or 4
    elif args.checkpoint:
        try:
            model, ckpt = checkpoint.load_model(args.checkpoint)
        except checkpoint.CheckpointError as exc:
            print(f"evaluate: error: {exc}", file=sys.stderr)
            return 2
        cfg = ckpt.config
    elif args.run_id:
        model, cfg = load_from_run(args.run_id, tracking_uri)
        source_run = args.run_id
    else:
        parser.error("Give --checkpoint DIR or --run-id RUN_ID (or --smoke-test --data ROOT).")
    if args.data:
        cfg = cfg.replace(data={"root": args.data})
    if args.repeats < 0:
        parser.error(f"Expected --repeats >= 1 (0: the config's runtime.eval_repeats). Got {args.repeats}.")
    if args.repeats:
        cfg = cfg.replace(runtime={"eval_repeats": args.repeats})
    modes = args.modes or ["sampled", "topk"]
    try:
        results, classes = evaluate_modes(model, cfg, args.split, modes, args.max_images)
    except ExactEvaluationTooLargeError as exc:  # its message names the fix
        print(f"evaluate: error: {exc}", file=sys.stderr)
        return 2
    metrics = {mode: r.metrics for mode, r in results.items()}

    run = tracking.open_run(
        cfg, tracking_uri, experiment=args.experiment or cfg.runtime.experiment,
        run_name=f"eval-{cfg.model.name}-{args.split}", kind="evaluate", context="evaluation",
        tags={"gats.source_run_id": source_run, "gats.checkpoint": args.checkpoint or ""},
        params={"eval.split": args.split, "eval.modes": ",".join(modes), "eval_mode": modes[0],
                "eval.max_images": args.max_images},
        note=[f"evaluation on `{args.split}`, modes {', '.join(modes)}"
              + (f", at most {args.max_images} images" if args.max_images else "")
              + (f"; trained in run `{source_run}`" if source_run else "")])
    status = "FAILED"
    try:
        run.log_metrics(metric_names(args.split, metrics))
        with tempfile.TemporaryDirectory(prefix="gats-confusion-") as folder:
            for mode, result in results.items():
                for path in write_confusion(folder, f"{args.split}_{mode}", result.confusion, classes):
                    run.log_artifact(path, "confusion")
        status = "FINISHED"
    finally:
        run.finish(status)
    print(table(args.split, metrics))
    print(f"MLflow run {run.run_id}: {tracking.ui_command(tracking_uri)}")
    return 0


def metric_names(split: str, metrics: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """{mode: {metric: v}} -> {"<split>_<metric>_<mode>": v, and "<split>_<metric>": v of the first mode}."""
    first = next(iter(metrics.values()))
    return {**{f"{split}_{k}": v for k, v in first.items()},
            **{f"{split}_{k}_{mode}": v for mode, m in metrics.items() for k, v in m.items()}}


def table(split: str, metrics: Mapping[str, Mapping[str, float]]) -> str:
    """A metric-by-mode table for the terminal: "mean ± se" with repeats, "-" where a mode lacks the metric."""
    modes = list(metrics)
    names = [n for n in dict.fromkeys(k for m in metrics.values() for k in m) if not n.endswith("_se")]
    width = max(len(f"{split} {n}") for n in names)

    def cell(m: Mapping[str, float], name: str) -> str:
        if name not in m:
            return "-"
        return f"{m[name]:.4f}" + (f" ± {m[name + '_se']:.4f}" if name + "_se" in m else "")

    cells = {(mode, n): cell(metrics[mode], n) for mode in modes for n in names}
    widths = {mode: max(len(mode), *(len(cells[mode, n]) for n in names)) for mode in modes}
    lines = [" " * width + "".join(f"  {mode:>{widths[mode]}}" for mode in modes)]
    lines += [f"{split + ' ' + n:<{width}}" + "".join(f"  {cells[mode, n]:>{widths[mode]}}" for mode in modes)
              for n in names]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
