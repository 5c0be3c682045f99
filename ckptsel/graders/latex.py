"""The ``math`` grader: MATH-style answers in LaTeX.

Three steps, each cached (the same reference is graded k times per checkpoint, and a
model's answers repeat):

1. **Extract** the last ``\\boxed{...}``/``\\fbox{...}`` (nested braces; ``\\boxed 5``) or the
   text after "The answer is:" (MetaMath) / "The final answer is" (Minerva), whichever
   comes last; a short one-line text with neither is itself the answer (a bare reference).
2. **Normalise** the answer string: ``\\dfrac``/``\\tfrac`` -> ``\\frac``, ``\\frac12`` ->
   ``\\frac{1}{2}``, no ``\\left``/``\\right``/``\\!``/spaces, units in ``\\text{}``/``\\mbox{}``
   dropped, degrees, ``\\$`` and percent signs dropped, ``12,\\!650`` -> ``12650``,
   ``\\text{(A)}`` -> ``A``, a word answer lower-cased.
3. **Compare structure, then values**: "x = 5" -> "5", "x \\in [0,1]" -> "[0,1]"; tuples
   and intervals element-wise with their brackets (``(1,2]`` is not ``(1,2)``); unbracketed
   lists ("all solutions, separated by commas") and sets as multisets; unions of intervals
   as sets of parts; matrices cell by cell; ``a \\pm b`` as the list {a+b, a-b}; equations
   side by side. Scalars are equal when their normalised strings are, or when
   :mod:`ckptsel.graders.latex_expr` finds the same value (exact rationals, else numeric
   identity testing, in bounded time).
"""

from __future__ import annotations

import functools
import re

from ckptsel.graders.base import Grader
from ckptsel.graders.latex_expr import expressions_equal

# --------------------------------------------------------------------------- extraction
_BRACE = re.compile(r"\\.|[{}]", re.S)
# MetaMath's "The answer is: X" (with the colon) and Minerva's "The final answer is X"; a bare
# "the answer is" is too common in prose ("checking the answer is necessary") to trust.
_ANSWER_IS = re.compile(r"[Tt]he answer is:|[Tt]he final answer is:?")
BARE_MAX_CHARS = 200
MAX_ANSWER_CHARS = 1000  # longer "answers" (runaway generations) compare as raw strings
MAX_NESTING = 20


def _last_box(text: str) -> tuple[int, int]:
    """(start, end) of the last ``\\boxed`` or ``\\fbox`` command (not ``\\boxedx``), or (-1, -1)."""
    best = (-1, -1)
    for command in ("\\boxed", "\\fbox"):
        at = text.rfind(command)
        while at >= 0 and text[at + len(command) : at + len(command) + 1].isalpha():
            at = text.rfind(command, 0, at)
        if at > best[0]:
            best = (at, at + len(command))
    return best


def _box_content(text: str, start: int) -> str | None:
    """The argument of the box command ending at ``start``: ``{...}`` or one bare token."""
    rest = text[start:]
    stripped = rest.lstrip()
    if not stripped.startswith("{"):
        bare = re.match(r"[^\s$]+", stripped)  # \boxed 9$  ->  9
        return bare.group() if bare else None
    open_at = start + len(rest) - len(stripped)
    depth = 0
    for match in _BRACE.finditer(text, open_at):
        token = match.group()
        if token == "{":
            depth += 1
        elif token == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : match.start()]
    return None  # unbalanced: a truncated completion has no final answer


def _after_answer_is(text: str, start: int) -> str | None:
    """The answer after "The answer is": ``$...$`` if it opens one, else the rest of the line."""
    rest = text[start:].lstrip(" \t")
    if rest.startswith("$"):
        end = rest.find("$", 1)
        answer = rest[1:end] if end > 0 else rest[1:]
    else:
        answer = rest.split("\n", 1)[0]
    answer = answer.strip().rstrip(".").strip()
    return answer or None


@functools.lru_cache(maxsize=1 << 14)
def extract_math(text: str) -> str | None:
    """The final answer of a MATH-style solution (see the module docstring), or None."""
    box, box_end = _last_box(text)
    answer_is = None
    if "answer is" in text:  # a substring test first: the regex scan is the slow part
        for answer_is in _ANSWER_IS.finditer(text):
            pass
    if answer_is is not None and answer_is.start() > box:
        return _after_answer_is(text, answer_is.end())
    if box >= 0:
        content = _box_content(text, box_end)
        return (content.strip() or None) if content is not None else None
    stripped = text.strip().strip("$").strip()
    if stripped and len(stripped) <= BARE_MAX_CHARS and "\n" not in stripped:
        return stripped
    return None


# --------------------------------------------------------------------------- normalisation
_UNICODE = {  # a command gets a space after it: "2\u03c0r" is "2\\pi r", not "2\\pir"
    "\u2212": "-", "\u221e": "\\infty ", "\u00d7": "\\times ", "\u00b7": "\\cdot ", "\u03c0": "\\pi ",
    "\u2264": "\\le ", "\u2265": "\\ge ", "\u00b0": "",
}
_SIZING = re.compile(r"\\(?:left|right)\.|\\(?:left|right|[bB]igg?[lr]?|displaystyle|textstyle)(?![a-zA-Z])")
_THOUSANDS_BANG = re.compile(r"(?<=\d),\s*\\!\s*(?=\d{3}(?!\d))")
_SPACING = re.compile(r"\\\\|\\[,;: !]|\\q?quad(?![a-zA-Z])|~")
_SPACE_FOR = {"\\\\": "\\\\", "\\!": ""}  # a matrix row break stays; \! joins; the rest is a space
_DEGREES = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ(?![a-zA-Z])|\\degree(?![a-zA-Z])")
_TEXT_CMD = r"\\(?:text|textbf|textit|textrm|textnormal|textsf|mbox|mathrm|mathbf|mathit|mathsf)\s*"
_CONNECTOR = re.compile(_TEXT_CMD + r"\{\s*(?:and|or|,)\s*\}|\s+(?:and|or)\s+")
_TEXT = re.compile(_TEXT_CMD + r"\{([^{}]*)\}")
_UNIT = re.compile(_TEXT_CMD + r"\{[^{}]*\}(?:\s*\^\s*\{?\d\}?)?")  # a unit, with its ^2 or ^3
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_CANON_TOKEN = re.compile(r"\\[a-zA-Z]+|\\.|\S", re.S)
_CHOICE = re.compile(r"\(([A-Z])\)")


def _brace_shorthand(s: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac9{5}``, ``\\sqrt3``, ``\\binom52``: brace every argument."""
    out = []
    pos = 0
    for match in re.finditer(r"\\(frac|sqrt|binom)(?![a-zA-Z])", s):
        if match.start() < pos:
            continue
        out.append(s[pos : match.end()])
        pos = match.end()
        if match.group(1) == "sqrt":
            index = re.match(r"\s*\[[^\]]*\]", s[pos:])
            if index:
                out.append(index.group().strip())
                pos += index.end()
        for _ in range(1 if match.group(1) == "sqrt" else 2):
            argument = re.match(r"\s*(\{|\\[a-zA-Z]+|[^\s{}])", s[pos:])
            if argument is None or argument.group(1) == "{":
                break  # braced arguments stay; the parser reads them
            out.append("{" + argument.group(1) + "}")
            pos += argument.end()
    out.append(s[pos:])
    return "".join(out)


def _canonical(s: str) -> str:
    """Join tokens without spaces, keeping one where a command meets a letter (``\\sin x``)."""
    out = []
    after_command = False
    for token in _CANON_TOKEN.findall(s):
        if after_command and token[0].isalpha():
            out.append(" ")
        out.append(token)
        after_command = token[0] == "\\" and token[1:].isalpha()
    return "".join(out)


@functools.lru_cache(maxsize=1 << 16)
def normalize(answer: str) -> str:
    """A canonical string for a LaTeX answer: equal strings mean equal answers."""
    s = answer.strip()
    if len(s) > MAX_ANSWER_CHARS:
        return s
    for old, new in _UNICODE.items():
        s = s.replace(old, new)
    s = _SIZING.sub("", s)
    s = _THOUSANDS_BANG.sub("", s)
    s = _SPACING.sub(lambda m: _SPACE_FOR.get(m.group(), " "), s)
    s = re.sub(r"\\[dtc]frac(?![a-zA-Z])", r"\\frac", s)
    s = re.sub(r"\\[dt]binom(?![a-zA-Z])", r"\\binom", s)
    s = _DEGREES.sub("", s)
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
    s = re.sub(r",(?:\s*,)+", ",", _CONNECTOR.sub(",", s))  # "7, -2, \text{ and } -5" -> "7,-2,-5"
    if _TEXT.search(s):
        without_units = _UNIT.sub(" ", s)
        if without_units.strip(" ,.;"):
            s = without_units  # "5\text{ cm}" -> "5"
        else:
            s = _TEXT.sub(lambda m: m.group(1), s)  # "\text{east}" -> "east"
    s = _brace_shorthand(s)
    s = s.strip().lstrip(",;").rstrip(",;.").strip()  # not lstrip("."): ".5" is a number
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    s = _canonical(s)
    choice = _CHOICE.fullmatch(s)
    if choice:
        return choice.group(1)
    return s.lower() if s.isalpha() and len(s) >= 3 else s  # a word: "East" == "\text{east}"


# --------------------------------------------------------------------------- structure
_OPEN = {"(": ")", "[": "]", "{": "}", "\\{": "\\}"}
_CLOSE = frozenset({")", "]", "}", "\\}"})
_MATRIX = re.compile(r"\\begin\{([pbBvV]?matrix|array)\}(?:\{[^{}]*\})?(.*)\\end\{\1\}", re.S)
_MEMBER = re.compile(r"(?:[a-zA-Z]|\\[a-zA-Z]+)\\in(?![a-zA-Z])")
_VARIABLE = re.compile(r"(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\{?\w+\}?)?")


def _split_top(s: str, separator: str) -> list[str]:
    """Split at ``separator`` tokens outside any bracket (brackets may be mixed, as in ``(1,2]``)."""
    parts, depth, start = [], 0, 0
    for match in _CANON_TOKEN.finditer(s):
        token = match.group()
        if token in _OPEN:
            depth += 1
        elif token in _CLOSE:
            depth -= 1
        elif token == separator and depth == 0:
            parts.append(s[start : match.start()])
            start = match.end()
    parts.append(s[start:])
    return parts


def _enclosed(s: str) -> tuple[str, str, str] | None:
    """(opener, inside, closer) when one bracket pair spans all of ``s``, e.g. ``[0,7)``."""
    tokens = list(_CANON_TOKEN.finditer(s))
    if len(tokens) < 2 or tokens[0].group() not in _OPEN or tokens[-1].group() not in _CLOSE:
        return None
    depth = 0
    for i, match in enumerate(tokens):
        depth += match.group() in _OPEN
        depth -= match.group() in _CLOSE
        if depth == 0 and i < len(tokens) - 1:
            return None  # "(x+1)(x-1)": the first pair closes early
    return tokens[0].group(), s[tokens[0].end() : tokens[-1].start()], tokens[-1].group()


def _items(parts: list[str]) -> tuple:
    """Structures of list or set members, a member ``a \\pm b`` counting as two members."""
    items = []
    for part in parts:
        item = structure(part)
        items.extend(item[1:] if item[0] == "list" else [item])
    return tuple(sorted(items))


@functools.lru_cache(maxsize=1 << 16)
def structure(s: str) -> tuple:
    """The shape of a normalised answer: nested tuples of kinds and scalar strings."""
    member = _MEMBER.match(s)
    if member:
        s = s[member.end() :]  # "x \\in [-2,7]" -> "[-2,7]"
    sides = _split_top(s, "=")
    if len(sides) == 2 and _VARIABLE.fullmatch(sides[0]) and sides[1]:
        s = sides[1]  # "x=5" -> "5"
    elif len(sides) == 2:
        return ("eq", structure(sides[0]), structure(sides[1]))
    matrix = _MATRIX.fullmatch(s)
    if matrix:
        rows = [row for row in _split_top(matrix.group(2), "\\\\") if row]
        return ("matrix", tuple(tuple(structure(cell) for cell in _split_top(row, "&")) for row in rows))
    parts = [part for part in _split_top(s, "\\cup") if part]
    if len(parts) > 1:
        return ("union", *sorted(structure(part) for part in parts))
    parts = [part for part in _split_top(s, ",") if part]
    if len(parts) > 1:
        return ("list", *_items(parts))
    enclosed = _enclosed(s)
    if enclosed is not None:
        opener, inside, closer = enclosed
        parts = _split_top(inside, ",")
        if opener == "\\{":
            return ("set", *_items(parts))
        if len(parts) > 1:
            return ("seq", opener, closer, *(structure(part) for part in parts))
    for sign, plus, minus in (("\\pm", "+", "-"), ("\\mp", "-", "+")):
        if s.count(sign) == 1:
            return ("list", *sorted(structure(s.replace(sign, op)) for op in (plus, minus)))
    return ("scalar", s)


def _multiset_equal(xs: tuple, ys: tuple) -> bool:
    """Each item matched to a distinct equal item (greedy; sorted order makes it quick)."""
    if len(xs) != len(ys):
        return False
    unmatched = list(ys)
    for x in xs:
        for i, y in enumerate(unmatched):
            if same_structure(x, y):
                del unmatched[i]
                break
        else:
            return False
    return True


def same_structure(x: tuple, y: tuple) -> bool:
    """Equality of two :func:`structure` values, element-wise down to scalar expressions."""
    if x == y:
        return True
    if x[0] != y[0]:
        return False
    kind = x[0]
    if kind == "scalar":
        return expressions_equal(x[1], y[1]) is True
    if kind == "seq":
        return x[1:3] == y[1:3] and len(x) == len(y) and all(map(same_structure, x[3:], y[3:]))
    if kind in ("list", "set", "union"):
        return _multiset_equal(x[1:], y[1:])
    if kind == "matrix":
        rows_x, rows_y = x[1], y[1]
        return [len(r) for r in rows_x] == [len(r) for r in rows_y] and all(
            same_structure(a, b) for row_x, row_y in zip(rows_x, rows_y) for a, b in zip(row_x, row_y)
        )
    if kind == "eq":
        return (same_structure(x[1], y[1]) and same_structure(x[2], y[2])) or (
            same_structure(x[1], y[2]) and same_structure(x[2], y[1])
        )
    return False


def _simple_enough(s: str) -> bool:
    """Short and shallow enough to analyse (the recursion in :func:`structure` follows nesting)."""
    if len(s) > MAX_ANSWER_CHARS:
        return False
    depth = 0
    for token in _CANON_TOKEN.findall(s):
        depth += token in _OPEN
        depth -= token in _CLOSE
        if depth > MAX_NESTING:
            return False
    return True


@functools.lru_cache(maxsize=1 << 16)
def answers_equal(answer: str, reference_answer: str) -> bool:
    """Whether two extracted LaTeX answers are the same answer."""
    a, b = normalize(answer), normalize(reference_answer)
    if a == b:
        return True
    if not (_simple_enough(a) and _simple_enough(b)):
        return False  # a runaway "answer": no analysis, no time spent
    return same_structure(structure(a), structure(b))


class MathGrader(Grader):
    """``math``: the last ``\\boxed{}`` (or "The answer is: X"), compared as LaTeX answers."""

    name = "math"

    def extract(self, text: str) -> str | None:
        return extract_math(text)

    def equivalent(self, answer: str, reference_answer: str) -> bool:
        return answers_equal(answer, reference_answer)
