"""Dask addresses: ``local[:N]`` is a local cluster, anything else a scheduler that must answer
quickly (issue 11: ``localhost:8786`` used to start 8786 local workers, and a missing scheduler hung)."""

from __future__ import annotations

import socket
import time

import pytest
from pydantic import ValidationError

from data_catalog.schema import Tiling
from tasks.engine import distributed
from tasks.errors import ScanError


@pytest.mark.parametrize("address, workers", [("local", 2), ("local:3", 3), ("localhost:8786", None),
                                              ("local.example.org:8786", None), ("tcp://localhost:8786", None)])
def test_local_cluster_only_for_local_or_local_n(address, workers):
    assert distributed.local_workers(address) == workers


def test_local_zero_workers_is_refused():
    with pytest.raises(ScanError, match="at least one worker"):
        distributed.local_workers("local:0")


def test_catalog_accepts_a_localhost_scheduler_and_refuses_local_zero():
    assert Tiling(dask="localhost:8786").dask == "localhost:8786"
    assert Tiling(dask="local:4").dask == "local:4"
    with pytest.raises(ValidationError):
        Tiling(dask="local:0")


def test_no_scheduler_is_a_one_line_error_within_the_timeout(monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(distributed, "CONNECT_TIMEOUT_S", 2.0)
    t0 = time.perf_counter()
    with pytest.raises(ScanError) as err:
        distributed.client_for(f"127.0.0.1:{port}")
    assert time.perf_counter() - t0 < 20
    assert "no Dask scheduler answered within 2 s" in str(err.value) and "\n" not in str(err.value)
