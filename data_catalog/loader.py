"""Load and validate catalog YAML files into :class:`CatalogEntry` objects.

Every problem is reported as ``file: field: reason`` so a user can fix the entry without
reading a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from data_catalog.schema import CatalogEntry

DEFAULT_CATALOG_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class CatalogProblem:
    file: Path
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.field}: {self.reason}"


class CatalogError(Exception):
    """One or more catalog files are invalid."""

    def __init__(self, problems: list[CatalogProblem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@dataclass(frozen=True)
class LoadedEntry:
    """A validated entry and the folder its relative paths are resolved against."""

    entry: CatalogEntry
    file: Path

    @property
    def base_dir(self) -> Path:
        return self.file.parent


def _field_name(loc: tuple) -> str:
    return ".".join(str(part) for part in loc) or "(entry)"


def load_entry(path: Path) -> LoadedEntry:
    """Parse and validate one catalog YAML file; raise :class:`CatalogError` on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogError([CatalogProblem(path, "(file)", exc.strerror or str(exc))]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "(file)"
        raise CatalogError([CatalogProblem(path, where, f"not valid YAML: {getattr(exc, 'problem', exc)}")]) from None
    if not isinstance(raw, dict):
        raise CatalogError([CatalogProblem(path, "(entry)", "must be a mapping of fields, got "
                                           f"{type(raw).__name__}")])
    try:
        entry = CatalogEntry.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            reason = "missing required field" if err["type"] == "missing" else err["msg"]
            if err["type"] == "extra_forbidden":
                reason = "unknown field"
            problems.append(CatalogProblem(path, _field_name(err["loc"]), reason))
        raise CatalogError(problems) from None
    return LoadedEntry(entry=entry, file=path.resolve())


def catalog_files(path: Path) -> list[Path]:
    """The YAML files of a catalog folder (sorted), or the file itself."""
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    return [path]


def load_catalog(path: Path = DEFAULT_CATALOG_DIR) -> list[LoadedEntry]:
    """Load every entry of a catalog folder; collect all problems before raising."""
    path = Path(path)
    if not path.exists():
        raise CatalogError([CatalogProblem(path, "(path)", "does not exist")])
    files = catalog_files(path)
    if not files:
        raise CatalogError([CatalogProblem(path, "(path)", "no .yaml catalog files found")])
    entries: list[LoadedEntry] = []
    problems: list[CatalogProblem] = []
    for file in files:
        try:
            entries.append(load_entry(file))
        except CatalogError as exc:
            problems.extend(exc.problems)
    names: dict[str, Path] = {}
    for loaded in entries:
        other = names.setdefault(loaded.entry.name, loaded.file)
        if other != loaded.file:
            problems.append(CatalogProblem(loaded.file, "name", f"'{loaded.entry.name}' is also used by {other}"))
    if problems:
        raise CatalogError(problems)
    return entries


def find_entry(name: str, path: Path = DEFAULT_CATALOG_DIR) -> LoadedEntry:
    entries = load_catalog(path)
    for loaded in entries:
        if loaded.entry.name == name:
            return loaded
    known = ", ".join(sorted(e.entry.name for e in entries))
    raise CatalogError([CatalogProblem(Path(path), "name", f"no dataset named '{name}' (known: {known})")])
