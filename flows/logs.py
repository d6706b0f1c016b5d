"""Where a command's log records go: all of them into the log file, the ones a user acts on to the console.

- The log file ``$TILEWISE_HOME/logs/tilewise.log`` (rotated at 10 MB, five kept) gets every record at
  INFO and above -- tilewise's, Prefect's flow and task runs', MLflow's -- with its time, logger and
  full traceback. It is where "what happened last night" is read after the fact (Prefect's UI and
  the flow run logs hold the same lines for runs on a server).
- The console (stderr) gets WARNING and above, one line each: a failure's traceback stays in the
  file, and Prefect's own lines about a failed task or flow run are left out (the run's summary
  names every failure, the file has the rest); ``tilewise -v`` shows everything, INFO and
  tracebacks included. Progress is drawn separately (flows/progress.py).

:func:`configure` runs in the CLI before Prefect or MLflow is imported: Prefect then finds handlers
of the user's on the root logger and leaves it alone (its API handler still sends flow and task
run logs to its server), and MLflow's own loggers (which do not propagate) are set to the same
console level through ``MLFLOW_LOGGING_LEVEL``. Warnings are fixed where they arise, not filtered
(MLflow's type-hint advice: the pyfunc's ``predict`` has its hints, models/pyfunc_model.py).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
from pathlib import Path

from flows import STDERR

FILE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
CONSOLE_FORMAT = "%(levelname)s: %(message)s"
MAX_BYTES, BACKUPS = 10 << 20, 5
_configured: dict[str, object] = {}


class OneLine(logging.Formatter):
    """A record as one line: the message and, for an exception, its type and text -- not the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage().strip().splitlines()
        line = message[0] if message else ""
        if record.exc_info and record.exc_info[1] is not None and str(record.exc_info[1]) not in line:
            exc = record.exc_info[1]
            line += f" ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        if len(message) > 1 and message[1].startswith("Traceback"):
            pass  # Prefect puts the traceback in the message itself: the file has it
        elif len(message) > 1:
            line += " " + " ".join(m.strip() for m in message[1:] if m.strip())
        return f"{record.levelname.lower()}: {line}" if record.levelno >= logging.WARNING else line


# Prefect's own lines about a task or flow run that failed: the run's summary names every failure
# (and the log file keeps these, with their tracebacks), so the console leaves them out.
ENGINE_FAILURE_LINES = ("Task run failed with exception", "Finished in state Failed", "Finished in state Crashed",
                        "Encountered exception during execution", "Crash detected")


def _not_an_engine_failure(record: logging.LogRecord) -> bool:
    return not (record.name.startswith("prefect.") and str(record.msg).startswith(ENGINE_FAILURE_LINES))


def log_file(home: Path) -> Path:
    return Path(home) / "logs" / "tilewise.log"


def configure(home: Path, verbose: bool = False) -> Path:
    """Send the root logger's records to the log file (INFO) and the console (WARNING, or INFO with
    tracebacks when ``verbose``); quiet the libraries that log on their own. Returns the file's path.
    A second call (another command in the same process) changes the console level, and the file
    when the home is another."""
    path = log_file(home)
    root = logging.getLogger()
    level = logging.INFO if verbose else logging.WARNING
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "INFO" if verbose else "WARNING")
    # Prefect imported before this (a library user, a test session) put its own console and API
    # handlers on the root logger, at level 0: every INFO line would reach the console, and every
    # record outside a flow run the API handler. The CLI's own process never has them (this runs first).
    for handler in list(root.handlers):
        if type(handler).__name__ in ("PrefectConsoleHandler", "APILogHandler"):
            root.removeHandler(handler)
    console = _configured.get("console")
    if console is None:
        console = logging.StreamHandler(STDERR)  # the stderr of the moment (flows/__init__.py)
        root.addHandler(console)
        _configured["console"] = console
        root.setLevel(min(root.level or logging.WARNING, logging.INFO))
    old = _configured.get("file")
    if old is None or Path(old.baseFilename) != path.resolve():  # another home (tests run many commands)
        path.parent.mkdir(parents=True, exist_ok=True)
        file = logging.handlers.RotatingFileHandler(path, maxBytes=MAX_BYTES, backupCount=BACKUPS, encoding="utf-8")
        file.setFormatter(logging.Formatter(FILE_FORMAT))
        file.setLevel(logging.INFO)
        if old is not None:
            root.removeHandler(old)
            old.close()
        root.addHandler(file)
        _configured["file"] = file
    for chatty in ("httpx", "httpcore"):  # a line per request to the Prefect API
        logging.getLogger(chatty).setLevel(logging.WARNING)
    console.setLevel(level)
    console.setFormatter(logging.Formatter(CONSOLE_FORMAT) if verbose else OneLine())
    if verbose:
        console.removeFilter(_not_an_engine_failure)
    else:
        console.addFilter(_not_an_engine_failure)
    return path


