"""From stored measurements to a ranking: per-checkpoint metrics, warnings, a recommendation.

Reads the ``(checkpoints, examples)`` matrices from the store, applies the formulas in
:mod:`ckptsel.metrics`, and returns plain data (:class:`Ranking`) that the CLI prints and
serialises. Nothing here loads a model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from ckptsel import metrics
from ckptsel.collect import Collected
from ckptsel.settings import MemorizationSettings
from ckptsel.store import Store

# A checkpoint is "close to the best" when its PM is inside the best one's interval.
RULE = (
    "highest pre-memorization accuracy (predicted test accuracy); among checkpoints whose value lies "
    "inside the best one's {level:.0%} interval, the one with the lowest memorised fraction"
)


@dataclass
class Threshold:
    """The memorisation rule that was used, and the alternatives beside it."""

    rule: str  # "nll" or "copy"
    used: float | None  # nu in nats/token for the nll rule; None for the copy rule
    recipe_default: float | None
    auto: float | None = None  # calibrated from copy rates, when it could be fitted
    auto_auc: float | None = None
    auto_note: str | None = None  # why auto could not be fitted


@dataclass
class CheckpointMetrics:
    index: int
    path: str
    step: int | None
    epoch: float | None
    train_loss: float | None
    fingerprint: str | None
    train_acc: float = math.nan
    premem_acc: float = math.nan
    premem_ci: tuple[float, float] = (math.nan, math.nan)
    memorized_frac: float = math.nan
    copy_rate: float = math.nan
    target_nll: float = math.nan
    entropy: float = math.nan
    error: str | None = None


@dataclass
class Ranking:
    checkpoints: list[CheckpointMetrics]
    threshold: Threshold
    n_examples: int
    recommended: int | None  # index into checkpoints
    rule: str
    warnings: list[str] = field(default_factory=list)
    # Per-example arrays, for --export-examples: (checkpoints, examples), measured rows only.
    per_example: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict:
        rows = []
        for c in self.checkpoints:
            row = asdict(c)
            row["premem_ci"] = list(c.premem_ci)
            rows.append({k: _clean(v) for k, v in row.items()})
        rec = self.checkpoints[self.recommended] if self.recommended is not None else None
        return {
            "checkpoints": rows,
            "recommended": None if rec is None else {"index": rec.index, "path": rec.path, "step": rec.step},
            "rule": self.rule,
            "threshold": {k: _clean(v) for k, v in asdict(self.threshold).items()},
            "n_examples": self.n_examples,
            "warnings": self.warnings,
        }


def _clean(value):
    """NaN -> None for JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def measured_matrices(collected: Collected, store: Store) -> dict[str, np.ndarray]:
    """nll, entropy, acc and copy as (measured checkpoints, examples) arrays, in training order."""
    fps = [fp for i, fp in enumerate(collected.fingerprints) if fp is not None and i not in collected.failures]
    uids = [ex.uid for ex in collected.examples]
    key = collected.settings_key
    return {
        "nll": store.matrix(fps, key, "score", uids, "nll"),
        "entropy": store.matrix(fps, key, "score", uids, "entropy"),
        "acc": store.matrix(fps, key, "sample", uids, "acc"),
        "copy": store.matrix(fps, key, "sample", uids, "copy_rate"),
    }


def memorized_mask(m: dict[str, np.ndarray], memorization: MemorizationSettings) -> tuple[np.ndarray, Threshold]:
    """The memorised mask under the chosen rule, and the threshold report (fixed and auto side by side)."""
    default = memorization.threshold if memorization.threshold != "auto" else None
    report = Threshold(rule=memorization.rule, used=None, recipe_default=default)
    try:
        cal = metrics.calibrate_threshold(m["nll"], m["copy"], memorization.copy_fraction)
        report.auto, report.auto_auc = cal.threshold, cal.auc
    except metrics.CalibrationError as err:
        report.auto_note = str(err)
    if memorization.rule == "copy":
        mask = metrics.memorized_by_copy(m["copy"], memorization.copy_fraction)
        return mask | np.isnan(m["copy"]), report
    if memorization.threshold == "auto":
        if report.auto is None:
            raise metrics.CalibrationError(report.auto_note or "--threshold auto could not be fitted")
        report.used = report.auto
    else:
        report.used = float(memorization.threshold)
    mask = metrics.memorized(m["nll"], report.used)
    return mask | np.isnan(m["nll"]), report


def rank(collected: Collected, store: Store, memorization: MemorizationSettings, *, level: float = 0.95,
         n_boot: int = 1000) -> Ranking:
    """Per-checkpoint metrics, the pre-memorization accuracy with its interval, and a recommendation."""
    measured = [i for i, fp in enumerate(collected.fingerprints) if fp is not None and i not in collected.failures]
    m = measured_matrices(collected, store)
    rows = [
        CheckpointMetrics(
            index=i,
            path=str(c.path),
            step=c.step,
            epoch=c.epoch,
            train_loss=c.train_loss,
            fingerprint=collected.fingerprints[i],
            error=collected.failures.get(i),
        )
        for i, c in enumerate(collected.checkpoints)
    ]
    default = memorization.threshold if memorization.threshold != "auto" else None
    ranking = Ranking(rows, Threshold(memorization.rule, None, default), len(collected.examples), None,
                      RULE.format(level=level))
    if not measured:
        ranking.warnings.append("no checkpoint could be measured")
        return ranking

    mask, ranking.threshold = memorized_mask(m, memorization)
    per_example = metrics.premem_accuracy_per_example_from_mask(m["acc"], mask)
    pm = metrics.per_checkpoint_mean(per_example)
    lo, hi = metrics.bootstrap_ci(per_example, n_boot=n_boot, level=level)
    measured_mask = ~np.isnan(m["nll"] if memorization.rule == "nll" else m["copy"])
    memorized_frac = metrics.memorized_fraction(mask & measured_mask, measured_mask)
    columns = {
        "train_acc": metrics.train_accuracy(m["acc"]),
        "premem_acc": pm,
        "memorized_frac": memorized_frac,
        "copy_rate": metrics.copy_rate(m["copy"]),
        "target_nll": metrics.per_checkpoint_mean(m["nll"]),
        "entropy": metrics.per_checkpoint_mean(m["entropy"]),
    }
    for r, i in enumerate(measured):
        for name, values in columns.items():
            setattr(rows[i], name, float(values[r]))
        rows[i].premem_ci = (float(lo[r]), float(hi[r]))

    support = metrics.premem_support(m["acc"], mask)
    if (warning := support.warning()) is not None:
        ranking.warnings.append(warning)
    if len(measured) < 3:
        ranking.warnings.append(
            f"only {len(measured)} checkpoint(s) measured; pre-memorization accuracy needs the history "
            "before memorisation — save more frequent checkpoints"
        )
    ranking.recommended = _recommend(rows, measured)
    ranking.per_example = {"premem": per_example, "memorized": mask, "measured_index": np.array(measured), **m}
    return ranking


def _recommend(rows: list[CheckpointMetrics], measured: list[int]) -> int | None:
    """The rule in :data:`RULE`: best PM; ties within its interval go to the least memorised."""
    pm = np.array([rows[i].premem_acc for i in measured])
    best = metrics.best_index(pm, "premem_acc")
    if best is None:
        return None
    floor = rows[measured[best]].premem_ci[0]
    close = [i for i in measured if rows[i].premem_acc >= floor] if not math.isnan(floor) else [measured[best]]
    fractions = np.array([rows[i].memorized_frac for i in close])
    pick = metrics.best_index(fractions, "memorized_frac")
    return close[pick] if pick is not None else measured[best]
