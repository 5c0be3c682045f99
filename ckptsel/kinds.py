"""Measurement kinds: one explicit table of what is measured on a loaded checkpoint (ckptsel/DESIGN.md).

Each kind turns a loaded model and a list of examples into result-store records, one
``{uid: Record}`` per chunk of examples. Besides target NLL (``score``) and graded samples
(``sample``) they are the over-memorization proxies of :mod:`ckptsel.proxies`: perturbed-prompt
NLL, alternative-solution NLL and held-out NLL, measured while the checkpoint is loaded anyway.
:func:`ckptsel.collect.collect` plans which kinds a checkpoint lacks and runs them through
:func:`measure_chunks`, in this process or in a worker (ckptsel.execution).

A new kind is one entry in :data:`KINDS`. The functions import torch when called, not here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from ckptsel import proxies
from ckptsel.data import Example
from ckptsel.measure.context import MeasureContext
from ckptsel.settings import Recipe
from ckptsel.store import Record

log = logging.getLogger(__name__)


def _measure_scores(model, tokenizer, examples: Sequence[Example], recipe: Recipe,
                    ctx: MeasureContext) -> dict[str, Record]:
    """Teacher-forced target NLL and predictive entropy (ckptsel/DESIGN.md: target NLL)."""
    return _score_records(model, tokenizer, examples, recipe, ctx, routers=False)


def _measure_scores_and_routes(
    model, tokenizer, examples: Sequence[Example], recipe: Recipe, ctx: MeasureContext
) -> dict[str, Record]:
    """Target NLL as :func:`_measure_scores`, plus MoE routing read off the same forward pass.

    Per example (MoE checkpoints only), for the pathway metrics of :mod:`ckptsel.pathways`:
    ``array``, the router softmax averaged over the target tokens, ``(layers, experts)``
    float16 (three digits are plenty to order experts and cut at 0.8, at half the bytes);
    ``data["layer_cos"]``, the cosines between consecutive layers' routing-weighted gate
    vectors, computed here at full precision so the checkpoint's gate weights need not be
    stored. A model whose routers cannot be found stores an empty array, so it is not
    re-measured on every run.
    """
    return _score_records(model, tokenizer, examples, recipe, ctx, routers=True)


def _score_records(model, tokenizer, examples, recipe: Recipe, ctx: MeasureContext, *,
                   routers: bool) -> dict[str, Record]:
    import numpy as np

    from ckptsel.measure.routers import declares_experts
    from ckptsel.measure.scoring import score_targets
    from ckptsel.pathways import layer_cosines

    result = score_targets(
        model,
        tokenizer,
        [ex.prompt for ex in examples],
        [ex.target for ex in examples],
        append_eos=recipe.data.append_eos,
        ends=[ex.end_of_turn for ex in examples],  # realmodel: a chat template's end of turn, as TRL trains it
        batch_size=ctx.engine.batch_size,
        routers=routers,
    )
    weights, cosines = result.router_weights, None
    routed = routers and declares_experts(model)  # dense checkpoints: records as before
    if weights is not None:
        cosines = layer_cosines(weights, result.gate_vectors)
    elif routed:
        log.warning("%s: no router modules found; no pathway metrics for it", type(model).__name__)
    out = {}
    for i, ex in enumerate(examples):
        record = Record(nll=float(result.nll[i]), n_tokens=int(result.n_tokens[i]), entropy=float(result.entropy[i]),
                        peak_nll=float(result.peak_nll[i]))
        if routed:
            array = weights[i].astype(np.float16) if weights is not None else np.zeros(0, np.float16)
            data = {"layer_cos": cosines[i].tolist()} if cosines is not None else None
            record = replace(record, array=array, data=data)
        out[ex.uid] = record
    return out


def _measure_samples(model, tokenizer, examples: Sequence[Example], recipe: Recipe,
                     ctx: MeasureContext) -> dict[str, Record]:
    """k graded samples per question (ckptsel/DESIGN.md: sampled accuracy and copy rate)."""
    from ckptsel.measure.sampling import TransformersSampler, copy_rate

    grader = ctx.grader
    prompts = [ex.prompt for ex in examples]
    request = {
        "sampling": recipe.sampling,
        "max_new_tokens": [ctx.budgets[ex.uid] for ex in examples],
        "keys": [ex.uid for ex in examples],
    }
    # --backend vllm: the checkpoint's vLLM engine (see VllmSampler.use)
    sampler = ctx.vllm if ctx.vllm is not None else TransformersSampler(ctx.engine.batch_size)
    completions = sampler.sample(model, tokenizer, prompts, **request)
    out = {}
    for ex, samples in zip(examples, completions):
        correct = sum(bool(grader(text, ex.reference)) for text in samples)
        out[ex.uid] = Record(
            acc=correct / len(samples), copy_rate=copy_rate(samples, ex.target), samples=tuple(samples)
        )
    return out


MeasureFn = Callable[..., dict[str, Record]]


@dataclass(frozen=True)
class Kind:
    """A measurement kind: function(model, tokenizer, examples, recipe, ctx: MeasureContext) -> {uid: Record}.

    ``chunk``: examples per stored batch (small enough that a crash loses little, large
    enough to batch well). ``examples``: the training examples, or the ``--heldout`` ones.
    ``routes``: ``measure`` stores MoE routing weights; see :func:`_measure_scores_and_routes`.
    """

    measure: MeasureFn
    chunk: int
    examples: Literal["train", "heldout"] = "train"
    # MoE checkpoints: records need an array (routing weights); rows stored without one are re-measured.
    routes: bool = False
    # A numeric record field the recipe needs; rows stored without it (older ckptsel) are re-measured.
    requires: Callable[[Recipe], str | None] = lambda recipe: None


def _peak_if_ruled(recipe: Recipe) -> str | None:
    """Target scores need ``peak_nll`` under the ``peak-nll`` memorisation rule (stores before it lack it)."""
    return "peak_nll" if recipe.memorization.rule == "peak-nll" else None


KINDS: dict[str, Kind] = {
    "score": Kind(_measure_scores_and_routes, 256, routes=True, requires=_peak_if_ruled),
    "sample": Kind(_measure_samples, 32),
    "perturb": Kind(proxies.measure_perturbed, 128),  # len(perturbations) pairs per example
    "alt": Kind(proxies.measure_alternatives, 256),  # after "sample": harvested from samples
    "heldout": Kind(_measure_scores, 256, examples="heldout"),  # the held-out file's references
}
DEFAULT_KINDS = tuple(KINDS)


def measure_chunks(model, tokenizer, kind: str, todo: Sequence[Example], recipe: Recipe,
                   ctx: MeasureContext) -> Iterator[dict[str, Record]]:
    """``kind``'s records for ``todo``, one chunk of :attr:`Kind.chunk` examples at a time."""
    size = KINDS[kind].chunk
    for start in range(0, len(todo), size):
        yield KINDS[kind].measure(model, tokenizer, todo[start : start + size], recipe, ctx)

