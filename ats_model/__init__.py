"""ats_model: attention sampling in pure PyTorch (no ray, zarr or mlflow imports).

Sampling (`sampling`), the unbiased estimator and its gradient (`estimator`), the coordinate map from the
low-resolution attention grid to level-0 boxes (`geometry`), networks (`nets`), the ATS model (`ats`) and the
baselines (`baselines`).
"""
