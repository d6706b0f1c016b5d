"""The dense CRF over a whole prediction, one output chunk at a time with a halo of context, so
memory is bounded by a chunk plus its halo whatever the scan's size.

Input: the scan's ``image/0`` and the (calibrated) ``prediction/probabilities``. Output, in the
prediction group (README, "Zarr layout"):

    prediction/crf/probabilities   (K, *spatial), dtype and chunks of prediction/probabilities
    prediction/crf/labels          (*spatial) uint8, argmax (or p >= threshold for one class)
    prediction/crf/done            one uint8 per chunk, written after that chunk's data
    prediction/crf attrs["tilewise"]: {"kind": "crf", "digest" (the prediction's digest and the
        parameters), "params", "complete" (last)}

A 2D model's prediction on a 3D stack (tiles of depth 1) is refined section by section (the
sections are far apart along Z); otherwise the CRF runs in the prediction's own rank. Intensities
are z-scored per channel with the scan's statistics, taken from its smallest pyramid level.
A re-run with the same prediction and parameters resumes from the done marks or does nothing;
anything else replaces the output.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import zarr

from tasks import identity, storage
from tasks.errors import ScanError
from tasks.refine.crf import CrfParams, CrfUnavailable, dense_crf

log = logging.getLogger(__name__)

GROUP = "crf"


@dataclass
class RefineResult:
    store: str
    status: str  # refined | resumed | unchanged
    chunks: int
    seconds: float


def crf_url(store: str) -> str:
    return f"{str(store).rstrip('/')}/prediction/{GROUP}"


def _statistics(store: str) -> tuple[np.ndarray, np.ndarray]:
    group = storage.open_group(store, mode="r")
    levels = sorted((k for k in group["image"].array_keys() if k.isdigit()), key=int)
    small = np.asarray(group[f"image/{levels[-1]}"][...], np.float64)
    flat = small.reshape(small.shape[0], -1)
    return flat.mean(1).astype(np.float32), np.maximum(flat.std(1), 1e-6).astype(np.float32)


def refine_prediction(store: str, params: CrfParams = CrfParams(), threshold: float = 0.5) -> RefineResult:
    import time

    from tasks.engine.blend import labels_from
    from tasks.ingest.to_zarr import COMPRESSOR

    t0 = time.perf_counter()
    store = str(store)
    try:
        import pydensecrf.densecrf  # noqa: F401  (said before anything is written)
    except ImportError:
        raise ScanError(store, str(CrfUnavailable("the dense CRF needs pydensecrf2: pip install 'tilewise[crf]'")))

    pred_url = f"{store.rstrip('/')}/prediction"
    record = storage.read_record(pred_url)
    if not (record and record.get(storage.COMPLETE_KEY)) or not storage.is_complete(pred_url):
        raise ScanError(store, "has no complete prediction to refine: run infer first")
    if record.get("mode") == "instances" or "probabilities" not in storage.open_group(pred_url, mode="r"):
        raise ScanError(store, "the prediction has no probabilities (an instance model's): nothing for the CRF")
    digest = identity.crf_digest(record.get("digest"), params.record(), threshold)
    url = crf_url(store)
    own = storage.read_record(url)
    if own and (own.get("digest") != digest or identity.outdated("crf", own)):
        own = None  # made from another prediction, with other parameters or by older code
    if own and storage.is_complete(url):
        return RefineResult(store, "unchanged", 0, time.perf_counter() - t0)
    probs_in = zarr.open_array(f"{pred_url}/probabilities", mode="r")
    image = storage.open_group(store, mode="r")["image/0"]
    spatial = tuple(probs_in.shape[1:])
    chunks = tuple(probs_in.chunks[1:])
    grid = tuple(-(-n // c) for n, c in zip(spatial, chunks))
    resumed = bool(own and storage.arrays_match(
        url, {"probabilities": list(probs_in.shape), "labels": list(spatial), "done": list(grid)}))
    if not resumed:
        storage.remove(url)
        group = storage.open_group(url, mode="w")
        group.create_array("probabilities", shape=probs_in.shape, dtype=probs_in.dtype, chunks=probs_in.chunks,
                           compressors=COMPRESSOR, fill_value=0)
        group.create_array("labels", shape=spatial, dtype="uint8", chunks=chunks, compressors=COMPRESSOR,
                           fill_value=0)
        group.create_array("done", shape=grid, dtype="uint8", chunks=grid, fill_value=0)
        group.attrs[storage.ATTRS_KEY] = {"kind": "crf", "digest": digest, "params": params.record(),
                                          "threshold": threshold, "source": record.get("digest"),
                                          **identity.stamp("crf")}
    group = storage.open_group(url, mode="r+")
    done = group["done"][...]
    tile = record.get("params", {}).get("tile") or []
    sections = len(spatial) == 3 and len(tile) == 3 and tile[0] == 1  # a 2D model over a stack
    mean, std = _statistics(store)
    halo = params.halo
    count = 0
    for index in np.ndindex(*grid):
        if done[index]:
            continue
        box = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, chunks, spatial))
        pads = [0 if (sections and axis == 0) else halo for axis in range(len(spatial))]
        outer = tuple(slice(max(b.start - p, 0), min(b.stop + p, n)) for b, p, n in zip(box, pads, spatial))
        inner = tuple(slice(b.start - o.start, b.stop - o.start) for b, o in zip(box, outer))
        p = np.asarray(probs_in[(slice(None),) + outer], np.float32)
        x = (np.asarray(image[(slice(None),) + outer], np.float32)
             - mean.reshape(-1, *[1] * len(spatial))) / std.reshape(-1, *[1] * len(spatial))
        if sections:
            q = np.stack([dense_crf(p[:, z], x[:, z], params) for z in range(p.shape[1])], axis=1)
        else:
            q = dense_crf(p, x, params)
        q = q[(slice(None),) + inner]
        group["probabilities"][(slice(None),) + box] = q.astype(probs_in.dtype)
        group["labels"][box] = labels_from(q, threshold).astype(np.uint8)
        group["done"][index] = 1
        count += 1
    storage.mark_complete(group, {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "chunks": count},
                          ["probabilities", "labels", "done"])
    return RefineResult(store, "resumed" if resumed else "refined", count, time.perf_counter() - t0)
