"""ats_model: attention sampling in pure PyTorch (no ray, zarr or mlflow imports).

The contracts with whatever feeds the model (`contracts`: pixels as float32 in [0, 1], the patch reader, the
attention and feature nets), sampling (`sampling`), the unbiased estimator and its gradient (`estimator`), the
coordinate map from the low-resolution attention grid to level-0 boxes (`geometry`), networks (`nets`), the ATS
model (`ats`) and the baselines (`baselines`).
"""
