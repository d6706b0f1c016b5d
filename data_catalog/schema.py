"""Typed schema of a data-catalog entry (one YAML file per dataset).

The YAML is turned into these pydantic models once, at the edge; everything downstream receives
typed objects. Paths inside an entry are relative to the YAML file's folder unless they are
absolute or an fsspec URL (``s3://…``, ``gs://…``, ``file://…``).

Spatial shapes and chunk sizes are always given in array order: (Z, Y, X) for volumes, (Y, X)
for rasters; never NIfTI's (i, j, k) = (X, Y, Z).
"""

from __future__ import annotations

import datetime as _dt
import re
import string
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Modality = Literal["mri", "em", "satellite"]
ReaderKind = Literal["nifti", "tiff", "slices", "geotiff"]
Architecture = Literal["unet", "deeplab", "maskrcnn"]
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # dataset and registered-model names (no '/', '@', spaces)


class _Strict(BaseModel):
    # A misspelt key is an error, not a silently ignored option.
    model_config = ConfigDict(extra="forbid", frozen=True)


def template_fields(value: str, allowed: tuple[str, ...]) -> list[str]:
    """The field names of a ``str.format`` template, each checked to be a plain ``{field}`` of
    ``allowed``: attribute or index access (``{stem.upper}``, ``{name[0]}``), conversions (``!r``),
    format specs and positional fields are refused, so a template can only insert the values it names.
    Raises ValueError with the reason."""
    try:
        parts = list(string.Formatter().parse(value))
    except ValueError as exc:
        raise ValueError(f"not a valid template ({exc})") from None
    names = []
    for _, field, spec, conversion in parts:
        if field is None:
            continue
        shown = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        if field not in allowed:
            hint = ("attribute or index access is not allowed" if re.search(r"[.\[]", field)
                    else "unknown template field")
            raise ValueError(f"{hint}: {shown}; use " + ", ".join("{" + a + "}" for a in allowed))
        if conversion or spec:
            raise ValueError(f"conversions and format specs are not allowed: {shown}; use {{{field}}}")
        names.append(field)
    return names


class ScanDate(_Strict):
    """The date of a scan, for ``tilewise backfill --since/--until``.

    ``from: mtime`` (default): the modification time of the matched file or folder, as a local date.
    ``from: path``: ``pattern`` is a regular expression searched in the matched path (forward slashes)
    with exactly one group, parsed with ``format`` (strptime, default ``%Y-%m-%d``), e.g.
    ``{from: path, pattern: "(\\d{8})", format: "%Y%m%d"}`` for ``.../scan_20240131.tif``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    source: Literal["mtime", "path"] = Field(default="mtime", alias="from")
    pattern: str | None = Field(default=None, description="regex with one group holding the date (from: path)")
    format: str = Field(default="%Y-%m-%d", description="strptime format of the group (from: path)")

    @field_validator("pattern")
    @classmethod
    def _one_group(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            groups = re.compile(value).groups
        except re.error as exc:
            raise ValueError(f"not a valid regular expression ({exc})") from None
        if groups != 1:
            raise ValueError(f"must have exactly one group (the date), has {groups}")
        return value

    @field_validator("format")
    @classmethod
    def _strptime_format(cls, value: str) -> str:
        sample = _dt.datetime(2024, 1, 31)
        try:
            ok = _dt.datetime.strptime(sample.strftime(value), value).date() == sample.date()
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"strptime format {value!r} does not give a date (it needs year, month and day)")
        return value

    @model_validator(mode="after")
    def _pattern_iff_path(self) -> "ScanDate":
        if self.source == "path" and self.pattern is None:
            raise ValueError("from: path needs a 'pattern' with one group holding the date")
        if self.source == "mtime" and self.pattern is not None:
            raise ValueError("'pattern' is only used with from: path")
        return self

    def from_path(self, path: str) -> _dt.date:
        """The date in ``path`` (``from: path``); ValueError naming the path when absent or unparsable."""
        text = str(path).replace("\\", "/")
        match = re.search(self.pattern or "", text)
        if match is None or match.group(1) is None:
            raise ValueError(f"no date matching {self.pattern!r} in {text}")
        try:
            return _dt.datetime.strptime(match.group(1), self.format).date()
        except ValueError as exc:
            raise ValueError(f"{match.group(1)!r} in {text} is not a date in format {self.format!r} ({exc})") from None


class ScanSource(_Strict):
    """Where the scans of a dataset appear.

    ``path`` is a glob (or fsspec URL with a glob); each match is one scan. A match is a file
    (NIfTI, TIFF stack, GeoTIFF), a folder of 2D slices (EM), or, when ``channels`` is given, a
    folder holding one file per channel (e.g. BraTS FLAIR + T1c), stacked in the listed order.
    """

    path: str = Field(min_length=1)
    channels: list[str] | None = Field(
        default=None, description="file names (relative to each matched folder), in channel order"
    )
    id: str = Field(
        default="{stem}",
        description="scan id template; fields: {stem} (name without extension), {name}, {parent}; "
                    "the id names the store (<dataset>/<id>.zarr), so no '/', '\\' or '..'",
    )
    date: ScanDate = Field(default=ScanDate(), description="where a scan's date comes from (backfill ranges)")

    @field_validator("channels")
    @classmethod
    def _channels_unique(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if not value:
                raise ValueError("must list at least one channel file")
            if len(set(value)) != len(value):
                raise ValueError("channel files must be distinct")
        return value

    @field_validator("id")
    @classmethod
    def _id_template(cls, value: str) -> str:
        if not template_fields(value, ("stem", "name", "parent")):
            raise ValueError("must contain {stem}, {name} or {parent} (a fixed id would give every scan one store)")
        if "/" in value or "\\" in value or ".." in value:
            raise ValueError("must not contain '/', '\\' or '..' (the id is a file name inside the dataset's store folder)")
        return value


class LabelSource(_Strict):
    """Reference labels for the scans, when they exist.

    ``path`` is a template resolved per scan (fields: {scan} the matched path, {dir} its parent
    folder, {name}, {stem}); ``mapping`` maps each value found in the label files to a class
    index; ``classes`` names the class indices in order.
    """

    path: str = Field(min_length=1)
    mapping: dict[int, int]
    classes: list[str] = Field(min_length=2)
    instance_classes: list[str] | None = Field(
        default=None, description="classes whose connected components are instances (Mask R-CNN); "
                                  "default: every class but the first")
    boundary_class: str | None = Field(
        default=None, description="the class that marks cell boundaries (EM): evaluate scores it as the ISBI "
                                  "2012 challenge does (pixel error, V_rand, V_info, warping error)")
    stuff_classes: list[str] | None = Field(
        default=None, description="amorphous classes (roads, water, membrane): with instance_classes (the "
                                  "'things') they make the panoptic output and PQ")
    regions: dict[str, list[str]] | None = Field(
        default=None, description="named unions of classes scored as one (BraTS: whole_tumour, tumour_core, "
                                  "enhancing_tumour); evaluate reports each region's Dice and IoU")

    @field_validator("path")
    @classmethod
    def _path_template(cls, value: str) -> str:
        template_fields(value, ("scan", "dir", "name", "stem"))
        return value

    @model_validator(mode="after")
    def _mapping_targets_are_classes(self) -> "LabelSource":
        bad = sorted({c for c in self.mapping.values() if not 0 <= c < len(self.classes)})
        if bad:
            raise ValueError(
                f"mapping targets {bad} are not class indices 0..{len(self.classes) - 1} of 'classes'"
            )
        unknown = [c for c in self.instance_classes or [] if c not in self.classes]
        if unknown:
            raise ValueError(f"instance_classes {unknown} are not in 'classes'")
        if self.boundary_class is not None and self.boundary_class not in self.classes:
            raise ValueError(f"boundary_class {self.boundary_class!r} is not in 'classes'")
        unknown = [c for c in self.stuff_classes or [] if c not in self.classes]
        if unknown:
            raise ValueError(f"stuff_classes {unknown} are not in 'classes'")
        for region, members in (self.regions or {}).items():
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", region):
                raise ValueError(f"region name {region!r}: letters, digits, _ . - only (it names a metric)")
            unknown = [c for c in members if c not in self.classes]
            if unknown or not members:
                raise ValueError(f"region {region!r}: {unknown or 'no classes'} " +
                                 ("are not in 'classes'" if unknown else "(list at least one class)"))
        both = sorted(set(self.stuff_classes or []) & set(self.instance_classes or []))
        if both:
            raise ValueError(f"{both} cannot be both a thing (instance_classes) and stuff (stuff_classes)")
        return self


class ReaderOptions(_Strict):
    """How to read the files. Everything is optional; the modality picks sensible defaults."""

    kind: ReaderKind | None = Field(default=None, description="override the reader chosen by modality")
    spacing: list[float] | None = Field(
        default=None, description="physical pixel size in array order (Z, Y, X) or (Y, X), when files lack it"
    )
    unit: str | None = Field(default=None, description="unit of spacing, e.g. nanometer, millimeter")
    band_names: list[str] | None = None

    @field_validator("spacing")
    @classmethod
    def _positive(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (not value or any(v <= 0 for v in value)):
            raise ValueError("spacing values must be positive")
        return value


class ModelRef(_Strict):
    """The dataset's model in the registry. One source of truth for its name: training registers
    under :func:`entry_model_name` and inference / nightly read ``models:/<that name>@<alias>``.

    ``name`` is optional and defaults to ``<dataset>-<architecture>``; set it to share a model between
    datasets or to keep an existing registered name. ``reprocess_on_new_champion``: when the alias
    moves to a new version, the nightly job re-runs the scans already predicted by an older one
    (True, default) or uses the new champion for new and changed scans only (False)."""

    name: str | None = Field(default=None, pattern=NAME_PATTERN,
                             description="registered model name; default <dataset>-<architecture>")
    alias: str = Field(default="champion", pattern=NAME_PATTERN)
    architecture: Architecture = "unet"
    reprocess_on_new_champion: bool = True


class Tiling(_Strict):
    """How the engine tiles a scan. ``dask``: run inference on a Dask cluster, ``local`` or ``local:N``
    (a local cluster of N worker processes, default 2) or a scheduler address (``tcp://host:8786``);
    None (default) runs in the calling process. ``skip_empty``: see ``tasks.engine.skip``."""

    tile: list[int] | None = None
    overlap: float = Field(default=0.5, ge=0.0, lt=1.0)
    blend: Literal["gaussian", "constant"] = "gaussian"
    batch: int = Field(default=4, ge=1)
    pad: Literal["reflect", "constant"] = "reflect"
    dask: str | None = Field(default=None, description="local, local:N or a Dask scheduler address")
    skip_empty: Literal["auto", "off", "corner"] | float = Field(
        default="auto", description="tiles whose input is all empty are not run: auto (the source's declared "
                                    "nodata, e.g. GeoTIFF), off, corner (each channel's value at the first voxel: "
                                    "skull-stripped MRI) or a background value every channel holds there")

    @field_validator("dask")
    @classmethod
    def _dask_address(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if re.fullmatch(r"local(:[0-9]+)?", value):  # not startswith: localhost:8786 is a scheduler
            if re.fullmatch(r"local:0+", value):
                raise ValueError(f"must be local, local:N (N >= 1) or a scheduler address, got {value!r}")
        elif not re.fullmatch(r"([a-z]+://)?[^\s/:]+:[0-9]+", value):
            raise ValueError(f"a scheduler address is [tcp://]HOST:PORT, got {value!r}")
        return value

    @field_validator("tile")
    @classmethod
    def _tile_positive(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or any(v <= 0 for v in value)):
            raise ValueError("tile sizes must be positive")
        return value


class Calibration(_Strict):
    """How ``train`` / ``tilewise calibrate`` calibrate the dataset's model (tasks/calibration):
    cubic (the ISBI 2012 winner's monotone cubic; one per class then renormalised for more than two
    classes), isotonic, temperature, auto (the lowest held-out NLL of all), none (no calibration)."""

    method: Literal["cubic", "isotonic", "temperature", "auto", "none"] = "cubic"


class Refine(_Strict):
    """Post-processing of the calibrated probabilities after ``infer``: the fully connected CRF
    (Krähenbühl & Koltun 2011, as in DeepLab), written to ``prediction/crf`` beside the prediction.
    Off by default: on the held-out benchmarks (README, "Training") it lowered building IoU and
    erased EM membranes. Distances in pixels, intensities in standard deviations of the scan."""

    crf: bool = False
    iterations: int = Field(default=5, ge=1, le=50)
    smoothness_sigma: float = Field(default=3.0, gt=0)
    smoothness_weight: float = Field(default=3.0, ge=0)
    appearance_sigma: float = Field(default=40.0, gt=0)
    appearance_intensity: float = Field(default=0.5, gt=0)
    appearance_weight: float = Field(default=5.0, ge=0)

    def params(self) -> dict:
        return self.model_dump(exclude={"crf"})


class Instances(_Strict):
    """Objects from the dataset's semantic prediction, after ``infer`` (tasks/instances): ``components``
    (connected components of each class in ``classes``, default ``labels.instance_classes``, out of
    core), ``watershed`` (EM: a seeded watershed of the calibrated ``membrane_class`` probability into
    cells, default ``labels.boundary_class``) or ``none``. Objects smaller than ``min_size`` pixels
    (voxels) are dropped. A Mask R-CNN model (``model.architecture: maskrcnn``) makes instances itself
    and ignores this section."""

    method: Literal["components", "watershed", "none"] = "components"
    classes: list[str] | None = None
    min_size: int = Field(default=16, ge=1)
    membrane_class: str | None = None
    # watershed: seeds where the membrane probability is below seed_threshold; the map median-filtered
    # (size) first. Unset: the values tuned on the model version's validation sections (tasks/instances/
    # tuning.py), else 0.3 and no filter.
    seed_threshold: float | None = Field(default=None, gt=0, lt=1)
    median: int | None = Field(default=None, ge=0)


class Export(_Strict):
    """What the nightly job exports per scan: the class labels in ``format``, and the instances (one
    polygon per object, with its table's attributes) as ``instances`` (geojson: EPSG:4326 per RFC
    7946; gpkg: GeoPackage in the source CRS) where the scan has them."""

    format: Literal["nifti", "geotiff", "tiff", "geojson", "zarr"]
    instances: Literal["geojson", "gpkg"] | None = None


class Reports(_Strict):
    """What a nightly or backfill run records in MLflow for the dataset: always one run per dataset
    per night (``nightly <date>``) holding every scan's status and metrics as a table
    (``summary/scans.json``, ``summary/scans.csv``) and the overlays of the worst-scoring scans.
    ``per_scan: true`` adds one run per evaluated scan (and per scan's instances), nested under it:
    for a few scans to browse one by one, not for thousands."""

    per_scan: bool = False


def _croniter():
    """Prefect's vendored croniter class (the code Prefect's ``CronSchedule`` validates with), loaded
    from its file without importing Prefect (~2 s) so that loading the catalog stays instant."""
    import importlib.util
    import sys
    from pathlib import Path

    if "_tilewise_croniter" not in sys.modules:
        spec = importlib.util.find_spec("prefect")
        path = Path(spec.submodule_search_locations[0]) / "_vendor" / "croniter" / "croniter.py" if spec else None
        if path is None or not path.is_file():  # a Prefect that moved it: import it the slow way
            from prefect._vendor.croniter import croniter

            return croniter
        mod_spec = importlib.util.spec_from_file_location("_tilewise_croniter", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        sys.modules["_tilewise_croniter"] = module
    return sys.modules["_tilewise_croniter"].croniter


class Schedule(_Strict):
    """When ``tilewise serve`` runs the dataset's nightly job: a five-field cron string (minute hour
    day month weekday) in an IANA time zone. Validated as Prefect validates a ``CronSchedule``
    (croniter, no random/hashed ``R``/``H`` fields; a zone of ``zoneinfo.available_timezones()``),
    so an entry that loads is one Prefect accepts."""

    cron: str = "0 2 * * *"
    timezone: str = "UTC"

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        if len(value.split()) != 5:
            raise ValueError("cron must have five fields (minute hour day month weekday)")
        if any(f.casefold() in ("r", "h") for f in value.split()) or not _croniter().is_valid(value):
            raise ValueError(f"not a valid cron string: {value!r} (minute 0-59, hour 0-23, day 1-31, month 1-12, "
                             "weekday 0-6)")
        return value

    @field_validator("timezone")
    @classmethod
    def _iana_zone(cls, value: str) -> str:
        import zoneinfo

        if value not in zoneinfo.available_timezones():
            raise ValueError(f"unknown time zone {value!r}; use an IANA name such as UTC or Europe/Paris")
        return value


class Training(_Strict):
    """Budget of the training the nightly job runs once for a dataset that has no model yet
    (``tilewise train`` takes the same defaults unless told otherwise): at most ``epochs`` epochs
    (>= 1) and ``max_minutes`` of wall-clock time (> 0)."""

    epochs: int = Field(default=30, ge=1)
    max_minutes: float = Field(default=20.0, gt=0)
    # How tiles are normalised (the card records it; the engine applies the same): ``zscore`` with
    # the training patches' mean and std, ``scan_percentile`` with each scan's own 1st / 99th
    # percentiles; ``auto``: scan_percentile for satellite semantic models (scenes differ in
    # brightness and colour balance), zscore otherwise.
    normalization: Literal["auto", "zscore", "scan_percentile"] = "auto"
    # Photometric augmentation (per-band gain, brightness, gamma: tasks/training/augment.py). Off by
    # default: on SpaceNet Rio within a 10-minute budget it cost held-out IoU (0.45 -> 0.38 with z-score,
    # 0.47 -> 0.33 with per-scan percentiles; benchmarks/train.py) while per-scan normalisation alone
    # already makes the model indifferent to a scene's brightness.
    photometric: Literal["on", "off"] = "off"


class CatalogEntry(_Strict):
    """One dataset of the catalog."""

    name: str = Field(pattern=NAME_PATTERN)
    modality: Modality
    description: str = ""
    scans: ScanSource
    labels: LabelSource | None = None
    reader: ReaderOptions = ReaderOptions()
    chunks: list[int] | None = Field(
        default=None, description="spatial chunk shape in array order; the modality's default if omitted"
    )
    model: ModelRef | None = None
    tiling: Tiling = Tiling()
    training: Training = Training()
    calibration: Calibration = Calibration()
    instances: Instances | None = None
    refine: Refine = Refine()
    export: Export | None = None
    reports: Reports = Reports()
    schedule: Schedule = Schedule()

    @field_validator("chunks")
    @classmethod
    def _chunks_positive(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (len(value) not in (2, 3) or any(v <= 0 for v in value)):
            raise ValueError("chunks must be 2 or 3 positive sizes, (Y, X) or (Z, Y, X)")
        return value

    @model_validator(mode="after")
    def _instances_classes_known(self) -> "CatalogEntry":
        inst = self.instances
        if inst is None or inst.method == "none":
            return self
        classes = self.labels.classes if self.labels else None
        if classes is None:
            if inst.classes is None and inst.method == "components":
                raise ValueError("instances: without labels, name the classes (instances.classes) to label")
            return self
        unknown = [c for c in (inst.classes or []) + ([inst.membrane_class] if inst.membrane_class else [])
                   if c not in classes]
        if unknown:
            raise ValueError(f"instances: {unknown} are not in labels.classes {classes}")
        if inst.method == "watershed" and not (inst.membrane_class or self.labels.boundary_class):
            raise ValueError("instances: watershed needs a membrane class (instances.membrane_class or "
                             "labels.boundary_class)")
        return self


def entry_model_name(entry: CatalogEntry, architecture: str | None = None) -> str:
    """The registered model name of a dataset: the one name training registers under and inference,
    calibration and the nightly job look up (``models:/<name>@<alias>``).

    ``model.name`` when the catalog sets it, else ``<dataset>-<architecture>``. A training with
    another ``architecture`` than the catalog's (``tilewise train --architecture``) registers under
    ``<dataset>-<that architecture>``: one registered model never mixes architectures, and the
    catalog's model stays what inference uses.
    """
    model = entry.model
    catalog_architecture = model.architecture if model else "unet"
    architecture = architecture or catalog_architecture
    if model is not None and model.name and architecture == catalog_architecture:
        return model.name
    return f"{entry.name}-{architecture}"


def entry_model_uri(entry: CatalogEntry) -> str | None:
    """``models:/<entry_model_name>@<alias>`` of a dataset with a ``model`` section, else None."""
    if entry.model is None:
        return None
    return f"models:/{entry_model_name(entry)}@{entry.model.alias}"
