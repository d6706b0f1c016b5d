"""Reliability diagram (Guo et al. 2017, fig. 1; DeGroot & Fienberg 1983): accuracy of the top
label against its confidence, per equal-width bin, before and after calibration, as a PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.calibration.scores import ReliabilityBins
from tasks.drawing import serialised


@serialised
def reliability_diagram(before: ReliabilityBins | None, after: ReliabilityBins, path: str | Path,
                        title: str = "reliability") -> Path:
    """Write the diagram of ``after`` (and ``before``, if given, beside it) to ``path`` (PNG).

    Top: accuracy per bin as bars at the bins' edges, the diagonal of perfect calibration, the mean
    confidence per bin as dots. Bottom: the share of pixels per bin (log scale). The legend carries
    each accumulator's ECE / Brier / NLL. Written under a temporary name, then renamed.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    series = [(name, b) for name, b in (("before", before), ("after", after)) if b is not None]
    colours = {"before": "tab:red", "after": "tab:blue"}
    fig = Figure(figsize=(5.5, 6.5), dpi=100)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    edges = after.edges
    width = np.diff(edges)
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    shift = {"before": 0.0, "after": 0.0} if len(series) == 1 else {"before": 0.0, "after": 0.5}
    share = 1.0 / len(series)
    for name, bins in series:
        s = bins.scores()
        label = (f"{name if len(series) > 1 else 'accuracy'}: ECE {s['ece']:.4f}, Brier {s['brier']:.4f}, "
                 f"NLL {s['nll']:.4f}")
        acc = np.nan_to_num(bins.accuracy_per_bin(), nan=0.0)
        left = edges[:-1] + shift[name] * width
        top.bar(left, acc, width=width * share, align="edge", color=colours[name], alpha=0.6,
                edgecolor="black", linewidth=0.4, label=label)
        conf = bins.confidence_per_bin()
        top.plot(conf, bins.accuracy_per_bin(), "o", color=colours[name], markersize=3)
        frac = bins.count / max(bins.weight, 1e-300)
        bottom.bar(left, np.where(frac > 0, frac, np.nan), width=width * share, align="edge",
                   color=colours[name], alpha=0.6)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy of the top label")
    top.set_title(title, fontsize=10)
    top.legend(loc="upper left", fontsize=7)
    bottom.set_yscale("log")
    bottom.set_xlabel(f"top-label confidence ({after.bins} bins [i/{after.bins}, (i+1)/{after.bins}))")
    bottom.set_ylabel("share of pixels")
    # fixed margins: the labels are fixed, and tight_layout's text measuring was 40 % of the drawing
    fig.subplots_adjust(left=0.14, right=0.97, top=0.94, bottom=0.09, hspace=0.08)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return path
