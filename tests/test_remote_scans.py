"""Scans on object storage, against a local S3 (moto's server on 127.0.0.1; see the ``s3`` fixture).

Discovery lists, never downloads; ingest compares the objects' metadata (ETag, else size and
mtime) with the last ingest's record and fetches only a scan it must (re)ingest; channel folders
and slice folders are prefixes; a remote problem is a one-line ScanError naming the URL.
"""

from __future__ import annotations

import json
import os
import socket
import textwrap
from datetime import date, datetime, timezone
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import rasterio
import zarr
from typer.testing import CliRunner

from data_catalog import load_entry
from flows.cli import app
from tasks import storage
from tasks.errors import ScanError
from tasks.ingest import ScanSpec, discover_scans, ingest_scan
from tasks.ingest.remote import RemoteUnavailable

SAMPLES = Path(__file__).parents[1] / "data_catalog/samples"
SAT = SAMPLES / "satellite/spacenet1_rio"
MRI = SAMPLES / "mri/brats2015"
EM = SAMPLES / "em/isbi2012_train"
CHIP = "3band_013022223130_Public_img{}.tif"
MRI_CHANNELS = ["Flair_subtrMeanDivStd.nii.gz", "T1c_subtrMeanDivStd.nii.gz"]


def entry(tmp_path: Path, name: str, text: str):
    folder = tmp_path / "catalog"
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(textwrap.dedent(text))
    return load_entry(path)


def satellite_entry(tmp_path: Path, s3, labels: bool = False) -> object:
    return entry(tmp_path, "rio_s3", f"""
        name: rio_s3
        modality: satellite
        scans: {{path: "{s3.url}/rio/images/*.tif"}}
        chunks: [128, 128]
    """ + ("""
        labels: {path: "{dir}/../masks/{name}", mapping: {0: 0, 255: 1}, classes: [background, building]}
    """ if labels else ""))


def level0(store: Path, name: str = "image/0") -> np.ndarray:
    group = zarr.open_group(str(store), mode="r")
    return np.asarray((storage.reference(group) if name == storage.REFERENCE else group[name])[:])


def assert_unchanged_without_a_get(s3, loaded, store_of) -> None:
    """Discover the entry again and ingest every scan: each unchanged, not one object body fetched."""
    s3.forget_requests()
    for spec in discover_scans(loaded):
        assert ingest_scan(spec, store_of(spec)).status == "unchanged"
    assert s3.object_gets() == []


def test_catalog_list_reads_no_object_body(s3, tmp_path):
    s3.upload_tree(SAT / "images", "rio/images")
    s3.upload_tree(MRI, "brats")
    satellite_entry(tmp_path, s3)
    entry(tmp_path, "brats_s3", f"""
        name: brats_s3
        modality: mri
        scans: {{path: "{s3.url}/brats/brats_*", channels: {MRI_CHANNELS}, id: "{{name}}"}}
        labels: {{path: "{{scan}}/OTMultiClass.nii.gz", mapping: {{0: 0, 1: 1, 2: 2, 3: 3, 4: 4}},
                  classes: [bg, a, b, c, d]}}
    """)
    s3.forget_requests()
    result = CliRunner().invoke(app, ["catalog", "list", "--json", "--catalog", str(tmp_path / "catalog")])
    assert result.exit_code == 0, result.output
    rows = {row["dataset"]: row for row in json.loads(result.stdout)}
    assert rows["rio_s3"]["scans"] == 3 and rows["rio_s3"]["scan_error"] is None
    assert rows["brats_s3"]["scans"] == 2 and rows["brats_s3"]["scan_error"] is None
    assert s3.object_gets() == []  # listings and HEADs only: not one object body


def test_discovery_carries_urls_and_metadata_without_fetching(s3, tmp_path):
    s3.upload_tree(SAT, "rio")
    s3.forget_requests()
    specs = discover_scans(satellite_entry(tmp_path, s3, labels=True))
    assert [s.scan_id for s in specs] == [CHIP.format(n)[:-4] for n in (53, 54, 57)]
    assert specs[0].sources == (f"{s3.url}/rio/images/{CHIP.format(53)}",)
    (obj,) = specs[0].remote.objects
    etag = s3.client.head_object(Bucket=s3.bucket, Key=f"rio/images/{CHIP.format(53)}")["ETag"].strip('"')
    assert (obj.url, obj.size, obj.etag) == (specs[0].sources[0], (SAT / "images" / CHIP.format(53)).stat().st_size, etag)
    assert obj.mtime
    # labels "{dir}/../masks/{name}": the URL resolved as a path would be, its object listed
    assert specs[0].labels.sources == (f"{s3.url}/rio/masks/{CHIP.format(53)}",)
    assert specs[0].labels.remote.objects[0].size == (SAT / "masks" / CHIP.format(53)).stat().st_size
    assert s3.object_gets() == []


def test_unchanged_object_is_unchanged_without_download_and_changed_object_is_reingested(s3, tmp_path):
    key = f"rio/images/{CHIP.format(53)}"
    s3.put(key, SAT / "images" / CHIP.format(53))
    loaded = satellite_entry(tmp_path, s3)
    store = tmp_path / "chip.zarr"

    (spec,) = discover_scans(loaded)
    assert ingest_scan(spec, store).status == "ingested"
    with rasterio.open(SAT / "images" / CHIP.format(53)) as src:
        np.testing.assert_array_equal(level0(store), src.read())

    # the same bytes written again (new LastModified, same ETag): unchanged, and nothing fetched
    s3.put(key, SAT / "images" / CHIP.format(53))
    assert_unchanged_without_a_get(s3, loaded, lambda spec: store)

    # new content under the same key (a cached copy of the old one exists): re-ingested, new values
    s3.put(key, SAT / "images" / CHIP.format(54))
    (spec,) = discover_scans(loaded)
    assert ingest_scan(spec, store).status == "ingested"
    with rasterio.open(SAT / "images" / CHIP.format(54)) as src:
        np.testing.assert_array_equal(level0(store), src.read())
    record = storage.read_record(str(store))
    (recorded,) = record["source"]["files"]
    assert recorded["path"] == f"{s3.url}/{key}"
    assert recorded["etag"] == s3.client.head_object(Bucket=s3.bucket, Key=key)["ETag"].strip('"')
    assert "local" not in recorded

    assert_unchanged_without_a_get(s3, loaded, lambda spec: store)


def test_remote_channel_folders_and_labels_match_a_local_ingest(s3, tmp_path):
    s3.upload_tree(MRI, "brats")
    loaded = entry(tmp_path, "brats_s3", f"""
        name: brats_s3
        modality: mri
        scans: {{path: "{s3.url}/brats/brats_*", channels: {MRI_CHANNELS}, id: "{{name}}"}}
        labels: {{path: "{{scan}}/OTMultiClass.nii.gz", mapping: {{0: 0, 1: 1, 2: 2, 3: 3, 4: 4}},
                  classes: [bg, a, b, c, d]}}
        chunks: [32, 64, 64]
    """)
    specs = discover_scans(loaded)
    assert [s.scan_id for s in specs] == ["brats_2013_pat0003_1", "brats_2013_pat0005_1"]
    s3.forget_requests()
    for spec in specs:
        assert ingest_scan(spec, tmp_path / f"{spec.scan_id}.zarr").status == "ingested"
    # only what ingest reads: two channels and the label of each scan, each once (not the licence)
    fetched = sorted(s3.object_gets())
    assert len(fetched) == 6 and not any("License" in p for p in fetched), fetched

    subject = MRI / "brats_2013_pat0003_1"
    local = ScanSpec("ref", "mri", tuple(subject / c for c in MRI_CHANNELS), chunks=(32, 64, 64),
                     labels=specs[0].labels.__class__((subject / "OTMultiClass.nii.gz",), {i: i for i in range(5)},
                                                       ("bg", "a", "b", "c", "d")))
    ingest_scan(local, tmp_path / "ref.zarr")
    remote_store = tmp_path / "brats_2013_pat0003_1.zarr"
    np.testing.assert_array_equal(level0(remote_store), level0(tmp_path / "ref.zarr"))
    np.testing.assert_array_equal(level0(remote_store, "labels/reference"), level0(tmp_path / "ref.zarr", "labels/reference"))
    assert level0(remote_store).shape[0] == 2
    # provenance names the labels' objects, not the local cache copies they were read from
    recorded = zarr.open_group(str(remote_store), mode="r")["labels/reference"].attrs["tilewise"]["source"]
    assert recorded == [f"{s3.url}/brats/brats_2013_pat0003_1/OTMultiClass.nii.gz"]

    assert_unchanged_without_a_get(s3, loaded, lambda spec: tmp_path / f"{spec.scan_id}.zarr")


def test_remote_slice_folder_with_label_folder(s3, tmp_path):
    s3.upload_tree(EM, "isbi/isbi2012_train")
    loaded = entry(tmp_path, "isbi_s3", f"""
        name: isbi_s3
        modality: em
        scans: {{path: "{s3.url}/isbi/isbi2012_*/image", id: "{{parent}}"}}
        labels: {{path: "{{dir}}/label", mapping: {{255: 0, 0: 1}}, classes: [interior, membrane]}}
        chunks: [8, 512, 512]
    """)
    (spec,) = discover_scans(loaded)
    assert spec.scan_id == "isbi2012_train" and len(spec.remote.objects) == 8
    store = tmp_path / "em.zarr"
    assert ingest_scan(spec, store).status == "ingested"
    ref = ScanSpec("ref", "em", (EM / "image",), chunks=(8, 512, 512),
                   labels=spec.labels.__class__((EM / "label",), {255: 0, 0: 1}, ("interior", "membrane")))
    ingest_scan(ref, tmp_path / "ref.zarr")
    np.testing.assert_array_equal(level0(store), level0(tmp_path / "ref.zarr"))
    np.testing.assert_array_equal(level0(store, "labels/reference"), level0(tmp_path / "ref.zarr", "labels/reference"))

    # one slice replaced: the folder changed, so the scan is re-ingested with the new slice
    s3.put("isbi/isbi2012_train/image/3.png", EM / "image" / "5.png")
    (spec,) = discover_scans(loaded)
    assert ingest_scan(spec, store).status == "ingested"
    values = level0(store)
    np.testing.assert_array_equal(values[0, 3], level0(tmp_path / "ref.zarr")[0, 5])


def test_missing_channel_object_fails_only_its_scan_with_one_line(s3, tmp_path):
    s3.upload_tree(MRI, "brats")
    s3.client.delete_object(Bucket=s3.bucket, Key=f"brats/brats_2013_pat0005_1/{MRI_CHANNELS[1]}")
    loaded = entry(tmp_path, "brats_s3", f"""
        name: brats_s3
        modality: mri
        scans: {{path: "{s3.url}/brats/brats_*", channels: {MRI_CHANNELS}, id: "{{name}}"}}
    """)
    good, bad = discover_scans(loaded)
    assert ingest_scan(good, tmp_path / "good.zarr").status == "ingested"
    with pytest.raises(ScanError) as err:
        ingest_scan(bad, tmp_path / "bad.zarr")
    assert str(err.value) == f"{s3.url}/brats/brats_2013_pat0005_1/{MRI_CHANNELS[1]}: does not exist"
    assert not storage.exists(str(tmp_path / "bad.zarr"))


def test_unreadable_remote_object_is_named_by_its_url(s3, tmp_path):
    s3.put("rio/images/broken.tif", b"not a tiff at all")
    (spec,) = discover_scans(satellite_entry(tmp_path, s3))
    with pytest.raises(ScanError) as err:
        ingest_scan(spec, tmp_path / "broken.zarr")
    assert str(err.value).startswith(f"{s3.url}/rio/images/broken.tif: ") and "\n" not in str(err.value)


def test_unreachable_endpoint_is_a_one_line_scan_error(s3, tmp_path, monkeypatch):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    loaded = satellite_entry(tmp_path, s3)
    with pytest.raises(ScanError) as err:
        discover_scans(loaded)
    assert str(err.value).startswith(f"{s3.url}/rio/images/*.tif: ") and "\n" not in str(err.value)

    result = CliRunner().invoke(app, ["catalog", "list", "--json", "--catalog", str(tmp_path / "catalog")])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert row["scans"] is None and row["scan_error"].startswith(f"{s3.url}/rio/images/*.tif: ")


def test_a_failed_download_leaves_no_copy_taken_as_done(s3, tmp_path, monkeypatch):
    s3.upload_tree(EM, "isbi/isbi2012_train")
    loaded = entry(tmp_path, "isbi_s3", f"""
        name: isbi_s3
        modality: em
        scans: {{path: "{s3.url}/isbi/isbi2012_*/image", id: "{{parent}}"}}
    """)
    (spec,) = discover_scans(loaded)
    import s3fs

    real_get = s3fs.S3FileSystem._get_file
    calls = []

    async def failing_get(self, rpath, lpath, **kwargs):
        calls.append(rpath)
        if len(calls) == 4:
            raise ConnectionError("connection reset by peer")
        return await real_get(self, rpath, lpath, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_get_file", failing_get)
    s3fs.S3FileSystem.clear_instance_cache()  # a filesystem binds its sync methods when it is made
    # a reset connection may pass on a later try: RemoteUnavailable (a ConnectionError), not a ScanError
    with pytest.raises(RemoteUnavailable, match="isbi2012_train/image/.*connection reset"):
        ingest_scan(spec, tmp_path / "em.zarr")
    monkeypatch.setattr(s3fs.S3FileSystem, "_get_file", real_get)
    s3fs.S3FileSystem.clear_instance_cache()
    assert not any(p.name.startswith(".part-") for p in (Path(os.environ["TILEWISE_HOME"]) / "cache/remote").iterdir())
    s3.forget_requests()
    (spec,) = discover_scans(loaded)
    assert ingest_scan(spec, tmp_path / "em.zarr").status == "ingested"
    assert len(s3.object_gets()) == 8  # every slice fetched again, none taken from the broken attempt
    np.testing.assert_array_equal(level0(tmp_path / "em.zarr")[0, 7], iio.imread(EM / "image" / "7.png"))


@pytest.mark.slow
def test_ingest_flow_over_s3_isolates_bad_objects_and_skips_unchanged_ones(prefect_server, s3, tmp_path):
    from flows.ingest import ingest_flow

    good = SAT / "images" / CHIP.format(53)
    s3.put("scenes/a_good.tif", good)
    s3.put("scenes/b_not_a_tiff.tif", b"this is not a TIFF\n")
    s3.put("scenes/c_truncated.tif", good.read_bytes()[: good.stat().st_size // 3])
    entry(tmp_path, "scenes", f"""
        name: scenes
        modality: satellite
        scans: {{path: "{s3.url}/scenes/*.tif"}}
    """)
    root = tmp_path / "stores"
    state = ingest_flow("scenes", catalog=str(tmp_path / "catalog"), store_root=str(root), return_state=True)
    assert state.is_failed() and "2 of 3 scans failed" in state.message
    assert f"{s3.url}/scenes/b_not_a_tiff.tif: not a readable GeoTIFF" in state.message
    assert f"{s3.url}/scenes/c_truncated.tif: " in state.message
    outcomes = {o.scan_id: o for o in state.result(raise_on_failure=False)}
    assert outcomes["a_good"].status == "ingested"
    with rasterio.open(good) as src:
        np.testing.assert_array_equal(level0(Path(outcomes["a_good"].store)), src.read())

    s3.forget_requests()
    again = ingest_flow("scenes", catalog=str(tmp_path / "catalog"), store_root=str(root), return_state=True)
    statuses = {o.scan_id: o.status for o in again.result(raise_on_failure=False)}
    assert statuses == {"a_good": "unchanged", "b_not_a_tiff": "failed", "c_truncated": "failed"}
    # the good one is not fetched; the bad ones are read again, from the copies of the first run
    assert s3.object_gets() == []


def test_file_urls_are_read_in_place_not_copied(tmp_path):
    loaded = entry(tmp_path, "rio_file", f"""
        name: rio_file
        modality: satellite
        scans: {{path: "file://{SAT}/images/*.tif"}}
        labels: {{path: "file://{{dir}}/../masks/{{name}}", mapping: {{0: 0, 255: 1}}, classes: [background, building]}}
    """)
    specs = discover_scans(loaded)
    assert [s.scan_id for s in specs] == [CHIP.format(n)[:-4] for n in (53, 54, 57)]
    assert specs[0].sources == (SAT / "images" / CHIP.format(53),) and specs[0].remote is None
    assert specs[0].labels.sources == (SAT / "masks" / CHIP.format(53),) and specs[0].labels.remote is None


# ------------------------------------------------------------------ backfill over remote scans

def _noon(day: str) -> datetime:
    return datetime.fromisoformat(day + "T12:00:00").replace(tzinfo=timezone.utc)


def test_backfill_dates_remote_scans_from_their_listing(s3, tmp_path):
    from flows.backfill import in_range

    # files: each chip object dated by its LastModified
    s3.upload_tree(SAT / "images", "rio/images")
    for n, day in zip((53, 54, 57), ("2024-01-10", "2024-02-10", "2024-03-10")):
        s3.set_mtime(f"rio/images/{CHIP.format(n)}", _noon(day))
    # channel folders (prefixes): a scan is as new as its newest channel object
    s3.upload_tree(MRI, "brats")
    for subject, days in {"brats_2013_pat0003_1": ("2024-01-05", "2024-02-20"),
                          "brats_2013_pat0005_1": ("2024-03-01", "2024-03-02")}.items():
        for channel, day in zip(MRI_CHANNELS, days):
            s3.set_mtime(f"brats/{subject}/{channel}", _noon(day))
    sat = satellite_entry(tmp_path, s3)
    mri = entry(tmp_path, "brats_s3", f"""
        name: brats_s3
        modality: mri
        scans: {{path: "{s3.url}/brats/brats_*", channels: {MRI_CHANNELS}, id: "{{name}}"}}
    """)
    s3.forget_requests()
    feb = in_range(date(2024, 2, 1), date(2024, 2, 28))
    assert [s.scan_id for s in feb(sat, discover_scans(sat))] == [CHIP.format(54)[:-4]]
    assert [s.scan_id for s in feb(mri, discover_scans(mri))] == ["brats_2013_pat0003_1"]
    since_march = in_range(date(2024, 3, 1), None)
    assert [s.scan_id for s in since_march(sat, discover_scans(sat))] == [CHIP.format(57)[:-4]]
    assert [s.scan_id for s in since_march(mri, discover_scans(mri))] == ["brats_2013_pat0005_1"]
    assert s3.object_gets() == []  # dated from listings only: not one object body


def test_backfill_dates_remote_scans_from_their_url(s3, tmp_path):
    from flows.backfill import in_range

    s3.upload_tree(EM / "image", "isbi/em_20240110/image")
    s3.upload_tree(EM / "image", "isbi/em_20240210/image")
    loaded = entry(tmp_path, "isbi_dated", f"""
        name: isbi_dated
        modality: em
        scans: {{path: "{s3.url}/isbi/em_*/image", id: "{{parent}}",
                 date: {{from: path, pattern: "em_(\\\\d{{8}})/", format: "%Y%m%d"}}}}
    """)
    s3.forget_requests()
    select = in_range(date(2024, 2, 1), None)
    assert [s.scan_id for s in select(loaded, discover_scans(loaded))] == ["em_20240210"]
    assert s3.object_gets() == []


@pytest.mark.slow
def test_backfill_flow_over_s3_ingests_exactly_the_scans_in_range(prefect_server, s3, tmp_path):
    from flows.backfill import backfill_flow

    s3.upload_tree(SAT / "images", "rio/images")
    for n, day in zip((53, 54, 57), ("2024-01-10", "2024-02-10", "2024-03-10")):
        s3.set_mtime(f"rio/images/{CHIP.format(n)}", _noon(day))
    satellite_entry(tmp_path, s3)  # no model: the chain ingests, infer is skipped
    root = tmp_path / "stores"
    s3.forget_requests()
    state = backfill_flow("rio_s3", catalog=str(tmp_path / "catalog"), since="2024-02-01", until="2024-02-28",
                          store_root=str(root), return_state=True)
    assert state.is_completed(), state.message
    rows = state.result()
    assert {(o.scan_id, o.step, o.status) for o in rows if o.scan_id != "*"} == \
        {(CHIP.format(54)[:-4], "ingest", "ingested")}
    assert [p.name for p in (root / "rio_s3").iterdir() if p.suffix == ".zarr"] == [CHIP.format(54)[:-4] + ".zarr"]
    with rasterio.open(SAT / "images" / CHIP.format(54)) as src:
        np.testing.assert_array_equal(level0(root / "rio_s3" / (CHIP.format(54)[:-4] + ".zarr")), src.read())
    assert s3.object_gets() == [f"/{s3.bucket}/rio/images/{CHIP.format(54)}"]  # only the selected scan is fetched


def test_remote_mtime_forms_read_as_one_instant():
    from tasks.ingest.remote import RemoteObject, RemoteScan

    noon = _noon("2024-02-10")
    forms = [noon.isoformat(), "2024-02-10T12:00:00Z", "2024-02-10T12:00:00", str(noon.timestamp()),
             "2024-02-10T13:00:00+01:00"]
    assert [RemoteObject("s3://b/k", 1, mtime=m).modified() for m in forms] == [noon] * len(forms)
    assert RemoteObject("s3://b/k", 1, mtime="yesterday").modified() is None
    scan = RemoteScan("s3://b/p", (RemoteObject("s3://b/p/a", 1, mtime=forms[0]), RemoteObject("s3://b/p/b", None),
                                   RemoteObject("s3://b/p/c", 1, mtime="2024-02-11T00:00:00Z")), ("p",))
    assert scan.newest_mtime() == _noon("2024-02-10").replace(hour=0, day=11)


# ------------------------------------------------------------------ tilewise ingest --source URL

def test_cli_ingest_of_an_s3_object_then_unchanged_without_a_fetch(s3, tmp_path):
    key = f"rio/images/{CHIP.format(53)}"
    s3.put(key, SAT / "images" / CHIP.format(53))
    store = tmp_path / "chip.zarr"
    result = CliRunner().invoke(app, ["ingest", f"{s3.url}/{key}", "--store", str(store)])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"ingested: {store} (satellite, ")  # told from the object's GeoTIFF header
    with rasterio.open(SAT / "images" / CHIP.format(53)) as src:
        np.testing.assert_array_equal(level0(store), src.read())
    (recorded,) = storage.read_record(str(store))["source"]["files"]
    assert recorded["path"] == f"{s3.url}/{key}"  # the URL as given, not "s3:/..."

    s3.forget_requests()
    again = CliRunner().invoke(app, ["ingest", f"{s3.url}/{key}", "--store", str(store), "--modality", "satellite"])
    assert again.exit_code == 0, again.output
    assert again.stdout.startswith(f"unchanged: {store} (satellite, ")
    assert s3.object_gets() == []


def test_cli_ingest_of_s3_channel_objects_and_a_slice_prefix(s3, tmp_path):
    s3.upload_tree(MRI, "brats")
    s3.upload_tree(EM / "image", "isbi/image")
    subject = f"{s3.url}/brats/brats_2013_pat0003_1"
    result = CliRunner().invoke(app, ["ingest", *(f"{subject}/{c}" for c in MRI_CHANNELS),
                                      "--store", str(tmp_path / "mri.zarr"), "--chunks", "32,64,64"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"ingested: {tmp_path / 'mri.zarr'} (mri, shape 2x")
    local = ScanSpec("ref", "mri", tuple(MRI / "brats_2013_pat0003_1" / c for c in MRI_CHANNELS), chunks=(32, 64, 64))
    ingest_scan(local, tmp_path / "ref.zarr")
    np.testing.assert_array_equal(level0(tmp_path / "mri.zarr"), level0(tmp_path / "ref.zarr"))

    result = CliRunner().invoke(app, ["ingest", f"{s3.url}/isbi/image/", "--store", str(tmp_path / "em.zarr")])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"ingested: {tmp_path / 'em.zarr'} (em, shape 1x8x512x512")
    np.testing.assert_array_equal(level0(tmp_path / "em.zarr")[0, 7], iio.imread(EM / "image" / "7.png"))


def test_cli_ingest_of_a_missing_s3_object_is_one_line(s3, tmp_path):
    s3.upload_tree(MRI / "brats_2013_pat0003_1", "brats/pat3")
    runner = CliRunner()
    for args, missing in [([f"{s3.url}/rio/nope.tif"], f"{s3.url}/rio/nope.tif"),
                          ([f"{s3.url}/brats/pat3/{MRI_CHANNELS[0]}", f"{s3.url}/brats/pat3/T2.nii.gz"],
                           f"{s3.url}/brats/pat3/T2.nii.gz")]:
        result = runner.invoke(app, ["ingest", *args, "--store", str(tmp_path / "x.zarr")])
        assert result.exit_code == 1, result.output
        assert result.output.strip().splitlines()[-1] == f"error: {missing}: does not exist"
        assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
        assert not (tmp_path / "x.zarr").exists()
    mixed = runner.invoke(app, ["ingest", str(MRI / "brats_2013_pat0003_1" / MRI_CHANNELS[0]),
                                f"{s3.url}/brats/pat3/{MRI_CHANNELS[1]}", "--store", str(tmp_path / "x.zarr")])
    assert mixed.exit_code == 1 and "all local paths or all URLs" in mixed.output


def test_cli_ingest_takes_one_remote_scan_and_reads_file_urls_in_place(s3, tmp_path):
    s3.upload_tree(MRI, "brats")
    runner = CliRunner()
    pattern = runner.invoke(app, ["ingest", f"{s3.url}/brats/brats_*", "--store", str(tmp_path / "x.zarr")])
    assert pattern.exit_code == 1 and "is a pattern; ingest takes one scan" in pattern.output
    apart = runner.invoke(app, ["ingest", f"{s3.url}/brats/brats_2013_pat0003_1/{MRI_CHANNELS[0]}",
                                f"{s3.url}/brats/brats_2013_pat0005_1/{MRI_CHANNELS[1]}", "--store", str(tmp_path / "x.zarr")])
    assert apart.exit_code == 1 and "is not directly under" in apart.output and "Traceback" not in apart.output
    local = runner.invoke(app, ["ingest", f"file://{SAT}/images/{CHIP.format(53)}", "--store", str(tmp_path / "f.zarr")])
    assert local.exit_code == 0, local.output
    assert storage.read_record(str(tmp_path / "f.zarr"))["source"]["files"][0]["path"] == str(SAT / "images" / CHIP.format(53))


def test_a_store_on_s3_is_inferred_resumed_and_equal_to_a_local_one(s3, tmp_path):
    """Stores on object storage (TILEWISE_STORE_ROOT=s3://...): one-process inference writes the same
    probabilities, labels, label pyramid and done marks to S3 as to a local folder, and a run stopped
    half-way resumes from the chunks done on S3 (their marks listed there)."""
    from tasks.engine.infer import EngineConfig, finish, infer_scan, prepare, run_chunks
    from tasks.engine.model_io import LoadedModel, ModelCard
    from tests.test_engine import conv_net

    slices = tmp_path / "slices"
    slices.mkdir()
    for i in (0, 1):
        (slices / f"{i}.png").write_bytes((EM / "image" / f"{i}.png").read_bytes())
    spec = ScanSpec("em", "em", (slices,), chunks=(2, 256, 256))  # 4 chunks
    local, remote = str(tmp_path / "em.zarr"), f"{s3.url}/stores/em.zarr"
    ingest_scan(spec, local)
    ingest_scan(spec, remote)
    model = LoadedModel(conv_net(2, 1, 2), ModelCard(spatial_dims=2, classes=["interior", "membrane"]), "test:conv")
    config = EngineConfig(tile=(128, 128), overlap=0.25)
    assert infer_scan(local, model, config).status == "inferred"

    prep = prepare(remote, model, config)
    half = set(list(prep.todo)[: len(prep.todo) // 2])
    run_chunks(prep, model, half)  # a run that stopped half-way: some chunks done, no completion mark
    assert not storage.is_complete(f"{remote}/prediction")
    again = prepare(remote, model, config)
    assert again.resumed and set(again.todo) == set(prep.todo) - half
    result = infer_scan(remote, model, config)
    assert result.status == "resumed" and storage.is_complete(f"{remote}/prediction")
    for name in ("prediction/probabilities", "prediction/labels", "prediction/done", "labels/prediction/0",
                 "labels/prediction/1"):
        np.testing.assert_array_equal(level0(remote, name), level0(local, name), err_msg=name)
    assert level0(remote, "prediction/done").all()

    # A whole run on S3 writes the label pyramid as chunks finish, without reading a chunk back.
    fresh = f"{s3.url}/stores/em-fresh.zarr"
    ingest_scan(spec, fresh)
    s3.forget_requests()
    assert infer_scan(fresh, model, config).status == "inferred"
    got = [(m, p) for m, p, _ in s3.server.requests if "/prediction/" in p and "/c/" in p]
    assert not [r for r in got if r[0] in ("GET", "HEAD")], got  # no chunk of the prediction read
    assert sum(1 for m, p in got if m == "PUT" and "/labels/prediction/0/c/" in p) == 4  # level 0's 4 chunks
    for name in ("labels/prediction/0", "labels/prediction/1"):
        np.testing.assert_array_equal(level0(fresh, name), level0(local, name), err_msg=name)
