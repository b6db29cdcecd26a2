"""pipeline: source images to OME-Zarr pyramids on a folder or S3, a Parquet manifest, and patch reads.

Owns all I/O (zarr, dask, fsspec, object storage). Must not import `ats_model`.
"""
