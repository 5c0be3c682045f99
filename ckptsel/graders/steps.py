"""``lab-steps``: a grader that checks the reasoning of a lab trace, not only its final number.

The lab's tasks (:mod:`ckptsel.lab.tasks`) write a solution as a chain of rewrites of the
question's expression, one merge of two terms per line, then ``#### N``::

    7+1+5+17        (7+1+5+9+8=?: 9+8 merged)
    7+6+17
    7+23
    #### 30

A tiny model's sample can reach the right number through a broken chain (a lost term made
up for by a wrong sum). Graded by the final number alone such a text counts as a correct
alternative solution, and the alternative-solution NLL then measures how much the model pays
for wrong steps. This grader accepts a completion only when

* its final answer equals the reference's (the ``gsm8k`` rule), and
* every line before it is a well-formed expression (sums, differences and products of
  integers, or ``max(...)``) whose value is the answer: a merge never changes the value, so
  a lost, repeated or mis-added term shows up as a wrong value, and
* each line has exactly one term fewer than the line above, the first line as many as the
  reference's first line (both are one merge away from the question), the last two (the
  answer line is the final merge).

The question itself is not available to a grader (it sees completion and reference), so the
first merge is checked by value only. Texts that are not lab traces never pass.
"""

from __future__ import annotations

import re

from ckptsel.graders.numeric import GSM8KGrader, extract_gsm8k

_NUMBER = r"(?:0|[1-9]\d*)"  # as the lab writes numbers: a sampled "02" is not a lab expression
_ARITHMETIC = re.compile(rf"{_NUMBER}(?:[+\-*]{_NUMBER})*")
_MAX = re.compile(r"max\((\d+(?:,\d+)*)\)")


def line_value(line: str) -> tuple[int, int] | None:
    """(value, number of terms) of one trace line; None when the line is not a lab expression."""
    line = line.replace(" ", "")
    if match := _MAX.fullmatch(line):
        terms = [int(t) for t in match.group(1).split(",")]
        return max(terms), len(terms)
    if _ARITHMETIC.fullmatch(line):
        # Only digits and + - * reach eval: the regex admits nothing else.
        return int(eval(line, {"__builtins__": {}}, {})), len(re.findall(r"\d+", line))  # noqa: S307
    return None


def trace_lines(text: str) -> tuple[list[str], str | None]:
    """The expression lines of a trace and its final ``#### N`` answer (None when it has none)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines or not lines[-1].startswith("####"):
        return lines, None
    return lines[:-1], extract_gsm8k(lines[-1])


class StepGrader(GSM8KGrader):
    """``lab-steps``: the final answer is right (the ``gsm8k`` rule) and every step of the rewrite chain is valid."""

    name = "lab-steps"

    def __call__(self, completion: str, reference: str) -> bool:
        if not super().__call__(completion, reference):
            return False
        lines, answer = trace_lines(completion)
        reference_lines, _ = trace_lines(reference)
        if answer is None:
            return False
        if not reference_lines:  # a two-term question: the answer line is the only merge
            return not lines
        try:
            target = int(float(answer))
        except ValueError:
            return False
        values = [line_value(line) for line in lines]
        first = line_value(reference_lines[0])
        if first is None or any(v is None for v in values):
            return False
        counts = [count for _, count in values]
        return (
            all(value == target for value, _ in values)
            and counts[0] == first[1]
            and all(b == a - 1 for a, b in zip(counts, counts[1:]))
            and counts[-1] == 2  # the answer line is the last merge
        )
