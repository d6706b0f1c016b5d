"""A terminal progress bar for training, drawn from the epoch log records of tasks/training/train.py.

tasks/ has no Prefect and no terminal: each epoch it logs one line on the "tasks.training.train" logger and
attaches the epoch's row to the record (``extra``: ``tilewise_epoch`` = {"epoch" (0-based), "train_loss",
the validation metric, "seconds" since the start, ...}, ``tilewise_epochs`` = the epoch limit,
``tilewise_metric`` = the metric's name, ``tilewise_max_minutes`` = the wall-clock budget in minutes).
Prefect forwards the line to the flow run's logs (flows/__init__.py, PREFECT_LOGGING_EXTRA_LOGGERS); the CLI
adds, only when stderr is a terminal, a handler that turns the same records into a rich progress bar.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

TRAINING_LOGGER = "tasks.training"


def describe_epoch(row: dict, metric: str, max_minutes: float | None) -> str:
    """'loss 0.4321 · val_dice 0.8123 · 0.4/1.5 min' for one epoch row (seconds -> minutes)."""
    parts = [f"loss {row['train_loss']:.4f}"]
    if metric in row:
        parts.append(f"{metric} {row[metric]:.4f}")
    if "seconds" in row:
        budget = f"/{max_minutes:g}" if max_minutes else ""
        parts.append(f"{row['seconds'] / 60:.1f}{budget} min")
    return " · ".join(parts)


def _skip_epoch_records(record: logging.LogRecord) -> bool:
    return not isinstance(getattr(record, "tilewise_epoch", None), dict)


class EpochProgressHandler(logging.Handler):
    """Advances a rich ``Progress`` by one step per epoch record; ignores every other record."""

    def __init__(self, progress: Progress) -> None:
        super().__init__(level=logging.INFO)
        self.progress = progress
        self.task: TaskID | None = None

    def emit(self, record: logging.LogRecord) -> None:
        start = getattr(record, "tilewise_training", None)
        if isinstance(start, dict) and self.task is None:  # the bar from the start, 0 of N epochs
            self.task = self.progress.add_task("training", total=start["epochs"], status="starting")
            return
        row = getattr(record, "tilewise_epoch", None)
        if not isinstance(row, dict):
            return
        # This handler sees the record before the root logger's; from now on the console handlers
        # there skip epoch records (the bar shows them; Prefect's API handler still stores them),
        # so their lines do not print into the live bar.
        for console_handler in logging.getLogger().handlers:
            if isinstance(console_handler, logging.StreamHandler) or "Console" in type(console_handler).__name__:
                if _skip_epoch_records not in console_handler.filters:
                    console_handler.addFilter(_skip_epoch_records)
        try:
            total = getattr(record, "tilewise_epochs", None)
            metric = getattr(record, "tilewise_metric", "")
            if self.task is None:
                self.task = self.progress.add_task("training", total=total, status="")
            self.progress.update(self.task, completed=int(row["epoch"]) + 1, total=total,
                                 description=f"epoch {int(row['epoch']) + 1}",
                                 status=describe_epoch(row, metric, getattr(record, "tilewise_max_minutes", None)))
        except Exception:  # a progress bar must never break training
            self.handleError(record)


def make_progress(console: Console) -> Progress:
    """The bar the CLI shows: 'epoch k ━━━━ k/N loss … · val_dice … · elapsed/budget min'."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), console=console, transient=False)


@contextmanager
def epoch_progress(console: Console) -> Iterator[Progress | None]:
    """While inside, training epochs drive a progress bar on ``console`` if it is a terminal;
    otherwise nothing is added (the log lines already report each epoch). Yields the Progress or None."""
    if not console.is_terminal:
        yield None
        return
    logger = logging.getLogger(TRAINING_LOGGER)
    progress = make_progress(console)
    handler = EpochProgressHandler(progress)
    logger.addHandler(handler)
    try:
        with progress:
            yield progress
    finally:
        logger.removeHandler(handler)
        for console_handler in logging.getLogger().handlers:
            console_handler.removeFilter(_skip_epoch_records)


STEP_ORDER = ("ingest", "train", "infer", "instances", "evaluate", "export")
PLAIN_EVERY_SECONDS = 10.0


class RunProgress(logging.Handler):
    """One progress display for a nightly or backfill run, drawn from its records: ``tilewise_plan``
    (a dataset's scans and steps: the totals), ``tilewise_step`` (a scan's step ended:
    flows/outcomes.py) and ``tilewise_epoch`` (training). In a terminal a live bar per step (done of
    total, failures, elapsed and remaining time) and one for the epochs of a training; otherwise
    (a log file, CI) a plain line at most every :data:`PLAIN_EVERY_SECONDS` and when the run ends."""

    def __init__(self, console: Console, live: bool = True) -> None:
        super().__init__(level=logging.INFO)
        self.console = console
        self.totals: dict[str, int] = {}
        self.done: dict[str, int] = {}
        self.failed: dict[str, int] = {}
        self.training: str = ""
        self.progress: Progress | None = None
        self.tasks: dict[str, TaskID] = {}
        self.last_plain = 0.0
        if console.is_terminal and live:
            from rich.progress import TimeElapsedColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                                     console=console, transient=False)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            plan, step, epoch = (getattr(record, k, None) for k in ("tilewise_plan", "tilewise_step", "tilewise_epoch"))
            start = getattr(record, "tilewise_training", None)
            if isinstance(start, dict):
                self.training = f"{start['name']}: starting, up to {start['epochs']} epochs or {start['max_minutes']:g} min"
                if self.progress is not None:
                    if "train" in self.tasks:
                        self.progress.reset(self.tasks["train"], total=start["epochs"], status=self.training)
                    else:
                        self.tasks["train"] = self.progress.add_task("train", total=start["epochs"],
                                                                     status=self.training)
                self._draw(record.created)
                return
            if isinstance(plan, dict):
                for name in plan["steps"]:
                    self.totals[name] = self.totals.get(name, 0) + int(plan["scans"])
            elif isinstance(step, dict):
                if step["scan_id"] == "*":  # a dataset-wide step (training, the model): not a scan's
                    if step["step"] == "train" and self.progress is not None and "train" in self.tasks:
                        self.progress.update(self.tasks["train"], status=f"{step['dataset']}: {step['status']}")
                    if step["status"] == "failed":
                        self.failed[step["step"]] = self.failed.get(step["step"], 0) + 1
                    return
                self.done[step["step"]] = self.done.get(step["step"], 0) + 1
                if step["status"] == "failed":
                    self.failed[step["step"]] = self.failed.get(step["step"], 0) + 1
            elif isinstance(epoch, dict):
                total = getattr(record, "tilewise_epochs", None)
                metric = getattr(record, "tilewise_metric", "")
                self.training = (f"{record.getMessage().split(' epoch ')[0]}: epoch {int(epoch['epoch']) + 1}"
                                 f"/{total} · {describe_epoch(epoch, metric, getattr(record, 'tilewise_max_minutes', None))}")
                if self.progress is not None:
                    if "train" not in self.tasks:
                        self.tasks["train"] = self.progress.add_task("train", total=total, status="")
                    self.progress.update(self.tasks["train"], completed=int(epoch["epoch"]) + 1, total=total,
                                         status=self.training)
            else:
                return
            self._draw(record.created)
        except Exception:  # a progress display must never break a run
            self.handleError(record)

    def _draw(self, now: float, final: bool = False) -> None:
        if self.progress is not None:
            for name in STEP_ORDER:
                if name in self.totals:
                    if name not in self.tasks:
                        self.tasks[name] = self.progress.add_task(name, total=self.totals[name], status="")
                    failed = self.failed.get(name, 0)
                    self.progress.update(self.tasks[name], total=self.totals[name], completed=self.done.get(name, 0),
                                         status=f"[red]{failed} failed[/]" if failed else "")
            return
        if not final and now - self.last_plain < PLAIN_EVERY_SECONDS:
            return
        self.last_plain = now
        parts = [f"{name} {self.done.get(name, 0)}/{self.totals[name]}" for name in STEP_ORDER if name in self.totals]
        if sum(self.failed.values()):
            parts.append(f"{sum(self.failed.values())} failed")
        if self.training and not final:
            parts.append(self.training)
        self.console.print("progress: " + " · ".join(parts), highlight=False, soft_wrap=True)

    def finish(self) -> None:
        if self.progress is None and self.totals:
            self._draw(0.0, final=True)


@contextmanager
def run_progress(console: Console, live: bool = True) -> Iterator[RunProgress]:
    """While inside, the run's step and epoch records drive a :class:`RunProgress` on ``console``
    (``live``: bars in a terminal; False, as with ``-v`` whose log lines would tear live bars: plain
    lines)."""
    handler = RunProgress(console, live)
    loggers = [logging.getLogger("flows.progress"), logging.getLogger(TRAINING_LOGGER)]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        if handler.progress is not None:
            with handler.progress:
                yield handler
        else:
            yield handler
    finally:
        handler.finish()
        for logger in loggers:
            logger.removeHandler(handler)
