"""Measure test accuracy of checkpoints with lm-eval, through the result store.

Local test file: every (checkpoint, test question) result is a store record (kind
``"verify"``; the settings key holds the rendering, sampling, budget and dtype), so a rerun
loads no model, a larger ``--limit`` evaluates only the new questions, and one bad
checkpoint does not lose the others. Named lm-eval tasks: lm-eval owns the documents, so the
store keeps each task's summary and per-document values per checkpoint and settings.

Each checkpoint's summary also goes to the store's key-value table under
``verify/<fingerprint>`` (one entry per settings key; :mod:`ckptsel.store_keys`), which is where ``ckptsel report``
finds measured accuracy to put beside the prediction.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import TYPE_CHECKING

import numpy as np

from ckptsel import store_keys
from ckptsel.data import Example
from ckptsel.discover import Checkpoint
from ckptsel.errors import CheckpointError, CkptselError
from ckptsel.execution import Executor, InProcessExecutor
from ckptsel.fingerprints import fingerprints
from ckptsel.progress import ProgressFn, emit
from ckptsel.settings import EngineSettings, Recipe, SamplingSettings
from ckptsel.store import Record, Store, StoreError
from ckptsel.verify import compare, harness

if TYPE_CHECKING:
    from ckptsel.select import Ranking

log = logging.getLogger(__name__)

KIND = "verify"


@dataclass
class Measured:
    """One checkpoint's measured test accuracy, with the prediction beside it when one was given."""

    index: int
    path: str
    step: int | None
    fingerprint: str | None
    accuracy: float | None = None
    ci: tuple[float | None, float | None] = (None, None)
    n: int = 0
    from_cache: bool = False
    predicted: float | None = None
    predicted_ci: tuple[float | None, float | None] | None = None
    error: str | None = None
    per_example: dict[str, float] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "per_example"}
        out["ci"] = list(self.ci)
        out["predicted_ci"] = None if self.predicted_ci is None else list(self.predicted_ci)
        return out


@dataclass
class Verification:
    """Measured accuracy of every checkpoint on one test set, and its agreement with the prediction."""

    source: str  # the test file, or the lm-eval task name
    metric: str  # what "accuracy" is: the grader's mean, or the task's headline metric
    mode: str  # "greedy" or "sampled k=5, T=0.8, top-p 0.95"
    settings_key: str
    n_examples: int
    max_new_tokens: int | None
    checkpoints: list[Measured]
    agreement: compare.Agreement | None = None
    harness: str = field(default_factory=lambda: f"lm-eval {version('lm_eval')}")

    def to_json(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k not in ("checkpoints", "agreement")}
        out["checkpoints"] = [c.to_json() for c in self.checkpoints]
        out["agreement"] = None if self.agreement is None else self.agreement.to_json()
        return out

    def attach_predictions(self, ranking: Ranking | None) -> None:
        """Pair each checkpoint with its pre-memorization accuracy from a ranking, and score the pairs."""
        if ranking is None:
            return
        index = compare.predictions_from_ranking(ranking)
        for m in self.checkpoints:
            row = compare.lookup(index, m.fingerprint, m.path)
            if row is not None:
                m.predicted = _num(row.premem_acc)
                m.predicted_ci = (_num(row.premem_ci[0]), _num(row.premem_ci[1]))
        self.agreement = compare.agreement([m.predicted for m in self.checkpoints],
                                           [m.accuracy for m in self.checkpoints])


def describe_sampling(sampling: SamplingSettings) -> str:
    if sampling.temperature == 0:
        return "greedy"
    return f"sampled k={sampling.k}, T={sampling.temperature:g}, top-p {sampling.top_p:g}"


def default_budget(tokenizer, examples: Sequence[Example], recipe: Recipe) -> int:
    """The recipe's fixed budget, else room for the longest reference: ceil(1.5 x (tokens + EOS)) + 16.

    One budget for the whole test set (lm-eval's ``max_gen_toks`` is per task), the rule the
    lab's ground truth uses, so a budget never depends on one question's own reference.
    """
    if recipe.sampling.max_new_tokens is not None:
        return recipe.sampling.max_new_tokens
    from ckptsel.measure.sampling import max_new_tokens_for

    ids = tokenizer([ex.target for ex in examples], add_special_tokens=False)["input_ids"]
    return max_new_tokens_for([len(t) + recipe.data.append_eos for t in ids])


def settings_key(recipe: Recipe, engine: EngineSettings, max_new_tokens: int, seed: int) -> str:
    """Everything that changes a verify result: rendering, grader, sampling, budget, dtype, seed."""
    from ckptsel.measure.loading import dtype_name

    dtype = dtype_name(engine)
    sampling = recipe.sampling
    decoding = {"greedy": True} if sampling.temperature == 0 else {
        "k": sampling.k, "temperature": sampling.temperature, "top_p": sampling.top_p, "seed": seed,
    }
    payload = {"harness": "lm-eval", "data": recipe.data.model_dump(), "decoding": decoding,
               "max_new_tokens": max_new_tokens, "dtype": dtype}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def unique_examples(examples: Sequence[Example], limit: int | None = None) -> list[Example]:
    """File order, duplicates (same rendered prompt and target) once, the first ``limit``."""
    unique = list({ex.uid: ex for ex in examples}.values())
    return unique if limit is None else unique[:limit]


def verify_file(
    checkpoints: Sequence[Checkpoint],
    examples: Sequence[Example],
    recipe: Recipe,
    store: Store,
    *,
    source: str,
    engine: EngineSettings = EngineSettings(),
    max_new_tokens: int,
    seed: int = 0,
    on_progress: ProgressFn | None = None,
    executor: Executor | None = None,
) -> Verification:
    """lm-eval accuracy of each checkpoint on ``examples``; what the store holds is not re-run.

    ``executor`` (:mod:`ckptsel.execution`; default: this process, one loader for every
    checkpoint) runs lm-eval; one whose workers run elsewhere (``--ray``) gets one item per
    checkpoint (:func:`evaluate_checkpoint`), and this process alone writes the store.
    """
    from ckptsel import graders

    grader = graders.get(recipe.data.grader)
    key = settings_key(recipe, engine, max_new_tokens, seed)
    examples = list(examples)
    uids = [ex.uid for ex in examples]
    by_uid = {ex.uid: ex for ex in examples}
    fps = fingerprints(checkpoints, store)
    rows = [Measured(i, str(c.path), c.step, fps[i], error=None if c.format.usable else c.error)
            for i, c in enumerate(checkpoints)]

    def missing(i: int) -> list[Example]:
        """The test examples the store lacks for checkpoint ``i`` (none: it is reported cached)."""
        todo = store.missing(fps[i], key, KIND, uids)
        rows[i].from_cache = not todo
        if not todo:
            emit(on_progress, checkpoints[i], i, "cached", len(uids), len(uids))
        return [by_uid[u] for u in todo]

    readable = [i for i in range(len(checkpoints)) if fps[i] is not None]
    executor = InProcessExecutor() if executor is None else executor
    with executor:
        if executor.in_process:  # each checkpoint's gap read when its turn comes: a copy of one measured is cached
            _verify_here(checkpoints, readable, missing, rows, grader, recipe, store, key, engine, len(uids),
                         max_new_tokens, seed, on_progress, executor)
        else:
            todo = {i: gap for i in readable if (gap := missing(i))}
            indices = list(todo)
            items = [(checkpoints[i], todo[i]) for i in indices]
            answers = executor.map(evaluate_checkpoint, items, recipe.data.grader, recipe, engine, max_new_tokens, seed)
            for position, answer in answers:
                i = indices[position]
                if isinstance(answer, str):
                    rows[i].error = answer
                    continue
                store.register_checkpoint(fps[i], checkpoints[i].path, checkpoints[i].step)
                store.put_many(fps[i], key, KIND, answer)
                emit(on_progress, checkpoints[i], i, "done", len(uids), len(uids))

    measured = [i for i in range(len(rows)) if fps[i] is not None and rows[i].error is None]
    matrix = np.array([[_acc(store.get_many(fps[i], key, KIND, uids), u) for u in uids] for i in measured])
    verification = Verification(source, f"{recipe.data.grader} grader, mean over questions",
                                describe_sampling(recipe.sampling), key, len(uids), max_new_tokens, rows)
    if measured:
        acc, lo, hi = compare.accuracy_with_interval(matrix, seed=seed)
        for r, i in enumerate(measured):
            rows[i].accuracy, rows[i].ci = _num(acc[r]), (_num(lo[r]), _num(hi[r]))
            rows[i].n = int((~np.isnan(matrix[r])).sum())
            rows[i].per_example = {u: float(v) for u, v in zip(uids, matrix[r]) if not math.isnan(v)}
            save_summary(store, rows[i], verification)
    return verification


def evaluate_examples(loaded, examples: Sequence[Example], grader, recipe: Recipe, engine: EngineSettings,
                      max_new_tokens: int, seed: int) -> dict[str, Record]:
    """lm-eval's graded completions of one loaded checkpoint on ``examples``, as store records."""
    task = harness.build_task(list(examples), grader, recipe.sampling, max_new_tokens)
    lm = harness.wrap_model(loaded.model, loaded.tokenizer, engine.batch_size)
    results = harness.file_results(harness.evaluate(lm, [task], seed=seed))
    return {uid: Record(acc=r.acc, samples=r.completions) for uid, r in results.items()}


def _verify_here(checkpoints, indices: list[int], missing, rows: list[Measured], grader, recipe: Recipe,
                 store: Store, key: str, engine: EngineSettings, n: int, max_new_tokens: int, seed: int, on_progress,
                 executor: Executor) -> None:
    """lm-eval in this process, one checkpoint after another with one loader, each result stored as it comes."""
    from ckptsel.measure.loading import CheckpointLoader

    with CheckpointLoader.for_engine(engine) as loader:

        def evaluate(i: int) -> None:
            todo = missing(i)
            if not todo:
                return
            ckpt, fp = checkpoints[i], rows[i].fingerprint
            try:
                emit(on_progress, ckpt, i, "load", 0, 1)
                loaded = loader.load(ckpt)
                store.register_checkpoint(fp, ckpt.path, ckpt.step)
                emit(on_progress, ckpt, i, "lm-eval", n - len(todo), n)
                store.put_many(fp, key, KIND, evaluate_examples(loaded, todo, grader, recipe, engine, max_new_tokens,
                                                                seed))
                emit(on_progress, ckpt, i, "lm-eval", n, n)
            except CheckpointError as err:
                rows[i].error = str(err)
            except StoreError:  # the shared store, not this checkpoint
                raise
            except Exception as exc:  # one bad checkpoint must not lose the others' results
                rows[i].error = f"{ckpt.path}: lm-eval failed: {type(exc).__name__}: {exc}".splitlines()[0]
                log.info("%s", rows[i].error)
                log.debug("traceback of %s", rows[i].error, exc_info=True)  # shown by ckptsel --debug

        for _ in executor.map(evaluate, indices):
            pass


def evaluate_checkpoint(item: tuple[Checkpoint, list[Example]], grader_name: str, recipe: Recipe,
                        engine: EngineSettings, max_new_tokens: int, seed: int) -> dict[str, Record] | str:
    """The worker outside this process: lm-eval on one checkpoint's missing test examples, as store
    records, or a one-line reason it failed."""
    from ckptsel import graders
    from ckptsel.measure.loading import CheckpointLoader

    ckpt, examples = item
    try:
        with CheckpointLoader.for_engine(engine) as loader:
            return evaluate_examples(loader.load(ckpt), examples, graders.get(grader_name), recipe, engine,
                                     max_new_tokens, seed)
    except CheckpointError as err:
        return str(err)
    except Exception as exc:  # one bad checkpoint must not lose the others' results
        log.debug("lm-eval failed", exc_info=True)
        return f"{ckpt.path}: lm-eval failed: {type(exc).__name__}: {exc}".splitlines()[0]


def _acc(records: Mapping[str, Record], uid: str) -> float:
    record = records.get(uid)
    return math.nan if record is None or record.acc is None else float(record.acc)


def _num(value) -> float | None:
    return None if value is None or math.isnan(float(value)) else float(value)


def save_summary(store: Store, row: Measured, verification: Verification) -> None:
    """Record one checkpoint's measured accuracy for ``ckptsel report`` (:func:`ckptsel.store_keys.verify_summary`)."""
    key = store_keys.verify_summary(row.fingerprint)
    entries = store.get_value(key, {})
    entries[verification.settings_key + ":" + verification.source] = {
        "source": verification.source,
        "metric": verification.metric,
        "mode": verification.mode,
        "harness": verification.harness,
        "accuracy": row.accuracy,
        "ci": list(row.ci),
        "n": row.n,
        "time": time.time(),
    }
    store.put_value(key, entries)


def stored_summaries(store: Store, fingerprint: str) -> list[dict]:
    """Every verify summary stored for one checkpoint, newest first."""
    entries = store.get_value(store_keys.verify_summary(fingerprint), {})
    return sorted(entries.values(), key=lambda e: e.get("time", 0), reverse=True)


# --------------------------------------------------------------------------- named lm-eval tasks


def task_settings_key(name: str, engine: EngineSettings, limit: int | None, num_fewshot: int | None,
                      seed: int) -> str:
    from ckptsel.measure.loading import dtype_name

    dtype = dtype_name(engine)
    payload = {"harness": "lm-eval", "task": name, "limit": limit, "num_fewshot": num_fewshot, "dtype": dtype,
               "seed": seed}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def verify_tasks(
    checkpoints: Sequence[Checkpoint],
    names: Sequence[str],
    store: Store,
    *,
    engine: EngineSettings = EngineSettings(),
    limit: int | None = None,
    num_fewshot: int | None = None,
    include_path: str | None = None,
    seed: int = 0,
    on_progress: ProgressFn | None = None,
) -> list[Verification]:
    """Each named lm-eval task on each checkpoint (the tasks' data must be available locally)."""
    from ckptsel.measure.loading import CheckpointLoader

    fps = fingerprints(checkpoints, store)
    keys = {name: task_settings_key(name, engine, limit, num_fewshot, seed) for name in names}
    found: dict[tuple[int, str], dict] = {}
    errors: dict[int, str] = {i: c.error or "unreadable" for i, c in enumerate(checkpoints) if not c.format.usable}
    manager = None
    with CheckpointLoader.for_engine(engine) as loader:
        for i, ckpt in enumerate(checkpoints):
            if fps[i] is None:
                continue
            for name in names:
                cached = store.get_value(store_keys.verify_task(fps[i], keys[name]))
                if cached is not None:
                    found[i, name] = {**cached, "from_cache": True}
            todo = [name for name in names if (i, name) not in found]
            if not todo:
                emit(on_progress, ckpt, i, "cached", 1, 1)
                continue
            try:
                emit(on_progress, ckpt, i, "load", 0, 1)
                loaded = loader.load(ckpt)
                if manager is None:
                    manager = harness.task_manager_for(names, include_path)
                emit(on_progress, ckpt, i, "lm-eval", 0, 1)
                lm = harness.wrap_model(loaded.model, loaded.tokenizer, engine.batch_size)
                results = harness.evaluate(lm, list(todo), task_manager=manager, limit=limit,
                                           num_fewshot=num_fewshot, seed=seed)
                for name in todo:
                    metric, _ = harness.headline_metric(results["results"][name])
                    values = harness.task_doc_values(results, name, metric)
                    entry = {"metric": metric, "values": [values[d] for d in sorted(values)]}
                    store.put_value(store_keys.verify_task(fps[i], keys[name]), entry)
                    found[i, name] = entry
                emit(on_progress, ckpt, i, "lm-eval", 1, 1)
            except CheckpointError as err:
                errors[i] = str(err)
            except CkptselError:  # an unknown task or missing data: the same for every checkpoint
                raise
            except Exception as exc:
                errors[i] = f"{ckpt.path}: lm-eval failed: {type(exc).__name__}: {exc}".splitlines()[0]
                log.debug("traceback of %s", errors[i], exc_info=True)  # shown by ckptsel --debug

    out = []
    for name in names:
        rows = [Measured(i, str(c.path), c.step, fps[i], error=errors.get(i)) for i, c in enumerate(checkpoints)]
        metric = next((found[i, name]["metric"] for i in range(len(rows)) if (i, name) in found), "")
        n_docs = max((len(found[i, name]["values"]) for i in range(len(rows)) if (i, name) in found), default=0)
        verification = Verification(name, metric, "task's own generation settings", keys[name], n_docs, None, rows)
        for i, row in enumerate(rows):
            if (i, name) not in found:
                continue
            values = np.array([found[i, name]["values"]], dtype=float)
            acc, lo, hi = compare.accuracy_with_interval(values, seed=seed)
            row.accuracy, row.ci, row.n = _num(acc[0]), (_num(lo[0]), _num(hi[0])), values.shape[1]
            row.from_cache = bool(found[i, name].get("from_cache"))
            save_summary(store, row, verification)
        out.append(verification)
    return out
