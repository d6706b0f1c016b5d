"""Does the Mask R-CNN recipe learn from scratch? Touching ellipses with a known answer.

Not a test: a report (tests/test_maskrcnn_recipe.py is its short version). Each image holds
ellipses of random size, elongation, orientation and brightness on a shaded, noisy background,
placed so that most of them touch a neighbour (a pixel inside two ellipses goes to the one it is
deeper in): the object ids are the known answer, and connected components of a perfect foreground
mask merge the touching ones (their F1 is printed as what a semantic model + components could get
at best). The detector is trained by ``tasks.training.instances.train_maskrcnn`` (the code
``tilewise train`` runs) on ``--train`` fixed images within ``--minutes`` of wall-clock, then
scored on ``--test`` other images it never saw: F1 at IoU 0.5 of the detections inference keeps
(score >= 0.5), and COCO mask AP50.

    python benchmarks/maskrcnn_synthetic.py [--minutes 3] [--threads 1] [--size 128]
        [--variant recipe|old] [--args '{"anchor_sizes": [16, 32, 64, 128, 256]}']
        [--recipe '{"optimiser": "sgd", "lr": 0.01}']

``--variant old``: the detector and optimiser as they were before issue 19 (MobileNet-v3 FPN with
BatchNorm, anchors 16-256 on its two stride-16/32 levels, tiles rescaled to 256, SGD at 0.01, the
semantic augmentation); ``--args`` / ``--recipe`` change one part of the recipe at a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def touching_ellipses(rng: np.random.Generator, size: int = 128, count: int = 10,
                      axes: tuple[float, float] = (6.0, 16.0)) -> tuple[np.ndarray, np.ndarray]:
    """One image (1, size, size) float32 and its object ids (size, size) int64 (0: background).

    Centres are drawn so that neighbours sit at 0.75-1.0 of the sum of their mean radii (they
    overlap a little, i.e. touch once split); a pixel inside several ellipses belongs to the one
    whose normalised radius is smallest there. Brightness 0.55-1.0 per ellipse on a background of
    0.15-0.35 with a linear shading, Gaussian noise 0.08."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    ids = np.zeros((size, size), np.int64)
    depth = np.full((size, size), np.inf, np.float32)
    placed: list[tuple[float, float, float]] = []  # (cy, cx, mean radius)
    image = np.zeros((size, size), np.float32)
    brightness = {}
    for _ in range(count * 20):
        if len(placed) == count:
            break
        a, b = rng.uniform(*axes), rng.uniform(axes[0], axes[1])
        r = (a + b) / 2
        if placed and rng.random() < 0.7:  # next to an existing ellipse: touching
            cy0, cx0, r0 = placed[rng.integers(len(placed))]
            angle = rng.uniform(0, 2 * np.pi)
            dist = rng.uniform(0.75, 1.0) * (r + r0)
            cy, cx = cy0 + dist * np.sin(angle), cx0 + dist * np.cos(angle)
        else:
            cy, cx = rng.uniform(r, size - r), rng.uniform(r, size - r)
        if not (r <= cy <= size - r and r <= cx <= size - r):
            continue
        if any(np.hypot(cy - q, cx - p) < 0.75 * (r + s) for q, p, s in placed):
            continue  # would hide too much of another
        theta = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = (dx * np.cos(theta) + dy * np.sin(theta)) / a
        v = (-dx * np.sin(theta) + dy * np.cos(theta)) / b
        d = u * u + v * v
        take = (d <= 1) & (d < depth)
        placed.append((cy, cx, r))
        ids[take] = len(placed)
        depth[take] = d[take]
        brightness[len(placed)] = rng.uniform(0.55, 1.0)
    # objects reduced to slivers by their neighbours are not part of the answer: given to background
    for k in range(1, len(placed) + 1):
        if (ids == k).sum() < 16:
            ids[ids == k] = 0
    background = rng.uniform(0.15, 0.35) + 0.1 * (rng.uniform(-1, 1) * yy + rng.uniform(-1, 1) * xx) / size
    image = np.where(ids > 0, np.vectorize(lambda k: brightness.get(k, 0.0), otypes=[np.float32])(ids), background)
    image = image + rng.normal(0, 0.08, image.shape)
    # consecutive ids 1..N
    values = np.unique(ids[ids > 0])
    lookup = np.zeros(len(placed) + 1, np.int64)
    lookup[values] = np.arange(1, len(values) + 1)
    return image[None].astype(np.float32), lookup[ids]


def instances_from_ids(ids: np.ndarray, min_area: int = 16) -> dict:
    """Each non-zero id one object of class 1 (the synthetic set's answer, touching or not)."""
    boxes, masks = [], []
    for k in np.unique(ids[ids > 0]):
        m = ids == k
        if m.sum() < min_area:
            continue
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        masks.append(m.astype(np.uint8))
    h, w = ids.shape
    return {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4), "labels": np.ones(len(boxes), np.int64),
            "masks": np.asarray(masks, np.uint8).reshape(-1, h, w)}


class ListSampler:
    """Random (image, ids) pairs from a fixed list: the training set."""

    def __init__(self, items: list[tuple[np.ndarray, np.ndarray]], seed: int = 0):
        self.items, self.rng = items, np.random.default_rng(seed)
        self.drawn = 0

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        self.drawn += 1
        return self.items[self.rng.integers(len(self.items))]


def make_set(n: int, seed: int, size: int, count: int, axes: tuple[float, float]) -> list:
    rng = np.random.default_rng(seed)
    return [touching_ellipses(rng, size, count, axes) for _ in range(n)]


def score(network, images: list, score_threshold: float = 0.5) -> dict:
    """F1 at IoU 0.5 (kept detections) and mask AP50 of ``network`` on (image, ids) pairs, and the
    F1 of connected components of the true foreground (touching objects merged)."""
    import torch
    from skimage.measure import label as components

    from tasks.metrics.instances import f1_at_iou
    from tasks.training.instances import detections_f1, mask_ap50

    predictions, truths, merged = [], [], []
    network.eval()
    with torch.inference_mode():
        for image, ids in images:
            det = network([torch.from_numpy(image)])[0]
            predictions.append({"masks": (det["masks"][:, 0] >= 0.5).numpy(), "scores": det["scores"].numpy(),
                                "labels": det["labels"].numpy()})
            truths.append(instances_from_ids(ids))
            merged.append(instances_from_ids(components(ids > 0, connectivity=1)))
    ceiling = f1_at_iou([list(t["masks"].astype(bool)) for t in truths],
                        [list(m["masks"].astype(bool)) for m in merged])["f1"]
    return {"f1_iou50": detections_f1(predictions, truths, score_threshold), "ap50": mask_ap50(predictions, truths),
            "components_of_truth_f1": ceiling,
            "objects": int(sum(len(t["masks"]) for t in truths)),
            "detected": int(sum((p["scores"] >= score_threshold).sum() for p in predictions))}


OLD = {"args": {}, "recipe": {"optimiser": "sgd", "lr": 0.01, "warmup": 1, "augment": "basic"}}


def run(minutes: float, size: int, count: int, axes: tuple[float, float], n_train: int, n_test: int, seed: int,
        args: dict, recipe: dict, batch: int = 4, iterations_per_epoch: int = 25, val: int = 8,
        on_epoch=None) -> dict:
    from tasks.training.instances import DETECTOR_ARGS, Recipe, anchor_sizes, train_maskrcnn
    from tasks.training.loop import TrainConfig

    train = make_set(n_train, seed, size, count, axes)
    validation = make_set(val, seed + 1, size, count, axes)
    test = make_set(n_test, seed + 2, size, count, axes)
    if args is None:  # the recipe: DETECTOR_ARGS and anchors measured on the training set
        args = {**DETECTOR_ARGS, "anchor_sizes": anchor_sizes([instances_from_ids(ids) for _, ids in train])}
    config = TrainConfig(architecture="maskrcnn", spatial_dims=2, patch=(size, size), in_channels=1,
                         classes=("background", "ellipse"), epochs=10_000, iterations_per_epoch=iterations_per_epoch,
                         batch=batch, max_minutes=minutes, seed=seed, patience=10_000, architecture_args=args)
    rows = []
    t0 = time.perf_counter()
    sampler = ListSampler(train, seed)
    outcome = train_maskrcnn(config, sampler, validation, lambda b: b, rows.append if on_epoch is None
                             else on_epoch, instance_classes={1: 1}, recipe=Recipe(**recipe),
                             to_instances=instances_from_ids)
    seconds = time.perf_counter() - t0
    return {"minutes": round(seconds / 60, 2), "iterations": sampler.drawn // batch,
            "epochs": len(outcome.history), "best_epoch": outcome.best_epoch, "val_ap50": round(outcome.best_metric, 4),
            **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in score(outcome.network, test).items()},
            "args": args, "recipe": dataclasses.asdict(Recipe(**recipe))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--count", type=int, default=10, help="ellipses per image")
    parser.add_argument("--axes", default="6,16", help="semi-axes range in pixels")
    parser.add_argument("--train", type=int, default=32, help="training images")
    parser.add_argument("--test", type=int, default=32, help="held-out images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", choices=["recipe", "old"], default="recipe")
    parser.add_argument("--args", default="{}", help="JSON: detector arguments to change (models/maskrcnn.py)")
    parser.add_argument("--recipe", default="{}", help="JSON: Recipe fields to change")
    opts = parser.parse_args()
    import torch

    from tasks.training.instances import DETECTOR_ARGS

    torch.set_num_threads(opts.threads)
    axes = tuple(float(a) for a in opts.axes.split(","))
    change = json.loads(opts.args)
    if opts.variant == "old":
        args, recipe = {**OLD["args"], **change}, {**OLD["recipe"], **json.loads(opts.recipe)}
    else:
        args = None if not change else {**DETECTOR_ARGS, **change}
        recipe = json.loads(opts.recipe)
        if args is not None and "anchor_sizes" not in args:
            from tasks.training.instances import anchor_sizes

            train = make_set(opts.train, opts.seed, opts.size, opts.count, axes)
            args["anchor_sizes"] = anchor_sizes([instances_from_ids(ids) for _, ids in train])

    def show(row):
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), file=sys.stderr,
              flush=True)

    out = run(opts.minutes, opts.size, opts.count, axes, opts.train, opts.test, opts.seed, args, recipe,
              on_epoch=show)
    print(json.dumps({"variant": opts.variant, "threads": opts.threads, "size": opts.size, **out}), flush=True)


if __name__ == "__main__":
    main()
