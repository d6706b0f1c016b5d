"""Typed schema of a data-catalog entry (one YAML file per dataset).

The YAML is turned into these pydantic models once, at the edge; everything downstream receives
typed objects. Paths inside an entry are relative to the YAML file's folder unless they are
absolute or an fsspec URL (``s3://…``, ``gs://…``, ``file://…``).

Spatial shapes and chunk sizes are always given in array order: (Z, Y, X) for volumes, (Y, X)
for rasters; never NIfTI's (i, j, k) = (X, Y, Z).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Modality = Literal["mri", "em", "satellite"]
ReaderKind = Literal["nifti", "tiff", "slices", "geotiff"]


class _Strict(BaseModel):
    # A misspelt key is an error, not a silently ignored option.
    model_config = ConfigDict(extra="forbid", frozen=True)


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
        description="scan id template; fields: {stem} (name without extension), {name}, {parent}",
    )

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
        try:
            value.format(stem="s", name="n", parent="p")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"unknown template field {exc}; use {{stem}}, {{name}}, {{parent}}") from None
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

    @field_validator("path")
    @classmethod
    def _path_template(cls, value: str) -> str:
        try:
            value.format(scan="s", dir="d", name="n", stem="s")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"unknown template field {exc}; use {{scan}}, {{dir}}, {{name}}, {{stem}}"
            ) from None
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
    name: str
    alias: str = "champion"
    architecture: Literal["unet", "deeplab", "maskrcnn"] = "unet"


class Tiling(_Strict):
    tile: list[int] | None = None
    overlap: float = Field(default=0.5, ge=0.0, lt=1.0)
    blend: Literal["gaussian", "constant"] = "gaussian"
    batch: int = Field(default=4, ge=1)
    pad: Literal["reflect", "constant"] = "reflect"

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


class Export(_Strict):
    format: Literal["nifti", "geotiff", "tiff", "geojson", "zarr"]


class Schedule(_Strict):
    cron: str = "0 2 * * *"
    timezone: str = "UTC"

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, value: str) -> str:
        if len(value.split()) != 5:
            raise ValueError("cron must have five fields (minute hour day month weekday)")
        return value


class Training(_Strict):
    """Budget of the training the nightly job runs once for a dataset that has no model yet
    (``tilewise train`` takes the same defaults unless told otherwise)."""

    epochs: int = Field(default=30, ge=1)
    max_minutes: float = Field(default=20.0, gt=0)


class CatalogEntry(_Strict):
    """One dataset of the catalog."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
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
    export: Export | None = None
    schedule: Schedule = Schedule()

    @field_validator("chunks")
    @classmethod
    def _chunks_positive(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (len(value) not in (2, 3) or any(v <= 0 for v in value)):
            raise ValueError("chunks must be 2 or 3 positive sizes, (Y, X) or (Z, Y, X)")
        return value
