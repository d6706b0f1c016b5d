"""One lock for every figure tilewise draws.

matplotlib is not thread-safe, even through the object-oriented ``Figure`` API: its text layout
(mathtext's pyparsing grammar, the font cache) is shared module state. Prefect runs tasks in
threads, and two evaluations drawing at once failed with ``ParseException`` in tick labels. So
every function that draws is decorated with :func:`serialised`: figures are drawn one at a time,
while the rest of the work (reading, metrics) stays concurrent.
"""

from __future__ import annotations

import functools
import threading

_LOCK = threading.RLock()


def serialised(draw):
    """Run ``draw`` while holding the process-wide drawing lock."""

    @functools.wraps(draw)
    def locked(*args, **kwargs):
        with _LOCK:
            return draw(*args, **kwargs)

    return locked
