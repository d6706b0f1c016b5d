"""Which codec pipeline encodes and decodes Zarr chunks in this process.

zarr-python's own pipeline runs every codec in Python threads behind one event loop; the Rust
``zarrs`` pipeline (``zarrs.ZarrsCodecPipeline``, a drop-in ``zarr.config`` setting) encodes and
decodes the same codecs into the same bytes, chunks in parallel and without the GIL. Measured here
(``benchmarks/engine_io.py``): the engine 25-35 % faster, a plain read + write about 2x. Stores
it writes are ordinary Zarr v3 (the round trip through zarr-python's own pipeline, ome-zarr and
the codecs asked for are tested in ``tests/test_codecs.py``).

``TILEWISE_ZARR_PIPELINE``: ``zarrs`` (default, when the package is installed) or ``zarr-python``.
Stores zarrs cannot open (fsspec's S3) fall back to zarr-python's pipeline by themselves.
"""

from __future__ import annotations

import os

ZARRS = "zarrs.ZarrsCodecPipeline"


def configure() -> str:
    """Set the process's codec pipeline from ``TILEWISE_ZARR_PIPELINE``; returns the one in use."""
    import zarr

    wanted = os.environ.get("TILEWISE_ZARR_PIPELINE", "zarrs").strip().lower()
    if wanted == "zarrs":
        try:
            import zarrs  # noqa: F401
        except ImportError:
            wanted = "zarr-python"
        else:
            zarr.config.set({"codec_pipeline.path": ZARRS})
            return "zarrs"
    zarr.config.set({"codec_pipeline.path": "zarr.core.codec_pipeline.BatchedCodecPipeline"})
    return "zarr-python"


PIPELINE = configure()
