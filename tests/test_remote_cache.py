"""The local copy of a remote scan is deleted once the scan is ingested; a failed ingest keeps it
(the retry downloads nothing); a copy another ingest still holds is not deleted under it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tasks.errors import ScanError
from tasks.ingest import ScanSpec, ingest_scan
from tasks.ingest import remote
from tasks.ingest.remote import describe_sources

SAMPLES = Path(__file__).parents[1] / "data_catalog/samples"
CHIP = SAMPLES / "satellite/spacenet1_rio/images/3band_013022223130_Public_img53.tif"


@pytest.fixture
def cache(s3, tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TILEWISE_HOME", str(tmp_path / "home"))
    return tmp_path / "home" / "cache" / "remote"


def _spec(url: str, name: str = "chip") -> ScanSpec:
    scan = describe_sources([url])
    return ScanSpec(name, "satellite", scan.source_urls(), remote=scan)


def _left(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_the_copy_is_deleted_once_the_scan_is_ingested(s3, cache, tmp_path):
    s3.put("rio/chip.tif", CHIP)
    assert ingest_scan(_spec(f"{s3.url}/rio/chip.tif"), tmp_path / "chip.zarr").status == "ingested"
    assert _left(cache) == []
    s3.forget_requests()  # --force reads the bytes again: fetched anew, deleted again
    assert ingest_scan(_spec(f"{s3.url}/rio/chip.tif"), tmp_path / "chip.zarr", force=True).status == "ingested"
    assert len(s3.object_gets()) == 1 and _left(cache) == []


def test_a_failed_ingest_keeps_its_copy_for_the_retry(s3, cache, tmp_path):
    s3.put("rio/chip.tif", CHIP)
    spec = _spec(f"{s3.url}/rio/chip.tif")
    (tmp_path / "busy.zarr").write_text("a file where the store's folder must go")
    with pytest.raises((ScanError, OSError)):
        ingest_scan(spec, tmp_path / "busy.zarr")
    assert _left(cache) == [spec.remote.key(), f"{spec.remote.key()}.lock"]
    s3.forget_requests()
    assert ingest_scan(spec, tmp_path / "chip.zarr").status == "ingested"
    assert s3.object_gets() == []  # the retry used the kept copy
    assert _left(cache) == []


def test_a_copy_another_ingest_holds_is_left_to_it(s3, cache):
    s3.put("rio/chip.tif", CHIP)
    scan = _spec(f"{s3.url}/rio/chip.tif").remote
    first, _ = remote.fetch(scan)
    second, _ = remote.fetch(scan)  # a second ingest of the same bytes, at the same time
    remote.release(scan, ingested=True)
    assert first[0].is_file()  # the other still reads it
    remote.release(scan, ingested=True)
    assert not second[0].exists() and _left(cache) == []
    assert remote._holds == {}
    assert os.path.exists(cache)
