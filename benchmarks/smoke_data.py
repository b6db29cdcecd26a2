"""The tiny dataset the benchmarks' smoke versions train on (imported by the scripts in this folder)."""
from __future__ import annotations

from pathlib import Path


def tiny_mnist(folder: str | Path, n_train: int, n_test: int) -> str:
    """Generate and ingest `n_train` + `n_test` Megapixel MNIST images of 192 px (3 digits, 4 noise patterns) into
    FOLDER/mnist with jobs/ingest.py; returns the dataset ROOT."""
    from jobs import ingest

    root = str(Path(folder) / "mnist")
    rc = ingest.main(["--out", root, "--generate", "megapixel-mnist", "--n-train", str(n_train),
                      "--n-test", str(n_test), "--size", "192", "--n-digits", "3", "--n-noise", "4", "--chunk", "64",
                      "--min-size", "24", "--no-progress", "--workers", "2"])
    if rc != 0:
        raise RuntimeError(f"jobs/ingest.py exited with {rc} while generating the smoke dataset in {root}.")
    return root
