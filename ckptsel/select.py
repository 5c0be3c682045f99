"""From stored measurements to a ranking: per-checkpoint metrics, stages, flags, a recommendation.

Reads each run's ``(checkpoints, examples)`` matrices from the store, hands them to the ranking
rule over arrays (:func:`ckptsel.sweep.rank_sweep`: the formulas of :mod:`ckptsel.metrics`,
the stage rule of :mod:`ckptsel.stages`, one recommendation per run and one for the sweep), and
returns plain data (:class:`Ranking`) that the CLI prints and serialises. Nothing here loads a
model. :meth:`Ranking.from_json` reads ``ckptsel rank --json`` back, so the report, verify and
the gate read a ranking file as the same typed object.

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
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from ckptsel import columns, pathways, stages, sweep
from ckptsel.collect import Collected
from ckptsel.errors import CkptselError
from ckptsel.settings import MemorizationSettings, OvermemSettings, PathwaySettings
from ckptsel.store import Record, Store
from ckptsel.sweep import PROXIES, Threshold, choose_proxy  # noqa: F401  (re-exported)


@dataclass
class PathwayMetrics:
    """Li et al.'s pathway metrics of one MoE checkpoint, over its memorised examples (ckptsel/DESIGN.md).

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

    @classmethod
    def from_json(cls, data: Mapping, where: str = "pathways") -> PathwayMetrics:
        read = _Fields(data, where)
        return cls(distance=read.number("distance", required=True),
                   consistency=read.number("consistency", required=True),
                   complexity=read.number("complexity", required=True),
                   n_examples=read.integer("n_examples", required=True),
                   n_compared=read.integer("n_compared", required=True),
                   n_unique=read.integer("n_unique", required=True),
                   mean_length=read.number("mean_length", required=True),
                   per_layer=read.number_lists("per_layer", required=True),
                   distance_exact=read.boolean("distance_exact", True),
                   distance_stderr=read.number("distance_stderr", default=0.0))


@dataclass
class CheckpointMetrics:
    index: int  # position in the ranking (all runs, run after run)
    path: str
    step: int | None
    epoch: float | None
    train_loss: float | None
    fingerprint: str | None
    premem_ci: tuple[float, float] = (math.nan, math.nan)
    # Every number of ckptsel.columns.COLUMNS by key (read as attributes too: ``row.premem_acc``); NaN when
    # not measured.
    values: dict[str, float] = field(default_factory=dict)
    stage: str | None = None
    flag: stages.Flag | None = None
    error: str | None = None
    pathways: PathwayMetrics | None = None  # MoE runs only
    run: str | None = None  # the run it belongs to
    recommended_in_run: bool = False  # its run's own recommendation

    def __post_init__(self):  # every column, NaN where not measured
        self.values = {key: float(self.values.get(key, math.nan)) for key in columns.KEYS}

    def __getattr__(self, name: str):  # only called when normal lookup fails: the columns
        if name in columns.BY_KEY:
            return self.values.get(name, math.nan)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def row_json(self, moe: bool) -> dict:
        """This checkpoint as a ``--json`` row: its fields, then every column by key (NaN: null)."""
        row = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "values"}
        row["premem_ci"] = list(self.premem_ci)
        row["flag"] = None if self.flag is None else self.flag.to_json()
        row["pathways"] = None if self.pathways is None else asdict(self.pathways)
        if not moe:  # dense runs: no pathway keys at all
            del row["pathways"]
        row.update({key: self.values.get(key, math.nan) for key in columns.KEYS})
        return {k: _clean(v) for k, v in row.items()}

    @classmethod
    def from_json(cls, data: Mapping, index: int, where: str = "checkpoint") -> CheckpointMetrics:
        """One row of :meth:`Ranking.to_json`; ``index`` (its position) where the row does not say."""
        read = _Fields(data, where)
        flag, moe = data.get("flag"), data.get("pathways")
        return cls(
            index=read.integer("index", index), path=read.text("path", ""), step=read.integer("step"),
            epoch=read.optional_number("epoch"), train_loss=read.optional_number("train_loss"),
            fingerprint=read.text("fingerprint"),
            values={key: read.number(key) for key in columns.KEYS},
            premem_ci=read.pair("premem_ci"), stage=read.text("stage"),
            flag=None if flag is None else _flag_from_json(flag, f"{where}.flag"),
            error=read.text("error"),
            pathways=None if moe is None else PathwayMetrics.from_json(moe, f"{where}.pathways"),
            run=read.text("run"), recommended_in_run=read.boolean("recommended_in_run", False),
        )



@dataclass
class RunSummary:
    """One run of the ranking: which checkpoints are its own, and its own recommendation."""

    name: str
    path: str | None
    indices: list[int]  # into Ranking.checkpoints, in training order
    recommended: int | None  # into Ranking.checkpoints
    n_examples: int
    proxy: str | None = None
    threshold: float | None = None  # the nu it used (differs between runs only with auto per run)
    warnings: list[str] = field(default_factory=list)
    # Per-example arrays, for --export-examples: (checkpoints, examples), measured rows only.
    per_example: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def to_json(self, checkpoints: list[CheckpointMetrics]) -> dict:
        rec = checkpoints[self.recommended] if self.recommended is not None else None
        return {
            "name": self.name,
            "path": self.path,
            "steps": [checkpoints[i].step for i in self.indices],
            "recommended": None if rec is None else {"index": rec.index, "path": rec.path, "step": rec.step},
            "n_examples": self.n_examples,
            "proxy": self.proxy,
            "threshold": _clean(self.threshold),
            "warnings": self.warnings,
        }

    @classmethod
    def from_json(cls, data: Mapping, indices: list[int], where: str = "run") -> RunSummary:
        """One run of :meth:`Ranking.to_json`; ``indices``: its rows in the ranking (the rows name their run)."""
        read = _Fields(data, where)
        return cls(name=read.text("name", ""), path=read.text("path"), indices=indices,
                   recommended=read.recommended("recommended"), n_examples=read.integer("n_examples", 0),
                   proxy=read.text("proxy"), threshold=read.optional_number("threshold"),
                   warnings=read.texts("warnings"))


@dataclass
class Ranking:
    checkpoints: list[CheckpointMetrics]
    threshold: Threshold
    n_examples: int
    recommended: int | None  # index into checkpoints: the sweep's pick (the run's, for one run)
    rule: str
    proxy: str | None = None  # the perplexity proxy of the flag and the tie-break
    stage_rule: str = ""
    alt_coverage: float = math.nan  # fraction of examples with an alternative solution
    alt_sources: list[int] = field(default_factory=list)  # indices of the checkpoints they were harvested from
    n_heldout: int = 0
    warnings: list[str] = field(default_factory=list)
    pathway_rule: str | None = None  # MoE runs only: how the pathway metrics were computed
    runs: list[RunSummary] = field(default_factory=list)
    # One run: its per-example arrays (RunSummary.per_example); empty for a sweep.
    per_example: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_sweep(self) -> bool:
        return len(self.runs) > 1

    def run_of(self, index: int) -> RunSummary | None:
        """The run holding checkpoint ``index``."""
        return next((r for r in self.runs if index in r.indices), None)

    def to_json(self) -> dict:
        rows = [c.row_json(moe=self.pathway_rule is not None) for c in self.checkpoints]
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
            "runs": [r.to_json(self.checkpoints) for r in self.runs],
            **moe,
        }

    @classmethod
    def from_json(cls, data: Mapping) -> Ranking:
        """The ranking :meth:`to_json` (``ckptsel rank --json``) wrote: ``from_json(r.to_json())`` equals ``r``
        but for the per-example arrays, which the JSON does not carry.

        Keys the JSON leaves out take their defaults (NaN for a number), so a ranking from an
        older version still reads; keys it does not know (``settings_key``, ``cache``) are
        ignored. A value of the wrong type raises :class:`~ckptsel.errors.CkptselError` naming the
        field (``checkpoints[2].premem_acc: expected a number, got 'x'``).
        """
        read = _Fields(data)
        rows = [CheckpointMetrics.from_json(row, i, f"checkpoints[{i}]")
                for i, row in enumerate(read.items("checkpoints"))]
        runs = read.items("runs")
        summaries = []
        for n, run in enumerate(runs):
            name = run.get("name") if isinstance(run, Mapping) else None
            indices = [i for i, c in enumerate(rows) if c.run == name]
            if not indices and len(runs) == 1:  # rows that do not name their run: the only run's
                indices = list(range(len(rows)))
            summaries.append(RunSummary.from_json(run, indices, f"runs[{n}]"))
        ranking = cls(rows, _threshold_from_json(data.get("threshold") or {}), read.integer("n_examples", 0),
                      read.recommended("recommended"), read.text("rule", ""), proxy=read.text("proxy"),
                      stage_rule=read.text("stage_rule", ""), alt_coverage=read.number("alt_coverage"),
                      alt_sources=_indices_of_steps(rows, read.items("alt_sources"), "alt_sources"),
                      n_heldout=read.integer("n_heldout", 0), warnings=read.texts("warnings"),
                      pathway_rule=read.text("pathway_rule"), runs=summaries)
        for where, index in [("recommended", ranking.recommended),
                             *((f"runs[{n}].recommended", s.recommended) for n, s in enumerate(summaries))]:
            if index is not None and not 0 <= index < len(rows):
                raise CkptselError(f"{where}.index: {index} is not a checkpoint of the ranking "
                                   f"({len(rows)} checkpoints)")
        return ranking


def _flag_from_json(data: Mapping, where: str) -> stages.Flag:
    """A :class:`ckptsel.stages.Flag` from its ``to_json`` (its ``reason`` is recomputed from the numbers)."""
    read = _Fields(data, where)
    return stages.Flag(**{f.name: read.text(f.name, required=True) if f.name == "proxy" else
                          read.number(f.name, required=True) for f in fields(stages.Flag)})


def _threshold_from_json(data: Mapping) -> Threshold:
    read = _Fields(data, "threshold")
    return Threshold(rule=read.text("rule", "nll"), used=read.optional_number("used"),
                     recipe_default=read.optional_number("recipe_default"), auto=read.optional_number("auto"),
                     auto_auc=read.optional_number("auto_auc"), auto_note=read.text("auto_note"),
                     scope=read.text("scope", "sweep"), fell_back=read.boolean("fell_back", False),
                     per_run=read.numbers("per_run"))


def _indices_of_steps(rows: list[CheckpointMetrics], steps: list, where: str) -> list[int]:
    """The rows holding ``steps``, in order (``to_json`` writes the alternative solutions' sources by step)."""
    out: list[int] = []
    for step in steps:
        i = next((i for i, c in enumerate(rows) if c.step == step and i not in out), None)
        if i is None:
            raise CkptselError(f"{where}: step {step!r} is not a checkpoint of the ranking")
        out.append(i)
    return out


class _Fields:
    """Typed reads from one JSON object: a missing key gives the default, a value of the wrong type one
    line naming its field (``checkpoints[2].premem_acc: expected a number, got 'x'``)."""

    def __init__(self, data: Any, where: str = ""):
        if not isinstance(data, Mapping):
            raise CkptselError(f"{where or 'ranking'}: expected an object, got {_shown(data)}")
        self.data, self.where = data, where

    def at(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def value(self, name: str, default: Any = None, required: bool = False) -> Any:
        if name not in self.data:
            if required:
                raise CkptselError(f"{self.where or 'ranking'}: no {name!r}")
            return default
        return self.data[name]

    def _bad(self, name: str, expected: str) -> CkptselError:
        return CkptselError(f"{self.at(name)}: expected {expected}, got {_shown(self.data[name])}")

    def number(self, name: str, default: float = math.nan, required: bool = False) -> float:
        """A float; null is NaN (how :func:`_clean` writes it)."""
        return _number(self.value(name, default, required), self.at(name))

    def optional_number(self, name: str) -> float | None:
        return None if self.value(name) is None else self.number(name)

    def integer(self, name: str, default: int | None = None, required: bool = False) -> int | None:
        """An integer; null or missing: ``default``."""
        value = self.value(name, None, required)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(name, "an integer")
        return value

    def text(self, name: str, default: str | None = None, required: bool = False) -> str | None:
        """A string; null or missing: ``default``."""
        value = self.value(name, None, required)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self._bad(name, "a string")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.value(name, default)
        if not isinstance(value, bool):
            raise self._bad(name, "true or false")
        return value

    def items(self, name: str) -> list:
        """A list (null or missing: empty); its elements are checked where they are read."""
        value = self.value(name)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self._bad(name, "a list")
        return value

    def texts(self, name: str) -> list[str]:
        values = self.items(name)
        if not all(isinstance(v, str) for v in values):
            raise self._bad(name, "a list of strings")
        return list(values)

    def pair(self, name: str) -> tuple[float, float]:
        """An interval: two numbers (null: NaN); missing, both NaN."""
        values = self.items(name) or [None, None]
        if len(values) != 2:
            raise self._bad(name, "two numbers")
        return _number(values[0], self.at(name)), _number(values[1], self.at(name))

    def numbers(self, name: str) -> dict[str, float]:
        """An object of numbers (null: NaN)."""
        value = self.value(name) or {}
        if not isinstance(value, Mapping):
            raise self._bad(name, "an object of numbers")
        return {str(k): _number(v, f"{self.at(name)}.{k}") for k, v in value.items()}

    def number_lists(self, name: str, required: bool = False) -> dict[str, list[float]]:
        """An object of lists of numbers (null: NaN)."""
        value = self.value(name, {}, required)
        if not isinstance(value, Mapping) or not all(isinstance(v, list) for v in value.values()):
            raise self._bad(name, "an object of lists of numbers")
        return {str(k): [_number(x, f"{self.at(name)}.{k}") for x in v] for k, v in value.items()}

    def recommended(self, name: str) -> int | None:
        """``{"index": i, "path": ..., "step": ...}`` -> i; null -> None."""
        value = self.value(name)
        return None if value is None else _Fields(value, self.at(name)).integer("index", required=True)


def _number(value: Any, where: str) -> float:
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CkptselError(f"{where}: expected a number, got {_shown(value)}")
    return float(value)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


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
    """Every :data:`ckptsel.columns.MEASURES` as a (measured checkpoints, examples) array, in training order.

    A kind that was not measured reads as all NaN; held-out measures have one column per held-out
    example.
    """
    fps = [fp for i, fp in enumerate(collected.fingerprints) if fp is not None and i not in collected.failures]
    out: dict[str, np.ndarray] = {}
    from_samples: dict[tuple[str, bool], list[columns.Measure]] = {}  # (series, held-out) -> its sample measures
    for measure in columns.MEASURES:
        uids = [ex.uid for ex in (collected.heldout if measure.heldout else collected.examples)]
        series = collected.series.get(measure.kind, measure.kind if measure.kind in ("score", "sample") else None)
        if series is None:
            out[measure.name] = np.full((len(fps), len(uids)), np.nan)
        elif measure.field is not None:
            out[measure.name] = store.matrix(fps, collected.settings_key, series, uids, measure.field)
        else:
            from_samples.setdefault((series, measure.heldout), []).append(measure)
    for (series, heldout), measures in from_samples.items():
        uids = [ex.uid for ex in (collected.heldout if heldout else collected.examples)]
        out.update(_of_samples(store, fps, collected.settings_key, series, uids, measures))
    return out


def _of_samples(store: Store, fps: list[str], key: str, series: str, uids: list[str],
                measures: Sequence[columns.Measure]) -> dict[str, np.ndarray]:
    """Each measure's ``of_samples`` of every stored record's samples, as (checkpoints, examples) arrays
    (NaN: no samples); the records are read once for all of them."""
    out = {m.name: np.full((len(fps), len(uids)), np.nan) for m in measures}
    for row, fp in enumerate(fps):
        records = store.get_many(fp, key, series, uids)
        for col, uid in enumerate(uids):
            rec = records.get(uid)
            if rec is not None and rec.samples:
                for m in measures:
                    out[m.name][row, col] = m.of_samples(rec.samples)
    return out


def run_arrays(name: str, col: Collected, store: Store) -> tuple[sweep.RunArrays, dict[str, np.ndarray]]:
    """One run's stored measurements as the arrays :func:`ckptsel.sweep.rank_sweep` reads (its measured
    checkpoints, in training order), and the matrices they came from."""
    measured = [i for i, fp in enumerate(col.fingerprints) if fp is not None and i not in col.failures]
    m = measured_matrices(col, store)
    coverage = 0.0
    if col.harvest is not None and col.harvest.fixed:
        coverage = col.harvest.coverage(ex.uid for ex in col.examples)
    row = {col.fingerprints[i]: k for k, i in enumerate(measured)}
    source_of = [] if col.harvest is None else [row.get(col.harvest.source_of(ex.uid), -1) for ex in col.examples]
    arrays = sweep.RunArrays(
        name=name, steps=[col.checkpoints[i].step for i in measured], acc=m["acc"], nll=m["nll"], copy=m["copy"],
        entropy=m["entropy"], perturb=m["perturb"], alt=m["alt"], heldout=m["heldout"],
        examples=[ex.uid for ex in col.examples], alt_coverage=coverage, alt_source_of=source_of,
        measures={name: values for name, values in m.items() if name not in sweep.RunArrays.__dataclass_fields__},
    )
    return arrays, m


def rank(collected: Collected | Sequence[Collected], store: Store, memorization: MemorizationSettings,
         overmem: OvermemSettings = OvermemSettings(), *, level: float = 0.95, n_boot: int = 1000,
         pathway_settings: PathwaySettings = PathwaySettings(), threshold: float | str | None = None,
         threshold_scope: str = "sweep", run_names: Sequence[str] | None = None,
         run_paths: Sequence[str | None] | None = None) -> Ranking:
    """Per-checkpoint metrics and proxies, stages and flags, PM with its interval, and a recommendation.

    ``collected``: one :class:`Collected` per run (a single one is a run of its own), in the
    order they are listed. ``threshold`` overrides ``memorization.threshold`` (a number, "auto",
    or "auto-run": "auto" with ``threshold_scope`` "run", as the commands spell it; see
    :func:`ckptsel.sweep.rank_sweep` for ``threshold_scope`` and the fallback).
    Checkpoints of a mixture-of-experts model also get :class:`PathwayMetrics`.
    """
    if threshold == "auto-run":
        threshold, threshold_scope = "auto", "run"
    runs = [collected] if isinstance(collected, Collected) else list(collected)
    names = list(run_names) if run_names is not None else [_run_name(c, r) for r, c in enumerate(runs)]
    paths = list(run_paths) if run_paths is not None else [None] * len(runs)
    rows: list[CheckpointMetrics] = []
    summaries: list[RunSummary] = []
    measured_rows: list[list[int]] = []  # per measured run: the ranking indices of its measured checkpoints
    measured_runs: list[tuple[Collected, list[int]]] = []  # per measured run: it, and its measured checkpoints
    arrays: list[sweep.RunArrays] = []
    matrices = []
    for name, path, col in zip(names, paths, runs):
        first = len(rows)
        for i, c in enumerate(col.checkpoints):
            rows.append(CheckpointMetrics(index=first + i, path=str(c.path), step=c.step, epoch=c.epoch,
                                          train_loss=c.train_loss, fingerprint=col.fingerprints[i],
                                          error=col.failures.get(i), run=name))
        measured = [i for i, fp in enumerate(col.fingerprints) if fp is not None and i not in col.failures]
        summaries.append(RunSummary(name, path, list(range(first, len(rows))), None, len(col.examples)))
        if not measured:
            continue
        arr, m = run_arrays(name, col, store)
        measured_rows.append([first + i for i in measured])
        measured_runs.append((col, measured))
        matrices.append(m)
        arrays.append(arr)

    first_run = runs[0]
    default = memorization.threshold if memorization.threshold != "auto" else None
    ranking = Ranking(rows, Threshold(memorization.rule, None, default), len(first_run.examples), None,
                      stages.recommend_rule(overmem.prefer).format(se=overmem.recommend_se, proxy="proxy",
                                                                    tie=overmem.proxy_tie),
                      n_heldout=len(first_run.heldout), runs=summaries)
    if len(runs) > 1:
        ranking.n_examples = len({ex.uid for col in runs for ex in col.examples})
    if len(runs) == 1 and first_run.harvest is not None and first_run.harvest.fixed:
        ranking.alt_coverage = first_run.harvest.coverage(ex.uid for ex in first_run.examples)
        ranking.alt_sources = [i for i, fp in enumerate(first_run.fingerprints) if fp in first_run.harvest.sources]
    for name, col in zip(names, runs):
        if col.harvest is not None and not col.harvest.fixed and any(
                fp is not None for i, fp in enumerate(col.fingerprints) if i not in col.failures):
            ranking.warnings.append(_open_harvest_warning(col, name if len(runs) > 1 else None))
    if not arrays:
        ranking.warnings.append("no checkpoint could be measured")
        return ranking

    result = sweep.rank_sweep(arrays, memorization=memorization, overmem=overmem, threshold=threshold,
                              threshold_scope=threshold_scope, n_boot=n_boot, level=level)
    ranking.threshold = result.threshold
    ranking.warnings.extend(result.warnings)
    by_name = {s.name: s for s in summaries}
    for ranked, where, m in zip(result.runs, measured_rows, matrices):
        summary = by_name[ranked.name]
        summary.proxy, summary.threshold = ranked.proxy, ranked.threshold
        prefix = f"run {ranked.name}: " if len(runs) > 1 else ""
        summary.warnings = ranked.warnings
        ranking.warnings.extend(prefix + w for w in ranked.warnings)
        for r, i in enumerate(where):
            row = rows[i]
            row.values.update({name: float(values[r]) for name, values in ranked.columns.items()})
            row.premem_ci = (float(ranked.premem_ci[0][r]), float(ranked.premem_ci[1][r]))
            row.stage, row.flag = ranked.stages[r], ranked.flags[r]
        if ranked.recommended is not None:
            summary.recommended = where[ranked.recommended]
            rows[summary.recommended].recommended_in_run = True
        summary.per_example = {"premem": ranked.per_example, "memorized": ranked.memorized,
                               "measured_index": np.array([i - summary.indices[0] for i in where]), **m}
    if result.recommended_run is not None:
        ranking.recommended = by_name[result.runs[result.recommended_run].name].recommended
    proxies = {r.proxy for r in result.runs}
    proxy = next(iter(proxies)) if len(proxies) == 1 else None
    ranking.proxy = proxy
    ranking.rule = result.rule
    ranking.stage_rule = stages.STAGE_RULE.format(proxy=proxy or "proxy", rise=1 + overmem.proxy_rise,
                                                  **overmem.model_dump(exclude={"proxy"}))
    if len(runs) == 1:
        ranking.per_example = summaries[0].per_example

    if any(c.num_experts is not None for col in runs for c in col.checkpoints):
        ranking.pathway_rule = PATHWAY_RULE.format(s=pathway_settings)
        for (col, measured), where, ranked, arr in zip(measured_runs, measured_rows, result.runs, arrays):
            uids = [ex.uid for ex in col.examples]
            measured_mask = ~np.isnan(arr.matrix("copy" if memorization.rule == "copy" else memorization.nll_measure))
            for r, (i, local) in enumerate(zip(where, measured)):
                if col.checkpoints[local].num_experts is not None:
                    records = store.get_many(col.fingerprints[local], col.settings_key, "score", uids)
                    rows[i].pathways = pathway_metrics(records, uids, ranked.memorized[r] & measured_mask[r],
                                                       pathway_settings)
    return ranking


def _run_name(col: Collected, r: int) -> str:
    named = {c.run for c in col.checkpoints if c.run}
    return next(iter(named)) if len(named) == 1 else f"run{r + 1}"


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


def _open_harvest_warning(collected: Collected, run: str | None = None) -> str:
    n = len(collected.harvest.sources)
    uids = [ex.uid for ex in collected.examples]
    if n == 0:
        what = "no checkpoint has a correct sample that differs from its training target yet"
    else:
        what = (f"{n} checkpoint(s) gave alternative solutions for {collected.harvest.coverage(uids):.0%} of the "
                "examples so far")
    where = f" in run {run}" if run else ""
    return (f"alternative-solution NLL not reported{where}: {what}; the set is completed as checkpoints are "
            "added")
