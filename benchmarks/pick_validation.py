"""Does ckptsel's pick hold up on runs nobody tuned on? Every figure for two labs, by one script.

``--main``: the lab's main grid (recipes/lab/main.yaml), where the rules and thresholds were chosen.
``--heldout``: the held-out lab (recipes/lab/heldout.yaml: another task, other model shapes, seeds
and schedule), never tuned on. ``--check``: the check lab (recipes/lab/check.yaml: a task mix, other shapes,
seeds and learning rates), trained after the held-out lab's replays had been read: what was adjusted then (the
flag's ``memorized_min``, 0.5 -> 0.99) is validated there. ``--check2``: the second check lab
(recipes/lab/check2.yaml: a product and max mix), trained after the check lab's figures had been read: there
``underfit_fraction`` 0.75 (better than the shipped 0.8 on the main lab, where it was chosen) was tried first, and
did worse (it is not shipped; the sweep below shows both). Each lab is ranked once from its training data alone (the library
path of ``ckptsel rank LAB --data-per-run train.jsonl``, measurements kept in ``--cache-dir``); the
rules below are then applied to the stored arrays, and compared with the lab's ground truth per
checkpoint (held-out accuracy ``test_accuracy`` and held-out reference NLL ``test_nll``).

Truly over-memorized (the lab's definition, :func:`ckptsel.lab.summary.overmemorized`): held-out
NLL >= 1.25x its running minimum while held-out accuracy is within 0.05 of the run's best.

Every lab is ranked with the stage thresholds ckptsel ships (``OvermemSettings()``), not the ones its runs'
recipe.yaml recorded. Rules, per run:
  before       the rule up to 2026-12-05: best unflagged checkpoint first, each checkpoint's
               alternative-solution NLL over every alternative, its own samples included, the flag's
               thresholds as they were until 12-06;
  until 12-06  the default rule until 2026-12-06: the flag at a memorised fraction of 0.5 (now 0.99);
  default      accuracy first (a flagged checkpoint passed over only for one as accurate within the
               paired SE), each checkpoint's alternative-solution NLL without the alternatives it
               sampled itself;
  robustness   ``--prefer robustness``: the best checkpoint that is not flagged;
  highest PM / last / lowest train loss   the baselines (train loss: the Trainer's logged loss).
Printed per lab and rule: accuracy given up against the run's best checkpoint (mean / worst),
against the best checkpoint that is not truly over-memorized, over-memorized picks (and those with
a clean checkpoint within 0.03 of them); the flag's precision and recall; the median per-run
Spearman of the flag's proxy with the true held-out NLL; pooled R² of pre-memorization accuracy
against held-out accuracy for fixed and calibrated nu; and where the Trainer callback's
``stop_on_overmemorization`` stops, replayed save by save (patience 1 and 2); the flag and the stop for each
``memorized_min`` and ``underfit_fraction``; the shipped rules on the runs that generalise (best held-out accuracy >= 0.3) and on those
that never do; the noise floor (what even
the truly best checkpoint gives up against a measured best, held-out questions resampled); pooled R² with
a scale-free memorisation rule (NLL below rho x its first-checkpoint value); and the rules again with
``--memorization peak-nll`` (each lab re-ranked with it; the first time re-scores its targets). With ``--kang`` the
same rules on Kang et al.'s Llama3-8B GSM8K arrays (no over-memorization truth there: accuracy and
R² only); with ``--demo`` the demo run's pick and its truth.

    python benchmarks/pick_validation.py --main /tmp/lab/main --heldout /tmp/lab/heldout --check /tmp/lab/check \\
        --check2 /tmp/lab/check2 \\
        --cache-dir /tmp/lab/cache --max-examples 100 [--kang ../shared/data/kang2024] [--demo DIR] [--json F]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CLEAN_MARGIN = 0.03  # an over-memorized pick is justified only when no clean checkpoint is this close
OLD_STAGES = {"memorized_min": 0.5}  # the flag's thresholds until 2026-12-06
GENERALISING = 0.3  # a run "generalises" when its best held-out accuracy reaches this (the lab truth's own floor)


@dataclass
class LabRun:
    """One run's stored arrays and its truth, aligned by row (its measured checkpoint-N folders)."""

    arrays: object  # ckptsel.sweep.RunArrays
    test_acc: np.ndarray
    test_nll: np.ndarray
    train_loss: np.ndarray
    test_per_example: np.ndarray  # (checkpoints, test questions): each question's sampled accuracy

    @property
    def truly(self) -> np.ndarray:
        from ckptsel.lab.summary import overmemorized

        return overmemorized(self.test_acc, self.test_nll)


def load_lab(folder: Path, cache_dir: Path, max_examples: int,
             rule: str | None = None) -> tuple[list[LabRun], object, float]:
    """Rank every run of a lab folder once (measuring what the store lacks); its runs, recipe and seconds.

    ``rule``: the memorisation rule instead of the lab recipe's (``peak-nll`` at its own default nu)."""
    from ckptsel.discover import discover_runs
    from ckptsel.lab.ground_truth import read_ground_truth
    from ckptsel.pipeline import RankRequest, rank_runs
    from ckptsel.recipes import load_recipe
    from ckptsel.select import run_arrays
    from ckptsel.store import Store

    runs = [r for r in discover_runs(folder) if (r.path / "ground_truth.json").is_file()]
    if not runs:
        raise SystemExit(f"{folder}: no lab runs (run folders with ground_truth.json)")
    for run in runs:  # the lab's ground truth is per checkpoint-N folder
        run.checkpoints[:] = [c for c in run.checkpoints if c.path.name.startswith("checkpoint-")]
    # The lab recorded the stage thresholds of its day in each run's recipe.yaml; the figures are for the
    # thresholds ckptsel ships (what `ckptsel rank` uses with a recipe that does not set them).
    from ckptsel.recipes import override
    from ckptsel.settings import OvermemSettings

    recipe = override(load_recipe(runs[0].path / "recipe.yaml"), stages=OvermemSettings().model_dump())
    if rule is not None:
        from ckptsel.settings import default_threshold

        recipe = override(recipe, memorization={"rule": rule, "threshold": default_threshold(rule)})
    start = time.perf_counter()
    result = rank_runs(RankRequest(paths=(folder,), recipe=recipe, data_per_run="train.jsonl",
                                   max_examples=max_examples, cache_dir=cache_dir, runs=tuple(runs)))
    seconds = time.perf_counter() - start
    out = []
    with Store.open(cache_dir) as store:
        for measured in result.runs:
            arrays, m = run_arrays(measured.run.name, measured.collected, store)
            truth = {int(s): v for s, v in read_ground_truth(measured.run.path)["checkpoints"].items()}
            by_step = {c.step: c for c in measured.run.checkpoints}
            loss = [by_step[s].train_loss for s in arrays.steps]
            nll = np.nanmean(m["nll"], axis=1)
            out.append(LabRun(
                arrays, np.array([truth[s]["test_accuracy"] for s in arrays.steps]),
                np.array([truth[s]["test_nll"] for s in arrays.steps]),
                np.array([nll[j] if v is None else v for j, v in enumerate(loss)], dtype=float),
                np.array([truth[s]["per_example"]["test_accuracy"] for s in arrays.steps], dtype=float)))
    return out, recipe, seconds


# --------------------------------------------------------------------------- the rules


def ranked(run: LabRun, recipe, rule: str, **stage_settings):
    """ckptsel's ranking of one run under ``rule`` (before / default / robustness); ``stage_settings``
    override the recipe's ``stages:`` (the tuning table)."""
    from ckptsel.sweep import rank_run

    stages = recipe.stages.model_copy(update=stage_settings)
    arrays = run.arrays
    if rule == "before":
        stages = stages.model_copy(update={"prefer": "robustness", **OLD_STAGES})
        arrays = dataclasses.replace(arrays, alt_source_of=())
    elif rule == "until 12-06":
        stages = stages.model_copy(update=OLD_STAGES)
    elif rule == "robustness, until 12-06":
        stages = stages.model_copy(update={"prefer": "robustness", **OLD_STAGES})
    elif rule == "robustness":
        stages = stages.model_copy(update={"prefer": "robustness"})
    return rank_run(arrays, recipe.memorization, stages, recipe.memorization.threshold, n_boot=200)


def pick(run: LabRun, recipe, rule: str) -> int:
    if rule in ("before", "until 12-06", "default", "robustness, until 12-06", "robustness"):
        return ranked(run, recipe, rule).recommended
    if rule == "highest PM":
        return int(np.nanargmax(ranked(run, recipe, "default").columns["premem_acc"]))
    if rule == "last":
        return len(run.test_acc) - 1
    if rule == "lowest train loss":
        return int(np.nanargmin(run.train_loss))
    raise ValueError(rule)


RULES = ("before", "until 12-06", "default", "robustness, until 12-06", "robustness", "highest PM", "last",
         "lowest train loss")


def pick_table(runs: list[LabRun], recipe) -> dict:
    out = {}
    for rule in RULES:
        regret, regret_clean, om, om_unjustified = [], [], 0, 0
        for run in runs:
            p = pick(run, recipe, rule)
            truly = run.truly
            regret.append(float(run.test_acc.max() - run.test_acc[p]))
            clean = run.test_acc[~truly]
            regret_clean.append(float(clean.max() - run.test_acc[p]) if clean.size else math.nan)
            if truly[p]:
                om += 1
                om_unjustified += bool(clean.size and clean.max() >= run.test_acc[p] - CLEAN_MARGIN)
        out[rule] = {"regret_mean": float(np.mean(regret)), "regret_worst": float(np.max(regret)),
                     "regret_clean_mean": float(np.nanmean(regret_clean)),
                     "regret_clean_worst": float(np.nanmax(regret_clean)),
                     "overmem_picks": om, "overmem_picks_with_clean_within_0.03": om_unjustified,
                     "runs": len(runs)}
    return out


SE_GRID = (0.0, 0.5, 1.0, 2.0)


def se_table(runs: list[LabRun], recipe) -> dict:
    """The default rule's accuracy given up for each ``recommend_se`` (chosen on the main lab only)."""
    out = {}
    for se in SE_GRID:
        regret = [float(r.test_acc.max() - r.test_acc[ranked(r, recipe, "default", recommend_se=se).recommended])
                  for r in runs]
        out[f"{se:g}"] = {"regret_mean": float(np.mean(regret)), "regret_worst": float(np.max(regret))}
    return out


def flag_scores(runs: list[LabRun], recipe, rule: str = "default", **stage_settings) -> tuple[dict, list]:
    """The flag against the truth over every checkpoint of ``runs`` (precision, recall, flagged, truly), and each
    run's ranking."""
    tp = fp = fn = 0
    rankings = []
    for run in runs:
        r = ranked(run, recipe, rule, **stage_settings)
        rankings.append(r)
        flagged = np.array([f is not None for f in r.flags])
        tp += int((flagged & run.truly).sum())
        fp += int((flagged & ~run.truly).sum())
        fn += int((~flagged & run.truly).sum())
    return {"precision": tp / (tp + fp) if tp + fp else math.nan, "recall": tp / (tp + fn) if tp + fn else math.nan,
            "flagged": tp + fp, "truly": tp + fn}, rankings


FLAG_GRID = {"proxy_rise": (0.1, 0.15, 0.2, 0.25), "acc_margin": (0.1, 0.2)}


def flag_grid(runs: list[LabRun], recipe) -> list[dict]:
    """The flag's precision and recall over its thresholds (chosen on the main lab only)."""
    import itertools

    return [{**settings, **flag_scores(runs, recipe, **settings)[0]}
            for settings in (dict(zip(FLAG_GRID, values)) for values in itertools.product(*FLAG_GRID.values()))]


def flag_table(runs: list[LabRun], recipe) -> dict:
    out = {}
    for rule in ("before", "until 12-06", "default"):
        scores, rankings = flag_scores(runs, recipe, rule)
        rho = [s for run, r in zip(runs, rankings) if r.proxy is not None
               and (s := spearman(r.columns[r.proxy], run.test_nll)) is not None]
        out[rule] = {**scores, "proxy_spearman_median": statistics.median(rho) if rho else math.nan,
                     "runs_with_rho": len(rho)}
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    keep = ~(np.isnan(a) | np.isnan(b))
    if keep.sum() < 3:
        return None
    ra, rb = (np.argsort(np.argsort(x[keep])) for x in (a, b))
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def r2_table(runs: list[LabRun], recipe) -> dict:
    """Pooled identity R² of PM vs held-out accuracy: the recipe's nu, a few fixed ones, and the calibrations."""
    from ckptsel.metrics import CalibrationError, calibrate_threshold, r2_identity
    from ckptsel.sweep import rank_sweep

    test = np.concatenate([r.test_acc for r in runs])
    out = {}
    variants = [("recipe", None), ("0.05", 0.05), ("0.07", 0.07), ("0.15", 0.15), ("auto", "auto"),
                ("auto-run", "auto-run")]
    # The calibration's own knob: the copy rate that labels a (checkpoint, example) pair "copying".
    nll = np.concatenate([r.arrays.matrix("nll").ravel() for r in runs])
    copy = np.concatenate([r.arrays.matrix("copy").ravel() for r in runs])
    for fraction in (0.2, 0.8, 1.0):
        try:
            variants.append((f"auto, copying at >= {fraction:g}", calibrate_threshold(nll, copy, fraction).threshold))
        except CalibrationError:
            pass
    for label, threshold in variants:
        scope = "run" if threshold == "auto-run" else "sweep"
        result = rank_sweep([r.arrays for r in runs], recipe=recipe, threshold="auto" if scope == "run" else threshold,
                            threshold_scope=scope, n_boot=50)
        pm = np.concatenate([rr.columns["premem_acc"] for rr in result.runs])
        out[label] = {"r2": r2_identity(pm, test), "nu": result.threshold.used}
    return out


def noise_floor(runs: list[LabRun], recipe, draws: int = 2000) -> dict:
    """How much accuracy even a perfect rule gives up against a *measured* best: the truth is itself a
    sample of the run's held-out questions, and the best of nine noisy values is biased up.

    Per run, the held-out questions are resampled (bootstrap, paired across checkpoints); a fixed choice
    of checkpoint p gives up E[max_j acc_j - acc_p] on average over the draws. The floor is the smallest
    of those over p (the truly best checkpoint's expected regret); each rule's expected regret beside it.
    """
    rng = np.random.default_rng(0)
    floor, by_rule = [], {rule: [] for rule in ("default", "highest PM", "last")}
    for run in runs:
        questions = run.test_per_example.shape[1]
        draw = rng.integers(0, questions, (draws, questions))
        boot = run.test_per_example[:, draw].mean(axis=2)  # (checkpoints, draws)
        expected = (boot.max(axis=0)[None, :] - boot).mean(axis=1)
        floor.append(float(expected.min()))
        for rule, values in by_rule.items():
            values.append(float(expected[pick(run, recipe, rule)]))
    return {"floor_mean": float(np.mean(floor)), "floor_worst": float(np.max(floor)),
            **{rule: {"mean": float(np.mean(v)), "worst": float(np.max(v))} for rule, v in by_rule.items()}}


RELATIVE_NU = (0.05, 0.1, 0.15, 0.2, 0.3)


def relative_nu_r2(runs: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict:
    """Pooled R² of PM when "memorised" means the target NLL fell below rho x its value at the run's first
    measured checkpoint (a per-example, tokenizer-free scale; ``runs``: (acc, nll, test accuracy))."""
    from ckptsel.metrics import premem_accuracy_from_mask, r2_identity

    test = np.concatenate([t for _, _, t in runs])
    out = {}
    for rho in RELATIVE_NU:
        pm = [premem_accuracy_from_mask(acc, nll < rho * nll[:1]) for acc, nll, _ in runs]
        out[f"{rho:g}"] = r2_identity(np.concatenate(pm), test)
    return out


def diversity_figures(runs: list[LabRun], recipe) -> dict:
    """Sample diversity (Ruan et al.: over-memorized checkpoints lose it) on the runs that truly over-memorize:
    at the best checkpoint that is not over-memorized against the mean over the over-memorized ones, and per run
    its Spearman with held-out NLL over all checkpoints (every run)."""
    out: dict = {"runs": [], "spearman_heldout_nll": []}
    for run in runs:
        values = ranked(run, recipe, "default").columns["sample_diversity"]
        if (rho := spearman(values, run.test_nll)) is not None:
            out["spearman_heldout_nll"].append(rho)
        truly = run.truly
        if truly.any() and (~truly).any():
            clean = int(np.argmax(np.where(~truly, run.test_acc, -np.inf)))
            out["runs"].append({"run": run.arrays.name, "best_clean": float(values[clean]),
                                "overmemorized_mean": float(np.nanmean(values[truly])),
                                "last": float(values[-1])})
    rho = out["spearman_heldout_nll"]
    out["spearman_median"] = statistics.median(rho) if rho else math.nan
    out["lower_when_overmemorized"] = sum(r["overmemorized_mean"] < r["best_clean"] for r in out["runs"])
    return out


def replay_stops(runs: list[LabRun], recipe, patience: int, **stage_settings) -> dict:
    """The callback's stop, save by save: the newest checkpoint's flag in a ranking of the saves so far
    (``stage_settings`` override the recipe's ``stages:``)."""
    stops = early = 0
    lost = []
    for run in runs:
        truly = run.truly
        first_truly = int(np.argmax(truly)) if truly.any() else None
        in_a_row = 0
        source_of = np.asarray(run.arrays.alt_source_of if len(run.arrays.alt_source_of) else
                               [-1] * np.shape(run.arrays.acc)[1])
        for j in range(len(run.test_acc)):
            # At save j only the alternatives sampled up to j exist.
            later = source_of > j
            alt = None if run.arrays.alt is None else np.where(later[None, :], np.nan, run.arrays.alt[: j + 1])
            prefix = dataclasses.replace(
                run.arrays, steps=run.arrays.steps[: j + 1],
                **{name: getattr(run.arrays, name)[: j + 1] for name in ("acc", "nll", "copy", "entropy", "perturb",
                                                                         "heldout")},
                alt=alt, measures={name: values[: j + 1] for name, values in run.arrays.measures.items()},
                alt_source_of=np.where(later, -1, source_of) if len(run.arrays.alt_source_of) else ())
            r = ranked(LabRun(prefix, run.test_acc[: j + 1], run.test_nll[: j + 1], run.train_loss[: j + 1],
                              run.test_per_example[: j + 1]), recipe, "default", **stage_settings)
            in_a_row = in_a_row + 1 if r.flags[j] is not None else 0
            if in_a_row >= patience:
                stops += 1
                early += first_truly is None or j < first_truly
                lost.append(float(run.test_acc.max() - run.test_acc[r.recommended]))
                break
    return {"stops": stops, "early": early, "runs": len(runs),
            "lost_mean": float(np.mean(lost)) if lost else 0.0, "lost_worst": float(np.max(lost)) if lost else 0.0}


# One stage threshold at a time, the others as shipped: the flag and the callback's stop for each value.
SWEEPS = {"memorized_min": (0.5, 0.9, 0.95, 0.98, 0.99, 1.0),  # 0.99 shipped (0.5 until 2026-12-06)
          "underfit_fraction": (0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)}  # 0.8 shipped


def threshold_sweep(runs: list[LabRun], recipe, name: str) -> list[dict]:
    """Flag precision / recall and the replayed stops for each value of the stage threshold ``name``."""
    return [{name: value, **flag_scores(runs, recipe, **{name: value})[0],
             **{f"stop {p}": replay_stops(runs, recipe, p, **{name: value}) for p in (1, 2)}} for value in SWEEPS[name]]


def by_regime(runs: list[LabRun], recipe) -> dict:
    """The shipped rules on the runs that generalise (best held-out accuracy >= 0.3, the floor of the lab's own
    over-memorization truth) and on those that never do (they memorise a small training set; nothing in them is
    "truly over-memorized", so every flag there is false and every stop early)."""
    out = {}
    for label, keep in (("generalising", lambda r: r.test_acc.max() >= GENERALISING),
                        ("never generalising", lambda r: r.test_acc.max() < GENERALISING)):
        subset = [r for r in runs if keep(r)]
        if not subset:
            continue
        picks = pick_table(subset, recipe)
        out[label] = {"runs": len(subset), "default": picks["default"], "robustness": picks["robustness"],
                      "last": picks["last"], "flags": flag_table(subset, recipe)["default"],
                      **{f"stop {p}": replay_stops(subset, recipe, p) for p in (1, 2)}}
    return out


def lab_figures(folder: Path, cache_dir: Path, max_examples: int) -> dict:
    runs, recipe, seconds = load_lab(folder, cache_dir, max_examples)
    return {"runs": len(runs), "checkpoints": sum(len(r.test_acc) for r in runs), "rank_seconds": seconds,
            "truly_overmemorizing_runs": sum(bool(r.truly.any()) for r in runs),
            "picks": pick_table(runs, recipe), "recommend_se": se_table(runs, recipe),
            "flags": flag_table(runs, recipe), "flag_grid": flag_grid(runs, recipe), "r2": r2_table(runs, recipe),
            "callback": {f"patience {p}": replay_stops(runs, recipe, p) for p in (1, 2)},
            "sweeps": {name: threshold_sweep(runs, recipe, name) for name in SWEEPS}, "by_regime": by_regime(runs, recipe),
            "noise_floor": noise_floor(runs, recipe),
            "diversity": diversity_figures(runs, recipe),
            "relative_nu_r2": relative_nu_r2([(r.arrays.matrix("acc"), r.arrays.matrix("nll"), r.test_acc)
                                              for r in runs]),
            "per_run": [per_run(r, recipe) for r in runs],
            "peak_nll": peak_figures(folder, cache_dir, max_examples)}


def peak_figures(folder: Path, cache_dir: Path, max_examples: int) -> dict:
    """The same rules with ``--memorization peak-nll`` (nu 1.0 on each target's costliest token, chosen on the
    main lab by ``nu_aggregation.py``); the first call re-scores each checkpoint's targets once."""
    runs, recipe, seconds = load_lab(folder, cache_dir, max_examples, rule="peak-nll")
    pm = np.concatenate([ranked(r, recipe, "default").columns["premem_acc"] for r in runs])
    from ckptsel.metrics import r2_identity

    return {"rank_seconds": seconds, "nu": recipe.memorization.threshold,
            "r2": r2_identity(pm, np.concatenate([r.test_acc for r in runs])),
            "picks": pick_table(runs, recipe), "flags": flag_table(runs, recipe),
            "callback": {f"patience {p}": replay_stops(runs, recipe, p) for p in (1, 2)}}


def per_run(run: LabRun, recipe) -> dict:
    from ckptsel import stages

    r = ranked(run, recipe, "default")
    steps = list(run.arrays.steps)
    # The flag's proxy at its highest over its baseline (the minimum over the saves past stage (a) so far).
    rise = math.nan
    if r.proxy is not None:
        ratio = stages.proxy_ratio(r.columns[r.proxy], np.array([s == stages.UNDERFIT for s in r.stages]))
        rise = float(np.nanmax(ratio)) if not np.isnan(ratio).all() else math.nan
    return {"run": run.arrays.name, "best": f"{steps[int(np.argmax(run.test_acc))]}@{run.test_acc.max():.3f}",
            **{rule: f"{steps[p]}@{run.test_acc[p]:.3f}" for rule in ("before", "default", "robustness")
               if (p := pick(run, recipe, rule)) is not None},
            "flagged": [s for s, f in zip(steps, r.flags) if f is not None],
            "truly": [s for s, t in zip(steps, run.truly) if t], "proxy": r.proxy, "proxy_rise": rise}


# --------------------------------------------------------------------------- Kang et al.'s arrays and the demo


def kang_figures(folder: Path) -> dict:
    from ckptsel.metrics import r2_identity
    from ckptsel.recipes import load_recipe
    from ckptsel.sweep import RunArrays, rank_sweep

    recipe = load_recipe("gsm8k")
    runs, truth = [], []
    for path in sorted(folder.glob("gsm8k_*.npz")):
        d = np.load(path)
        runs.append(RunArrays(name=path.stem, steps=[int(s) for s in d["steps"]], acc=d["train_acc"],
                              nll=d["train_nll"], examples=[str(i) for i in d["train_idx"]]))
        truth.append(np.asarray(d["test_acc"], dtype=float))
    out = {"runs": len(runs)}
    for label, threshold in (("paper nu 0.100", None), ("auto", "auto")):
        result = rank_sweep(runs, recipe=recipe, threshold=threshold, n_boot=50)
        pm = np.concatenate([rr.columns["premem_acc"] for rr in result.runs])
        regret = [float(t.max() - t[rr.recommended]) for rr, t in zip(result.runs, truth)]
        out[label] = {"r2": r2_identity(pm, np.concatenate(truth)), "nu": result.threshold.used,
                      "run_pick_regret_mean": float(np.mean(regret)), "run_pick_regret_worst": float(np.max(regret))}
    out["relative_nu_r2"] = relative_nu_r2([(np.asarray(r.acc, dtype=float), np.asarray(r.nll, dtype=float), t)
                                            for r, t in zip(runs, truth)])
    # How far real fine-tuning runs memorise: the memorised fraction (mean NLL < the paper's nu) at each run's last
    # checkpoint, which the over-memorized flag's memorized_min (0.99) must be able to reach.
    nu = recipe.memorization.threshold
    out["memorized_last"] = {r.name: float(np.mean(np.asarray(r.nll, dtype=float)[-1] < nu)) for r in runs}
    last = [float(t.max() - t[-1]) for t in truth]
    out["last_regret_mean"], out["last_regret_worst"] = float(np.mean(last)), float(np.max(last))
    return out


def demo_figures(demo: Path, cache_dir: Path) -> dict:
    """The demo run ranked as ``ckptsel demo`` ranks it (its own recipe, 40 examples), against its truth."""
    from ckptsel.lab.ground_truth import read_ground_truth

    runs, recipe, _ = load_lab(demo, cache_dir, 40)
    (run,) = runs
    steps = list(run.arrays.steps)
    p = pick(run, recipe, "default")
    truth = read_ground_truth(demo)
    return {"pick": steps[p], "pick_test": float(run.test_acc[p]),
            "best": steps[int(np.argmax(run.test_acc))], "best_test": float(run.test_acc.max()),
            "before": steps[pick(run, recipe, "before")], "flagged": per_run(run, recipe)["flagged"],
            "n_test": truth["n_test"]}


# --------------------------------------------------------------------------- printing


def _f(v, spec=".3f") -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def print_lab(name: str, fig: dict) -> None:
    print(f"\n## {name}: {fig['runs']} runs, {fig['checkpoints']} checkpoints, "
          f"{fig['truly_overmemorizing_runs']} truly over-memorizing runs (ranked in {fig['rank_seconds']:.0f} s)")
    print("| rule | regret vs best (mean / worst) | vs best clean (mean / worst) | over-memorized picks "
          "(clean within 0.03) |")
    print("|---|---|---|---|")
    for rule, t in fig["picks"].items():
        print(f"| {rule} | {_f(t['regret_mean'])} / {_f(t['regret_worst'])} | {_f(t['regret_clean_mean'])} / "
              f"{_f(t['regret_clean_worst'])} | {t['overmem_picks']} of {t['runs']} "
              f"({t['overmem_picks_with_clean_within_0.03']}) |")
    print("default rule by recommend_se (regret mean / worst): " + ", ".join(
        f"{k}: {_f(v['regret_mean'])} / {_f(v['regret_worst'])}" for k, v in fig["recommend_se"].items()))
    for rule, t in fig["flags"].items():
        print(f"flags ({rule}): precision {_f(t['precision'], '.2f')}, recall {_f(t['recall'], '.2f')} "
              f"({t['flagged']} flagged, {t['truly']} truly); proxy Spearman with held-out NLL, median over "
              f"{t['runs_with_rho']} runs: {_f(t['proxy_spearman_median'], '.2f')}")
    print("flag thresholds (proxy_rise, acc_margin -> precision / recall): " + "; ".join(
        f"{g['proxy_rise']:g}, {g['acc_margin']:g} -> {_f(g['precision'], '.2f')} / {_f(g['recall'], '.2f')}"
        for g in fig["flag_grid"]))
    print("pooled R² of PM vs held-out accuracy: " + ", ".join(
        f"{k} (nu {_f(v['nu'])}) {_f(v['r2'])}" for k, v in fig["r2"].items()))
    for k, v in fig["callback"].items():
        print(f"callback stop, {k}: {v['stops']} of {v['runs']} runs stopped, {v['early']} before the first truly "
              f"over-memorized checkpoint; held-out accuracy lost {_f(v['lost_mean'])} mean, {_f(v['lost_worst'])} worst")
    for knob, sweep in fig["sweeps"].items():
        print(f"{knob} (flag precision / recall, flagged; callback patience 1 and 2: stops / early / accuracy lost "
              "mean, worst): " + "; ".join(
                  f"{g[knob]:g} -> {_f(g['precision'], '.2f')} / {_f(g['recall'], '.2f')} ({g['flagged']}), " + " · ".join(
                      f"{g[k]['stops']}/{g[k]['early']}/{_f(g[k]['lost_mean'])}, {_f(g[k]['lost_worst'])}"
                      for k in ("stop 1", "stop 2"))
                  for g in sweep))
    for label, g in fig["by_regime"].items():
        t = g["flags"]
        print(f"{label} runs ({g['runs']}): default {_f(g['default']['regret_mean'])} / "
              f"{_f(g['default']['regret_worst'])} (last {_f(g['last']['regret_mean'])} / {_f(g['last']['regret_worst'])}); "
              f"robustness vs best clean {_f(g['robustness']['regret_clean_mean'])} / "
              f"{_f(g['robustness']['regret_clean_worst'])}, over-memorized picks {g['robustness']['overmem_picks']}; "
              f"flags {_f(t['precision'], '.2f')} / {_f(t['recall'], '.2f')} ({t['flagged']} flagged, {t['truly']} truly); "
              + ", ".join(f"callback patience {p}: {g[f'stop {p}']['stops']} stopped, {g[f'stop {p}']['early']} early, "
                          f"lost {_f(g[f'stop {p}']['lost_mean'])} / {_f(g[f'stop {p}']['lost_worst'])}" for p in (1, 2)))
    f = fig["noise_floor"]
    print(f"noise floor (held-out questions resampled; the truly best checkpoint's expected regret): "
          f"{_f(f['floor_mean'])} mean, {_f(f['floor_worst'])} worst; expected regret of " + ", ".join(
              f"{rule} {_f(f[rule]['mean'])} / {_f(f[rule]['worst'])}" for rule in ("default", "highest PM", "last")))
    print("pooled R² with memorised = NLL below rho x its first-checkpoint value: " + ", ".join(
        f"rho {k} {_f(v)}" for k, v in fig["relative_nu_r2"].items()))
    d = fig["diversity"]
    print(f"sample diversity, truly over-memorizing runs: lower over the over-memorized checkpoints than at the best "
          f"clean one in {d['lower_when_overmemorized']} of {len(d['runs'])} (" + "; ".join(
              f"{r['run']} {r['best_clean']:.3f} -> {r['overmemorized_mean']:.3f}" for r in d["runs"])
          + f"); Spearman with held-out NLL, median over {len(d['spearman_heldout_nll'])} runs: "
          f"{_f(d['spearman_median'], '.2f')}")
    p = fig["peak_nll"]
    print(f"--memorization peak-nll (nu {p['nu']:g}): pooled R² {_f(p['r2'])}; " + "; ".join(
        f"{rule} {_f(t['regret_mean'])} / {_f(t['regret_worst'])} (clean {_f(t['regret_clean_mean'])} / "
        f"{_f(t['regret_clean_worst'])}; over-memorized picks {t['overmem_picks']} "
        f"({t['overmem_picks_with_clean_within_0.03']}))" for rule, t in p["picks"].items()
        if rule in ("default", "robustness", "highest PM")))
    t = p["flags"]["default"]
    print(f"  flags precision {_f(t['precision'], '.2f')}, recall {_f(t['recall'], '.2f')} ({t['flagged']} flagged); "
          + "; ".join(f"callback {k}: {v['stops']} stopped, {v['early']} early, lost {_f(v['lost_mean'])} / "
                      f"{_f(v['lost_worst'])}" for k, v in p["callback"].items()))
    for r in fig["per_run"]:
        print(f"  {r['run']}: best {r['best']}; before {r.get('before')}, default {r.get('default')}, robustness "
              f"{r.get('robustness')}; flagged {r['flagged']}, truly {r['truly']} ({r['proxy']}, at most "
              f"{_f(r['proxy_rise'], '.2f')}x its baseline)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--main", type=Path, help="the main lab's output folder (tuned on)")
    parser.add_argument("--heldout", type=Path, help="the held-out lab's output folder (never tuned on)")
    parser.add_argument("--check", type=Path, help="the check lab's output folder (recipes/lab/check.yaml: validates "
                        "what was adjusted after reading the held-out lab)")
    parser.add_argument("--check2", type=Path, help="the second check lab's output folder (recipes/lab/check2.yaml)")
    parser.add_argument("--kang", type=Path, help="Kang et al.'s released arrays (gsm8k_*.npz)")
    parser.add_argument("--demo", type=Path, help="the demo's run folder (ckptsel-demo/demo)")
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--max-examples", type=int, default=100)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    figures = {}
    for name, folder in (("main lab (tuned on)", args.main), ("held-out lab (never tuned on)", args.heldout),
                         ("check lab (never looked at before its figures)", args.check),
                         ("second check lab (never looked at before its figures)", args.check2)):
        if folder is not None:
            figures[name] = lab_figures(folder, args.cache_dir, args.max_examples)
            print_lab(name, figures[name])
    if args.kang is not None:
        figures["kang"] = k = kang_figures(args.kang)
        print(f"\n## Kang et al. GSM8K ({k['runs']} runs)")
        for label in ("paper nu 0.100", "auto"):
            v = k[label]
            print(f"{label}: R² {_f(v['r2'])} (nu {_f(v['nu'])}); run picks' regret {_f(v['run_pick_regret_mean'])} "
                  f"mean, {_f(v['run_pick_regret_worst'])} worst")
        print(f"last checkpoint: regret {_f(k['last_regret_mean'])} mean, {_f(k['last_regret_worst'])} worst")
        print("memorised fraction (mean NLL < nu) at each run's last checkpoint: " + ", ".join(
            f"{name.removeprefix('gsm8k_orig_')} {v:.2f}" for name, v in k["memorized_last"].items()))
        print("pooled R² with memorised = NLL below rho x its first-checkpoint value: " + ", ".join(
            f"rho {r} {_f(v)}" for r, v in k["relative_nu_r2"].items()))
    if args.demo is not None:
        figures["demo"] = d = demo_figures(args.demo, args.cache_dir)
        print(f"\n## demo: pick step {d['pick']} (held-out {_f(d['pick_test'], '.2f')}), best step {d['best']} "
              f"({_f(d['best_test'], '.2f')}); before: step {d['before']}; flagged {d['flagged']}")
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=1, default=float))


if __name__ == "__main__":
    main()
