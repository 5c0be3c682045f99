"""Measure every checkpoint on the training examples, into the result store.

This is the one loop over checkpoints (ckptsel/DESIGN.md, "How a run flows")::

    for each checkpoint (loaded once; adapters hot-swapped on one base):
        for each measurement kind: what the store lacks  ->  measure in chunks  ->  store

A checkpoint whose results are all stored is never loaded, so re-ranking a run after one
new save costs one checkpoint. Results are written one chunk per transaction: a crash or
``kill -9`` loses at most the chunk in flight, and the rerun computes exactly what is
missing. Samples are seeded per (example uid, sample index), so a resumed run equals an
uninterrupted one. What is measured is the explicit table of :mod:`ckptsel.kinds`.

The alternative-solution set is harvested from the earliest checkpoints' samples before any
checkpoint can be alt-scored (see :class:`ckptsel.proxies.Harvest` for the ordering): in the
common case the first checkpoint's samples fix the set and every checkpoint is still loaded
once; when the first checkpoints have too few correct samples, the checkpoints measured before
the set was fixed are loaded once more at the end of the run (``Collected.loaded`` counts
every load).

Where the work runs is the executor's (:mod:`ckptsel.execution`); this module only asks it
whether its workers share this process. In process (the default) the loop above runs as
written, one checkpoint after another. Otherwise (``--ray``) each checkpoint -- or each group
of a run's LoRA adapters on one base model, so the base loads once per worker -- is one item of
:func:`measure_items`, the worker: it loads, measures and returns records; this process plans
from the store, writes what comes back and keeps the one progress bar, so no SQLite file is
written from a worker. Order: with more than one slot every checkpoint's samples (and other
measurements) are measured in parallel at once, this process harvests them in training order,
and the alternative-solution NLL follows in a second parallel pass once the set is fixed: one
more load per checkpoint, against leaving every slot but one idle while the first checkpoint
fixes the set. With one slot the first checkpoint runs first; when its samples fix the set
(the usual case) the rest measure everything in one load, and the first gets its
alternative-solution NLL in a final item. Either way the records are those of the in-process
loop: samples are seeded per example and sample, and each kind is measured in the same chunks.
A worker lost mid-item returns nothing, so there are no partial or duplicate records.
Checkpoints read through a converted copy (DeepSpeed ZeRO, FSDP: ``format.converts``) that have
something to measure get their copy made first, one item of :func:`prepare_copy` each, so each is
converted once across the cluster and the measurement passes only read it (the cache dir on the
shared filesystem, as the checkpoints are; ckptsel/formats/converted.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ckptsel import proxies, store_keys
from ckptsel.data import Example
from ckptsel.discover import Checkpoint
from ckptsel.errors import CheckpointError, CkptselError
from ckptsel.execution import Executor, InProcessExecutor
from ckptsel.fingerprints import fingerprints
from ckptsel.kinds import DEFAULT_KINDS, KINDS, measure_chunks
from ckptsel.measure.context import MeasureContext
from ckptsel.measure.protocols import LoadedCheckpoint, Loader
from ckptsel.progress import ProgressFn, emit
from ckptsel.proxies import Harvest
from ckptsel.settings import EngineSettings, ProxySettings, Recipe, SelectionSettings
from ckptsel.store import Record, Store, StoreError

if TYPE_CHECKING:
    from ckptsel.graders.base import Grader

log = logging.getLogger(__name__)


@dataclass
class Collected:
    """What :func:`collect` measured: one fingerprint per checkpoint (None when it failed)."""

    checkpoints: list[Checkpoint]
    fingerprints: list[str | None]
    settings_key: str
    examples: list[Example]
    failures: dict[int, str] = field(default_factory=dict)  # checkpoint index -> one-line reason
    loaded: int = 0  # checkpoint loads (1 per measured checkpoint, +1 per harvest source revisited)
    measured: set[int] = field(default_factory=set)  # indices of the checkpoints loaded and measured
    base_loads: int = 0  # base models loaded for adapter checkpoints (one per distinct base)
    heldout: list[Example] = field(default_factory=list)
    series: dict[str, str] = field(default_factory=dict)  # kind -> its store kind (e.g. "perturb:<hash>")
    harvest: Harvest | None = None  # the alternative-solution set, when "alt" was measured


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
    from ckptsel.measure.text import max_new_tokens_for

    ids = tokenizer([ex.target for ex in examples], add_special_tokens=False)["input_ids"]
    return {ex.uid: max_new_tokens_for([len(t) + recipe.data.append_eos]) for ex, t in zip(examples, ids)}


def settings_key(recipe: Recipe, engine: EngineSettings) -> str:
    """Everything that changes a stored number: rendering, sampling and its budget rule, the dtype, the backend."""
    dtype = resolved_dtype_name(engine)
    budget = recipe.sampling.max_new_tokens or PER_EXAMPLE_BUDGET
    payload = {"recipe": recipe.measurement_key(), "dtype": dtype, "max_new_tokens": budget}
    if engine.backend != "hf":  # other backends draw other samples; hf keys stay as they were
        payload["backend"] = engine.backend
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def resolved_dtype_name(engine: EngineSettings) -> str:
    """The dtype name ``engine`` runs in, as :func:`ckptsel.measure.loading.dtype_name` resolves it.

    Without torch where the answer is certain: a named dtype is itself, and ``auto`` on a machine
    with no GPU device node (``/dev/nvidia*``, ``/dev/kfd``) or with the GPU hidden by
    ``--device cpu`` / ``CUDA_VISIBLE_DEVICES`` is float32. Otherwise torch decides (bf16 or fp16
    on a GPU), so a ranking served from the store imports torch only on a GPU machine.
    """
    import glob
    import os

    names = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    if engine.dtype != "auto" and engine.dtype in {*names, *names.values()}:
        return names.get(engine.dtype, engine.dtype)
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1")
    no_gpu = not glob.glob("/dev/nvidia[0-9]*") and not os.path.exists("/dev/kfd")
    if engine.dtype == "auto" and (engine.device == "cpu" or (engine.device == "auto" and (hidden or no_gpu))):
        return "float32"
    from ckptsel.measure.loading import dtype_name

    return dtype_name(engine)


# --------------------------------------------------------------------------- the loop


def collect(
    checkpoints: Sequence[Checkpoint],
    examples: Sequence[Example],
    recipe: Recipe,
    store: Store,
    *,
    tokenizer,
    engine: EngineSettings = EngineSettings(),
    kinds: Sequence[str] = DEFAULT_KINDS,
    heldout: Sequence[Example] = (),
    proxy_settings: ProxySettings = ProxySettings(),
    on_progress: ProgressFn | None = None,
    sizes: dict[str, int] | None = None,
    loader: Loader | None = None,
    executor: Executor | None = None,
) -> Collected:
    """Measure ``kinds`` for every checkpoint x example the store does not hold yet.

    ``checkpoints`` are in training order (the alternative-solution set is harvested from
    the first ones). ``tokenizer`` (the run's: see
    :func:`ckptsel.measure.loading.load_tokenizer`) sizes the sampling budgets, unless
    ``sizes`` gives them (uid -> budget, from :func:`budgets`); then it may be None, and a run
    whose results are all stored imports neither torch nor transformers. ``heldout``
    examples are scored by the ``heldout`` kind (nothing to do when empty). One checkpoint
    failing to load or measure is recorded in ``Collected.failures``; the others go on.

    ``loader`` replaces reading checkpoints from disk: a :class:`~ckptsel.measure.protocols.Loader` whose ``load(checkpoint)``
    returns ``(model, tokenizer)`` like :class:`ckptsel.measure.loading.CheckpointLoader`'s
    (the Trainer callback hands over the model it is training; see
    :mod:`ckptsel.integrations.transformers`). It is called only for what the store lacks.
    ``executor`` (:mod:`ckptsel.execution`; default: this process) runs the measurement; one
    whose workers run elsewhere (Ray) measures the checkpoints in parallel, this process alone
    writes the store, and the results are the same (module docstring). A ``loader`` or
    ``--backend vllm`` needs the in-process one.
    """
    from ckptsel import graders

    checkpoints = list(checkpoints)
    examples = list(examples)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown measurement kinds {unknown}; known: {sorted(KINDS)}")
    grader = graders.get(recipe.data.grader)
    alt_grader = graders.get(proxy_settings.alt_grader) if proxy_settings.alt_grader else grader
    sampler = None
    if engine.backend == "vllm":
        from ckptsel.measure.vllm_backend import VllmSampler

        sampler = VllmSampler(engine)  # raises when vllm is missing
    ctx = MeasureContext(engine, grader, proxy_settings,
                         dict(sizes) if sizes is not None else budgets(tokenizer, examples, recipe), vllm=sampler)
    key = settings_key(recipe, engine)
    fps = fingerprints(checkpoints, store)
    result = Collected(checkpoints, fps, key, examples, heldout=list(heldout))
    for i, ckpt in enumerate(checkpoints):
        if not ckpt.format.usable:
            result.failures[i] = ckpt.error or "unreadable checkpoint"

    pending = [i for i in range(len(checkpoints)) if fps[i] is not None]
    pools = {"train": examples, "heldout": result.heldout}
    plain = [k for k in kinds if k != "alt"]  # alt goes last: it needs this checkpoint's samples
    result.series = {k: proxies.perturb_series(proxy_settings.perturbations) if k == "perturb" else k for k in plain}
    harvest_key = None
    if "alt" in kinds and pending:
        harvest_key = store_keys.alt_harvest(key, fps[pending[0]], proxy_settings)
        stored = store.get_value(harvest_key)
        result.harvest = Harvest.from_json(stored) if stored is not None else Harvest()
        ctx.harvest = result.harvest
        if result.harvest.fixed:  # fixed by an earlier rank of this run: its series is known now
            result.series["alt"] = result.harvest.series
    state = _RunState(checkpoints, examples, recipe, store, result, ctx, pools, key, harvest_key, alt_grader,
                      on_progress)
    executor = InProcessExecutor() if executor is None else executor
    if not executor.in_process and (loader is not None or sampler is not None):
        raise CkptselError("--ray and --backend vllm cannot be combined yet; use one of them" if loader is None
                           else "a loader hands over models of this process: it needs an in-process executor")
    with executor:
        if executor.in_process:
            _collect_here(state, pending, plain, executor, loader, sampler)
        else:
            _collect_on_workers(state, pending, plain, executor)
    return result


@dataclass
class _RunState:
    """One run's measurement in progress: what the store lacks, and the harvest of alternative solutions.

    Shared by the in-process loop (:func:`_collect_here`) and the one with workers elsewhere
    (:func:`_collect_on_workers`): both plan from the store, measure the same chunks with the
    same functions, and store the same records under the same keys.
    """

    checkpoints: list[Checkpoint]
    examples: list[Example]
    recipe: Recipe
    store: Store
    result: Collected
    ctx: MeasureContext
    pools: dict[str, list[Example]]
    key: str
    harvest_key: str | None
    alt_grader: Grader
    on_progress: ProgressFn | None

    @property
    def uids(self) -> list[str]:
        return [ex.uid for ex in self.examples]

    def pool(self, kind: str) -> list[Example]:
        if kind == "alt":
            solutions = self.result.harvest.solutions(self.uids)
            return [ex for ex in self.examples if ex.uid in solutions]
        return self.pools[KINDS[kind].examples]

    def todo(self, i: int, kind: str) -> tuple[list[Example], int]:
        """The examples of ``kind``'s pool that checkpoint ``i`` lacks in the store, and the pool's size."""
        pool = self.pool(kind)
        fp, series = self.result.fingerprints[i], self.result.series[kind]
        with_array = KINDS[kind].routes and self.checkpoints[i].num_experts is not None
        missing = set(self.store.missing(fp, self.key, series, [ex.uid for ex in pool], with_array=with_array,
                                         with_field=KINDS[kind].requires(self.recipe)))
        return [ex for ex in pool if ex.uid in missing], len(pool)

    def run(self, session: _Session, i: int, kind: str) -> None:
        """Measure and store what the store lacks of ``kind`` for checkpoint ``i``, a chunk per transaction."""
        todo, total = self.todo(i, kind)
        if not todo:
            return
        model, tok = session.model()
        done = total - len(todo)
        self.emit(i, kind, done, total)
        for records in measure_chunks(model, tok, kind, todo, self.recipe, self.ctx):
            self.put(i, kind, records)
            done += len(records)
            self.emit(i, kind, done, total)

    def put(self, i: int, kind: str, records: dict[str, Record]) -> None:
        self.store.put_many(self.result.fingerprints[i], self.key, self.result.series[kind], records)

    def emit(self, i: int, phase: str, done: int, total: int) -> None:
        emit(self.on_progress, self.checkpoints[i], i, phase, done, total)

    def advance_harvest(self, i: int) -> bool:
        """Harvest checkpoint ``i``'s samples if it is (or may become) a source; True once the set is fixed."""
        harvest, fp, uids = self.result.harvest, self.result.fingerprints[i], self.uids
        was_fixed, looked_up = harvest.fixed, 0
        if not harvest.fixed or fp in harvest.sources:
            records = self.store.get_many(fp, self.key, "sample", uids)
            looked_up = harvest.harvest(fp, records, self.examples, self.alt_grader,
                                        self.ctx.proxies.alt_min_accuracy)
        if not harvest.decide(uids, self.ctx.proxies):
            return False
        if not was_fixed or looked_up:
            self.store.put_value(self.harvest_key, harvest.to_json())
        self.result.series["alt"] = harvest.series
        return True


def _collect_here(state: _RunState, pending: list[int], plain: list[str], executor: Executor, given_loader,
                  sampler) -> None:
    """The loop of the module docstring in this process: one checkpoint after another, in training order,
    each loaded once by one loader (adapters hot-swapped on one base), the harvest advanced between a
    checkpoint's samples and its alternative-solution NLL."""
    result, checkpoints, n = state.result, state.checkpoints, len(state.examples)

    opened = _LazyLoader(state.ctx.engine) if given_loader is None else nullcontext(given_loader)
    with opened as loader, sampler or nullcontext():

        def measure(i: int) -> None:
            session = _Session(loader, checkpoints[i], i, result, state.on_progress)
            with _recording_failure(result, i):
                if sampler is not None:  # before the model loads: frees an engine this checkpoint cannot use
                    sampler.use(checkpoints[i])
                for kind in plain:
                    state.run(session, i, kind)
                if result.harvest is not None and state.advance_harvest(i):
                    state.run(session, i, "alt")
            if i in result.failures:
                return
            state.store.register_checkpoint(result.fingerprints[i], checkpoints[i].path, checkpoints[i].step)
            if not session.loaded:
                state.emit(i, "cached", n, n)

        def measure_alt(i: int) -> None:
            with _recording_failure(result, i):
                state.run(_Session(loader, checkpoints[i], i, result, state.on_progress), i, "alt")

        for _ in executor.map(measure, pending):
            pass
        # Checkpoints measured before the set was fixed: their alternative scores, one more load each.
        if result.harvest is not None and result.harvest.fixed:
            for _ in executor.map(measure_alt, [i for i in pending if i not in result.failures]):
                pass
        result.base_loads = getattr(loader, "base_loads", 0)


class _LazyLoader(Loader):
    """A :class:`ckptsel.measure.loading.CheckpointLoader` made on the first load, so that a run
    served from the store never imports torch."""

    def __init__(self, engine: EngineSettings):
        self._engine = engine
        self._loader = None

    def __enter__(self) -> _LazyLoader:
        return self

    def __exit__(self, *exc) -> None:
        if self._loader is not None:
            self._loader.__exit__(*exc)

    @property
    def base_loads(self) -> int:
        return 0 if self._loader is None else self._loader.base_loads

    def load(self, ckpt: Checkpoint) -> LoadedCheckpoint:
        if self._loader is None:
            from ckptsel.measure.loading import CheckpointLoader

            self._loader = CheckpointLoader.for_engine(self._engine).__enter__()
        return self._loader.load(ckpt)


class _Session:
    """One checkpoint's turn in the loop: the model is loaded on first use, at most once."""

    def __init__(self, loader: Loader, ckpt: Checkpoint, index: int, result: Collected, on_progress):
        self._loader, self._ckpt, self._index = loader, ckpt, index
        self._result, self._on_progress = result, on_progress
        self._loaded = None

    @property
    def loaded(self) -> bool:
        return self._loaded is not None

    def model(self):
        if self._loaded is None:
            emit(self._on_progress, self._ckpt, self._index, "load", 0, 1)
            self._loaded = self._loader.load(self._ckpt)
            self._result.loaded += 1
            self._result.measured.add(self._index)
        return self._loaded


@contextmanager
def _recording_failure(result: Collected, index: int) -> Iterator[None]:
    """Record a checkpoint's failure in ``Collected.failures`` and go on with the next one."""
    try:
        yield
    except CheckpointError as err:
        result.failures[index] = str(err)
        log.info("%s", err)
    except StoreError:  # the shared store, not this checkpoint: stop the run (one line, exit 2)
        raise
    except Exception as exc:  # one bad checkpoint must not lose the others' results
        reason = f"{result.checkpoints[index].path}: measurement failed: {type(exc).__name__}: {exc}".splitlines()[0]
        result.failures[index] = reason
        log.info("%s", reason)
        log.debug("traceback of %s", reason, exc_info=True)  # ckptsel --debug shows it; our bug or the model's?


# --------------------------------------------------------------------------- workers outside this process


def _collect_on_workers(state: _RunState, pending: list[int], plain: list[str], executor: Executor) -> None:
    """The loop of :func:`collect` with checkpoints measured by :func:`measure_items` workers elsewhere
    (the order is in the module docstring); this process plans, harvests and stores."""
    result = state.result
    _convert_first(state, pending, [*plain, *(["alt"] if result.harvest is not None and result.harvest.fixed else [])],
                   executor)
    pending = [i for i in pending if i not in result.failures]
    left = list(pending)
    if result.harvest is not None and left and not result.harvest.fixed:
        if executor.slots > 1:
            # Every checkpoint at once; the set is harvested in training order afterwards.
            _harvest_after_all(state, left, plain, executor)
            left = []
        else:
            first = left.pop(0)
            _run_items(state, [first], plain, executor)
            if first not in result.failures and not state.advance_harvest(first):
                _harvest_after_all(state, left, plain, executor)  # the first did not fix the set
                left = []
    fixed = result.harvest is not None and result.harvest.fixed
    _run_items(state, left, [*plain, *(["alt"] if fixed else [])], executor)
    if result.harvest is not None and result.harvest.fixed:
        _run_items(state, [i for i in pending if i not in result.failures], ["alt"], executor)


def _convert_first(state: _RunState, pending: list[int], kinds: list[str], executor: Executor) -> None:
    """Make the converted copies of the checkpoints that need one and have ``kinds`` to measure, one worker
    item each (:func:`prepare_copy`); a checkpoint whose conversion fails is a failure, not measured."""
    result = state.result
    needed = [i for i in pending if state.checkpoints[i].format.converts and i not in result.failures
              and any(state.todo(i, kind)[0] for kind in kinds)]
    if not needed:
        return
    for position, answer in executor.map(prepare_copy, [state.checkpoints[i] for i in needed], state.ctx.engine):
        if answer is not None:
            i = needed[position]
            result.failures[i] = answer
            log.info("%s", answer)


def prepare_copy(ckpt: Checkpoint, engine: EngineSettings) -> str | None:
    """The worker: ``ckpt``'s converted copy in the cache, made unless it is there (ckptsel/formats/converted.py);
    a one-line reason when it cannot be made, else None."""
    from ckptsel.measure.loading import CheckpointLoader

    options = CheckpointLoader.for_engine(engine).options
    try:
        ckpt.format.check_load(ckpt, options)
        ckpt.format.model_folder(ckpt, options)
    except CkptselError as err:
        return str(err)
    except Exception as exc:  # one bad checkpoint must not lose the others' results
        log.debug("conversion failed", exc_info=True)
        return f"{ckpt.path}: conversion failed: {type(exc).__name__}: {exc}".splitlines()[0]
    return None


def _harvest_after_all(state: _RunState, indices: list[int], plain: list[str], executor: Executor) -> None:
    """Measure ``plain`` kinds of every checkpoint in parallel, then harvest their samples in training
    order until the alternative-solution set is fixed (its NLL follows in a pass of its own)."""
    _run_items(state, indices, plain, executor)
    for i in indices:
        if i not in state.result.failures and state.advance_harvest(i):
            break


def _run_items(state: _RunState, indices: list[int], kinds: list[str], executor: Executor) -> None:
    """Plan ``kinds`` for each checkpoint from the store, hand the items to the workers, store what comes back."""
    result = state.result
    plans = {}
    for i in indices:
        plan = {}
        for kind in kinds:
            todo, _ = state.todo(i, kind)
            if todo:
                plan[kind] = todo
        plans[i] = plan
    groups = _groups([i for i in indices if plans[i]], state.checkpoints, executor.slots)
    for i in indices:  # nothing to measure: cached
        if not plans[i]:
            _finish(state, i, loaded=False)
    items = [[(state.checkpoints[i], plans[i]) for i in group] for group in groups]
    for position, answers in executor.map(measure_items, items, state.recipe, state.ctx):
        for i, answer in zip(groups[position], answers):
            if isinstance(answer, str):
                result.failures[i] = answer
                log.info("%s", answer)
                continue
            for kind, records in answer.items():
                state.put(i, kind, records)
            result.loaded += 1
            result.measured.add(i)
            _finish(state, i, loaded=True)


def _finish(state: _RunState, i: int, *, loaded: bool) -> None:
    ckpt = state.checkpoints[i]
    state.store.register_checkpoint(state.result.fingerprints[i], ckpt.path, ckpt.step)
    n = len(state.examples)
    state.emit(i, "done" if loaded else "cached", n, n)


def _groups(indices: list[int], checkpoints: Sequence[Checkpoint], slots: int) -> list[list[int]]:
    """One item per full checkpoint. Adapters on one base: as many items as there are slots (at most
    one per adapter), each a contiguous share in training order, so each worker loads the base once
    and hot-swaps its adapters."""
    groups: list[list[int]] = []
    by_base: dict[str, list[int]] = {}
    for i in indices:
        ckpt = checkpoints[i]
        if ckpt.format.is_adapter and ckpt.base_model:
            by_base.setdefault(ckpt.base_model, []).append(i)
        else:
            groups.append([i])
    for adapters in by_base.values():
        n = min(len(adapters), max(1, slots))
        size = -(-len(adapters) // n)
        groups += [adapters[k : k + size] for k in range(0, len(adapters), size)]
    return groups


def measure_items(items: Sequence[tuple[Checkpoint, dict]], recipe: Recipe, ctx: MeasureContext) -> list:
    """The worker: load each checkpoint of ``items`` (adapters on one base, loaded once) and measure its
    plan. Per item: ``{kind: {uid: Record}}``, or a one-line reason it failed."""
    from ckptsel.measure.loading import CheckpointLoader

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out: list = []
    with CheckpointLoader.for_engine(ctx.engine) as loader:
        for ckpt, plan in items:
            try:
                model, tok = loader.load(ckpt)
                records = {}
                for kind, todo in plan.items():
                    records[kind] = {}
                    for chunk in measure_chunks(model, tok, kind, todo, recipe, ctx):
                        records[kind].update(chunk)
                out.append(records)
            except CheckpointError as err:
                out.append(str(err))
            except Exception as exc:  # one bad checkpoint must not lose the others' results
                log.debug("measurement failed", exc_info=True)
                out.append(f"{ckpt.path}: measurement failed: {type(exc).__name__}: {exc}".splitlines()[0])
    return out
