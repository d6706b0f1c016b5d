"""Which codec pipeline encodes and decodes Zarr chunks in this process.

zarr-python's own pipeline runs every codec in Python threads behind one event loop; the Rust
``zarrs`` pipeline (``zarrs.ZarrsCodecPipeline``, a drop-in ``zarr.config`` setting) encodes and
decodes the same codecs into the same bytes, chunks in parallel and without the GIL. Measured here
(``benchmarks/engine_io.py``): the engine 25-35 % faster, a plain read + write about 2x. Stores
it writes are ordinary Zarr v3 (the round trip through zarr-python's own pipeline, ome-zarr and
the codecs asked for are tested in ``tests/test_codecs.py``).

``TILEWISE_ZARR_PIPELINE``: ``zarrs`` (default, when the package is installed) or ``zarr-python``.
Stores zarrs cannot open (fsspec's S3) fall back to zarr-python's pipeline by themselves.

Nothing is imported here (the CLI starts without zarr): the choice goes into zarr's own
environment variable, which zarr reads when it is first imported, here and in every process this
one starts (Dask workers, benchmark workers); if zarr is loaded already, its config is set too.
"""

from __future__ import annotations

import importlib.util
import os
import sys

ZARRS = "zarrs.ZarrsCodecPipeline"
ZARR_PYTHON = "zarr.core.codec_pipeline.BatchedCodecPipeline"
ENV = "ZARR_CODEC_PIPELINE__PATH"  # zarr.config's codec_pipeline.path, from the environment


def configure() -> str:
    """Choose the process's codec pipeline from ``TILEWISE_ZARR_PIPELINE``; returns "zarrs" or
    "zarr-python". Without it, an explicit ``ZARR_CODEC_PIPELINE__PATH`` is left as it is."""
    explicit = os.environ.get("TILEWISE_ZARR_PIPELINE")
    wanted = (explicit or "zarrs").strip().lower()
    if wanted == "zarrs" and importlib.util.find_spec("zarrs") is None:
        wanted = "zarr-python"
    chosen = ZARRS if wanted == "zarrs" else ZARR_PYTHON
    if explicit:
        os.environ[ENV] = chosen
    path = os.environ.setdefault(ENV, chosen)
    if "zarr" in sys.modules:  # imported before tilewise: its config was read already
        sys.modules["zarr"].config.set({"codec_pipeline.path": path})
    return "zarrs" if path == ZARRS else "zarr-python"


PIPELINE = configure()
