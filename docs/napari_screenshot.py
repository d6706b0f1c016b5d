"""Screenshot of a scan group in napari: the image, the reference labels and the prediction.

napari is not a tilewise dependency; run this with a Python that has it and its OME-Zarr plugin::

    python -m venv /tmp/napari && /tmp/napari/bin/pip install "napari[pyqt6]" napari-ome-zarr
    /tmp/napari/bin/python docs/napari_screenshot.py .tilewise/stores/spacenet_rio/SCAN.zarr

It opens the store at its root as a user would (``napari SCAN.zarr`` with napari-ome-zarr): the
image, then every label image ``labels/`` lists (reference, prediction, instances; the plugin
hides label layers at first). The reference is drawn as outlines over the filled prediction, so
both show; the rest is napari's default look. docs/images/napari.png is spacenet_rio's chip 53
after ``make run`` (napari 0.9.2, napari-ome-zarr 0.10.0, PyQt6), taken headless under Xvfb::

    QT_API=pyqt6 xvfb-run -a -s "-screen 0 1600x1200x24" /tmp/napari/bin/python docs/napari_screenshot.py \
        .tilewise/stores/spacenet_rio/3band_013022223130_Public_img53.zarr

(Qt's offscreen platform gave napari no OpenGL context here, so the script wants a display.)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", help="a scan group (SCAN.zarr) with labels/reference and labels/prediction")
    parser.add_argument("--out", default=str(Path(__file__).parent / "images" / "napari.png"))
    parser.add_argument("--size", default="1200x800", help="window size, WIDTHxHEIGHT")
    parser.add_argument("--slice", type=int, default=None, help="the Z slice of a volume (default: the middle)")
    args = parser.parse_args()
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        raise SystemExit("no display: run it under xvfb-run (see the top of docs/napari_screenshot.py)")

    import napari

    viewer = napari.Viewer(show=True, title=Path(args.store).name)
    width, height = (int(n) for n in args.size.split("x"))
    viewer.window.resize(width, height)
    layers = viewer.open(args.store, plugin="napari-ome-zarr")
    # napari-ome-zarr names a label layer by its path ("labels/labels/reference") and hides it
    found = {layer.name.rpartition("/")[2]: layer for layer in layers}
    for wanted in ("reference", "prediction"):
        if wanted not in found:
            raise SystemExit(f"{args.store}: napari found no '{wanted}' label image "
                             f"(layers: {', '.join(layer.name for layer in layers)})")
    reference, prediction = found["reference"], found["prediction"]
    reference.visible = prediction.visible = True
    reference.contour, reference.opacity = 2, 1.0
    prediction.opacity = 0.6
    viewer.layers.move(viewer.layers.index(reference), len(viewer.layers))  # outlines on top
    if viewer.dims.ndim > 2:
        middle = viewer.dims.range[0].stop / 2 if args.slice is None else args.slice
        viewer.dims.set_point(0, middle)
    viewer.reset_view()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pixels = viewer.screenshot(canvas_only=False, flash=False)
    from PIL import Image  # napari's own dependency

    # 256 colours (octree keeps the small thumbnails' colours): a third of the bytes of a full-colour PNG
    Image.fromarray(pixels[..., :3]).quantize(256, method=Image.Quantize.FASTOCTREE).save(args.out, optimize=True)
    print(f"{args.out}: layers {', '.join(layer.name for layer in viewer.layers)}")
    viewer.close()


if __name__ == "__main__":
    main()
