"""Saving, registering, promoting and loading models through the MLflow registry.

Embedded default: MLflow on SQLite (``$TILEWISE_HOME/mlflow.db``) with artifacts under
``$TILEWISE_HOME/mlflow-artifacts``; ``MLFLOW_TRACKING_URI`` switches to a server.

Each trained model is logged once in its run, its weights stored once: an MLflow "models from
code" pyfunc (models/pyfunc_model.py) whose artifacts are a safetensors state dict and the model
card, with a free-shape signature and a small input example (:func:`small_example`). MLflow's tools
load it with ``mlflow.pyfunc.load_model`` (the pyfunc rebuilds the network from the card and loads
the tensors); tilewise downloads just those two files and does the same, so loading never
unpickles anything, whoever wrote the registry. Versions logged before issue 8 (an
``mlflow.pytorch`` model plus ``tilewise/weights.safetensors`` and ``tilewise/card.json`` in the
run) still load, from ``tilewise/``; tilewise never calls ``mlflow.pytorch.load_model``.
The run's ``tilewise/`` folder holds what comes later: the calibrator, the validation split
(models/calibrator_store.py).

A registered model per dataset and architecture (``<dataset>-<architecture>``). A new version
becomes ``champion`` only if its validation metric beats the current champion's; otherwise it is
``challenger``. The decision is stored as a tag on the version and on its run.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.card import LoadedModel, ModelCard
from models.quiet import quiet
from models.transient import is_transient

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
ARTIFACT_DIR = "tilewise"
CALIBRATOR_FILE = "calibrator.json"  # under ARTIFACT_DIR, written by models/calibrator_store.py
MODEL_NAME = "model"  # the logged MLflow model's name in its run
WEIGHTS_FILE, CARD_FILE = "weights.safetensors", "card.json"  # in the MLflow model's artifacts/ (or, versions
# logged before issue 8, in the run's ARTIFACT_DIR)
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


class RegistryError(Exception):
    """A model URI that cannot be resolved, said in one line."""


class ModelNotFound(RegistryError):
    """The registry answered: no such registered model, version or alias. The only "not found"."""


class RegistryUnavailable(ConnectionError):
    """The registry could not answer (connection refused, HTTP 5xx, database error): names the
    tracking URI and the cause. Never to be read as "no model": deliberately NOT a RegistryError,
    so ``except RegistryError`` (meaning "no such model") never swallows an outage; a
    ConnectionError, so the flows' transient-I/O retry applies to it."""


def _home() -> Path:
    """The tilewise home (models/home.py: the one resolver every layer uses)."""
    from models.home import tilewise_home

    return tilewise_home()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{_home() / 'mlflow.db'}"


def client():
    """An MlflowClient on the configured tracking server (the embedded SQLite one by default)."""
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        _home().mkdir(parents=True, exist_ok=True)
    user_set = "MLFLOW_TRACKING_URI" in os.environ
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if not user_set:  # MLflow exports what we set; keep "the user chose a server" readable
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        os.environ.pop("MLFLOW_REGISTRY_URI", None)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def artifact_root(uri: str | None = None) -> Path | None:
    """Where the artifacts of the experiments tilewise creates go, for a tracking URI that names a
    database (MLflow would otherwise put them in ``./mlruns`` of whatever folder the command ran
    in): ``mlflow-artifacts/`` next to a SQLite file (the embedded default: in the tilewise home),
    under the tilewise home for any other database. None for a tracking server (``http(s)://``,
    which has its own artifact store) or a file store (which keeps artifacts in its own folder)."""
    uri = uri or tracking_uri()
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""
    if scheme == "sqlite":
        # SQLAlchemy: sqlite:///rel.db is relative to the working folder, sqlite:////abs.db absolute
        database = uri.split("://", 1)[1].split("?", 1)[0].removeprefix("/")
        if database and database != ":memory:":
            return Path(os.path.abspath(database)).parent / "mlflow-artifacts"
        return _home() / "mlflow-artifacts"
    if scheme in ("postgresql", "mysql", "mssql"):
        return _home() / "mlflow-artifacts"
    return None


NOTE_TAG = "mlflow.note.content"  # what the MLflow UI shows as an experiment's description


def experiment_id(dataset: str, description: str | None = None) -> str:
    """One experiment per dataset, created on first use, its artifacts under :func:`artifact_root`.
    ``description`` (the catalog's): the experiment's description in the UI, set or updated when given."""
    c = client()
    name = f"tilewise/{dataset}"
    existing = c.get_experiment_by_name(name)
    if existing is not None:
        if description and existing.tags.get(NOTE_TAG) != description:
            c.set_experiment_tag(existing.experiment_id, NOTE_TAG, description)
        return existing.experiment_id
    root = artifact_root()
    location = (root / dataset).as_uri() if root is not None else None
    # MLflow 3's UI files experiments without a kind under GenAI ("Evaluations"); ours are model training.
    tags = {"mlflow.experimentKind": "custom_model_development", **({NOTE_TAG: description} if description else {})}
    return c.create_experiment(name, artifact_location=location, tags=tags)


def run_artifacts(run_id: str) -> str:
    """Where the run's artifacts are (printed after training and evaluation: the user finds them)."""
    return client().get_run(run_id).info.artifact_uri


def registered_name(dataset: str, architecture: str) -> str:
    """The default registered name; a catalog entry may set another (``data_catalog.entry_model_name``,
    which training and inference both use)."""
    return f"{dataset}-{architecture}"


EXAMPLE_EDGE = {2: 64, 3: 16}  # pixels per spatial axis of the logged input example (see log_model)


def small_example(example, card: ModelCard):
    """A centre crop of ``example`` (B, C, *spatial), axes (Z, Y, X) or (Y, X), small enough to keep the
    logged model light: about 64 x 64 (2D) or 16^3 (3D) float32 pixels, each axis a multiple of the
    network's down-sampling factor (2^levels for U-Net: its deepest map stays 2 wide; 16 for DeepLab's output stride, 32 for
    Mask R-CNN's FPN) so the network and ``torch.export`` accept it. Two items (the first repeated if
    there is one): ``torch.export`` fixes an axis of size 1 in the graph, and a batch of 2 keeps the
    exported model's batch axis free."""
    import numpy as np

    # U-Net: 2^levels, so its deepest map is at least 2 wide (instance norm refuses a single voxel)
    factor = {"unet": 2 ** int(card.architecture_args.get("levels", 4)), "deeplab": 16,
              "maskrcnn": 32}.get(card.architecture, 32)
    spatial = example.shape[2:]
    edge = EXAMPLE_EDGE.get(len(spatial), 16)
    crop = []
    for size in spatial:
        want = max(factor, -(-edge // factor) * factor)  # edge rounded up to a multiple of the factor
        crop.append(size if want >= size else want)
    starts = [(size - c) // 2 for size, c in zip(spatial, crop)]
    window = tuple(slice(s0, s0 + c) for s0, c in zip(starts, crop))
    crop_example = example[(slice(0, 2), slice(None), *window)]
    if crop_example.shape[0] < 2:
        crop_example = np.concatenate([crop_example, crop_example], axis=0)
    return np.ascontiguousarray(crop_example, dtype=np.float32)


def log_model(network, card: ModelCard, input_example) -> Any:
    """Inside an active MLflow run: the network as one MLflow model holding its weights once.

    An MLflow "models from code" pyfunc (models/pyfunc_model.py; nothing pickled) whose artifacts
    are tilewise's safetensors state dict and model card (:data:`WEIGHTS_FILE`, :data:`CARD_FILE`):
    MLflow's tools load it with ``mlflow.pyfunc.load_model``, and :func:`load_registered` reads the
    same two files. It gets a small input example (:func:`small_example`; a whole training patch
    made 12-19 MB of JSON per model) and a signature whose batch and spatial axes are variable (-1),
    so MLflow's tools accept tiles of any valid size, not just the example's. (Until issue 8 the
    weights were stored twice: an ``mlflow.pytorch`` pt2/pickle model plus ``tilewise/`` files.)"""
    import mlflow
    import mlflow.pyfunc
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec
    from safetensors.torch import save_file

    from models import pyfunc_model
    from models.zoo import inference_module

    network = network.eval()
    example = small_example(np.asarray(input_example), card)
    with torch.no_grad():  # what the pyfunc's predict returns: the inference module's output
        out = inference_module(card, network)(torch.from_numpy(example))
    free = (-1, example.shape[1], *(-1 for _ in example.shape[2:]))  # (B, C, *spatial): any batch, any tile
    out_free = (-1, int(out.shape[1]), *(-1 for _ in out.shape[2:]))
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), free)]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), out_free)]))
    with tempfile.TemporaryDirectory() as tmp:
        weights, card_file = Path(tmp) / WEIGHTS_FILE, Path(tmp) / CARD_FILE
        save_file({k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}, str(weights))
        card_file.write_text(card.model_dump_json(indent=2))
        return mlflow.pyfunc.log_model(
            name=MODEL_NAME, python_model=pyfunc_model.__file__, signature=signature, input_example=example,
            artifacts={pyfunc_model.WEIGHTS_KEY: str(weights), pyfunc_model.CARD_KEY: str(card_file)},
            pip_requirements=_requirements())


def _requirements() -> list[str]:
    """The MLflow model's requirements, stated: MLflow's own guess runs a subprocess (~20 s)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in ("torch", "torchvision", "monai", "mlflow")]


@dataclass(frozen=True)
class Promotion:
    name: str
    version: str
    alias: str  # champion | challenger
    decision: str  # one line: why


def register_and_promote(name: str, model_uri: str, run_id: str, metric: str, value: float,
                         higher_is_better: bool = True, protocol: str | None = None,
                         tags: dict[str, str] | None = None, refuse: str | None = None) -> Promotion:
    """Register ``model_uri`` as a new version of ``name`` and apply the champion rule.

    ``protocol`` says how the metric was measured (e.g. "whole-regions"): a champion whose metric
    has another name or protocol is not comparable, and the new version replaces it. ``tags`` go on
    the version too (e.g. its parent for a fine-tuned model). ``refuse``: why this version must not
    become champion whatever its metric (training's end check: one class everywhere on a validation
    scan); it is registered as challenger with that reason."""
    import mlflow

    c = client()
    said = io.StringIO()
    with quiet("stderr", into=said):  # MLflow prints "Successfully registered ..." itself: to the log
        version = mlflow.register_model(model_uri, name).version
    for line in said.getvalue().splitlines():
        if line.strip():
            log.info("%s", line.strip())
    own = {"run_id": run_id, "metric_name": metric, "metric_value": repr(float(value)), **(tags or {})}
    if protocol:
        own["metric_protocol"] = protocol
    for key, val in own.items():
        c.set_model_version_tag(name, version, key, val)
    current = _alias_version(c, name, CHAMPION)
    if refuse:
        alias, decision = CHALLENGER, f"not promoted: {metric}={value:.4f} but it {refuse}"
    elif current is None:
        alias, decision = CHAMPION, f"champion: first version of {name} ({metric}={value:.4f})"
    else:
        theirs = c.get_model_version(name, current).tags
        best = float(theirs.get("metric_value", "nan"))
        if (theirs.get("metric_name"), theirs.get("metric_protocol")) != (metric, protocol):
            best = float("nan")  # measured another way: not comparable
        better = value > best if higher_is_better else value < best
        if best != best or better:  # NaN: the old champion has no comparable metric
            alias = CHAMPION
            decision = (f"champion: {metric}={value:.4f} beats version {current} ({best:.4f})" if best == best else
                        f"champion: {metric}={value:.4f}; version {current} has no comparable "
                        f"{metric} ({protocol or 'patch'} validation)")
        else:
            alias = CHALLENGER
            decision = f"challenger: {metric}={value:.4f} does not beat champion version {current} ({best:.4f})"
    c.set_registered_model_alias(name, alias, version)
    c.set_model_version_tag(name, version, "promotion", decision)
    c.set_tag(run_id, "tilewise.promotion", decision)
    c.set_tag(run_id, "tilewise.registered_version", f"{name}/{version}")
    return Promotion(name, str(version), alias, decision)


def _is_not_found(exc: BaseException) -> bool:
    """MLflow's own "does not exist" (``RESOURCE_DOES_NOT_EXIST``, HTTP 404), nothing else."""
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and exc.error_code == "RESOURCE_DOES_NOT_EXIST"


def _unavailable(what: str, exc: BaseException) -> RegistryUnavailable:
    cause = " ".join(str(exc).split())[:300]
    return RegistryUnavailable(f"model registry at {tracking_uri()} did not answer {what}: "
                               f"{type(exc).__name__}: {cause}")


def _registered(c, name: str):
    """The RegisteredModel ``name``, or None when the registry says it does not exist."""
    try:
        return c.get_registered_model(name)
    except Exception as exc:
        if _is_not_found(exc):
            return None
        raise _unavailable(f"for registered model '{name}'", exc) from exc


def _alias_version(c, name: str, alias: str) -> str | None:
    """The version ``alias`` points to, or None when ``name`` or its alias does not exist. Raises
    RegistryUnavailable when the registry cannot answer. (The alias is read from the registered
    model's alias map: a missing alias is INVALID_PARAMETER_VALUE in MLflow, not a 404.)"""
    model = _registered(c, name)
    if model is None:
        return None
    version = (model.aliases or {}).get(alias)
    return None if version is None else str(version)


def _resolve(uri: str):
    """(client, ModelVersion) of a ``models:/`` URI. ModelNotFound when the registry says the model,
    version or alias does not exist; RegistryUnavailable when it cannot answer."""
    match = _URI.match(uri)
    if not match:
        raise RegistryError(f"not a model URI: expected models:/NAME@ALIAS or models:/NAME/VERSION, got {uri!r}")
    c = client()
    name = match["name"]
    if _registered(c, name) is None:
        raise ModelNotFound(f"no registered model named '{name}' at {tracking_uri()}")
    number = _alias_version(c, name, match["alias"]) if match["alias"] else match["version"]
    if number is None:
        raise ModelNotFound(f"registered model '{name}' has no alias '{match['alias']}'")
    try:
        return c, c.get_model_version(name, number)
    except Exception as exc:
        if _is_not_found(exc):
            raise ModelNotFound(f"registered model '{name}' has no version {number}") from None
        raise _unavailable(f"for version {number} of '{name}'", exc) from exc


def has_model(uri: str) -> bool:
    """Is ``uri`` (``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``) registered? False only when
    the registry answers "does not exist"; raises RegistryUnavailable (naming the tracking URI and
    the cause) when it cannot answer, and RegistryError for a malformed URI. The one question a
    flow asks before training or inferring."""
    try:
        _resolve(uri)
    except ModelNotFound:
        return False
    return True


def resolve_version(uri: str) -> str:
    """``models:/NAME/VERSION`` that ``uri`` points to now (an alias resolved once). Raises
    ModelNotFound / RegistryUnavailable as :func:`has_model` tells apart."""
    _, version = _resolve(uri)
    return f"models:/{version.name}/{version.version}"


_LOGGED_MODEL = re.compile(r"^models:/(?P<id>m-[^/@]+)/?$")  # an MLflow 3 logged model's URI


def _fetch_model_files(c, version, run_id: str | None, run_files: set[str], tmp: str) -> Path:
    """A local folder holding the version's :data:`WEIGHTS_FILE` and :data:`CARD_FILE`: from the MLflow
    model's ``artifacts/`` (only those two files are downloaded), or -- versions logged before
    issue 8 -- from the run's ``tilewise/``."""
    import mlflow.artifacts

    if WEIGHTS_FILE in run_files:  # the old layout: weights beside an mlflow.pytorch model
        return Path(c.download_artifacts(run_id, ARTIFACT_DIR, tmp))
    match = _LOGGED_MODEL.match(version.source or "")
    model_id = getattr(version, "model_id", None) or (match["id"] if match else None)
    if not model_id:
        raise FileNotFoundError(f"the version's source {version.source!r} is not a logged model and its run "
                                f"has no {ARTIFACT_DIR}/{WEIGHTS_FILE}")
    location = c.get_logged_model(model_id).artifact_location.rstrip("/")
    folder = Path(tmp) / "model"
    for name in (WEIGHTS_FILE, CARD_FILE):
        mlflow.artifacts.download_artifacts(artifact_uri=f"{location}/artifacts/{name}", dst_path=str(folder),
                                            tracking_uri=tracking_uri())
    return folder


def registered_weights(uri: str) -> tuple[ModelCard, dict, str, dict | None]:
    """(card, safetensors state dict, ``models:/NAME/VERSION``, calibrator or None) of a registry URI:
    the two files in the MLflow model's ``artifacts/`` (see :func:`log_model`), or in the run's
    ``tilewise/`` for versions logged before issue 8. The calibrator, when one was fitted after
    registration (tilewise calibrate), is the run's ``tilewise/calibrator.json``."""
    from safetensors.torch import load_file

    c, version = _resolve(uri)
    run_id = version.run_id or version.tags.get("run_id")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            run_files = {Path(f.path).name for f in c.list_artifacts(run_id, ARTIFACT_DIR)} if run_id else set()
            local = _fetch_model_files(c, version, run_id, run_files, tmp)
            card = ModelCard.model_validate_json((local / CARD_FILE).read_text())
            state = load_file(str(local / WEIGHTS_FILE))
        except Exception as exc:
            # MLflow retried what may pass (MLFLOW_HTTP_REQUEST_MAX_RETRIES, with backoff); still
            # failing, an outage is RegistryUnavailable (a ConnectionError: the flows retry the task),
            # never "this model cannot be read"
            if is_transient(exc):
                raise _unavailable(f"while {uri}'s card and weights were downloaded", exc) from None
            raise RegistryError(f"{uri}: cannot read the model's card and weights ({' '.join(str(exc).split())})") from None
        calibrator = None
        if CALIBRATOR_FILE in run_files:  # fitted after registration (tilewise calibrate)
            try:
                path = c.download_artifacts(run_id, f"{ARTIFACT_DIR}/{CALIBRATOR_FILE}", tmp)
                calibrator = json.loads(Path(path).read_text())
            except Exception as exc:
                if is_transient(exc):
                    raise _unavailable(f"while {uri}'s calibrator was downloaded", exc) from None
                raise RegistryError(f"{uri}: unreadable {ARTIFACT_DIR}/{CALIBRATOR_FILE} "
                                    f"({' '.join(str(exc).split())})") from None
    return card, state, f"models:/{version.name}/{version.version}", calibrator


def load_registered(uri: str) -> LoadedModel:
    """The network of a registry URI, rebuilt from its card and safetensors weights (no pickle), with
    its calibrator (:func:`registered_weights`)."""
    from models.zoo import build_from_card, inference_module

    card, state, identity, calibrator = registered_weights(uri)
    network = build_from_card(card)
    network.load_state_dict(state, strict=True)
    return LoadedModel(module=inference_module(card, network), card=card, identity=identity, calibrator=calibrator)


def describe(uri: str) -> dict:
    """Name, version, aliases and tags of a registry URI (for the CLI and run records)."""
    _, version = _resolve(uri)
    return {"name": version.name, "version": version.version, "aliases": list(version.aliases),
            "tags": dict(version.tags), "run_id": version.run_id}
