"""What made each output, and whether it is still the answer: the one place that says it per step.

Every output tilewise writes records what made it, and a step reports ``unchanged`` only when all of
that is what it would use now. Per step (README, "When a step recomputes"):

=========  ==================================================================================
ingest     the sources by content, in order (name relative to the scan, sha256; size and mtime or
           ETag only spare the hashing) and the options (reader, chunks, spacing, unit, channel
           names, label mapping and classes)                           -- :func:`ingest_options`
infer      the model (``models:/NAME/VERSION``, or a TorchScript file's sha256 and its card's),
           the parameters that change the numbers, the tile, the calibrator and the empty-tile
           rule; the scan is the group the prediction lives in (a re-ingest removes it)
                                                                       -- :func:`prediction_digest`
detect     an instance model's run: model, tile, overlap, pad, placement, score threshold
                                                                       -- :func:`detector_digest`
instances  the prediction (digest and completion time) and the method's parameters
                                                                       -- :func:`instances_digest`
panoptic   the instances' digest and the thing and stuff classes       -- :func:`panoptic_record`
crf        the prediction's digest, the CRF parameters and the threshold -- :func:`crf_digest`
evaluate   the prediction and instances it scored, the reference, and the catalog settings it
           reads (classes, boundary, instance and stuff classes)      -- :func:`scoring_settings`
export     the scan's content, the prediction, the format and its options (tasks/export/provenance.py)
=========  ==================================================================================

and, for every step, the **code version** that wrote it (``code_version`` in the output's record;
an output from before versions were recorded is version 1). When a change to tilewise alters what a
step writes, the same commit appends a :class:`Change` to that step's ``HISTORY``, and ``applies``
says which outputs it alters: those recompute on the next run, all others stay ``unchanged`` (an
upgrade that changes only float pyramids re-ingests float scans, not uint8 EM stacks).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable

STEPS = ("ingest", "infer", "detect", "instances", "panoptic", "crf", "evaluate", "export")
VERSION_KEY = "code_version"


@dataclass(frozen=True)
class Change:
    """A version of a step's code that writes other bytes than the version before it, for the
    outputs ``applies`` accepts (given the output's recorded attributes)."""

    version: int
    what: str
    applies: Callable[[dict[str, Any]], bool] = lambda record: True


def _float16_or_32_image(record: dict[str, Any]) -> bool:
    return str(record.get("dtype", "")) in ("float16", "float32")


def _skipped_empty_tiles(record: dict[str, Any]) -> bool:
    return record.get("skip_empty", "off") != "off"


HISTORY: dict[str, tuple[Change, ...]] = {
    "ingest": (
        Change(2, "pyramid levels of float16/float32 scans are block means summed in float64: float32's "
                  "extreme nodata (-3.4e38) no longer overflows to -inf (issue 18)", _float16_or_32_image),
    ),
    "infer": (
        Change(2, "the empty-tile rule takes a coarse pyramid value as proof of data only when it is finite "
                  "and clearly off the empty value; a float raster with extreme nodata was predicted as all "
                  "background (issue 18)", _skipped_empty_tiles),
    ),
    "detect": (),
    "instances": (),
    "panoptic": (),
    "crf": (),
    "evaluate": (),
    "export": (
        Change(2, "an OME-TIFF's UUID names its content instead of the time it was written: the same "
                  "prediction gives the same bytes", lambda record: record.get("format") == "tiff"),
    ),
}


def code_version(step: str) -> int:
    """The version of ``step``'s code that this tilewise writes (1 when it never changed)."""
    return max((c.version for c in HISTORY[step]), default=1)


def outdated(step: str, record: dict[str, Any] | None) -> list[str]:
    """The changes since the version that wrote ``record`` that alter it (empty: still current).
    ``record``: the output's attributes; one without ``code_version`` was written by version 1."""
    made = int((record or {}).get(VERSION_KEY, 1))
    return [c.what for c in HISTORY[step] if c.version > made and c.applies(record or {})]


def stamp(step: str) -> dict[str, int]:
    """What an output's record says about the code that wrote it."""
    return {VERSION_KEY: code_version(step)}


def digest(payload: Any) -> str:
    """sha256 of ``payload`` as canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()


# --- ingest --------------------------------------------------------------------------------------

def ingest_options(*, format_version: int, reader: str, chunks: list[int], spacing, unit, channel_names,
                   labels: dict[str, Any] | None) -> str:
    """The options of an ingest that change what it writes. ``labels``: {"mapping", "classes"} or
    None; the label files themselves are sources, compared by content like the image's."""
    return digest({"format_version": format_version, "reader": reader, "chunks": list(chunks),
                   "spacing": spacing, "unit": unit, "channel_names": channel_names, "labels": labels})


# --- infer ---------------------------------------------------------------------------------------

def prediction_digest(model: str, params: dict[str, Any], tile: list[int], calibrator: dict | str = "none",
                      empty_rule: dict | None = None) -> str:
    """A semantic prediction: ``model`` (LoadedModel.identity), ``params`` (EngineConfig.result_fields),
    the tile, the calibrator's record without its URI, the empty-tile rule's record. The calibrator
    and the rule enter only when there is one, so predictions made before either existed keep
    their digest."""
    payload: dict[str, Any] = {"model": model, "config": params, "tile": list(tile)}
    if calibrator != "none":
        payload["calibrator"] = calibrator
    if empty_rule is not None:
        payload["skip_empty"] = empty_rule
    return digest(payload)


def detector_digest(model: str, params: dict[str, Any], tile: list[int], score_threshold: float) -> str:
    """An instance model's prediction: only the parameters its tiles and merging read."""
    return digest({"model": model, "mode": "instances", "tile": list(tile), "score_threshold": score_threshold,
                   "config": {k: v for k, v in params.items() if k in ("overlap", "pad", "placement", "tile")}})


def model_file_identity(model_sha256: str, card: dict[str, Any] | None) -> str:
    """A TorchScript file by content: its sha256 and, when a card is beside it, the card's
    (normalisation, classes and tile change the numbers). Not its path: the same file under
    another folder is the same model."""
    identity = f"file:sha256:{model_sha256[:16]}"
    if card is not None:
        identity += f"#card:{digest(card)[:16]}"
    return identity


# --- instances, panoptic, CRF --------------------------------------------------------------------

def instances_digest(prediction: dict[str, Any], params: dict[str, Any]) -> str:
    """Objects made from ``prediction`` (its record: digest and completion time) with ``params``."""
    done = prediction.get("complete") or {}
    return digest({"prediction": prediction.get("digest"), "completed_at": done.get("at"), **params})


def panoptic_record(instances: str | None, things: list[int], stuff: list[int]) -> dict[str, Any]:
    """What a panoptic output is made of: the instances' digest, the thing and stuff class indices."""
    return {"digest": instances, "things": list(things), "stuff": list(stuff), **stamp("panoptic")}


def panoptic_record_of(recorded: dict[str, Any] | None) -> dict[str, Any] | None:
    """A recorded panoptic entry in :func:`panoptic_record`'s form, or None when there is none or
    the code that wrote it has changed since (then it is not what :func:`panoptic_record` asks for)."""
    if not recorded or outdated("panoptic", recorded):
        return None
    return {"digest": recorded.get("digest"), "things": list(recorded.get("things") or []),
            "stuff": list(recorded.get("stuff") or []), **stamp("panoptic")}


def crf_digest(prediction: str | None, params: dict[str, Any], threshold: float) -> str:
    return digest({"prediction": prediction, "params": params, "threshold": threshold})


# --- evaluate ------------------------------------------------------------------------------------

def scoring_settings(entry) -> dict[str, Any]:
    """The catalog settings an evaluation reads (a ``CatalogEntry``, a ``LoadedEntry`` or None):
    class names, the boundary class (ISBI scores), the instance and stuff classes (AP, PQ), the
    regions (unions of classes; only when set, so evaluations from before regions existed stay)."""
    entry = getattr(entry, "entry", entry)
    labels = getattr(entry, "labels", None)
    if labels is None:
        return {}
    return {"classes": list(labels.classes), "boundary_class": labels.boundary_class,
            "instance_classes": list(labels.instance_classes) if labels.instance_classes else None,
            "stuff_classes": list(labels.stuff_classes) if labels.stuff_classes else None,
            **({"regions": {k: list(v) for k, v in labels.regions.items()}} if labels.regions else {})}


def evaluation_current(prediction: dict[str, Any], reference: str, settings: dict[str, Any]) -> bool:
    """True when the prediction's recorded ``evaluation`` scored this very prediction, these
    instances (if any), against ``reference``, with these catalog ``settings``, by this code."""
    evaluation = prediction.get("evaluation") or {}
    instances = prediction.get("instances") or {}
    current_instances = instances.get("digest") if instances.get("complete") else None
    return bool(prediction.get("complete") and evaluation.get("prediction_digest") == prediction.get("digest")
                and evaluation.get("reference") == reference
                and evaluation.get("instances_digest") == current_instances
                and evaluation.get("settings") == settings
                and not outdated("evaluate", evaluation))


# --- export --------------------------------------------------------------------------------------

def scan_content(record: dict[str, Any]) -> str:
    """A scan group by what it was made of: the ingest options and its sources' names and sha256 in
    order -- not their paths, so the same bytes under another checkout or mount are the same scan."""
    done = record.get("complete") or {}
    files = [(f.get("role", "image"), f.get("name") or _basename(f.get("path", "")), f.get("sha256", ""))
             for f in (record.get("source") or {}).get("files", [])]
    return digest({"options": done.get("options_digest"), "files": files})


def _basename(path: str) -> str:
    return str(path).rstrip("/").rpartition("/")[2]
