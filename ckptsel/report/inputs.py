"""What a report is made of, gathered into one plain object: the ranking and what sits beside it.

* the ranking: a :class:`ckptsel.select.Ranking` (``ckptsel rank --json`` output is read into
  one by :func:`read_ranking`);
* measured test accuracy from ``ckptsel verify`` (its ``--json`` output, or the summaries
  verify keeps in the result store);
* the lab's ground truth (``RUN/ground_truth.json``): true held-out accuracy and NLL;
* merge comparisons: a merged checkpoint's ``ckptsel_merge.json`` sidecar, or a comparison
  table (a list of candidates with their metrics).

Everything is matched to the ranking's rows: verify results by content fingerprint (then
path), ground truth by training step. Nothing here measures anything.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ckptsel import store_keys
from ckptsel.errors import CkptselError

if TYPE_CHECKING:
    from ckptsel.select import CheckpointMetrics, Ranking


@dataclass
class ReportInputs:
    ranking: Ranking
    title: str = "ckptsel report"
    # ranking row index -> {"accuracy", "ci", "source", "mode"}: ckptsel verify's measurement
    measured: dict[int, dict] = field(default_factory=dict)
    measured_source: str | None = None
    # ranking row index -> {"test_accuracy", "test_nll", ...}: the lab's ground truth
    truth: dict[int, dict] = field(default_factory=dict)
    merges: list[dict] = field(default_factory=list)  # {"name", "rows": [{"candidate", metrics...}], "rule"}
    provenance: list[str] = field(default_factory=list)  # where each input came from
    labels: dict[int, str] = field(default_factory=dict)  # ranking row index -> "run/checkpoint" (a sweep's)
    questions: dict[str, str] = field(default_factory=dict)  # example uid -> its question (a run ranked here)
    example_uids: list[str] = field(default_factory=list)  # the measured examples, in the per-example arrays' order

    @property
    def rows(self) -> list[CheckpointMetrics]:
        return self.ranking.checkpoints

    def name(self, index: int) -> str:
        """Row ``index`` as the page names it: its folder's name, or run/folder in a sweep."""
        path = self.rows[index].path
        return self.labels.get(index) or path.rstrip("/").rsplit("/", 1)[-1] or path

    @property
    def measured_label(self) -> str | None:
        """The verified test set as a label: a file's name (its full path is in the headline), or the task's name."""
        return None if self.measured_source is None else Path(self.measured_source).name


def number(value) -> float | None:
    """A number to show or plot, or None where there is none (not measured: None in JSON, NaN in a ranking)."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def interval(pair) -> tuple[float | None, float | None]:
    """An interval's two ends as :func:`number` gives them; no interval at all is two Nones."""
    lo, hi = pair or (None, None)
    return number(lo), number(hi)


def read_ranking(path: Path) -> Ranking:
    """``ckptsel rank --json`` output as a :class:`~ckptsel.select.Ranking`; a bad file is one line naming
    the file (and the field: ``rank.json: checkpoints[2].premem_acc: expected a number, got 'x'``)."""
    from ckptsel.select import Ranking

    data = read_json(Path(path), "ranking")
    try:
        return Ranking.from_json(data)
    except CkptselError as err:
        raise CkptselError(f"{path}: {err}") from None


def read_json(path: Path, what: str):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CkptselError(f"{path}: {what} file not found") from None
    except json.JSONDecodeError as exc:
        raise CkptselError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from None


def _row_index(rows: Sequence[CheckpointMetrics], fingerprint: str | None, path: str | None) -> int | None:
    for i, row in enumerate(rows):
        if fingerprint and row.fingerprint == fingerprint:
            return i
    if path:
        target = Path(path).resolve()
        for i, row in enumerate(rows):
            if row.path and Path(row.path).resolve() == target:
                return i
    return None


def measured_from_verification(rows: Sequence[CheckpointMetrics], verification: Mapping) -> dict[int, dict]:
    """Measured accuracy per ranking row from one ``ckptsel verify --json`` result."""
    out = {}
    for c in verification.get("checkpoints", []):
        i = _row_index(rows, c.get("fingerprint"), c.get("path"))
        if i is not None and c.get("accuracy") is not None:
            out[i] = {"accuracy": c["accuracy"], "ci": c.get("ci"), "source": verification.get("source"),
                      "mode": verification.get("mode")}
    return out


def measured_from_summaries(summaries: Mapping[int, list[dict]]) -> tuple[dict[int, dict], str | None]:
    """Measured accuracy per row from the store's verify summaries (row index -> newest first).

    Several test sets may have been verified; the report shows one: the one verified most
    recently, for every row that has it.
    """
    newest = max((s for entries in summaries.values() for s in entries), key=lambda s: s.get("time", 0), default=None)
    if newest is None:
        return {}, None
    source, mode = newest.get("source"), newest.get("mode")
    out = {}
    for i, entries in summaries.items():
        match = next((s for s in entries if s.get("source") == source and s.get("mode") == mode), None)
        if match is not None and match.get("accuracy") is not None:
            out[i] = {"accuracy": match["accuracy"], "ci": match.get("ci"), "source": source, "mode": mode}
    return out, source


def truth_from_ground_truth(rows: Sequence[CheckpointMetrics], ground_truth: Mapping,
                            run: str | None = None) -> dict[int, dict]:
    """The lab's held-out numbers per ranking row, matched by training step (within ``run`` when given:
    a sweep has one ground truth per run)."""
    by_step = {point.get("step"): point for point in ground_truth.get("checkpoints", {}).values()}
    out = {}
    for i, row in enumerate(rows):
        if run is not None and row.run != run:
            continue
        point = by_step.get(row.step)
        if point is not None:
            out[i] = {k: v for k, v in point.items() if k != "per_example"}
    return out


def merge_comparison(path: Path) -> dict:
    """A merge comparison to plot: from a sidecar (file or folder) or a comparison JSON.

    Accepted shapes: ``ckptsel_merge.json`` (its ``justification`` holds the candidates
    table when the merge was chosen by ``--recommend``), or any JSON object holding a list
    of candidate rows under ``candidates``/``comparison``, or such a list itself. A row
    names its candidate (``candidate``, ``name`` or ``label``) and carries numbers
    (``premem_acc``, ``premem_ci``, ``alt_nll``, ...).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "ckptsel_merge.json"
    data = read_json(path, "merge comparison")
    name = path.parent.name if path.name == "ckptsel_merge.json" else path.stem
    rows = _candidate_rows(data)
    if rows is None and isinstance(data, Mapping):
        rows = _candidate_rows(data.get("justification") or {})
    if rows is None and isinstance(data, Mapping) and data.get("inputs"):
        # An explicit merge: one row for the merge itself, described by its inputs.
        steps = ", ".join(str(i.get("step")) for i in data["inputs"])
        rows = [{"candidate": f"{data.get('method', 'merge')} of steps {steps}", **(data.get("justification") or {})}]
    if not rows:
        raise CkptselError(f"{path}: no merge candidates found (expected a 'candidates' list or a ckptsel_merge.json)")
    rule = (data.get("justification") or data).get("rule") if isinstance(data, Mapping) else None
    return {"name": name, "rows": rows, "rule": rule}


def stored_merge_comparison(store, ranking: Ranking) -> dict | None:
    """The comparison ``ckptsel merge --recommend`` stored for the ranking's recommended checkpoint, if any."""
    index = ranking.recommended
    fingerprint = ranking.checkpoints[index].fingerprint if index is not None else None
    stored = store.get_value(store_keys.merge_recommendation(fingerprint)) if fingerprint else None
    if not stored or not _candidate_rows(stored):
        return None
    return {"name": Path(stored.get("output") or "merge --recommend").name, "rows": _candidate_rows(stored),
            "rule": stored.get("rule")}


def _candidate_rows(data) -> list[dict] | None:
    if isinstance(data, list) and data and all(isinstance(r, Mapping) for r in data):
        return [_labelled(r) for r in data]
    if isinstance(data, Mapping):
        for key in ("candidates", "comparison"):
            if isinstance(data.get(key), list):
                return [_labelled(r) for r in data[key] if isinstance(r, Mapping)]
    return None


def _labelled(row: Mapping) -> dict:
    label = row.get("candidate") or row.get("name") or row.get("label") or "candidate"
    return {**row, "candidate": str(label)}
