"""Measurement on Ray: checkpoints as tasks on many GPUs and nodes; this process alone writes the store.

``ckptsel rank RUN --ray`` (and every other command that measures) hands each checkpoint -- or
each group of a run's LoRA adapters on one base model, so the base loads once per task -- to
a Ray task that holds one GPU (``num_gpus=1``) on GPU machines, or ``--ray-cpus`` CPUs
elsewhere. Workers load, measure and return records; the driver plans from the store, writes
what comes back, and keeps the one progress bar. No SQLite file is written from a worker, so
the store can live on the driver's local disk; the checkpoints must be readable at the same
path on every node (a shared filesystem).

Order (ckptsel/DESIGN.md, "How a run flows"): the alternative-solution set is harvested from a
run's earliest checkpoints. With more than one task slot every checkpoint's samples (and other
measurements) are measured in parallel at once, the driver harvests them in training order, and
the alternative-solution NLL follows in a second parallel pass once the set is fixed: one more
load per checkpoint, against leaving every slot but one idle while the first checkpoint fixes the
set. With one slot the first checkpoint runs first; when its samples fix the set (the usual
case) the rest measure everything in one load, and the first gets its alternative-solution NLL
in a final task. Either way the records are those of a single-process run: samples are seeded
per example and sample, and each kind is measured in the same chunks.

Faults: a worker that dies mid-task (killed, out of memory, a node lost) is retried by Ray
(``max_retries``); nothing of its partial work reaches the store, so there are no partial or
duplicate records. A killed driver loses at most the tasks in flight; a rerun measures only
what the store lacks.

Without ray installed, ``--ray`` is a one-line error saying what to install.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from ckptsel.discover import Checkpoint
from ckptsel.errors import CheckpointError, CkptselError

log = logging.getLogger(__name__)

INSTALL = "pip install 'ckptsel[ray]'"
MAX_RETRIES = 3  # Ray's default for tasks; a worker killed mid-task is re-run this many times


def require_ray():
    try:
        import ray
    except ImportError:
        raise CkptselError(f"--ray needs Ray, which is not installed: {INSTALL}") from None
    return ray


@dataclass
class RayExecutor:
    """Where Ray tasks run. ``address``: ``None``/"local" starts a local Ray on this machine;
    "auto" or ``HOST:PORT`` (or ``ray://HOST:PORT``) joins an existing cluster. Each task asks for
    ``gpus`` GPUs (default: 1 when the cluster has GPUs) and ``cpus`` CPUs, and runs torch with
    ``cpus`` threads."""

    address: str | None = None
    cpus: int = 1
    gpus: float | None = None
    _task: object = field(default=None, init=False, repr=False)

    def __enter__(self) -> RayExecutor:
        if self._task is not None:  # entered already: one executor shared by a sweep's runs
            return self
        ray = require_ray()
        if not ray.is_initialized():
            address = None if self.address in (None, "local") else self.address
            kwargs = {"address": address, "log_to_driver": False, "configure_logging": False}
            if address is None:
                kwargs.update(include_dashboard=False)
            try:
                ray.init(**kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = "" if address is None else f" {address}"
                raise CkptselError(f"--ray{where}: cannot start or reach Ray ({str(exc).splitlines()[0]})") from None
        if self.gpus is None:
            self.gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        self._task = ray.remote(max_retries=MAX_RETRIES, retry_exceptions=False)(measure_items)
        return self

    @property
    def slots(self) -> int:
        """How many tasks the cluster runs at once with these requests."""
        resources = require_ray().cluster_resources()
        by_cpu = int(resources.get("CPU", 1) // max(self.cpus, 1))
        by_gpu = int(resources.get("GPU", 0) // self.gpus) if self.gpus else by_cpu
        return max(1, min(by_cpu, by_gpu))

    def __exit__(self, *exc) -> None:
        """Ray stays up for the next run of a sweep (it shuts down with the process)."""

    def submit(self, items: list[tuple[Checkpoint, dict]], recipe, ctx):
        """One task measuring ``items`` (checkpoint, {kind: examples}) in order; returns its Ray reference."""
        return self._task.options(num_cpus=self.cpus, num_gpus=self.gpus).remote(items, recipe, ctx, self.cpus)

    def wait(self, refs: list):
        """(reference, result) pairs as the tasks finish.

        A task whose worker or node died is retried by Ray; when Ray itself cannot go on (the head
        node or this machine's raylet is gone, the retries are spent) the run stops with one line:
        every result that came back before is in the store, so a rerun measures only the rest."""
        ray = require_ray()
        pending = list(refs)
        while pending:
            try:
                done, pending = ray.wait(pending, num_returns=1)
                answer = ray.get(done[0])
            except ray.exceptions.RayTaskError:
                raise  # an exception inside ckptsel's own task code: a bug, reported as one
            except ray.exceptions.RayError as exc:
                log.debug("Ray failed", exc_info=True)
                first = (str(exc).strip().splitlines() or [""])[0]
                raise CkptselError(f"--ray: the Ray cluster failed mid-run ({type(exc).__name__}: {first}); what was "
                                   "measured before is kept in the result store: rerun the same command to measure "
                                   "only the rest") from None
            yield done[0], answer


# --------------------------------------------------------------------------- the worker side


def measure_items(items: Sequence[tuple[Checkpoint, dict]], recipe, ctx, threads: int) -> list:
    """In a Ray worker: load each checkpoint of ``items`` (adapters on one base, loaded once) and
    measure its plan. Per item: ``{kind: {uid: Record}}``, or a one-line reason it failed."""
    import torch

    from ckptsel.collect import measure_chunks
    from ckptsel.measure.loading import CheckpointLoader

    torch.set_num_threads(max(1, threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    engine = ctx.engine
    out: list = []
    with CheckpointLoader.for_engine(engine) as loader:
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


# --------------------------------------------------------------------------- the driver side


def collect_distributed(state, pending: list[int], plain: list[str], executor: RayExecutor) -> None:
    """The loop of :func:`ckptsel.collect.collect` with checkpoints as Ray tasks (order in the module docstring)."""
    result = state.result
    if state.ctx.vllm is not None:
        raise CkptselError("--ray and --backend vllm cannot be combined yet; use one of them")
    # Ray prints its cluster's messages (a worker died, a task is retried) on stdout from a thread of
    # its own: the command line keeps them on stderr (ckptsel.cli.stdout).
    with executor:
        left = [i for i in pending]
        if result.harvest is not None and left and not result.harvest.fixed:
            if executor.slots > 1:
                # Every checkpoint at once; the set is harvested in training order afterwards.
                _harvest_after_all(state, left, plain, executor)
                left = []
            else:
                first = left.pop(0)
                _run_tasks(state, [first], plain, executor)
                if first not in result.failures and not state.advance_harvest(first):
                    _harvest_after_all(state, left, plain, executor)  # the first did not fix the set
                    left = []
        fixed = result.harvest is not None and result.harvest.fixed
        _run_tasks(state, left, [*plain, *(["alt"] if fixed else [])], executor)
        if result.harvest is not None and result.harvest.fixed:
            _run_tasks(state, [i for i in pending if i not in result.failures], ["alt"], executor)


def _harvest_after_all(state, indices: list[int], plain: list[str], executor: RayExecutor) -> None:
    """Measure ``plain`` kinds of every checkpoint in parallel, then harvest their samples in training
    order until the alternative-solution set is fixed (its NLL follows in a pass of its own)."""
    _run_tasks(state, indices, plain, executor)
    for i in indices:
        if i not in state.result.failures and state.advance_harvest(i):
            break


def _run_tasks(state, indices: list[int], kinds: list[str], executor: RayExecutor) -> None:
    """Plan ``kinds`` for each checkpoint from the store, run the tasks, store what comes back."""
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
    refs = {}
    for group in groups:
        refs[executor.submit([(state.checkpoints[i], plans[i]) for i in group], state.recipe, state.ctx)] = group
    for i in indices:  # nothing to measure: cached
        if not plans[i]:
            _finish(state, i, loaded=False)
    for ref, answers in executor.wait(list(refs)):
        for i, answer in zip(refs[ref], answers):
            if isinstance(answer, str):
                result.failures[i] = answer
                log.info("%s", answer)
                continue
            for kind, records in answer.items():
                state.put(i, kind, records)
            result.loaded += 1
            _finish(state, i, loaded=True)


def _finish(state, i: int, *, loaded: bool) -> None:
    ckpt = state.checkpoints[i]
    state.store.register_checkpoint(state.result.fingerprints[i], ckpt.path, ckpt.step)
    n = len(state.examples)
    state.emit(i, "done" if loaded else "cached", n, n)


def _groups(indices: list[int], checkpoints: Sequence[Checkpoint], slots: int) -> list[list[int]]:
    """One task per full checkpoint. Adapters on one base: as many tasks as the cluster runs at once
    (at most one per adapter), each a contiguous share in training order, so each task loads the
    base once and hot-swaps its adapters."""
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


# --------------------------------------------------------------------------- verify (lm-eval) on Ray


def evaluate_items(items: Sequence[tuple[Checkpoint, list]], grader_name: str, recipe, engine, max_new_tokens: int,
                   seed: int, threads: int) -> list:
    """In a Ray worker: lm-eval on each checkpoint's missing test examples. Per item: ``{uid: Record}``,
    or a one-line reason it failed."""
    import torch

    from ckptsel import graders
    from ckptsel.measure.loading import CheckpointLoader
    from ckptsel.verify.run import evaluate_examples

    torch.set_num_threads(max(1, threads))
    grader = graders.get(grader_name)
    out: list = []
    with CheckpointLoader.for_engine(engine) as loader:
        for ckpt, examples in items:
            try:
                out.append(evaluate_examples(loader.load(ckpt), examples, grader, recipe, engine, max_new_tokens,
                                             seed))
            except CheckpointError as err:
                out.append(str(err))
            except Exception as exc:
                log.debug("lm-eval failed", exc_info=True)
                out.append(f"{ckpt.path}: lm-eval failed: {type(exc).__name__}: {exc}".splitlines()[0])
    return out


def verify_distributed(checkpoints, fps, rows, by_uid, uids, recipe, store, key, kind, engine, *, max_new_tokens,
                       seed, on_progress=None) -> None:
    """The loop of :func:`ckptsel.verify.run.verify_file` with one Ray task per checkpoint."""
    from ckptsel.collect import Progress

    def emit(i, phase, done, total):
        if on_progress is not None:
            on_progress(Progress(checkpoints[i], i, phase, done, total))

    executor = RayExecutor(engine.ray, engine.ray_cpus)
    with executor:
        ray = require_ray()
        task = ray.remote(max_retries=MAX_RETRIES, retry_exceptions=False)(evaluate_items)
        refs = {}
        for i, ckpt in enumerate(checkpoints):
            if fps[i] is None:
                continue
            missing = store.missing(fps[i], key, kind, uids)
            rows[i].from_cache = not missing
            if not missing:
                emit(i, "cached", len(uids), len(uids))
                continue
            ref = task.options(num_cpus=executor.cpus, num_gpus=executor.gpus).remote(
                [(ckpt, [by_uid[u] for u in missing])], recipe.data.grader, recipe, engine, max_new_tokens, seed,
                executor.cpus)
            refs[ref] = i
        for ref, (answer,) in executor.wait(list(refs)):
            i = refs[ref]
            if isinstance(answer, str):
                rows[i].error = answer
                continue
            store.register_checkpoint(fps[i], checkpoints[i].path, checkpoints[i].step)
            store.put_many(fps[i], key, kind, answer)
            emit(i, "done", len(uids), len(uids))
