"""Megapixel MNIST datasets the benchmarks generate with jobs/ingest.py (imported by the scripts in this folder)."""
from __future__ import annotations

from pathlib import Path


def ingest_mnist(root: str, n_train: int, n_test: int, *, size: int, n_digits: int, n_noise: int, min_size: int,
                 chunk: int = 256, progress: bool = False) -> str:
    """Generate and ingest `n_train` + `n_test` Megapixel MNIST images of `size` px into ROOT; returns ROOT."""
    from jobs import ingest

    rc = ingest.main(["--out", root, "--generate", "megapixel-mnist", "--n-train", str(n_train),
                      "--n-test", str(n_test), "--size", str(size), "--n-digits", str(n_digits),
                      "--n-noise", str(n_noise), "--chunk", str(chunk), "--min-size", str(min_size),
                      "--workers", "2"] + ([] if progress else ["--no-progress"]))
    if rc != 0:
        raise RuntimeError(f"jobs/ingest.py exited with {rc} while generating the dataset in {root}.")
    return root


def tiny_mnist(folder: str | Path, n_train: int, n_test: int) -> str:
    """The smoke versions' dataset: 192 px images (3 digits, 4 noise patterns) in FOLDER/mnist; returns ROOT."""
    return ingest_mnist(str(Path(folder) / "mnist"), n_train, n_test, size=192, n_digits=3, n_noise=4, min_size=24,
                        chunk=64)
