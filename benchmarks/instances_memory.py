"""Memory of instance inference against the scene's size (issue 9's benchmark).

Not a test: a report. Builds a synthetic scene of SIZE x SIZE pixels (default 16384²) as a scan
group -- one float32 channel whose values are object ids, ~0.4 objects per 1000 pixels (about
100k at 16384²: squares of 6-16 pixels, a few bars longer than a tile) -- then, each in its own
fresh process:

- ``tilewise``: ``infer_instances`` with the injected perfect detector (it reads the ids out of
  each tile: the detector's own memory is that of the bare forward and is not what this measures;
  the merge, painting, caches and writes are), 256² tiles, overlap 0.25;
- ``read+write``: a plain chunk-by-chunk read of the image and write of a uint32 array of the same
  shape and chunks (the floor any out-of-core writer pays).

Working memory = peak RSS (VmHWM) - RSS after imports. Printed against the scene's bytes (the
float32 image, and the uint32 instance image) and against read+write; with ``--sizes 4096,8192,16384``
it shows whether memory grows with the scene.

    python benchmarks/instances_memory.py [--sizes 16384] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHUNK = 1024


def build_scene(store: str, size: int, seed: int = 0) -> int:
    """The scan group: image/0 (1, size, size) float32 ids, chunk by chunk; returns the object count."""
    from tasks import storage

    group = storage.open_group(store, mode="w")
    image = group.create_array("image/0", shape=(1, size, size), chunks=(1, CHUNK, CHUNK), dtype="float32",
                               fill_value=0)
    rng = np.random.default_rng(seed)
    count = int(size * size * 4e-4)
    ys, xs = rng.integers(0, size - 16, count), rng.integers(0, size - 16, count)
    sides = rng.integers(6, 17, count)
    order = np.argsort(ys // CHUNK * (size // CHUNK + 1) + xs // CHUNK)
    ids = np.arange(1, count + 1)
    buffers: dict[tuple[int, int], np.ndarray] = {}
    for i in order:  # objects in chunk order; chunks written as soon as no later object reaches them
        y, x, s, v = int(ys[i]), int(xs[i]), int(sides[i]), int(ids[i])
        for cy in range(y // CHUNK, (y + s - 1) // CHUNK + 1):
            for cx in range(x // CHUNK, (x + s - 1) // CHUNK + 1):
                buf = buffers.setdefault((cy, cx), np.zeros((CHUNK, CHUNK), np.float32))
                y0, x0 = max(y, cy * CHUNK), max(x, cx * CHUNK)
                y1, x1 = min(y + s, (cy + 1) * CHUNK), min(x + s, (cx + 1) * CHUNK)
                view = buf[y0 - cy * CHUNK: y1 - cy * CHUNK, x0 - cx * CHUNK: x1 - cx * CHUNK]
                view[view == 0] = v
        done = [k for k in buffers if k[0] < y // CHUNK - 1]
        for cy, cx in done:
            image[0, cy * CHUNK: (cy + 1) * CHUNK, cx * CHUNK: (cx + 1) * CHUNK] = buffers.pop((cy, cx))
    bars = 0
    for (cy, cx), buf in buffers.items():
        image[0, cy * CHUNK: (cy + 1) * CHUNK, cx * CHUNK: (cx + 1) * CHUNK] = buf
    for k in range(4):  # long bars crossing many tiles
        y = size // 5 * (k + 1)
        image[0, y: y + 4, 100: size - 100] = count + 1 + k
        bars += 1
    from ome_zarr.format import FormatV05
    from ome_zarr.writer import write_multiscales_metadata

    from tasks.export.ngff import write_root_multiscales

    write_multiscales_metadata(group["image"], [{"path": "0", "coordinateTransformations": [
        {"type": "scale", "scale": [1.0, 1.0, 1.0]}]}], fmt=FormatV05(),
        axes=[{"name": "c", "type": "channel"}, {"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
        name="scene")
    write_root_multiscales(group)
    group.attrs[storage.ATTRS_KEY] = {"kind": "scan", "scan_id": "scene", "axes": "cyx", "shape": [1, size, size],
                                      "spatial": {}, "spacing": None}
    storage.mark_complete(group, {"at": "benchmark"}, arrays=["image/0"])
    return count + bars


def _rss() -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


CHILD = r"""
import json, sys, time
sys.path.insert(0, {repo!r})
import numpy as np, zarr
from benchmarks.instances_memory import _rss
from models.card import LoadedModel, ModelCard
from tasks.engine.infer import EngineConfig
from tasks.instances.detect import infer_instances
from tasks.instances.merge import Detection

def detector(batch):
    out = []
    for tile in batch:
        ids = tile[0].astype(np.int64)
        values = np.unique(ids)
        out.append([Detection(ids == v, 1.0, 1) for v in values[values > 0]])
    return out

mode, store = sys.argv[1], sys.argv[2]
floor = _rss()[0]
t0 = time.perf_counter()
extra = {{}}
if mode == "tilewise":
    card = ModelCard(architecture="maskrcnn", classes=["background", "object"], in_channels=1, spatial_dims=2,
                     tile=[256, 256])
    r = infer_instances(store, LoadedModel(None, card, "benchmark:perfect"), EngineConfig(overlap=0.25, pad="constant",
                        batch=8), detector=detector)
    extra = {{"instances": r.instances, "peak_open": r.peak_open, "tiles": r.tiles, "large": r.large_instances}}
else:
    src = zarr.open_array(store + "/image/0", mode="r")
    dst = zarr.create_array(store + "-copy.zarr", shape=src.shape[1:], chunks=src.chunks[1:], dtype="uint32",
                            fill_value=0, overwrite=True)
    n = src.shape[1]
    c = src.chunks[1]
    for y in range(0, n, c):
        for x in range(0, n, c):
            dst[y:y + c, x:x + c] = np.asarray(src[0, y:y + c, x:x + c]).astype(np.uint32)
seconds = time.perf_counter() - t0
print(json.dumps({{"mode": mode, "floor": floor, "peak": _rss()[1], "seconds": seconds, **extra}}))
"""


def measure(mode: str, store: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO)), mode, store], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="16384")
    parser.add_argument("--work", default=None, help="folder for the scenes (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="tilewise-bench-inst-"))
    for size in (int(s) for s in args.sizes.split(",")):
        store = str(work / f"scene{size}.zarr")
        t0 = time.perf_counter()
        objects = build_scene(store, size)
        built = time.perf_counter() - t0
        ours, plain = measure("tilewise", store), measure("read+write", store)
        image_bytes, label_bytes = size * size * 4, size * size * 4
        work_ours, work_plain = ours["peak"] - ours["floor"], plain["peak"] - plain["floor"]
        print(json.dumps({
            "size": size, "objects_drawn": objects, "instances_found": ours["instances"], "tiles": ours["tiles"],
            "large_instances": ours["large"], "peak_open": ours["peak_open"],
            "working_mb": round(work_ours / 2**20, 1), "read_write_working_mb": round(work_plain / 2**20, 1),
            "working_over_image": round(work_ours / image_bytes, 4),
            "working_over_instance_image": round(work_ours / label_bytes, 4),
            "working_over_read_write": round(work_ours / max(work_plain, 1), 2),
            "seconds": round(ours["seconds"], 1), "read_write_seconds": round(plain["seconds"], 1),
            "time_over_read_write": round(ours["seconds"] / plain["seconds"], 1), "build_seconds": round(built, 1)}))


if __name__ == "__main__":
    main()
