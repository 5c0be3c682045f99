"""Synthetic reasoning tasks where one question has several valid reasoning traces.

Why several traces: a model that *solves* a question can take any valid route to the
answer, while a model that has *memorised* its training example reproduces the one route
it was trained on. Each training target is one randomly chosen valid trace, and so is each
held-out reference solution, so "samples copy the training trace" and "the model pays for
an equally valid but differently written trace" are both measurable.

A trace rewrites the question's expression one line at a time, merging one adjacent pair
of terms per line, until one term is left (the ``#### N`` line). Which pair to merge is
free, so n terms give (n-1)! traces, and the bookkeeping is written out: each line is the
line above with one local edit. Two formats were tried first: accumulating the terms in
any order (``7+5=12 / 12+3=15``) and folding left or right with swapped operands. After
~570 steps the tiny models' errors there were mostly lost or repeated terms rather than
arithmetic (held-out accuracy about 0.3-0.4); the rewrite format carries the remaining
terms along in the text instead.

Every family produces GSM8K-layout rows: ``question`` and ``answer``, the answer being the
trace's lines, then ``#### N``. Texts are short because the lab's tokenizer is character
level (sequence length is the training cost).

Families (one explicit table, :data:`FAMILIES`):

    sum      6+5+9+9=?                       11+9+9 / 20+9 / #### 29    or  6+14+9 / 20+9 / ...
    product  5*4*3=?                         20*3 / #### 60             or  5*12 / #### 60
    word     Bo had 14 cats, lost 2, got 9.  14-2+9 / 12+9 / #### 21    or  14-2+9 / 14+7 / ...
    max      max(62,69,36,64)=?              max(69,36,64) / ...        or  max(62,69,64) / ...
    modadd   m+e=?                           #### 5                     (one trace: the answer)

``modadd`` is the grokking family (Power et al. 2022): a+b mod p with no trace, a finite
table of p*p questions, so a fraction of all pairs can be the training set and the rest held
out (``recipes/lab/grokking.yaml``). Each operand is one symbol, as in Power et al.: residue
r is the r-th letter of a-zA-Z (m+e=? is 12+4 mod p); the answer is the residue in digits.

Each family also *perturbs* a question: an equivalent question with a different surface
(operands reordered, a different name), the prompt perturbation the ground truth uses.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Protocol

ANSWER_MARK = "#### "


@dataclass(frozen=True)
class Problem:
    """One question of a family: its text, true value and the operands that define it.

    ``key`` identifies the problem up to surface form (sorted operands), so train and test
    splits are disjoint as *problems*, not just as strings. ``surface`` holds the wording
    choices that do not change the answer (a name, an object), which perturbations vary.
    """

    family: str
    question: str
    value: int
    operands: tuple[int, ...]
    key: tuple
    surface: tuple[str, ...] = ()


class Family(Protocol):
    name: str

    def draw(self, rng: random.Random) -> Problem: ...

    def trace(self, problem: Problem, rng: random.Random) -> str: ...

    def traces(self, problem: Problem) -> list[str]: ...

    def perturb(self, problem: Problem, rng: random.Random) -> Problem: ...


def _with_answer(lines: list[str], value: int) -> str:
    return "\n".join([*lines, f"{ANSWER_MARK}{value}"])


def _reordered(items: tuple[int, ...], rng: random.Random) -> tuple[int, ...]:
    """A different order of ``items`` when one exists (a perturbation must change the text)."""
    if len(set(items)) == 1:
        return items
    while True:
        out = list(items)
        rng.shuffle(out)
        if tuple(out) != items:
            return tuple(out)


class _Rewrite:
    """A trace rewrites a list of terms, merging one adjacent pair per line, until one is left.

    A route is the merge position at each step: n terms have (n-1)! routes, drawn
    uniformly. Subclasses say what the terms are (:meth:`_terms`), how two merge
    (:meth:`_merge`) and how a list of terms reads (:meth:`_show`).
    """

    name = ""

    def _terms(self, problem: Problem) -> tuple[int, ...]:
        return problem.operands

    def _merge(self, a: int, b: int) -> int:
        raise NotImplementedError

    def _show(self, terms: list[int]) -> str:
        raise NotImplementedError

    def _lead(self, problem: Problem) -> list[str]:
        """Lines before the first rewrite (a word problem first writes its expression)."""
        return []

    def _render(self, problem: Problem, positions: tuple[int, ...]) -> str:
        terms = list(self._terms(problem))
        lines = self._lead(problem)
        for pos in positions:
            terms[pos : pos + 2] = [self._merge(terms[pos], terms[pos + 1])]
            if len(terms) > 1:
                lines.append(self._show(terms))
        return _with_answer(lines, terms[0])

    def _routes(self, problem: Problem):
        n = len(self._terms(problem))
        return itertools.product(*(range(n - 1 - k) for k in range(n - 1)))

    def trace(self, problem: Problem, rng: random.Random) -> str:
        """One valid trace, its merge positions drawn from ``rng``."""
        n = len(self._terms(problem))
        return self._render(problem, tuple(rng.randrange(n - 1 - k) for k in range(n - 1)))

    def traces(self, problem: Problem) -> list[str]:
        """Every distinct valid trace."""
        return sorted({self._render(problem, route) for route in self._routes(problem)})


class _Operator(_Rewrite):
    """``sum`` and ``product``: the question is the expression; merge adjacent operands."""

    symbol = ""

    def __init__(self, n_terms: tuple[int, int], low: int, high: int):
        self.n_terms, self.low, self.high = n_terms, low, high

    def _problem(self, operands: tuple[int, ...]) -> Problem:
        value = operands[0]
        for x in operands[1:]:
            value = self._merge(value, x)
        question = self._show(list(operands)) + "=?"
        return Problem(self.name, question, value, operands, tuple(sorted(operands)))

    def draw(self, rng: random.Random) -> Problem:
        n = rng.randint(*self.n_terms)
        return self._problem(tuple(rng.randint(self.low, self.high) for _ in range(n)))

    def _show(self, terms: list[int]) -> str:
        return self.symbol.join(map(str, terms))

    def perturb(self, problem: Problem, rng: random.Random) -> Problem:
        return self._problem(_reordered(problem.operands, rng))


class SumFamily(_Operator):
    name, symbol = "sum", "+"

    def _merge(self, a: int, b: int) -> int:
        return a + b


class ProductFamily(_Operator):
    name, symbol = "product", "*"

    def _merge(self, a: int, b: int) -> int:
        return a * b


_NAMES = ("Ann", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal", "Ivy", "Jo")
_THINGS = ("cats", "pens", "eggs", "cards", "coins", "books", "hats", "keys")


class WordFamily(_Rewrite):
    """Someone starts with some things, then gains and loses some: how many at the end?

    The trace first writes the expression (``9+3-2``), then merges adjacent signed terms
    (``12-2`` or ``9+1``). The start exceeds all losses together, so no partial result
    is negative. The name and the object are surface detail: the perturbation changes them.
    """

    name = "word"

    def __init__(self, n_events: tuple[int, int] = (2, 3), high: int = 9):
        self.n_events, self.high = n_events, high

    @staticmethod
    def _text(start: int, deltas, who: str, what: str) -> str:
        events = ", ".join(f"got {d}" if d > 0 else f"lost {-d}" for d in deltas)
        return f"{who} had {start} {what}, {events}. How many?"

    def _problem(self, operands: tuple[int, ...], who: str, what: str) -> Problem:
        start, deltas = operands[0], operands[1:]
        key = (start, tuple(sorted(deltas)))
        text = self._text(start, deltas, who, what)
        return Problem(self.name, text, start + sum(deltas), operands, key, (who, what))

    def draw(self, rng: random.Random) -> Problem:
        n = rng.randint(*self.n_events)
        deltas = [rng.choice((1, -1)) * rng.randint(1, self.high) for _ in range(n)]
        lowest = -sum(d for d in deltas if d < 0) + 1
        start = rng.randint(lowest, lowest + self.high)
        return self._problem((start, *deltas), rng.choice(_NAMES), rng.choice(_THINGS))

    def _merge(self, a: int, b: int) -> int:
        return a + b

    def _show(self, terms: list[int]) -> str:
        return str(terms[0]) + "".join(f"{'-' if t < 0 else '+'}{abs(t)}" for t in terms[1:])

    def _lead(self, problem: Problem) -> list[str]:
        return [self._show(list(problem.operands))]

    def perturb(self, problem: Problem, rng: random.Random) -> Problem:
        who, what = problem.surface
        new_who = rng.choice([n for n in _NAMES if n != who])
        new_what = rng.choice([t for t in _THINGS if t != what])
        return self._problem(problem.operands, new_who, new_what)


class MaxFamily(_Rewrite):
    """The largest of a few numbers: drop the smaller of an adjacent pair, line by line."""

    name = "max"

    def __init__(self, n_items: tuple[int, int] = (3, 5), high: int = 99):
        self.n_items, self.high = n_items, high

    def _problem(self, operands: tuple[int, ...]) -> Problem:
        return Problem(self.name, self._show(list(operands)) + "=?", max(operands), operands, tuple(sorted(operands)))

    def draw(self, rng: random.Random) -> Problem:
        n = rng.randint(*self.n_items)
        return self._problem(tuple(rng.sample(range(1, self.high + 1), n)))

    def _merge(self, a: int, b: int) -> int:
        return max(a, b)

    def _show(self, terms: list[int]) -> str:
        return "max(" + ",".join(map(str, terms)) + ")"

    def perturb(self, problem: Problem, rng: random.Random) -> Problem:
        return self._problem(_reordered(problem.operands, rng))


_SYMBOLS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


class ModAddFamily:
    """``a+b mod p``: the answer alone (``#### c``); the perturbation swaps the operands.

    The problem key is the unordered pair, so a held-out question's swapped twin is held out
    too (the model cannot get it by commutativity from a training row).
    """

    name = "modadd"

    def __init__(self, p: int):
        if not 2 <= p <= len(_SYMBOLS):
            raise ValueError(f"modadd: p must be 2..{len(_SYMBOLS)} (one letter per residue)")
        self.p = p

    def _problem(self, a: int, b: int) -> Problem:
        question = f"{_SYMBOLS[a]}+{_SYMBOLS[b]}=?"
        return Problem(self.name, question, (a + b) % self.p, (a, b), tuple(sorted((a, b))))

    def draw(self, rng: random.Random) -> Problem:
        return self._problem(rng.randrange(self.p), rng.randrange(self.p))

    def trace(self, problem: Problem, rng: random.Random) -> str:
        return _with_answer([], problem.value)

    def traces(self, problem: Problem) -> list[str]:
        return [_with_answer([], problem.value)]

    def perturb(self, problem: Problem, rng: random.Random) -> Problem:
        a, b = problem.operands
        return self._problem(b, a)


FAMILIES: dict[str, Family] = {
    "sum": SumFamily(n_terms=(4, 5), low=1, high=9),
    "product": ProductFamily(n_terms=(3, 4), low=2, high=5),
    "word": WordFamily(),
    "max": MaxFamily(),
    "modadd": ModAddFamily(p=23),
}
