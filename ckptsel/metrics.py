"""Metric formulas as small pure functions over arrays.

Every function takes numpy arrays and returns numpy arrays (or small dataclasses of
numbers); nothing here reads files, loads models or logs. Matrices are laid out
``(checkpoints, examples)``: row ``j`` is checkpoint ``j`` in training order, column ``i``
is training example ``i``. The definitions are those of ``ckptsel/DESIGN.md``; the paper's step
is named in a comment beside each formula.

Missing measurements (NaN policy, the same everywhere in this module): a NaN in ``acc``,
``nll`` or ``copy_rate`` means "not measured" (an example left out of a ``--max-examples``
subset, a checkpoint that failed). NaN entries are excluded from every mean, so a
per-checkpoint value is the mean over the examples measured at that checkpoint, and NaN
when none were. An entry whose memorisation status is unknown is never taken as evidence
that the example was answered *before* it was memorised (see :func:`premem_accuracy`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ckptsel.errors import CkptselError


class CalibrationError(CkptselError):
    """``--threshold auto`` cannot be fitted from these measurements."""


# ---------------------------------------------------------------------------
# Memorisation indicators
# ---------------------------------------------------------------------------


def memorized(nll: np.ndarray, threshold: float) -> np.ndarray:
    """Memorised by the NLL rule: ``nll < threshold`` (nats per target token).

    Kang et al. (2024, arXiv 2411.07681), memorisation rule: an example is memorised when
    log(log(ppl)) < tau, i.e. nll < nu = e^tau. NaN (not measured) gives False; pair it with ``~np.isnan(nll)``
    wherever "unknown" and "not memorised" must differ.
    """
    return np.asarray(nll, dtype=float) < threshold


def memorized_by_copy(copy_rate: np.ndarray, fraction: float = 0.5) -> np.ndarray:
    """Memorised by the copy rule: at least ``fraction`` of the samples reproduce the target.

    The direct definition in ckptsel/DESIGN.md (copy_ij >= 1/2). NaN gives False.
    """
    return np.asarray(copy_rate, dtype=float) >= fraction


def first_memorized(mask: np.ndarray) -> np.ndarray:
    """Per example (column of a ``(C, N)`` memorised mask, either rule), the first checkpoint index at
    which it is memorised; -1 when never. ``--export-examples`` reports it as a step."""
    mask = np.asarray(mask, dtype=bool)
    return np.where(mask.any(axis=0), mask.argmax(axis=0), -1)


# ---------------------------------------------------------------------------
# Pre-memorization accuracy (Kang et al. 2024)
# ---------------------------------------------------------------------------


def premem_accuracy_per_example_from_mask(acc: np.ndarray, memorized_mask: np.ndarray) -> np.ndarray:
    """The ``(C, N)`` matrix PM_i(J), with memorisation given as a boolean mask.

    Kang et al. (2024), pre-memorization accuracy of one example (the official rule,
    including the min)::

        PM_i(J) = min( max_{j <= J} acc_ij * m_ij ,  acc_iJ ),   m_ij = 1 - memorized_ij

    Use this directly for the copy rule (``memorized_by_copy``). Pass True in the mask
    where the status is unknown: such an entry then contributes nothing to the running
    max. A NaN ``acc_ij`` likewise contributes nothing to the max, and makes PM_i(j) NaN
    (not measured at j, so excluded from the mean at j).
    """
    acc = np.asarray(acc, dtype=float)
    mask = np.asarray(memorized_mask, dtype=bool)
    if acc.ndim != 2 or acc.shape != mask.shape:
        raise ValueError(
            f"acc and the memorised mask must both be (checkpoints, examples); got {acc.shape} and {mask.shape}"
        )
    # The terms acc_ij * m_ij are >= 0, so "nothing yet" is 0: an example memorised before
    # any unmemorised measurement has no pre-memorization credit.
    credit = np.where(mask | np.isnan(acc), 0.0, acc)
    running_max = np.maximum.accumulate(credit, axis=0)
    return np.minimum(running_max, acc)  # np.minimum propagates NaN from acc_iJ


def premem_accuracy_per_example(acc: np.ndarray, nll: np.ndarray, threshold: float) -> np.ndarray:
    """The ``(C, N)`` matrix PM_i(J) with the NLL rule (m_ij = 1 when nll_ij >= threshold).

    A NaN ``nll_ij`` means the status is unknown and counts as memorised for the max, so an
    unscored checkpoint can never raise an example's credit.
    """
    not_memorized = np.asarray(nll, dtype=float) >= threshold  # NaN -> False
    return premem_accuracy_per_example_from_mask(acc, ~not_memorized)


def premem_accuracy_from_mask(acc: np.ndarray, memorized_mask: np.ndarray) -> np.ndarray:
    """PM(J) per checkpoint with memorisation given as a mask (the copy rule)."""
    return per_checkpoint_mean(premem_accuracy_per_example_from_mask(acc, memorized_mask))


def premem_accuracy(acc: np.ndarray, nll: np.ndarray, threshold: float) -> np.ndarray:
    """Pre-memorization train accuracy PM(J), one value per checkpoint.

    ``acc`` and ``nll`` are ``(checkpoints, examples)`` arrays in training order: ``acc``
    is the fraction of the k samples graded correct, ``nll`` the mean target NLL in nats
    per token, ``threshold`` the memorisation level nu (nll < nu means memorised).

    Kang et al. (2024), averaged over the training set: PM(J) = mean_i PM_i(J),
    read directly as a prediction of test accuracy at checkpoint J. Examples not measured
    at J (NaN acc) are left out of the mean at J; a checkpoint with no measured example
    gives NaN. For the copy rule use :func:`premem_accuracy_from_mask`.

    >>> premem_accuracy([[0.2, 0.6], [0.8, 1.0]], [[0.5, 0.05], [0.05, 0.01]], 0.1)
    array([0.1, 0.1])
    """
    return per_checkpoint_mean(premem_accuracy_per_example(acc, nll, threshold))


# ---------------------------------------------------------------------------
# Per-checkpoint means and the bootstrap interval
# ---------------------------------------------------------------------------


def per_checkpoint_mean(values: np.ndarray) -> np.ndarray:
    """Mean over examples of a ``(C, N)`` matrix, skipping NaN; NaN for an all-NaN row."""
    values = np.asarray(values, dtype=float)
    measured = ~np.isnan(values)
    count = measured.sum(axis=1)
    total = np.where(measured, values, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def paired_gap(values: np.ndarray, ref: int) -> tuple[np.ndarray, np.ndarray]:
    """Each checkpoint's mean difference to checkpoint ``ref`` over the same examples, and its standard error.

    Checkpoints are measured on one example set, so comparing two of them is a paired
    comparison: the per-example differences d_i = v_ji - v_ref,i cancel what makes an
    example easy or hard, and their standard error sd(d) / sqrt(n) is far smaller than
    either checkpoint's own interval suggests. Examples missing (NaN) at either side are
    left out. Returns ``(gap, se)``, each of shape ``(C,)``: gap 0 and se 0 at ``ref``; NaN
    gap where no example is shared, se 0 where one is.

    >>> gap, se = paired_gap([[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]], ref=1)
    >>> gap.round(3).tolist(), se.round(3).tolist()
    ([-0.25, 0.0], [0.25, 0.0])
    """
    values = np.asarray(values, dtype=float)
    diff = values - values[ref]
    shared = ~np.isnan(diff)
    n = shared.sum(axis=1)
    filled = np.where(shared, diff, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        gap = np.where(n > 0, filled.sum(axis=1) / np.maximum(n, 1), np.nan)
        var = np.where(shared, (diff - gap[:, None]) ** 2, 0.0).sum(axis=1) / np.maximum(n - 1, 1)
    return gap, np.where(n > 1, np.sqrt(var / np.maximum(n, 1)), 0.0)


def train_accuracy(acc: np.ndarray) -> np.ndarray:
    """Sampled train accuracy per checkpoint: mean_i acc_ij (Kang et al.'s baseline)."""
    return per_checkpoint_mean(acc)


def copy_rate(copy: np.ndarray) -> np.ndarray:
    """Mean copy rate per checkpoint: how often samples reproduce the training solution."""
    return per_checkpoint_mean(copy)


def memorized_fraction(memorized_mask: np.ndarray, measured: np.ndarray | None = None) -> np.ndarray:
    """Fraction of the measured examples that are memorised, per checkpoint.

    ``measured`` (same shape) marks the entries that count; default all. For the NLL
    rule pass ``memorized(nll, nu), ~np.isnan(nll)``.
    """
    mask = np.asarray(memorized_mask, dtype=float)
    if measured is not None:
        mask = np.where(np.asarray(measured, dtype=bool), mask, np.nan)
    return per_checkpoint_mean(mask)


def bootstrap_ci(
    per_example: np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval over examples for each checkpoint's mean.

    PM(J) is a mean over a sample of training examples; its interval says how much
    ``--max-examples`` costs in precision. Resampling is *paired*: each bootstrap draw
    picks the same example indices for every checkpoint, so intervals of neighbouring
    checkpoints reflect the same example draw. NaN entries are skipped within a draw
    (NaN-mean of the resampled values). Returns ``(lo, hi)``, each of shape ``(C,)``.

    Vectorised: draws become a count matrix (how often each example is picked) and the
    resampled means are one matrix product per chunk of draws.
    """
    values = np.asarray(per_example, dtype=float)
    n_ckpt, n_ex = values.shape
    if n_ex == 0:
        nan = np.full(n_ckpt, np.nan)
        return nan, nan.copy()
    rng = np.random.default_rng(seed)
    measured = (~np.isnan(values)).astype(float)
    filled = np.where(measured > 0, values, 0.0)
    means = np.empty((n_boot, n_ckpt))
    chunk = max(1, 4_000_000 // n_ex)  # bound the (draws, examples) count matrix to ~32 MB
    for start in range(0, n_boot, chunk):
        rows = min(chunk, n_boot - start)
        picks = rng.integers(0, n_ex, size=(rows, n_ex)) + (np.arange(rows) * n_ex)[:, None]
        counts = np.bincount(picks.ravel(), minlength=rows * n_ex).reshape(rows, n_ex).astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            means[start : start + rows] = (counts @ filled.T) / (counts @ measured.T)
    alpha = (1.0 - level) / 2.0
    lo = np.full(n_ckpt, np.nan)
    hi = np.full(n_ckpt, np.nan)
    for j in range(n_ckpt):  # per checkpoint, not per draw: C quantile calls
        finite = means[:, j][np.isfinite(means[:, j])]
        if finite.size:
            lo[j], hi[j] = np.quantile(finite, [alpha, 1.0 - alpha])
    return lo, hi


# ---------------------------------------------------------------------------
# "Nothing to work with" diagnostic
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PrememSupport:
    """How much evidence the run gives the pre-memorization rule.

    ``memorized_at_first``: fraction of the examples measured at the first checkpoint that
    are already memorised there. ``no_evidence``: fraction of examples with no checkpoint at
    which they were measured and not yet memorised, up to their first memorisation; their
    PM is 0 by construction, not by measurement.
    """

    n_examples: int
    memorized_at_first: float
    no_evidence: float

    def warning(self, limit: float = 0.5) -> str | None:
        """A plain-language warning when either fraction exceeds ``limit``; else None."""
        if self.memorized_at_first > limit:
            what = f"{self.memorized_at_first:.0%} of examples are already memorised at the first checkpoint"
        elif self.no_evidence > limit:
            what = f"{self.no_evidence:.0%} of examples were never measured before they were memorised"
        else:
            return None
        hint = "save earlier or more frequent checkpoints"
        return f"{what}; pre-memorization accuracy has little to work with — {hint}"


def premem_support(acc: np.ndarray, memorized_mask: np.ndarray) -> PrememSupport:
    """Diagnose whether PM(J) rests on measurements or on the rule's default of 0.

    ``memorized_mask`` as for :func:`premem_accuracy_per_example_from_mask` (True where
    memorised or unknown).
    """
    acc = np.asarray(acc, dtype=float)
    mask = np.asarray(memorized_mask, dtype=bool)
    n_ex = acc.shape[1]
    first_measured = ~np.isnan(acc[0])
    at_first = float(mask[0, first_measured].mean()) if first_measured.any() else float("nan")
    # Evidence: acc measured at some checkpoint before the first memorisation (or at any
    # checkpoint, for an example never memorised). Before it the mask is False, so such a
    # checkpoint is measured-and-not-memorised.
    ever = mask.any(axis=0)
    first = np.where(ever, mask.argmax(axis=0), acc.shape[0])
    before = np.arange(acc.shape[0])[:, None] < first[None, :]
    evidence = (before & ~np.isnan(acc)).any(axis=0)
    no_evidence = float((~evidence).mean()) if n_ex else float("nan")
    return PrememSupport(n_examples=n_ex, memorized_at_first=at_first, no_evidence=no_evidence)


# ---------------------------------------------------------------------------
# --threshold auto: calibrate nu against the copy rule
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """A fitted memorisation threshold and how well it separates copying from not.

    ``threshold`` is nu in nats per token. ``balanced_accuracy`` = (TPR + TNR) / 2 of the
    classifier "nll < nu" against "copy rate >= fraction" at that nu; ``auc`` is the
    threshold-free probability that a copying pair has lower NLL than a non-copying one
    (0.5 = no relation, 1 = perfect separation).
    """

    threshold: float
    balanced_accuracy: float
    true_positive_rate: float
    true_negative_rate: float
    auc: float
    n_pairs: int
    n_positive: int


def calibrate_threshold(nll: np.ndarray, copy_rate: np.ndarray, fraction: float = 0.5) -> Calibration:
    """Fit nu, the target-NLL level below which samples reproduce the training trace.

    Ties ckptsel/DESIGN.md's two memorisation rules together without a test set. Over all
    (checkpoint, example) pairs measured in both arrays, label a pair "copying" when
    ``copy_rate >= fraction`` and choose the cut nu of the classifier "nll < nu" that
    maximises balanced accuracy. Balanced accuracy rather than accuracy or F1 because
    copying pairs are rare early in a run and dominant late; it weights both classes
    equally whatever their share. Candidate cuts lie between consecutive distinct NLL
    values; nu is the geometric midpoint of the chosen gap (NLL levels span orders of
    magnitude, and the paper's rule is linear in log nll). Among equally good cuts the
    smallest nu is kept (the stricter memorisation rule).

    Raises :class:`CalibrationError` when there are no copying pairs, no non-copying
    pairs, or no two distinct NLL values.
    """
    nll = np.asarray(nll, dtype=float).ravel()
    copies = np.asarray(copy_rate, dtype=float).ravel()
    if nll.shape != copies.shape:
        raise ValueError(f"nll and copy_rate must have the same shape; got {nll.shape} and {copies.shape}")
    ok = ~(np.isnan(nll) | np.isnan(copies))
    nll, positive = nll[ok], copies[ok] >= fraction
    n_pos, n_pairs = int(positive.sum()), int(ok.sum())
    if n_pos == 0:
        raise CalibrationError(
            f"cannot calibrate the memorisation threshold: none of {n_pairs} (checkpoint, example) pairs "
            f"has copy rate >= {fraction:g}; give a fixed --threshold"
        )
    if n_pos == n_pairs:
        raise CalibrationError(
            f"cannot calibrate the memorisation threshold: all {n_pairs} (checkpoint, example) pairs "
            f"copy the target; give a fixed --threshold"
        )
    order = np.argsort(nll, kind="stable")
    sorted_nll, sorted_pos = nll[order], positive[order]
    # Cut after position k-1 (k = 1..n-1): the k lowest NLLs are predicted "copying".
    k = np.arange(1, n_pairs)
    true_pos = np.cumsum(sorted_pos)[:-1]
    tpr = true_pos / n_pos
    tnr = ((n_pairs - n_pos) - (k - true_pos)) / (n_pairs - n_pos)
    valid = sorted_nll[1:] > sorted_nll[:-1]  # a cut inside a run of equal values is not a cut
    if not valid.any():
        raise CalibrationError(
            "cannot calibrate the memorisation threshold: every measured target NLL is the same value"
        )
    score = np.where(valid, (tpr + tnr) / 2.0, -np.inf)
    best = int(np.argmax(score))
    below, above = sorted_nll[best], sorted_nll[best + 1]
    threshold = float(np.sqrt(below * above)) if below > 0 else float((below + above) / 2.0)
    return Calibration(
        threshold=threshold,
        balanced_accuracy=float(score[best]),
        true_positive_rate=float(tpr[best]),
        true_negative_rate=float(tnr[best]),
        auc=_auc(-nll, positive),
        n_pairs=n_pairs,
        n_positive=n_pos,
    )


def _auc(score: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney AUC: P(score of a positive > score of a negative), ties count 1/2."""
    ranks = _average_ranks(score)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


# ---------------------------------------------------------------------------
# Agreement between predicted and measured accuracy (validation scripts)
# ---------------------------------------------------------------------------


def _paired(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flatten two arrays and drop pairs where either side is NaN."""
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length; got {x.size} and {y.size}")
    keep = ~(np.isnan(x) | np.isnan(y))
    return x[keep], y[keep]


def r2_identity(predicted: np.ndarray, measured: np.ndarray) -> float:
    """R² of ``measured`` about the identity line y = x: 1 - Σ(y - x)² / Σ(y - ȳ)².

    Kang et al. (2024) plot pre-memorization accuracy against test accuracy with the
    identity line, so this scores the prediction as a number, not
    just its trend. Can be negative; NaN when fewer than two pairs or ``measured`` is
    constant.
    """
    x, y = _paired(predicted, measured)
    total = float(((y - y.mean()) ** 2).sum()) if y.size else 0.0
    if y.size < 2 or total == 0.0:
        return float("nan")
    return 1.0 - float(((y - x) ** 2).sum()) / total


def r2_fitted(predicted: np.ndarray, measured: np.ndarray) -> float:
    """R² of the least-squares line measured ~ a + b * predicted (equals Pearson r²)."""
    x, y = _paired(predicted, measured)
    if y.size < 3 or np.ptp(x) == 0.0 or np.ptp(y) == 0.0:
        return float("nan")
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (intercept + slope * x)
    return 1.0 - float((residual**2).sum()) / float(((y - y.mean()) ** 2).sum())


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of the non-NaN pairs; NaN when either side is constant."""
    x, y = _paired(x, y)
    if x.size < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    denom = float(np.sqrt((dx**2).sum() * (dy**2).sum()))
    return float((dx * dy).sum()) / denom if denom > 0 else float("nan")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (Pearson on average ranks, so ties are handled)."""
    x, y = _paired(x, y)
    return pearson(_average_ranks(x), _average_ranks(y))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    # Start index of each run of equal values, and each element's run.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    run = np.cumsum(np.r_[True, sorted_values[1:] != sorted_values[:-1]]) - 1
    ends = np.r_[starts[1:], values.size]
    ranks = np.empty(values.size)
    ranks[order] = (starts[run] + ends[run] + 1) / 2.0  # mean of ranks start+1..end
    return ranks
