"""Did the phenomena happen? Per-run summaries of the ground truth, as pure functions.

The lab must show, on its main grid (issue 3):

* a spread of held-out accuracy across runs (some runs generalise, some do not);
* memorisation: train accuracy well above held-out accuracy, samples copying the trained trace;
* over-memorization (Ruan et al. 2025): held-out reference NLL rises well above its minimum
  while held-out accuracy stays near its best.

The curve functions take arrays over checkpoints in training order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# The thresholds: NLL at least 1.25x its minimum, accuracy within 0.05 of the best.
NLL_RISE = 1.25
ACC_TOLERANCE = 0.05
# Ruan et al.'s stage (c) is *high* accuracy with high perplexity. A run that never gets
# anything right (pure memorisation of a small set) also has rising held-out NLL at a flat,
# near-zero accuracy; it is stage (a), not over-memorization, so a floor on the best accuracy.
ACC_FLOOR = 0.3


def nll_rise(nll: np.ndarray) -> np.ndarray:
    """nll_j / min_{j' <= j} nll_j': how far the held-out NLL has climbed above its minimum so far."""
    nll = np.asarray(nll, dtype=float)
    return nll / np.minimum.accumulate(nll)


def overmemorized(
    acc: np.ndarray,
    nll: np.ndarray,
    rise: float = NLL_RISE,
    tolerance: float = ACC_TOLERANCE,
    floor: float = ACC_FLOOR,
) -> np.ndarray:
    """Checkpoints in stage (c): NLL >= ``rise`` x its running minimum, accuracy >= run best - ``tolerance``,
    in a run whose best accuracy reaches ``floor``."""
    acc = np.asarray(acc, dtype=float)
    return (nll_rise(nll) >= rise) & (acc >= acc.max() - tolerance) & (acc.max() >= floor)


@dataclass(frozen=True)
class Curves:
    """A run's ground truth as arrays over checkpoints, in step order."""

    steps: np.ndarray
    test_acc: np.ndarray
    test_nll: np.ndarray
    train_acc: np.ndarray
    copy_rate: np.ndarray


def curves(ground_truth: dict) -> Curves:
    points = sorted(ground_truth["checkpoints"].values(), key=lambda c: c["step"])

    def column(key: str) -> np.ndarray:
        return np.array([c[key] for c in points], dtype=float)

    return Curves(
        steps=np.array([c["step"] for c in points]),
        test_acc=column("test_accuracy"),
        test_nll=column("test_nll"),
        train_acc=column("train_accuracy"),
        copy_rate=column("train_copy_rate"),
    )


@dataclass(frozen=True)
class RunSummary:
    """One run's headline numbers (final = the last checkpoint)."""

    run: str
    steps: int
    final_test_acc: float
    best_test_acc: float
    final_train_acc: float
    final_copy_rate: float
    gap: float                    # final train accuracy - final held-out accuracy
    min_test_nll: float
    final_test_nll: float
    max_nll_rise: float           # max over checkpoints of nll_rise
    overmemorized_steps: list[int]
    final_perturbed_acc: float | None

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(run: str, ground_truth: dict) -> RunSummary:
    """Summarise one run's ``ground_truth.json`` content."""
    c = curves(ground_truth)
    last = max(ground_truth["checkpoints"].values(), key=lambda p: p["step"])
    return RunSummary(
        run=run,
        steps=int(c.steps[-1]),
        final_test_acc=float(c.test_acc[-1]),
        best_test_acc=float(c.test_acc.max()),
        final_train_acc=float(c.train_acc[-1]),
        final_copy_rate=float(c.copy_rate[-1]),
        gap=float(c.train_acc[-1] - c.test_acc[-1]),
        min_test_nll=float(c.test_nll.min()),
        final_test_nll=float(c.test_nll[-1]),
        max_nll_rise=float(nll_rise(c.test_nll).max()),
        overmemorized_steps=[int(s) for s in c.steps[overmemorized(c.test_acc, c.test_nll)]],
        final_perturbed_acc=last.get("test_perturbed_accuracy"),
    )


def phenomena(summaries: list[RunSummary]) -> dict:
    """The issue's three checks over a grid, with the numbers behind each verdict."""
    final = [s.final_test_acc for s in summaries]
    memorising = [s for s in summaries if s.gap >= 0.2 and s.final_copy_rate > 0.5]
    over = [s for s in summaries if s.overmemorized_steps]
    spread = max(final) - min(final) if final else 0.0
    return {
        "accuracy_spread": {"value": spread, "ok": spread >= 0.4},
        "memorising_runs": {"runs": [s.run for s in memorising], "ok": bool(memorising)},
        "overmemorized_runs": {"runs": [s.run for s in over], "ok": len(over) >= 2},
    }
