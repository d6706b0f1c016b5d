"""A library's own prints kept out of the user's terminal, for the calling thread only.

pycocotools prints its progress, torch's ONNX exporter its passes, MLflow "Successfully registered
model ...". ``contextlib.redirect_stdout`` silences them by swapping the process-wide
``sys.stdout`` and putting back, on exit, whatever it found on entry. Prefect runs tasks on threads:
two tasks that enter and leave such a block in turn (A enters, B enters, A leaves, B leaves) leave
A's buffer as ``sys.stdout``, and every line printed afterwards -- the nightly's per-scan lines and
its summary -- went into that dead buffer while the run exited 0. Inside the block, the other
threads' prints were swallowed too.

:func:`quiet` instead installs, once, a router in place of ``sys.stdout`` (or ``sys.stderr``): a
thread inside a ``quiet`` block writes to its own sink, every other write goes to the stream the
router replaced. Nothing is restored on exit, so nothing can be restored wrongly. Prints made by C
code straight to file descriptor 1 are not caught (neither were they before).

:func:`ignore_warnings` is the same care for ``warnings``: ``warnings.catch_warnings`` swaps the
process-wide filter list and puts back on exit the list it found on entry, so two threads that
enter and leave it in turn leave the inner block's filters -- a blanket "ignore" -- in place for
the rest of the run. A filter added by :func:`ignore_warnings` names one library warning and is
never taken back.

It lives in ``models`` (the lowest layer) because the model registry needs it as well as tasks.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import threading
import warnings
from typing import Any, Iterator, TextIO

_local = threading.local()  # per thread: {"stdout": [sink, ...], "stderr": [...]}
_install = threading.Lock()


class _Router:
    """Stands in for ``sys.<name>``: a thread's writes go to its innermost ``quiet`` sink when it has
    one, to ``target`` otherwise. Anything else (``isatty``, ``encoding``, ``fileno``) is the target's."""

    def __init__(self, target: TextIO, name: str):
        self._target = target
        self._name = name

    def _sink(self) -> TextIO:
        sinks = getattr(_local, self._name, None)
        return sinks[-1] if sinks else self._target

    def write(self, text: str) -> int:
        return self._sink().write(text)

    def writelines(self, lines) -> None:
        self._sink().writelines(lines)

    def flush(self) -> None:
        self._sink().flush()

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._target, attr)


@contextlib.contextmanager
def quiet(stream: str = "stdout", into: TextIO | None = None) -> Iterator[TextIO]:
    """Within the block, what this thread prints to ``sys.<stream>`` goes to ``into`` (a fresh
    ``StringIO`` by default, yielded); other threads' output is untouched."""
    if stream not in ("stdout", "stderr"):
        raise ValueError(f"quiet: stream must be 'stdout' or 'stderr', not {stream!r}")
    sink = into if into is not None else io.StringIO()
    with _install:
        current = getattr(sys, stream)
        if current is not None and not isinstance(current, _Router):  # None (no console): prints vanish anyway
            setattr(sys, stream, _Router(current, stream))
    sinks = _local.__dict__.setdefault(stream, [])
    sinks.append(sink)
    try:
        yield sink
    finally:
        sinks.pop()


def ignore_warnings(category: type[Warning] = Warning, message: str = "", module: str = "") -> None:
    """From now on, for the whole process, ignore the warnings of ``category`` whose text starts
    with the regex ``message`` (case-insensitive) raised from modules matching ``module``.

    Call it where the warning would come from, every time (it is a no-op once the filter is there):
    another thread's ``catch_warnings`` may drop it on exit, and the next call puts it back (the
    worst case is one such warning shown)."""
    entry = ("ignore", re.compile(message, re.I) if message else None, category,
             re.compile(module) if module else None, 0)
    with _install:
        if entry not in warnings.filters:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
