"""Figures of the Megapixel MNIST runs (issue 16) from the MLflow store: time to accuracy and the attention strip.

    PYTHONPATH=. .venv/bin/python benchmarks/mnist_figures.py --experiment megapixel-mnist \\
        --strip-run ats10-s0 --epochs 1,3,6,10 --out docs/img

Reads what jobs/train.py logged, nothing else:
- `mnist_time_to_accuracy.png`: test error against training minutes (the per-epoch `test_error` against
  `elapsed_train_s`, the time budget's clock, which leaves out the evaluations), one line per run, the paper's Figure
  2b axes; and a Markdown table (printed and written beside it) with each run's test error at 15, 30, 60 and 120
  minutes (the last epoch that ended before) and its best.
- `mnist_attention_strip.png`: the paper's Figure 3, for the run named by `--strip-run` (a run name): the view of
  fixed test images, then their attention after each of `--epochs` (the `attention/epoch_<k>/<image>.npy` artifacts),
  with the label digits outlined in red and the other digits in cyan (the boxes the generator recorded).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MARKS_MIN = (15, 30, 60, 120)


def runs_of(client, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"No MLflow experiment {experiment!r} in this store: pass --experiment as jobs/train.py had "
                         "it (runtime.experiment).")
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def curve(client, run_id: str) -> list[tuple[float, float]]:
    """(training minutes, test error) per epoch."""
    err = {m.step: m.value for m in client.get_metric_history(run_id, "test_error")}
    elapsed = {m.step: m.value for m in client.get_metric_history(run_id, "elapsed_train_s")}
    return [(elapsed[s] / 60, err[s]) for s in sorted(err) if s in elapsed]


def table(named: dict[str, list[tuple[float, float]]]) -> str:
    head = "| run | epochs | " + " | ".join(f"test error at {m} min" for m in MARKS_MIN) + " | best (at min) |"
    rows = [head, "|" + "---|" * (len(MARKS_MIN) + 3)]
    for name, points in named.items():
        cells = []
        for mark in MARKS_MIN:
            before = [e for t, e in points if t <= mark]
            cells.append(f"{before[-1]:.3f}" if before and points[-1][0] >= mark * 0.98 else "-")
        t_best, best = min(points, key=lambda p: p[1]) if points else (0, float("nan"))
        rows.append(f"| {name} | {len(points)} | " + " | ".join(cells) + f" | {best:.3f} ({t_best:.0f}) |")
    return "\n".join(rows)


def plot_curves(named: dict[str, list[tuple[float, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4), dpi=110)
    for name, points in named.items():
        if points:
            t, e = zip(*points)
            ax.plot(t, e, marker="o", markersize=3, label=name)
    ax.axhline(0.9, color="grey", linestyle=":", linewidth=1, label="chance (0.9)")
    ax.set_xlabel("training time (minutes, this 2-core CPU)")
    ax.set_ylabel("test error")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Megapixel MNIST, 1500 px: test error against training time", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_strip(client, run, epochs: list[int], n_images: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pipeline.reader import PatchReader
    from training.config import from_dict
    import yaml

    cfg = from_dict(yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml")).read_text()))
    reader = PatchReader(cfg.data.root)
    listed = client.list_artifacts(run.info.run_id, f"attention/epoch_{epochs[0]}")
    ids = sorted(Path(a.path).stem for a in listed if a.path.endswith(".npy"))[:n_images]
    fig, axes = plt.subplots(len(ids), len(epochs) + 1, figsize=(2.1 * (len(epochs) + 1), 2.2 * len(ids)), dpi=110,
                             squeeze=False)
    for row, image_id in enumerate(ids):
        info = reader.info(image_id)
        level = reader.level_for_scale(image_id, cfg.data.low_scale)
        view = reader.low_res(image_id, level)[0].astype(np.float32)  # (h, w)
        fy, fx = info.downsamples[level]
        counts = Counter(o[4] for o in info.objects)  # the label is the digit a strict majority of them show
        label = str(counts.most_common(1)[0][0]) if counts else ""
        panels = [("view", view, "gray")]
        for epoch in epochs:
            local = client.download_artifacts(run.info.run_id, f"attention/epoch_{epoch}/{image_id}.npy")
            panels.append((f"epoch {epoch}", np.load(local), "inferno"))
        for col, (title, data, cmap) in enumerate(panels):
            ax = axes[row, col]
            h, w = view.shape
            ax.imshow(data, cmap=cmap, extent=(0, w, h, 0), interpolation="nearest")
            for y0, x0, bh, bw, digit in info.objects:
                ax.add_patch(plt.Rectangle((x0 / fx, y0 / fy), bw / fx, bh / fy, fill=False, linewidth=0.7,
                                           edgecolor="red" if str(digit) == label else "cyan"))
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=9)
    fig.suptitle(f"{run.data.tags.get('mlflow.runName', run.info.run_id)}: attention on fixed test images (red: the "
                 "label's digits, cyan: the others)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracking-uri", default="", help="default: $MLFLOW_TRACKING_URI, else the project's store")
    p.add_argument("--experiment", default="megapixel-mnist")
    p.add_argument("--runs", default="", help="comma-separated run names to plot (default: every finished or "
                                               "running run of the experiment)")
    p.add_argument("--strip-run", default="", help="the run name whose attention strip to draw")
    p.add_argument("--epochs", default="1,3,6,10")
    p.add_argument("--n-images", type=int, default=3)
    p.add_argument("--out", default="docs/img")
    args = p.parse_args(argv)

    from mlflow.tracking import MlflowClient
    from training.tracking import default_tracking_uri

    client = MlflowClient(args.tracking_uri or default_tracking_uri())
    runs = runs_of(client, args.experiment)
    wanted = [r for r in args.runs.split(",") if r]
    by_name = {r.data.tags.get("mlflow.runName", r.info.run_id): r for r in runs}
    chosen = {n: by_name[n] for n in (wanted or by_name) if n in by_name}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    named = {name: curve(client, run.info.run_id) for name, run in chosen.items()}
    plot_curves(named, out / "mnist_time_to_accuracy.png")
    text = table(named)
    (out / "mnist_time_to_accuracy.md").write_text(text + "\n")
    print(text)
    if args.strip_run:
        plot_strip(client, by_name[args.strip_run], [int(e) for e in args.epochs.split(",")], args.n_images,
                   out / "mnist_attention_strip.png")
    print(f"wrote {out}/mnist_time_to_accuracy.png" + (f" and {out}/mnist_attention_strip.png" if args.strip_run
                                                         else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
