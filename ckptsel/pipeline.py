"""The rank pipeline as one library call: discover → data → measure → rank (ckptsel/DESIGN.md).

    from ckptsel.pipeline import RankRequest, rank_runs
    result = rank_runs(RankRequest(paths=("sweep",), data_per_run="train.jsonl", recipe=load_recipe("gsm8k")))
    result.ranking.recommended          # index into result.ranking.checkpoints: the sweep's pick
    result.ranking.runs                 # each run, with its own recommendation

Every command that needs a ranking (rank, gate, report, verify, merge --recommend, the demo)
builds a :class:`RankRequest` and calls :func:`rank_runs`; the CLI only parses options and
prints. The library never prints: progress goes to ``on_progress`` (one event per unit of
work, with the checkpoint's position in the whole sweep) and the opening line to ``on_start``.

The runs come from :func:`ckptsel.prepare.prepare` (discovery, the data checks, the rendered rows,
the ``--max-examples`` subset: the one run preparation, shared with the Trainer callback) and are
measured each by
:func:`ckptsel.collect.collect` on its own examples, so the alternative-solution harvest and
pre-memorization accuracy's history stay inside each run: one after another in this process,
all at once when the executor's workers run elsewhere (``--ray``; :mod:`ckptsel.execution`).
Runs trained on the same data file are measured on the same examples (one ``--max-examples``
subset), which makes the comparison between them paired.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ckptsel.collect import Collected
from ckptsel.data import Example
from ckptsel.discover import Run
from ckptsel.errors import CkptselError
from ckptsel.execution import Executor, executor_for
from ckptsel.prepare import PreparedRun, RankRequest, prepare
from ckptsel.progress import ProgressFn
from ckptsel.settings import EngineSettings, Recipe

if TYPE_CHECKING:
    from ckptsel.select import Ranking

__all__ = ["MeasuredRun", "Plan", "RankRequest", "RankResult", "rank_runs"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """What a request is about to measure (``on_start``'s argument)."""

    checkpoints: int
    runs: int
    examples: tuple[int, ...]  # distinct example counts over the runs
    heldout: tuple[int, ...]
    k: int
    store: Path

    def describe(self) -> str:
        return (f"{self.checkpoints} checkpoint(s)" + (f" in {self.runs} runs" if self.runs > 1 else "")
                + f", {'/'.join(map(str, self.examples))} example(s)"
                + (f", {'/'.join(map(str, self.heldout))} held-out" if self.heldout else "")
                + f", k={self.k}, cache {self.store}")


@dataclass
class MeasuredRun:
    """One run of the request: what was found, the data it was measured on, what was measured."""

    run: Run
    data: Path
    collected: Collected
    rows: list[Example] = field(default_factory=list)  # every rendered row of its training file (curate)
    budgets: dict[str, int] = field(default_factory=dict)  # sampling budget per example uid (ckptsel.prepare)


@dataclass
class RankResult:
    """What :func:`rank_runs` returns."""

    ranking: Ranking
    runs: list[MeasuredRun]
    recipe: Recipe
    usable: int  # checkpoints that could be read (the rest were broken on disk)
    skipped_runs: list[str] = field(default_factory=list)

    @property
    def collected(self) -> Collected:
        """The recommended run's measurements (the only run's, for one run)."""
        return self.runs[self.recommended_run].collected

    @property
    def recommended_run(self) -> int:
        rec = self.ranking.recommended
        if rec is not None:
            name = self.ranking.checkpoints[rec].run
            for r, m in enumerate(self.runs):
                if m.run.name == name:
                    return r
        return 0

    @property
    def failures(self) -> list[str]:
        """One line per checkpoint that could not be read or measured, over all runs."""
        return [reason for m in self.runs for reason in m.collected.failures.values()]

    @property
    def loaded(self) -> int:
        return sum(m.collected.loaded for m in self.runs)

    def run_view(self, name: str | None = None) -> RankResult:
        """The result restricted to one run (default: the recommended checkpoint's), indices renumbered
        from 0, the sweep's threshold kept: what commands that work on one run (merge --recommend) take."""
        from ckptsel.select import Ranking

        r = self.recommended_run if name is None else next(
            (i for i, m in enumerate(self.runs) if m.run.name == name), None)
        if r is None:
            raise CkptselError(f"no run named {name!r} (runs: {', '.join(m.run.name for m in self.runs)})")
        if len(self.runs) == 1:
            return self
        summary = self.ranking.runs[r]
        first = summary.indices[0] if summary.indices else 0
        rows = [dataclasses.replace(self.ranking.checkpoints[i], index=i - first) for i in summary.indices]
        local = dataclasses.replace(summary, indices=[i - first for i in summary.indices],
                                    recommended=None if summary.recommended is None else summary.recommended - first)
        collected = self.runs[r].collected
        ranking = Ranking(rows, self.ranking.threshold, len(collected.examples), local.recommended, self.ranking.rule,
                          proxy=summary.proxy, stage_rule=self.ranking.stage_rule, n_heldout=len(collected.heldout),
                          warnings=list(summary.warnings), pathway_rule=self.ranking.pathway_rule, runs=[local],
                          per_example=summary.per_example)
        if collected.harvest is not None and collected.harvest.fixed:
            ranking.alt_coverage = collected.harvest.coverage(ex.uid for ex in collected.examples)
            ranking.alt_sources = [i for i, fp in enumerate(collected.fingerprints) if fp in collected.harvest.sources]
        usable = sum(c.format.usable for c in collected.checkpoints)
        return RankResult(ranking, [self.runs[r]], self.recipe, usable)

    def to_json(self) -> dict:
        out = self.ranking.to_json()
        keys = {m.collected.settings_key for m in self.runs}
        out["settings_key"] = next(iter(keys)) if len(keys) == 1 else sorted(keys)
        measured = sum(len(m.collected.measured) for m in self.runs)  # a harvest source revisited counts once
        out["cache"] = {"measured": measured, "from_cache": self.usable - measured}
        return out


def rank_runs(
    request: RankRequest,
    *,
    on_start: Callable[[Plan], None] | None = None,
    on_progress: ProgressFn | None = None,
    executor: Executor | None = None,
) -> RankResult:
    """Prepare the runs (:func:`ckptsel.prepare.prepare`: discovery, data, checks), measure what the store
    lacks, rank (module docstring).

    ``executor`` runs the measurement (default: the one ``request.engine`` asks for,
    :func:`ckptsel.execution.executor_for`); the results are the same on any.

    Raises :class:`CkptselError` for bad input (no loadable checkpoint at all, a run without
    its data file, no examples); a checkpoint that cannot be measured is recorded in its run's
    ``Collected.failures`` and the others go on.
    """
    from ckptsel.select import rank
    from ckptsel.store import Store

    prepared = prepare(request)
    with Store.open(request.cache_dir) as store:
        if on_start is not None:
            on_start(_plan(prepared, request.recipe, store.path))
        executor = executor_for(request.engine) if executor is None else executor
        with executor:
            if not executor.in_process and sum(p.examples is not None for p in prepared) > 1:
                measured = _measure_runs_at_once(prepared, request, on_progress, executor)
            else:
                measured = [_measure(p, request, store, on_progress, executor) for p in prepared]
        ranking = rank([m.collected for m in measured], store, request.recipe.memorization, request.recipe.stages,
                       pathway_settings=request.recipe.pathways, threshold=request.threshold,
                       run_names=[m.run.name for m in measured], run_paths=[str(m.run.path) for m in measured])
    usable = sum(c.format.usable for p in prepared for c in p.run.checkpoints)
    return RankResult(ranking, measured, request.recipe, usable)


def _plan(prepared: list[PreparedRun], recipe: Recipe, store: Path) -> Plan:
    """What the request is about to measure (``on_start``'s argument)."""
    sizes = tuple(sorted({len(p.examples) for p in prepared if p.examples is not None}))
    heldout_sizes = tuple(sorted({len(p.heldout) for p in prepared if p.heldout}))
    checkpoints = sum(len(p.run.checkpoints) for p in prepared)
    return Plan(checkpoints, len(prepared), sizes, heldout_sizes, recipe.sampling.k, store)


def _measure(p: PreparedRun, request: RankRequest, store, on_progress: ProgressFn | None,
             executor: Executor) -> MeasuredRun:
    """One prepared run measured (what the store lacks) by :func:`ckptsel.collect.collect`."""
    from ckptsel.collect import collect

    if p.examples is None:
        return MeasuredRun(p.run, p.data, _unreadable(p.run, request.recipe, request.engine))
    collected = collect(p.run.checkpoints, p.examples, request.recipe, store, tokenizer=None, sizes=p.rendered.budgets,
                        engine=request.engine, heldout=p.heldout, proxy_settings=request.recipe.proxies,
                        on_progress=_offset(on_progress, p.offset), executor=executor)
    return MeasuredRun(p.run, p.data, collected, p.rendered.examples, p.rendered.budgets)


def _measure_runs_at_once(prepared: list[PreparedRun], request: RankRequest, on_progress: ProgressFn | None,
                          executor: Executor) -> list[MeasuredRun]:
    """The runs of a sweep measured at once by workers outside this process: one driver thread per run,
    sharing one executor (one Ray cluster).

    Each run keeps its own order (its alternative-solution set harvested in training order, then
    its NLL; ckptsel.collect), and while one run waits between those passes the other runs'
    items fill the executor's slots. Each thread writes through its own store connection (the store takes
    concurrent writers; ckptsel/store.py); records are the same as one run after another.
    """
    from concurrent.futures import ThreadPoolExecutor

    from ckptsel.store import Store

    def one(p: PreparedRun) -> MeasuredRun:
        with Store.open(request.cache_dir) as store:
            return _measure(p, request, store, on_progress, executor)

    with ThreadPoolExecutor(max_workers=len(prepared), thread_name_prefix="ckptsel-run") as pool:
        return list(pool.map(one, prepared))


def _offset(on_progress, offset: int):
    """Progress events of one run, renumbered to the checkpoint's position in the whole sweep."""
    if on_progress is None:
        return None
    return lambda event: on_progress(dataclasses.replace(event, index=event.index + offset))


def _unreadable(run: Run, recipe: Recipe, engine: EngineSettings) -> Collected:
    """A run none of whose checkpoints can be read: every one recorded as failed."""
    from ckptsel.collect import settings_key

    failures = {i: c.error or "unreadable checkpoint" for i, c in enumerate(run.checkpoints)}
    return Collected(list(run.checkpoints), [None] * len(run.checkpoints), settings_key(recipe, engine), [],
                     failures=failures)
