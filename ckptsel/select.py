"""From stored measurements to a ranking: per-checkpoint metrics, stages, flags, a recommendation.

Reads the ``(checkpoints, examples)`` matrices from the store, applies the formulas in
:mod:`ckptsel.metrics` and the stage rule of :mod:`ckptsel.stages`, and returns plain data
(:class:`Ranking`) that the CLI prints and serialises. Nothing here loads a model.

The over-memorized flag and the recommendation's tie-break use one perplexity proxy
(:func:`choose_proxy`): the held-out NLL when a held-out file was given (the real thing),
else the alternative-solution NLL when enough examples have an alternative solution, else
the target NLL under perturbed prompts.

MoE checkpoints also get Li et al.'s pathway metrics (:func:`pathway_metrics`) over their
memorised examples, from the routing weights the scoring pass stored; how pathways are cut
(:class:`ckptsel.settings.PathwaySettings`) is applied here, so changing it measures nothing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from ckptsel import metrics, pathways, stages
from ckptsel.collect import Collected
from ckptsel.settings import MemorizationSettings, OvermemSettings, PathwaySettings
from ckptsel.store import Record, Store

PROXIES = ("heldout_nll", "alt_nll", "perturb_nll")  # auto's order of preference


@dataclass
class Threshold:
    """The memorisation rule that was used, and the alternatives beside it."""

    rule: str  # "nll" or "copy"
    used: float | None  # nu in nats/token for the nll rule; None for the copy rule
    recipe_default: float | None
    auto: float | None = None  # calibrated from copy rates, when it could be fitted
    auto_auc: float | None = None
    auto_note: str | None = None  # why auto could not be fitted


@dataclass
class PathwayMetrics:
    """Li et al.'s pathway metrics of one MoE checkpoint, over its memorised examples (DESIGN.md).

    Lower distance and complexity: routing has become structured and shared (generalising).
    ``per_layer``: ``distance`` per layer (each pathway's layer segment alone) and
    ``consistency`` per pair of consecutive layers. ``n_examples``: memorised examples with
    routing weights; ``n_compared``: pathways the distance compared (a seeded subset beyond
    ``PathwaySettings.max_examples``); ``n_unique``: distinct ones among them.
    ``distance_exact``: False when the distance is estimated on sampled pairs
    (``PathwaySettings.max_pairs``), with standard error ``distance_stderr``.
    """

    distance: float
    consistency: float
    complexity: float
    n_examples: int
    n_compared: int
    n_unique: int
    mean_length: float
    per_layer: dict[str, list[float]]
    distance_exact: bool = True
    distance_stderr: float = 0.0


@dataclass
class CheckpointMetrics:
    index: int
    path: str
    step: int | None
    epoch: float | None
    train_loss: float | None
    fingerprint: str | None
    train_acc: float = math.nan
    premem_acc: float = math.nan
    premem_ci: tuple[float, float] = (math.nan, math.nan)
    memorized_frac: float = math.nan
    copy_rate: float = math.nan
    target_nll: float = math.nan
    entropy: float = math.nan
    alt_nll: float = math.nan  # over the examples with an alternative solution
    perturb_nll: float = math.nan  # target NLL under perturbed prompts (mean over perturbations)
    perturb_gap: float = math.nan  # perturb_nll - target NLL, example by example
    heldout_nll: float = math.nan
    proxy_ratio: float = math.nan  # the flag's proxy over its baseline (stages.proxy_ratio)
    stage: str | None = None
    flag: stages.Flag | None = None
    error: str | None = None
    pathways: PathwayMetrics | None = None  # MoE runs only


@dataclass
class Ranking:
    checkpoints: list[CheckpointMetrics]
    threshold: Threshold
    n_examples: int
    recommended: int | None  # index into checkpoints
    rule: str
    proxy: str | None = None  # the perplexity proxy of the flag and the tie-break
    stage_rule: str = ""
    alt_coverage: float = math.nan  # fraction of examples with an alternative solution
    alt_sources: list[int] = field(default_factory=list)  # indices of the checkpoints they were harvested from
    n_heldout: int = 0
    warnings: list[str] = field(default_factory=list)
    pathway_rule: str | None = None  # MoE runs only: how the pathway metrics were computed
    # Per-example arrays, for --export-examples: (checkpoints, examples), measured rows only.
    per_example: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict:
        rows = []
        for c in self.checkpoints:
            row = asdict(c)
            row["premem_ci"] = list(c.premem_ci)
            row["flag"] = None if c.flag is None else c.flag.to_json()
            if self.pathway_rule is None:  # dense runs: no pathway keys at all
                del row["pathways"]
            rows.append({k: _clean(v) for k, v in row.items()})
        rec = self.checkpoints[self.recommended] if self.recommended is not None else None
        moe = {} if self.pathway_rule is None else {"pathway_rule": self.pathway_rule}
        return {
            "checkpoints": rows,
            "recommended": None if rec is None else {"index": rec.index, "path": rec.path, "step": rec.step},
            "rule": self.rule,
            "proxy": self.proxy,
            "stage_rule": self.stage_rule,
            "alt_coverage": _clean(self.alt_coverage),
            "alt_sources": [self.checkpoints[i].step for i in self.alt_sources],
            "threshold": {k: _clean(v) for k, v in asdict(self.threshold).items()},
            "n_examples": self.n_examples,
            "n_heldout": self.n_heldout,
            "warnings": self.warnings,
            **moe,
        }


def _clean(value):
    """NaN -> None for JSON (inside lists and dicts too)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


def measured_matrices(collected: Collected, store: Store) -> dict[str, np.ndarray]:
    """The stored measurements as (measured checkpoints, examples) arrays, in training order.

    nll, entropy (target scoring), acc, copy (samples), perturb (mean perturbed-prompt NLL),
    alt (alternative-solution NLL, NaN for examples without one), and heldout (checkpoints x
    held-out examples). A kind that was not measured reads as all NaN.
    """
    fps = [fp for i, fp in enumerate(collected.fingerprints) if fp is not None and i not in collected.failures]
    uids = [ex.uid for ex in collected.examples]
    key = collected.settings_key

    def read(kind: str, field: str, which: list[str] = uids) -> np.ndarray:
        series = collected.series.get(kind)
        if series is None:
            return np.full((len(fps), len(which)), np.nan)
        return store.matrix(fps, key, series, which, field)

    return {
        "nll": store.matrix(fps, key, "score", uids, "nll"),
        "entropy": store.matrix(fps, key, "score", uids, "entropy"),
        "acc": store.matrix(fps, key, "sample", uids, "acc"),
        "copy": store.matrix(fps, key, "sample", uids, "copy_rate"),
        "perturb": read("perturb", "nll"),
        "alt": read("alt", "nll"),
        "heldout": read("heldout", "nll", [ex.uid for ex in collected.heldout]),
    }


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


def memorized_mask(m: dict[str, np.ndarray], memorization: MemorizationSettings) -> tuple[np.ndarray, Threshold]:
    """The memorised mask under the chosen rule, and the threshold report (fixed and auto side by side)."""
    default = memorization.threshold if memorization.threshold != "auto" else None
    report = Threshold(rule=memorization.rule, used=None, recipe_default=default)
    try:
        cal = metrics.calibrate_threshold(m["nll"], m["copy"], memorization.copy_fraction)
        report.auto, report.auto_auc = cal.threshold, cal.auc
    except metrics.CalibrationError as err:
        report.auto_note = str(err)
    if memorization.rule == "copy":
        mask = metrics.memorized_by_copy(m["copy"], memorization.copy_fraction)
        return mask | np.isnan(m["copy"]), report
    if memorization.threshold == "auto":
        if report.auto is None:
            raise metrics.CalibrationError(report.auto_note or "--threshold auto could not be fitted")
        report.used = report.auto
    else:
        report.used = float(memorization.threshold)
    mask = metrics.memorized(m["nll"], report.used)
    return mask | np.isnan(m["nll"]), report


def rank(collected: Collected, store: Store, memorization: MemorizationSettings,
         overmem: OvermemSettings = OvermemSettings(), *, level: float = 0.95, n_boot: int = 1000,
         pathway_settings: PathwaySettings = PathwaySettings()) -> Ranking:
    """Per-checkpoint metrics and proxies, stages and flags, PM with its interval, and a recommendation.

    Checkpoints of a mixture-of-experts model also get :class:`PathwayMetrics`.
    """
    measured = [i for i, fp in enumerate(collected.fingerprints) if fp is not None and i not in collected.failures]
    m = measured_matrices(collected, store)
    rows = [
        CheckpointMetrics(
            index=i,
            path=str(c.path),
            step=c.step,
            epoch=c.epoch,
            train_loss=c.train_loss,
            fingerprint=collected.fingerprints[i],
            error=collected.failures.get(i),
        )
        for i, c in enumerate(collected.checkpoints)
    ]
    default = memorization.threshold if memorization.threshold != "auto" else None
    ranking = Ranking(rows, Threshold(memorization.rule, None, default), len(collected.examples), None,
                      stages.RECOMMEND_RULE.format(se=overmem.recommend_se, proxy="proxy", tie=overmem.proxy_tie),
                      n_heldout=len(collected.heldout))
    if collected.harvest is not None and collected.harvest.fixed:
        ranking.alt_coverage = collected.harvest.coverage(ex.uid for ex in collected.examples)
        ranking.alt_sources = [i for i, fp in enumerate(collected.fingerprints) if fp in collected.harvest.sources]
    if not measured:
        ranking.warnings.append("no checkpoint could be measured")
        return ranking

    mask, ranking.threshold = memorized_mask(m, memorization)
    per_example = metrics.premem_accuracy_per_example_from_mask(m["acc"], mask)
    pm = metrics.per_checkpoint_mean(per_example)
    lo, hi = metrics.bootstrap_ci(per_example, n_boot=n_boot, level=level)
    measured_mask = ~np.isnan(m["nll"] if memorization.rule == "nll" else m["copy"])
    columns = {
        "train_acc": metrics.train_accuracy(m["acc"]),
        "premem_acc": pm,
        "memorized_frac": metrics.memorized_fraction(mask & measured_mask, measured_mask),
        "copy_rate": metrics.copy_rate(m["copy"]),
        "target_nll": metrics.per_checkpoint_mean(m["nll"]),
        "entropy": metrics.per_checkpoint_mean(m["entropy"]),
        "alt_nll": metrics.per_checkpoint_mean(m["alt"]),
        "perturb_nll": metrics.per_checkpoint_mean(m["perturb"]),
        "perturb_gap": metrics.per_checkpoint_mean(m["perturb"] - m["nll"]),
        "heldout_nll": metrics.per_checkpoint_mean(m["heldout"]),
    }

    proxy, note = choose_proxy(columns, ranking.alt_coverage, overmem)
    if note:
        ranking.warnings.append(note)
    if collected.harvest is not None and not collected.harvest.fixed:
        ranking.warnings.append(_open_harvest_warning(collected))
    proxy_values = columns[proxy] if proxy else np.full(len(measured), np.nan)
    assessment = stages.assess(columns["train_acc"], pm, columns["memorized_frac"], proxy_values, proxy or "proxy",
                               overmem)
    columns["proxy_ratio"] = assessment.ratio
    for r, i in enumerate(measured):
        for name, values in columns.items():
            setattr(rows[i], name, float(values[r]))
        rows[i].premem_ci = (float(lo[r]), float(hi[r]))
        rows[i].stage, rows[i].flag = assessment.stages[r], assessment.flags[r]
    if any(collected.checkpoints[i].num_experts is not None for i in measured):
        ranking.pathway_rule = PATHWAY_RULE.format(s=pathway_settings)
        uids = [ex.uid for ex in collected.examples]
        for r, i in enumerate(measured):
            if collected.checkpoints[i].num_experts is not None:
                records = store.get_many(collected.fingerprints[i], collected.settings_key, "score", uids)
                rows[i].pathways = pathway_metrics(records, uids, mask[r] & measured_mask[r], pathway_settings)
    flagged = np.array([f is not None for f in assessment.flags])

    # Without any proxy the tie-break falls back to the memorised fraction (lower is better too).
    tie_break = proxy_values if proxy else columns["memorized_frac"]
    ranking.proxy = proxy
    ranking.rule = stages.RECOMMEND_RULE.format(se=overmem.recommend_se, proxy=proxy or "memorised fraction",
                                                tie=overmem.proxy_tie)
    ranking.stage_rule = stages.STAGE_RULE.format(proxy=proxy or "proxy", rise=1 + overmem.proxy_rise,
                                                  **overmem.model_dump(exclude={"proxy"}))
    support = metrics.premem_support(m["acc"], mask)
    if (warning := support.warning()) is not None:
        ranking.warnings.append(warning)
    if len(measured) < 3:
        ranking.warnings.append(
            f"only {len(measured)} checkpoint(s) measured; pre-memorization accuracy needs the history "
            "before memorisation — save more frequent checkpoints"
        )
    if flagged.all():
        ranking.warnings.append("every measured checkpoint is flagged over-memorized; recommending among all of them")
    pick = stages.recommend(per_example, tie_break, flagged, overmem.proxy_tie, overmem.recommend_se)
    ranking.recommended = measured[pick] if pick is not None else None
    ranking.per_example = {"premem": per_example, "memorized": mask, "measured_index": np.array(measured), **m}
    return ranking


PATHWAY_RULE = (
    "pathways (MoE): per layer, experts kept by routing weight (router softmax averaged over the target tokens) "
    "until {s.cutoff:.0%} of it, ordered by {s.order}; distance = mean pairwise Levenshtein distance of the "
    "memorised examples' pathways; complexity = 1 - mean cosine of consecutive layers' routing-weighted gate vectors"
)


def pathway_metrics(records: dict[str, Record], uids: list[str], memorised: np.ndarray,
                    settings: PathwaySettings) -> PathwayMetrics | None:
    """Pathway distance and consistency of one checkpoint from its stored routing records.

    ``records``: the checkpoint's "score" records (routing weights in ``array``, consecutive
    layer cosines in ``data["layer_cos"]``); ``memorised[n]`` says whether ``uids[n]`` is
    memorised. None when no record carries routing weights (routers not found).
    """
    routed = {uid for uid, rec in records.items() if rec.array is not None and rec.array.size}
    if not routed:
        return None
    n_layers, n_experts = records[next(iter(routed))].array.shape
    chosen = [uid for uid, mem in zip(uids, memorised) if mem and uid in routed]
    weights = np.array([records[uid].array for uid in chosen], dtype=np.float64).reshape(-1, n_layers, n_experts)
    cosines = np.array([records[uid].data["layer_cos"] for uid in chosen], dtype=np.float64)
    distance = pathways.pathway_distance(pathways.pathways(weights, settings.cutoff, settings.order), n_experts,
                                         n_layers, max_examples=settings.max_examples, max_pairs=settings.max_pairs,
                                         seed=settings.seed)
    consistency = pathways.consistency_from_cosines(cosines.reshape(len(chosen), max(n_layers - 1, 0)))
    return PathwayMetrics(
        distance=distance.mean,
        consistency=consistency.consistency,
        complexity=consistency.complexity,
        n_examples=len(chosen),
        n_compared=distance.n_examples,
        n_unique=distance.n_unique,
        mean_length=distance.mean_length,
        per_layer={"distance": distance.per_layer.tolist(), "distance_stderr": distance.per_layer_stderr.tolist(),
                   "consistency": consistency.per_pair.tolist()},
        distance_exact=distance.exact,
        distance_stderr=distance.stderr,
    )


def _open_harvest_warning(collected: Collected) -> str:
    n = len(collected.harvest.sources)
    uids = [ex.uid for ex in collected.examples]
    if n == 0:
        what = "no checkpoint has a correct sample that differs from its training target yet"
    else:
        what = (f"{n} checkpoint(s) gave alternative solutions for {collected.harvest.coverage(uids):.0%} of the "
                "examples so far")
    return f"alternative-solution NLL not reported: {what}; the set is completed as checkpoints are added"
