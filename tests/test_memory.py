"""tasks.memory.release_free_memory hands freed heap memory back: measured as the process's RSS.

In a fresh interpreter (the allocator's state is the test's own), with glibc's mmap threshold set
to 8 MB so that 48 buffers of 1 MB come from the heap whatever the process did before: freeing
every other one leaves holes glibc keeps resident until it is told to trim.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r"""
import ctypes
import json
import numpy as np
from tasks.memory import release_free_memory

ctypes.CDLL("libc.so.6").mallopt(-3, 8 << 20)  # M_MMAP_THRESHOLD

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024

base = rss()
blocks = [np.ones(1 << 20, np.uint8) for _ in range(48)]
blocks = blocks[::2]
freed = rss()
ok = release_free_memory()
print(json.dumps({"ok": ok, "base": base, "freed": freed, "after": rss(), "kept": len(blocks)}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_heap_memory_goes_back_to_the_system():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["ok"] is True
    assert r["freed"] - r["base"] > 40, f"the 1 MB buffers did not stay on the heap: {r}"
    # 24 MB of holes were resident before the trim and are not after it (some slack for the allocator)
    assert r["freed"] - r["after"] > 16, r
