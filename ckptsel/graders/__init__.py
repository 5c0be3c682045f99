"""Answer graders: does a completion reach the reference answer?

INTERFACE (other modules rely on it; keep these names):

    get(name) -> Grader        ``grader(completion, reference) -> bool``; ``grader.extract(text)``
    names() -> list[str]       the built-in names (``get`` also takes ``regex:<pattern>`` and
                               ``python:module:function``)

``reference`` is the dataset's target solution text or a bare answer; both texts go through
the grader's ``extract``, and the two answers are compared under the grader's rules.

One explicit table below; nothing registers itself by being imported. ``python:`` graders
import the named module only when asked for.
"""

from __future__ import annotations

from collections.abc import Callable

from ckptsel.errors import CkptselError
from ckptsel.graders.base import ExactGrader, Grader, RegexGrader, load_function_grader
from ckptsel.graders.latex import MathGrader
from ckptsel.graders.numeric import GSM8KGrader, NumberGrader
from ckptsel.graders.steps import StepGrader

__all__ = ["Grader", "get", "names"]

GRADERS: dict[str, Callable[[], Grader]] = {
    "exact": ExactGrader,  # stripped string equality
    "gsm8k": GSM8KGrader,  # #### N / "The answer is N" / last number; exact numeric equality
    "lab-steps": StepGrader,  # the lab's rewrite traces: right answer and every step valid
    "math": MathGrader,  # last \boxed{} / "The answer is: X"; LaTeX answer equivalence
    "number": NumberGrader,  # last number; exact numeric equality
}

# Graders that take an argument after the first colon.
PARAMETRISED: dict[str, Callable[[str], Grader]] = {
    "regex": RegexGrader,  # regex:<pattern>
    "python": load_function_grader,  # python:module:function
}


def names() -> list[str]:
    """The built-in grader names (``regex:<pattern>`` and ``python:module:function`` come on top)."""
    return sorted(GRADERS)


def get(name: str) -> Grader:
    """The grader called ``name``; an unknown name raises CkptselError listing the known ones."""
    if name in GRADERS:
        return GRADERS[name]()
    prefix, sep, argument = name.partition(":")
    if sep and prefix in PARAMETRISED:
        return PARAMETRISED[prefix](argument)
    known = ", ".join([*names(), "regex:<pattern>", "python:module:function"])
    raise CkptselError(f"unknown grader {name!r}; known graders: {known}")
