"""Shared test set-up: an isolated TILEWISE_HOME, the sample data, one Prefect server per session."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data_catalog" / "samples"

# Before anything imports flows/ or Prefect: keep every test run's state out of the user's home.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="tilewise-test-home-"))
os.environ["TILEWISE_HOME"] = str(_SESSION_HOME)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)

# Click's CliRunner swaps sys.stderr for each in-process invocation and closes it afterwards; a
# logging handler created during one invocation (Prefect's console handler binds the stream it saw)
# then writes to a closed file in a later one, and logging prints "--- Logging error ---" with a
# traceback into that later command's captured output. A real CLI runs once per process and never
# meets this; in the test process, let logging drop such records instead of printing about them.
logging.raiseExceptions = False


@pytest.fixture(scope="session")
def samples() -> Path:
    return SAMPLES


@pytest.fixture(scope="session")
def prefect_server():
    """One embedded Prefect API for the whole session (it takes ~15 s to start)."""
    import flows  # noqa: F401  (embedded defaults)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
