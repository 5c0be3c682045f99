"""The report page: one self-contained HTML file (inline CSS and SVG; no script, font or URL).

Reading order: the headline (which checkpoint, the predicted test accuracy, why, what was
flagged), the plots over training, the table of every number, then the rules and where the
inputs came from. Light and dark follow the reader's system setting
(``prefers-color-scheme``); the chart colours come from :data:`ckptsel.report.charts.PALETTE`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime, timezone
from html import escape
from typing import TYPE_CHECKING, Any, NamedTuple

from ckptsel import __version__
from ckptsel.columns import BY_KEY, table_columns
from ckptsel.report import svg
from ckptsel.report.charts import PALETTE, STAGE_COLORS, Chart
from ckptsel.report.inputs import ReportInputs, interval, number

if TYPE_CHECKING:
    from ckptsel.select import CheckpointMetrics


class Column(NamedTuple):
    """A column of the table of every number: it appears when any row has a value."""

    key: str
    header: str
    spec: str  # a format spec, "ci" (the value and its interval) or "band:<key>" (this value to the other's)
    value: Callable[[CheckpointMetrics], Any]


# A column appears when any row has a value: the checkpoint's own fields, every ckptsel.columns column a
# table shows ("ci" and "band:<key>" cells as the column says), and the MoE pathway metrics.
COLUMNS = (
    Column("step", "step", "d", lambda r: r.step),
    Column("epoch", "epoch", ".2f", lambda r: r.epoch),
    Column("train_loss", "train loss", ".4f", lambda r: r.train_loss),
    Column("stage", "stage", "s", lambda r: r.stage),
    *(Column(c.key, c.report_header, c.fmt if c.cell == "value" else c.cell, lambda r, key=c.key: getattr(r, key))
      for c in table_columns(lambda key: True)),
    Column("pathway_distance", "pathway distance", ".3f", lambda r: r.pathways and r.pathways.distance),
    Column("pathway_complexity", "pathway complexity", ".3f", lambda r: r.pathways and r.pathways.complexity),
)


def _css() -> str:
    light = "".join(f".s-{role}{{--c:{colors[0]}}}" for role, colors in PALETTE.items())
    dark = "".join(f".s-{role}{{--c:{colors[1]}}}" for role, colors in PALETTE.items())
    bands_light = "".join(f".band-{s.replace(' ', '-')},.stage-{s.replace(' ', '-')}{{--b:{c[0]}}}"
                          for s, c in STAGE_COLORS.items())
    bands_dark = "".join(f".band-{s.replace(' ', '-')},.stage-{s.replace(' ', '-')}{{--b:{c[1]}}}"
                         for s, c in STAGE_COLORS.items())
    return f"""
:root{{--bg:#ffffff;--fg:#1d1d1f;--muted:#5f6368;--line:#d9dce1;--card:#f6f7f9;--grid:#eceef1;--accent:#0072b2;
--good:#0b7a4b;--warn:#9a6700;--bad:#b3261e;color-scheme:light dark}}
{light}{bands_light}
@media (prefers-color-scheme:dark){{:root{{--bg:#15171a;--fg:#e8eaed;--muted:#a0a4a8;--line:#3a3d42;--card:#1f2226;
--grid:#2a2d31;--accent:#56b4e9;--good:#3ddc97;--warn:#f2c14e;--bad:#ff8a80}}{dark}{bands_dark}}}
*{{box-sizing:border-box}}
body{{margin:0;background:var(--bg);color:var(--fg);font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,
"Helvetica Neue",Arial,sans-serif}}
main{{max-width:1480px;margin:0 auto;padding:28px 28px 48px}}
h1{{font-size:26px;margin:0 0 4px}} h2{{font-size:19px;margin:34px 0 10px}} h3{{font-size:16px;margin:0 0 2px}}
.sub{{color:var(--muted);margin:0 0 18px}}
.headline{{background:var(--card);border:1px solid var(--line);border-left:6px solid var(--accent);border-radius:10px;
padding:16px 20px}}
.headline .big{{font-size:22px;font-weight:650}} .headline p{{margin:6px 0}}
.num{{font-variant-numeric:tabular-nums}}
.callout{{border-radius:8px;padding:8px 12px;margin:8px 0;border:1px solid var(--line)}}
.callout.warn{{border-color:var(--warn)}} .callout.bad{{border-color:var(--bad)}}
.callout b{{margin-right:6px}}
.grid{{display:grid;grid-template-columns:repeat(auto-fit,minmax(560px,1fr));gap:18px}}
figure{{margin:0;background:var(--card);border:1px solid var(--line);border-radius:10px;padding:14px 14px 10px}}
figcaption{{color:var(--muted);font-size:13px;margin-top:4px}}
.legend{{display:flex;flex-wrap:wrap;gap:4px 16px;font-size:13px;margin:6px 0 2px}}
.legend span{{display:inline-flex;align-items:center;gap:6px}}
.swatch{{width:18px;height:0;border-top:3px solid var(--c);display:inline-block}}
.swatch.dashed{{border-top-style:dashed}} .swatch.points,.swatch.bars{{width:10px;height:10px;border:0;background:var(--c);
border-radius:50%}} .swatch.bars{{border-radius:2px}}
.swatch.band{{width:14px;height:12px;border:1px solid var(--line);background:var(--b)}}
.swatch.rec{{border-top:2px dashed var(--c)}}
svg.chart{{width:100%;height:auto;display:block;font-size:12px}}
svg .plot{{fill:none;stroke:var(--line)}} svg .gridline{{stroke:var(--grid);stroke-width:1}}
svg .tick,svg .pt-label,svg .bar-value{{fill:var(--muted)}} svg .axis-label{{fill:var(--fg);font-size:13px}}
svg .band{{fill:var(--b)}}
svg .line{{fill:none;stroke:var(--c);stroke-width:2.2;stroke-linejoin:round}} svg .line.dashed{{stroke-dasharray:6 4}}
svg .ci{{fill:var(--c);opacity:.18;stroke:none}} svg .pt{{fill:var(--c);stroke:var(--bg);stroke-width:1}}
svg .err{{stroke:var(--c);stroke-width:1.6}} svg .bar{{fill:var(--c);opacity:.85}}
svg .identity{{stroke:var(--muted);stroke-dasharray:5 5}}
svg .marker line{{stroke:var(--c);stroke-width:1.6;stroke-dasharray:4 3}} svg .marker text{{fill:var(--c);font-weight:600}}
.note{{font-size:13px;margin-top:4px}}
table{{border-collapse:collapse;width:100%;font-size:13px}}
.table-wrap{{overflow-x:auto;border:1px solid var(--line);border-radius:10px}}
th,td{{padding:5px 6px;text-align:right;border-bottom:1px solid var(--line);white-space:nowrap}}
th{{background:var(--card);position:sticky;top:0;white-space:normal;vertical-align:bottom}} th:first-child,td:first-child{{text-align:left}}
tr.rec td{{font-weight:650;background:color-mix(in srgb,var(--accent) 10%,transparent)}}
td.stage span{{background:var(--b);padding:1px 8px;border-radius:10px}}
td.error{{color:var(--bad);text-align:left;white-space:normal}}
dl{{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;font-size:14px}} dt{{color:var(--muted)}} dd{{margin:0}}
code{{font-size:13px}} .muted{{color:var(--muted)}}
"""


def _f(value, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if spec == "s":
        return str(value)
    return format(value, spec)


def _has(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _ci(value, ci) -> str:
    value, (lo, hi) = number(value), interval(ci)
    if value is None:
        return "—"
    if lo is None or hi is None:
        return _f(value)
    return f"{_f(value)} <span class='muted'>({_f(lo, '.2f')}–{_f(hi, '.2f')})</span>"


def _nobreak(text: str) -> str:
    return text.replace("-", "\u2011")


def headline(inputs: ReportInputs) -> str:
    ranking, rows = inputs.ranking, inputs.rows
    rec = ranking.recommended
    out = ['<section class="headline">']
    if rec is None:
        out.append('<p class="big">No checkpoint could be recommended.</p>')
    else:
        row = rows[rec]
        step = f" (step {row.step})" if row.step is not None else ""
        out.append(f'<p class="big">★ Recommended: {escape(inputs.name(rec))}{escape(step)}</p>')
        lo, hi = row.premem_ci
        out.append(f'<p>Predicted test accuracy <b class="num">{_f(row.premem_acc)}</b> '
                   f'(95% interval {_f(lo, ".2f")}–{_f(hi, ".2f")}): pre-memorization train accuracy over '
                   f'{ranking.n_examples} training examples.</p>')
        measured = inputs.measured.get(rec)
        if measured:
            mci = measured.get("ci") or [None, None]
            out.append(f'<p>Measured with lm-eval on {escape(str(measured.get("source")))} '
                       f'({escape(str(measured.get("mode")))}): <b class="num">{_f(measured["accuracy"])}</b> '
                       f'({_f(mci[0], ".2f")}–{_f(mci[1], ".2f")}).</p>')
        truth = inputs.truth.get(rec)
        if truth and truth.get("test_accuracy") is not None:
            best = max((t.get("test_accuracy") or 0.0 for t in inputs.truth.values()), default=0.0)
            scope = "sweep" if ranking.is_sweep else "run"
            out.append(f'<p>Lab ground truth: held-out accuracy <b class="num">{_f(truth["test_accuracy"])}</b> '
                       f'(best checkpoint of the {scope}: {_f(best)}).</p>')
        out.append(f'<p><b>Why:</b> {escape(ranking.rule)}.</p>')
    for i, row in enumerate(rows):
        if row.flag is not None:
            out.append(f'<div class="callout bad"><b>Over-memorized: {escape(inputs.name(i))}</b>'
                       f'{escape(row.flag.reason())}</div>')
        if row.error:
            out.append(f'<div class="callout bad"><b>Not measured: {escape(inputs.name(i))}</b>'
                       f'{escape(row.error)}</div>')
    for warning in ranking.warnings:
        out.append(f'<div class="callout warn"><b>Warning</b>{escape(warning)}</div>')
    out.append("</section>")
    return "".join(out)


def figure(chart: Chart) -> str:
    legend = []
    for s in chart.series:
        legend.append(f'<span class="s-{escape(s.role)}"><i class="swatch {escape(s.style)}"></i>{escape(s.name)}</span>')
    if chart.marker_x is not None:
        legend.append('<span class="s-recommended"><i class="swatch rec"></i>recommended checkpoint</span>')
    note = f'<div class="note">{escape(chart.note)}</div>' if chart.note else ""
    return (f'<figure id="fig-{escape(chart.id)}"><h3>{escape(chart.title)}</h3>'
            f'<div class="legend">{"".join(legend)}</div>{svg.render(chart)}{note}'
            f"<figcaption>{escape(chart.caption)}</figcaption></figure>")


def runs_table(inputs: ReportInputs) -> str:
    """A sweep's runs side by side: each run's own recommendation, and the truth where the lab knows it."""
    runs = inputs.ranking.runs
    if len(runs) < 2:
        return ""
    rows, rec = inputs.rows, inputs.ranking.recommended
    truth = any(t.get("test_accuracy") is not None for t in inputs.truth.values())
    head = ("<tr><th>run</th><th>checkpoints</th><th>its pick</th><th>pre&#8209;mem acc (95% CI)</th>"
            "<th>stage</th><th>memorised</th><th>proxy rise</th>"
            + ("<th>lab held&#8209;out acc</th><th>run's best (lab)</th>" if truth else "") + "</tr>")
    body = []
    for run in runs:
        pick = run.recommended
        own = [i for i, r in enumerate(rows) if r.run == run.name]
        cells = [f"<td>{'★ ' if pick is not None and pick == rec else ''}{escape(run.name)}</td>",
                 f'<td class="num">{len(run.indices or own)}</td>']
        if pick is None:
            cells.append(f'<td colspan="{5 + 2 * truth}">nothing measured</td>')
        else:
            row = rows[pick]
            cells += [f'<td class="num">{escape(_f(row.step, "s"))}</td>',
                      f'<td class="num">{_ci(row.premem_acc, row.premem_ci)}</td>',
                      f'<td>{escape(_f(row.stage, "s"))}</td>',
                      f'<td class="num">{_f(row.memorized_frac)}</td>',
                      f'<td class="num">{_f(row.proxy_ratio, ".2f")}</td>']
            if truth:
                best = max((inputs.truth[i].get("test_accuracy") for i in own
                            if (inputs.truth.get(i) or {}).get("test_accuracy") is not None), default=None)
                cells += [f'<td class="num">{_f((inputs.truth.get(pick) or {}).get("test_accuracy"))}</td>',
                          f'<td class="num">{_f(best)}</td>']
        body.append(f'<tr class="{"rec" if pick is not None and pick == rec else ""}">{"".join(cells)}</tr>')
    return (f'<h2>Runs side by side</h2><div class="table-wrap"><table><thead>{head}</thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def table(inputs: ReportInputs) -> str:
    rows = inputs.rows
    columns = [c for c in COLUMNS if any(_has(c.value(r)) for r in rows)]
    extra = []
    if inputs.measured:
        extra.append(("measured", f"measured ({escape(inputs.measured_label or 'verify')})"))
    if any(t.get("test_accuracy") is not None for t in inputs.truth.values()):
        extra.append(("truth_acc", "lab held-out acc"))
    if any(t.get("test_nll") is not None for t in inputs.truth.values()):
        extra.append(("truth_nll", "lab held-out NLL"))
    rec = inputs.ranking.recommended
    # Headers wrap at spaces only (a non-breaking hyphen keeps "held-out" whole): narrow columns, whole words.
    head = "<tr><th>checkpoint</th>" + "".join(f"<th>{_nobreak(escape(c.header))}</th>" for c in columns)
    head += "".join(f"<th>{_nobreak(h)}</th>" for _, h in extra) + "</tr>"
    body = []
    for i, row in enumerate(rows):
        mark = "★ " if i == rec else ""
        cells = [f"<td>{mark}{escape(inputs.name(i))}</td>"]
        if row.error:
            cells.append(f'<td class="error" colspan="{len(columns) + len(extra)}">{escape(row.error)}</td>')
        else:
            for column in columns:
                value, spec = column.value(row), column.spec
                if spec == "ci":
                    cells.append(f'<td class="num">{_ci(value, row.premem_ci)}</td>')
                elif spec.startswith("band:"):
                    band = f'{_f(value, ".2f")}–{_f(getattr(row, spec.split(":", 1)[1]), ".2f")}'
                    cells.append(f'<td class="num" title="{escape(BY_KEY[column.key].description)}">{escape(band)}</td>')
                elif column.key == "pathway_distance" and row.pathways is not None and not row.pathways.distance_exact:
                    estimate = f'{_f(value, spec)} ± {_f(row.pathways.distance_stderr, spec)}'
                    cells.append(f'<td class="num" title="estimated on sampled pairs">{escape(estimate)}</td>')
                elif column.key == "stage" and row.stage:
                    cls = "stage-" + row.stage.replace(" ", "-")
                    cells.append(f'<td class="stage"><span class="{escape(cls)}">{escape(row.stage)}</span></td>')
                else:
                    cells.append(f'<td class="num">{escape(_f(value, spec))}</td>')
            for key, _ in extra:
                if key == "measured":
                    m = inputs.measured.get(i) or {}
                    cells.append(f'<td class="num">{_ci(m.get("accuracy"), m.get("ci"))}</td>')
                else:
                    t = inputs.truth.get(i) or {}
                    cells.append(f'<td class="num">{_f(t.get("test_accuracy" if key == "truth_acc" else "test_nll"))}</td>')
        body.append(f'<tr class="{"rec" if i == rec else ""}">{"".join(cells)}</tr>')
    return f'<div class="table-wrap"><table><thead>{head}</thead><tbody>{"".join(body)}</tbody></table></div>'


EXAMPLE_GROUPS = (
    ("learned before memorising", "answered correctly at some checkpoint before its target was memorised: the "
                                  "credit pre-memorization accuracy keeps"),
    ("only by copying", "answered correctly now, but only once memorised: no credit (Kang et al.) -- the examples "
                        "new data helps most (`ckptsel curate`)"),
    ("solved, not memorised", "answered correctly and not memorised"),
    ("not solved", "no correct sample at this checkpoint"),
)
SHOWN_PER_GROUP = 6


def example_groups(premem, acc, memorised_so_far) -> list[str]:
    """Each example's group at one checkpoint (:data:`EXAMPLE_GROUPS`), from its PM, sampled accuracy and
    whether it has been memorised at or before that checkpoint."""
    out = []
    for pm, a, mem in zip(premem, acc, memorised_so_far):
        if not a > 0:
            out.append("not solved")
        elif not mem:
            out.append("solved, not memorised")
        else:
            out.append("learned before memorising" if pm > 0 else "only by copying")
    return out


def examples_section(inputs: ReportInputs) -> str:
    """Per example, at the recommended checkpoint of a run ranked here: which it learned before memorising and
    which it answers only by copying (nothing for a sweep or a ranking read from a file)."""
    import numpy as np

    pe, rec = inputs.ranking.per_example, inputs.ranking.recommended
    if not pe or rec is None or not inputs.example_uids or "measured_index" not in pe:
        return ""
    measured = [int(i) for i in pe["measured_index"]]
    if rec not in measured or len(inputs.example_uids) != np.shape(pe["premem"])[1]:
        return ""
    j = measured.index(rec)
    memorised = np.asarray(pe["memorized"][: j + 1], dtype=bool) & ~np.isnan(np.asarray(pe["nll"][: j + 1]))
    groups = example_groups(pe["premem"][j], pe["acc"][j], memorised.any(axis=0))
    body = []
    for name, meaning in EXAMPLE_GROUPS:
        members = sorted((n for n, g in enumerate(groups) if g == name), key=lambda n: float(pe["premem"][j][n]))
        shown = "; ".join(escape(_short(inputs.questions.get(inputs.example_uids[n], inputs.example_uids[n])))
                          for n in members[:SHOWN_PER_GROUP])
        more = f" … and {len(members) - SHOWN_PER_GROUP} more" if len(members) > SHOWN_PER_GROUP else ""
        body.append(f"<tr><td>{escape(name)}</td><td class=\"num\">{len(members)}</td><td>{escape(meaning)}</td>"
                    f"<td>{shown}{escape(more)}</td></tr>")
    head = "<tr><th>examples</th><th>count</th><th>what it means</th><th>which (lowest pre-memorization accuracy first)</th></tr>"
    return (f"<h2>Examples at {escape(inputs.name(rec))}</h2><div class=\"table-wrap\"><table><thead>{head}</thead>"
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _short(text: str, width: int = 48) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


# (key in a merge candidate row, header, format): the numbers the choice was made on.
MERGE_COLUMNS = (
    ("train_acc", "train acc", ".3f"),
    ("premem_acc", "pre-mem acc (95% CI)", "ci"),
    ("memorized_frac", "memorised", ".3f"),
    ("target_nll", "target NLL", ".3f"),
    ("alt_nll", "alt-solution NLL", ".3f"),
    ("heldout_nll", "held-out NLL", ".3f"),
    ("perturb_nll", "perturbed-prompt NLL", ".3f"),
    ("stage", "stage", "s"),
)


def merge_tables(inputs: ReportInputs) -> str:
    """Each merge comparison as a table, the chosen candidate starred, and the rule that chose it."""
    out = []
    for merge in inputs.merges:
        rows = merge["rows"]
        columns = [c for c in MERGE_COLUMNS if any(r.get(c[0]) is not None for r in rows)]
        head = "<tr><th>candidate</th>" + "".join(f"<th>{_nobreak(escape(h))}</th>" for _, h, _ in columns) + "</tr>"
        body = []
        for row in rows:
            chosen = bool(row.get("chosen"))
            cells = [f"<td>{'★ ' if chosen else ''}{escape(row['candidate'])}</td>"]
            for key, _, spec in columns:
                text = _ci(row.get(key), row.get("premem_ci")) if spec == "ci" else escape(_f(row.get(key), spec))
                cells.append(f'<td class="num">{text}</td>')
            body.append(f'<tr class="{"rec" if chosen else ""}">{"".join(cells)}</tr>')
        rule = f'<p class="note"><b>Rule:</b> {escape(merge["rule"])}.</p>' if merge.get("rule") else ""
        out.append(f"<h3>Merge comparison: {escape(merge['name'])}</h3>"
                   f'<div class="table-wrap"><table><thead>{head}</thead><tbody>{"".join(body)}</tbody></table></div>'
                   f"{rule}")
    return f"<h2>Merges</h2>{''.join(out)}" if out else ""


def rules(inputs: ReportInputs) -> str:
    ranking = inputs.ranking
    t = ranking.threshold
    if t.rule == "copy":
        memo = "an example is memorised when at least half of its samples copy the training solution"
    else:
        what = "every target token's NLL" if t.rule == "peak-nll" else "its target NLL"
        memo = f"an example is memorised when {what} is below ν = {_f(t.used)} nats/token"
        if t.auto is not None:
            memo += f" (calibrated from copy rates: {_f(t.auto)}, AUC {_f(t.auto_auc, '.2f')})"
    items = [("Pre-memorization accuracy", "PM_i(J) = min(max_{j≤J} acc_ij · m_ij, acc_iJ), averaged over training "
              "examples (Kang et al. 2024), read as predicted test accuracy; interval: bootstrap over examples."),
             ("Memorised", memo + ".")]
    if ranking.stage_rule:
        items.append(("Stages", ranking.stage_rule + "."))
    if ranking.pathway_rule:
        items.append(("MoE pathways", ranking.pathway_rule + "."))
    items.append(("Recommendation", ranking.rule + "."))
    items += [("Input", p) for p in inputs.provenance]
    items.append(("Written", f"ckptsel {__version__}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"))
    return "<dl>" + "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in items) + "</dl>"


def page(inputs: ReportInputs, charts: list[Chart]) -> str:
    """The whole HTML document."""
    rows = inputs.rows
    n_runs = len(inputs.ranking.runs)
    runs = f" in {n_runs} runs" if n_runs > 1 else ""
    sub = f"{len(rows)} checkpoint(s){runs} · {inputs.ranking.n_examples} training examples"
    if inputs.ranking.n_heldout:
        sub += f" · {inputs.ranking.n_heldout} held-out examples"
    figures = "".join(figure(c) for c in charts)
    stages = list(dict.fromkeys(b[2] for c in charts for b in c.bands))
    stage_legend = ""
    if stages:
        items = "".join(f'<span class="stage-{escape(s.replace(" ", "-"))}"><i class="swatch band"></i>{escape(s)}</span>'
                        for s in stages)
        stage_legend = f'<div class="legend">Background: the stage of each checkpoint {items}</div>'

    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{escape(inputs.title)}</title><style>{_css()}</style></head><body><main>"
        f"<h1>{escape(inputs.title)}</h1><p class=\"sub\">{escape(sub)}</p>"
        f"{headline(inputs)}{runs_table(inputs)}"
        f'<h2>Over training</h2>{stage_legend}<div class="grid">{figures}</div>'
        f"<h2>Every number</h2>{table(inputs)}"
        f"{examples_section(inputs)}"
        f"{merge_tables(inputs)}"
        f"<h2>How these were computed</h2>{rules(inputs)}"
        "</main></body></html>\n"
    )
