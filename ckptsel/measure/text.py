"""The text rules of sampling that need no model: budgets, seeds, and what counts as a copy.

Kept apart from :mod:`ckptsel.measure.sampling` (which imports torch) so that ranking from
the store -- harvesting alternative solutions, comparing samples with targets -- imports
neither torch nor transformers.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence


def max_new_tokens_for(target_token_lengths: Sequence[int]) -> int:
    """Budget that lets a model reproduce the longest target with room to spare: ceil(1.5 x longest) + 16."""
    return math.ceil(1.5 * max(target_token_lengths, default=0)) + 16


def sample_seed(seed: int, key: str, index: int) -> int:
    """A 63-bit seed for one (base seed, example key, sample index); stable across runs and machines."""
    digest = hashlib.sha256(f"{seed}\x1f{key}\x1f{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def normalize_solution(text: str) -> str:
    """Text as compared for copying: whitespace runs collapsed to one space, ends stripped.

    Case is kept: in math solutions it carries meaning (variables x and X, units mL and ML),
    so a case-folded match could call two different solutions copies.
    """
    return re.sub(r"\s+", " ", text).strip()


def copy_rate(completions: Sequence[str], target: str) -> float:
    """Fraction of samples equal to the training target after :func:`normalize_solution`."""
    if not completions:
        return float("nan")
    want = normalize_solution(target)
    return sum(normalize_solution(c) == want for c in completions) / len(completions)
