"""The ``infer`` flow: the dataset's registered model (or a given one) over every complete scan."""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path

import httpx
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait

from data_catalog import DEFAULT_CATALOG_DIR, find_entry
from data_catalog.schema import CatalogEntry
from flows.ingest import transient_io_error
from flows.outcomes import ScanOutcome, final_state
from tasks import storage
from tasks.engine.infer import EngineConfig, InferResult, infer_scan
from tasks.engine.model_io import LoadedModel, load_model
from tasks.export.ngff import remove_prediction
from tasks.ingest import discover_scans
from tasks.settings import scan_store


def engine_config(entry: CatalogEntry) -> EngineConfig:
    t = entry.tiling
    return EngineConfig(tile=tuple(t.tile) if t.tile else None, overlap=t.overlap, blend=t.blend, batch=t.batch,
                        pad=t.pad, crf=entry.refine.params() if entry.refine.crf else None, skip_empty=t.skip_empty)


def model_uri(entry: CatalogEntry) -> str | None:
    """``models:/NAME@ALIAS`` of the dataset's model (the name training registers), None without ``model``."""
    from data_catalog import entry_model_uri

    return entry_model_uri(entry)


GPU_LIMIT = "gpu"
_local_slots: threading.BoundedSemaphore | None = None
_models: dict[str, LoadedModel] = {}
_models_lock = threading.Lock()


def gpu_slots() -> int:
    """Inference runs at once (``TILEWISE_GPU_SLOTS``, default 1)."""
    try:
        return max(1, int(os.environ.get("TILEWISE_GPU_SLOTS", "1")))
    except ValueError:
        return 1


def server_mode() -> bool:
    """A Prefect server was chosen (``PREFECT_API_URL``); else the embedded one of this process."""
    return bool(os.environ.get("PREFECT_API_URL"))


def ensure_gpu_limit() -> None:
    """Create the global concurrency limit ``gpu`` on the Prefect server when it is missing
    (``TILEWISE_GPU_SLOTS`` slots). A limit an administrator set is left as it is."""
    if not server_mode():
        return
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=gpu_slots()))
            except ObjectAlreadyExists:  # another run created it meanwhile
                pass


@contextmanager
def gpu_slot():
    """Hold one inference slot: a semaphore of this process (``TILEWISE_GPU_SLOTS``) and, with a
    Prefect server, a slot of the server's global limit ``gpu`` shared by every worker.

    The global limit is not used with the embedded server: its slot leases live in that server's
    memory, so after a kill -9 the slot would stay taken in the database for ever; with a real
    server a killed holder's lease expires (60 s) and the slot comes back (a server that keeps its
    leases on disk, as the compose stack's, even across its own restart).

    A slot that cannot be given back (the server unreachable just then) does not fail the finished
    inference: the server frees it when its lease expires."""
    global _local_slots
    with _models_lock:
        if _local_slots is None:
            _local_slots = threading.BoundedSemaphore(gpu_slots())
    with _local_slots:
        if server_mode():
            from prefect.concurrency.sync import concurrency

            slot = concurrency(GPU_LIMIT, occupy=1, lease_duration=60)
            slot.__enter__()
            try:
                yield
            finally:
                try:
                    slot.__exit__(None, None, None)
                except (OSError, TimeoutError, httpx.TransportError) as exc:  # the server unreachable
                    get_run_logger().warning("could not give back the gpu slot (%s: %s); the Prefect server "
                                             "frees it when its lease expires", type(exc).__name__, exc)
        else:
            yield


def forget_models() -> None:
    """Start of a run: load versions afresh (a calibrator may have been added to one since)."""
    with _models_lock:
        _models.clear()


def cached_model(uri: str) -> LoadedModel:
    """The model of a version URI, loaded once per run and shared by the run's scans."""
    with _models_lock:
        if uri not in _models:
            if len(_models) >= 4:
                _models.pop(next(iter(_models)))
            _models[uri] = load_model(uri)
        return _models[uri]


def resolve_version(uri: str) -> str | None:
    """``models:/NAME@ALIAS`` -> ``models:/NAME/VERSION`` (once per run, so a promotion during the
    run never mixes versions); a version URI or a file stays itself; None when the registry has no
    such model or alias. Any other failure (registry unreachable) is raised with its cause."""
    if not uri.startswith("models:/"):
        return uri
    from models.registry import ModelNotFound, describe

    try:
        found = describe(uri)
    except ModelNotFound:  # only a real "does not exist"; an outage or a malformed URI is raised
        return None
    return f"models:/{found['name']}/{found['version']}"


def is_instance_model(model: LoadedModel) -> bool:
    """The model card says the network finds objects (Mask R-CNN) rather than classifying pixels."""
    from models.zoo import is_instance_architecture

    return is_instance_architecture(model.card.architecture)


def run_model(store: str, model: LoadedModel, config: EngineConfig, mode: str = "auto", progress=None):
    """One scan through ``model``: the semantic engine (tasks/engine) or, for an instance model or
    ``mode="instances"``, Mask R-CNN over tiles (tasks/instances/detect.py). A mode the model
    cannot serve is that module's one-line ScanError."""
    if mode == "instances" or (mode == "auto" and is_instance_model(model)):
        from tasks.instances.detect import infer_instances

        return infer_instances(store, model, config, progress=progress)
    result = infer_scan(store, model, config, progress=progress)
    refine(store, config)
    return result


def refine(store: str, config: EngineConfig) -> None:
    """The dense CRF (catalog ``refine.crf``, ``infer --crf``) over a complete semantic prediction:
    ``prediction/crf`` (tasks/refine/regions.py), up to date or computed."""
    if config.crf is None:
        return
    from tasks.refine.crf import CrfParams
    from tasks.refine.regions import refine_prediction

    with storage.store_lock(store, purpose="crf"):
        refine_prediction(store, CrfParams(**config.crf), config.threshold)


@task(name="infer-scan", task_run_name="infer {store}", retries=2, retry_delay_seconds=[2, 10],
      retry_condition_fn=transient_io_error, cache_policy=NO_CACHE, persist_result=False)
def infer_scan_task(store: str, uri: str, config: EngineConfig, dask: str | None = None,
                    replace: bool = False) -> InferResult:
    """``uri`` over one scan, holding a ``gpu`` slot while the model runs. ``replace``: drop a
    complete prediction first (nightly / backfill --force); an incomplete one is resumed as always.

    The store's lock is held from the drop to the end of the run (the engine's own lock is the
    same one, re-entered): no export or evaluation reads between the drop and the new mark, and
    none is dropped under a run that reads it."""
    if config.crf is not None:  # a missing CRF extra is said before any tile runs, not after them all
        from tasks.errors import ScanError
        from tasks.refine.crf import CrfUnavailable, require_crf

        try:
            require_crf()
        except CrfUnavailable as exc:
            raise ScanError(store, str(exc)) from None
    with gpu_slot():
        model = cached_model(uri)
        with storage.store_lock(store, purpose="infer"):
            if replace and storage.is_complete(f"{store}/prediction"):
                remove_prediction(store)  # label images unlisted first, then the marks, then the data
            if dask and not is_instance_model(model):  # instance inference runs in one process
                from tasks.engine.distributed import infer_distributed

                result = infer_distributed(store, uri, config, dask, model=model)  # loaded once per run
                refine(store, config)
                return result
            return run_model(store, model, config)


@flow(name="infer", flow_run_name="infer {dataset}")
def infer_flow(dataset: str, catalog: str = str(DEFAULT_CATALOG_DIR), model: str | None = None,
               store_root: str | None = None):
    """Run ``model`` (default: the catalog's ``models:/NAME@ALIAS``) over the dataset's complete scans.
    Scans already predicted by the same model version with the same parameters are skipped."""
    logger = get_run_logger()
    loaded = find_entry(dataset, Path(catalog))
    entry = loaded.entry
    alias = model or model_uri(entry)
    if alias is None:
        raise ValueError(f"dataset '{dataset}' names no model in the catalog; pass one")
    uri = resolve_version(alias)  # once: every scan of this run gets the same version
    if uri is None:
        raise ValueError(f"no model at {alias}; run: tilewise train {dataset}")
    forget_models()
    ensure_gpu_limit()
    stores = [scan_store(dataset, s.scan_id, store_root) for s in discover_scans(loaded)]
    ready = [s for s in stores if storage.is_complete(s)]
    if len(ready) < len(stores):
        logger.warning("%d scans are not ingested (complete) and are skipped", len(stores) - len(ready))
    config = engine_config(entry)
    futures = [infer_scan_task.submit(s, uri, config, getattr(entry.tiling, "dask", None)) for s in ready]
    wait(futures)
    outcomes = []
    for store, future in zip(ready, futures):
        scan_id = Path(store).name.removesuffix(".zarr")
        if future.state.is_completed():
            r = future.result()
            outcomes.append(ScanOutcome(dataset, scan_id, "infer", r.status, store,
                                        f"{uri}, {r.model_calls} tiles" if r.model_calls else uri, r.seconds,
                                        model=uri))
        else:
            err = future.state.result(raise_on_failure=False)
            outcomes.append(ScanOutcome(dataset, scan_id, "infer", "failed", store, str(err), model=uri))
    return final_state(outcomes, key=f"infer-{dataset.lower().replace('_', '-').replace('.', '-')}")
