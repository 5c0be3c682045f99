"""Seeded train and held-out test splits over a mix of task families.

Two properties the ground truth depends on:

* The test split depends only on (families, n_test, seed), never on the training size, so
  every run of a grid is judged on the same held-out questions.
* Train and test are disjoint as problems (a family's ``key``: the operands up to order,
  so no reordering of a test question is trained on), and a smaller training set is a
  prefix of a larger one with the same seed, so the data-size axis of a grid varies one thing.

Each row carries one randomly chosen valid trace as its ``answer`` (GSM8K layout), plus the
family, the true value, a perturbed equivalent question and an ``alternative``: another
valid trace of the same question (empty when there is only one).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from ckptsel.errors import RecipeError
from ckptsel.lab.tasks import FAMILIES, Problem

_MAX_DRAWS_PER_ROW = 200


@dataclass(frozen=True)
class Row:
    """One GSM8K-layout row with what the lab knows about it."""

    question: str
    answer: str
    family: str
    value: int
    perturbed: str
    alternative: str = ""


def _draw_rows(
    families: list[str], n: int, rng: random.Random, identity, excluded: set, where: str
) -> tuple[list[Row], set]:
    """Draw ``n`` rows, distinct by ``identity(problem)``, whose problem key is not in ``excluded``.

    Returns the rows and the set of their problem keys.
    """
    rows: list[Row] = []
    seen: set = set()
    keys: set = set()
    draws = 0
    while len(rows) < n:
        draws += 1
        if draws > _MAX_DRAWS_PER_ROW * max(n, 1):
            raise RecipeError(f"{where}: only {len(rows)} distinct problems of {'+'.join(families)} found, {n} asked")
        family = FAMILIES[rng.choice(families)]
        problem: Problem = family.draw(rng)
        key = (problem.family, problem.key)
        if key in excluded or identity(problem) in seen:
            continue
        seen.add(identity(problem))
        keys.add(key)
        answer = family.trace(problem, rng)
        perturbed = family.perturb(problem, rng).question
        rows.append(Row(problem.question, answer, problem.family, problem.value, perturbed, _other(family, problem, answer, rng)))
    return rows, keys


def _other(family, problem: Problem, answer: str, rng: random.Random) -> str:
    """A valid trace other than ``answer`` ('' when there is none); cheap draws first."""
    for _ in range(4):
        trace = family.trace(problem, rng)
        if trace != answer:
            return trace
    others = [t for t in family.traces(problem) if t != answer]
    return rng.choice(others) if others else ""


def make_splits(families: list[str], n_train: int, n_test: int, seed: int) -> tuple[list[Row], list[Row]]:
    """Return (train, test) rows; see the module docstring for the guarantees.

    Test questions are distinct problems. Training questions are distinct *texts* whose
    problems never occur in the test split: "3+5+1+2" and "2+1+5+3" may both be trained on
    (their traces differ), but not if either is a test problem.
    """
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise RecipeError(f"families: unknown {unknown or 'none given'}; known: {', '.join(FAMILIES)}")
    test, test_keys = _draw_rows(
        families, n_test, random.Random(f"test-{seed}"), lambda p: (p.family, p.key), set(), "test split"
    )
    train, _ = _draw_rows(
        families, n_train, random.Random(f"train-{seed}"), lambda p: (p.family, p.question), test_keys, "train split"
    )
    return train, test


def write_jsonl(rows: list[Row], path: Path) -> None:
    path.write_text("".join(json.dumps(asdict(r)) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[Row]:
    return [Row(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
