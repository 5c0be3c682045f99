"""The report: one self-contained HTML page (and optionally PNGs) from a ranking and what sits beside it.

INTERFACE:

    write_report(ranking, out_path, *, verification=None, ground_truth=None, merges=(), store=None,
                 title=None, png_dir=None, provenance=(), ground_truth_by_run=None) -> Path
    render_report(...same inputs...) -> str          the HTML, written nowhere
    read_ranking(path) -> Ranking                    ``ckptsel rank --json`` output, read back

``ranking`` is a :class:`ckptsel.select.Ranking`. Measured accuracy comes from ``verification``
(``ckptsel verify --json`` output, a dict) or else from the verify summaries in ``store``.

Modules: :mod:`.inputs` (gather and match), :mod:`.charts` (which plots), :mod:`.svg`,
:mod:`.html`, :mod:`.png` (drawing).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ckptsel.report import charts as _charts
from ckptsel.report import html as _html
from ckptsel.report.inputs import (
    ReportInputs,
    measured_from_summaries,
    measured_from_verification,
    merge_comparison,
    read_ranking,
    stored_merge_comparison,
    truth_from_ground_truth,
)

if TYPE_CHECKING:
    from ckptsel.select import Ranking

__all__ = ["ReportInputs", "build_inputs", "read_ranking", "render_report", "write_report"]


def build_inputs(
    ranking: Ranking,
    *,
    verification: Mapping | None = None,
    ground_truth: Mapping | None = None,
    merges: Iterable[Path | Mapping] = (),
    store=None,
    title: str | None = None,
    provenance: Sequence[str] = (),
    ground_truth_by_run: Mapping[str, Mapping] | None = None,
    examples: Sequence | None = None,
) -> ReportInputs:
    """Gather the report's inputs and match them to the ranking's checkpoints (``ground_truth_by_run``:
    a sweep's, run name -> that run's ground truth; ``examples``: the measured training examples of a run
    ranked here, in the ranking's per-example order, for the page's per-example view)."""
    rows = ranking.checkpoints
    inputs = ReportInputs(ranking=ranking, title=title or "ckptsel report", provenance=list(provenance))
    if examples is not None:
        inputs.example_uids = [ex.uid for ex in examples]
        inputs.questions = {ex.uid: ex.question for ex in examples}
    if ranking.is_sweep:  # checkpoint names repeat across runs
        inputs.labels = {i: f"{row.run}/{Path(row.path).name}" for i, row in enumerate(rows)}
    if verification is not None:
        # ckptsel verify --json: {"verifications": [...]} or one verification object
        for v in verification.get("verifications", [verification]):
            found = measured_from_verification(rows, v)
            if found:
                inputs.measured, inputs.measured_source = found, v.get("source")
                break
    elif store is not None:
        from ckptsel.verify import stored_summaries

        summaries = {i: stored_summaries(store, r.fingerprint) for i, r in enumerate(rows) if r.fingerprint}
        inputs.measured, inputs.measured_source = measured_from_summaries(summaries)
    if ground_truth is not None:
        inputs.truth = truth_from_ground_truth(rows, ground_truth)
    for run, truth in (ground_truth_by_run or {}).items():
        inputs.truth.update(truth_from_ground_truth(rows, truth, run))
    inputs.merges = [m if isinstance(m, Mapping) else merge_comparison(Path(m)) for m in merges]
    if store is not None and not inputs.merges:  # what `ckptsel merge --recommend` compared, if it ran
        inputs.merges = [m for m in [stored_merge_comparison(store, ranking)] if m is not None]
    return inputs


def render_report(ranking: Ranking, **kwargs) -> str:
    """The report's HTML for ``ranking`` (see :func:`build_inputs` for the other inputs)."""
    inputs = build_inputs(ranking, **kwargs)
    return _html.page(inputs, _charts.build_charts(inputs))


def write_report(ranking: Ranking, out_path: str | os.PathLike, *, png_dir: str | os.PathLike | None = None,
                 **kwargs) -> Path:
    """Write the HTML report to ``out_path`` (atomically: temp file, then rename); PNGs too with ``png_dir``."""
    from ckptsel.outputs import write_errors, write_text_atomic

    inputs = build_inputs(ranking, **kwargs)
    charts = _charts.build_charts(inputs)
    out = write_text_atomic(out_path, _html.page(inputs, charts))  # a full disk: one line, no partial file
    if png_dir is not None:
        from ckptsel.report.png import write_pngs

        with write_errors(png_dir):
            write_pngs(charts, Path(png_dir))
    return out
