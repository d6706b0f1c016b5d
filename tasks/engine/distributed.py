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
"""

from __future__ import annotations

import re
from functools import lru_cache

from tasks import storage
from tasks.engine.infer import EngineConfig, InferResult, finish, prepare, run_chunks
from tasks.engine.model_io import LoadedModel, load_model
from tasks.engine.plan import split_regions
from tasks.errors import ScanError


@lru_cache(maxsize=4)
def _worker_model(uri: str) -> LoadedModel:
    return load_model(uri)


def _run_region(store: str, model_uri: str, config: EngineConfig, chunks: list[tuple[int, ...]],
                digest: str) -> dict:
    """A worker's part: the driver's ``digest`` must be what this model gives (see ``prepare``)."""
    model = _worker_model(model_uri)
    prep = prepare(store, model, config, expect_digest=digest)
    if prep is None:
        return {"tiles": 0, "model_calls": 0, "chunks": 0, "tiles_skipped": 0}
    result = run_chunks(prep, model, set(chunks))
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
                      region_chunks: tuple[int, ...] | None = None, client=None) -> InferResult:
    """Run the engine over ``store`` on a Dask cluster; the driver marks the output complete."""
    import time

    t0 = time.perf_counter()
    model = load_model(model_uri)
    with storage.store_lock(store, purpose="infer"):
        return _drive(store, model_uri, model, config, address, region_chunks, client, t0)


def _drive(store, model_uri, model, config, address, region_chunks, client, t0) -> InferResult:
    """The driver's part of :func:`infer_distributed`, under the store's lock."""
    import time

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
    try:
        # Workers load exactly the driver's version: an alias is resolved once, here.
        fixed_uri = model.identity if model.identity.startswith("models:/") else model_uri
        futures = [client.submit(_run_region, str(store), fixed_uri, config, r, prep.digest, pure=False)
                   for r in regions]
        parts = client.gather(futures)
    finally:
        if own_client:
            cluster = getattr(client, "cluster", None)
            client.close()
            if cluster is not None:
                cluster.close()
    tiles = sum(p["tiles"] for p in parts)
    calls = sum(p["model_calls"] for p in parts)
    skipped = sum(p.get("tiles_skipped", 0) for p in parts)  # a halo tile counts once per region
    finish(prep, {"tiles": tiles, "model_calls": calls, "regions": len(regions), "tiles_skipped": skipped})
    return InferResult(str(store), "resumed" if prep.resumed else "inferred", tiles=tiles, model_calls=calls,
                       chunks_written=sum(p["chunks"] for p in parts), seconds=time.perf_counter() - t0,
                       classes=prep.classes, tiles_skipped=skipped)
