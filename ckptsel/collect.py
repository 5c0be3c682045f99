"""Measure every checkpoint on the training examples, into the result store.

This is the one loop over checkpoints (DESIGN.md, "How a run flows")::

    for each checkpoint (loaded once; adapters hot-swapped on one base):
        for each measurement kind: what the store lacks  ->  measure in chunks  ->  store

A checkpoint whose results are all stored is never loaded, so re-ranking a run after one
new save costs one checkpoint. Results are written one chunk per transaction: a crash or
``kill -9`` loses at most the chunk in flight, and the rerun computes exactly what is
missing. Samples are seeded per (example uid, sample index), so a resumed run equals an
uninterrupted one.

Measurement kinds are an explicit table (:data:`KINDS`); each turns a loaded model and a
list of examples into store records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ckptsel.data import Example
from ckptsel.discover import Checkpoint, fingerprint
from ckptsel.errors import CheckpointError
from ckptsel.settings import EngineSettings, Recipe, SelectionSettings
from ckptsel.store import Record, Store

log = logging.getLogger(__name__)

# Examples per stored chunk: small enough that a crash loses little, large enough to batch well.
CHUNK = {"score": 256, "sample": 32}


@dataclass(frozen=True)
class Progress:
    """One step of progress, for the CLI's bar: ``done`` of ``total`` work units in a phase."""

    checkpoint: Checkpoint
    index: int  # position of the checkpoint in the run
    phase: str  # "load", a measurement kind, or "cached"
    done: int
    total: int


@dataclass
class Collected:
    """What :func:`collect` measured: one fingerprint per checkpoint (None when it failed)."""

    checkpoints: list[Checkpoint]
    fingerprints: list[str | None]
    settings_key: str
    examples: list[Example]
    failures: dict[int, str] = field(default_factory=dict)  # checkpoint index -> one-line reason
    loaded: int = 0  # checkpoints that had to be loaded (the rest came from the store)
    base_loads: int = 0  # base models loaded for adapter checkpoints (one per distinct base)


# --------------------------------------------------------------------------- measurement kinds


def _measure_scores(model, tokenizer, examples: Sequence[Example], recipe: Recipe, ctx: dict) -> dict[str, Record]:
    """Teacher-forced target NLL and predictive entropy (DESIGN.md: target NLL)."""
    from ckptsel.measure.scoring import score_targets

    result = score_targets(
        model,
        tokenizer,
        [ex.prompt for ex in examples],
        [ex.target for ex in examples],
        append_eos=recipe.data.append_eos,
        batch_size=ctx["engine"].batch_size,
    )
    return {
        ex.uid: Record(nll=float(result.nll[i]), n_tokens=int(result.n_tokens[i]), entropy=float(result.entropy[i]))
        for i, ex in enumerate(examples)
    }


def _measure_samples(model, tokenizer, examples: Sequence[Example], recipe: Recipe, ctx: dict) -> dict[str, Record]:
    """k graded samples per question (DESIGN.md: sampled accuracy and copy rate)."""
    from ckptsel.measure.sampling import copy_rate, sample_completions

    grader = ctx["grader"]
    completions = sample_completions(
        model,
        tokenizer,
        [ex.prompt for ex in examples],
        sampling=recipe.sampling,
        max_new_tokens=[ctx["budgets"][ex.uid] for ex in examples],
        keys=[ex.uid for ex in examples],
        batch_size=ctx["engine"].batch_size,
    )
    out = {}
    for ex, samples in zip(examples, completions):
        correct = sum(bool(grader(text, ex.reference)) for text in samples)
        out[ex.uid] = Record(
            acc=correct / len(samples), copy_rate=copy_rate(samples, ex.target), samples=tuple(samples)
        )
    return out


MeasureFn = Callable[..., dict[str, Record]]

# kind -> function(model, tokenizer, examples, recipe, ctx) -> {uid: Record}
KINDS: dict[str, MeasureFn] = {
    "score": _measure_scores,
    "sample": _measure_samples,
}


# --------------------------------------------------------------------------- planning


def select_examples(examples: list[Example], selection: SelectionSettings) -> list[Example]:
    """The fixed subset every checkpoint is measured on (file order kept; duplicates by uid dropped).

    Duplicate rows render to the same (prompt, target), so they share one uid and one measurement.
    """
    unique = list({ex.uid: ex for ex in examples}.values())
    if selection.max_examples is None or selection.max_examples >= len(unique):
        return unique
    picked = random.Random(selection.examples_seed).sample(range(len(unique)), selection.max_examples)
    return [unique[i] for i in sorted(picked)]


PER_EXAMPLE_BUDGET = "per-example: ceil(1.5 x target tokens) + 16"


def budgets(tokenizer, examples: Sequence[Example], recipe: Recipe) -> dict[str, int]:
    """Sampling budget per example uid: the recipe's fixed one, or sized to that example's target.

    A per-example budget keeps each example's samples independent of which other examples are
    measured (``--max-examples`` can change without invalidating the store) and stops a
    rambling early checkpoint as soon as it is clearly past the target's length.
    """
    if recipe.sampling.max_new_tokens is not None:
        return {ex.uid: recipe.sampling.max_new_tokens for ex in examples}
    from ckptsel.measure.sampling import max_new_tokens_for

    ids = tokenizer([ex.target for ex in examples], add_special_tokens=False)["input_ids"]
    return {ex.uid: max_new_tokens_for([len(t) + recipe.data.append_eos]) for ex, t in zip(examples, ids)}


def settings_key(recipe: Recipe, engine: EngineSettings) -> str:
    """Everything that changes a stored number: rendering, sampling and its budget rule, the dtype."""
    from ckptsel.measure.loading import resolve_device, resolve_dtype

    dtype = str(resolve_dtype(engine.dtype, resolve_device(engine.device))).removeprefix("torch.")
    budget = recipe.sampling.max_new_tokens or PER_EXAMPLE_BUDGET
    payload = {"recipe": recipe.measurement_key(), "dtype": dtype, "max_new_tokens": budget}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def fingerprints(checkpoints: Sequence[Checkpoint], store: Store) -> list[str | None]:
    """Content fingerprints, cached in the store by (path, total size, newest mtime)."""
    out: list[str | None] = []
    for ckpt in checkpoints:
        if ckpt.kind == "error":
            out.append(None)
            continue
        files = [p for p in ckpt.path.iterdir() if p.is_file()]
        size = sum(p.stat().st_size for p in files)
        mtime = max((p.stat().st_mtime_ns for p in files), default=0)
        cached = store.get_fingerprint(ckpt.path, size, mtime)
        if cached is None:
            cached = fingerprint(ckpt)
            store.put_fingerprint(ckpt.path, size, mtime, cached)
        out.append(cached)
    return out


# --------------------------------------------------------------------------- the loop


def collect(
    checkpoints: Sequence[Checkpoint],
    examples: Sequence[Example],
    recipe: Recipe,
    store: Store,
    *,
    tokenizer,
    engine: EngineSettings = EngineSettings(),
    kinds: Sequence[str] = ("score", "sample"),
    on_progress: Callable[[Progress], None] | None = None,
) -> Collected:
    """Measure ``kinds`` for every checkpoint × example the store does not hold yet.

    ``tokenizer`` (the run's: see :func:`ckptsel.measure.loading.load_tokenizer`) sizes the
    sampling budgets. One checkpoint
    failing to load or measure is recorded in ``Collected.failures``; the others go on.
    """
    from ckptsel import graders
    from ckptsel.measure.loading import CheckpointLoader

    checkpoints = list(checkpoints)
    examples = list(examples)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown measurement kinds {unknown}; known: {sorted(KINDS)}")
    ctx = {"engine": engine, "grader": graders.get(recipe.data.grader)}
    ctx["budgets"] = budgets(tokenizer, examples, recipe)
    key = settings_key(recipe, engine)
    fps = fingerprints(checkpoints, store)
    result = Collected(checkpoints, fps, key, examples)
    for i, ckpt in enumerate(checkpoints):
        if ckpt.kind == "error":
            result.failures[i] = ckpt.error or "unreadable checkpoint"

    uids = [ex.uid for ex in examples]
    by_uid = {ex.uid: ex for ex in examples}

    def todo(i: int) -> dict[str, list[str]]:
        return {kind: store.missing(fps[i], key, kind, uids) for kind in kinds}

    pending = [i for i in range(len(checkpoints)) if fps[i] is not None]
    with CheckpointLoader(
        engine.device, engine.dtype, trust_remote_code=engine.trust_remote_code, allow_pickle=engine.allow_pickle
    ) as loader:
        for i in pending:
            ckpt = checkpoints[i]
            work = todo(i)
            if not any(work.values()):
                _emit(on_progress, ckpt, i, "cached", len(uids), len(uids))
                store.register_checkpoint(fps[i], ckpt.path, ckpt.step)
                continue
            _emit(on_progress, ckpt, i, "load", 0, 1)
            try:
                loaded = loader.load(ckpt)
                result.loaded += 1
                store.register_checkpoint(fps[i], ckpt.path, ckpt.step)
                for kind in kinds:
                    missing = work[kind]
                    size = CHUNK.get(kind, 64)
                    done = len(uids) - len(missing)
                    _emit(on_progress, ckpt, i, kind, done, len(uids))
                    for start in range(0, len(missing), size):
                        chunk = [by_uid[u] for u in missing[start : start + size]]
                        records = KINDS[kind](loaded.model, loaded.tokenizer, chunk, recipe, ctx)
                        store.put_many(fps[i], key, kind, records)
                        done += len(chunk)
                        _emit(on_progress, ckpt, i, kind, done, len(uids))
            except CheckpointError as err:
                result.failures[i] = str(err)
                log.info("%s", err)
            except Exception as exc:  # one bad checkpoint must not lose the others' results
                reason = f"{ckpt.path}: measurement failed: {type(exc).__name__}: {exc}".splitlines()[0]
                result.failures[i] = reason
                log.info("%s", reason)
        result.base_loads = loader.base_loads
    return result


def _emit(callback, ckpt, index, phase, done, total) -> None:
    if callback is not None:
        callback(Progress(ckpt, index, phase, done, total))
