"""What a CLI command printed, less the ``home: PATH`` line every state-touching command starts with
(stderr, which Click's test runner mixes into ``result.output``)."""

from __future__ import annotations


def without_home(output: str) -> str:
    return "\n".join(line for line in output.splitlines() if not line.startswith("home: ")).strip()
