"""Prefect's console handler writes to the stderr of the command running now, not to the one it saw
when Prefect set up logging.

Click's CliRunner gives every in-process command its own stderr and closes it afterwards; a handler
that kept the first command's stream made logging print "--- Logging error ---" tracebacks into later
commands' output (the test suite used to hide them with ``logging.raiseExceptions = False``)."""

from __future__ import annotations

import numpy as np
import torch
from typer.testing import CliRunner

from tests.test_skip_empty import Pointwise, nifti_scan


def test_a_later_in_process_command_gets_its_own_log_lines_and_no_logging_error(tmp_path):
    from prefect.logging.configuration import setup_logging

    from flows.cli import app

    array = np.zeros((1, 8, 16, 16), np.float32)
    array[0, :2, :4, :4] = 1.0
    store = nifti_scan(tmp_path, array, (8, 16, 16))
    model = tmp_path / "pw.pt"
    torch.jit.script(Pointwise(1, 3)).save(str(model))
    runner = CliRunner()
    try:
        with runner.isolation():  # Prefect sets up logging inside a command, as a first flow import does
            setup_logging(incremental=False)
        result = runner.invoke(app, ["-v", "infer", "--store", store, "--model", str(model), "--tile", "8,16,16",
                                     "--skip-empty", "0"])
    finally:
        setup_logging(incremental=False)  # the rest of the session logs to pytest's stderr again
    assert result.exit_code == 0, result.output
    assert "Logging error" not in result.stderr, result.stderr
    assert "tiles empty (background), not run" in result.stderr  # -v: the engine's INFO line, through Prefect
