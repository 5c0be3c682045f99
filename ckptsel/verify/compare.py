"""Predicted against measured test accuracy: pairing, intervals, R² and rank correlation.

Pure functions over arrays and plain rows; nothing here loads a model or reads a file.
The prediction is pre-memorization train accuracy (Kang et al. read it directly as test
accuracy), so the headline score is R² about the identity line, as in their plots; the
fitted R² and the rank correlations say how much of the miss is a shift or a scale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ckptsel import metrics

if TYPE_CHECKING:
    from ckptsel.select import CheckpointMetrics, Ranking

# Correlations over fewer checkpoints than this are noise; they are reported as None.
MIN_CHECKPOINTS = 3


def accuracy_with_interval(per_example: np.ndarray, level: float = 0.95, n_boot: int = 2000,
                           seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean accuracy per checkpoint and its percentile-bootstrap interval over test questions.

    ``per_example`` is (checkpoints, questions), each entry the fraction of that question's
    samples graded correct (0 or 1 when greedy), NaN where not measured. The same resampling
    as the pre-memorization interval (:func:`ckptsel.metrics.bootstrap_ci`), so the two
    intervals side by side mean the same thing.
    """
    values = np.atleast_2d(np.asarray(per_example, dtype=float))
    lo, hi = metrics.bootstrap_ci(values, n_boot=n_boot, level=level, seed=seed)
    return metrics.per_checkpoint_mean(values), lo, hi


@dataclass(frozen=True)
class Agreement:
    """How well the prediction matches the measurement across checkpoints (None: too few pairs)."""

    n: int  # checkpoints with both numbers
    r2_identity: float | None
    r2_fitted: float | None
    pearson: float | None
    spearman: float | None
    mean_abs_error: float | None

    def to_json(self) -> dict:
        return dict(self.__dict__)


def agreement(predicted: Sequence[float | None], measured: Sequence[float | None]) -> Agreement:
    """R² (identity and fitted), Pearson, Spearman and mean |error| over the checkpoints with both values.

    The correlations need at least :data:`MIN_CHECKPOINTS` pairs; the mean absolute error is
    given from one pair on.
    """
    x = np.array([np.nan if v is None else v for v in predicted], dtype=float)
    y = np.array([np.nan if v is None else v for v in measured], dtype=float)
    both = ~(np.isnan(x) | np.isnan(y))
    n = int(both.sum())
    mae = float(np.abs(x[both] - y[both]).mean()) if n else None
    if n < MIN_CHECKPOINTS:
        return Agreement(n, None, None, None, None, mae)
    return Agreement(
        n,
        _finite(metrics.r2_identity(x, y)),
        _finite(metrics.r2_fitted(x, y)),
        _finite(metrics.pearson(x, y)),
        _finite(metrics.spearman(x, y)),
        mae,
    )


def _finite(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def predictions_from_ranking(ranking: Ranking) -> dict[str, CheckpointMetrics]:
    """Index a ranking's checkpoints by fingerprint and by resolved path.

    Verify pairs its checkpoints to a ranking by content fingerprint first (a moved run still
    pairs), by path otherwise (:func:`lookup`).
    """
    index: dict[str, CheckpointMetrics] = {}
    for row in ranking.checkpoints:
        if row.fingerprint:
            index[f"fp:{row.fingerprint}"] = row
        if row.path:
            index[f"path:{Path(row.path).resolve()}"] = row
    return index


def lookup(index: Mapping[str, CheckpointMetrics], fingerprint: str | None, path) -> CheckpointMetrics | None:
    """The ranking's row for one checkpoint: by fingerprint, else by path."""
    if fingerprint and f"fp:{fingerprint}" in index:
        return index[f"fp:{fingerprint}"]
    return index.get(f"path:{Path(path).resolve()}")
