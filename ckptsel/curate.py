"""Data curation by pre-memorization accuracy: which training examples new data should go to.

Kang et al. (2024, arXiv 2411.07681) prioritise new training data for the examples whose
pre-memorization accuracy is lowest -- the ones the model has not learned to solve before it
memorised them -- and report 1.5-2x the data efficiency of i.i.d. data scaling. ckptsel measures
that quantity per example (ckptsel/DESIGN.md, *Pre-memorization accuracy*); this module turns it
into an order over the training file and picks new data from a pool of candidates by it. Pure
functions over the ranking's per-example arrays: nothing here loads a model.

Strategies (``--strategy``), each an order over the measured training rows:

* ``premem`` -- lowest pre-memorization accuracy at the chosen checkpoint first (the paper's rule);
* ``iid`` -- a seeded random order (the i.i.d. baseline);
* ``train-acc`` -- lowest sampled train accuracy at the chosen checkpoint first;
* ``loss`` -- highest target NLL at the chosen checkpoint first.

Ties are broken by a seeded random draw, so equal examples share the budget evenly and the result
is reproducible. Rows outside the measured subset (``--max-examples``) have no measurement: they
come after every measured row, in a seeded random order.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ckptsel.data import Example, Row
from ckptsel.errors import CkptselError

STRATEGIES: dict[str, str] = {
    "premem": "lowest pre-memorization accuracy first (Kang et al.: new data for these is worth the most)",
    "iid": "a seeded random order (the i.i.d. baseline)",
    "train-acc": "lowest sampled train accuracy first",
    "loss": "highest target NLL first",
}


@dataclass(frozen=True)
class Priority:
    """One training row, where it comes in the order, and the numbers that put it there."""

    priority: int  # 1 = first to get new data
    index: int  # row in the training file, 0-based
    uid: str
    question: str
    measured: bool
    premem_acc: float | None = None
    train_acc: float | None = None
    target_nll: float | None = None
    memorized_at_step: int | None = None  # the first measured checkpoint where it was memorised

    def to_json(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class Measured:
    """The chosen checkpoint's per-example numbers for the measured examples (one value per example)."""

    examples: Sequence[Example]
    premem: np.ndarray
    acc: np.ndarray
    nll: np.ndarray
    memorized_at_step: Sequence[int | None]


def prioritize(rows: Sequence[Example], measured: Measured, strategy: str = "premem", seed: int = 0) -> list[Priority]:
    """Every training row in priority order (the module docstring's rules)."""
    if strategy not in STRATEGIES:
        raise CkptselError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    rng = random.Random(seed)
    where = {ex.uid: n for n, ex in enumerate(measured.examples)}

    def score(n: int) -> float:  # lower comes first; NaN (not measured at this checkpoint) last among measured
        value = {"premem": measured.premem[n], "train-acc": measured.acc[n], "loss": -measured.nll[n],
                 "iid": 0.0}[strategy]
        return math.inf if math.isnan(value) else float(value)

    keyed = []
    for ex in rows:
        n = where.get(ex.uid)
        keyed.append(((0, score(n)) if n is not None else (1, 0.0), rng.random(), ex, n))
    keyed.sort(key=lambda k: (k[0], k[1]))
    out = []
    for rank, (_, _, ex, n) in enumerate(keyed, start=1):
        if n is None:
            out.append(Priority(rank, ex.index, ex.uid, ex.question, False))
        else:
            out.append(Priority(rank, ex.index, ex.uid, ex.question, True, _num(measured.premem[n]),
                                _num(measured.acc[n]), _num(measured.nll[n]), measured.memorized_at_step[n]))
    return out


def take(priorities: Sequence[Priority], top: int | None = None, fraction: float | None = None) -> list[Priority]:
    """The first ``top`` rows, or the first ``fraction`` of them (rounded up); all of them without either."""
    if top is not None and fraction is not None:
        raise CkptselError("give --top or --fraction, not both")
    if fraction is not None:
        if not 0.0 < fraction <= 1.0:
            raise CkptselError(f"--fraction must be in (0, 1]; got {fraction:g}")
        top = math.ceil(fraction * len(priorities))
    if top is not None and top < 1:
        raise CkptselError(f"--top must be at least 1; got {top}")
    return list(priorities[:top] if top is not None else priorities)


@dataclass(frozen=True)
class PoolChoice:
    """What :func:`choose_from_pool` chose: the pool rows, in order, and the rows it could not place."""

    rows: list[Row]
    unmatched: list[str]  # one line per pool row whose source names no training row
    sources: int  # distinct training rows the chosen rows are new data for


def choose_from_pool(pool: Sequence[Row], priorities: Sequence[Priority], budget: int, *, seed: int = 0,
                     field: str = "source", skip_bad: bool = False) -> PoolChoice:
    """The ``budget`` pool rows whose sources come first in ``priorities``.

    Each pool row names its training row in ``field``: the row's uid (as ``ckptsel data`` prints it) or
    its question text. Sources are visited in priority order, round after round, one candidate of each
    source per round (a source's candidates in a seeded random order), so a budget smaller than the pool
    goes to the highest-priority sources and a source's several candidates are spread evenly.
    A row whose source matches no training row raises one line naming it, unless ``skip_bad``.
    """
    if budget < 1:
        raise CkptselError(f"--budget must be at least 1; got {budget}")
    by_uid = {p.uid: p for p in priorities}
    by_question: dict[str, Priority] = {}
    for p in priorities:
        by_question.setdefault(_text(p.question), p)
    candidates: dict[str, list[Row]] = {}
    unmatched = []
    for row in pool:
        if row.error is not None:
            problem = f"{row.where}: {row.error}"
        elif not isinstance((row.values or {}).get(field), str) or not row.values[field].strip():
            problem = f"{row.where}: no {field!r} field naming its training example (a uid or the question text)"
        else:
            source = row.values[field]
            match = by_uid.get(source.strip()) or by_question.get(_text(source))
            if match is not None:
                candidates.setdefault(match.uid, []).append(row)
                continue
            problem = f"{row.where}: {field} {_short(source)!r} matches no training row (by uid or question)"
        if not skip_bad:
            raise CkptselError(problem + " (--skip-bad leaves such rows out)")
        unmatched.append(problem)
    rng = random.Random(seed)
    queues = []
    for p in priorities:  # priority order
        rows = candidates.get(p.uid)
        if rows:
            rows = list(rows)
            rng.shuffle(rows)
            queues.append(rows)
    chosen: list[Row] = []
    used_sources = 0
    depth = 0
    while len(chosen) < budget and any(len(q) > depth for q in queues):
        for q in queues:
            if len(q) > depth and len(chosen) < budget:
                chosen.append(q[depth])
                used_sources += depth == 0
        depth += 1
    return PoolChoice(chosen, unmatched, used_sources)


def _num(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def _text(text: str) -> str:
    return " ".join(text.split())


def _short(text: str, width: int = 60) -> str:
    text = _text(text)
    return text if len(text) <= width else text[: width - 1] + "…"
