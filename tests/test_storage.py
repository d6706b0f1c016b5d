"""The store contract around existing paths: tilewise replaces its own groups, never the user's files."""

from __future__ import annotations

import pytest

from tasks import storage
from tasks.errors import ScanError
from tasks.ingest import ScanSpec, ingest_scan

CHIP = "satellite/spacenet1_rio/images/3band_013022223130_Public_img53.tif"


def test_refuses_to_replace_a_folder_that_is_not_a_zarr_group(tmp_path, samples):
    target = tmp_path / "thesis"
    target.mkdir()
    (target / "chapter1.tex").write_text("precious")
    with pytest.raises(ScanError, match="is not a Zarr group; refusing to replace it"):
        ingest_scan(ScanSpec("s", "satellite", (samples / CHIP,)), str(target))
    assert (target / "chapter1.tex").read_text() == "precious"


def test_refuses_to_replace_a_file(tmp_path, samples):
    target = tmp_path / "notes.zarr"
    target.write_text("not a group")
    with pytest.raises(ScanError, match="refusing"):
        ingest_scan(ScanSpec("s", "satellite", (samples / CHIP,)), str(target))
    assert target.read_text() == "not a group"


def test_empty_folder_and_own_group_are_replaced(tmp_path, samples):
    target = tmp_path / "empty.zarr"
    target.mkdir()
    assert ingest_scan(ScanSpec("s", "satellite", (samples / CHIP,)), str(target)).status == "ingested"
    storage.clear_complete(str(target))  # now an incomplete group of ours: replaced, not refused
    assert ingest_scan(ScanSpec("s", "satellite", (samples / CHIP,)), str(target)).status == "ingested"
    assert storage.is_complete(str(target))
