"""Every per-checkpoint number ckptsel reports, declared once.

Two tables. :data:`MEASURES`: the ``(checkpoints, examples)`` arrays read from the result store
-- a numeric field of a stored measurement, or a function of the k samples stored with it.
:data:`COLUMNS`: the per-checkpoint numbers computed from them -- key, header, format, direction,
description and the function that computes it. The ranking rows and ``--json``
(:class:`ckptsel.select.CheckpointMetrics`), the terminal table (``ckptsel rank``), the HTML
report's table and its chart of further metrics, the Trainer callback's logged metrics and
``merge --recommend``'s candidate rows all iterate over :data:`COLUMNS`; none of them names a
metric it does not treat specially. Adding a metric is one entry here plus its computation
(ckptsel/DESIGN.md, *Where things go*).

Two columns are set by the ranking rule itself rather than computed here (``compute`` is None):
``premem_acc`` (it comes with its bootstrap interval and drives the recommendation) and
``proxy_ratio`` (the over-memorized flag's proxy over its baseline, :mod:`ckptsel.stages`).
This module imports numpy and the formulas only: ranking from the store never loads torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ckptsel import diversity, metrics


@dataclass(frozen=True)
class Measure:
    """A ``(checkpoints, examples)`` array read from the store, NaN where nothing is stored.

    ``kind``: the measurement kind it is stored under ("score", "sample", "perturb", "alt",
    "heldout"); ``field``: the numeric field of the stored record, or ``of_samples``: a function
    of the record's stored samples (a list of completions) to one number; ``heldout``: over the
    held-out examples rather than the training ones.
    """

    name: str
    kind: str
    field: str | None = None
    of_samples: Callable[[Sequence[str]], float] | None = None
    heldout: bool = False


MEASURES: tuple[Measure, ...] = (
    Measure("nll", "score", "nll"),
    Measure("peak_nll", "score", "peak_nll"),  # the costliest target token's NLL (the peak-nll rule)
    Measure("entropy", "score", "entropy"),
    Measure("acc", "sample", "acc"),
    Measure("copy", "sample", "copy_rate"),
    Measure("perturb", "perturb", "nll"),  # mean target NLL over the perturbed prompts
    Measure("alt", "alt", "nll"),  # NaN for examples without an alternative solution
    Measure("heldout", "heldout", "nll", heldout=True),
    Measure("distinct", "sample", of_samples=diversity.distinct_fraction),
    Measure("edit_distance", "sample", of_samples=diversity.mean_edit_distance),
)


@dataclass(frozen=True)
class Inputs:
    """What a column is computed from: one run's measures (``(checkpoints, examples)``, in training
    order), its memorised mask and the mask of measured pairs, the ν it used (None under the
    copy rule) and the measure ν is compared with (``nll`` or ``peak_nll``)."""

    m: Mapping[str, np.ndarray]
    memorised: np.ndarray
    measured: np.ndarray
    threshold: float | None
    nll_measure: str = "nll"


@dataclass(frozen=True)
class Column:
    """One per-checkpoint number.

    ``fmt``: its format spec; ``higher_is_better``: its direction (None: neither);
    ``compute``: the function of :class:`Inputs` giving one value per checkpoint (None: set by
    the ranking rule); ``show``: "measured" -- a table column when any checkpoint has a value,
    "always", or "json" -- in ``--json`` and the ranking rows only; ``cell``: how a table
    renders it -- "value", "ci" (with the interval ``premem_ci``) or "band:<key>" (this value to
    the other column's, one cell); ``log``: logged by the Trainer callback at each measured save;
    ``chart``: drawn in the report's chart of further metrics; ``long_header``: the report's header, where
    it differs from the terminal table's.
    """

    key: str
    header: str
    description: str
    fmt: str = ".3f"
    higher_is_better: bool | None = None
    compute: Callable[[Inputs], np.ndarray] | None = None
    show: str = "measured"
    cell: str = "value"
    log: bool = False
    chart: bool = False
    long_header: str | None = None  # the report's header where its wider page takes a longer one

    @property
    def report_header(self) -> str:
        return self.long_header or self.header


def _mean(name: str) -> Callable[[Inputs], np.ndarray]:
    return lambda x: metrics.per_checkpoint_mean(x.m[name])


NU_BAND = 2.0  # the band of pre-memorization accuracy: nu times and divided by this


def _premem_at(factor: float) -> Callable[[Inputs], np.ndarray]:
    """PM with ν scaled by ``factor`` (the ν band; NaN under the copy rule)."""

    def compute(x: Inputs) -> np.ndarray:
        if x.threshold is None or not x.threshold > 0:
            return np.full(np.shape(x.m["acc"])[0], np.nan)
        return metrics.premem_accuracy(x.m["acc"], x.m[x.nll_measure], x.threshold * factor)

    return compute


COLUMNS: tuple[Column, ...] = (
    Column("train_acc", "train acc", "sampled accuracy on the training questions (k samples, graded)",
           higher_is_better=True, compute=lambda x: metrics.train_accuracy(x.m["acc"]), show="always", log=True),
    Column("premem_acc", "pre-mem acc (95% CI)",
           "pre-memorization train accuracy (Kang et al.): predicted test accuracy", higher_is_better=True,
           show="always", cell="ci", log=True),
    # How much PM depends on ν: PM can only fall as ν grows, so PM at 2ν and ν/2 bound it over that range
    # (on a task whose targets are mostly predictable tokens a ν that suits GSM8K marks examples the
    # model generalises on as memorised: benchmarks/README.md, "The pick on a grid nobody tuned on").
    Column("premem_nu_low", "pre-mem acc at 2ν … ν/2",
           "pre-memorization accuracy at 2ν … ν/2: how much it depends on the memorisation threshold", higher_is_better=True, compute=_premem_at(NU_BAND), cell="band:premem_nu_high"),
    Column("premem_nu_high", "pre-mem acc at ν/2", "pre-memorization accuracy at ν/2", higher_is_better=True,
           compute=_premem_at(1.0 / NU_BAND), show="json"),
    Column("memorized_frac", "memorised", "fraction of training examples memorised (target NLL below ν, or copied)",
           higher_is_better=False, compute=lambda x: metrics.memorized_fraction(x.memorised & x.measured, x.measured),
           show="always", log=True),
    Column("copy_rate", "copy", "fraction of samples that reproduce the training solution verbatim",
           higher_is_better=False, compute=lambda x: metrics.copy_rate(x.m["copy"]), show="always",
           long_header="copy rate"),
    Column("target_nll", "target NLL", "teacher-forced NLL of the training targets, nats per token",
           higher_is_better=False, compute=_mean("nll"), show="always"),
    Column("alt_nll", "alt NLL", "NLL of correct solutions other than the target; rises with over-memorization",
           higher_is_better=False, compute=_mean("alt"), show="always", long_header="alt-solution NLL"),
    Column("perturb_nll", "perturb NLL", "target NLL under perturbed prompts; rises with over-memorization",
           higher_is_better=False, compute=_mean("perturb"), show="json"),
    Column("perturb_gap", "perturb gap", "target NLL under perturbed prompts minus plain target NLL", fmt="+.3f",
           higher_is_better=False, compute=lambda x: metrics.per_checkpoint_mean(x.m["perturb"] - x.m["nll"]),
           show="always"),
    Column("heldout_nll", "held-out NLL", "NLL of held-out reference solutions (when a held-out file is given)",
           higher_is_better=False, compute=_mean("heldout")),
    Column("entropy", "entropy", "mean predictive entropy over target tokens; collapse: over-sharp memorisation",
           higher_is_better=True, compute=_mean("entropy"), show="always"),
    # Ruan et al.: over-memorized checkpoints lose generation diversity at comparable accuracy.
    Column("sample_diversity", "sample diversity",
           "mean pairwise edit distance of a question's k samples (normalised: 0 identical, 1 nothing shared)",
           higher_is_better=True, compute=_mean("edit_distance"), log=True, chart=True),
    Column("distinct_samples", "distinct samples", "distinct solutions among a question's k samples, over k",
           higher_is_better=True, compute=_mean("distinct"), log=True),
    Column("proxy_ratio", "proxy rise", "the flag's proxy over its minimum since underfitting (1: at its minimum)",
           fmt=".2f", higher_is_better=False, show="json"),
)

BY_KEY: dict[str, Column] = {c.key: c for c in COLUMNS}
KEYS: tuple[str, ...] = tuple(BY_KEY)


def compute_columns(inputs: Inputs) -> dict[str, np.ndarray]:
    """Every column with a ``compute``, one value per checkpoint, in table order."""
    return {c.key: np.asarray(c.compute(inputs), dtype=float) for c in COLUMNS if c.compute is not None}


def table_columns(has_value: Callable[[str], bool]) -> list[Column]:
    """The columns a table shows, in order: "always" ones, and "measured" ones where ``has_value(key)``."""
    return [c for c in COLUMNS if c.show == "always" or (c.show == "measured" and has_value(c.key))]


def band_partner(column: Column) -> str | None:
    """The other end of a "band:<key>" cell, else None."""
    return column.cell.split(":", 1)[1] if column.cell.startswith("band:") else None
