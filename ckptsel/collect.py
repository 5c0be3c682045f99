"""Measure every checkpoint on the training examples, into the result store.

This is the one loop over checkpoints (ckptsel/DESIGN.md, "How a run flows")::

    for each checkpoint (loaded once; adapters hot-swapped on one base):
        for each measurement kind: what the store lacks  ->  measure in chunks  ->  store

A checkpoint whose results are all stored is never loaded, so re-ranking a run after one
new save costs one checkpoint. Results are written one chunk per transaction: a crash or
``kill -9`` loses at most the chunk in flight, and the rerun computes exactly what is
missing. Samples are seeded per (example uid, sample index), so a resumed run equals an
uninterrupted one.

Measurement kinds are an explicit table (:data:`KINDS`); each turns a loaded model and a
list of examples into store records. Besides target NLL (``score``) and graded samples
(``sample``) they are the over-memorization proxies of :mod:`ckptsel.proxies`: perturbed-prompt
NLL, alternative-solution NLL and held-out NLL, measured while the checkpoint is loaded anyway.

The alternative-solution set is harvested from the earliest checkpoints' samples before any
checkpoint can be alt-scored (see :class:`ckptsel.proxies.Harvest` for the ordering): in the
common case the first checkpoint's samples fix the set and every checkpoint is still loaded
once; when the first checkpoints have too few correct samples, the checkpoints measured before
the set was fixed are loaded once more at the end of the run (``Collected.loaded`` counts
every load).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

from ckptsel import proxies, store_keys
from ckptsel.data import Example
from ckptsel.discover import Checkpoint, fingerprint
from ckptsel.errors import CheckpointError
from ckptsel.measure.protocols import LoadedCheckpoint, Loader
from ckptsel.proxies import Harvest
from ckptsel.settings import EngineSettings, ProxySettings, Recipe, SelectionSettings
from ckptsel.store import Record, Store, StoreError

if TYPE_CHECKING:
    from ckptsel.graders.base import Grader
    from ckptsel.measure.protocols import Sampler

log = logging.getLogger(__name__)


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
    loaded: int = 0  # checkpoint loads (1 per measured checkpoint, +1 per harvest source revisited)
    base_loads: int = 0  # base models loaded for adapter checkpoints (one per distinct base)
    heldout: list[Example] = field(default_factory=list)
    series: dict[str, str] = field(default_factory=dict)  # kind -> its store kind (e.g. "perturb:<hash>")
    harvest: Harvest | None = None  # the alternative-solution set, when "alt" was measured


# --------------------------------------------------------------------------- measurement kinds


@dataclass
class MeasureContext:
    """What every measurement kind may use beside the model: the settings, the grader, the
    sampling budgets, the vLLM sampler (``--backend vllm``) and the alternative-solution harvest."""

    engine: EngineSettings
    grader: Grader
    proxies: ProxySettings
    budgets: dict[str, int]
    vllm: Sampler | None = None  # --backend vllm; else measure.sampling.TransformersSampler
    harvest: Harvest | None = None


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
        record = Record(nll=float(result.nll[i]), n_tokens=int(result.n_tokens[i]), entropy=float(result.entropy[i]))
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


KINDS: dict[str, Kind] = {
    "score": Kind(_measure_scores_and_routes, 256, routes=True),
    "sample": Kind(_measure_samples, 32),
    "perturb": Kind(proxies.measure_perturbed, 128),  # len(perturbations) pairs per example
    "alt": Kind(proxies.measure_alternatives, 256),  # after "sample": harvested from samples
    "heldout": Kind(_measure_scores, 256, examples="heldout"),  # the held-out file's references
}
DEFAULT_KINDS = tuple(KINDS)


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
    kinds: Sequence[str] = DEFAULT_KINDS,
    heldout: Sequence[Example] = (),
    proxy_settings: ProxySettings = ProxySettings(),
    on_progress: Callable[[Progress], None] | None = None,
    sizes: dict[str, int] | None = None,
    loader: Loader | None = None,
    executor=None,
) -> Collected:
    """Measure ``kinds`` for every checkpoint x example the store does not hold yet.

    ``checkpoints`` are in training order (the alternative-solution set is harvested from
    the first ones). ``tokenizer`` (the run's: see
    :func:`ckptsel.measure.loading.load_tokenizer`) sizes the sampling budgets, unless
    ``sizes`` gives them (uid -> budget, from :func:`budgets`); then it may be None, and a run
    whose results are all stored imports neither torch nor transformers. ``heldout``
    examples are scored by the ``heldout`` kind (nothing to do when empty). One checkpoint
    failing to load or measure is recorded in ``Collected.failures``; the others go on.

    ``loader`` replaces reading checkpoints from disk (a :class:`~ckptsel.measure.protocols.Loader`
    other than :class:`ckptsel.measure.loading.CheckpointLoader`: the Trainer callback hands over
    the model it is training; see
    :mod:`ckptsel.integrations.transformers`). It is called only for what the store lacks.
    ``executor`` (a :class:`ckptsel.distributed.RayExecutor`) measures the checkpoints as Ray
    tasks instead, in parallel; this process alone writes the store, and the results are the
    same.
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
        if ckpt.kind == "error":
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
    if executor is None and engine.ray is not None and loader is None:
        from ckptsel.distributed import RayExecutor

        executor = RayExecutor(engine.ray, engine.ray_cpus)
    if executor is not None:
        from ckptsel.distributed import collect_distributed

        collect_distributed(state, pending, plain, executor)
        return result

    with (_LazyLoader(engine) if loader is None else nullcontext(loader)) as loader, sampler or nullcontext():
        for i in pending:
            session = _Session(loader, checkpoints[i], i, result, on_progress)
            with _recording_failure(result, i):
                if sampler is not None:  # before the model loads: frees an engine this checkpoint cannot use
                    sampler.use(checkpoints[i])
                for kind in plain:
                    state.run(session, i, kind)
                if result.harvest is not None and state.advance_harvest(i):
                    state.run(session, i, "alt")
            if i in result.failures:
                continue
            store.register_checkpoint(fps[i], checkpoints[i].path, checkpoints[i].step)
            if not session.loaded:
                state.emit(i, "cached", len(examples), len(examples))
        # Checkpoints measured before the set was fixed: their alternative scores, one more load each.
        if result.harvest is not None and result.harvest.fixed:
            for i in pending:
                if i not in result.failures:
                    with _recording_failure(result, i):
                        state.run(_Session(loader, checkpoints[i], i, result, on_progress), i, "alt")
        result.base_loads = loader.base_loads
    return result


@dataclass
class _RunState:
    """One run's measurement in progress: what the store lacks, and the harvest of alternative solutions.

    Shared by the in-process loop of :func:`collect` and the distributed one
    (:func:`ckptsel.distributed.collect_distributed`): both plan from the store, measure the same
    chunks with the same functions, and store the same records under the same keys.
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
    on_progress: Callable[[Progress], None] | None

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
        missing = set(self.store.missing(fp, self.key, series, [ex.uid for ex in pool], with_array=with_array))
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
        _emit(self.on_progress, self.checkpoints[i], i, phase, done, total)

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


def measure_chunks(model, tokenizer, kind: str, todo: Sequence[Example], recipe: Recipe,
                   ctx: MeasureContext) -> Iterator[dict[str, Record]]:
    """``kind``'s records for ``todo``, one chunk of :attr:`Kind.chunk` examples at a time."""
    size = KINDS[kind].chunk
    for start in range(0, len(todo), size):
        yield KINDS[kind].measure(model, tokenizer, todo[start : start + size], recipe, ctx)


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
            _emit(self._on_progress, self._ckpt, self._index, "load", 0, 1)
            self._loaded = self._loader.load(self._ckpt)
            self._result.loaded += 1
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


def _emit(callback, ckpt, index, phase, done, total) -> None:
    if callback is not None:
        callback(Progress(ckpt, index, phase, done, total))
