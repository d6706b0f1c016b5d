"""Screenshots of the MLflow UI pages a user visits after a nightly, taken with headless Chromium.

    python docs/screenshots.py [--out docs/images] [--home .tilewise [--dataset isbi2012_em]]

builds a small tilewise home in a temporary folder (three two-section EM stacks from the bundled
ISBI sample, a tiny untrained U-Net registered as champion instead of a trained one, its
calibrator fitted on the validation split, then the nightly job), starts ``mlflow ui`` on that
home's database on a free 127.0.0.1 port and saves one PNG per page into ``--out``. With
``--home``, the pages of an existing home instead (the images in docs/images are those of the
home ``make run`` leaves, where the models are trained ones).
``tests/test_ui_screenshots.py`` runs the same code and checks what each page shows.

Chromium: ``apt-get install -y chromium`` (Debian; ``make test`` does it when run as root).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATASET = "em_tour"
MODEL = f"{DATASET}-unet"
WINDOW = (1280, 860)


def chromium() -> str | None:
    """The Chromium binary, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


# ------------------------------------------------------------------------------ the tilewise home

def build_home(home: Path) -> dict:
    """A nightly's results in ``home`` (TILEWISE_HOME must already point there, and Prefect must be
    reachable: the embedded server, or the test's harness). Returns the catalog folder and model URI."""
    from flows.calibrate import run_calibration
    from flows.nightly import nightly_flow
    from tests.test_nightly import copy_stack, register, write_catalog

    samples = REPO / "data_catalog" / "samples"
    stacks = home / "stacks"
    for i, scan in enumerate("abc"):
        copy_stack(samples, stacks / scan, [2 * i, 2 * i + 1])
    catalog = write_catalog(home / "catalog", DATASET, stacks,
                            extra='description: "ISBI 2012 sections, for the screenshots of docs/"\n'
                                  'reports: {per_scan: true}\n')
    # the catalog's calibration is none (no calibrator to fit at training time); calibrate by hand below
    uri = register(MODEL)
    state = nightly_flow(catalog=str(catalog), infer=False, return_state=True)  # ingest: the split needs stores
    if not state.is_completed():
        raise RuntimeError(f"ingest failed: {state.message}")
    run_calibration(DATASET, str(catalog), uri, "cubic")
    state = nightly_flow(catalog=str(catalog), return_state=True)
    if not state.is_completed():
        raise RuntimeError(f"nightly failed: {state.message}")
    return {"catalog": catalog, "model": uri}


# ------------------------------------------------------------------------------------- mlflow ui

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_ui(database: Path, log: Path):
    """``mlflow ui`` on ``database`` (a tilewise home's mlflow.db) at http://127.0.0.1:PORT; yields the URL."""
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow) if mlflow.exists() else "mlflow", "ui", "--backend-store-uri", f"sqlite:///{database}",
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(log, "wb") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, cwd=database.parent,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow ui did not start: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


# ---------------------------------------------------------------------------------------- pages

@dataclass
class Page:
    name: str  # the PNG's stem in docs/images
    title: str  # what the user is looking at
    route: str  # the UI's hash route


def pages(tracking_uri: str, dataset: str = DATASET) -> list[Page]:
    """The pages a user visits after a nightly, as the UI's routes (found from the tracking store):
    the dataset's latest nightly run that evaluated scans, its first evaluation, the model version it used."""
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=tracking_uri)
    eid = c.get_experiment_by_name(f"tilewise/{dataset}").experiment_id
    for nightly in c.search_runs([eid], "tags.`tilewise.kind` = 'nightly'", order_by=["start_time DESC"]):
        children = c.search_runs([eid], f"tags.`mlflow.parentRunId` = '{nightly.info.run_id}' and "
                                        "tags.`tilewise.step` = 'evaluate'", order_by=["tags.`tilewise.scan`"])
        if children:  # the latest night that evaluated something (a night with nothing new has none)
            evaluation = children[0]
            break
    else:
        raise LookupError(f"no nightly run of tilewise/{dataset} with an evaluation under it")
    pictures = sorted(a.path for a in c.list_artifacts(evaluation.info.run_id, "evaluation"))
    name, number = nightly.data.tags["tilewise.model"].removeprefix("models:/").split("/")
    version = c.get_model_version(name, number)
    model_eid = c.get_run(version.run_id).info.experiment_id
    evaluation_run = f"/experiments/{eid}/runs/{evaluation.info.run_id}"
    model_run = f"/experiments/{model_eid}/runs/{version.run_id}"
    if version.source.startswith("models:/m-"):  # a trained version: the card is in its logged model
        card = f"/experiments/{model_eid}/models/{version.source.removeprefix('models:/')}/artifacts"
    else:  # registered straight from a run's tilewise/ folder
        card = f"{model_run}/artifacts/tilewise/card.json"
    return [
        Page("mlflow-experiments", "the experiment list", "/experiments"),
        Page("mlflow-nightly-run", "the nightly run", f"/experiments/{eid}/runs/{nightly.info.run_id}"),
        Page("mlflow-evaluation-overlay", "an evaluation: its overlay",
             f"{evaluation_run}/artifacts/{next(p for p in pictures if p.endswith('-overlay.png'))}"),
        Page("mlflow-evaluation-reliability", "an evaluation: its reliability diagram",
             f"{evaluation_run}/artifacts/{next(p for p in pictures if p.endswith('-reliability.png'))}"),
        Page("mlflow-model-version", "the model version", f"/models/{name}/versions/{number}"),
        Page("mlflow-model-card", "the model version's card", card),
        Page("mlflow-model-calibration", "the model version's calibration",
             f"{model_run}/artifacts/calibration/reliability.png"),
    ]


def _chromium(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    binary = chromium()
    if binary is None:
        raise RuntimeError("chromium is not installed: apt-get install -y chromium")
    base = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio",
            "--no-first-run", f"--window-size={WINDOW[0]},{WINDOW[1]}", "--virtual-time-budget=15000"]
    # a profile of its own: Chromium refuses to share one between processes
    with _profile() as profile:
        return subprocess.run(base + [f"--user-data-dir={profile}"] + args, capture_output=True, text=True,
                              timeout=timeout)


@contextmanager
def _profile():
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tilewise-chromium-") as folder:
        yield folder


def rendered_dom(url: str) -> str:
    """The page's DOM once the UI's scripts have run (virtual time: no waiting on a wall clock)."""
    result = _chromium(["--dump-dom", url])
    if result.returncode != 0:
        raise RuntimeError(f"chromium --dump-dom {url} failed: {result.stderr[-2000:]}")
    return result.stdout


def screenshot(url: str, png: Path) -> Path:
    png.parent.mkdir(parents=True, exist_ok=True)
    result = _chromium([f"--screenshot={png}", url])
    if result.returncode != 0 or not png.exists():
        raise RuntimeError(f"chromium --screenshot {url} failed: {result.stderr[-2000:]}")
    return png


ASSISTANT_WIDTH = 332  # MLflow 3's assistant panel, open on the right on a first visit (px)


def shrink(png: Path, crop_assistant: bool, colours: int = 128) -> Path:
    """A palette PNG of a few tens of kB (they go into the repository), without the assistant panel
    when the page has it: it takes a quarter of the width and says nothing about tilewise."""
    from PIL import Image

    with Image.open(png) as image:
        image = image.convert("RGB")
        if crop_assistant:
            image = image.crop((0, 0, image.width - ASSISTANT_WIDTH, image.height))
        small = image.quantize(colours, method=Image.Quantize.MEDIANCUT)
    small.save(png, optimize=True)
    return png


def take(url: str, tracking_uri: str, out: Path, dataset: str = DATASET) -> list[tuple[Page, Path, str]]:
    """Every page of :func:`pages`: its rendered DOM, and its screenshot in ``out``."""
    taken = []
    for page in pages(tracking_uri, dataset):
        address = f"{url}/#{page.route}"
        dom = rendered_dom(address)
        png = shrink(screenshot(address, out / f"{page.name}.png"), crop_assistant="MLflow Assistant" in dom)
        taken.append((page, png, dom))
    return taken


def main(argv: list[str] | None = None) -> int:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    parser.add_argument("--home", type=Path, help="an existing tilewise home (e.g. .tilewise after make run) "
                                                  "instead of a small one built for the purpose; its database "
                                                  "is copied, never changed")
    parser.add_argument("--dataset", default=None, help="the dataset whose pages are shown (with --home; "
                                                        "default isbi2012_em)")
    args = parser.parse_args(argv)
    if chromium() is None:
        print("chromium is not installed: apt-get install -y chromium", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="tilewise-screenshots-")).resolve()
    try:
        if args.home:  # mlflow ui may migrate the schema: work on a copy (artifacts stay where they are)
            database, dataset = work / "mlflow.db", args.dataset or "isbi2012_em"
            shutil.copy(args.home / "mlflow.db", database)
        else:
            os.environ["TILEWISE_HOME"] = str(work)
            os.environ.pop("MLFLOW_TRACKING_URI", None)
            os.environ.pop("TILEWISE_STORE_ROOT", None)
            os.chdir(work)  # MLflow's cwd-relative defaults stay out of the repository
            sys.path.insert(0, str(REPO))
            build_home(work)
            database, dataset = work / "mlflow.db", DATASET
        with mlflow_ui(database, work / "mlflow-ui.log") as url:
            for page, png, _ in take(url, f"sqlite:///{database}", args.out, dataset):
                print(f"{page.title}: {png}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
