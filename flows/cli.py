"""The ``tilewise`` command line.

Heavy libraries (Prefect, Zarr writers, torch, MONAI) are imported inside the commands that need
them, so ``tilewise --help`` and ``tilewise catalog validate`` answer at once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import flows  # noqa: F401  (sets the embedded Prefect defaults before Prefect is imported)

app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode="markdown",
                  help="Segment very large medical and satellite images on a schedule: ingest, train, infer, "
                       "calibrate, evaluate, export; nightly, backfill and serve.")
catalog_app = typer.Typer(no_args_is_help=True, help="List and validate the data catalog.")
run_app = typer.Typer(no_args_is_help=True, help="Run the scheduled jobs now.")
app.add_typer(catalog_app, name="catalog")
app.add_typer(run_app, name="run")

# Long paths stay on one line (scripts read this). Piped, rich would lay tables out in 80 columns and
# fold the nightly's summary into slivers: give them room instead.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 240)
err = Console(stderr=True)

CatalogOpt = typer.Option(None, "--catalog", help="catalog folder or file (default: the bundled sample catalog)")


def _version(value: bool) -> None:
    if value:
        from tasks.version import tilewise_version

        print(f"tilewise {tilewise_version()}")
        raise typer.Exit()


_VERBOSE = [False]


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="print the installed version and exit"),
         verbose: bool = typer.Option(False, "--verbose", "-v",
                                      help="show every log line (INFO) and tracebacks on the console; they "
                                           "always go to the home's logs/tilewise.log")) -> None:
    _VERBOSE[0] = verbose  # applied by _announce_home, once the command knows it touches the home


def _catalog_dir(path: Optional[Path]) -> Path:
    from data_catalog import DEFAULT_CATALOG_DIR

    return Path(path) if path else DEFAULT_CATALOG_DIR


def _announce_home() -> None:
    """First line of every command that reads or writes tilewise state: where that state is (stderr)."""
    from tasks.settings import home_line

    line = home_line()
    err.print(line, style="yellow" if line.endswith("yet)") else "dim", highlight=False, soft_wrap=True)
    from flows.logs import configure
    from tasks.settings import tilewise_home

    configure(tilewise_home(), verbose=_VERBOSE[0])


def _fail(message: str, code: int = 1) -> None:
    # escaped: Rich would take "pip install 'tilewise[crf]'" or a path with [1] in it for markup and drop it
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@catalog_app.command("validate")
def catalog_validate(path: Optional[Path] = typer.Argument(None, help="catalog folder or YAML file")) -> None:
    """Check catalog files; print every problem as FILE: FIELD: REASON and exit 1 if any."""
    from data_catalog import CatalogError, load_catalog

    try:
        entries = load_catalog(_catalog_dir(path))
    except CatalogError as exc:
        for problem in exc.problems:
            err.print(f"[red]{escape(str(problem))}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    out.print(f"ok: {len(entries)} catalog entries valid ({', '.join(e.entry.name for e in entries)})")


@catalog_app.command("list")
def catalog_list(catalog: Optional[Path] = CatalogOpt,
                 as_json: bool = typer.Option(False, "--json", help="one JSON array on stdout, for scripts")) -> None:
    """Datasets with their modality, scan count, labels, model and schedule. A table in a terminal;
    tab-separated values with a header line when stdout is a pipe or a file (names never cut); --json for scripts."""
    import json
    import sys

    from data_catalog import CatalogError, entry_model_uri, load_catalog
    from tasks.errors import ScanError
    from tasks.ingest.discover import discover_scans

    try:
        entries = load_catalog(_catalog_dir(catalog))
    except CatalogError as exc:
        _fail(str(exc))
    rows = []
    for loaded in entries:
        e = loaded.entry
        try:
            count, problem = len(discover_scans(loaded)), None
        except (ScanError, ConnectionError) as exc:  # ConnectionError: the registry is unreachable
            count, problem = None, str(exc)
        rows.append({"dataset": e.name, "modality": e.modality, "scans": count, "scan_error": problem,
                     "labels": e.labels is not None, "model": entry_model_uri(e),
                     "schedule": e.schedule.cron, "timezone": e.schedule.timezone, "file": str(loaded.file)})
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    columns = ("dataset", "modality", "scans", "labels", "model", "schedule", "file")

    def cell(row: dict, column: str) -> str:
        if column == "scans":
            return str(row["scans"]) if row["scan_error"] is None else f"error: {row['scan_error']}"
        if column == "labels":
            return "yes" if row["labels"] else "no"
        if column == "schedule":
            return f"{row['schedule']} ({row['timezone']})"
        if column == "file":
            return Path(row["file"]).name
        if column == "model" and row["model"]:
            return row["model"].removeprefix("models:/")
        return row[column] or "-"

    if not out.is_terminal:  # a pipe or a file: whole values, one line per dataset, tab-separated
        sys.stdout.write("\t".join(columns) + "\n")
        for row in rows:
            sys.stdout.write("\t".join(cell(row, c).replace("\t", " ").replace("\n", " ") for c in columns) + "\n")
        return
    table = Table(title="tilewise catalog")
    for column in columns:
        table.add_column(column, overflow="fold")  # a narrow terminal wraps a name, never cuts it
    for row in rows:
        table.add_row(*(cell(row, c) for c in columns))
    out.print(table)


def _parse_ints(text: Optional[str], what: str) -> Optional[tuple[int, ...]]:
    if not text:
        return None
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        _fail(f"{what} must be comma-separated integers, got {text!r}")
    if any(v <= 0 for v in values):
        _fail(f"{what} must be positive, got {text!r}")
    return values


@app.command()
def ingest(
    source: list[str] = typer.Argument(..., help="scan file(s): one NIfTI/TIFF/GeoTIFF, a folder of slices, "
                                                 "or several NIfTI files stacked as channels; paths or fsspec URLs "
                                                 "(s3://bucket/scan.tif, a prefix of slices, channel objects under "
                                                 "one prefix)"),
    store: str = typer.Option(..., "--store", help="output Zarr group (path or fsspec URL), e.g. scan.zarr"),
    modality: Optional[str] = typer.Option(None, "--modality", help="mri | em | satellite (guessed if omitted)"),
    chunks: Optional[str] = typer.Option(None, "--chunks", help="spatial chunk shape, e.g. 64,64,64 (Z,Y,X)"),
    spacing: Optional[str] = typer.Option(None, "--spacing", help="pixel size Z,Y,X (or Y,X) when files lack it"),
    unit: Optional[str] = typer.Option(None, "--unit", help="unit of --spacing, e.g. nanometer"),
    force: bool = typer.Option(False, "--force", help="re-ingest even if the store is complete and unchanged"),
) -> None:
    """Ingest one scan into a Zarr group (OME-NGFF pyramid + metadata + completion mark)."""
    from rich.progress import BarColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    from tasks.errors import ScanError
    from tasks.ingest import ScanSpec, ingest_scan
    from tasks.ingest.readers import guess_modality
    from tasks.ingest.remote import describe_sources, is_url, local_path

    urls = [s for s in source if is_url(s)]
    if urls:  # remote objects are downloaded into the home's cache; local sources touch only --store
        _announce_home()
    if modality is not None and modality not in ("mri", "em", "satellite"):
        _fail(f"--modality must be mri, em or satellite, got {modality!r}")
    if urls and len(urls) != len(source):
        _fail("the sources of one scan are all local paths or all URLs, not both")
    try:
        # a remote scan is described from its listing, as discovery does; ingest fetches it if it must
        remote = describe_sources(urls) if urls else None
        if remote is not None:
            for obj in remote.objects:
                if obj.size is None:
                    raise ScanError(obj.url, "does not exist")
        sources = remote.source_urls() if remote else tuple(Path(local_path(s) or s) for s in source)
        modality = modality or guess_modality(sources[0], remote)
        space = None
        if spacing:
            try:
                space = tuple(float(v) for v in spacing.split(","))
            except ValueError:
                _fail(f"--spacing must be comma-separated numbers, got {spacing!r}")
        spec = ScanSpec(
            scan_id=Path(str(store).rstrip("/")).name.removesuffix(".zarr"), modality=modality,
            sources=sources, chunks=_parse_ints(chunks, "--chunks"), spacing=space, unit=unit, remote=remote,
        )
        with Progress("[progress.description]{task.description}", BarColumn(), "{task.completed}/{task.total}",
                      TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=True) as bar:
            job = bar.add_task(f"ingest {spec.scan_id}", total=None)
            result = ingest_scan(spec, store, force=force,
                                 progress=lambda done, total: bar.update(job, completed=done, total=total))
    except (ScanError, ConnectionError) as exc:  # ConnectionError: the registry is unreachable
        _fail(str(exc))
    shape = "x".join(str(n) for n in result.shape)
    out.print(f"{result.status}: {result.store} ({modality}, shape {shape}, {result.seconds:.1f} s)")


def _default_crf() -> dict:
    from data_catalog.schema import Refine

    return Refine().params()


@app.command()
def infer(
    store: str = typer.Option(..., "--store", help="scan group made by ingest (SCAN.zarr)"),
    model: str = typer.Option(..., "--model", help="models:/NAME@ALIAS, models:/NAME/VERSION or a TorchScript file "
                                                   "(a JSON model card beside it is read when present)"),
    tile: Optional[str] = typer.Option(None, "--tile", help="tile size, e.g. 96,96,96 (Z,Y,X) or 256,256"),
    overlap: float = typer.Option(0.5, "--overlap", help="fraction of a tile shared with the next, in [0, 1)"),
    batch: int = typer.Option(4, "--batch", help="tiles per forward pass"),
    tta: bool = typer.Option(False, "--tta", help="average over all flips of the spatial axes"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if present)"),
    amp: str = typer.Option("none", "--amp", help="mixed precision: none | bf16 | fp16"),
    # help text is Rich markup to Typer: the extra's brackets are escaped so they are printed
    backend: str = typer.Option("eager", "--backend", help="who runs the network: eager (PyTorch) | openvino "
                                + escape("(CPU, float32, semantic models only; pip install 'tilewise[openvino]')")),
    blend: str = typer.Option("gaussian", "--blend", help="gaussian | constant"),
    pad: str = typer.Option("reflect", "--pad", help="border context: reflect (mirror) | constant (zeros)"),
    placement: str = typer.Option("even", "--placement", help="tile starts: even (nnU-Net) | monai"),
    dtype: str = typer.Option("float16", "--dtype", help="probabilities: float16 | float32"),
    outputs: str = typer.Option("labels,probabilities", "--outputs",
                                help="labels,probabilities | labels (no probability array: less to write, for runs "
                                     "that only need the mask; calibration scores, the CRF and watershed need them)"),
    memory_mb: int = typer.Option(512, "--memory-mb", help="accumulator budget before spilling to disk"),
    dask: Optional[str] = typer.Option(None, "--dask", help="scheduler address, or local[:N] for a local cluster"),
    calibration: bool = typer.Option(True, "--calibration/--no-calibration",
                                     help="apply the model version's calibrator, if it has one"),
    mode: str = typer.Option("auto", "--mode", help="auto (the model card decides) | semantic | instances"),
    crf: bool = typer.Option(False, "--crf", help="then refine with the dense CRF into prediction/crf "
                                                  "(default parameters; the catalog's refine section for the nightly)"),
    skip_empty: str = typer.Option("auto", "--skip-empty", help="tiles whose input is all empty are not run: auto "
                                   "(the source's declared nodata), off, corner (each channel's value at the first voxel: "
                                   "skull-stripped MRI) or a background value, e.g. 0"),
) -> None:
    """Sliding-window inference over a scan group. A semantic model writes prediction/probabilities and
    labels; an instance model (Mask R-CNN) runs tile by tile, merges objects across tiles and writes
    prediction/instances, its table and the class labels."""
    _announce_home()
    choices = {"--amp": (amp, ("none", "bf16", "fp16")), "--blend": (blend, ("gaussian", "constant")),
               "--mode": (mode, ("auto", "semantic", "instances")),
               "--pad": (pad, ("reflect", "constant")), "--placement": (placement, ("even", "monai")),
               "--dtype": (dtype, ("float16", "float32")), "--outputs": (outputs, ("labels,probabilities", "labels"))}
    for flag, (value, allowed) in choices.items():
        if value not in allowed:
            _fail(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")
    skip_setting: str | float = skip_empty
    if skip_empty not in ("auto", "off", "corner"):
        try:
            skip_setting = float(skip_empty)
        except ValueError:
            _fail(f"--skip-empty must be auto, off, corner or a number, got {skip_empty!r}")
    from tasks.engine.backends import BackendError, check_backend

    try:
        check_backend(backend, device=device, amp=amp)
    except BackendError as exc:
        _fail(str(exc))
    if backend != "eager" and mode == "instances":
        _fail(f"--backend {backend} runs semantic models; instance inference (Mask R-CNN) runs eager")
    tile_size = None
    if tile:
        try:
            tile_size = tuple(int(v) for v in tile.replace("x", ",").split(","))
        except ValueError:
            _fail(f"--tile must be comma-separated integers, got {tile!r}")
    from rich.progress import BarColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    from flows.infer import run_model
    from tasks.engine.infer import EngineConfig
    from tasks.engine.model_io import load_model
    from tasks.errors import ScanError

    config = EngineConfig(tile=tile_size, overlap=overlap, batch=batch, tta=tta, device=device, amp=amp,
                          blend=blend, pad=pad, placement=placement, output_dtype=dtype, memory_budget_mb=memory_mb,
                          calibration=calibration, crf=_default_crf() if crf else None, skip_empty=skip_setting,
                          backend=backend, outputs=outputs)
    if crf and outputs == "labels":
        _fail("--crf refines the probabilities: drop --outputs labels")
    if crf and (dask or mode == "instances"):
        _fail("--crf refines a semantic prediction in one process: drop --dask / --mode instances")
    if crf:  # before the model is loaded and any tile runs, not after the whole inference
        from tasks.refine.crf import CrfUnavailable, require_crf

        try:
            require_crf()
        except CrfUnavailable as exc:
            _fail(f"--crf: {exc}")
    try:
        if dask and mode != "instances":
            from tasks.engine.distributed import infer_distributed

            result = infer_distributed(store, model, config, dask)
        else:
            loaded = load_model(model)
            if dask:
                _fail("--dask: instance inference (Mask R-CNN) runs in one process; drop --dask")
            with Progress("[progress.description]{task.description}", BarColumn(), "{task.completed}/{task.total} tiles",
                          TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=True) as bar:
                job = bar.add_task(f"infer {Path(store).name}", total=None)
                result = run_model(store, loaded, config, mode,
                                   progress=lambda done, total: bar.update(job, completed=done, total=total))
    except (ScanError, ConnectionError) as exc:  # ConnectionError: the registry is unreachable
        _fail(str(exc))
    if hasattr(result, "instances"):
        out.print(f"{result.status}: {store}/prediction/instances ({result.instances} instances, {result.tiles} "
                  f"tiles, {result.skipped_nodata} nodata tiles skipped, {result.model_calls} model calls, "
                  f"{result.seconds:.1f} s)")
        return
    skipped = f", {result.tiles_skipped} empty tiles skipped" if result.tiles_skipped else ""
    out.print(f"{result.status}: {store}/prediction ({result.tiles} tiles{skipped}, {result.model_calls} model calls, "
              f"{result.chunks_written} chunks, {result.seconds:.1f} s)")
    if crf:
        out.print(f"dense CRF: {store}/prediction/crf")


@app.command()
def calibrate(
    dataset: str = typer.Argument(..., help="catalog dataset name"),
    catalog: Optional[Path] = CatalogOpt,
    model: Optional[str] = typer.Option(None, "--model", help="models:/NAME/VERSION or models:/NAME@ALIAS "
                                                              "(default: the catalog's model)"),
    method: Optional[str] = typer.Option(None, "--method", help="auto | cubic | isotonic | temperature | ovr-cubic "
                                                                "(default: the catalog's calibration.method)"),
) -> None:
    """Fit a calibrator on the model version's validation split and store it with the version in MLflow."""
    _announce_home()
    from flows.calibrate import calibration_table, run_calibration

    allowed = ("auto", "cubic", "isotonic", "temperature", "ovr-cubic")
    if method is not None and method not in allowed:
        _fail(f"--method must be one of {', '.join(allowed)}, got {method!r}")
    try:
        outcome = run_calibration(dataset, str(_catalog_dir(catalog)), model, method)
    except Exception as exc:  # ScanError, CalibrationError, catalog errors: one line
        _fail(str(exc))
    out.print(calibration_table(outcome))
    out.print(f"chosen: {outcome.calibrator.method} ({outcome.calibrator.chosen_because}); stored with {outcome.model}")


@app.command()
def instances(
    dataset: str = typer.Argument(..., help="catalog dataset name"),
    catalog: Optional[Path] = CatalogOpt,
    method: Optional[str] = typer.Option(None, "--method", help="components | watershed (default: the catalog's "
                                                                "instances.method)"),
    min_size: Optional[int] = typer.Option(None, "--min-size", help="drop objects smaller than this many pixels "
                                                                    "(voxels); default: the catalog's"),
    force: bool = typer.Option(False, "--force", help="recompute even when up to date"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per scan instead of the table"),
) -> None:
    """Objects from each scan's semantic prediction (connected components out of core, or a seeded watershed
    of the membrane probability for EM), the panoptic output, the instance table; an MLflow run per scan."""
    _announce_home()
    if method is not None and method not in ("components", "watershed"):
        _fail(f"--method must be components or watershed, got {method!r}")
    if min_size is not None and min_size < 1:
        _fail(f"--min-size must be at least 1, got {min_size}")
    catalog_dir = _catalog_dir(catalog)
    from data_catalog import CatalogError, find_entry

    try:
        find_entry(dataset, catalog_dir)
    except CatalogError as exc:
        _fail(str(exc))
    from flows.instances import instances_flow

    state = instances_flow(dataset, catalog=str(catalog_dir), method=method, min_size=min_size, force=force,
                           return_state=True)
    outcomes = state.result(raise_on_failure=False)
    if not isinstance(outcomes, list):
        _fail(str(outcomes))
    if as_json:
        import json

        for o in outcomes:
            out.print_json(json.dumps({"dataset": o.dataset, "scan": o.scan_id, "status": o.status,
                                       "message": o.message, "output": o.output, "seconds": round(o.seconds, 2)}))
    else:
        out.print(_outcome_table(f"instances {dataset}", outcomes))
    if any(o.failed for o in outcomes):
        raise typer.Exit(1)


@app.command()
def train(
    dataset: str = typer.Argument(..., help="catalog dataset name"),
    catalog: Optional[Path] = CatalogOpt,
    epochs: Optional[int] = typer.Option(None, "--epochs", help="at most this many epochs"),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="wall-clock budget in minutes"),
    architecture: Optional[str] = typer.Option(None, "--architecture", help="unet | deeplab | maskrcnn "
                                                                            "(default: the catalog's model)"),
    seed: int = typer.Option(0, "--seed"),
    init_from: Optional[str] = typer.Option(None, "--init-from",
                                            help="start from models:/NAME@ALIAS, models:/NAME/VERSION or a weights "
                                                 "file (.safetensors, or a state dict saved with torch.save): "
                                                 "matching layers are loaded, the rest initialised and listed"),
    freeze: Optional[str] = typer.Option(None, "--freeze", help="encoder: not trained for the first 3 epochs"),
) -> None:
    """Train on the dataset's labelled scans; track in MLflow; register; promote if it beats the champion.
    Budget defaults: the catalog entry's 'training' section."""
    _announce_home()
    from data_catalog import CatalogError, find_entry

    if architecture is not None and architecture not in ("unet", "deeplab", "maskrcnn"):
        _fail(f"--architecture must be unet, deeplab or maskrcnn, got {architecture!r}")
    if epochs is not None and epochs < 1:  # 0 is not "the catalog's value"
        _fail(f"--epochs must be at least 1, got {epochs}")
    if max_minutes is not None and not max_minutes > 0:
        _fail(f"--max-minutes must be more than 0, got {max_minutes}")
    if freeze is not None and freeze != "encoder":
        _fail(f"--freeze must be encoder, got {freeze!r}")
    catalog_dir = _catalog_dir(catalog)
    try:
        find_entry(dataset, catalog_dir)
    except CatalogError as exc:
        _fail(str(exc))
    from flows.progress import epoch_progress
    from flows.train import train_flow
    from tasks.training.data import TrainingError

    with epoch_progress(err):  # a bar on a terminal; the epoch log lines either way
        state = train_flow(dataset, catalog=str(catalog_dir), architecture=architecture, epochs=epochs,
                           max_minutes=max_minutes, seed=seed, init_from=init_from, freeze=freeze,
                           return_state=True)
    report = state.result(raise_on_failure=False)
    if isinstance(report, TrainingError):
        _fail(str(report))
    if isinstance(report, BaseException):
        _fail(f"training failed: {type(report).__name__}: {report}")
    out.print(f"trained {report.registered} ({report.architecture}): {report.metric_name}={report.metric:.4f}, "
              f"{report.epochs} epochs, {report.seconds / 60:.1f} min, stopped: {report.stopped}")
    out.print(f"{report.decision}; MLflow run {report.run_id}")
    _print_artifacts(report.run_id)
    out.print(f"calibration: {report.calibration}")
    if report.watershed:
        out.print(f"watershed: {report.watershed}")
    if report.initialised_from:
        out.print(f"init-from: {report.initialised_from}")


def _print_artifacts(run_id: str) -> None:
    """Where the run's files went: the user chose the tracking URI, tilewise chose this folder."""
    from models.registry import run_artifacts

    try:
        out.print(f"MLflow artifacts: {run_artifacts(run_id)}", highlight=False)
    except Exception as exc:  # the run is made; not finding its folder again is no failure
        err.print(escape(f"MLflow artifacts of run {run_id}: not found ({type(exc).__name__}: {exc})"))


def _evaluation_tables(report) -> list[Table]:
    """The metrics of one evaluation as tables: FCN summary, per class, calibration, ISBI."""
    def fmt(value, digits: int = 4) -> str:
        return "n/a" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))

    d = report.to_dict()
    sem = d["semantic"]
    summary = Table(title=f"evaluation of {report.scan_id} ({report.pixels} pixels, reference: {report.reference})")
    summary.add_column("metric", overflow="fold")
    summary.add_column("value", overflow="fold")
    for key in ("pixel_accuracy", "mean_accuracy", "mean_iou", "frequency_weighted_iou", "mean_dice"):
        summary.add_row(key, fmt(sem[key]))
    for key in ("ece", "brier", "nll"):
        if d.get("calibration"):
            summary.add_row(key, fmt(d["calibration"].get(key)))
    for key, value in (d.get("isbi") or {}).items():
        if isinstance(value, (int, float)):
            summary.add_row(f"isbi {key}", fmt(value))
    per = Table(title="per class" + (f" (HD95 and surface Dice at tolerance {d['surface']['tolerance']} "
                                     f"{d['surface']['unit'] or 'scan units'}, {d['surface']['note']})"
                                     if d.get("surface") else ""))
    per.add_column("class", no_wrap=True)
    columns = ["Dice", "IoU", "recall", "ref px", "pred px"] + (["HD95", "surf Dice"] if d.get("surface") else [])
    for column in columns:
        per.add_column(column, overflow="fold", justify="right", min_width=len(column))
    for name, v in sem["per_class"].items():
        row = [name, fmt(v["dice"], 3), fmt(v["iou"], 3), fmt(v["accuracy"], 3), str(v["reference_pixels"]),
               str(v["predicted_pixels"])]
        if d.get("surface"):
            s = d["surface"]["per_class"].get(name, {})
            row += [fmt(s.get("hd95"), 2) if s else "-", fmt(s.get("surface_dice"), 3) if s else "-"]
        per.add_row(*row)
    return [summary, per]


@app.command()
def evaluate(
    store: str = typer.Option(..., "--store", help="scan group with a complete prediction (SCAN.zarr)"),
    labels: Optional[Path] = typer.Option(None, "--labels", help="reference label file (default: the store's "
                                                                  "labels/reference)"),
    catalog: Optional[Path] = CatalogOpt,
    dataset: Optional[str] = typer.Option(None, "--dataset", help="catalog dataset for the label mapping, class names "
                                                                  "and boundary class (default: the store's dataset "
                                                                  "when the catalog has it)"),
    boundary_class: Optional[str] = typer.Option(None, "--boundary-class", help="class scored with the ISBI 2012 "
                                                                                "measures (EM membranes)"),
    as_json: bool = typer.Option(False, "--json", help="print the metrics as JSON on stdout"),
    mlflow: bool = typer.Option(True, "--mlflow/--no-mlflow", help="log the evaluation to an MLflow run"),
) -> None:
    """Score a prediction against reference labels: FCN table, Dice/IoU, calibration, HD95 (3D), ISBI (EM).
    Writes the metrics into the prediction's attributes; pictures and an MLflow run beside."""
    _announce_home()
    import json

    from data_catalog import CatalogError, find_entry
    from tasks import storage
    from tasks.errors import ScanError
    from tasks.reports import evaluate_and_report

    entry = None
    name = dataset or (storage.read_record(store) or {}).get("dataset")
    if name:
        try:
            entry = find_entry(name, _catalog_dir(catalog)).entry
        except CatalogError as exc:
            if dataset:  # asked for by name: must exist
                _fail(str(exc))
    try:
        report, images, run_id = evaluate_and_report(store, labels_path=labels, entry=entry,
                                                     boundary_class=boundary_class, log_mlflow=mlflow)
    except (ScanError, ConnectionError) as exc:  # ConnectionError: the registry is unreachable
        _fail(str(exc))
    if report.drift is not None and report.drift["far"]:  # on stderr, also beside --json
        err.print(f"[yellow]drift warning:[/] {report.scan_id}: {escape(report.drift['message'])}")
    if as_json:
        print(json.dumps(report.to_dict(), indent=1))
        return
    for table in _evaluation_tables(report):
        out.print(table)
    out.print(f"pictures: {', '.join(str(p) for p in images)}")
    if run_id:
        from tasks.reports.tracking import dataset_of

        out.print(f"MLflow run {run_id} (experiment tilewise/{dataset_of(report)})")
        _print_artifacts(run_id)


@app.command("export")
def export_cmd(
    store: str = typer.Option(..., "--store", help="scan group with a complete prediction (SCAN.zarr)"),
    fmt: str = typer.Option(..., "--format", help="nifti | geotiff | tiff | geojson | gpkg | zarr"),
    out_path: Optional[str] = typer.Option(None, "--out", help="file to write (.nii[.gz], .tif, .ome.tif, "
                                                                ".geojson, .gpkg); zarr writes into the store"),
    what: str = typer.Option("labels", "--what", help="labels | probabilities | instances (one polygon per "
                                                      "instance: geojson or gpkg)"),
    crs: str = typer.Option("4326", "--crs", help="GeoJSON coordinates: 4326 (RFC 7946) | source"),
    force: bool = typer.Option(False, "--force", help="export even if the file is up to date"),
) -> None:
    """Export the prediction: NIfTI, Cloud-Optimized GeoTIFF, OME-TIFF, GeoJSON or NGFF labels in the store;
    instances as GeoJSON or GeoPackage polygons."""
    _announce_home()
    from tasks.errors import ScanError
    from tasks.export import ExportOptions, export_scan

    try:
        result = export_scan(store, ExportOptions(fmt, out_path, what=what, crs=crs, force=force))
    except (ScanError, ConnectionError) as exc:  # ConnectionError: the registry is unreachable
        _fail(str(exc))
    note = " (prediction and options unchanged since the last export)" if result.status == "unchanged" else ""
    out.print(f"{result.status}: {result.out} ({result.format}, {result.seconds:.1f} s){note}")


def _outcome_table(title: str, outcomes) -> Table:
    table = Table(title=title)
    for column in ("dataset", "scan", "step", "status", "seconds", "message"):
        table.add_column(column, overflow="fold")
    colours = {"failed": "red", "unchanged": "dim", "skipped": "yellow"}
    for o in outcomes:
        style = colours.get(o.status, "green")
        table.add_row(escape(o.dataset), escape(o.scan_id), o.step, f"[{style}]{o.status}[/]", f"{o.seconds:.1f}",
                      escape(o.message or ""))
    return table


def _check_datasets(catalog_dir: Path, names: list[str]) -> None:
    """Fail fast, before starting Prefect, on a broken catalog or a dataset it does not have."""
    from data_catalog import CatalogError
    from flows.nightly import select_datasets

    try:
        select_datasets(str(catalog_dir), names or None)
    except CatalogError as exc:
        _fail(str(exc))
    except ValueError as exc:
        _fail(str(exc))


def _report_run(kind: str, state, as_json: bool = False) -> None:
    """A line per scan (what was done, the key metric, the output), the warnings worth acting on
    (drift, skipped steps), then the failures (exit 1) or one line saying what was done, the log
    file and how to browse the runs. ``as_json``: every row on stdout, the rest on stderr."""
    from flows import summary
    from flows.logs import log_file
    from models.registry import tracking_uri
    from tasks.settings import tilewise_home

    home = tilewise_home()
    outcomes = state.result(raise_on_failure=False)
    if not isinstance(outcomes, list):
        _fail(f"{kind} flow failed: {outcomes}")
    say = err if as_json else out
    if as_json:
        import json

        print(json.dumps({"run": summary.run_name(kind), "scans": summary.scan_rows(outcomes)}, indent=1, default=str))
    elif out.is_terminal:
        out.print(summary.rich_table(f"tilewise {summary.run_name(kind)}", outcomes, out.width, str(home)))
    else:  # a log: one plain line per scan, whole names
        for line in summary.plain_lines(outcomes, str(home)):
            out.print(line, highlight=False, markup=False)
    for r in summary.drifted(summary.scan_rows(outcomes)):
        where = escape(f"{r['dataset']}/{r['scan']}")
        say.print(f"[yellow]drift warning: {where}: {escape(r['drift']['message'])}[/]", highlight=False)
    for o in outcomes:
        if o.status == "skipped" and o.scan_id == "*":
            say.print(f"[yellow]{escape(f'{o.dataset}: {o.step} skipped: {o.message}')}[/]", highlight=False)
    say.print(f"log: {log_file(home)}", style="dim", highlight=False, soft_wrap=True)
    if state.is_failed():
        _fail(state.message or "some scans failed")
    scans = len({(o.dataset, o.scan_id) for o in outcomes if o.scan_id != "*"})
    worked = sum(1 for o in outcomes if o.did_work)
    if outcomes and not worked:
        say.print(f"[green]{kind}: nothing new; {scans} scans up to date, every step unchanged[/]")
    else:
        say.print(f"[green]{kind}: {scans} scans ok, {worked} of {len(outcomes)} steps did work[/]")
    say.print(f"browse the runs: .venv/bin/mlflow ui --backend-store-uri {tracking_uri()}", highlight=False,
              soft_wrap=True)


DaskOpt = typer.Option(None, "--dask", help="run inference on a Dask cluster: local[:N] or a scheduler address "
                                            "(default: the catalog's tiling.dask)")


@run_app.command("nightly")
def run_nightly(
    catalog: Optional[Path] = CatalogOpt,
    dataset: Optional[list[str]] = typer.Option(None, "--dataset", help="only these datasets (repeatable)"),
    force: bool = typer.Option(False, "--force", help="recompute every step of every scan, even where up to date"),
    infer: bool = typer.Option(True, "--infer/--no-infer",
                               help="run the champion over the scans, then evaluate and export; --no-infer "
                                    "ingests (and still trains a missing model unless --no-train)"),
    train: bool = typer.Option(True, "--train/--no-train",
                               help="train once (catalog 'training' budget) where a dataset has no model yet"),
    dask: Optional[str] = DaskOpt,
    as_json: bool = typer.Option(False, "--json", help="one JSON object on stdout (every step of every scan) "
                                                       "instead of the table"),
) -> None:
    """The nightly job: new or changed scans through ingest, infer (the champion, trained first when
    missing), evaluate (where labels exist) and export (the catalog's format)."""
    _announce_home()
    catalog_dir = _catalog_dir(catalog)
    _check_datasets(catalog_dir, dataset or [])
    from flows.nightly import nightly_flow

    from flows.progress import run_progress

    with run_progress(err, live=not _VERBOSE[0]):
        state = nightly_flow(catalog=str(catalog_dir), datasets=dataset or None, force=force, infer=infer,
                             train_missing=train, dask=dask, return_state=True)
    _report_run("nightly", state, as_json)


@app.command()
def backfill(
    dataset: str = typer.Argument(..., help="catalog dataset name"),
    catalog: Optional[Path] = CatalogOpt,
    since: Optional[str] = typer.Option(None, "--since", help="first scan date, YYYY-MM-DD (inclusive)"),
    until: Optional[str] = typer.Option(None, "--until", help="last scan date, YYYY-MM-DD (inclusive)"),
    force: bool = typer.Option(False, "--force", help="recompute every step of the selected scans"),
    dask: Optional[str] = DaskOpt,
    as_json: bool = typer.Option(False, "--json", help="one JSON object on stdout instead of the table"),
) -> None:
    """The nightly chain over one dataset's scans dated in a range (the catalog's scans.date: file
    time by default, or a date in the path), or all of them. --force recomputes exactly those."""
    from flows.backfill import parse_date

    _announce_home()
    catalog_dir = _catalog_dir(catalog)
    _check_datasets(catalog_dir, [dataset])
    try:
        start, end = parse_date(since, "--since"), parse_date(until, "--until")
    except ValueError as exc:
        _fail(str(exc))
    if start and end and start > end:
        _fail(f"--since {start} is after --until {end}")
    from flows.backfill import backfill_flow

    from flows.progress import run_progress

    with run_progress(err, live=not _VERBOSE[0]):
        state = backfill_flow(dataset, catalog=str(catalog_dir), since=since, until=until, force=force, dask=dask,
                              return_state=True)
    _report_run("backfill", state, as_json)


@app.command("serve")
def serve(
    catalog: Optional[Path] = CatalogOpt,
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="at most N flow runs at once"),
) -> None:
    """Serve the schedules: nightly/DATASET on each dataset's cron (its time zone), backfill/backfill on demand.

    Needs a Prefect server (PREFECT_API_URL). Runs until Ctrl-C / SIGTERM; stopping pauses the deployments, the next start resumes them.
    """
    from data_catalog import CatalogError, load_catalog

    _announce_home()  # the served runs write stores, exports and MLflow runs there
    catalog_dir = _catalog_dir(catalog)
    try:
        load_catalog(catalog_dir)
    except CatalogError as exc:
        _fail(str(exc))
    from flows.serve import ServeError, require_server, serve_catalog

    try:
        url = require_server()
    except ServeError as exc:
        _fail(str(exc))

    def started(lines: list[str]) -> None:
        out.print(f"serving {len(lines)} deployment(s) against {url} (Ctrl-C stops and pauses them):")
        for line in lines:
            out.print(f"  {line}")
        out.print("run a backfill: prefect deployment run 'backfill/backfill' -p dataset=NAME [-p force=true]")

    serve_catalog(catalog_dir, limit=limit, on_started=started)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
