"""The data catalog: one YAML file per dataset, validated by a typed schema."""

from data_catalog.loader import (
    DEFAULT_CATALOG_DIR,
    CatalogError,
    CatalogProblem,
    LoadedEntry,
    find_entry,
    load_catalog,
    load_entry,
)
from data_catalog.schema import (
    CatalogEntry,
    LabelSource,
    ReaderOptions,
    ScanDate,
    ScanSource,
    entry_model_name,
    entry_model_uri,
)

__all__ = [
    "DEFAULT_CATALOG_DIR", "CatalogEntry", "CatalogError", "CatalogProblem", "LabelSource",
    "LoadedEntry", "ReaderOptions", "ScanDate", "ScanSource", "entry_model_name", "entry_model_uri", "find_entry",
    "load_catalog", "load_entry",
]
