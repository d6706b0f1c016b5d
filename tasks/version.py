"""The installed tilewise version (recorded in every group's provenance)."""

from functools import lru_cache


@lru_cache(maxsize=1)
def tilewise_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tilewise")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"
