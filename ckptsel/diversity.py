"""Sample diversity: how different a question's k samples are from each other.

Ruan et al. (2025, arXiv 2508.04117) find that over-memorized checkpoints lose generation
diversity at comparable accuracy: their samples for a question collapse onto one text. Both
measures read the k samples ckptsel already drew for sampled accuracy (no new generation),
each sample compared after whitespace normalisation (the copy rate's normalisation):

* :func:`distinct_fraction` -- distinct solutions among the k, over k (1/k: all the same; 1: all
  different);
* :func:`mean_edit_distance` -- the mean over pairs of samples of their normalised Levenshtein
  distance (edits / the longer text's length; 0: identical, 1: nothing in common).

NaN for fewer than two samples. (ckptsel/DESIGN.md, *Sample diversity*)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from rapidfuzz.distance import Levenshtein

from ckptsel.measure.text import normalize_solution


def distinct_fraction(samples: Sequence[str]) -> float:
    """Distinct normalised samples over the number of samples; NaN for fewer than two."""
    if len(samples) < 2:
        return math.nan
    return len({normalize_solution(s) for s in samples}) / len(samples)


def mean_edit_distance(samples: Sequence[str]) -> float:
    """Mean normalised Levenshtein distance over all pairs of normalised samples; NaN for fewer than two."""
    if len(samples) < 2:
        return math.nan
    texts = [normalize_solution(s) for s in samples]
    pairs = list(itertools.combinations(texts, 2))
    return sum(Levenshtein.normalized_distance(a, b) for a, b in pairs) / len(pairs)
