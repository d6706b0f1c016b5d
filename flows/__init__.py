"""Prefect flows that compose tasks/ (and the CLI that starts them).

Importing this package sets the embedded defaults before Prefect is imported: Prefect's database
lives under TILEWISE_HOME, and its telemetry is off (it logs 'database is locked' tracebacks
against the embedded SQLite server otherwise). Variables the user set win.
"""

import os as _os
import sys as _sys

from tasks.settings import tilewise_home as _home

# The home is resolved once per process (models/home.py) and pinned, so Prefect, MLflow, Dask workers
# and any subprocess agree on it whatever folder they start in.
_os.environ.setdefault("TILEWISE_HOME", str(_home()))
_os.environ.setdefault("PREFECT_HOME", str(_home() / "prefect"))
# tasks/ logs with the standard library (no Prefect import there); this attaches Prefect's API handler to
# the "tasks" loggers so training epochs, ingest and engine messages appear in the flow run's logs.
_os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tasks")
# ... and outside a flow run (tilewise infer, a Dask worker's region) those records go to the log file
# and the console only: no "attempted to send logs to the API without a flow run id" warning per record.
_os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
import logging as _logging  # noqa: E402

if _logging.getLogger("tasks").level == _logging.NOTSET:
    _logging.getLogger("tasks").setLevel(_logging.INFO)
_os.makedirs(_os.environ["PREFECT_HOME"], exist_ok=True)  # Prefect makes only the last folder
# The embedded server takes ~15 s to start on 2 busy cores; Prefect's default wait is 20 s.
_os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
_os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
_os.environ.setdefault("DO_NOT_TRACK", "1")  # nor does the client report usage (Prefect 3.8 prints a notice otherwise)
_os.environ.setdefault("PREFECT_UI_ENABLED", "false")
_os.environ.setdefault("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "0.5")
# With an HTTP tracking URI MLflow writes "View run ... at: URL" to stdout at the end of each run:
# a nightly's stdout would no longer be its table (or, with --json, valid JSON).
_os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


class _CurrentStderr:
    """``sys.stderr`` as it is at each write. Prefect's console handlers keep the stream they are given
    when Prefect is first imported; given ``sys.stderr`` itself they keep one that may be swapped and
    closed (Click's CliRunner gives every in-process command its own stderr), and logging then prints
    "--- Logging error ---" tracebacks into a later command's output."""

    def __getattr__(self, name):
        return getattr(_sys.stderr, name)


STDERR = _CurrentStderr()
for _handler in ("CONSOLE", "DEBUG"):  # Prefect's logging.yml handlers that write to sys.stderr
    _os.environ.setdefault(f"PREFECT_LOGGING_HANDLERS_{_handler}_STREAM", "ext://flows.STDERR")
