"""What a nightly or backfill run says when it ends: one row per scan (steps, model version, key
metric, outputs, seconds), as a Prefect markdown artifact, as one MLflow run per dataset
(experiment ``tilewise/<dataset>``, run ``nightly <date>``, tag ``tilewise.kind``) and as the
CLI's table.

The MLflow run holds the counts and the mean of each key metric as metrics, every scan as a row of
a table (``summary/scans.json`` in MLflow's table format, ``summary/scans.csv``; the whole record in
``summary/run.json``) and the overlays of the :data:`WORST` worst-scoring scans
(``worst/<scan>-overlay.png``), however many scans the night had. Per-scan metrics on the run
itself (``<scan>.mean_dice`` ...) only up to :data:`PER_SCAN_METRICS_MAX` scans; per-scan runs
nested under it only with the catalog's ``reports: {per_scan: true}``.

Drift (tasks/metrics/drift.py): a scan whose prediction's foreground fraction is far outside what
the model's validation scans held is listed under "Drift warnings", marked in the CLI table, and
recorded on the MLflow run (tag ``tilewise.drift``, ``scans_drifted``, the table's drift columns;
metrics ``<scan>.foreground_fraction`` and ``<scan>.drift`` within the per-scan metric limit),
labels or not."""

from __future__ import annotations

import time
from datetime import datetime, timezone

from flows.outcomes import NO_WORK, ScanOutcome

STEPS = ("ingest", "train", "infer", "instances", "evaluate", "export")
WORST = 5  # overlays of the worst-scoring scans on the night's run
PER_SCAN_METRICS_MAX = 50  # scans whose key metrics are also metrics of the run itself (charts)
KEY_METRICS = (("mean_dice", "Dice"), ("isbi_v_rand", "V_rand"), ("mean_iou", "IoU"))


def key_metric(metrics: dict) -> str:
    """The headline numbers of an evaluation: the first region's Dice where the catalog names regions
    (BraTS: whole tumour), else mean Dice; V_rand for EM (ISBI 2012), instance F1."""
    region = next((k for k in metrics if k.startswith("region_dice_")), None)
    if region is not None:
        shown = [f"{region.removeprefix('region_dice_')} Dice {metrics[region]:.3f}"]
    else:
        shown = [f"{label} {metrics[k]:.3f}" for k, label in KEY_METRICS[:2] if k in metrics]
    if not shown and "mean_iou" in metrics:
        shown = [f"IoU {metrics['mean_iou']:.3f}"]
    if "instances_f1" in metrics:  # objects: F1 at IoU 0.5 (tasks/metrics/instance_eval.py)
        shown.append(f"F1@0.5 {metrics['instances_f1']:.3f}")
    return ", ".join(shown)


def scan_rows(outcomes: list[ScanOutcome]) -> list[dict]:
    """One row per (dataset, scan) in first-seen order; ``*`` rows hold dataset-wide steps."""
    rows: dict[tuple[str, str], dict] = {}
    for o in outcomes:
        row = rows.setdefault((o.dataset, o.scan_id), {"dataset": o.dataset, "scan": o.scan_id, "model": "",
                                                       "metric": "", "outputs": [], "seconds": 0.0,
                                                       "errors": [], "metrics": {}})
        old = row.get(o.step)  # two rows of a step (labels and instance polygons): the worst, else the busiest
        if old is None or o.failed or (old in NO_WORK and not o.failed and o.status not in NO_WORK):
            row[o.step] = o.status if old != "failed" else old
        row["seconds"] = round(row["seconds"] + o.seconds, 2)
        if o.model and o.step in ("infer", "train"):
            row["model"] = o.model
        if o.metrics:
            row["metrics"] = dict(o.metrics)
            row["metric"] = key_metric(o.metrics)
        if o.output and o.step == "export":
            row["outputs"].append(o.output)
        if o.failed or o.status == "skipped":
            row["errors"].append(f"{o.step}: {o.message}")
        if o.step == "infer" and not o.failed and o.store:
            row["drift"] = _drift(o.store)
    return list(rows.values())


def _drift(store: str) -> dict | None:
    """The prediction's drift record (None: no validation fractions with its model, or unreadable:
    the summary never fails over it)."""
    from tasks.metrics.drift import prediction_drift

    try:
        drift = prediction_drift(store)
    except Exception:
        return None
    return drift.record() if drift is not None else None


def drifted(rows: list[dict]) -> list[dict]:
    return [r for r in rows if (r.get("drift") or {}).get("far")]


def markdown(title: str, outcomes: list[ScanOutcome]) -> str:
    rows = scan_rows(outcomes)
    failed = sorted({(o.dataset, o.scan_id) for o in outcomes if o.failed})
    worked = sum(1 for o in outcomes if o.did_work)
    lines = [f"# {title}", "",
             f"{len(rows)} scans, {len(failed)} failed, {worked} steps did work"
             + (" (nothing new: every step unchanged)" if not worked and not failed else ""), "",
             "| dataset | scan | model | " + " | ".join(STEPS) + " | metric | outputs | seconds |",
             "|" + "---|" * (len(STEPS) + 6)]
    for r in rows:
        cells = [r["dataset"], r["scan"], r["model"], *(r.get(s, "") for s in STEPS), r["metric"],
                 "<br>".join(r["outputs"]), f"{r['seconds']:.1f}"]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    if drifted(rows):
        lines += ["", "## Drift warnings", ""]
        lines += [f"- `{r['dataset']}/{r['scan']}`: {r['drift']['message']}" for r in drifted(rows)]
    if failed:
        lines += ["", "## Failures", ""]
        lines += [f"- `{o.dataset}/{o.scan_id}` ({o.step}): {o.message}" for o in outcomes if o.failed]
    return "\n".join(lines)


def create_artifact(title: str, outcomes: list[ScanOutcome], key: str) -> None:
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown(title, outcomes), key=key, description=title)


def run_name(kind: str, when: datetime | None = None) -> str:
    return f"{kind} {(when or datetime.now(timezone.utc)).strftime('%Y-%m-%d')}"


def start_mlflow_run(dataset: str, kind: str, logger=None, description: str | None = None) -> str | None:
    """An MLflow run for this dataset's part of the run (status RUNNING until finished; deleted if
    the run did nothing, see :func:`finish_mlflow_run`); None, with a warning, when MLflow cannot be
    reached (the scans still run). ``description``: the catalog's, shown on the experiment."""
    try:
        from models.registry import client, experiment_id

        name = run_name(kind)
        run = client().create_run(experiment_id(dataset, description), run_name=name,
                                  tags={"mlflow.runName": name, "tilewise.kind": kind, "tilewise.dataset": dataset})
        return run.info.run_id
    except Exception as exc:
        if logger is not None:
            logger.warning("%s: no MLflow summary run (%s: %s)", dataset, type(exc).__name__, exc)
        return None


def primary_metric(metrics: dict) -> tuple[str, float] | None:
    """The score that ranks scans worst first (higher is better): the first region's Dice, else
    mean Dice, V_rand, IoU; None without one."""
    region = next((k for k in metrics if k.startswith("region_dice_")), None)
    for k in ([region] if region else []) + [k for k, _ in KEY_METRICS]:
        if k in metrics:
            try:
                return k, float(metrics[k])
            except (TypeError, ValueError):
                return None
    return None


def worst_rows(rows: list[dict], n: int = WORST) -> list[dict]:
    """The ``n`` scans with the lowest primary score (one sort: no per-scan search)."""
    scored = [(primary_metric(r["metrics"])[1], i) for i, r in enumerate(rows) if primary_metric(r["metrics"])]
    return [rows[i] for _, i in sorted(scored)[:n]]


def table_rows(rows: list[dict]) -> list[dict]:
    """The run's per-scan table: one flat row per scan (steps, result, model, key metrics, drift,
    seconds, outputs, errors); a metric column per metric name any scan has."""
    names = sorted({k for r in rows for k in r["metrics"]})
    out = []
    for r in rows:
        drift = r.get("drift") or {}
        flat = {"dataset": r["dataset"], "scan": r["scan"], "result": scan_result(r), "model": r["model"],
                **{s: r.get(s, "") for s in STEPS if s != "train"}}
        flat.update({k: r["metrics"].get(k) for k in names})
        flat.update({"foreground_fraction": drift.get("fraction"), "drift": drift.get("far"),
                     "seconds": r["seconds"], "outputs": " ".join(r["outputs"]), "errors": "; ".join(r["errors"])})
        out.append(flat)
    return out


def finish_mlflow_run(run_id: str | None, outcomes: list[ScanOutcome], version: str | None, seconds: float,
                      logger=None) -> None:
    """The dataset's night on its run (see the module's docstring): counts (scans, scans_ok,
    scans_failed, scans_changed, steps_unchanged, scans_drifted, seconds) and each key metric's mean
    over the scans as metrics, the per-scan table, the worst scans' overlays; a constant number of
    MLflow calls whatever the number of scans. A run in which no step did work and none failed is
    deleted: nightlies that found nothing new leave no run to wade through (the log file and Prefect
    keep them)."""
    if run_id is None:
        return
    try:
        import csv
        import io

        from mlflow.entities import Metric, RunTag

        from models.registry import client

        c = client()
        if not any(o.did_work or o.failed for o in outcomes):
            c.delete_run(run_id)
            return
        rows = [r for r in scan_rows(outcomes) if r["scan"] != "*"]
        failed = {(o.dataset, o.scan_id) for o in outcomes if o.failed}
        changed = {(o.dataset, o.scan_id) for o in outcomes if o.did_work and o.scan_id != "*"}
        now = int(time.time() * 1000)
        counts = {"scans": len(rows), "scans_ok": sum(1 for r in rows if (r["dataset"], r["scan"]) not in failed),
                  "scans_failed": len(failed), "scans_changed": len(changed),
                  "steps_unchanged": sum(1 for o in outcomes if o.status == "unchanged"), "seconds": seconds,
                  "scans_drifted": len(drifted(rows))}
        for k, _ in KEY_METRICS:
            values = [float(r["metrics"][k]) for r in rows if isinstance(r["metrics"].get(k), (int, float))]
            if values:
                counts[f"{k}_mean"] = sum(values) / len(values)
                counts[f"{k}_min"] = min(values)
        metrics = [Metric(k, float(v), now, 0) for k, v in counts.items()]
        if len(rows) <= PER_SCAN_METRICS_MAX:
            for r in rows:
                for k, label in KEY_METRICS:
                    if k in r["metrics"]:
                        metrics.append(Metric(f"{r['scan']}.{k}"[:250], float(r["metrics"][k]), now, 0))
                if r.get("drift"):
                    metrics.append(Metric(f"{r['scan']}.foreground_fraction"[:250], float(r["drift"]["fraction"]),
                                          now, 0))
                    metrics.append(Metric(f"{r['scan']}.drift"[:250], float(r["drift"]["far"]), now, 0))
        drift_tag = "; ".join(f"{r['scan']}: {r['drift']['message']}" for r in drifted(rows)) or "none"
        tags = [RunTag("tilewise.model", version or "none"), RunTag("tilewise.drift", drift_tag[:5000])]
        c.log_batch(run_id, metrics=metrics[:900], tags=tags)
        table = table_rows(rows)
        if table:
            columns = list(table[0])
            c.log_table(run_id, {k: [t[k] for t in table] for k in columns}, "summary/scans.json")
            text = io.StringIO()
            writer = csv.DictWriter(text, fieldnames=columns)
            writer.writeheader()
            writer.writerows(table)
            c.log_text(run_id, text.getvalue(), "summary/scans.csv")
        c.log_dict(run_id, {"model": version, "scans": rows,
                            "steps": [{"dataset": o.dataset, "scan": o.scan_id, "step": o.step, "status": o.status,
                                       "seconds": round(o.seconds, 2), "model": o.model, "output": o.output,
                                       "message": o.message} for o in outcomes]}, "summary/run.json")
        c.log_text(run_id, markdown(f"{rows[0]['dataset'] if rows else ''} {run_name('run')}", outcomes),
                   "summary/summary.md")
        _log_worst_overlays(c, run_id, worst_rows(rows))
        c.set_terminated(run_id, status="FAILED" if failed else "FINISHED")
    except Exception as exc:
        if logger is not None:
            logger.warning("MLflow summary run %s not completed (%s: %s)", run_id, type(exc).__name__, exc)


def _log_worst_overlays(c, run_id: str, rows: list[dict]) -> None:
    """The evaluation overlays (``reports/<dataset>/<scan>/<scan>-overlay.png``) of ``rows`` under ``worst/``."""
    from tasks.reports import report_dir

    for r in rows:
        path = report_dir(r["dataset"], r["scan"]) / f"{r['scan']}-overlay.png"
        if path.is_file():
            c.log_artifact(run_id, str(path), "worst")


def short(text: str, width: int) -> str:
    """``text`` cut in the middle to ``width`` characters ("3band_0130…_img53"): the ends of a scan
    id are the parts that tell scans apart."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head):]


def scan_result(row: dict, compact: bool = False) -> str:
    """What a run did to one scan, in a few words: the step that failed, ``unchanged``, what the
    steps that did work did (``compact``: "all N steps" when every one did)."""
    failed = [s for s in STEPS if row.get(s) == "failed"]
    if failed:
        return "failed: " + ", ".join(failed)
    ran = [s for s in STEPS if row.get(s)]
    worked = [s for s in ran if row[s] not in NO_WORK]
    if not worked:
        return "unchanged"
    if compact and worked == ran and len(worked) > 2:
        return f"all {len(worked)} steps"
    return " ".join(row[s] for s in worked)  # their statuses: ingested, resumed, evaluated ...


def _relative(path: str, home: str | None) -> str:
    if home and path.startswith(home.rstrip("/") + "/"):
        return path[len(home.rstrip("/")) + 1:]
    return path


def rich_table(title: str, outcomes: list[ScanOutcome], width: int = 100, home: str | None = None):
    """What a terminal shows: per dataset a line (model version, exports folder), then one line per
    scan -- its id (cut in the middle when long), what was done, the key metric, the files exported
    (by their ending: the name is the scan id) -- within ``width`` columns. Details are behind
    ``--json``, in the log file and in MLflow."""
    from pathlib import PurePosixPath

    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    rows = scan_rows(outcomes)
    parts: list = [Text(title, style="bold")]
    scan_width = max(12, min(34, width // 3))
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        mine = [r for r in rows if r["dataset"] == dataset]
        model = next((r["model"] for r in mine if r["model"]), "").removeprefix("models:/")
        outputs = [o for r in mine for o in r["outputs"]]
        folder = str(PurePosixPath(_relative(outputs[0], home)).parent) + "/" if outputs else ""
        trained = [r["train"] for r in mine if r["scan"] == "*" and r.get("train")]
        header = " · ".join(x for x in (f"[bold]{escape(dataset)}[/]", escape(model),
                                        f"train {trained[0]}" if trained else "", escape(folder)) if x)
        line = Text.from_markup(header, overflow="ellipsis")
        line.no_wrap = True
        parts.append(line)
        table = Table(box=None, show_header=False, pad_edge=False, padding=(0, 2, 0, 0))
        table.add_column(no_wrap=True, min_width=min(scan_width, 12), max_width=scan_width)
        table.add_column(no_wrap=True, min_width=9, overflow="ellipsis")
        table.add_column(no_wrap=True, min_width=8, overflow="ellipsis")
        table.add_column(no_wrap=True, overflow="ellipsis")
        for r in (r for r in mine if r["scan"] != "*"):
            result = scan_result(r, compact=True)
            colour = "red" if result.startswith("failed") else "dim" if result == "unchanged" else "green"
            metric = r["metric"].split(", ")[0] + (" [yellow]drift[/]" if (r.get("drift") or {}).get("far") else "")
            endings = [PurePosixPath(o).name.removeprefix(r["scan"]) or PurePosixPath(o).name for o in r["outputs"]]
            table.add_row("  " + escape(short(r["scan"], scan_width - 2)), f"[{colour}]{escape(result)}[/]", metric,
                          escape(" ".join(endings)))
        parts.append(table)
    return Group(*parts)


def plain_lines(outcomes: list[ScanOutcome], home: str | None = None) -> list[str]:
    """The same for a log file: one line per scan, whole names, tab-free."""
    lines = []
    for r in scan_rows(outcomes):
        if r["scan"] == "*":
            if r.get("train"):
                lines.append(f"{r['dataset']}: train {r['train']}" + (f" ({r['model']})" if r["model"] else ""))
            continue
        parts = [f"{r['dataset']}/{r['scan']}: {scan_result(r)}"]
        if r["model"]:
            parts.append(r["model"])
        if r["metric"]:
            parts.append(r["metric"])
        parts += [_relative(o, home) for o in r["outputs"]]
        lines.append(" · ".join(parts))
    return lines
