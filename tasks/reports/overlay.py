"""PNG overlays of a prediction on its image: predicted and reference contours in two colours.

The image is read from the pyramid level whose largest spatial side fits ``OVERLAY_MAX_PIXELS``
(tasks/metrics/evaluate.py picks it and collects the label planes at that level by striding
during its streaming pass); volumes get their three orthogonal mid-planes (Z, Y and X fixed at
the middle), shown with the physical aspect ratio of the level's pixel size. Contours are the
pixels ``skimage.segmentation.find_boundaries(mode="inner")`` marks, class by class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from tasks.drawing import serialised

REFERENCE_COLOUR = (0.0, 0.9, 0.2)  # green
PREDICTION_COLOUR = (1.0, 0.1, 0.9)  # magenta
AGREEMENT_COLOUR = (1.0, 0.85, 0.0)  # yellow: both contours on the same pixel
THIN_STACK = 0.25  # orthogonal planes are drawn only when the stack is at least this deep (physically)


def _display(image: np.ndarray) -> np.ndarray:
    """(C, Y, X) -> grey (Y, X) or RGB (Y, X, 3) in [0, 1], stretched between the 1st and 99th
    percentiles of the finite values of each channel."""
    image = np.asarray(image, dtype=np.float32)
    channels = image[:3] if image.shape[0] == 3 else image[:1]
    out = []
    for c in channels:
        finite = c[np.isfinite(c)]
        lo, hi = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
        out.append(np.clip((np.nan_to_num(c, nan=lo) - lo) / max(hi - lo, 1e-12), 0, 1))
    return np.stack(out, axis=-1) if len(out) == 3 else out[0]


def _contours(labels: np.ndarray) -> np.ndarray:
    from skimage.segmentation import find_boundaries

    return find_boundaries(labels, mode="inner", background=0)  # pixels of a class next to another value


def _image_planes(store: str, level: int, ndim: int) -> tuple[list[np.ndarray], list[float]]:
    """The image's mid-planes at ``level`` ((C, rows, cols) each) and the level's pixel size."""
    from tasks import storage

    group = storage.open_group(store)
    image = group[f"image/{level}"]
    spacing = [1.0] * ndim
    try:
        datasets = group["image"].attrs["ome"]["multiscales"][0]["datasets"]
        spacing = [float(s) for s in datasets[level]["coordinateTransformations"][0]["scale"][1:]]
    except (KeyError, IndexError, TypeError):
        pass
    if ndim == 2:
        return [np.asarray(image[...])], spacing
    z, y, x = (n // 2 for n in image.shape[1:])
    return [np.asarray(image[:, z]), np.asarray(image[:, :, y]), np.asarray(image[:, :, :, x])], spacing


@serialised
def overlay_png(store: str, level: int, reference_planes: Sequence[np.ndarray],
                prediction_planes: Sequence[np.ndarray], path: str | Path, title: str = "") -> Path:
    """Draw the image planes of ``store`` at pyramid ``level`` with reference and predicted contours.

    ``reference_planes`` / ``prediction_planes``: label planes at that level, one for a 2D scan, three
    for a volume (Z mid-plane (Y, X), Y mid-plane (Z, X), X mid-plane (Z, Y)). Writes a PNG at
    ``path`` (to a temporary name, then renamed) and returns it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    ndim = 3 if len(reference_planes) == 3 else 2
    images, spacing = _image_planes(store, level, ndim)
    if ndim == 3:
        names = ["Z mid-plane (rows Y, columns X)", "Y mid-plane (Z upwards, columns X)",
                 "X mid-plane (Z upwards, columns Y)"]
        aspects = [spacing[1] / spacing[2], spacing[0] / spacing[2], spacing[0] / spacing[1]]
        origins = ["upper", "lower", "lower"]  # Z grows upwards, as slices are stacked
        depth = reference_planes[1].shape[0] * spacing[0]
        extent = max(reference_planes[0].shape[0] * spacing[1], reference_planes[0].shape[1] * spacing[2])
        if depth < THIN_STACK * extent:  # e.g. a few EM sections: side views would be a few pixel rows
            images, names, aspects, origins = images[:1], names[:1], aspects[:1], origins[:1]
            reference_planes, prediction_planes = reference_planes[:1], prediction_planes[:1]
    else:
        names, aspects, origins = ["image (rows Y, columns X)"], [spacing[0] / spacing[1]], ["upper"]
    fig = Figure(figsize=(5.0 * len(images), 5.6), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(images), squeeze=False)[0]
    for ax, image, ref, pred, name, aspect, origin in zip(axes, images, reference_planes, prediction_planes, names,
                                                          aspects, origins):
        shown = _display(image)
        rgb = np.repeat(shown[..., None], 3, axis=-1) if shown.ndim == 2 else shown.copy()
        rows, cols = min(rgb.shape[0], ref.shape[0]), min(rgb.shape[1], ref.shape[1])
        rgb = rgb[:rows, :cols]
        ref_edge, pred_edge = _contours(np.asarray(ref)[:rows, :cols]), _contours(np.asarray(pred)[:rows, :cols])
        rgb[ref_edge] = REFERENCE_COLOUR
        rgb[pred_edge] = PREDICTION_COLOUR
        rgb[ref_edge & pred_edge] = AGREEMENT_COLOUR
        ax.imshow(rgb, interpolation="nearest", aspect=aspect, origin=origin)
        ax.set_title(name, fontsize=10)
        ax.set_axis_off()
    fig.legend(handles=[Patch(color=REFERENCE_COLOUR, label="reference contour"),
                        Patch(color=PREDICTION_COLOUR, label="predicted contour"),
                        Patch(color=AGREEMENT_COLOUR, label="both")],
               loc="lower center", ncol=3, frameon=False)
    if title:
        import textwrap

        fig.suptitle("\n".join(textwrap.wrap(title, 55 * len(images))), fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return path


def evaluation_images(report, folder: str | Path) -> list[Path]:
    """The pictures of one evaluation (``tasks.metrics.evaluate.EvaluationReport``) in ``folder``:
    ``<scan>-overlay.png`` and, when the calibration scores exist, ``<scan>-reliability.png``."""
    folder = Path(folder)
    extras = report.extras
    paths = [overlay_png(report.store, extras["overlay_level"], extras["planes"]["reference"],
                         extras["planes"]["prediction"], folder / f"{report.scan_id}-overlay.png",
                         title=f"{report.scan_id}: reference vs prediction ({report.model or 'unknown model'})")]
    if extras.get("bins") is not None:
        from tasks.calibration.diagram import reliability_diagram

        paths.append(Path(reliability_diagram(None, extras["bins"], folder / f"{report.scan_id}-reliability.png",
                                              f"{report.scan_id}: reliability of the stored probabilities")))
    return paths
