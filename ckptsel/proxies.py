"""Over-memorization proxies: what a checkpoint pays for valid text it was not trained on.

Ruan et al. (2025, arXiv 2508.04117) see over-memorization as the perplexity of *held-out
reference solutions* rising while accuracy stays high. ckptsel/DESIGN.md asks for the same signal
without a test set; this module holds the measurement kinds that ``ckptsel.kinds`` lists and ``ckptsel.collect`` runs
on each loaded checkpoint (one load, the same pass as target NLL and sampling):

``perturb``  target NLL under neutral prompt perturbations (:data:`PERTURBATIONS`). Stored
             per example as the mean over the perturbations (``nll``) and each one (``data``).
             The *perturbation gap* is that minus the plain target NLL.
``alt``      NLL of an *alternative solution*: a correct sample of the same training
             question that differs from the training target (after
             :func:`~ckptsel.measure.sampling.normalize_solution`), harvested once from the
             run's earliest checkpoints (:class:`Harvest`) and scored under every checkpoint.
The other two signals need nothing of their own: the predictive entropy over target tokens
comes with the plain target scoring (``score``), and the held-out NLL (``--heldout``) is that
same scoring run on the held-out file's examples (``ckptsel.kinds.KINDS["heldout"]``).

Perturbations are applied to the *rendered* prompt text, so they work for any template:

* ``preamble``: a neutral first paragraph, ``"Here is a problem.\\n\\n"``, before the prompt;
* ``format``: a blank line between the prompt's lines (each line break doubled; a one-line
  prompt gets a leading blank line instead), the words untouched;
* ``instruction``: the line ``"Solve it step by step."`` inserted before the prompt's last
  line (before ``Answer:`` in ``"Question: ...\\nAnswer:"``), or after a one-line prompt.

They are neutral: a model that has learnt the task answers the same; one that keys its
memorised solutions on the exact prompt string pays for them. With a chat template the
last line is the assistant header, so the instruction lands between the turns: still a
perturbation, no longer inside the user's message.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ckptsel.data import Example
from ckptsel.settings import ProxySettings, Recipe
from ckptsel.store import Record

if TYPE_CHECKING:
    from ckptsel.measure.context import MeasureContext

PREAMBLE = "Here is a problem.\n\n"
INSTRUCTION = "Solve it step by step."


def _preamble(prompt: str) -> str:
    return PREAMBLE + prompt


def _format(prompt: str) -> str:
    return prompt.replace("\n", "\n\n") if "\n" in prompt else "\n" + prompt


def _instruction(prompt: str) -> str:
    body = prompt.rstrip()
    tail = prompt[len(body) :]
    head, newline, last = body.rpartition("\n")
    if newline:
        return f"{head}\n{INSTRUCTION}\n{last}{tail}"
    return f"{body}\n{INSTRUCTION}{tail}"


# name -> function(rendered prompt) -> perturbed prompt. One explicit table.
PERTURBATIONS: dict[str, Callable[[str], str]] = {
    "preamble": _preamble,
    "format": _format,
    "instruction": _instruction,
}

_PROBE = "Question: 2+2?\nAnswer:"  # fixed text whose perturbations identify the perturbation set


def perturb_series(names: Sequence[str]) -> str:
    """Store kind of the perturbed-NLL series: ``perturb:`` + a hash of what the perturbations do.

    Hashing their output on a probe prompt (not just their names) means editing a
    perturbation's text can never reuse numbers measured with the old one.
    """
    unknown = [n for n in names if n not in PERTURBATIONS]
    if unknown:
        raise ValueError(f"unknown perturbations {unknown}; known: {', '.join(PERTURBATIONS)}")
    probe = [[n, PERTURBATIONS[n](_PROBE), PERTURBATIONS[n](_PROBE + "\n")] for n in names]
    return "perturb:" + hashlib.sha256(json.dumps(probe).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- measurement kinds


def measure_perturbed(model, tokenizer, examples: Sequence[Example], recipe: Recipe,
                      ctx: MeasureContext) -> dict[str, Record]:
    """Target NLL under each perturbation, all (example, perturbation) pairs in one batched call."""
    from ckptsel.measure.scoring import encode_pairs, score_token_pairs

    names = ctx.proxies.perturbations
    prompts = [PERTURBATIONS[n](ex.prompt) for ex in examples for n in names]
    targets = [ex.target for ex in examples for _ in names]
    ends = [ex.end_of_turn for ex in examples for _ in names]
    pairs = encode_pairs(tokenizer, prompts, targets, append_eos=recipe.data.append_eos, ends=ends)
    nll = score_token_pairs(model, pairs, batch_size=ctx.engine.batch_size).nll.reshape(len(examples), len(names))
    return {
        ex.uid: Record(nll=float(row.mean()), data={n: float(v) for n, v in zip(names, row)})
        for ex, row in zip(examples, nll)
    }


def measure_alternatives(model, tokenizer, examples: Sequence[Example], recipe: Recipe,
                      ctx: MeasureContext) -> dict[str, Record]:
    """NLL of each example's harvested alternative solution (examples without one are not asked)."""
    from ckptsel.measure.scoring import score_targets

    harvest = ctx.harvest
    result = score_targets(
        model,
        tokenizer,
        [ex.prompt for ex in examples],
        [harvest.solution(ex.uid) for ex in examples],
        append_eos=recipe.data.append_eos,
        ends=[ex.end_of_turn for ex in examples],
        batch_size=ctx.engine.batch_size,
    )
    return {ex.uid: Record(nll=float(result.nll[i]), n_tokens=int(result.n_tokens[i])) for i, ex in enumerate(examples)}


def alternative_solution(
    samples: Sequence[str], correct: Sequence[bool], target: str, min_accuracy: float = 0.0
) -> str | None:
    """The first correct sample that is not the training target after normalisation; None if none is.

    None as well when fewer than ``min_accuracy`` of the samples are correct: a checkpoint
    that gets a question right once in k tries has likely reached the answer through a
    broken trace (seen on the lab: early checkpoints write wrong steps and a lucky final
    number), and such a text is no valid solution to measure the model against.
    """
    from ckptsel.measure.text import normalize_solution

    if not samples or sum(map(bool, correct)) / len(samples) < min_accuracy:
        return None
    want = normalize_solution(target)
    for text, ok in zip(samples, correct):
        if ok and normalize_solution(text) != want and text.strip():
            return text
    return None


@dataclass
class Harvest:
    """The run's alternative-solution set: the checkpoints it came from, and one solution per example.

    Why harvested from the *earliest* checkpoints and then fixed: those samples were drawn
    before the model had memorised its targets, and scoring the *same* texts under every
    checkpoint makes the values comparable along the run (a set that grew with each new
    checkpoint would move the proxy by itself).

    Ordering, so that each checkpoint is loaded once in the common case: checkpoints are
    measured in training order, sampling before alternative scoring. Once the first
    checkpoint's samples exist it is harvested; if ``alt_min_coverage`` of the examples then
    have an alternative (the common case) the set is fixed at once, and the same loaded model
    scores it, as does every later checkpoint. If not, the next checkpoints are harvested too,
    until the coverage is reached or ``alt_max_sources`` checkpoints have contributed (one
    without any correct sample does not count), and every checkpoint measured before the set
    was fixed is loaded once more at the end of the run for its alternative scores. A set
    still open after every checkpoint of this run is not used (the proxy is not reported
    yet); the next run, with more checkpoints, goes on harvesting where this one stopped.

    Two things to know when reading the proxy. A source checkpoint scores its own samples best
    (on the lab 10-50% lower than its neighbours do), so the ranking leaves each checkpoint's own
    alternatives out of its value (:meth:`source_of`; ``ckptsel.sweep.RunArrays.alt_source_of``). And a
    sample graded correct by its final answer can still have wrong steps; a weak early model
    writes many such (on the lab most of them), and the NLL of a broken trace rises as the
    model learns the steps, not because it over-memorises. ``alt_min_accuracy`` keeps out the
    questions a source answers only by luck, and ``ProxySettings.alt_grader`` takes a stricter
    grader that checks the steps where one exists.

    A fixed set is stored (``Store.put_value``) under :func:`ckptsel.store_keys.alt_harvest` and reused by later runs:
    adding checkpoints never changes it. An example's solution is the first correct,
    non-target sample in source order (from a source that answers the question reliably:
    ``alt_min_accuracy``), decided only once the example has been looked at in
    every source: a function of the sources' seeded, stored samples. An example that joins
    later (a larger ``--max-examples``) is looked up in the same sources, and a solution, once
    chosen, never changes.
    """

    sources: list[str] = field(default_factory=list)  # checkpoint fingerprints, training order
    # source fingerprint -> example uid -> its first correct non-target sample, or None
    found: dict[str, dict[str, str | None]] = field(default_factory=dict)
    fixed: bool = False

    @classmethod
    def from_json(cls, value: Mapping) -> Harvest:
        return cls(sources=list(value["sources"]), found={k: dict(v) for k, v in value["found"].items()},
                   fixed=bool(value["fixed"]))

    def to_json(self) -> dict:
        return {"sources": self.sources, "found": self.found, "fixed": self.fixed}

    @property
    def series(self) -> str:
        """Store kind of the alternative-NLL series: ``alt:`` + a hash of the source checkpoints.

        The sources determine every example's solution, so they identify the texts scored.
        """
        return "alt:" + hashlib.sha256("\n".join(self.sources).encode()).hexdigest()[:12]

    def solution(self, uid: str) -> str | None:
        """The example's alternative solution; None when it has none (or is not looked up everywhere yet)."""
        for source in self.sources:
            if uid not in self.found[source]:
                return None
            if (text := self.found[source][uid]) is not None:
                return text
        return None

    def source_of(self, uid: str) -> str | None:
        """The fingerprint of the checkpoint whose sample is the example's alternative solution (None: none)."""
        for source in self.sources:
            if uid not in self.found[source]:
                return None
            if self.found[source][uid] is not None:
                return source
        return None

    def solutions(self, uids: Iterable[str]) -> dict[str, str]:
        """uid -> alternative solution, for the ``uids`` that have one."""
        return {u: text for u in uids if (text := self.solution(u)) is not None}

    def coverage(self, uids: Iterable[str]) -> float:
        """Fraction of ``uids`` that have an alternative solution."""
        uids = list(uids)
        return len(self.solutions(uids)) / len(uids) if uids else 0.0

    def harvest(self, fingerprint: str, records: Mapping[str, Record], examples: Sequence[Example], grader,
                min_accuracy: float = 0.0) -> int:
        """Look up, in one checkpoint's sample records, the examples not yet looked up there.

        On an open set the checkpoint becomes a source if it has at least one alternative
        solution (a checkpoint with no correct sample, early in training, neither helps nor
        uses up ``alt_max_sources``); a fixed set only reads its own sources. Returns how many
        examples were looked up (0: nothing changed).
        """
        if fingerprint not in self.sources and self.fixed:
            return 0
        seen = self.found.get(fingerprint, {})
        looked_up = 0
        for ex in examples:
            record = records.get(ex.uid)
            if ex.uid in seen or record is None or record.samples is None:
                continue
            correct = [bool(grader(text, ex.reference)) for text in record.samples]
            seen[ex.uid] = alternative_solution(record.samples, correct, ex.target, min_accuracy)
            looked_up += 1
        if fingerprint not in self.sources:
            if not any(text is not None for text in seen.values()):
                return 0
            self.sources.append(fingerprint)
        self.found[fingerprint] = seen
        return looked_up

    def decide(self, uids: Sequence[str], proxies: ProxySettings) -> bool:
        """Fix an open set that covers enough examples or has ``alt_max_sources`` sources; returns ``fixed``."""
        if not self.fixed and self.sources:
            enough = self.coverage(uids) >= proxies.alt_min_coverage
            self.fixed = enough or len(self.sources) >= proxies.alt_max_sources
        return self.fixed
