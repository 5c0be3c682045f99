"""Stages, the over-memorized flag and the recommendation, as pure functions over arrays.

Ruan et al. (2025, arXiv 2508.04117) describe three stages of fine-tuning: (a) low accuracy;
(b) high accuracy, low perplexity on held-out reference solutions -- the good region;
(c) high accuracy, high perplexity -- over-memorized. ckptsel reads them off the training
data (ckptsel/DESIGN.md, "Stages and the over-memorized flag"), one value per checkpoint in training
order, with the thresholds of :class:`ckptsel.settings.OvermemSettings`:

* **underfit** -- stage (a): predicted test accuracy (pre-memorization accuracy) <
  ``underfit_fraction`` x the run's best, or 0 (a run that never answers correctly is
  underfit throughout);
* **over-memorized** -- stage (c), when all three hold:
  train accuracy >= the run's best - ``acc_margin`` (accuracy stays high),
  memorised fraction >= ``memorized_min`` (0.99: nearly every target is reproduced
  near-certainly, so pre-memorization accuracy -- predicted test accuracy -- can no longer rise;
  before that the run may still be learning what generalises),
  proxy >= (1 + ``proxy_rise``) x its *baseline*: the proxy's minimum over the checkpoints up
  to this one that are past stage (a) (the perplexity proxy has risen clearly above its level
  in the good region);
* **generalizing** -- stage (b): the others.

The proxy is a per-checkpoint NLL (held-out, alternative-solution or perturbed-prompt), all
lower-is-better and positive, so "risen" is a ratio. Why the baseline skips stage (a): there
the model is still learning the task, and a test-free proxy can be low for reasons that have
nothing to do with over-memorization (on the lab, early samples reach the right answer
through wrong steps; as the model learns the steps it rightly pays more for them, and an
alternative-solution NLL measured against such samples rises from the first checkpoints on).

Recommendation (Ruan et al.: choose by accuracy *and* perplexity -- accuracy first). Over-memorized
checkpoints keep comparable test accuracy; what they lose is perplexity, robustness and
diversity. So, by default (``prefer="accuracy"``): the checkpoints as accurate as the one with
the highest pre-memorization accuracy (predicted test accuracy, Kang et al. 2024) within the
noise of a paired comparison (``recommend_se`` standard errors of the per-example gap: the
one-standard-error rule); among those the unflagged ones if there are any -- a flagged
checkpoint is passed over only for one that is as accurate -- and among them the lowest proxy,
where values within ``proxy_tie`` of the lowest count as equal (then predicted accuracy decides).
When every one of them is flagged, the recommendation is flagged too, and the ranking says so
with the numbers and the best clean alternative. ``prefer="robustness"`` (for users who ship for
robustness and diversity) takes the same rule among unflagged checkpoints only. A paired gap,
not each checkpoint's own interval: both sides are measured on the same examples, and a 95%
interval of one checkpoint's mean on 100 examples is ±0.06 wide, which would trade away
accuracy the comparison can in fact resolve.

Missing values are NaN: a checkpoint with a NaN input is never flagged on it, and is
skipped by the recommendation when its predicted accuracy is NaN.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ckptsel import metrics
from ckptsel.settings import OvermemSettings

UNDERFIT, GENERALIZING, OVERMEMORIZED = "underfit", "generalizing", "over-memorized"

STAGE_RULE = (
    "over-memorized: train acc ≥ run best − {acc_margin:g}, memorised fraction ≥ {memorized_min:g}, "
    "and {proxy} ≥ {rise:g}× its minimum over the earlier checkpoints that are not underfit; "
    "underfit: pre-memorization acc < {underfit_fraction:g}× run best, or 0"
)
RECOMMEND_RULE = (
    "accuracy first: the checkpoints within {se:g} SE of the highest pre-memorization accuracy (predicted test "
    "accuracy; SE of the paired per-example gap), those not underfit among them if any, the unflagged ones among "
    "those if any, and of those the "
    "lowest {proxy} (within {tie:.0%} of it: the highest predicted accuracy)"
)
RECOMMEND_RULE_ROBUST = (
    "robustness first: the highest pre-memorization accuracy (predicted test accuracy) among checkpoints not "
    "flagged over-memorized; among those within {se:g} SE of it (SE of the paired per-example gap), the lowest "
    "{proxy} (within {tie:.0%} of it: the highest predicted accuracy)"
)
PREFERENCES = ("accuracy", "robustness")


def recommend_rule(prefer: str = "accuracy") -> str:
    """The recommendation rule's text for ``prefer`` (format it with se, proxy and tie)."""
    return RECOMMEND_RULE_ROBUST if prefer == "robustness" else RECOMMEND_RULE


@dataclass(frozen=True)
class Flag:
    """The numbers that made a checkpoint over-memorized, and the thresholds they crossed."""

    train_acc: float
    best_train_acc: float
    acc_margin: float
    memorized_frac: float
    memorized_min: float
    proxy: str
    proxy_value: float
    proxy_baseline: float
    proxy_ratio: float
    proxy_rise: float

    def reason(self) -> str:
        """One line a user can check by hand."""
        return (
            f"train acc {self.train_acc:.3f} ≥ {self.best_train_acc:.3f} − {self.acc_margin:g}; "
            f"memorised {self.memorized_frac:.2f} ≥ {self.memorized_min:g}; "
            f"{self.proxy} {self.proxy_value:.3f} = {self.proxy_ratio:.2f}× its minimum "
            f"{self.proxy_baseline:.3f} since underfitting (≥ {1 + self.proxy_rise:g}×)"
        )

    def to_json(self) -> dict:
        return {**asdict(self), "reason": self.reason()}


def running_min(values: np.ndarray) -> np.ndarray:
    """min_{j' <= j} values[j'], skipping NaN; NaN until the first measured value."""
    values = np.asarray(values, dtype=float)
    filled = np.where(np.isnan(values), np.inf, values)
    out = np.minimum.accumulate(filled) if values.size else filled
    return np.where(np.isinf(out), np.nan, out)


def underfit(predicted_acc: np.ndarray, settings: OvermemSettings = OvermemSettings()) -> np.ndarray:
    """Stage (a): predicted test accuracy below ``underfit_fraction`` of the run's best, or 0.

    Stage (a) is about *test* accuracy; train accuracy would keep a run that memorises in
    stage (a) long after its test accuracy has levelled off. NaN: not underfit.
    """
    acc = np.asarray(predicted_acc, dtype=float)
    if acc.size == 0 or np.isnan(acc).all():
        return np.zeros(acc.shape, dtype=bool)
    return (acc < settings.underfit_fraction * np.nanmax(acc)) | (acc == 0)


def proxy_ratio(proxy: np.ndarray, excluded: np.ndarray | None = None) -> np.ndarray:
    """proxy_j / min over j' <= j not ``excluded`` of proxy_j': how far the proxy has risen (1 = at its minimum).

    NaN before the first checkpoint that may set the minimum.
    """
    proxy = np.asarray(proxy, dtype=float)
    low = running_min(proxy if excluded is None else np.where(np.asarray(excluded, dtype=bool), np.nan, proxy))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(low > 0, proxy / low, np.nan)


def overmemorized(
    train_acc: np.ndarray, memorized_frac: np.ndarray, ratio: np.ndarray, settings: OvermemSettings = OvermemSettings()
) -> np.ndarray:
    """The over-memorized flag per checkpoint (Ruan et al.'s stage (c)); ``ratio`` from :func:`proxy_ratio`."""
    acc = np.asarray(train_acc, dtype=float)
    mem = np.asarray(memorized_frac, dtype=float)
    ratio = np.asarray(ratio, dtype=float)
    _check_shapes(acc, mem, ratio)
    if acc.size == 0 or np.isnan(acc).all():
        return np.zeros(acc.shape, dtype=bool)
    near_best = acc >= np.nanmax(acc) - settings.acc_margin  # stage (c): accuracy still high
    memorised = mem >= settings.memorized_min  # the targets are reproduced near-certainly
    risen = ratio >= 1.0 + settings.proxy_rise  # held-out-like perplexity clearly up
    return near_best & memorised & risen  # NaN compares False: never flagged on a missing value


@dataclass(frozen=True)
class Assessment:
    """Per checkpoint: the stage, the flag with its numbers (or None), and the proxy's rise."""

    stages: list[str]
    flags: list[Flag | None]
    ratio: np.ndarray


def assess(
    train_acc: np.ndarray,
    predicted_acc: np.ndarray,
    memorized_frac: np.ndarray,
    proxy: np.ndarray,
    proxy_name: str,
    settings: OvermemSettings = OvermemSettings(),
) -> Assessment:
    """Stages and flags of a run (the rule in the module docstring); ``predicted_acc`` decides stage (a)."""
    acc = np.asarray(train_acc, dtype=float)
    mem = np.asarray(memorized_frac, dtype=float)
    proxy = np.asarray(proxy, dtype=float)
    low = underfit(predicted_acc, settings)
    _check_shapes(acc, low, mem, proxy)
    ratio = proxy_ratio(proxy, low)
    flagged = overmemorized(acc, mem, ratio, settings)
    best = float(np.nanmax(acc)) if flagged.any() else math.nan
    flags = [
        Flag(float(acc[j]), best, settings.acc_margin, float(mem[j]), settings.memorized_min, proxy_name,
             float(proxy[j]), float(proxy[j] / ratio[j]), float(ratio[j]), settings.proxy_rise)
        if flagged[j] else None
        for j in range(acc.size)
    ]
    names = [OVERMEMORIZED if f else UNDERFIT if u else GENERALIZING for f, u in zip(flagged, low)]
    return Assessment(names, flags, ratio)


def recommend(
    premem: np.ndarray, proxy: np.ndarray, flagged: np.ndarray, tie: float = 0.0, se: float = 1.0,
    prefer: str = "accuracy", underfit: np.ndarray | None = None,
) -> int | None:
    """Index of the recommended checkpoint (the rule in the module docstring); None if nothing is measured.

    ``premem``: per-example pre-memorization accuracy, shape ``(C, N)`` (NaN: not measured).
    "As accurate as the best" is the one-standard-error rule (Breiman et al. 1984): a
    checkpoint whose paired gap to the best one's predicted accuracy is within ``se``
    standard errors of that gap (:func:`ckptsel.metrics.paired_gap`: the same examples on
    both sides). ``prefer="accuracy"``: the best is the best of all measured checkpoints, and
    flagged ones among the close ones are passed over when an unflagged one is close too;
    ``prefer="robustness"``: flagged checkpoints are left out first (when every measured
    checkpoint is flagged the rule falls back to all of them; the caller warns). Among the
    close ones, the lowest proxy; values within ``tie`` (relative) of the lowest count as
    equal, and among them the highest predicted accuracy wins: a few percent of mean NLL is
    within the noise of a proxy measured on tens of examples. Among equal values the
    earliest checkpoint wins; when no candidate has a proxy value, the best predicted
    accuracy among the candidates is kept. ``underfit`` (stage (a), :func:`underfit`): such a
    checkpoint is never chosen over a close one that is not -- on a handful of examples one
    standard error spans most of the run, and an underfit checkpoint's proxy is low because it has
    learned little, not because it generalises.
    """
    if prefer not in PREFERENCES:
        raise ValueError(f"prefer must be one of {PREFERENCES}, not {prefer!r}")
    values = np.asarray(premem, dtype=float)
    pm = metrics.per_checkpoint_mean(values)
    proxy = np.asarray(proxy, dtype=float)
    flagged = np.asarray(flagged, dtype=bool)
    _check_shapes(pm, proxy, flagged)
    measured = ~np.isnan(pm)
    if not measured.any():
        return None
    pool = measured & ~flagged if prefer == "robustness" else measured
    if not pool.any():
        pool = measured
    best = int(np.argmax(np.where(pool, pm, -np.inf)))  # Kang et al.: highest predicted test accuracy
    gap, gap_se = metrics.paired_gap(values, best)
    close = pool & (gap >= -se * gap_se)  # as accurate as the best, within its noise
    if underfit is not None and (close & ~np.asarray(underfit, dtype=bool)).any():
        close &= ~np.asarray(underfit, dtype=bool)  # stage (a) only when nothing close is past it
    if (close & ~flagged).any():
        close &= ~flagged  # a flagged checkpoint is passed over only for an unflagged one as accurate
    if not (close & ~np.isnan(proxy)).any():
        return int(np.argmax(np.where(close, pm, -np.inf)))
    close &= ~np.isnan(proxy)
    lowest = np.min(proxy[close])  # Ruan et al.: then the lower held-out-like perplexity
    tied = close & (proxy <= lowest * (1.0 + tie))
    return int(np.argmax(np.where(tied, pm, -np.inf)))


def _check_shapes(*arrays) -> None:
    shapes = {np.shape(a) for a in arrays}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"expected 1-d arrays of one length per checkpoint; got shapes {sorted(shapes)}")
