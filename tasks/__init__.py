"""The work of tilewise as plain functions (no Prefect imports here; flows/ wraps them)."""

from tasks import codecs as _codecs  # noqa: F401  (the Zarr codec pipeline, set once per process)
