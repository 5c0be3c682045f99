"""MoE pathway metrics (Li, Fan & Zhou 2025, arXiv 2506.21551) as pure functions over arrays.

Input, per training example i: ``w_i`` of shape ``(layers, experts)``, the router's softmax
probabilities averaged over the example's target tokens in each MoE layer (captured by
``ckptsel.measure.routers`` during the scoring pass). Two metrics per checkpoint, both
lower when routing has become structured and shared (generalisation), higher when it is
random and sample-specific (memorisation):

* **pathway distance**: mean pairwise Levenshtein distance between the pathways of the
  memorised examples (the caller passes that subset);
* **pathway complexity**: 1 - consistency, where consistency is the mean cosine between
  the routing-weighted expert vectors of consecutive layers.

Our choices where the paper is silent (ckptsel/DESIGN.md asks for them to be written down):

* A pathway keeps, per layer, the experts with the largest weights until their cumulative
  weight reaches ``cutoff`` (default 0.8; weights are first divided by the layer's total,
  so the cut-off is a fraction of the layer's weight even after float rounding). The
  kept experts are listed in decreasing weight (ties: lower expert id first) or, with
  ``order="expert"``, by expert id, which makes a layer's segment the *set* of experts and
  ignores the order of near-equal weights.
* Each (layer, expert) pair is one symbol ``layer * E + expert``, so the edit distance
  compares whole symbols and an expert of one layer never matches one of another layer.
* "Normalised by its maximum": we divide the mean cosine by the largest value it can take,
  1, so consistency is the mean cosine itself, in [-1, 1], and complexity is in [0, 2].
  Dividing by the maximum over the run's checkpoints instead would make a checkpoint's value
  depend on which other checkpoints are in the run (it would change as checkpoints are
  added, so it could not be stored per checkpoint), and a positive per-run constant
  changes neither the ranking nor the Pearson or Spearman correlations the metric is
  judged by.

Cost: the edit distances are the expensive part, growing with the square of the number of
examples and of the pathway length (``benchmarks/pathway_speed.py``). Two budgets bound it,
applied in this order, each giving an unbiased estimate of the all-pairs mean:

1. ``max_examples`` (off by default): a seeded subset of the pathways is kept; everything
   after sees only it. It caps memory on very large sets; its own sampling error is not in
   ``stderr``, and ``n_examples`` says how many pathways were kept.
2. ``max_pairs``: when the *distinct* pathways (identical ones are scored once) make more
   pairs than this, the mean is estimated from that many pairs of examples drawn uniformly
   with replacement (seeded), and ``stderr`` = sd / sqrt(pairs) is reported with
   ``exact=False``. At the same cost this is a better estimate than all pairs of a subset
   (independent pairs), which is why it is the default budget. Each layer's breakdown is
   computed exactly or on the same sampled pairs, under the same rule.

Measured for 1,000 examples x 16 layers on 2 cores: flat routing over 64 experts (~460
symbols) takes ~12 s (18 CPU s) for all 500k pairs and ~1.3 s (2.2-2.5 CPU s) under the
default budget of 50,000 pairs, with a standard error of 0.03 on a mean of 444 (the
estimate was 0.04 off); shorter pathways take 0.1-0.6 s. Inputs under the budget (the lab's
100 examples: 4,950 pairs) are computed exactly, as before.
"""

from __future__ import annotations

import itertools
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from rapidfuzz.distance import Levenshtein
from rapidfuzz.process import cdist, cpdist

Order = Literal["weight", "expert"]

DEFAULT_CUTOFF = 0.8
# "Normalised by its maximum": the largest value a mean cosine can take (module docstring).
CONSISTENCY_MAX = 1.0
# Distance-matrix cells computed per rapidfuzz call (int32): bounds memory for large N.
_CELLS_PER_CALL = 2**24
# Codes a str can hold before the surrogate range; more distinct symbols stay integer lists.
_STR_CODES = 0xD800
# Cumulative weight within this of the cut-off counts as reaching it (float32 router output).
_EPS = 1e-6


# ---------------------------------------------------------------------------
# Pathways
# ---------------------------------------------------------------------------


def pathways(weights: np.ndarray, cutoff: float = DEFAULT_CUTOFF, order: Order = "weight") -> list[np.ndarray]:
    """The pathway of each example: ``weights`` ``(N, L, E)`` -> N int64 symbol arrays.

    Li et al., pathway s_i: per layer, the experts kept in order of decreasing routing
    weight until the cumulative weight reaches the cut-off, concatenated over layers;
    symbol ``l * E + e`` tags expert e with its layer l.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 3:
        raise ValueError(f"weights must be (examples, layers, experts), got shape {w.shape}")
    if not 0.0 < cutoff <= 1.0:
        raise ValueError(f"cutoff must be in (0, 1], got {cutoff}")
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError("weights must be finite and non-negative (leave out examples without routing weights)")
    n, n_layers, n_experts = w.shape
    if n == 0:
        return []
    total = w.sum(axis=-1, keepdims=True)
    if (total <= 0).any():
        raise ValueError("every layer needs some routing weight")
    rank = np.argsort(-w, axis=-1, kind="stable")  # experts by decreasing weight, ties by id
    sorted_w = np.take_along_axis(w / total, rank, axis=-1)
    before = np.cumsum(sorted_w, axis=-1) - sorted_w  # weight of the experts ranked above
    keep = before < cutoff - _EPS  # keep until the cumulative weight reaches the cut-off
    layer = np.arange(n_layers)[None, :, None] * n_experts
    if order == "weight":
        symbols = (layer + rank)[keep]
        counts = keep.sum(axis=(1, 2))
    elif order == "expert":
        kept = np.zeros_like(keep)
        np.put_along_axis(kept, rank, keep, axis=-1)
        symbols = np.broadcast_to(layer + np.arange(n_experts), kept.shape)[kept]
        counts = kept.sum(axis=(1, 2))
    else:
        raise ValueError(f"order must be 'weight' or 'expert', got {order!r}")
    return np.split(symbols.astype(np.int64), np.cumsum(counts)[:-1])


def pathway(weights: np.ndarray, cutoff: float = DEFAULT_CUTOFF, order: Order = "weight") -> np.ndarray:
    """The pathway of one example, ``weights`` ``(L, E)``; see :func:`pathways`."""
    return pathways(np.asarray(weights)[None], cutoff, order)[0]


# ---------------------------------------------------------------------------
# Pathway distance
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PathwayDistance:
    """Mean pairwise edit distance of pathways; NaN with fewer than two examples.

    ``per_layer[l]``: the same mean computed on each pathway's layer-l segment alone.
    ``n_examples``: pathways compared (after ``max_examples``); ``n_unique``: distinct ones.
    ``exact``: every mean is over all pairs of those pathways; otherwise ``stderr`` and
    ``per_layer_stderr`` are the standard errors of the sampled-pair estimates (0 where exact).
    """

    mean: float
    per_layer: np.ndarray
    n_examples: int
    n_unique: int
    mean_length: float
    exact: bool
    stderr: float
    per_layer_stderr: np.ndarray

    def as_dict(self) -> dict:
        """JSON-ready form (NaN becomes None)."""
        def num(x: float) -> float | None:
            return None if np.isnan(x) else float(x)

        return {
            "mean": num(self.mean),
            "per_layer": [num(x) for x in self.per_layer],
            "n_examples": self.n_examples,
            "n_unique": self.n_unique,
            "mean_length": num(self.mean_length),
            "exact": self.exact,
            "stderr": num(self.stderr),
            "per_layer_stderr": [num(x) for x in self.per_layer_stderr],
        }


def pathway_distance(
    paths: Sequence[np.ndarray],
    num_experts: int,
    num_layers: int,
    *,
    max_examples: int | None = None,
    max_pairs: int | None = None,
    seed: int = 0,
    workers: int = -1,
) -> PathwayDistance:
    """Li et al.'s pathway distance: mean Levenshtein distance over all pairs of ``paths``.

    Pass the pathways of the memorised examples. Budgets, in this order (module docstring):
    with more than ``max_examples`` pathways, a seeded uniform subset of that size is kept
    (the all-pairs mean of a random subset is an unbiased estimate, a U-statistic); then a
    mean whose distinct pathways make more than ``max_pairs`` pairs is estimated on
    ``max_pairs`` seeded random pairs of examples, shared by the whole pathways and every
    layer. None: no budget. ``workers``: threads for rapidfuzz (-1: all cores).
    """
    paths = list(paths)
    rng = np.random.default_rng(seed)
    if max_examples is not None and len(paths) > max_examples:
        chosen = np.sort(rng.choice(len(paths), size=max_examples, replace=False))
        paths = [paths[i] for i in chosen]
    sample: list[tuple[np.ndarray, np.ndarray]] = []  # drawn once, when a mean first needs it

    def within_budget(sequences: list[str] | list[list[int]]) -> tuple[float, float]:
        if max_pairs is None or _distinct_pairs(sequences) <= max_pairs:
            return mean_pairwise_distance(sequences, workers), 0.0
        if not sample:
            sample.append(sample_pairs(len(sequences), max_pairs, rng))
        return sampled_pairwise_distance(sequences, *sample[0], workers=workers)

    whole = _as_strings([np.asarray(p) for p in paths])
    mean, stderr = within_budget(whole)
    layers = np.array([within_budget(segments) for segments in _layer_segments(paths, num_experts, num_layers)])
    layers = layers.reshape(num_layers, 2)
    return PathwayDistance(
        mean=mean,
        per_layer=layers[:, 0],
        n_examples=len(paths),
        n_unique=len({_hashable(s) for s in whole}),
        mean_length=float(np.mean([len(p) for p in paths])) if paths else float("nan"),
        exact=not sample,
        stderr=stderr,
        per_layer_stderr=layers[:, 1],
    )


def sample_pairs(n: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``size`` pairs (i, j), i != j, each unordered pair of ``n`` examples equally likely, with replacement."""
    first = rng.integers(0, n, size)
    second = rng.integers(0, n - 1, size)
    return first, second + (second >= first)  # skip i itself: j uniform over the other n - 1


def sampled_pairwise_distance(
    sequences: Sequence[str | list[int]], first: np.ndarray, second: np.ndarray, workers: int = -1
) -> tuple[float, float]:
    """Mean Levenshtein distance over the given pairs and its standard error, sd / sqrt(pairs).

    With pairs drawn by :func:`sample_pairs` the mean is an unbiased estimate of
    :func:`mean_pairwise_distance` and the pairs are independent, so the standard error is
    the textbook one. rapidfuzz ``cpdist``: element-wise, C++, multithreaded.
    """
    queries, choices = [sequences[i] for i in first.tolist()], [sequences[j] for j in second.tolist()]
    dist = cpdist(queries, choices, scorer=Levenshtein.distance, dtype=np.int32, workers=workers).astype(np.float64)
    return float(dist.mean()), float(dist.std(ddof=1) / np.sqrt(len(dist))) if len(dist) > 1 else float("nan")


def _distinct_pairs(sequences: Sequence[str | list[int]]) -> int:
    """Pairs of distinct sequences, what an exact mean costs."""
    unique = len({_hashable(s) for s in sequences})
    return unique * (unique - 1) // 2


def mean_pairwise_distance(sequences: Sequence[str | list[int]], workers: int = -1) -> float:
    """Mean Levenshtein distance over all unordered pairs (i < j); NaN for fewer than two.

    Identical sequences are scored once: with distinct sequences u and their counts c, the
    sum over ordered pairs of distinct examples is c^T D c (D has a zero diagonal), so
    shared pathways, the generalising regime, cost almost nothing. The distance matrix is
    computed in row blocks of its upper triangle (rapidfuzz ``cdist``, C++, multithreaded).
    """
    n = len(sequences)
    if n < 2:
        return float("nan")
    tally = Counter(_hashable(s) for s in sequences)
    uniq = [list(s) if isinstance(s, tuple) else s for s in tally]
    counts = np.fromiter(tally.values(), dtype=np.float64, count=len(tally))
    total = 0.0
    step = max(1, _CELLS_PER_CALL // len(uniq))
    for start in range(0, len(uniq), step):
        stop = min(start + step, len(uniq))
        if start == 0 and stop == len(uniq):  # one call; the same list twice lets rapidfuzz do half
            block = cdist(uniq, uniq, scorer=Levenshtein.distance, dtype=np.int32, workers=workers)
            total += counts @ block @ counts
            break
        block = cdist(uniq[start:stop], uniq[start:], scorer=Levenshtein.distance, dtype=np.int32, workers=workers)
        c_rows, c_cols = counts[start:stop], counts[start:]
        inside = block[:, : stop - start]  # the block's own square: both orders already in it
        total += c_rows @ inside @ c_rows + 2.0 * (c_rows @ block[:, stop - start :] @ c_cols[stop - start :])
    return float(total / (n * (n - 1)))


def _hashable(sequence: str | list[int]) -> str | tuple[int, ...]:
    return tuple(sequence) if isinstance(sequence, list) else sequence


def _as_strings(paths: Sequence[np.ndarray]) -> list[str] | list[list[int]]:
    """Encode symbol arrays for rapidfuzz, preserving equality; see :func:`_encode`."""
    return _encode(*_flatten(paths))


def _flatten(paths: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """All symbols in one array, and each pathway's length."""
    lengths = np.array([len(p) for p in paths], dtype=np.int64)
    flat = np.concatenate([np.asarray(p, dtype=np.int64) for p in paths]) if lengths.sum() else np.zeros(0, np.int64)
    return flat, lengths


def _layer_segments(paths: Sequence[np.ndarray], num_experts: int, num_layers: int) -> list:
    """Each layer's segments of the pathways, encoded: expert ids only (the layer tag dropped)."""
    flat, lengths = _flatten(paths)
    owner = np.repeat(np.arange(len(paths)), lengths)
    layer_of = flat // num_experts
    segments = []
    for layer in range(num_layers):
        inside = layer_of == layer
        segments.append(_encode(flat[inside] % num_experts, np.bincount(owner[inside], minlength=len(paths))))
    return segments


def _encode(flat: np.ndarray, lengths: np.ndarray) -> list[str] | list[list[int]]:
    """Sequences (``flat`` cut by ``lengths``) as strings of dense codes, one character per symbol.

    Codes below 256 take rapidfuzz's fastest path; all sequences are decoded as one UTF-32
    string and sliced, which is much faster than a join per sequence. Beyond the characters
    a ``str`` can hold (surrogates start at 0xD800) the sequences stay integer lists.
    """
    if not len(lengths):
        return []
    _, codes = np.unique(flat, return_inverse=True)
    bounds = itertools.pairwise(np.concatenate([[0], np.cumsum(lengths)]).tolist())
    if codes.size and codes.max() >= _STR_CODES:
        listed = codes.tolist()
        return [listed[a:b] for a, b in bounds]
    text = codes.astype("<u4").tobytes().decode("utf-32-le")
    return [text[a:b] for a, b in bounds]


# ---------------------------------------------------------------------------
# Pathway consistency and complexity
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PathwayConsistency:
    """Consistency (mean cosine of consecutive layers' expert embeddings) and complexity.

    ``per_pair[l]``: mean over examples of cos(e_l, e_{l+1}); ``per_example[i]``: mean over
    layer pairs for example i. ``consistency`` is the mean of ``per_example``.
    """

    consistency: float
    complexity: float
    per_pair: np.ndarray
    per_example: np.ndarray

    def as_dict(self) -> dict:
        """JSON-ready form without the per-example values (NaN becomes None)."""
        def num(x: float) -> float | None:
            return None if np.isnan(x) else float(x)

        return {
            "consistency": num(self.consistency),
            "complexity": num(self.complexity),
            "per_pair": [num(x) for x in self.per_pair],
        }


def pathway_consistency(weights: np.ndarray, gate_vectors: np.ndarray) -> PathwayConsistency:
    """Li et al.'s single-pathway consistency and complexity; see the module docstring.

    ``weights`` ``(N, L, E)``; ``gate_vectors`` ``(L, E, H)``, the router's expert vectors
    g_{l,e} (rows of each layer's gate weight, in the shared residual space). The same as
    ``consistency_from_cosines(layer_cosines(weights, gate_vectors))``.
    """
    return consistency_from_cosines(layer_cosines(weights, gate_vectors))


def layer_cosines(weights: np.ndarray, gate_vectors: np.ndarray) -> np.ndarray:
    """cos(e_il, e_il+1) per example and consecutive layer pair, ``(N, L - 1)``.

    e_il = sum_e w_il,e * g_l,e is example i's routing-weighted expert embedding at layer l.
    These N x (L - 1) numbers are all that consistency needs, so a scoring pass can keep
    them per example instead of the checkpoint's gate weights. A zero embedding has no
    direction: its cosines are NaN.
    """
    w = np.asarray(weights, dtype=np.float64)
    g = np.asarray(gate_vectors, dtype=np.float64)
    if w.ndim != 3 or g.ndim != 3 or w.shape[1:] != g.shape[:2]:
        raise ValueError(f"weights (N, L, E) and gate_vectors (L, E, H) disagree: {w.shape} vs {g.shape}")
    n, n_layers, _ = w.shape
    cos = np.full((n, max(n_layers - 1, 0)), np.nan)
    for layer in range(1, n_layers):
        prev, cur = w[:, layer - 1] @ g[layer - 1], w[:, layer] @ g[layer]  # (N, H) each
        norms = np.linalg.norm(prev, axis=1) * np.linalg.norm(cur, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            cos[:, layer - 1] = np.where(norms > 0, np.einsum("nh,nh->n", prev, cur) / norms, np.nan)
    return cos


def consistency_from_cosines(cosines: np.ndarray) -> PathwayConsistency:
    """Consistency = mean over examples of the mean over layer pairs of the cosines, / 1.

    ``cosines`` ``(N, L - 1)`` from :func:`layer_cosines`, for the examples to average over
    (the memorised ones). NaN cosines (zero embeddings) are left out of the means.
    """
    cos = np.asarray(cosines, dtype=np.float64)
    if cos.ndim != 2:
        raise ValueError(f"cosines must be (examples, layer pairs), got shape {cos.shape}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of an all-NaN slice is NaN, as wanted
        per_example = np.nanmean(cos, axis=1) if cos.shape[1] else np.full(cos.shape[0], np.nan)
        per_pair = np.nanmean(cos, axis=0) if cos.shape[0] else np.full(cos.shape[1], np.nan)
        mean_cos = float(np.nanmean(per_example)) if cos.shape[0] else float("nan")
    consistency = mean_cos / CONSISTENCY_MAX  # Li et al.: "normalised by its maximum"
    return PathwayConsistency(
        consistency=consistency, complexity=1.0 - consistency, per_pair=per_pair, per_example=per_example
    )
