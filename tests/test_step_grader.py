"""The ``lab-steps`` grader: right answer through valid steps, on hand-made and generated lab traces."""

from __future__ import annotations

import random

import pytest

from ckptsel.graders import get
from ckptsel.graders.steps import line_value
from ckptsel.lab.tasks import FAMILIES

REFERENCE = "7+1+5+17\n7+6+17\n7+23\n#### 30"  # 7+1+5+9+8=?


@pytest.mark.parametrize(
    "completion, ok",
    [
        (REFERENCE, True),
        ("8+5+9+8\n8+14+8\n22+8\n#### 30", True),  # another valid order
        ("7+1+5+17\n7+6+17\n13+17\n#### 30", True),
        ("7+1+5+17\n7+6+17\n#### 30", False),  # skips the last merge
        ("7+1+22\n7+23\n#### 30", False),  # first line merges three terms
        ("7+1+5+17\n7+7+17\n7+23\n#### 30", False),  # wrong sum, fixed up later
        ("7+1+5+17\n7+1+17\n7+23\n#### 30", False),  # a lost term
        ("7+1+5+17\n7+6+17\n7+23\n#### 31", False),  # wrong answer
        ("the answer is 30\n#### 30", False),  # not a trace
        ("7+1+5+17\n7+6+17\n7+23", False),  # no answer line
    ],
)
def test_step_grader_by_hand(completion, ok):
    assert get("lab-steps")(completion, REFERENCE) is ok


def test_line_values():
    assert line_value("14-2+9") == (21, 3)
    assert line_value("5*12") == (60, 2)
    assert line_value("max(62,69,64)") == (69, 3)
    assert line_value("7+x") is None
    assert line_value("__import__('os')") is None
    # A sampled leading zero is not a lab expression (and must not reach eval, where it is a SyntaxError).
    assert line_value("02+6+3") is None
    assert line_value("10+0+3") == (13, 3)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_valid_lab_trace_passes_and_a_broken_one_fails(family):
    rng = random.Random(3)
    grade = get("lab-steps")
    for _ in range(20):
        problem = FAMILIES[family].draw(rng)
        reference = FAMILIES[family].trace(problem, rng)
        for trace in FAMILIES[family].traces(problem):
            assert grade(trace, reference), (family, trace, reference)
        lines = reference.splitlines()
        if len(lines) > 2:  # drop a middle step: the answer is still right, the chain is not
            assert not grade("\n".join(lines[1:]), reference)
