"""flows/batch.py's helpers: batch sizes (one scan per task for a small catalog, about 16 tasks per
step for a large one, capped), a scan's transient I/O error retried within its batch, bad input
never retried, and a failing scan reported as its own one-line error while its batch goes on."""

from __future__ import annotations

import pytest

from tasks.errors import ScanError


@pytest.fixture
def batch():
    """flows.batch, imported when a test runs, not when the suite is collected: it imports Prefect,
    and Prefect imported before the CLI's logging is configured sets up its own console handlers
    (the CLI tests of tests/test_run_output.py then see INFO lines on the console)."""
    from flows import batch

    return batch


def test_batch_sizes(batch, monkeypatch):
    monkeypatch.delenv("TILEWISE_BATCH_SCANS", raising=False)
    assert [batch.batch_size(n) for n in (1, 3, 16, 17, 100, 1000, 5000, 100_000)] == [1, 1, 1, 2, 7, 63, 64, 64]
    monkeypatch.setenv("TILEWISE_BATCH_SCANS", "5")
    assert batch.batch_size(3) == 5
    monkeypatch.setenv("TILEWISE_BATCH_SCANS", "many")
    assert batch.batch_size(3) == 1
    items = list(range(11))
    assert batch.batches(items, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert batch.span(["a"]) == "a" and batch.span(["a", "b", "c"]) == "a … c (3 scans)"


def test_transient_errors_are_retried_bad_input_is_not(batch):
    calls = []

    def flaky(x):
        calls.append(x)
        if len(calls) == 1:
            raise OSError(5, "Input/output error (simulated)")
        return x * 2

    assert batch.attempt(flaky, 21, delays=(0.0, 0.0)) == (True, 42) and len(calls) == 2

    def bad(x):
        calls.append(x)
        raise ScanError("x.tif", "not a readable GeoTIFF")

    calls.clear()
    ok, message = batch.attempt(bad, 1, delays=(0.0, 0.0))
    assert not ok and "not a readable GeoTIFF" in message and "\n" not in message and len(calls) == 1

    def broken(x):
        calls.append(x)
        raise TimeoutError("the bucket did not answer")

    calls.clear()
    assert batch.attempt(broken, 1, delays=(0.0, 0.0)) == (False, "the bucket did not answer") and len(calls) == 3
    calls.clear()
    assert batch.attempt(broken, 1, retry=False) == (False, "the bucket did not answer") and len(calls) == 1
