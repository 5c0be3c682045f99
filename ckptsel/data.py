"""Training data: load rows, detect fields, render (prompt, target) exactly as in training.

INTERFACE (other modules rely on it; keep these names and fields):

    Example                    one rendered training example (below)
    load_examples(path, recipe, tokenizer=None, skip_bad=False) -> list[Example]
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """One training example, rendered exactly as the trainer saw it.

    ``prompt`` and ``target`` are text; the EOS token (when the recipe appends it) is added
    as a token id at tokenisation time, not as text. ``reference`` is the raw target
    solution handed to the grader. ``uid`` is a content hash of (prompt, target), stable
    across runs and file reorderings, used as the result-store key.
    """

    index: int
    uid: str
    question: str
    reference: str
    prompt: str
    target: str
