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
