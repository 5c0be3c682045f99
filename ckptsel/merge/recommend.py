"""Choose a merge from the ranking (``ckptsel merge RUN --recommend``): candidates -> measure -> pick -> write.

Why merge at all (ckptsel/DESIGN.md, Ruan et al. 2025, arXiv 2508.04117): past a point in
fine-tuning a checkpoint over-memorises, growing sharp on its training phrasing so that
held-out reference perplexity rises while accuracy holds; averaging checkpoints (their ½/½
linear average) is one of the paper's remedies: it lowers that perplexity at the same
accuracy. Whether it does so *for this run* is measured, not assumed: every candidate is
scored with the same train-only metrics, on the same examples, as the ranking.

Candidates, from the ranking (:func:`plan_candidates`):

    single       the recommended checkpoint alone (the reference: always a candidate)
    pair         ½/½ with its predecessor (Ruan et al.'s merge)
    lean pair    ⅓/⅔ with its predecessor: the same direction, a smaller step away from the
                 recommended checkpoint (a ½/½ merge that lowers perplexity can cost accuracy)
    neighbours   uniform average of the predecessor, the recommended checkpoint and the next
                 unflagged one: a three-checkpoint window centred on the recommendation
    window       uniform average of the unflagged checkpoints from the recommended one to the
                 last unflagged one (skipped when that is the recommended one itself)
    model_stock  Model Stock (Jang et al. 2024) toward the base, over the window (or the
                 neighbours, or the pair), when the base is known: LoRA runs (their adapters'
                 base; merged exactly in ΔW space) and full runs with --base-model

Each merge is built into a temporary folder, measured through :func:`ckptsel.collect.collect`
(its content fingerprint keys the store, so a rerun measures nothing), and read as if it
had been saved right after its latest input: its pre-memorization accuracy takes the run's
history up to that input, then the merge (:func:`candidate_metrics`). The rule
(:func:`choose`, stated in :data:`RULE`): among the candidates whose pre-memorization
accuracy is at most ``tolerance`` below the recommended checkpoint's, the lowest
over-memorization proxy (the ranking's: held-out, alternative-solution or perturbed-prompt
NLL). The recommended checkpoint always qualifies, so there is always a winner; it is
written through :func:`ckptsel.merge.merge` with the table in its model card.

Why the guard is pre-memorization accuracy and not train accuracy: pre-memorization accuracy
is the train-only predictor of test accuracy (Kang et al. 2024); train accuracy also counts
answers reproduced from memory, which a merge that undoes over-memorization is expected to
lose. On the lab (``benchmarks/merge_recommend_validation.py``) a train-accuracy guard
rejected the ½/½ merge in runs where it had both lower held-out NLL and higher held-out
accuracy than the recommended checkpoint.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ckptsel import store_keys
from ckptsel.columns import COLUMNS
from ckptsel.errors import CkptselError

if TYPE_CHECKING:
    from ckptsel.discover import Checkpoint
    from ckptsel.merge import MergeResult
    from ckptsel.merge.plan import MergePlan
    from ckptsel.select import CheckpointMetrics

log = logging.getLogger(__name__)

TOLERANCE = 0.01  # pre-memorization accuracy a candidate may lose against the recommended checkpoint
LEAN_SHARE = 2 / 3  # the recommended checkpoint's share in the lean pair
RULE = ("among the candidates whose pre-memorization accuracy (the predictor of test accuracy) is at most {tol:g} "
        "below the recommended checkpoint's, the lowest {proxy} (the over-memorization proxy; Ruan et al. 2025: "
        "merging checkpoints lowers held-out perplexity at equal accuracy); ties go to the earlier candidate")
NO_PROXY_RULE = "no perplexity proxy was measured, so the recommended checkpoint alone is kept"

Stage = Callable[[str], None]


class RecommendError(CkptselError):
    """``--recommend`` cannot build candidates from this ranking."""


@dataclass(frozen=True)
class CandidateSpec:
    """One candidate: which run checkpoints (indices, training order) are merged, and how."""

    name: str  # single, pair, lean_pair, neighbours, window, model_stock
    members: tuple[int, ...]
    method: str = "linear"
    weights: tuple[float, ...] | None = None  # relative, per member; None: equal (or none, for model_stock)

    @property
    def latest(self) -> int:
        return max(self.members)


def plan_candidates(flagged: Sequence[bool | None], recommended: int | None, base_known: bool,
                    lean_share: float = LEAN_SHARE) -> tuple[list[CandidateSpec], list[str]]:
    """The candidates (and a note per skipped one) from the ranking's rows in training order.

    ``flagged[i]``: True when checkpoint i is flagged over-memorized, None when it was not
    measured (it takes no part). Pure: the ranking's rows in, specs out; a candidate whose
    members and weights repeat an earlier one's is skipped.
    """
    measured = [i for i, f in enumerate(flagged) if f is not None]
    if recommended is None or recommended not in measured:
        raise RecommendError("the ranking recommends no checkpoint, so there is nothing to merge around")
    if len(measured) < 2:
        raise RecommendError("the run has a single measured checkpoint; merging needs at least two")
    out, notes = [CandidateSpec("single", (recommended,))], []

    def add(spec: CandidateSpec, why_not: str | None = None) -> None:
        if why_not is not None:
            notes.append(f"{spec.name.replace('_', ' ')}: {why_not}")
        elif any(c.members == spec.members and c.weights == spec.weights and c.method == spec.method for c in out):
            notes.append(f"{spec.name.replace('_', ' ')}: the same merge as an earlier candidate")
        else:
            out.append(spec)

    earlier = [i for i in measured if i < recommended]
    unflagged = [i for i in measured if not flagged[i]]
    window = tuple(i for i in unflagged if i >= recommended)
    pair = (earlier[-1], recommended) if earlier else ()
    neighbours = pair + window[1:2] if pair and len(window) > 1 else ()
    first = None if pair else "the recommended checkpoint is the first one measured"
    last = None if len(window) > 1 else "no unflagged checkpoint after the recommended one"
    add(CandidateSpec("pair", pair), first)
    add(CandidateSpec("lean_pair", pair, weights=(1 - lean_share, lean_share)), first)
    add(CandidateSpec("neighbours", neighbours), first or last)
    add(CandidateSpec("window", window), last)
    if base_known:
        stock = next((m for m in (window, neighbours, pair) if len(m) > 1), ())
        if stock:
            out.append(CandidateSpec("model_stock", stock, "model_stock"))
    return out, notes


def choose(premem: np.ndarray, proxy: np.ndarray | None, tolerance: float = TOLERANCE) -> tuple[int, np.ndarray]:
    """Index of the winner and the eligibility mask; row 0 is the recommended checkpoint.

    Eligible: pre-memorization accuracy at most ``tolerance`` below row 0's (NaN: not
    eligible). Winner: the lowest proxy among the eligible (lower is better, Ruan et al.),
    the first on a tie; row 0 when there is no proxy.
    """
    premem = np.asarray(premem, float)
    with np.errstate(invalid="ignore"):
        eligible = premem >= premem[0] - tolerance
    eligible[0] = True  # the reference qualifies even when its own numbers are NaN
    if proxy is None:
        return 0, eligible
    values = np.where(eligible & ~np.isnan(proxy), np.asarray(proxy, float), np.inf)
    return (int(np.argmin(values)) if np.isfinite(values).any() else 0), eligible


# --------------------------------------------------------------------------- building and measuring


@dataclass
class Candidate:
    """A candidate on its way through build -> measure; ``error`` when its build or measurement failed."""

    spec: CandidateSpec
    label: str
    plan: MergePlan
    checkpoint: Checkpoint | None = None  # the measured checkpoint: the run's own, or the built merge
    metrics: CheckpointMetrics | None = None
    error: str | None = None


@dataclass
class Recommendation:
    """The comparison and what was written."""

    candidates: list[Candidate]
    chosen: int
    eligible: list[bool]
    rule: str
    proxy: str | None
    tolerance: float
    n_examples: int
    notes: list[str] = field(default_factory=list)
    measured: int = 0  # checkpoint loads this call needed (0 on a cached rerun)
    warnings: list[str] = field(default_factory=list)
    result: MergeResult | None = None

    def rows(self) -> list[dict]:
        """One row per candidate: what it is, its metrics, whether it qualified, whether it won."""
        rows = []
        for n, c in enumerate(self.candidates):
            m = c.metrics
            value = (lambda name: _num(getattr(m, name)) if m is not None else None)
            rows.append({
                "candidate": c.label,
                "name": c.spec.name,
                "method": c.spec.method,
                "steps": [ckpt.step for ckpt in c.plan.inputs],
                **{column.key: value(column.key) for column in COLUMNS},
                "premem_ci": list(value("premem_ci")) if m is not None else None,
                "proxy": value(self.proxy) if self.proxy else None,
                "fingerprint": m.fingerprint if m is not None else None,
                "eligible": bool(self.eligible[n]),
                "chosen": n == self.chosen,
                **({"error": c.error} if c.error else {}),
            })
        return rows

    @property
    def winner(self) -> Candidate:
        return self.candidates[self.chosen]

    def justification(self) -> dict:
        """What the model card and sidecar say about why this merge was written."""
        return {
            "chosen": self.winner.label,
            "rule": self.rule,
            "proxy": self.proxy,
            "tolerance": self.tolerance,
            "n_examples": self.n_examples,
            "candidates": self.rows(),
            **({"skipped": "; ".join(self.notes)} if self.notes else {}),
            **({"warnings": list(self.warnings)} if self.warnings else {}),
        }

    def to_json(self) -> dict:
        out = {**self.justification(), "measured": self.measured}
        if self.result is not None:
            out["output"] = self.result.to_dict()
        return out


def _num(value):
    if isinstance(value, tuple):
        return tuple(_num(v) for v in value)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


_FRACTIONS = {(1, 2): "½", (1, 3): "⅓", (2, 3): "⅔", (1, 4): "¼", (3, 4): "¾"}


def _share(weight: float, total: float) -> str:
    from fractions import Fraction

    f = Fraction(weight / total).limit_denominator(12)
    return _FRACTIONS.get((f.numerator, f.denominator), f"{f.numerator}/{f.denominator}")


def _label(spec: CandidateSpec, steps: list) -> str:
    names = [f"step {s}" if s is not None else "final" for s in steps]
    if spec.name == "single":
        return f"{names[0]} alone"
    if spec.method == "model_stock":
        return f"model_stock of {', '.join(names)}"
    if spec.weights is None and len(names) > 2:
        return f"mean of {', '.join(names)}"
    weights = spec.weights or (1.0,) * len(names)
    return " + ".join(f"{_share(w, sum(weights))} {n}" for w, n in zip(weights, names))


def recommend(run, store, *, engine, out, force: bool = False, base_model: str | None = None,
              tolerance: float = TOLERANCE, lean_share: float = LEAN_SHARE, work_dir: Path | None = None,
              on_progress=None, on_stage: Stage | None = None, executor=None) -> Recommendation:
    """Build, measure and compare the candidates of a ranked ``run``; write the winner to ``out``.

    ``run``: a :class:`ckptsel.pipeline.RankResult` of one run (ranking, collected, recipe;
    :meth:`~ckptsel.pipeline.RankResult.run_view` of a sweep's): the candidates are measured on its
    prepared examples (:func:`ckptsel.prepare.prepare`) with its recipe's proxy and stage settings.
    ``base_model``: the base of full checkpoints (enables model_stock; LoRA runs have theirs).
    ``lean_share``: the recommended checkpoint's share in the lean pair. Merges are
    built in a temporary folder in ``work_dir`` (default: beside ``out``), removed afterwards.
    ``on_progress`` receives :class:`ckptsel.progress.Progress`; ``on_stage`` a line per step.
    ``executor`` measures the candidates (:func:`ckptsel.collect.collect`'s; default: this process).
    The comparison is also stored, under :func:`ckptsel.store_keys.merge_recommendation`.
    """
    from ckptsel.merge import merge
    from ckptsel.merge.output import check_free_space, check_target, clean_leftovers, leftover_name
    from ckptsel.outputs import write_errors

    ranking, collected = run.ranking, run.collected
    stage = on_stage or (lambda line: None)
    flagged = [None if c.error or c.fingerprint is None else c.flag is not None for c in ranking.checkpoints]
    adapters = any(c.format.is_adapter for c in collected.checkpoints)
    # An adapter names its base, and model_stock of adapters is computed on their ΔW (lora.py).
    specs, notes = plan_candidates(flagged, ranking.recommended, base_known=adapters or base_model is not None,
                                   lean_share=lean_share)
    if not adapters and base_model is None:
        notes.append("model_stock: needs --base-model (the base of full checkpoints)")
    out = Path(out).absolute()
    check_target(out, force)
    candidates = [_candidate(spec, collected.checkpoints, base_model, out, engine) for spec in specs]
    parent = Path(work_dir or out.parent).absolute()
    parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(parent)  # candidates of a killed run (their process is gone) before counting free space
    check_free_space(parent, sum(c.plan.estimated_bytes() for c in candidates if c.spec.name != "single"))
    # Named like a partial merge, so a killed run's candidates are removed by the next merge here.
    work = leftover_name(parent / out.name, "partial")
    work.mkdir()
    try:
        with write_errors(work):  # a disk that fills up while candidates are built: one line
            built = _build(candidates, work, stage)
        stage(f"measuring {len(built)} merged candidate(s) on {len(collected.examples)} examples")
        combined = _measure(run, built, store, engine=engine, on_progress=on_progress, executor=executor)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _score(candidates, combined, run, store)
    proxy = ranking.proxy
    column = (lambda name: np.array([_nan(c, name) for c in candidates]))
    winner, eligible = choose(column("premem_acc"), column(proxy) if proxy else None, tolerance)
    pick = ranking.checkpoints[ranking.recommended]
    warning = frozen_premem_warning(candidates[winner].spec.name, pick.memorized_frac,
                                    run.recipe.stages.memorized_min)
    rec = Recommendation(candidates, winner, eligible.tolist(),
                         RULE.format(tol=tolerance, proxy=proxy) if proxy else NO_PROXY_RULE,
                         proxy, tolerance, len(collected.examples), notes, measured=combined.loaded,
                         warnings=[warning] if warning else [])
    stage(f"writing {rec.winner.label} to {out}")
    rec.result = merge(rec.winner.plan, out, force=force, justification=rec.justification())
    store.put_value(store_keys.merge_recommendation(ranking.checkpoints[ranking.recommended].fingerprint),
                    {**rec.justification(), "output": str(out), "settings_key": collected.settings_key})
    return rec


def frozen_premem_warning(winner: str, memorized_frac: float, memorized_min: float) -> str | None:
    """A merge chosen around a pick whose examples are (nearly) all memorised: pre-memorization accuracy is
    frozen there (each memorised example keeps its value from before memorisation), so the "within tolerance"
    test cannot see what the merge costs in accuracy. On the lab's second check grid such merges lowered
    held-out NLL by 0.037 and accuracy by 0.002-0.036 (benchmarks/README.md)."""
    if winner == "single" or not memorized_frac >= memorized_min:
        return None
    return (f"the recommended checkpoint has {memorized_frac:.0%} of its examples memorised, so pre-memorization "
            "accuracy is frozen and cannot show what this merge costs in accuracy; check it on held-out data "
            "(ckptsel verify)")


def _score(candidates: list[Candidate], combined, run, store) -> None:
    """Fill in each measured candidate's metrics (or its measurement failure), with the run's
    memorisation threshold and perplexity proxy held fixed."""
    positions = {id(ckpt): i for i, ckpt in enumerate(combined.checkpoints)}
    pinned = run.recipe.stages.model_copy(update={"proxy": run.ranking.proxy or "auto"})
    memorization = _pinned_memorization(run)
    for c in candidates:
        if c.checkpoint is None:
            continue
        pos = positions[id(c.checkpoint)]
        if pos in combined.failures:
            c.error = combined.failures[pos]
        else:
            c.metrics = candidate_metrics(combined, pos, c.spec.latest, store, memorization, pinned)


def _nan(candidate: Candidate, name: str) -> float:
    value = getattr(candidate.metrics, name, None) if candidate.metrics is not None else None
    return math.nan if value is None else float(value)


def _candidate(spec: CandidateSpec, checkpoints, base_model: str | None, out: Path, engine) -> Candidate:
    from ckptsel.merge import plan_merge

    inputs = [checkpoints[i] for i in spec.members]
    # ZeRO and FSDP checkpoints are merged from the converted copies the ranking read (the engine's cache dir).
    plan = plan_merge(inputs, method=spec.method, weights=spec.weights,
                      base_model=base_model if spec.method == "model_stock" else None, out=out,
                      allow_pickle=engine.allow_pickle, cache_dir=engine.cache_dir)
    return Candidate(spec, _label(spec, [c.step for c in inputs]), plan)


def _build(candidates: list[Candidate], work: Path, stage: Stage) -> list:
    """Build each merge candidate under ``work``; the single checkpoint is measured as it is."""
    from ckptsel.discover import describe
    from ckptsel.merge import build

    built = []
    for c in candidates:
        if c.spec.name == "single":
            c.checkpoint = c.plan.inputs[0]
            continue
        folder = work / c.spec.name
        folder.mkdir()
        stage(f"building {c.label}")
        try:
            build(c.plan, folder)
        except CkptselError as exc:
            c.error = str(exc)
            log.info("candidate %s: %s", c.label, exc)
            continue
        base = c.plan.base_model if c.plan.adapters else None
        c.checkpoint = describe(folder, base)
        built.append(c.checkpoint)
    return built


def _measure(run, built: list, store, *, engine, on_progress, executor):
    """The run's checkpoints (all stored already) and the built candidates, through collect, on the run's
    prepared examples and sampling budgets.

    The run's checkpoints come first so the alternative-solution set is the run's own; when
    that set is not fixed yet the candidates are not alt-scored (their samples must not join it).
    """
    from ckptsel.collect import collect
    from ckptsel.kinds import DEFAULT_KINDS

    collected = run.collected
    harvest_fixed = collected.harvest is not None and collected.harvest.fixed
    kinds = [k for k in DEFAULT_KINDS if harvest_fixed or k != "alt"]
    return collect([*collected.checkpoints, *built], collected.examples, run.recipe, store, tokenizer=None,
                   sizes=run.runs[0].budgets, engine=engine, kinds=kinds, heldout=collected.heldout,
                   proxy_settings=run.recipe.proxies, on_progress=on_progress, executor=executor)


def _pinned_memorization(run):
    """The run's memorisation rule with the threshold the ranking used (an auto one stays as fitted)."""
    used = run.ranking.threshold.used
    memorization = run.recipe.memorization
    return memorization if used is None else memorization.model_copy(update={"threshold": used})


def candidate_metrics(combined, position: int, latest: int, store, memorization, overmem):
    """A candidate's metrics, read as if it were saved right after run checkpoint ``latest``.

    The history is the run's checkpoints up to ``latest`` (the candidate itself left out when
    it is one of them), then the candidate: its pre-memorization accuracy credits examples the
    run answered before memorising them, capped by the candidate's own accuracy (Kang et al.).
    """
    from ckptsel.collect import Collected
    from ckptsel.select import rank

    order = [i for i in range(latest + 1) if i != position] + [position]
    view = Collected(
        [combined.checkpoints[i] for i in order], [combined.fingerprints[i] for i in order], combined.settings_key,
        combined.examples, failures={n: combined.failures[i] for n, i in enumerate(order) if i in combined.failures},
        heldout=combined.heldout, series=combined.series, harvest=combined.harvest,
    )
    return rank(view, store, memorization, overmem).checkpoints[-1]
