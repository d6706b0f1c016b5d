"""What a user sees in the MLflow UI after a nightly, as a browser renders it: `mlflow ui` on the
nightly's database, headless Chromium on the pages docs/results.md shows (docs/screenshots.py takes
them), each checked for what it must show. Skipped, saying why, only where Chromium cannot be
installed (not root); `make test` installs it as root."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest

from tests.test_nightly import home  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]


def _screenshots():
    spec = importlib.util.spec_from_file_location("docs_screenshots", REPO / "docs" / "screenshots.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


shots = _screenshots()


@pytest.fixture(scope="module")
def browser():
    if shots.chromium() is None:
        if os.geteuid() != 0:
            pytest.skip("Chromium is not installed and this user cannot install it: as root, "
                        "apt-get install -y chromium (make test does it)")
        pytest.fail("Chromium is not installed: make test installs it as root (apt-get install -y chromium)")
    return shots.chromium()


@pytest.fixture(scope="module")
def pages(browser, home, prefect_server, tmp_path_factory):  # noqa: F811
    from models.registry import tracking_uri

    shots.build_home(home)
    out = tmp_path_factory.mktemp("screenshots")
    with shots.mlflow_ui(home / "mlflow.db", out / "mlflow-ui.log") as url:
        taken = shots.take(url, tracking_uri(), out)
    return {page.name: (png, dom) for page, png, dom in taken}


def _text(dom: str) -> str:
    """The page's visible text, roughly: tags dropped, whitespace folded."""
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text))


def _shown_images(dom: str) -> dict[str, str]:
    """alt -> src of the page's images (the artifact viewer names the artifact in alt)."""
    shown = {}
    for tag in re.findall(r"<img\b[^>]*>", dom):
        alt, src = re.search(r'\balt="([^"]*)"', tag), re.search(r'\bsrc="([^"]*)"', tag)
        if alt and src:
            shown[alt.group(1)] = src.group(1)
    return shown


@pytest.mark.slow
def test_the_pages_a_user_visits_show_the_nightlys_results(pages):
    from PIL import Image

    expected = {  # page -> what its text must show
        "mlflow-experiments": ["tilewise/em_tour"],
        "mlflow-nightly-run": ["nightly ", "evaluate a", "evaluate b", "evaluate c", "tilewise.kind", "nightly",
                               "models:/em_tour-unet/1"],
        "mlflow-evaluation-overlay": ["evaluate a", "evaluation/a-overlay.png"],
        "mlflow-evaluation-reliability": ["evaluate a", "evaluation/a-reliability.png"],
        "mlflow-model-version": ["em_tour-unet", "Version 1", "champion", "calibrator.method"],
        "mlflow-model-card": ["tilewise/card.json", '"architecture"', '"unet"', '"classes"', '"membrane"'],
        "mlflow-model-calibration": ["calibration/reliability.png"],
    }
    assert set(pages) == set(expected)
    for name, wanted in expected.items():
        png, dom = pages[name]
        text = _text(dom)
        missing = [w for w in wanted if w not in text]
        assert not missing, f"{name} does not show {missing}: {text[:2000]}"
        with Image.open(png) as image:  # a rendered page, not a blank one
            assert image.width >= 800 and image.height >= 600
            assert len(image.convert("L").getcolors(1 << 16) or ()) > 16, f"{name}: a blank screenshot"
    # the pictures are shown: an image of the artifact, its bytes fetched from the server (a blob URL)
    for name, artifact in (("mlflow-evaluation-overlay", "evaluation/a-overlay.png"),
                           ("mlflow-evaluation-reliability", "evaluation/a-reliability.png"),
                           ("mlflow-model-calibration", "calibration/reliability.png")):
        shown = _shown_images(pages[name][1])
        assert shown.get(artifact, "").startswith("blob:"), f"{name}: {artifact} is not shown: {shown}"
