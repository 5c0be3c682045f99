"""What a grader is, and the graders that need no parsing of mathematics.

A grader answers one question many times: does this completion reach the reference answer?
ckptsel asks it k samples x thousands of examples x tens of checkpoints, so graders are
plain objects with no per-call setup, and the expensive parts (extraction, normalisation)
sit behind module-level caches: the same reference is graded k times per checkpoint.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Callable

from ckptsel.errors import CkptselError


class Grader:
    """``grader(completion, reference) -> bool``, plus ``grader.extract(text) -> str | None``.

    Both texts go through the same :meth:`extract` (a reference may be a full solution or a
    bare answer), and the two answers are compared with :meth:`equivalent`. A text with no
    answer in it never grades True, not even against another text with no answer.
    """

    name: str = "grader"

    def extract(self, text: str) -> str | None:
        """The final answer in ``text``, or None when it has none."""
        raise NotImplementedError

    def equivalent(self, answer: str, reference_answer: str) -> bool:
        """Whether two extracted answers are the same answer under this grader's rules."""
        return answer == reference_answer

    def __call__(self, completion: str, reference: str) -> bool:
        expected = self.extract(reference)
        if expected is None:
            return False
        got = self.extract(completion)
        return got is not None and self.equivalent(got, expected)

    def __repr__(self) -> str:
        return f"<grader {self.name}>"


class ExactGrader(Grader):
    """Stripped string equality: for tasks whose answer is the whole completion."""

    name = "exact"

    def extract(self, text: str) -> str | None:
        stripped = text.strip()
        return stripped or None


class RegexGrader(Grader):
    """``regex:<pattern>``: the LAST match in the text; its first capture group, else the match.

    The last match, because a chain of thought states intermediate results before the final
    one. Answers compare as stripped strings.
    """

    def __init__(self, pattern: str):
        if not pattern:
            raise CkptselError("grader 'regex:': the pattern is empty; write regex:<pattern>")
        try:
            self.pattern = re.compile(pattern)
        except re.error as exc:
            raise CkptselError(f"grader 'regex:{pattern}': invalid regular expression: {exc}") from None
        self.name = f"regex:{pattern}"

    def extract(self, text: str) -> str | None:
        last = None
        for last in self.pattern.finditer(text):
            pass
        if last is None:
            return None
        answer = last.group(1) if self.pattern.groups else last.group(0)
        if answer is None:  # the capture group did not take part in the last match
            return None
        return answer.strip()


class FunctionGrader(Grader):
    """``python:module:function``: a user's callable ``(completion, reference) -> bool``.

    When the callable has an ``extract`` attribute it is used (so ``ckptsel data`` can show
    what the grader reads); otherwise a text's answer is the text itself, stripped.
    """

    def __init__(self, name: str, function: Callable[[str, str], bool]):
        self.name = name
        self.function = function
        self._extract = getattr(function, "extract", None)

    def extract(self, text: str) -> str | None:
        if self._extract is not None:
            return self._extract(text)
        stripped = text.strip()
        return stripped or None

    def __call__(self, completion: str, reference: str) -> bool:
        return bool(self.function(completion, reference))


def load_function_grader(spec: str) -> FunctionGrader:
    """Import ``module:function`` (a dotted attribute path is allowed) only now that it is named."""
    name = f"python:{spec}"
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise CkptselError(f"grader '{name}': write python:module:function (e.g. python:mypkg.grading:is_correct)")
    try:
        target = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of user code is the user's input error
        raise CkptselError(f"grader '{name}': cannot import module '{module_name}': {exc}") from None
    try:
        function = functools.reduce(getattr, attribute.split("."), target)
    except AttributeError:
        raise CkptselError(f"grader '{name}': module '{module_name}' has no attribute '{attribute}'") from None
    if not callable(function):
        raise CkptselError(f"grader '{name}': '{attribute}' is not callable")
    return FunctionGrader(name, function)
