"""A small LaTeX math subset -> expression tree -> a bounded decision of equality.

Why not ``sympy.parsing.latex``: it refuses any ANTLR runtime but 4.11 (this environment
has 4.13.2; pinning 4.11 would clash with packages that pin others, e.g. omegaconf's 4.9),
and ``sympy.simplify`` can run for minutes on one unlucky answer. Grading runs thousands of
answers per checkpoint, so here equality is decided in time bounded by the size of the
expression, with plain ``fractions`` and ``cmath``:

1. Both sides evaluate to exact rationals (``Fraction``): compare exactly
   (``\\frac{3}{4}`` == ``0.75``; ``2^{100}-2`` compared digit for digit).
2. Otherwise, compare complex floating-point values at a few pseudo-random points for the
   free symbols (the same points for both sides): polynomial identity testing, which
   decides ``(x+1)^2`` == ``x^2+2x+1`` or ``\\frac{\\sqrt2}{2}`` == ``\\frac{1}{\\sqrt2}``
   with a negligible chance of a false "equal" (relative tolerance 1e-9).
3. Neither decides (nothing evaluates, or only on one side): ``None``; the caller then
   falls back to comparing normalised strings.

Bounds: inputs longer than :data:`MAX_CHARS` or nested deeper than :data:`MAX_DEPTH` are not
parsed; exact arithmetic gives up (goes to floats) past :data:`MAX_BITS`; factorials and
binomials above small limits are undefined here; float overflow is caught.
"""

from __future__ import annotations

import cmath
import functools
import math
import re
import zlib
from fractions import Fraction

MAX_CHARS = 500
MAX_DEPTH = 40
MAX_BITS = 20_000
MAX_FACTORIAL = 1_000
TRIALS = 3
REL_TOL = 1e-9
ABS_TOL = 1e-12

_TOKEN = re.compile(r"\d+(?:\.\d*)?|\.\d+|\\[a-zA-Z]+|\\.|\S")
_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")
_WORD = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]{3,}")  # a plain word ("east"), not math

_FUNCTIONS = frozenset(
    "sin cos tan cot sec csc arcsin arccos arctan sinh cosh tanh ln log exp".split()
)
_GREEK = frozenset(
    """alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu
    xi rho sigma tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi Sigma Phi
    Psi Omega""".split()
)
_MULTIPLY = frozenset({"*", "\\cdot", "\\times"})
_DIVIDE = frozenset({"/", "\\div"})
_CLOSER = {"(": ")", "{": "}", "[": "]"}
_ATOM_COMMANDS = frozenset({"\\frac", "\\sqrt", "\\binom", "\\pi", "\\infty", "\\lfloor", "\\lceil"})


class Unparsable(Exception):
    """The text is outside the subset (or over a size bound); compare it as a string."""


class _Inexact(Exception):
    """No exact rational value (a symbol, pi, an irrational root, a bound exceeded)."""


class _Undefined(Exception):
    """No value at this point (division by zero, overflow, a factorial of 2.5)."""


# --------------------------------------------------------------------------- parsing
class _Parser:
    """Recursive descent over tokens; nodes are tuples ``(kind, *children)``."""

    def __init__(self, tokens: list[str]):
        self.tokens = tokens
        self.pos = 0
        self.depth = 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise Unparsable("unexpected end")
        self.pos += 1
        return token

    def expect(self, token: str) -> None:
        if self.take() != token:
            raise Unparsable(f"expected {token}")

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise Unparsable("nested too deeply")

    def parse(self) -> tuple:
        node = self.expr()
        if self.pos != len(self.tokens):
            raise Unparsable(f"unexpected {self.peek()!r}")
        return node

    def expr(self) -> tuple:
        self.enter()
        terms = []
        sign = self.take() if self.peek() in ("+", "-") else "+"
        while True:
            term = self.term()
            terms.append(term if sign == "+" else ("neg", term))
            if self.peek() not in ("+", "-"):
                break
            sign = self.take()
        self.depth -= 1
        return terms[0] if len(terms) == 1 else ("add", *terms)

    def starts_factor(self, token: str | None) -> bool:
        """Whether ``token`` can begin an implicitly multiplied factor (``2x``, ``3\\sqrt2``)."""
        if token is None:
            return False
        if token in ("(", "{") or (len(token) == 1 and token.isalpha()):
            return True
        return token in _ATOM_COMMANDS or token[1:] in _FUNCTIONS or token[1:] in _GREEK

    def term(self) -> tuple:
        node, integer_literal = self.factor()
        first = True
        while True:
            token = self.peek()
            if token in _MULTIPLY or token in _DIVIDE:
                self.take()
                rhs = self.signed_factor()
                node = ("mul" if token in _MULTIPLY else "div", node, rhs)
            elif self.starts_factor(token):
                # A number never follows implicitly: "2 3" or "x2" is not an expression.
                rhs, _ = self.factor()
                mixed = first and integer_literal and token == "\\frac" and _is_integer_fraction(rhs)
                node = ("add", node, rhs) if mixed else ("mul", node, rhs)  # 1\frac{1}{4} = 5/4
            else:
                return node
            first = False

    def signed_factor(self) -> tuple:
        if self.peek() in ("-", "+"):
            negative = self.take() == "-"
            node, _ = self.factor()
            return ("neg", node) if negative else node
        return self.factor()[0]

    def factor(self) -> tuple[tuple, bool]:
        """An atom with postfix ``!`` and ``^``; also says whether it is a bare integer literal."""
        node, integer_literal = self.atom()
        while self.peek() == "!":
            self.take()
            node, integer_literal = ("fact", node), False
        if self.peek() == "^":
            self.take()
            node, integer_literal = ("pow", node, self.signed_factor()), False
        return node, integer_literal

    def argument(self) -> tuple:
        """A command argument: ``{...}`` or one atom (``\\frac12`` is braced by normalisation)."""
        if self.peek() == "{":
            self.take()
            node = self.expr()
            self.expect("}")
            return node
        return self.atom()[0]

    def subscript(self) -> str:
        """The text of a subscript (``x_1``, ``x_{10}``, ``1112_3``): part of a name, not math."""
        self.expect("_")
        if self.peek() != "{":
            return self.take()
        self.take()
        parts = []
        while self.peek() != "}":
            parts.append(self.take())
        self.take()
        return "".join(parts)

    def atom(self) -> tuple[tuple, bool]:
        self.enter()
        token = self.take()
        integer_literal = False
        if _NUMBER.fullmatch(token):
            node = ("num", Fraction(token))
            integer_literal = "." not in token
            if self.peek() == "_":  # a numeral in another base: an opaque name, not a value
                node, integer_literal = ("sym", f"#{token}_{self.subscript()}"), False
        elif token in _CLOSER:
            node = self.expr()
            self.expect(_CLOSER[token])
        elif len(token) == 1 and token.isalpha():
            if self.peek() == "_":
                node = ("sym", f"{token}_{self.subscript()}")
            else:
                node = ("I",) if token == "i" else ("sym", token)
        elif token.startswith("\\") and len(token) > 2:
            node = self.command(token[1:])
        else:
            raise Unparsable(f"unexpected {token!r}")
        self.depth -= 1
        return node, integer_literal

    def command(self, name: str) -> tuple:
        if name == "frac":
            return ("div", self.argument(), self.argument())
        if name == "sqrt":
            index: tuple = ("num", Fraction(2))
            if self.peek() == "[":
                self.take()
                index = self.expr()
                self.expect("]")
            return ("root", self.argument(), index)
        if name == "binom":
            return ("binom", self.argument(), self.argument())
        if name == "pi":
            return ("pi",)
        if name == "infty":
            return ("inf",)
        if name in ("lfloor", "lceil"):
            node = self.expr()
            self.expect("\\rfloor" if name == "lfloor" else "\\rceil")
            return (name[1:], node)
        if name in _GREEK:
            return ("sym", name)
        if name in _FUNCTIONS:
            return self.function(name)
        raise Unparsable(f"unknown command \\{name}")

    def function(self, name: str) -> tuple:
        """``\\sin x``, ``\\sin(2x)``, ``\\sin^2 x``, ``\\log_2 8``: the argument of a bare
        function runs over juxtaposed factors (``\\sin 2x`` = sin(2x)) up to the next function."""
        base = power = None
        if name == "log" and self.peek() == "_":
            self.take()
            base = self.argument()
        if self.peek() == "^":
            self.take()
            power = self.signed_factor()
        if self.peek() in ("(", "{"):
            argument = self.atom()[0]
            if power is None and self.peek() == "^":  # \sin(x)^2 = (\sin x)^2
                self.take()
                power = self.signed_factor()
        else:
            argument = self.factor()[0]
            while self.starts_factor(self.peek()) and self.peek()[1:] not in _FUNCTIONS:
                argument = ("mul", argument, self.factor()[0])
        node = ("log", argument, base) if base is not None else ("fn", name, argument)
        return ("pow", node, power) if power is not None else node


def _is_integer_fraction(node: tuple) -> bool:
    return (
        node[0] == "div"
        and all(child[0] == "num" and child[1].denominator == 1 for child in node[1:])
    )


@functools.lru_cache(maxsize=1 << 16)
def parse(text: str) -> tuple | None:
    """The expression tree of a normalised LaTeX answer, or None when it is outside the subset."""
    if len(text) > MAX_CHARS or _WORD.search(text):
        return None
    try:
        return _Parser(_TOKEN.findall(text)).parse()
    except (Unparsable, ValueError, ZeroDivisionError):
        return None


# --------------------------------------------------------------------------- exact values
def _bounded(value: Fraction) -> Fraction:
    if max(value.numerator.bit_length(), value.denominator.bit_length()) > MAX_BITS:
        raise _Inexact("too large for exact arithmetic")
    return value


def _integer_root(n: int, k: int) -> int | None:
    """The exact k-th root of a non-negative integer, or None."""
    if n.bit_length() > 1000:
        return None
    root = math.isqrt(n) if k == 2 else round(n ** (1.0 / k))
    for candidate in (root - 1, root, root + 1):
        if candidate >= 0 and candidate**k == n:
            return candidate
    return None


def _exact_root(value: Fraction, k: int) -> Fraction:
    if k < 1 or k > 64:
        raise _Inexact("root index")
    sign = 1
    if value < 0:
        if k % 2 == 0:
            raise _Inexact("even root of a negative")
        sign, value = -1, -value
    top, bottom = _integer_root(value.numerator, k), _integer_root(value.denominator, k)
    if top is None or bottom is None:
        raise _Inexact("irrational root")
    return sign * Fraction(top, bottom)


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    if base == 0 and exponent < 0:
        raise _Undefined("0 to a negative power")
    if exponent.denominator != 1:
        base = _exact_root(base, exponent.denominator)
        exponent = Fraction(exponent.numerator)
    size = max(base.numerator.bit_length(), base.denominator.bit_length(), 1)
    if abs(exponent) * size > MAX_BITS:
        raise _Inexact("power too large for exact arithmetic")
    return base ** int(exponent)


def _integer(value: Fraction, limit: int) -> int:
    if value.denominator != 1 or not 0 <= value <= limit:
        raise _Undefined("needs a small non-negative integer")
    return int(value)


def exact_value(node: tuple) -> Fraction:
    """The exact rational value of a tree; raises _Inexact or _Undefined."""
    kind = node[0]
    if kind == "num":
        return node[1]
    if kind == "add":
        return _bounded(sum((exact_value(child) for child in node[1:]), Fraction(0)))
    if kind == "neg":
        return -exact_value(node[1])
    if kind == "mul":
        return _bounded(exact_value(node[1]) * exact_value(node[2]))
    if kind == "div":
        numerator, denominator = exact_value(node[1]), exact_value(node[2])
        if denominator == 0:
            raise _Undefined("division by zero")
        return _bounded(numerator / denominator)
    if kind == "pow":
        return _bounded(_power(exact_value(node[1]), exact_value(node[2])))
    if kind == "root":
        index = exact_value(node[2])
        if index.denominator != 1:
            raise _Inexact("root index")
        return _exact_root(exact_value(node[1]), int(index))
    if kind == "fact":
        return Fraction(math.factorial(_integer(exact_value(node[1]), MAX_FACTORIAL)))
    if kind == "binom":
        n = _integer(exact_value(node[1]), 10 * MAX_FACTORIAL)
        return Fraction(math.comb(n, _integer(exact_value(node[2]), n)))
    if kind in ("floor", "ceil"):
        value = exact_value(node[1])
        return Fraction(math.floor(value) if kind == "floor" else math.ceil(value))
    raise _Inexact(kind)


# --------------------------------------------------------------------------- numeric values
_CMATH = {
    "sin": cmath.sin, "cos": cmath.cos, "tan": cmath.tan,
    "cot": lambda z: 1 / cmath.tan(z), "sec": lambda z: 1 / cmath.cos(z), "csc": lambda z: 1 / cmath.sin(z),
    "arcsin": cmath.asin, "arccos": cmath.acos, "arctan": cmath.atan,
    "sinh": cmath.sinh, "cosh": cmath.cosh, "tanh": cmath.tanh,
    "ln": cmath.log, "log": cmath.log, "exp": cmath.exp,
}


def _real_integer(z: complex, limit: int) -> int:
    if z.imag != 0 or z.real != int(z.real) or not 0 <= z.real <= limit:
        raise _Undefined("needs a small non-negative integer")
    return int(z.real)


def numeric_value(node: tuple, point: dict[str, complex]) -> complex:
    """The complex value of a tree with symbols set from ``point``; raises _Undefined."""
    kind = node[0]
    if kind == "num":
        return complex(node[1])
    if kind == "sym":
        return point[node[1]]
    if kind == "I":
        return 1j
    if kind == "pi":
        return complex(math.pi)
    if kind == "inf":
        return complex(math.inf)
    if kind == "add":
        return sum((numeric_value(child, point) for child in node[1:]), 0j)
    if kind == "neg":
        return -numeric_value(node[1], point)
    if kind == "mul":
        return numeric_value(node[1], point) * numeric_value(node[2], point)
    if kind == "div":
        return numeric_value(node[1], point) / numeric_value(node[2], point)
    if kind == "pow":
        base, exponent = numeric_value(node[1], point), numeric_value(node[2], point)
        if abs(exponent) > 1e4 and abs(base) > 1:
            raise _Undefined("overflow")
        return base**exponent
    if kind == "root":
        value, index = numeric_value(node[1], point), numeric_value(node[2], point)
        if value.imag == 0 and value.real < 0 and index == round(index.real) and int(index.real) % 2:
            return -((-value) ** (1 / index))  # the real odd root: \sqrt[3]{-8} = -2
        return value ** (1 / index)
    if kind == "fn":
        return _CMATH[node[1]](numeric_value(node[2], point))
    if kind == "log":
        return cmath.log(numeric_value(node[1], point)) / cmath.log(numeric_value(node[2], point))
    if kind == "fact":
        return complex(math.factorial(_real_integer(numeric_value(node[1], point), 170)))
    if kind == "binom":
        n = _real_integer(numeric_value(node[1], point), 10 * MAX_FACTORIAL)
        return complex(math.comb(n, _real_integer(numeric_value(node[2], point), n)))
    if kind in ("floor", "ceil"):
        value = numeric_value(node[1], point).real
        return complex(math.floor(value) if kind == "floor" else math.ceil(value))
    raise _Undefined(kind)


def _symbols(node: tuple) -> set[str]:
    if node[0] == "sym":
        return {node[1]}
    return set().union(*(_symbols(child) for child in node[1:] if isinstance(child, tuple)))


def _point(names: set[str], trial: int) -> dict[str, complex]:
    """Reproducible generic values in [0.3, 2.7) (crc32, not hash(): hash() is salted per run)."""
    return {
        name: complex(0.3 + 2.4 * (zlib.crc32(f"{name}/{trial}".encode()) % 100_003) / 100_003)
        for name in names
    }


def _close(a: complex, b: complex) -> bool:
    if not (cmath.isfinite(a) and cmath.isfinite(b)):
        return a == b  # inf == inf, -inf == -inf; nan never
    return abs(a - b) <= max(REL_TOL * max(abs(a), abs(b)), ABS_TOL)


@functools.lru_cache(maxsize=1 << 16)
def trees_equal(a: tuple, b: tuple) -> bool | None:
    """Whether two trees have the same value: True, False, or None when undecidable here."""
    try:
        return exact_value(a) == exact_value(b)
    except (_Inexact, _Undefined, OverflowError, ValueError):
        pass
    names = _symbols(a) | _symbols(b)
    agreed = False
    for trial in range(TRIALS if names else 1):
        point = _point(names, trial)
        try:
            x, y = numeric_value(a, point), numeric_value(b, point)
        except (_Undefined, ArithmeticError, ValueError):
            continue  # e.g. a pole of both sides at this point: try the next one
        if cmath.isnan(x) or cmath.isnan(y):
            continue
        if not _close(x, y):
            return False
        agreed = True
    return True if agreed else None


def expressions_equal(a: str, b: str) -> bool | None:
    """Equality of two normalised LaTeX expressions; None when either is outside the subset."""
    tree_a, tree_b = parse(a), parse(b)
    if tree_a is None or tree_b is None:
        return None
    return trees_equal(tree_a, tree_b)
