"""What a user reads while a run works: one progress display (bars in a terminal, plain periodic
lines in a log), the console quiet but for what needs acting on, everything in the log file."""

from __future__ import annotations

import io
import logging

from rich.console import Console

from flows.logs import OneLine
from flows.outcomes import ScanOutcome, plan, report
from flows.progress import RunProgress, run_progress


def _record(message: str, level=logging.ERROR, exc: Exception | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, None) if exc else None
    return logging.LogRecord("prefect.flow_runs", level, __file__, 1, message, (), exc_info)


def test_console_lines_are_one_line_without_tracebacks():
    fmt = OneLine()
    prefect_style = "Encountered exception during execution:\nTraceback (most recent call last):\n  File x\nValueError: bad"
    assert fmt.format(_record(prefect_style)) == "error: Encountered exception during execution:"
    assert fmt.format(_record("training failed", exc=ValueError("no labels"))) == \
        "error: training failed (ValueError: no labels)"
    assert fmt.format(_record("ingested 3 scans", level=logging.INFO)) == "ingested 3 scans"


def _outcome(scan: str, step: str, status: str) -> ScanOutcome:
    return ScanOutcome("brats", scan, step, status)


def test_a_log_gets_plain_progress_lines_counting_each_step(monkeypatch):
    import flows.progress

    monkeypatch.setattr(flows.progress, "PLAIN_EVERY_SECONDS", 0.0)  # every record draws a line here
    stream = io.StringIO()
    console = Console(file=stream, force_terminal=False, width=200)
    with run_progress(console):
        plan("brats", 2, ["ingest", "infer", "evaluate", "export"])
        plan("em", 1, ["ingest", "infer", "export"])
        report(_outcome("a", "ingest", "ingested"))
        report(_outcome("b", "ingest", "failed"))
        report(_outcome("*", "train", "trained"))
        report(_outcome("a", "infer", "inferred"))
    lines = stream.getvalue().splitlines()
    assert all(line.startswith("progress: ") for line in lines)
    assert lines[-1] == "progress: ingest 2/3 · infer 1/3 · evaluate 0/2 · export 0/3 · 1 failed"
    assert "progress: ingest 1/3 · infer 0/3 · evaluate 0/2 · export 0/3" in lines


def test_a_terminal_gets_one_bar_per_step_and_one_for_training_epochs():
    stream = io.StringIO()
    console = Console(file=stream, force_terminal=True, width=120)
    with run_progress(console) as handler:
        plan("brats", 2, ["ingest", "infer"])
        report(_outcome("a", "ingest", "ingested"))
        logging.getLogger("tasks.training.train").info(  # the bar is there from the training's start
            "brats-unet: training ...", extra={"tilewise_training": {"name": "brats-unet", "epochs": 30,
                                                                     "max_minutes": 1.5}})
        tasks = {t.description: t for t in handler.progress.tasks}
        assert (tasks["train"].completed, tasks["train"].total) == (0, 30)
        assert tasks["train"].fields["status"] == "brats-unet: starting, up to 30 epochs or 1.5 min"
        logging.getLogger("tasks.training.train").info(
            "brats-unet epoch 3/30: ...", extra={"tilewise_epoch": {"epoch": 2, "train_loss": 0.5, "val_dice": 0.7,
                                                                     "seconds": 30.0},
                                                  "tilewise_epochs": 30, "tilewise_metric": "val_dice",
                                                  "tilewise_max_minutes": 1.5})
        tasks = {t.description: t for t in handler.progress.tasks}
        assert (tasks["ingest"].completed, tasks["ingest"].total) == (1, 2)
        assert (tasks["infer"].completed, tasks["infer"].total) == (0, 2)
        assert (tasks["train"].completed, tasks["train"].total) == (3, 30)
        assert "brats-unet: epoch 3/30 · loss 0.5000 · val_dice 0.7000 · 0.5/1.5 min" in tasks["train"].fields["status"]


def test_a_log_file_keeps_info_and_tracebacks_the_console_only_warnings(tmp_path, capsys):
    from flows import logs

    path = logs.configure(tmp_path / "home")
    try:
        log = logging.getLogger("tasks.test")
        log.info("a detail for the record")
        try:
            raise ValueError("the cause")
        except ValueError:
            log.error("a step failed", exc_info=True)
        for handler in logging.getLogger().handlers:
            handler.flush()
        err = capsys.readouterr().err
        assert "a detail for the record" not in err
        assert "error: a step failed (ValueError: the cause)" in err and "Traceback" not in err
        text = path.read_text()
        assert "a detail for the record" in text and "Traceback" in text and "ValueError: the cause" in text
        assert path == tmp_path / "home" / "logs" / "tilewise.log"
    finally:
        logs.configure(tmp_path / "home", verbose=True)  # leave the console as pytest's runs expect: INFO


def test_prefects_own_failure_lines_stay_off_the_console_the_runs_summary_names_the_failure(tmp_path, capsys):
    from flows import logs
    from flows.outcomes import failure_message

    logs.configure(tmp_path / "home")
    try:
        prefect = logging.getLogger("prefect.flow_runs")
        prefect.error("Encountered exception during execution: TrainingError('deeplab is 2D')")
        prefect.error("Finished in state Failed('Task run encountered an exception')")
        prefect.error("brats: training failed: deeplab is 2D")  # the flow's own line stays
        err = capsys.readouterr().err
        assert err.splitlines() == ["error: brats: training failed: deeplab is 2D"]
        assert "Encountered exception" in logs.log_file(tmp_path / "home").read_text()
    finally:
        logs.configure(tmp_path / "home", verbose=True)
    outcomes = [ScanOutcome("brats", "a", "ingest", "ingested"), ScanOutcome("brats", "b", "ingest", "ingested"),
                ScanOutcome("brats", "*", "train", "failed", message="deeplab is 2D"),
                ScanOutcome("em", "x", "infer", "failed", message="no model")]
    assert failure_message(outcomes).splitlines() == [
        "1 of 3 scans failed, 1 dataset step failed:", "  brats (train): deeplab is 2D", "  em/x (infer): no model"]
