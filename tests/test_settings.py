"""Where tilewise keeps its state: one resolver (models/home.py) for every layer, announced by the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from models import home as home_mod

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_checkout(monkeypatch):
    """As if tilewise were installed from a wheel (no source checkout around the package)."""
    monkeypatch.setattr(home_mod, "installed_checkout_home", lambda: None)


def make_checkout(root: Path) -> Path:
    (root / "data_catalog").mkdir(parents=True)
    (root / "pyproject.toml").write_text('[project]\nname = "tilewise"\nversion = "0"\n')
    return root


def test_environment_wins(tmp_path):
    make_checkout(tmp_path / "proj")
    home, source = home_mod.resolve_home({"TILEWISE_HOME": str(tmp_path / "elsewhere")}, cwd=tmp_path / "proj")
    assert (home, source) == ((tmp_path / "elsewhere").resolve(), "TILEWISE_HOME")


def test_project_found_from_a_subfolder(tmp_path, no_checkout):
    root = make_checkout(tmp_path / "proj")
    deep = root / "data" / "scans" / "2024"
    deep.mkdir(parents=True)
    home, source = home_mod.resolve_home({}, cwd=deep)
    assert (home, source) == (root.resolve() / ".tilewise", "project")


def test_an_existing_dot_tilewise_is_a_project_but_another_pyproject_is_not(tmp_path, no_checkout, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    other = tmp_path / "other"
    (other / "data_catalog").mkdir(parents=True)
    (other / "pyproject.toml").write_text('[project]\nname = "not-tilewise"\n')
    home, source = home_mod.resolve_home({}, cwd=other)
    assert source == "user default" and home.name == "tilewise" and ".tilewise" not in str(home)
    (tmp_path / ".tilewise").mkdir()
    home, source = home_mod.resolve_home({}, cwd=other)
    assert (home, source) == (tmp_path.resolve() / ".tilewise", "project")


def test_the_installed_checkout_is_used_outside_any_project(tmp_path):
    # this test suite runs from the repository: the package's own checkout is the fallback
    outside = tmp_path / "nowhere"
    outside.mkdir()
    home, source = home_mod.resolve_home({}, cwd=outside)
    assert (home, source) == (REPO.resolve() / ".tilewise", "installed checkout")


def test_new_home_is_reported_until_it_holds_models_or_stores(tmp_path):
    env = {"TILEWISE_HOME": str(tmp_path / "h")}
    assert home_mod.home_line(env) == f"home: {tmp_path / 'h'} (new: no models or stores yet)"
    (tmp_path / "h" / "prefect").mkdir(parents=True)  # the Prefect folder alone does not make it used
    assert home_mod.home_line(env).endswith("(new: no models or stores yet)")
    (tmp_path / "h" / "stores" / "ds").mkdir(parents=True)
    assert home_mod.home_line(env) == f"home: {tmp_path / 'h'}"
    assert not home_mod.is_new(tmp_path / "empty", {"MLFLOW_TRACKING_URI": "http://server", "TILEWISE_STORE_ROOT": "s3://b"})


def test_every_layer_uses_the_same_home(tmp_path, monkeypatch):
    from models import registry
    from tasks import settings

    monkeypatch.setenv("TILEWISE_HOME", str(tmp_path / "h"))
    monkeypatch.delenv("TILEWISE_STORE_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert settings.tilewise_home() == registry._home() == (tmp_path / "h").resolve()
    assert registry.tracking_uri() == f"sqlite:///{(tmp_path / 'h').resolve() / 'mlflow.db'}"
    assert settings.scan_store("ds", "s") == f"{(tmp_path / 'h').resolve() / 'stores'}/ds/s.zarr"


def test_cli_run_from_another_folder_finds_the_checkout_home_and_says_where(tmp_path):
    """The new user's case: `.venv/bin/tilewise` run outside the clone used to create ./.tilewise there."""
    env = {k: v for k, v in os.environ.items() if k != "TILEWISE_HOME"}
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg")
    env["PREFECT_HOME"] = str(tmp_path / "prefect")  # importing flows creates it: not in the repository's home
    code = ("from models.home import resolve_home; print(resolve_home()[1]);"
            "import flows, os; print(os.environ['TILEWISE_HOME'])")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True)
    source, pinned = out.stdout.split("\n")[:2]
    assert source == "installed checkout" and pinned == str(REPO.resolve() / ".tilewise")
    assert not (tmp_path / ".tilewise").exists()


def test_state_touching_commands_print_the_home_first(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app

    monkeypatch.setenv("TILEWISE_HOME", str(tmp_path / "fresh"))
    result = CliRunner().invoke(app, ["export", "--store", str(tmp_path / "none.zarr"), "--format", "nifti"])
    assert result.exit_code == 1
    assert result.output.splitlines()[0] == f"home: {tmp_path / 'fresh'} (new: no models or stores yet)"


def test_serve_and_remote_ingest_print_the_home_first_and_local_ingest_does_not(tmp_path, monkeypatch):
    """serve's runs and a remote ingest's download cache use the home; a local ingest writes only --store."""
    from typer.testing import CliRunner

    from flows.cli import app
    from tasks.errors import ScanError
    from tasks.ingest import remote

    monkeypatch.setenv("TILEWISE_HOME", str(tmp_path / "fresh"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    first = f"home: {tmp_path / 'fresh'} (new: no models or stores yet)"
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # no server: a session fixture may have set one in Prefect's settings, which serve would serve forever
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        result = CliRunner().invoke(app, ["serve"])
    assert result.exit_code == 1 and result.output.splitlines()[0] == first, result.output
    assert "needs a Prefect server" in result.output, result.output

    def unreachable(urls):
        raise ScanError(urls[0], "endpoint unreachable")

    monkeypatch.setattr(remote, "describe_sources", unreachable)
    result = CliRunner().invoke(app, ["ingest", "s3://bucket/scan.tif", "--store", str(tmp_path / "s.zarr")])
    assert result.exit_code == 1 and result.output.splitlines()[0] == first, result.output
    result = CliRunner().invoke(app, ["ingest", str(tmp_path / "missing.tif"), "--store", str(tmp_path / "s.zarr")])
    assert result.exit_code == 1 and not result.output.startswith("home:"), result.output
