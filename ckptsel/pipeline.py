"""The rank pipeline as one library call: discover → data → measure → rank (ckptsel/DESIGN.md).

    from ckptsel.pipeline import RankRequest, rank_runs
    result = rank_runs(RankRequest(paths=("sweep",), data_per_run="train.jsonl", recipe=load_recipe("gsm8k")))
    result.ranking.recommended          # index into result.ranking.checkpoints: the sweep's pick
    result.ranking.runs                 # each run, with its own recommendation

Every command that needs a ranking (rank, gate, report, verify, merge --recommend, the demo)
builds a :class:`RankRequest` and calls :func:`rank_runs`; the CLI only parses options and
prints. The library never prints: progress goes to ``on_progress`` (one event per unit of
work, with the checkpoint's position in the whole sweep) and the opening line to ``on_start``.

Runs (:func:`ckptsel.discover.discover_runs`) are measured each by
:func:`ckptsel.collect.collect` on its own examples, so the alternative-solution harvest and
pre-memorization accuracy's history stay inside each run: one after another in this process,
all at once when the executor's workers run elsewhere (``--ray``; :mod:`ckptsel.execution`).
Runs trained on the same data file are measured on the same examples (one ``--max-examples``
subset), which makes the comparison between them paired.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from ckptsel import store_keys
from ckptsel.collect import Collected
from ckptsel.data import Example
from ckptsel.discover import Checkpoint, Run
from ckptsel.errors import CkptselError, DataError
from ckptsel.execution import Executor, executor_for
from ckptsel.progress import ProgressFn
from ckptsel.settings import EngineSettings, Recipe, SelectionSettings
from ckptsel.tokenizers import tokenizer_digest

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ckptsel.select import Ranking

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankRequest:
    """Everything a ranking depends on. ``recipe`` holds the rendering, sampling, memorisation,
    proxy and stage settings (with the CLI's overrides applied); ``threshold`` overrides its
    ν without replacing it, so ``"auto"`` can fall back to the recipe's value where it cannot
    be fitted (``"auto"`` pools the sweep's pairs, ``"auto-run"`` fits each run alone)."""

    paths: tuple[Path, ...]
    recipe: Recipe
    data: Path | None = None  # one training file (or folder) for every run
    data_per_run: str | None = None  # each run reads RUN/<this>
    threshold: float | str | None = None
    base_model: str | None = None
    max_examples: int | None = None
    examples_seed: int = 0
    skip_bad: bool = False
    heldout: Path | None = None
    engine: EngineSettings = EngineSettings()
    cache_dir: Path | None = None
    runs: tuple[Run, ...] | None = None  # already discovered: skips discovery

    def __post_init__(self):
        if (self.data is None) == (self.data_per_run is None):
            raise CkptselError("give the training data: either --data FILE or --data-per-run FILENAME (not both)")
        if self.threshold not in (None, "auto", "auto-run") and not isinstance(self.threshold, (int, float)):
            raise CkptselError(f"threshold {self.threshold!r}: a number of nats/token, 'auto' or 'auto-run'")
        if self.cache_dir is not None and self.engine.cache_dir is None:  # converted copies go beside the store
            object.__setattr__(self, "engine", self.engine.model_copy(update={"cache_dir": str(self.cache_dir)}))

    @property
    def selection(self) -> SelectionSettings:
        return SelectionSettings(max_examples=self.max_examples, examples_seed=self.examples_seed)


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


class RunJob(NamedTuple):
    """One run to measure (``measure(*job, store, executor)`` in :func:`rank_runs`): its examples (None: no
    checkpoint of it can be read), its held-out examples, and its first checkpoint's position in the sweep."""

    run: Run
    examples: list[Example] | None
    heldout: list[Example]
    offset: int


@dataclass
class MeasuredRun:
    """One run of the request: what was found, the data it was measured on, what was measured."""

    run: Run
    data: Path
    collected: Collected
    rows: list[Example] = field(default_factory=list)  # every rendered row of its training file (curate)


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
        out["cache"] = {"measured": self.loaded, "from_cache": self.usable - self.loaded}
        return out


def rank_runs(
    request: RankRequest,
    *,
    on_start: Callable[[Plan], None] | None = None,
    on_progress: ProgressFn | None = None,
    executor: Executor | None = None,
) -> RankResult:
    """Discover the runs, load each run's data, measure what the store lacks, rank (module docstring).

    ``executor`` runs the measurement (default: the one ``request.engine`` asks for,
    :func:`ckptsel.execution.executor_for`); the results are the same on any.

    Raises :class:`CkptselError` for bad input (no loadable checkpoint at all, a run without
    its data file, no examples); a checkpoint that cannot be measured is recorded in its run's
    ``Collected.failures`` and the others go on.
    """
    from ckptsel import checks, graders
    from ckptsel.collect import collect, select_examples
    from ckptsel.discover import discover_runs, no_loadable_checkpoint
    from ckptsel.select import rank
    from ckptsel.store import Store, ensure_outside

    recipe = request.recipe
    if recipe.proxies.alt_grader is not None:
        graders.get(recipe.proxies.alt_grader)  # an unknown name is a usage error before any work
    runs = list(request.runs) if request.runs is not None else discover_runs(request.paths, request.base_model)
    checks.exclude_other_architectures(runs)  # robustness: a stray model is not mixed into a run's history
    checkpoints = [c for run in runs for c in run.checkpoints]
    if (message := no_loadable_checkpoint(request.paths, checkpoints)) is not None:
        raise CkptselError(message)
    data_files = _data_files(runs, request)
    ensure_outside(request.cache_dir, [c.path for c in checkpoints])
    grader = graders.get(recipe.data.grader)
    gradable: dict[tuple, list[Example]] = {}  # (file, tokenizer identity) -> the rows the grader can read

    tokenizers = _Tokenizers(request.engine)
    loaded: dict[tuple, Rendered] = {}  # (file, tokenizer identity) -> its rendered rows

    def examples_of(path: Path, run: Run, what: str) -> list:
        key = (path.resolve(), tokenizers.identity(run))
        if key not in loaded:
            loaded[key] = render(path, recipe, store, tokenizer_identity=key[1], skip_bad=request.skip_bad,
                                 tokenizer=lambda: tokenizers.for_run(run))
        pool = loaded[key].examples
        if what == "training":  # robustness (ckptsel.checks): references the grader cannot read
            if key not in gradable:
                gradable[key] = checks.gradable(pool, path, grader, recipe.data.grader, skip_bad=request.skip_bad)
            pool = gradable[key]
        examples = select_examples(pool, request.selection)
        # robustness: rows longer than the model's context, before any model work
        examples = checks.fit_context(examples, loaded[key].lengths, run.checkpoints, path, skip_bad=request.skip_bad)
        if not examples:
            raise DataError(f"{path}: no {what} examples")
        return examples

    measured: list[MeasuredRun] = []
    with Store.open(request.cache_dir) as store:
        jobs: list[RunJob] = []
        for run in runs:
            offset = sum(len(job.run.checkpoints) for job in jobs)
            if not any(c.format.usable for c in run.checkpoints):
                jobs.append(RunJob(run, None, [], offset))  # nothing to measure: reported as failures
                continue
            examples = examples_of(data_files[run.name], run, "training")
            heldout = examples_of(request.heldout, run, "held-out") if request.heldout is not None else []
            jobs.append(RunJob(run, examples, heldout, offset))
        if on_start is not None:
            sizes = tuple(sorted({len(j.examples) for j in jobs if j.examples is not None}))
            heldout_sizes = tuple(sorted({len(j.heldout) for j in jobs if j.heldout}))
            on_start(Plan(len(checkpoints), len(runs), sizes, heldout_sizes, recipe.sampling.k, store.path))

        def measure(run: Run, examples, heldout, offset: int, store: Store, executor: Executor) -> MeasuredRun:
            if examples is None:
                return MeasuredRun(run, data_files.get(run.name), _unreadable(run, recipe, request.engine))
            rendered = loaded[(data_files[run.name].resolve(), tokenizers.identity(run))]
            collected = collect(run.checkpoints, examples, recipe, store, tokenizer=None, sizes=rendered.budgets,
                                engine=request.engine, heldout=heldout, proxy_settings=recipe.proxies,
                                on_progress=_offset(on_progress, offset), executor=executor)
            return MeasuredRun(run, data_files.get(run.name), collected, rendered.examples)

        executor = executor_for(request.engine) if executor is None else executor
        with executor:
            if not executor.in_process and sum(job.examples is not None for job in jobs) > 1:
                measured = _measure_runs_at_once(jobs, measure, request, executor)
            else:
                measured = [measure(*job, store, executor) for job in jobs]
        ranking = rank([m.collected for m in measured], store, recipe.memorization, recipe.stages,
                       pathway_settings=recipe.pathways, threshold=request.threshold,
                       run_names=[m.run.name for m in measured], run_paths=[str(m.run.path) for m in measured])
    return RankResult(ranking, measured, recipe, sum(c.format.usable for c in checkpoints))


# --------------------------------------------------------------------------- rendering, kept in the store


@dataclass(frozen=True)
class Rendered:
    """A data file rendered for one tokenizer: its examples, the rows skipped, and per example the
    sampling budget and the token count of prompt + target (+ EOS)."""

    examples: list[Example]
    skipped: list[str]
    budgets: dict[str, int]
    lengths: dict[str, int]


def render(path: Path, recipe: Recipe, store, *, tokenizer_identity: str, skip_bad: bool,
           tokenizer: Callable[[], object]) -> Rendered:
    """The rendered rows of ``path``, from the store when this file, tokenizer and rendering were seen before.

    What rendering needs of the tokenizer (chat templates, token counts for the sampling
    budgets) is kept with the examples, so re-ranking a measured run loads no tokenizer and
    imports neither torch nor transformers. ``tokenizer`` is called only on a miss. The key
    holds the file's content hash, the tokenizer files' digest and the recipe's data section.
    """
    from ckptsel.collect import budgets
    from ckptsel.data import load_data, token_lengths

    key = store_keys.rendered_rows(_content_digest(path), tokenizer_identity, recipe.data.model_dump(mode="json"),
                                   recipe.sampling.max_new_tokens, skip_bad)
    stored = store.get_value(key)
    if stored is not None:
        if stored["skipped"]:
            log.warning("%s: skipped %d bad row(s); first: %s", path, len(stored["skipped"]), stored["skipped"][0])
        return Rendered([Example(**e) for e in stored["examples"]], stored["skipped"], stored["budgets"],
                        stored["lengths"])
    tok = tokenizer()
    loaded = load_data(path, recipe, tokenizer=tok, skip_bad=skip_bad)
    parts = token_lengths(loaded.examples, tok, recipe.data.append_eos)
    lengths = dict(zip((ex.uid for ex in loaded.examples), parts["total"]))
    rendered = Rendered(loaded.examples, loaded.skipped, budgets(tok, loaded.examples, recipe), lengths)
    store.put_value(key, {"examples": [dataclasses.asdict(e) for e in rendered.examples], "skipped": rendered.skipped,
                          "budgets": rendered.budgets, "lengths": rendered.lengths})
    return rendered


def _content_digest(path: Path) -> str:
    """sha256 of a data file, or of a data folder's files (names, sizes and contents)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- helpers


def _data_files(runs: Sequence[Run], request: RankRequest) -> dict[str, Path]:
    """Each run's training data: the one ``--data``, or ``RUN/<data_per_run>``."""
    if request.data is not None:
        return {run.name: Path(request.data) for run in runs}
    out = {}
    for run in runs:
        path = run.path / request.data_per_run
        if not path.exists():
            raise DataError(f"run {run.name}: no {request.data_per_run} in {run.path} (--data-per-run)")
        out[run.name] = path
    return out


class _Tokenizers:
    """One tokenizer per distinct set of tokenizer files, loaded on first use."""

    def __init__(self, engine: EngineSettings):
        self._engine = engine
        self._by_identity: dict[str, PreTrainedTokenizerBase] = {}
        self._identities: dict[Path, str] = {}

    def identity(self, run: Run) -> str:
        """The digest of the tokenizer files the run's checkpoints are read with (ckptsel.tokenizers.tokenizer_digest)."""
        ckpt = _first_usable(run)
        if ckpt.path not in self._identities:
            self._identities[ckpt.path] = tokenizer_digest(ckpt)
        return self._identities[ckpt.path]

    def for_run(self, run: Run):
        from ckptsel.measure.loading import load_tokenizer

        key = self.identity(run)
        if key not in self._by_identity:
            self._by_identity[key] = load_tokenizer(_first_usable(run),
                                                    trust_remote_code=self._engine.trust_remote_code)
        return self._by_identity[key]


def _first_usable(run: Run) -> Checkpoint:
    return next(c for c in run.checkpoints if c.format.usable)


def _measure_runs_at_once(jobs: list[RunJob], measure: Callable, request: RankRequest,
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

    def one(job: tuple) -> MeasuredRun:
        with Store.open(request.cache_dir) as store:
            return measure(*job, store, executor)

    with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="ckptsel-run") as pool:
        return list(pool.map(one, jobs))


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
