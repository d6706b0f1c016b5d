"""Scale-out with Dask: one job per large chunk-aligned region of the output.

The driver plans the tiles, creates the output and cuts the chunk grid into regions of
``region_chunks`` chunks. Each worker loads the model from its URI (once per worker process),
reads the region's input plus a halo (every tile that overlaps the region, so at least half a
tile and at most a tile beyond it) and writes only its own output chunks: regions never write the
same chunk, so no locking is needed. Because every output chunk is blended from exactly the tiles
of the single-process plan, in the same order, a distributed result equals the single-process one
up to float32 summation effects of batching (observed: identical, tolerance 1e-6).
Tiles that straddle two regions are computed by both workers: that halo is the price of
independence.

One distributed run is one writer of the store: the driver holds the store's lock
(``storage.store_lock``, purpose "infer") from ``prepare`` to ``finish``; the workers take no lock
(they write only their own regions' chunks, under the driver's). Another run on the store waits
or fails with ``StoreBusy`` while the driver holds it.

On a real cluster (docs/cluster.md; tests/test_dask_cluster.py): a model file is sent to the
workers as bytes (``ShippedModel``: they cannot open the driver's path); a worker that dies has
its region run again by Dask, resuming from the chunks already done; a region that fails on I/O
(the object store gone for a moment) is run again after 1, 2 and 4 s; any other failure, or a
lost scheduler, is one ScanError line. After a failure the driver cancels the other regions and
waits until none still writes before it lets go of the store's lock.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from tasks import storage
from tasks.engine.infer import EngineConfig, InferResult, finish, prepare, run_chunks
from tasks.engine.model_io import LoadedModel, card_path, load_model
from tasks.engine.plan import split_regions
from tasks.errors import ScanError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShippedModel:
    """A TorchScript file and its model card as bytes, sent by the driver: a worker on another
    machine (or in another container) cannot open the driver's path. Equal, and cached, by content."""

    name: str
    sha256: str
    card: bytes | None
    data: bytes = field(repr=False, compare=False)

    def load(self) -> LoadedModel:
        """Load it as :func:`load_model` loads the file: same module, same card, same identity (the
        identity is the content's, not the path's)."""
        with tempfile.TemporaryDirectory(prefix="tilewise-model-") as folder:
            path = Path(folder) / self.name
            path.write_bytes(self.data)
            if self.card is not None:
                path.with_name(path.name + ".json").write_bytes(self.card)
            return load_model(str(path))


def ship_model(uri: str) -> str | ShippedModel:
    """What workers load: a registry URI as it is (workers reach the registry), a model file as its
    bytes and its card's (``load_model``'s errors for a file that is not there)."""
    path = Path(uri)
    if uri.startswith("models:/") or not path.is_file():
        return uri
    data = path.read_bytes()
    card = card_path(path)
    return ShippedModel(path.name, hashlib.sha256(data).hexdigest(), card.read_bytes() if card else None, data)


def _the_model(shipped: ShippedModel) -> ShippedModel:
    return shipped


@lru_cache(maxsize=4)
def _worker_model(ref: str | ShippedModel) -> LoadedModel:
    return ref.load() if isinstance(ref, ShippedModel) else load_model(ref)


REGION_RETRIES = 3  # a region that fails on I/O is run again (resuming) after 1, 2, 4 s, then fails
RETRY_BACKOFF_S = 1.0


def _transient(exc: BaseException) -> bool:
    """An I/O failure that may pass (the object store or the network gone for a moment): OSError
    (s3fs's and aiohttp's errors are), a timeout, or anything botocore / aiohttp raises. A
    ScanError (bad input, another model) never passes."""
    if isinstance(exc, ScanError):
        return False
    return isinstance(exc, (OSError, TimeoutError)) or type(exc).__module__.split(".")[0] in (
        "botocore", "aiobotocore", "aiohttp", "urllib3")


def _run_region(store: str, model_uri: str | ShippedModel, config: EngineConfig,
                chunks: list[tuple[int, ...]], digest: str) -> dict:
    """A worker's part: the driver's ``digest`` must be what this model gives (see ``prepare``).
    An I/O failure is retried ``REGION_RETRIES`` times with a growing pause; each try resumes from
    the chunks already done, so no finished chunk is computed twice."""
    for attempt in range(REGION_RETRIES + 1):
        try:
            return _region_once(store, model_uri, config, chunks, digest)
        except Exception as exc:
            if attempt == REGION_RETRIES or not _transient(exc):
                raise
            pause = RETRY_BACKOFF_S * 2 ** attempt
            log.warning("%s: region of %d chunks failed (%s: %s); again in %.0f s", store, len(chunks),
                        type(exc).__name__, _first_line(exc), pause)
            deadline = time.monotonic() + pause
            while time.monotonic() < deadline:
                _stop_if_cancelled()
                time.sleep(0.1)
    raise AssertionError("unreachable")


class RegionCancelled(Exception):
    """The driver gave the run up (another region failed): this region stops after its current
    chunk writes, so nothing keeps writing the store once the driver has let go of its lock."""


def _stop_if_cancelled() -> None:
    """Raise RegionCancelled when the task running this region was cancelled (Dask does not
    interrupt a running task; it marks it cancelled on the worker). Outside a worker: nothing."""
    try:
        from distributed import get_worker
        from distributed.worker import thread_state

        worker, key = get_worker(), getattr(thread_state, "key", None)
    except (ImportError, ValueError):
        return
    state = worker.state.tasks.get(key) if key is not None else None
    if state is None or state.state in ("cancelled", "released", "forgotten") or worker.status.name != "running":
        raise RegionCancelled(f"region {key} cancelled")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _region_once(store: str, model_uri: str | ShippedModel, config: EngineConfig,
                 chunks: list[tuple[int, ...]], digest: str) -> dict:
    model = _worker_model(model_uri)
    prep = prepare(store, model, config, expect_digest=digest)
    if prep is None:
        return {"tiles": 0, "model_calls": 0, "chunks": 0, "tiles_skipped": 0}
    result = run_chunks(prep, model, set(chunks), progress=lambda done, total: _stop_if_cancelled())
    return {"tiles": result.tiles, "model_calls": result.model_calls, "chunks": result.chunks_written,
            "tiles_skipped": result.tiles_skipped}


CONNECT_TIMEOUT_S = 10.0  # a scheduler that does not answer by then is not there
_LOCAL = re.compile(r"local(?::([0-9]+))?")


def local_workers(address: str) -> int | None:
    """N for ``local`` (2) or ``local:N``; None for anything else -- ``localhost:8786`` is a
    scheduler address, not a local cluster of 8786 workers."""
    match = _LOCAL.fullmatch(address.strip())
    if match is None:
        return None
    workers = int(match.group(1) or 2)
    if workers < 1:
        raise ScanError(address, "a local cluster needs at least one worker (local:N, N >= 1)")
    return workers


def client_for(address: str):
    """A Dask client: ``local`` or ``local:N`` starts a LocalCluster of N worker processes; any
    other address is a scheduler, which must answer within ``CONNECT_TIMEOUT_S`` (one-line
    ScanError otherwise, instead of waiting forever)."""
    from dask.distributed import Client, LocalCluster

    workers = local_workers(address)
    if workers is not None:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        return Client(cluster)
    try:
        return Client(address, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:  # dask raises OSError("Timed out trying to connect ...")
        raise ScanError(address, f"no Dask scheduler answered within {CONNECT_TIMEOUT_S:g} s "
                                 f"({type(exc).__name__}); start one or use --dask local[:N]") from None


def infer_distributed(store: str, model_uri: str, config: EngineConfig, address: str = "local:2",
                      region_chunks: tuple[int, ...] | None = None, client=None,
                      model: LoadedModel | None = None) -> InferResult:
    """Run the engine over ``store`` on a Dask cluster; the driver marks the output complete.
    ``model``: the registry version ``model_uri`` names, already loaded by the caller (a nightly
    loads each version once per run): not downloaded from the registry again. A model file is
    always loaded from the bytes the workers get."""
    t0 = time.perf_counter()
    shipped = ship_model(model_uri)  # the driver runs the very bytes the workers get
    if isinstance(shipped, ShippedModel):
        model = shipped.load()
    elif model is None or not model.identity.startswith("models:/"):
        model = load_model(model_uri)
    try:
        with storage.store_lock(store, purpose="infer"):
            return _drive(store, shipped, model, config, address, region_chunks, client, t0)
    except ScanError:
        raise
    except Exception as exc:
        # The driver's own reads and writes (prepare, finish, the lock's marker): an unreachable
        # object store is one line too. A failure while letting go of the lock after the run had
        # already failed keeps the first reason.
        if not _transient(exc):
            raise
        first = exc.__context__
        reason = f"{first.problem}; then " if isinstance(first, ScanError) else ""
        raise ScanError(store, f"{reason}the store did not answer the driver ({type(exc).__name__}: "
                               f"{_first_line(exc)})") from None


def _drive(store, shipped, model, config, address, region_chunks, client, t0) -> InferResult:
    """The driver's part of :func:`infer_distributed`, under the store's lock."""
    prep = prepare(store, model, config)
    if prep is None:
        return InferResult(str(store), "unchanged")
    grid = prep.plan.chunk_grid
    if region_chunks is None:  # about 4 regions per axis pair: enough to spread, large enough to amortise halos
        region_chunks = tuple(max(1, -(-g // 2)) for g in grid)
    regions = [[c for c in block if c in prep.todo] for block in split_regions(grid, tuple(region_chunks))]
    regions = [r for r in regions if r]
    own_client = client is None
    client = client or client_for(address)
    quiet = _QuietLostScheduler()
    logging.getLogger("distributed.client").addFilter(quiet)
    try:
        # Workers load exactly the driver's version: an alias is resolved once, here.
        # A model file travels as bytes: the argument of one task (kept by the scheduler, so Dask
        # recomputes it if every worker holding its result dies; scattered data would be lost), whose
        # result every region depends on -- copied to each worker once, not once per region.
        if isinstance(shipped, ShippedModel):
            ref = client.submit(_the_model, shipped, pure=False)
        else:
            ref = model.identity if model.identity.startswith("models:/") else shipped
        futures = [client.submit(_run_region, str(store), ref, config, r, prep.digest, pure=False)
                   for r in regions]
        try:
            parts = client.gather(futures)
        except ScanError:  # a region's bad input or another model: its own one line
            _cancel(client, futures)
            raise
        except Exception as exc:
            _cancel(client, futures)
            raise ScanError(store, f"{_why_stopped(exc, client, address)}; the prediction is not marked complete, "
                                   "its finished chunks are kept: run again to resume") from None
    finally:
        try:
            if own_client:  # a client that lost its scheduler logs its last error while it closes
                cluster = getattr(client, "cluster", None)
                lost = getattr(client, "status", "running") != "running"
                client.close(timeout=2) if lost else client.close()  # no scheduler: nothing to wait for
                if cluster is not None:
                    cluster.close()
        finally:
            logging.getLogger("distributed.client").removeFilter(quiet)
    tiles = sum(p["tiles"] for p in parts)
    calls = sum(p["model_calls"] for p in parts)
    skipped = sum(p.get("tiles_skipped", 0) for p in parts)  # a halo tile counts once per region
    finish(prep, {"tiles": tiles, "model_calls": calls, "regions": len(regions), "tiles_skipped": skipped})
    return InferResult(str(store), "resumed" if prep.resumed else "inferred", tiles=tiles, model_calls=calls,
                       chunks_written=sum(p["chunks"] for p in parts), seconds=time.perf_counter() - t0,
                       classes=prep.classes, tiles_skipped=skipped)


class _QuietLostScheduler(logging.Filter):
    """Dask's client logs a lost scheduler as ERRORs (one with an empty message and a traceback,
    then "Failed to reconnect ..."); the run's own one-line error says what happened. During a
    run they are kept, at INFO, for the log file, and stay off the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            record.levelno, record.levelname = logging.INFO, "INFO"
            if not str(record.getMessage()).strip():
                record.msg, record.args = "Dask client: the connection to the scheduler broke", ()
        return True


STOP_WAIT_S = 60.0  # how long the driver waits, after a failure, for running regions to stop


def _running_keys(dask_worker) -> list[str]:
    return [str(key) for key, ts in dask_worker.state.tasks.items() if ts.state in ("executing", "cancelled")]


def _cancel(client, futures) -> None:
    """Cancel every region and wait (up to ``STOP_WAIT_S``) until none still runs on a worker: a
    running region notices at its next batch (``_stop_if_cancelled``) and stops after its started
    chunk writes. Only then does the driver let go of the store's lock. Without a scheduler
    there is nothing to wait for: workers close when they lose theirs."""
    keys = {str(f.key) for f in futures}
    try:
        client.cancel(futures)
        if not hasattr(client, "run"):
            return
        deadline = time.monotonic() + STOP_WAIT_S
        while time.monotonic() < deadline:
            running = {k for ks in client.run(_running_keys).values() for k in ks}
            if not running & keys:
                return
            time.sleep(0.2)
        log.warning("regions still running on the Dask workers after %.0f s: %s", STOP_WAIT_S,
                    ", ".join(sorted(running & keys)))
    except Exception:  # noqa: BLE001 - the scheduler may be gone: its workers close with it
        pass


def _why_stopped(exc: BaseException, client, address: str) -> str:
    """One line: why ``gather`` failed."""
    from distributed.client import FutureCancelledError
    from distributed.scheduler import KilledWorker

    if getattr(client, "status", "running") != "running" or "scheduler-connection-lost" in str(exc):
        return f"lost the Dask scheduler {address} mid-run ({type(exc).__name__})"
    if isinstance(exc, FutureCancelledError):
        return f"Dask cancelled a region ({_first_line(exc)})"
    if isinstance(exc, KilledWorker):
        return f"the Dask workers running one region died one after another ({_first_line(exc)})"
    retried = f" after {REGION_RETRIES} retries" if _transient(exc) else ""
    return f"a region failed on a Dask worker{retried}: {type(exc).__name__}: {_first_line(exc)}"
