"""The ``backfill`` flow: the nightly chain over one dataset's scans dated within a range.

A scan's date comes from the catalog's ``scans.date``: ``from: mtime`` (default; the newest
modification time of the matched file or folder and, for a folder, of the files directly in it,
as a local date) or ``from: path`` (a regular expression with one group, parsed with ``format``).
A remote scan (an fsspec URL) is dated from its listing, never downloaded: ``from: path`` reads the
matched URL, ``from: mtime`` takes the newest modification time of the objects the scan is made of
(a prefix has no time of its own).
``since`` / ``until`` are inclusive ISO dates; either may be left out. ``force`` recomputes every
step of exactly the selected scans; the others are not looked at.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from prefect import flow, get_run_logger

from data_catalog import DEFAULT_CATALOG_DIR, LoadedEntry
from flows import summary
from flows.chain import ChainOptions
from flows.nightly import finish, run_entries, select_datasets
from tasks.errors import ScanError
from tasks.ingest import ScanSpec


def matched_path(loaded: LoadedEntry, spec: ScanSpec) -> Path | str:
    """The path ``scans.path`` matched for this scan (the folder of channel files, else the source);
    for a remote scan, the URL it matched (the object, or the prefix of a slice or channel folder)."""
    if spec.remote is not None:
        return spec.remote.url
    return spec.sources[0].parent if loaded.entry.scans.channels else spec.sources[0]


def scan_date(loaded: LoadedEntry, spec: ScanSpec) -> dt.date:
    path = matched_path(loaded, spec)
    rule = getattr(loaded.entry.scans, "date", None)
    if rule is not None and getattr(rule, "source", "mtime") == "path":
        try:
            return rule.from_path(str(path))
        except ValueError as exc:
            raise ScanError(path, str(exc)) from None
    if spec.remote is not None:  # the listing's times: nothing is read or fetched to date a remote scan
        newest = spec.remote.newest_mtime()
        if newest is None:
            raise ScanError(path, "cannot read its modification time (the listing gives none); "
                                  "date it from its path with scans.date {from: path, pattern: ...}")
        return newest.astimezone().date()
    try:
        times = [os.stat(path).st_mtime]
        if path.is_dir():
            times += [e.stat().st_mtime for e in os.scandir(path) if e.is_file()]
    except OSError as exc:
        raise ScanError(path, f"cannot read its modification time ({exc})") from None
    return dt.datetime.fromtimestamp(max(times)).date()


def parse_date(text: str | None, what: str) -> dt.date | None:
    if not text:
        return None
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{what} must be a date YYYY-MM-DD, got {text!r}") from None


def in_range(since: dt.date | None, until: dt.date | None):
    def select(loaded: LoadedEntry, specs: list[ScanSpec]) -> list[ScanSpec]:
        return [s for s in specs if (since is None or scan_date(loaded, s) >= since)
                and (until is None or scan_date(loaded, s) <= until)]
    return select


@flow(name="backfill", flow_run_name="backfill {dataset}")
def backfill_flow(dataset: str, catalog: str = str(DEFAULT_CATALOG_DIR), since: str | None = None,
                  until: str | None = None, force: bool = False, store_root: str | None = None,
                  dask: str | None = None, train_missing: bool = True):
    """The chain over ``dataset``'s scans dated in [since, until] (all when neither is given)."""
    logger = get_run_logger()
    start, end = parse_date(since, "since"), parse_date(until, "until")
    if start and end and start > end:
        raise ValueError(f"since ({start}) is after until ({end})")
    entries = select_datasets(catalog, [dataset])
    options = ChainOptions(force=force, train_missing=train_missing, dask=dask, kind="backfill")
    outcomes = run_entries(entries, catalog, store_root, options, select=in_range(start, end), logger=logger)
    if not outcomes:
        logger.warning("%s: no scan dated in %s .. %s", dataset, start or "-", end or "-")
    return finish(f"tilewise {summary.run_name('backfill')} of {dataset}", outcomes, "backfill", logger)
