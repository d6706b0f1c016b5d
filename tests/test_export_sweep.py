"""Every exporter x every prediction kind, through the CLI: a file, or one line (exit 1) naming the
store and the problem, never a traceback.

Prediction kinds: a semantic model's (probabilities + labels) on a georeferenced 2D raster, on a 2D
raster without a CRS and on a 3D NIfTI volume, the georeferenced one with a dense-CRF output or with
instances labelled from it (``tilewise instances``) beside it, and an instance model's (class
labels, instance ids and their table, NO probabilities) from a detector on a 2D raster and on a 3D
stack. What each format can hold is stated here from the formats themselves, independently of the
exporters' checks: NIfTI holds a 3D volume with an affine (our NIfTI source), GeoTIFF and GeoJSON a
2D raster with a CRS, OME-TIFF any 2D/3D array, zarr the label image only; probabilities exist only
for a semantic model; instance polygons need instances and a 2D raster with a CRS.
"""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from flows.cli import app
from tasks.engine.infer import EngineConfig
from tasks.instances.detect import infer_instances
from tasks.instances.from_semantic import instances_from_prediction
from tests.cli_output import without_home
from tests.test_engine import make_scan
from tests.test_export import write_prediction
from tests.test_instances_detect import PerfectDetector, drawn, geotiff_scan, instance_model

CLASSES = ["background", "a", "b"]
# kind -> (spatial dims, georeferenced 2D raster, NIfTI volume, has probabilities, has instances)
KINDS = {
    "semantic-2d": (2, True, False, True, False),
    "semantic-2d-crf": (2, True, False, True, False),
    "semantic-2d-instances": (2, True, False, True, True),
    "semantic-2d-plain": (2, False, False, True, False),
    "semantic-3d": (3, False, True, True, False),
    "detector-2d": (2, True, False, False, True),
    "detector-3d": (3, False, True, False, True),
}
SUFFIX = {"nifti": ".nii.gz", "geotiff": ".tif", "tiff": ".ome.tif", "geojson": ".geojson", "gpkg": ".gpkg"}
CASES = [(fmt, what) for fmt in ("nifti", "geotiff", "tiff", "geojson", "gpkg", "zarr")
         for what in ("labels", "probabilities", "instances")]


def columns_3d() -> np.ndarray:
    """Four objects through five sections (a stack a 2D detector links across Z)."""
    ids = np.zeros((5, 40, 48), np.int64)
    yy, xx = np.mgrid[:40, :48]
    for v, (y, x) in enumerate([(10, 10), (25, 30), (30, 12), (20, 20)], start=1):
        for z in range(5):
            ids[z][((yy - y) ** 2 + (xx - x - z) ** 2 <= 25) & (ids[z] == 0)] = v
    return ids


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("sweep")
    ids2 = drawn(shape=(96, 100), seed=5)
    labels2 = np.where(ids2 > 0, 1 + ids2 % 2, 0).astype(np.uint8)
    ids3 = columns_3d()
    labels3 = np.where(ids3 > 0, 1 + ids3 % 2, 0).astype(np.uint8)
    out = {}
    out["semantic-2d"] = geotiff_scan(root, ids2, name="semantic2d")
    write_prediction(out["semantic-2d"], labels2, CLASSES)
    out["semantic-2d-crf"] = geotiff_scan(root, ids2, name="crf2d")
    write_prediction(out["semantic-2d-crf"], labels2, CLASSES)
    from tasks.refine.crf import CrfParams
    from tasks.refine.regions import refine_prediction

    refine_prediction(out["semantic-2d-crf"], CrfParams(iterations=1))
    out["semantic-2d-instances"] = geotiff_scan(root, ids2, name="components2d")
    write_prediction(out["semantic-2d-instances"], labels2, CLASSES)
    instances_from_prediction(out["semantic-2d-instances"], min_size=1)
    # a raster without a CRS (a plain TIFF): nothing to georeference
    out["semantic-2d-plain"] = make_scan(root, ids2[None].astype(np.float32), (64, 64), name="plain2d")
    write_prediction(out["semantic-2d-plain"], labels2, CLASSES)
    out["semantic-3d"] = make_scan(root, ids3[None].astype(np.float32), (2, 32, 32), name="semantic3d")
    write_prediction(out["semantic-3d"], labels3, CLASSES)
    out["detector-2d"] = geotiff_scan(root, ids2, name="detector2d")
    infer_instances(out["detector-2d"], instance_model((48, 48)), EngineConfig(overlap=0.25, pad="constant"),
                    detector=PerfectDetector())
    out["detector-3d"] = make_scan(root, ids3[None].astype(np.float32), (2, 32, 32), name="detector3d")
    infer_instances(out["detector-3d"], instance_model((32, 32)), EngineConfig(overlap=0.25, pad="constant"),
                    detector=PerfectDetector())
    return out


def fits(kind: str, fmt: str, what: str) -> bool:
    dims, geo2d, nifti3d, probabilities, instances = KINDS[kind]
    if what == "probabilities" and not probabilities:
        return False
    if what == "instances":
        return fmt in ("geojson", "gpkg") and instances and geo2d
    if fmt == "zarr":
        return what == "labels"
    if fmt == "gpkg":
        return False  # polygons of instances only
    if fmt == "nifti":
        return nifti3d
    if fmt == "geotiff":
        return geo2d
    if fmt == "geojson":
        return geo2d and what == "labels"
    return True  # OME-TIFF: any 2D/3D array


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_exporter_writes_a_file_or_says_one_line(stores, tmp_path, kind):
    runner = CliRunner()
    wrong = []
    for fmt, what in CASES:
        store = stores[kind]
        out = tmp_path / f"{fmt}-{what}{SUFFIX.get(fmt, '')}"
        args = ["export", "--store", store, "--format", fmt, "--what", what, "--force"]
        if fmt != "zarr":
            args += ["--out", str(out)]
        result = runner.invoke(app, args)
        text = without_home(result.output)
        case = f"{kind} {fmt} --what {what}"
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            wrong.append(f"{case}: traceback ({type(result.exception).__name__}: {result.exception})")
            continue
        if fits(kind, fmt, what):
            made = fmt == "zarr" or (out.exists() and out.stat().st_size > 0)
            if result.exit_code != 0 or not made:
                wrong.append(f"{case}: expected a file, got exit {result.exit_code}: {text}")
        else:
            lines = text.splitlines()
            if result.exit_code != 1 or len(lines) != 1 or store not in lines[0] or out.exists():
                wrong.append(f"{case}: expected one line naming the store, got exit {result.exit_code}: {text!r}")
    assert not wrong, "\n".join(wrong)
