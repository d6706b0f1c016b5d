"""What the CLI prints is what the message says: Rich must not eat ``[crf]`` / ``[openvino]`` (or a
path's ``[raw]``) as markup, in the help or in an error; and a missing CRF extra is said before the
model is loaded or any tile runs."""

from __future__ import annotations

import builtins
import importlib.util
import re

import pytest
from typer.testing import CliRunner

from flows.cli import app


def _flat(text: str) -> str:
    """Help text laid out in Rich's boxes, back to one line: box edges dropped, whitespace joined."""
    return re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]", " ", text))


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def test_infer_help_names_the_openvino_extra():
    result = CliRunner().invoke(app, ["infer", "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    assert "pip install 'tilewise[openvino]'" in _flat(result.output)


def test_a_missing_backend_extra_is_named_in_full(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    result = CliRunner().invoke(app, ["infer", "--store", str(tmp_path / "x.zarr"), "--model", "m.pt",
                                      "--backend", "openvino"])
    assert result.exit_code == 1
    errors = _error_lines(result.output)
    assert len(errors) == 1 and "pip install 'tilewise[openvino]'" in errors[0], result.output


def test_a_missing_crf_extra_is_said_first_in_one_line(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_crf(name, *args, **kwargs):
        if name == "pydensecrf" or name.startswith("pydensecrf."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_crf)
    # The model file does not exist: had the model been loaded (or any tile run) first, the error
    # would be about the model. The CRF line comes first, whole.
    result = CliRunner().invoke(app, ["infer", "--store", str(tmp_path / "x.zarr"), "--model",
                                      str(tmp_path / "missing.pt"), "--crf"])
    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)
    errors = _error_lines(result.output)
    assert len(errors) == 1 and "pip install 'tilewise[crf]'" in errors[0], result.output
    assert not (tmp_path / "x.zarr").exists()


def test_an_error_with_brackets_in_a_path_is_printed_whole(tmp_path):
    store = tmp_path / "scan[raw].zarr"
    result = CliRunner().invoke(app, ["export", "--store", str(store), "--format", "zarr"])
    assert result.exit_code == 1
    errors = _error_lines(result.output)
    assert len(errors) == 1 and f"{store}: does not exist" in errors[0], result.output


@pytest.mark.parametrize("message", ["install 'tilewise[crf]'", "s3://b/scan[1].tif: 503 [SlowDown]"])
def test_outcome_tables_print_messages_whole(message):
    from rich.console import Console

    from flows.cli import _outcome_table
    from flows.outcomes import ScanOutcome

    console = Console(width=400, record=True)
    console.print(_outcome_table("t", [ScanOutcome("ds[a]", "scan", "infer", "failed", "s", message)]))
    text = console.export_text()
    assert message in text and "ds[a]" in text


def test_the_run_summary_prints_paths_whole():
    from rich.console import Console

    from flows import summary
    from flows.outcomes import ScanOutcome

    console = Console(width=400, record=True)
    console.print(summary.rich_table("t", [ScanOutcome("ds", "scan[raw]", "export", "exported", "s",
                                                       output="/data/exports[final]/scan.tif")]))
    text = console.export_text()
    assert "scan[raw]" in text and "/data/exports[final]/" in text and "scan.tif" in text  # folder, then file


def test_version_is_the_installed_distributions():
    import subprocess
    import sys
    from importlib.metadata import version

    out = subprocess.run([sys.executable, "-m", "flows.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"tilewise {version('tilewise')}"


@pytest.mark.parametrize("args", [[], ["run"], ["catalog"]])
def test_help_reflows_docstrings_instead_of_breaking_lines_where_the_source_did(args):
    """A command's description is a paragraph: in ``tilewise --help`` at 80 columns no line may end
    where the next line's first word would still have fitted (the docstrings' own line breaks used
    to show: "writes prediction/probabilities and" / "labels; ..."). Nothing may be lost either:
    ``nightly/<dataset>`` read as an HTML tag by a Markdown renderer would vanish."""
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("╭") and "Commands" in line)
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("╰"))
    rows = [line[1:-1] for line in lines[start + 1:end]]  # inside the box's edges
    # the description column starts after the first command's name and the gap after it
    name = rows[0].split()[0]
    column = rows[0].index(name) + len(name)
    column += len(rows[0][column:]) - len(rows[0][column:].lstrip())
    room = len(rows[0]) - 1  # the box's right padding
    assert len(rows) > 1
    for above, below in zip(rows, rows[1:]):
        if below[:column].strip():
            continue  # the next command's first line
        word = below.split()[0]
        assert len(above.rstrip()) + 1 + len(word) > room, f"line broken early:\n{above}\n{below}"
    flat = _flat(result.output)
    for command in app.registered_commands:
        for token in re.findall(r"\S*[<>]\S*", (command.callback.__doc__ or "").split("\n\n")[0]):
            assert token in flat or args, token
