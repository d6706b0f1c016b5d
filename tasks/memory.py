"""Handing memory freed by streaming code back to the system.

glibc keeps freed blocks in its arenas (one per thread that allocated), and lets an arena's free top
grow to twice its mmap threshold (which rises to 32 MB as large blocks are freed) before it trims:
an ingest's threads -- read-ahead, encoders, hashing, the writer -- each end up holding tens of
megabytes that nothing uses. ``release_free_memory`` (glibc's ``malloc_trim``) returns them; ingest
calls it once per slab, which bounds what a scan of any length keeps.

An earlier fix pinned the mmap threshold at 1 MiB instead, so every large buffer was a fresh
mapping: it kept the resident set low but cost 2.2 million page faults per GiB of EM stack
(8.3 of its 10 s were system time; ingest 1.3-1.8x slower than trimming, measured in
``benchmarks/ingest.py``), and it applied to the whole process, the engine that ran after it
included (the engine measured 1.9x slower with such a pin).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import lru_cache


@lru_cache(maxsize=1)
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """Return the free memory of every glibc arena to the system (``malloc_trim(0)``); False where
    there is no glibc."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
