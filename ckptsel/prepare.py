"""One run preparation: what every measurement of a run starts from (ckptsel/DESIGN.md, *How a run flows*).

    from ckptsel.prepare import RankRequest, prepare
    for p in prepare(RankRequest(paths=("run",), data=Path("train.jsonl"), recipe=recipe)):
        p.run, p.examples, p.heldout, p.rendered.budgets, p.checks

:func:`prepare` is the one place that turns a request into runs ready to measure: discovery,
the checks that read only files (:mod:`ckptsel.checks`: one architecture per run, references the
grader can read, rows that fit the model's context), the training data rendered once per data
file and tokenizer (kept in the store, :func:`render`), and the fixed ``--max-examples`` subset.
:func:`ckptsel.pipeline.rank_runs` (so every ranking command, ``verify --data`` and
``merge --recommend``) and the Trainer callback (:mod:`ckptsel.integrations.transformers`) measure
what it returns; ``ckptsel verify`` takes its runs from :func:`checked_runs`, the same discovery and
checks, and renders its test file with :func:`checked_rows`. Nothing here loads a model; a tokenizer
only when the store lacks the rendered rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ckptsel import store_keys
from ckptsel.data import Example
from ckptsel.discover import Checkpoint, Run
from ckptsel.errors import CkptselError, DataError
from ckptsel.settings import EngineSettings, Recipe, SelectionSettings
from ckptsel.tokenizers import tokenizer_digest

if TYPE_CHECKING:
    from ckptsel.store import Store

log = logging.getLogger(__name__)

# The checks a prepared run's rows went through (PreparedRun.checks), by name.
ARCHITECTURE = "architecture"  # checkpoints of another shape than their run's are left out (checks.exclude_...)
GRADER = "grader"  # training references the recipe's grader cannot read (checks.gradable)
CONTEXT = "context"  # rows longer than the model's context (checks.fit_context)


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
class Rendered:
    """A data file rendered for one tokenizer: its examples, the rows skipped, and per example the
    sampling budget and the token count of prompt + target (+ EOS)."""

    examples: list[Example]
    skipped: list[str]
    budgets: dict[str, int]
    lengths: dict[str, int]

    @property
    def n_rows(self) -> int:
        """Rows of the file: every row is rendered or skipped (ckptsel.data.load_data)."""
        return len(self.examples) + len(self.skipped)


@dataclass(frozen=True)
class PreparedRun:
    """One run ready to measure: its checkpoints, its data file, the measured subset of that file's
    rows and the held-out rows (both checked), every rendered row of the file, and the checks applied.

    ``examples`` is None when no checkpoint of the run can be read (nothing to measure; its
    checkpoints are reported as failed) and ``rendered`` is then None too.
    """

    run: Run
    data: Path | None
    examples: list[Example] | None
    heldout: list[Example]
    rendered: Rendered | None
    checks: tuple[str, ...]  # what its training rows went through (ARCHITECTURE, GRADER, CONTEXT; held-out: CONTEXT)
    offset: int  # the run's first checkpoint's position in the request's checkpoints


def checked_runs(paths: Sequence[Path], runs: Sequence[Run] | None = None, *, base_model: str | None,
                 cache_dir: Path | None) -> list[Run]:
    """The runs under ``paths`` (or ``runs``, already discovered), with the checks that read only configs:
    checkpoints of another architecture than their run's marked unusable, a one-line error when no
    checkpoint at all can be read, and a store inside a checkpoint folder refused."""
    from ckptsel import checks
    from ckptsel.discover import discover_runs, no_loadable_checkpoint
    from ckptsel.store import default_cache_dir, ensure_outside

    runs = list(runs) if runs is not None else discover_runs(paths, base_model)
    checks.exclude_other_architectures(runs)  # robustness: a stray model is not mixed into a run's history
    checkpoints = [c for run in runs for c in run.checkpoints]
    if (message := no_loadable_checkpoint(paths, checkpoints)) is not None:
        raise CkptselError(message)
    ensure_outside(cache_dir if cache_dir is not None else default_cache_dir(), [c.path for c in checkpoints])
    return runs


def prepare(request: RankRequest, store: Store | None = None, *, tokenizer=None) -> list[PreparedRun]:
    """The request's runs, each with its checked, rendered, selected examples (module docstring).

    ``store`` keeps the rendered rows (default: the request's, opened here after the checks, so a
    cache dir inside a checkpoint folder is refused before anything is written). ``tokenizer``
    renders on a store miss (default: each run's, read from its first readable checkpoint).
    Raises :class:`CkptselError` for bad input: no loadable checkpoint, a run without its data
    file, a row that does not render or fit, no examples.
    """
    from ckptsel import graders
    from ckptsel.store import Store

    recipe = request.recipe
    if recipe.proxies.alt_grader is not None:
        graders.get(recipe.proxies.alt_grader)  # an unknown name is a usage error before any work
    runs = checked_runs(request.paths, request.runs, base_model=request.base_model, cache_dir=request.cache_dir)
    data_files = _data_files(runs, request)
    grader = graders.get(recipe.data.grader)
    if store is None:
        with Store.open(request.cache_dir) as opened:
            return _Preparation(request, opened, grader, tokenizer).runs(runs, data_files)
    return _Preparation(request, store, grader, tokenizer).runs(runs, data_files)


class _Preparation:
    """One request's data, rendered and checked once per (data file, tokenizer files)."""

    def __init__(self, request: RankRequest, store: Store, grader, tokenizer):
        self.request, self.store, self.grader = request, store, grader
        self.tokenizers = _Tokenizers(request.engine, tokenizer)
        self.rendered: dict[tuple, Rendered] = {}  # (file, tokenizer identity) -> its rendered rows
        self.gradable: dict[tuple, list[Example]] = {}  # (file, tokenizer identity) -> rows the grader can read

    def runs(self, runs: list[Run], data_files: dict[str, Path]) -> list[PreparedRun]:
        prepared: list[PreparedRun] = []
        for run in runs:
            offset = sum(len(p.run.checkpoints) for p in prepared)
            data = data_files[run.name]
            if not any(c.format.usable for c in run.checkpoints):  # nothing to measure: reported as failures
                prepared.append(PreparedRun(run, data, None, [], None, (ARCHITECTURE,), offset))
                continue
            examples = self.examples(data, run, "training")
            heldout = self.examples(self.request.heldout, run, "held-out") if self.request.heldout is not None else []
            rendered = self.rendered[(data.resolve(), self.tokenizers.identity(run))]
            prepared.append(PreparedRun(run, data, examples, heldout, rendered, (ARCHITECTURE, GRADER, CONTEXT),
                                        offset))
        return prepared

    def examples(self, path: Path, run: Run, what: str) -> list[Example]:
        """The checked, selected rows of ``path`` for ``run`` (``what``: "training" or "held-out")."""
        from ckptsel import checks
        from ckptsel.collect import select_examples

        request = self.request
        key = (path.resolve(), self.tokenizers.identity(run))
        if key not in self.rendered:
            self.rendered[key] = render(path, request.recipe, self.store, tokenizer_identity=key[1],
                                        skip_bad=request.skip_bad, tokenizer=lambda: self.tokenizers.for_run(run))
        pool = self.rendered[key].examples
        if what == "training":  # robustness (ckptsel.checks): references the grader cannot read
            if key not in self.gradable:
                self.gradable[key] = checks.gradable(pool, path, self.grader, request.recipe.data.grader,
                                                     skip_bad=request.skip_bad)
            pool = self.gradable[key]
        examples = select_examples(pool, request.selection)
        # robustness: rows longer than the model's context, before any model work
        examples = checks.fit_context(examples, self.rendered[key].lengths, run.checkpoints, path,
                                      skip_bad=request.skip_bad)
        if not examples:
            raise DataError(f"{path}: no {what} examples")
        return examples


def checked_rows(path: Path, checkpoints: Sequence[Checkpoint], recipe: Recipe, store: Store, *, skip_bad: bool,
                 tokenizer, select: Callable[[list[Example]], list[Example]]) -> list[Example]:
    """The rows of another file (``ckptsel verify``'s test file) prepared as a run's: rendered once per file and
    tokenizer (:func:`render`, kept in the store), ``select`` applied, rows longer than the checkpoints' context
    refused (``skip_bad``: dropped). ``tokenizer`` is the checkpoints' (used on a store miss)."""
    from ckptsel import checks

    first = next(c for c in checkpoints if c.format.usable)
    rendered = render(path, recipe, store, tokenizer_identity=tokenizer_digest(first), skip_bad=skip_bad,
                      tokenizer=lambda: tokenizer)
    return checks.fit_context(select(rendered.examples), rendered.lengths, checkpoints, path, skip_bad=skip_bad)


# --------------------------------------------------------------------------- rendering, kept in the store


def render(path: Path, recipe: Recipe, store, *, tokenizer_identity: str, skip_bad: bool,
           tokenizer: Callable[[], object]) -> Rendered:
    """The rendered rows of ``path``, from the store when this file, tokenizer and rendering were seen before.

    What rendering needs of the tokenizer (chat templates, token counts for the sampling
    budgets) is kept with the examples, so re-ranking a measured run loads no tokenizer and
    imports neither torch nor transformers. ``tokenizer`` is called only on a miss. The key
    holds the file's content hash, the tokenizer files' digest (:func:`ckptsel.tokenizers.tokenizer_digest`)
    and the recipe's data section.
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
    """One tokenizer per distinct set of tokenizer files, loaded on first use (``given``: the one to use for all)."""

    def __init__(self, engine: EngineSettings, given=None):
        self._engine = engine
        self._given = given
        self._by_identity: dict[str, object] = {}
        self._identities: dict[Path, str] = {}

    def identity(self, run: Run) -> str:
        """The digest of the tokenizer files the run's checkpoints are read with (ckptsel.tokenizers.tokenizer_digest:
        the one tokenizer identity, shared with the loader's tokenizer cache)."""
        ckpt = first_usable(run)
        if ckpt.path not in self._identities:
            self._identities[ckpt.path] = tokenizer_digest(ckpt)
        return self._identities[ckpt.path]

    def for_run(self, run: Run):
        from ckptsel.tokenizers import load_tokenizer

        if self._given is not None:
            return self._given
        key = self.identity(run)
        if key not in self._by_identity:
            self._by_identity[key] = load_tokenizer(first_usable(run), trust_remote_code=self._engine.trust_remote_code)
        return self._by_identity[key]


def first_usable(run: Run) -> Checkpoint:
    """The run's first checkpoint that can be read (its tokenizer renders the run's data)."""
    return next(c for c in run.checkpoints if c.format.usable)
