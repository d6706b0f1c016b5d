"""Where tilewise keeps its state (the "home"), resolved in one place for every layer.

    $HOME_DIR/stores/<dataset>/<scan>.zarr   scan groups (unless TILEWISE_STORE_ROOT is set)
    $HOME_DIR/mlflow.db, mlflow-artifacts/  embedded MLflow (unless MLFLOW_TRACKING_URI is set)
    $HOME_DIR/prefect/                      embedded Prefect database (unless PREFECT_API_URL is set)

Resolution order (the first that applies):

1. ``TILEWISE_HOME`` from the environment;
2. a project: walking up from the current folder, the first folder that has a ``.tilewise`` folder,
   or that is a tilewise checkout (``data_catalog/`` beside a ``pyproject.toml`` naming tilewise):
   its ``.tilewise``;
3. the checkout tilewise itself is installed from (an editable install from a clone): its
   ``.tilewise``, so ``.venv/bin/tilewise`` finds the clone's models wherever it is run from;
4. the user's data folder: ``platformdirs.user_data_dir("tilewise")`` (``~/.local/share/tilewise``
   on Linux; ``$XDG_DATA_HOME/tilewise`` when that is set).

It lives in ``models/`` because both ``models/registry.py`` and ``tasks/`` need it and imports point
down (flows -> tasks -> models); ``tasks.settings`` re-exports it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

FOLDER = ".tilewise"
_NAMES_TILEWISE = re.compile(r'^\s*name\s*=\s*["\']tilewise["\']', re.MULTILINE)


def is_checkout(folder: Path) -> bool:
    """A tilewise source tree: ``data_catalog/`` and a ``pyproject.toml`` whose project is tilewise."""
    pyproject = folder / "pyproject.toml"
    if not (folder / "data_catalog").is_dir() or not pyproject.is_file():
        return False
    try:
        return bool(_NAMES_TILEWISE.search(pyproject.read_text(encoding="utf-8", errors="replace")))
    except OSError:
        return False


def project_home(start: Path) -> Path | None:
    """The ``.tilewise`` of the nearest project at or above ``start`` (see the module docstring)."""
    start = Path(start).resolve()
    for folder in (start, *start.parents):
        if (folder / FOLDER).is_dir() or is_checkout(folder):
            return folder / FOLDER
    return None


def installed_checkout_home() -> Path | None:
    """The ``.tilewise`` of the checkout this package is imported from (editable installs), if any."""
    root = Path(__file__).resolve().parents[1]
    return root / FOLDER if is_checkout(root) else None


def user_home() -> Path:
    """The per-user default: platformdirs' data folder when installed, else the XDG default."""
    try:
        from platformdirs import user_data_dir
    except ImportError:
        base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        return Path(base) / "tilewise"
    return Path(user_data_dir("tilewise", appauthor=False))


def resolve_home(environ: dict | None = None, cwd: Path | None = None) -> tuple[Path, str]:
    """The home folder (absolute) and where it came from: ``TILEWISE_HOME``, ``project``,
    ``installed checkout`` or ``user default``. Pure apart from reading the file system."""
    environ = os.environ if environ is None else environ
    if environ.get("TILEWISE_HOME"):
        return Path(environ["TILEWISE_HOME"]).expanduser().resolve(), "TILEWISE_HOME"
    found = project_home(Path(cwd) if cwd is not None else Path.cwd())
    if found is not None:
        return found, "project"
    found = installed_checkout_home()
    if found is not None:
        return found, "installed checkout"
    return user_home().resolve(), "user default"


def tilewise_home() -> Path:
    """The home folder (absolute; it may not exist yet)."""
    return resolve_home()[0]


def is_new(home: Path, environ: dict | None = None) -> bool:
    """True when the home holds no models and no stores yet: no embedded MLflow database and an empty
    or missing ``stores/`` (the Prefect folder alone does not count). Models on an MLflow server
    (``MLFLOW_TRACKING_URI``) or stores elsewhere (``TILEWISE_STORE_ROOT``) are not looked for."""
    environ = os.environ if environ is None else environ
    stores = home / "stores"
    no_models = not environ.get("MLFLOW_TRACKING_URI") and not (home / "mlflow.db").is_file()
    no_stores = not environ.get("TILEWISE_STORE_ROOT") and not (stores.is_dir() and any(stores.iterdir()))
    return no_models and no_stores


def home_line(environ: dict | None = None, cwd: Path | None = None) -> str:
    """``home: PATH``, or ``home: PATH (new: no models or stores yet)``, for the CLI's first line."""
    home, _ = resolve_home(environ, cwd)
    return f"home: {home}" + (" (new: no models or stores yet)" if is_new(home, environ) else "")
