"""Numeric answers: the ``gsm8k`` and ``number`` graders.

Answers are compared as exact rationals (``fractions.Fraction``), so 3.50 == 3.5 and
1/2 == 0.5 without float tolerance, and 1,000.00 == 1000 once ``,`` ``$`` and ``%`` are
dropped. These graders run on every sample of every checkpoint: extraction is a substring
search plus a short regular-expression scan, and both extraction and parsing are cached.
"""

from __future__ import annotations

import functools
import re
from fractions import Fraction

from ckptsel.graders.base import Grader

# The digits of a number: thousands groups, decimals, an optional /denominator. The pattern
# starts with \d so the regex engine skips ahead to digits (a leading lookbehind or optional
# sign makes it try every position, about twice as slow); the lookbehind after the first digit keeps
# it from starting inside a word ("x2"). Sign, "$" and a leading "." are read by _number().
_NUMBER = re.compile(r"\d(?<!\w\d)(?:\d{0,2}(?:,\d{3})+(?!\d)|\d*)(?:\.\d+)?(?:/\d+(?:\.\d+)?)?")

# "The answer is 7", "Answer: 7", "A: 7" (the forms few-shot prompts and MetaMath use). It
# starts with a character class so the regex engine can skip ahead to each A/a: several
# times faster than a pattern that starts with an alternation or a lookbehind.
_MARKER = re.compile(r"[Aa](?:(?:nswer|NSWER)(?:\s+(?:is|IS)|\s*:)|(?<=A)(?<![A-Za-z]A):)")
LAST_NUMBER_WINDOW = 48  # longer than any number anyone writes


def _clean(number: str) -> str:
    """Drop what does not change the value: thousands commas, $, spaces; unicode minus -> '-'."""
    return number.replace(",", "").replace("$", "").replace(" ", "").replace("\u2212", "-")


def _number(text: str, match: re.Match) -> str:
    """The cleaned number at ``match``, with what precedes it: "-$5" -> "-5", ".5" -> "0.5".

    A minus counts only where it cannot be a binary minus: "10-3" ends in 3, not -3.
    """
    digits = _clean(match.group())
    at = match.start()
    if at >= 2 and text[at - 1] == "." and not text[at - 2].isdigit():
        digits, at = "0." + digits, at - 1
    if at >= 1 and text[at - 1] == "$":
        at -= 1
    elif at >= 2 and text[at - 2 : at] == "$ ":
        at -= 2
    if at >= 1 and text[at - 1] in "-\u2212" and (at < 2 or not (text[at - 2].isalnum() or text[at - 2] in ")]")):
        digits = "-" + digits
    return digits


@functools.lru_cache(maxsize=1 << 16)
def to_fraction(answer: str) -> Fraction | None:
    """The exact value of a numeric answer ("1,000.00", "$5", "50%", "-3/4", "7."), or None."""
    text = _clean(answer.strip()).rstrip(".").rstrip("%")
    numerator, sep, denominator = text.partition("/")
    try:
        value = Fraction(numerator)
        if sep:
            divisor = Fraction(denominator)
            if divisor == 0:
                return None
            value /= divisor
    except (ValueError, ZeroDivisionError):
        return None
    return value


def _number_in_line(text: str, start: int) -> str | None:
    """The first number after ``start`` on the line where the answer itself begins."""
    while start < len(text) and text[start] in " \t\r\n:*":
        start += 1
    end = text.find("\n", start)
    match = _NUMBER.search(text, start, end if end >= 0 else len(text))
    return _number(text, match) if match else None


def last_number(text: str) -> str | None:
    """The last number in ``text``, cleaned ("1,080" -> "1080"), or None.

    Scans only the stretch before the last digit (``str.rfind`` runs at C speed), and the
    whole text only when that stretch has no number in it.
    """
    end = max(map(text.rfind, "0123456789"))
    if end < 0:
        return None
    last = None
    for last in _NUMBER.finditer(text, max(0, end - LAST_NUMBER_WINDOW), end + 1):
        pass
    if last is None:
        for last in _NUMBER.finditer(text):
            pass
    return _number(text, last) if last else None


@functools.lru_cache(maxsize=1 << 14)
def extract_gsm8k(text: str) -> str | None:
    """GSM8K's final answer: after ``####``, else after an answer marker, else the last number.

    ``####``: its FIRST occurrence, because a model trained on GSM8K targets ends its answer
    there, and anything after it is runaway generation (often the next made-up question).
    Markers: the LAST one that has a number on its line, as a chain of thought may restate.
    """
    hashes = text.find("####")
    if hashes >= 0:
        answer = _number_in_line(text, hashes + 4)
        if answer is not None:
            return answer
    if "nswer" in text or "NSWER" in text or "A:" in text:  # substring tests are cheaper than a scan
        for marker in reversed(list(_MARKER.finditer(text))):
            answer = _number_in_line(text, marker.end())
            if answer is not None:
                return answer
    return last_number(text)


def numbers_equal(a: str, b: str) -> bool:
    """Exact numeric equality of two extracted answers; string equality if either is not a number."""
    if a == b:
        return True
    x, y = to_fraction(a), to_fraction(b)
    return x is not None and x == y


class NumberGrader(Grader):
    """``number``: the last number in the text, compared by value."""

    name = "number"

    def extract(self, text: str) -> str | None:
        return last_number(text)

    def equivalent(self, answer: str, reference_answer: str) -> bool:
        return numbers_equal(answer, reference_answer)


class GSM8KGrader(Grader):
    """``gsm8k``: ``#### N``, else "The answer is N" / "Answer: N" / "A: N", else the last number."""

    name = "gsm8k"

    def extract(self, text: str) -> str | None:
        return extract_gsm8k(text)

    def equivalent(self, answer: str, reference_answer: str) -> bool:
        return numbers_equal(answer, reference_answer)
