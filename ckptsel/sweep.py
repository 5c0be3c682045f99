"""The ranking rule over arrays: one run, or a sweep of runs, with no model and no store.

``ckptsel rank`` measures and then calls :func:`rank_sweep`; so can anyone who measured
elsewhere (Kang et al.'s released per-example arrays, another harness)::

    from ckptsel.sweep import RunArrays, rank_sweep
    result = rank_sweep([RunArrays(name="lr2e-5", steps=[58, 116], acc=acc, nll=nll), ...], recipe="gsm8k")
    result.recommended      # (run name, step)
    result.runs             # one RunRanking per run: .steps, .columns["premem_acc"] ... (ckptsel.columns)

``acc`` and ``nll`` are ``(checkpoints, examples)`` arrays in training order (the fraction of
the k samples graded correct; the mean target NLL in nats per token). Optional arrays: copy
rates (the copy rule, ``--threshold auto``), entropy and the over-memorization proxies
(perturbed-prompt, alternative-solution and held-out NLL per example).

The rule (ckptsel/DESIGN.md, "Runs and sweeps"):

1. **Memorisation threshold.** A fixed ν, or ``"auto"``: calibrated on the pooled
   (checkpoint, example) pairs of the whole sweep (``threshold_scope="sweep"``) or of each run
   (``"run"``). Where it cannot be fitted (no sample copies yet) the recipe's ν is used, with a
   warning.
2. **Per run** (history j ≤ J never crosses runs): pre-memorization accuracy per example and
   its bootstrap interval, the stage of each checkpoint and the over-memorized flag
   (:mod:`ckptsel.stages`), and the run's recommendation (:func:`ckptsel.stages.recommend`).
3. **Across runs**: the runs' recommendations compete under the same rule -- the highest
   pre-memorization accuracy; among those within ``recommend_se`` standard errors of it (the
   unflagged ones if any: a flagged pick is passed over only for one as accurate), the
   lowest rise of the proxy over its own run's minimum (a ratio: each run harvests its own
   alternative solutions, so raw proxy values are not comparable between runs). The standard
   error is that of the paired per-example gap when the two runs were measured on the same
   examples, and the unpaired one otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ckptsel import metrics, stages
from ckptsel.columns import KEYS, MEASURES, Inputs, compute_columns
from ckptsel.settings import MemorizationSettings, OvermemSettings, Recipe

PROXIES = ("heldout_nll", "alt_nll", "perturb_nll")  # auto's order of preference
_NAMED = ("acc", "nll", "copy", "entropy", "perturb", "alt", "heldout")  # RunArrays' own fields


@dataclass(frozen=True)
class RunArrays:
    """One run's measurements: ``(checkpoints, examples)`` arrays, checkpoints in training order.

    ``examples``: one id per example column. Runs that share most of their ids (at least half of
    the smaller set; in any order) are compared paired over the shared ones; without ids, runs
    with the same number of examples are assumed to share them only when ``paired_by_position``
    is set. ``alt_coverage``: fraction of examples that have an alternative solution (the
    alternative-solution NLL is used as the proxy above ``OvermemSettings.min_alt_coverage``);
    NaN means "count the examples with a value". ``alt_source_of``: per example, the row whose
    sample is its alternative solution (-1: none). A checkpoint's alternative-solution NLL leaves out the alternatives it sampled itself:
    a checkpoint scores its own samples best, so with them its value is low by construction and every
    later checkpoint seems to rise.
    """

    name: str
    steps: Sequence[int | None]
    acc: np.ndarray
    nll: np.ndarray
    copy: np.ndarray | None = None
    entropy: np.ndarray | None = None
    perturb: np.ndarray | None = None
    alt: np.ndarray | None = None
    heldout: np.ndarray | None = None  # (checkpoints, held-out examples)
    examples: Sequence[str] | None = None
    paired_by_position: bool = False
    alt_coverage: float = math.nan
    alt_source_of: Sequence[int] = ()  # per example column: the row whose sample is its alternative (-1: none)
    measures: Mapping[str, np.ndarray] = field(default_factory=dict)  # further ckptsel.columns.MEASURES, by name

    def matrix(self, name: str) -> np.ndarray:
        """The named array as float, or all NaN of the right shape when it was not given."""
        value = getattr(self, name, None) if name in _NAMED else self.measures.get(name)
        if value is not None:
            return np.asarray(value, dtype=float)
        width = 0 if name == "heldout" else np.shape(self.acc)[1]
        return np.full((len(self.steps), width), np.nan)


@dataclass
class Threshold:
    """The memorisation rule that was used, and the alternatives beside it."""

    rule: str  # "nll", "peak-nll" or "copy"
    used: float | None  # nu in nats/token for the nll rules; None for the copy rule
    recipe_default: float | None
    auto: float | None = None  # calibrated from copy rates, when it could be fitted
    auto_auc: float | None = None
    auto_note: str | None = None  # why auto could not be fitted
    scope: str = "sweep"  # what auto was calibrated on: "sweep" (pooled pairs) or "run"
    fell_back: bool = False  # auto was asked for, could not be fitted, and the recipe's nu was used
    per_run: dict[str, float] = field(default_factory=dict)  # scope "run": each run's nu


@dataclass
class RunRanking:
    """One run ranked: per-checkpoint columns (arrays of length C), stages, flags, its pick."""

    name: str
    steps: list[int | None]
    columns: dict[str, np.ndarray]
    premem_ci: tuple[np.ndarray, np.ndarray]
    stages: list[str]
    flags: list[stages.Flag | None]
    proxy: str | None
    recommended: int | None  # index into the run's checkpoints
    threshold: float | None
    per_example: np.ndarray  # (C, N) PM_i(J)
    memorized: np.ndarray  # (C, N) mask
    warnings: list[str] = field(default_factory=list)


@dataclass
class SweepResult:
    runs: list[RunRanking]
    recommended: tuple[str, int | None] | None  # (run name, step)
    recommended_run: int | None  # index into runs
    threshold: Threshold
    rule: str
    warnings: list[str] = field(default_factory=list)


SWEEP_RULE = (
    "across runs: each run's recommendation competes; the highest pre-memorization accuracy, and among those "
    "within {se:g} SE of it (paired where runs share examples, unpaired otherwise; not underfit against the best if "
    "any is not) the lowest rise of the proxy over its own run's minimum"
)


# --------------------------------------------------------------------------- the rule


def rank_sweep(
    runs: Sequence[RunArrays],
    recipe: str | Recipe | None = None,
    *,
    memorization: MemorizationSettings | None = None,
    overmem: OvermemSettings | None = None,
    threshold: float | str | None = None,
    threshold_scope: str = "sweep",
    n_boot: int = 1000,
    level: float = 0.95,
) -> SweepResult:
    """Rank every checkpoint of every run, recommend one per run and one for the sweep (module docstring).

    ``recipe``: a built-in name, a file, or a :class:`Recipe`; its ``memorization`` and
    ``stages`` sections are the defaults of ``memorization`` and ``overmem``. ``threshold``
    overrides the recipe's ν: a number, or ``"auto"`` (calibrated; ``threshold_scope``
    "sweep" pools the pairs of all runs, "run" fits each run alone).
    """
    if not runs:
        raise ValueError("rank_sweep needs at least one run")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"run names must be unique; got {names}")
    if threshold_scope not in ("sweep", "run"):
        raise ValueError(f"threshold_scope must be 'sweep' or 'run', not {threshold_scope!r}")
    recipe = _recipe(recipe)
    memorization = memorization or (recipe.memorization if recipe else MemorizationSettings())
    overmem = overmem or (recipe.stages if recipe else OvermemSettings())
    for run in runs:
        _check(run)

    report, per_run_nu, warnings = resolve_threshold(runs, memorization, threshold, threshold_scope)
    ranked = [rank_run(run, memorization, overmem, per_run_nu.get(run.name, report.used), n_boot=n_boot,
                       level=level) for run in runs]
    pick = _sweep_pick(runs, ranked, overmem) if len(runs) > 1 else (0 if ranked[0].recommended is not None else None)
    rec = None if pick is None else (ranked[pick].name, ranked[pick].steps[ranked[pick].recommended])
    rule = stages.recommend_rule(overmem.prefer).format(se=overmem.recommend_se, proxy=_proxy_label(ranked),
                                                        tie=overmem.proxy_tie)
    if len(runs) > 1:
        rule += "; " + SWEEP_RULE.format(se=overmem.recommend_se)
    return SweepResult(ranked, rec, pick, report, rule, warnings)


def resolve_threshold(
    runs: Sequence[RunArrays], memorization: MemorizationSettings, threshold: float | str | None, scope: str
) -> tuple[Threshold, dict[str, float], list[str]]:
    """The ν each run uses, the report of it, and the warnings (auto that fell back to the recipe's ν)."""
    asked = memorization.threshold if threshold is None else threshold
    default = memorization.threshold if memorization.threshold != "auto" else None
    report = Threshold(rule=memorization.rule, used=None, recipe_default=default, scope=scope)
    warnings: list[str] = []
    nll = [r.matrix(memorization.nll_measure) for r in runs]  # the measure nu is compared with
    copy = [r.matrix("copy") for r in runs]
    try:  # shown beside a fixed nu too, so users see what auto would do
        cal = metrics.calibrate_threshold(np.concatenate([n.ravel() for n in nll]),
                                          np.concatenate([c.ravel() for c in copy]), memorization.copy_fraction)
        report.auto, report.auto_auc = cal.threshold, cal.auc
    except metrics.CalibrationError as err:
        report.auto_note = str(err)
    if memorization.rule == "copy":
        return report, {}, warnings
    if asked != "auto":
        report.used = float(asked)
        return report, {}, warnings
    if scope == "run":
        per_run = {}
        for run, n, c in zip(runs, nll, copy):
            try:
                per_run[run.name] = metrics.calibrate_threshold(n, c, memorization.copy_fraction).threshold
            except metrics.CalibrationError as err:
                per_run[run.name] = _fallback(default, err, f"run {run.name}", warnings)
        report.per_run = per_run
        report.used = per_run[runs[0].name] if len(runs) == 1 else None
        report.fell_back = any(w.startswith("--threshold auto") for w in warnings)
        return report, per_run, warnings
    if report.auto is not None:
        report.used = report.auto
    else:
        report.used = _fallback(default, metrics.CalibrationError(report.auto_note), "the sweep", warnings)
        report.fell_back = True
    return report, {}, warnings


def _fallback(default: float | None, err: Exception, where: str, warnings: list[str]) -> float:
    if default is None:
        raise metrics.CalibrationError(f"{err} (and the recipe gives no fixed threshold to fall back to)")
    warnings.append(f"--threshold auto could not be fitted on {where} ({err}); using the recipe's "
                    f"nu = {default:g} nats/token")
    return default


def rank_run(run: RunArrays, memorization: MemorizationSettings, overmem: OvermemSettings, threshold: float | None,
             *, n_boot: int = 1000, level: float = 0.95) -> RunRanking:
    """One run: PM per example (history inside the run), interval, stages, flags and its pick."""
    m = {measure.name: run.matrix(measure.name) for measure in MEASURES}
    m.update({name: np.asarray(values, dtype=float) for name, values in run.measures.items()})
    if len(run.alt_source_of):  # a checkpoint scores its own samples best: its own alternatives are left out
        own = np.asarray(run.alt_source_of)[None, :] == np.arange(len(run.steps))[:, None]
        m["alt"] = np.where(own, np.nan, m["alt"])
    if memorization.rule == "copy":
        mask = metrics.memorized_by_copy(m["copy"], memorization.copy_fraction) | np.isnan(m["copy"])
        measured_mask = ~np.isnan(m["copy"])
    else:
        values = m[memorization.nll_measure]
        if memorization.rule == "peak-nll" and np.isnan(values).all() and not np.isnan(m["nll"]).all():
            raise ValueError(f"run {run.name}: the peak-nll rule needs each target's costliest-token NLL "
                             f"(peak_nll), which these measurements lack")
        mask = metrics.memorized(values, threshold) | np.isnan(values)
        measured_mask = ~np.isnan(values)
    per_example = metrics.premem_accuracy_per_example_from_mask(m["acc"], mask)
    pm = metrics.per_checkpoint_mean(per_example)
    lo, hi = metrics.bootstrap_ci(per_example, n_boot=n_boot, level=level)
    computed = compute_columns(Inputs(m, mask, measured_mask, threshold if memorization.rule != "copy" else None,
                                      memorization.nll_measure))
    columns = {key: pm if key == "premem_acc" else computed[key] for key in KEYS if key in computed or
               key == "premem_acc"}
    warnings: list[str] = []
    coverage = run.alt_coverage
    if math.isnan(coverage) and run.alt is not None:
        coverage = float((~np.isnan(m["alt"])).any(axis=0).mean()) if m["alt"].size else 0.0
    proxy, note = choose_proxy(columns, coverage, overmem)
    if note:
        warnings.append(note)
    proxy_values = columns[proxy] if proxy else np.full(len(pm), np.nan)
    assessment = stages.assess(columns["train_acc"], pm, columns["memorized_frac"], proxy_values, proxy or "proxy",
                               overmem)
    columns["proxy_ratio"] = assessment.ratio
    flagged = np.array([f is not None for f in assessment.flags], dtype=bool)
    support = metrics.premem_support(m["acc"], mask)
    if (warning := support.warning()) is not None:
        warnings.append(warning)
    if len(pm) < 3:
        warnings.append(f"only {len(pm)} checkpoint(s) measured; pre-memorization accuracy needs the history "
                        "before memorisation — save more frequent checkpoints")
    if flagged.size and flagged.all():
        warnings.append("every measured checkpoint is flagged over-memorized; recommending among all of them")
    # Without any proxy the tie-break falls back to the memorised fraction (lower is better too).
    tie_break = proxy_values if proxy else columns["memorized_frac"]
    underfit = np.array([stage == stages.UNDERFIT for stage in assessment.stages])
    pick = stages.recommend(per_example, tie_break, flagged, overmem.proxy_tie, overmem.recommend_se, overmem.prefer,
                            underfit=underfit)
    if pick is not None and flagged[pick] and not flagged.all():
        robust = stages.recommend(per_example, tie_break, flagged, overmem.proxy_tie, overmem.recommend_se,
                                  "robustness", underfit=underfit)
        warnings.append(_flagged_pick_warning(run, pm, assessment, pick, robust, proxy or "proxy"))
    return RunRanking(run.name, list(run.steps), columns, (lo, hi), assessment.stages, assessment.flags, proxy, pick,
                      threshold, per_example, mask, warnings)


def _flagged_pick_warning(run: RunArrays, pm: np.ndarray, assessment, pick: int, alt: int, proxy: str) -> str:
    """Accuracy first recommended an over-memorized checkpoint: say so, with the cost of ``alt``, what
    ``--prefer robustness`` recommends (a sweep's ranking names the run in front, as for every per-run warning)."""
    rise = (float(assessment.ratio[pick]) - 1.0) * 100
    return (f"the most accurate checkpoint (step {run.steps[pick]}) is flagged over-memorized: {proxy} "
            f"+{rise:.0f}% over its minimum; the best checkpoint that is not is step {run.steps[alt]}, "
            f"{pm[alt] - pm[pick]:+.3f} predicted accuracy (--prefer robustness recommends it)")


def choose_proxy(
    columns: dict[str, np.ndarray], alt_coverage: float, overmem: OvermemSettings
) -> tuple[str | None, str | None]:
    """The perplexity proxy for the flag, and a warning when the asked one could not be used.

    auto: the first of :data:`PROXIES` that was measured (the alternative-solution NLL only
    when at least ``min_alt_coverage`` of the examples have an alternative solution).
    """
    def usable(name: str) -> bool:
        if name == "alt_nll" and not alt_coverage >= overmem.min_alt_coverage:
            return False
        return not np.isnan(columns[name]).all()

    if overmem.proxy != "auto":
        if usable(overmem.proxy):
            return overmem.proxy, None
        fallback = next((p for p in PROXIES if usable(p)), None)
        return fallback, f"proxy {overmem.proxy} was not measured (or covers too few examples); using {fallback}"
    return next((p for p in PROXIES if usable(p)), None), None


def _sweep_pick(runs: Sequence[RunArrays], ranked: Sequence[RunRanking], overmem: OvermemSettings) -> int | None:
    """Which run's recommendation the sweep recommends (rule 3 of the module docstring)."""
    cands = [r for r, rr in enumerate(ranked) if rr.recommended is not None
             and not math.isnan(rr.columns["premem_acc"][rr.recommended])]
    if not cands:
        return None
    pm = {r: float(ranked[r].columns["premem_acc"][ranked[r].recommended]) for r in cands}
    flagged = {r: ranked[r].flags[ranked[r].recommended] is not None for r in cands}
    if overmem.prefer == "robustness" and not all(flagged.values()):
        cands = [r for r in cands if not flagged[r]]
    best = max(cands, key=lambda r: (pm[r], -r))
    close = []
    for r in cands:
        gap, se = gap_between(runs[r], ranked[r], runs[best], ranked[best])
        if gap >= -overmem.recommend_se * se:
            close.append(r)
    # Stage (a) across the sweep: a pick whose predicted accuracy is below underfit_fraction of the best one's
    # is not chosen over a close one that is not (on a handful of examples one SE spans most runs).
    low = {r: pm[r] == 0 or pm[r] < overmem.underfit_fraction * pm[best] for r in close}
    if not all(low.values()):
        close = [r for r in close if not low[r]]
    if not all(flagged[r] for r in close):
        close = [r for r in close if not flagged[r]]  # a flagged pick only where no clean one is as accurate
    ratio = {r: float(ranked[r].columns["proxy_ratio"][ranked[r].recommended]) for r in close}
    with_proxy = [r for r in close if not math.isnan(ratio[r])]
    if not with_proxy:
        return best
    lowest = min(ratio[r] for r in with_proxy)
    tied = [r for r in with_proxy if ratio[r] <= lowest * (1.0 + overmem.proxy_tie)]
    return max(tied, key=lambda r: (pm[r], -r))


def gap_between(run: RunArrays, ranked: RunRanking, ref_run: RunArrays, ref: RunRanking) -> tuple[float, float]:
    """PM of ``run``'s pick minus ``ref_run``'s, and its standard error (paired when they share examples)."""
    a = ranked.per_example[ranked.recommended]
    b = ref.per_example[ref.recommended]
    pairs = shared_columns(run, ref_run)
    if pairs is not None:
        d = a[pairs[0]] - b[pairs[1]]
        d = d[~np.isnan(d)]
        if d.size == 0:
            return math.nan, 0.0
        return float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else 0.0
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    if a.size == 0 or b.size == 0:
        return math.nan, 0.0
    var = (a.var(ddof=1) / a.size if a.size > 1 else 0.0) + (b.var(ddof=1) / b.size if b.size > 1 else 0.0)
    return float(a.mean() - b.mean()), float(math.sqrt(var))


def shared_columns(a: RunArrays, b: RunArrays) -> tuple[np.ndarray, np.ndarray] | None:
    """Column indices of the examples ``a`` and ``b`` share, aligned; None when they are not paired."""
    if a is b:
        idx = np.arange(np.shape(a.acc)[1])
        return idx, idx
    if a.examples is not None and b.examples is not None:
        where = {uid: j for j, uid in enumerate(b.examples)}
        left = [i for i, uid in enumerate(a.examples) if uid in where]
        # Paired only over most of both example sets: a handful of shared examples out of a subset
        # drawn from each run's own file would give a paired standard error of a few pairs.
        if not left or 2 * len(left) < min(len(a.examples), len(b.examples)):
            return None
        return np.array(left), np.array([where[a.examples[i]] for i in left])
    if a.paired_by_position and b.paired_by_position and np.shape(a.acc)[1] == np.shape(b.acc)[1]:
        idx = np.arange(np.shape(a.acc)[1])
        return idx, idx
    return None


# --------------------------------------------------------------------------- helpers


def _proxy_label(ranked: Sequence[RunRanking]) -> str:
    names = sorted({r.proxy for r in ranked if r.proxy})
    if not names:
        return "memorised fraction"
    return "/".join(names)


def _recipe(recipe: str | Recipe | None) -> Recipe | None:
    if recipe is None or isinstance(recipe, Recipe):
        return recipe
    from ckptsel.recipes import load_recipe

    return load_recipe(recipe)


def _check(run: RunArrays) -> None:
    acc, nll = np.shape(run.acc), np.shape(run.nll)
    if len(acc) != 2 or acc != nll:
        raise ValueError(f"run {run.name}: acc and nll must both be (checkpoints, examples); got {acc} and {nll}")
    if acc[0] != len(run.steps):
        raise ValueError(f"run {run.name}: {len(run.steps)} steps for {acc[0]} checkpoints")
    for name in ("copy", "entropy", "perturb", "alt"):
        value = getattr(run, name)
        if value is not None and np.shape(value) != acc:
            raise ValueError(f"run {run.name}: {name} has shape {np.shape(value)}, expected {acc}")
    if run.heldout is not None and np.shape(run.heldout)[0] != acc[0]:
        raise ValueError(f"run {run.name}: heldout has {np.shape(run.heldout)[0]} rows for {acc[0]} checkpoints")
    for name, value in run.measures.items():
        if np.shape(value) != acc:
            raise ValueError(f"run {run.name}: {name} has shape {np.shape(value)}, expected {acc}")
    if run.examples is not None and len(run.examples) != acc[1]:
        raise ValueError(f"run {run.name}: {len(run.examples)} example ids for {acc[1]} examples")
