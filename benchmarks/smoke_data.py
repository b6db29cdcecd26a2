"""Megapixel MNIST datasets the benchmarks generate with pipeline.ingest (imported by the scripts in this folder)."""
from __future__ import annotations

from pathlib import Path


def ingest_mnist(root: str, n_train: int, n_test: int, *, size: int, n_digits: int, n_noise: int, min_size: int,
                 chunk: int | None = None, progress: bool = False) -> str:
    """Generate and ingest `n_train` + `n_test` Megapixel MNIST images of `size` px into ROOT; returns ROOT.
    `chunk` None: WriteOptions' default."""
    from jobs.progress import Progress
    from pipeline.ingest import WriteOptions, ingest_generated
    from pipeline.megapixel_mnist import MegapixelMNISTConfig

    config = MegapixelMNISTConfig(size=size, n_digits=n_digits, n_noise=n_noise)
    options = WriteOptions(min_size=min_size) if chunk is None else WriteOptions(chunk=chunk, min_size=min_size)
    with Progress(enabled=progress) as bar:
        report = ingest_generated(root, config, n_train=n_train, n_test=n_test,
                                  options=options, workers=2, on_start=bar.start, on_image=bar.update)
    print(report.summary(), flush=True)
    if not report.complete:
        raise RuntimeError(f"Ingest left failed images while generating the dataset in {root}:\n{report.summary()}")
    return root


def tiny_mnist(folder: str | Path, n_train: int, n_test: int) -> str:
    """The smoke versions' dataset: 192 px images (3 digits, 4 noise patterns) in FOLDER/mnist; returns ROOT."""
    return ingest_mnist(str(Path(folder) / "mnist"), n_train, n_test, size=192, n_digits=3, n_noise=4, min_size=24,
                        chunk=64)
