"""Which plots a report has, as plain specs; :mod:`.svg` and :mod:`.png` draw the same specs.

A chart exists only when its numbers do: proxies appear when the ranking measured them,
pathway metrics for MoE runs, the scatter when verify results or lab ground truth exist,
the merge bars when a comparison was given. Colours are named roles (``pm``, ``train``...)
looked up in :data:`PALETTE`, one table for the page (light and dark) and the PNGs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ckptsel.columns import COLUMNS
from ckptsel.report.inputs import ReportInputs, interval, number

if TYPE_CHECKING:
    from ckptsel.select import CheckpointMetrics

# role -> (light, dark) colour. Colour-blind-safe hues (Okabe-Ito), one role per quantity.
PALETTE: dict[str, tuple[str, str]] = {
    "pm": ("#0072b2", "#56b4e9"),        # pre-memorization accuracy: the prediction
    "train": ("#e69f00", "#f0c050"),     # train accuracy
    "measured": ("#009e73", "#2fd4a0"),  # ckptsel verify: lm-eval on the test file
    "truth": ("#444444", "#c8c8c8"),     # lab ground truth
    "mem": ("#cc79a7", "#e6a3c8"),       # memorised fraction
    "copy": ("#8e6bbf", "#b9a0e0"),      # copy rate
    "nll": ("#d55e00", "#ff8c42"),       # target NLL
    "alt": ("#882255", "#e07ab0"),       # alternative-solution NLL
    "perturb": ("#999933", "#d6d66b"),   # perturbed-prompt NLL / gap
    "metric": ("#117733", "#44bb99"),    # a further ckptsel.columns metric, in a chart of its own
    "heldout": ("#332288", "#9a8cff"),   # held-out reference NLL (ckptsel rank --heldout)
    "entropy": ("#8e6bbf", "#b9a0e0"),
    "path": ("#cc79a7", "#e6a3c8"),
    "recommended": ("#b8860b", "#ffd24d"),
    # a sweep's runs, one colour each (cycled past eight)
    "run0": ("#0072b2", "#56b4e9"), "run1": ("#d55e00", "#ff8c42"), "run2": ("#009e73", "#2fd4a0"),
    "run3": ("#cc79a7", "#e6a3c8"), "run4": ("#e69f00", "#f0c050"), "run5": ("#332288", "#9a8cff"),
    "run6": ("#999933", "#d6d66b"), "run7": ("#882255", "#e07ab0"),
}
RUN_ROLES = 8
# stage -> (light, dark) background band colour
STAGE_COLORS: dict[str, tuple[str, str]] = {
    "underfit": ("#e8e8e8", "#2c2c2c"),
    "generalizing": ("#dff3e8", "#16372a"),
    "over-memorized": ("#fbe0d6", "#4a2418"),
}


@dataclass
class Series:
    name: str
    role: str  # key of PALETTE
    x: list[float]
    y: list[float | None]
    lo: list[float | None] | None = None  # interval band / error bars
    hi: list[float | None] | None = None
    style: str = "line"  # line | dashed | points | bars
    labels: list[str] | None = None  # per point, for tooltips and scatter labels
    x_lo: list[float | None] | None = None  # scatter: horizontal error bars
    x_hi: list[float | None] | None = None


@dataclass
class Chart:
    id: str
    title: str
    caption: str
    x_label: str
    y_label: str
    kind: str = "steps"  # steps | scatter | bars
    series: list[Series] = field(default_factory=list)
    bands: list[tuple[float, float, str]] = field(default_factory=list)  # (x0, x1, stage)
    marker_x: float | None = None  # the recommended checkpoint
    y_range: tuple[float, float] | None = None  # fixed axis (accuracies: 0..1)
    note: str = ""  # a line under the plot (e.g. R²)
    categories: list[str] = field(default_factory=list)  # bars: one per candidate


def _value(row: dict, key: str) -> float | None:
    """A number of a merge candidate's row (a dict: a merge sidecar's comparison)."""
    return number(row.get(key))


def x_positions(rows: Sequence[CheckpointMetrics]) -> tuple[list[float], str]:
    """Training steps when every row has one, else checkpoint order."""
    if rows and all(r.step is not None for r in rows):
        return [float(r.step) for r in rows], "training step"
    return [float(i) for i in range(len(rows))], "checkpoint (training order)"


def stage_bands(xs: Sequence[float], stages: Sequence[str | None]) -> list[tuple[float, float, str]]:
    """Background spans, one per run of equal stages; borders halfway between checkpoints."""
    bands: list[tuple[float, float, str]] = []
    for j, (x, stage) in enumerate(zip(xs, stages)):
        if stage is None:
            continue
        left = (xs[j - 1] + x) / 2 if j > 0 else x
        right = (x + xs[j + 1]) / 2 if j + 1 < len(xs) else x
        if bands and bands[-1][2] == stage and math.isclose(bands[-1][1], left):
            bands[-1] = (bands[-1][0], right, stage)
        else:
            bands.append((left, right, stage))
    return bands


def _series(name, role, xs, values, style="line", cis=None, labels=None) -> Series | None:
    """One line (or points) through ``values`` (None, or NaN: no point), with its intervals ``cis`` when given;
    None when there is no point at all."""
    ys = [number(v) for v in values]
    if all(y is None for y in ys):
        return None
    lo = hi = None
    if cis is not None:
        pairs = [interval(c) for c in cis]
        lo, hi = [c[0] for c in pairs], [c[1] for c in pairs]
    return Series(name, role, list(xs), ys, lo, hi, style, labels)


def build_charts(inputs: ReportInputs) -> list[Chart]:
    """Every chart the inputs support, in reading order (checkpoints that failed are left out)."""
    kept = [i for i, r in enumerate(inputs.rows) if not r.error]
    if not kept:
        return []
    if inputs.ranking.is_sweep:
        return sweep_charts(inputs, kept)
    rows = [inputs.rows[i] for i in kept]
    xs, x_label = x_positions(rows)
    labels = [_label(r) for r in rows]
    rec = inputs.ranking.recommended
    marker = next((x for x, i in zip(xs, kept) if i == rec), None)
    common = {"x_label": x_label, "bands": stage_bands(xs, [r.stage for r in rows]), "marker_x": marker}
    charts = []

    measured = [inputs.measured.get(i, {}) for i in kept]
    truth = [inputs.truth.get(i, {}) for i in kept]
    acc = [
        _series("train accuracy", "train", xs, [r.train_acc for r in rows], labels=labels),
        _series("pre-memorization accuracy (predicted test)", "pm", xs, [r.premem_acc for r in rows],
                cis=[r.premem_ci for r in rows], labels=labels),
        _series(f"measured test accuracy ({inputs.measured_label or 'verify'})", "measured", xs,
                [m.get("accuracy") for m in measured], style="points", cis=[m.get("ci") for m in measured],
                labels=labels),
        _series("held-out accuracy (lab ground truth)", "truth", xs, [t.get("test_accuracy") for t in truth],
                style="dashed", labels=labels),
    ]
    charts.append(Chart("accuracy", "Accuracy over training",
                        "Pre-memorization train accuracy (band: 95% interval) is ckptsel's prediction of test "
                        "accuracy; train accuracy keeps rising as examples are memorised.",
                        y_label="accuracy", series=[s for s in acc if s], y_range=(0.0, 1.0), **common))

    mem = [_series("memorised fraction", "mem", xs, [r.memorized_frac for r in rows], labels=labels),
           _series("copy rate", "copy", xs, [r.copy_rate for r in rows], style="dashed", labels=labels)]
    if any(mem):
        charts.append(Chart("memorisation", "Memorisation",
                            "Fraction of training examples whose target is reproduced near-certainly, and of "
                            "samples that copy the training solution word for word.",
                            y_label="fraction", series=[s for s in mem if s], y_range=(0.0, 1.0), **common))

    nll = [_series("target NLL", "nll", xs, [r.target_nll for r in rows], labels=labels),
           _series("alternative-solution NLL", "alt", xs, [r.alt_nll for r in rows], labels=labels),
           _series("held-out NLL", "heldout", xs, [r.heldout_nll for r in rows], labels=labels),
           _series("held-out NLL (lab ground truth)", "truth", xs, [t.get("test_nll") for t in truth],
                   style="dashed", labels=labels)]
    if any(nll):
        proxy = inputs.ranking.proxy
        caption = ("Perplexity proxies for over-memorization (Ruan et al.): a checkpoint that grows sharp on its "
                   "own training phrasing pays for every other valid solution.")
        if proxy:
            caption += f" The flag uses {proxy.replace('_', ' ')}."
        charts.append(Chart("perplexity", "Perplexity proxies", caption, y_label="nats per token",
                            series=[s for s in nll if s], **common))

    # Its own axis: NLL under a changed prompt sits far above the others and would flatten them.
    gap = _series("perturbed-prompt NLL − target NLL", "perturb", xs, [r.perturb_gap for r in rows], labels=labels)
    if gap:
        charts.append(Chart("perturbation", "Prompt-perturbation gap",
                            "How much more the training target costs under lightly perturbed prompts (a neutral "
                            "preamble, formatting changes): memorisation tied to the exact prompt widens it.",
                            y_label="nats per token", series=[gap], **common))

    for column in COLUMNS:  # the further metrics ckptsel.columns marks for a chart, one chart each
        s = _series(column.header, "metric", xs, [getattr(r, column.key) for r in rows], labels=labels) \
            if column.chart else None
        if s:
            charts.append(Chart(column.key.replace("_", "-"), column.header[:1].upper() + column.header[1:],
                                column.description[:1].upper() + column.description[1:] + ".", y_label=column.header,
                                series=[s], **common))

    for key, value, title, caption in PATHWAY_CHARTS:
        s = _series(title.removeprefix("MoE "), "path", xs, [value(r) for r in rows], labels=labels)
        if s:
            charts.append(Chart(key.replace("_", "-"), title, caption, y_label=key.split("_")[1], series=[s],
                                **common))

    scatter = _scatter(inputs, kept, labels)
    if scatter is not None:
        charts.append(scatter)
    charts += [c for c in map(_merge_chart, inputs.merges) if c is not None]
    return charts


# (chart id, a row's value, title, y label, y range, caption)
SWEEP_CHARTS = (
    ("premem_acc", lambda r: r.premem_acc, "Pre-memorization accuracy by run", "accuracy", (0.0, 1.0),
     "Each run's predicted test accuracy over its own training (band: 95% interval); its history never "
     "crosses runs. ★ marks the sweep's recommendation, ☆ each run's own."),
    ("memorized_frac", lambda r: r.memorized_frac, "Memorised fraction by run", "fraction", (0.0, 1.0),
     "Fraction of training examples whose target each run reproduces near-certainly."),
    ("proxy_ratio", lambda r: r.proxy_ratio, "Over-memorization proxy: rise over the run's own minimum", "ratio", None,
     "The flag's perplexity proxy over its minimum since the run left stage (a); runs harvest their own "
     "alternative solutions, so across runs the sweep compares this rise rather than raw NLLs."),
)


def sweep_charts(inputs: ReportInputs, kept: list[int]) -> list[Chart]:
    """A sweep: one line per run on each chart, then predicted vs measured over every checkpoint."""
    runs = inputs.ranking.runs
    rec = inputs.ranking.recommended
    labels = {i: f"{inputs.rows[i].run} {_label(inputs.rows[i])}" for i in kept}
    charts = []
    for key, value, title, y_label, y_range, caption in SWEEP_CHARTS:
        series = []
        for r, run in enumerate(runs):
            idx = [i for i in kept if inputs.rows[i].run == run.name]
            rows = [inputs.rows[i] for i in idx]
            xs, _ = x_positions(rows)
            mark = " ★" if rec in idx else " ☆" if run.recommended is not None else ""
            s = _series(f"{run.name}{mark}", f"run{r % RUN_ROLES}", xs, [value(row) for row in rows],
                        cis=[row.premem_ci for row in rows] if key == "premem_acc" else None,
                        labels=[labels[i] for i in idx])
            if s is not None:
                series.append(s)
        if series:
            charts.append(Chart(f"sweep-{key.replace('_', '-')}", title, caption, x_label="training step",
                                y_label=y_label, series=series, y_range=y_range))
    scatter = _scatter(inputs, kept, [labels[i] for i in kept])
    if scatter is not None:
        scatter.caption = ("Each point is a checkpoint of one of the sweep's runs; on the dashed identity line the "
                           "prediction is exact. Kang et al.'s R² ≈ 0.9 is across runs like these. Bars: 95% "
                           "intervals.")
        charts.append(scatter)
    charts += [c for c in map(_merge_chart, inputs.merges) if c is not None]
    return charts


# (chart id, a row's value, title, caption): MoE rows only
PATHWAY_CHARTS = (
    ("pathway_distance", lambda r: r.pathways and r.pathways.distance, "MoE pathway distance",
     "Mean pairwise edit distance between memorised examples' expert pathways: how sample-specific routing is. "
     "Li, Fan & Zhou saw it fall with held-out accuracy once the training loss had converged (grokking). In "
     "ckptsel's lab it does not track held-out accuracy: on fine-tuning runs it rises with accuracy, and on runs "
     "that grok (benchmarks/README.md, MoE pathways through grokking) pathways stay sample-specific and its "
     "correlation with held-out accuracy is weak and changes sign between seeds. It shows how routing changes, "
     "not how well a checkpoint generalises."),
    ("pathway_complexity", lambda r: r.pathways and r.pathways.complexity, "MoE pathway complexity",
     "1 − consistency: how much the routing-weighted expert vectors of consecutive layers disagree; Li, Fan & "
     "Zhou saw it fall as the model generalised. In ckptsel's lab grokking runs it falls while the training "
     "loss is flat, before held-out accuracy rises, but as far in a run that never generalises: a fall says "
     "routing is settling, not that held-out accuracy is coming."),
)


def _label(row: CheckpointMetrics) -> str:
    return f"step {row.step}" if row.step is not None else row.path.rsplit("/", 1)[-1]


def _scatter(inputs: ReportInputs, kept: list[int], labels: list[str]) -> Chart | None:
    """Predicted (x) against measured (y): verify's measurement and the lab's ground truth, when present."""
    from ckptsel.verify.compare import agreement

    rows = [inputs.rows[i] for i in kept]
    predicted = [number(r.premem_acc) for r in rows]
    pm_ci = [interval(r.premem_ci) for r in rows]
    sources = (
        (f"ckptsel verify ({inputs.measured_label or 'test set'})", "measured", inputs.measured),
        ("lab ground truth (held-out)", "truth",
         {i: {"accuracy": t.get("test_accuracy")} for i, t in inputs.truth.items()}),
    )
    series, notes = [], []
    for name, role, source in sources:
        measured = [source.get(i) or {} for i in kept]
        keep = [j for j, m in enumerate(measured) if predicted[j] is not None and m.get("accuracy") is not None]
        if not keep:
            continue
        ys = [measured[j]["accuracy"] for j in keep]
        cis = [measured[j].get("ci") or [None, None] for j in keep]
        series.append(Series(name, role, [predicted[j] for j in keep], ys, [c[0] for c in cis], [c[1] for c in cis],
                             "points", [labels[j] for j in keep],
                             x_lo=[pm_ci[j][0] for j in keep], x_hi=[pm_ci[j][1] for j in keep]))
        a = agreement([predicted[j] for j in keep], ys)
        if a.r2_identity is not None:
            notes.append(f"{name}: R² (identity) {a.r2_identity:.2f}, R² (fitted) {_fmt(a.r2_fitted)}, "
                         f"Spearman {_fmt(a.spearman)} over {a.n} checkpoints")
        elif a.mean_abs_error is not None:
            notes.append(f"{name}: mean |predicted − measured| {a.mean_abs_error:.3f} over {a.n} checkpoint(s); "
                         f"R² needs ≥ 3")
    if not series:
        return None
    return Chart("predicted-vs-measured", "Predicted vs measured test accuracy",
                 "Each point is a checkpoint; on the dashed identity line the prediction is exact. "
                 "Bars: 95% intervals.", x_label="predicted (pre-memorization accuracy)",
                 y_label="measured test accuracy", kind="scatter", series=series, note=" · ".join(notes))


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.2f}"


MERGE_METRICS = ("premem_acc", "train_acc", "accuracy", "test_accuracy")


def _merge_chart(merge: dict) -> Chart | None:
    rows = merge["rows"]
    metric = next((m for m in MERGE_METRICS if any(_value(r, m) is not None for r in rows)), None)
    if metric is None:
        return None
    values = [_value(r, metric) for r in rows]
    cis = [r.get("premem_ci") or [None, None] if metric == "premem_acc" else [None, None] for r in rows]
    cats = [r["candidate"] for r in rows]
    series = Series(metric.replace("_", " "), "pm", [float(i) for i in range(len(rows))], values,
                    [c[0] for c in cis], [c[1] for c in cis], "bars", cats)
    return Chart(f"merge-{merge['name']}", f"Merge comparison: {merge['name']}",
                 "Candidates measured with the train-only metrics; the best one is written.",
                 x_label="", y_label=metric.replace("_", " "), kind="bars", series=[series], categories=cats,
                 y_range=(0.0, 1.0) if "acc" in metric else None)
