"""Input checks that turn silent wrong answers into loud ones, before any model work.

Each check reads only files (configs, the data, the tokenizer) and either returns what may be
measured, logs a warning naming the file and row, or raises a one-line error (exit 2):

* :func:`gradable`: references the recipe's grader finds no answer in. Their samples would
  all grade wrong and pull pre-memorization accuracy toward 0 without a word. A few: a
  warning; most of them (a template/grader mismatch): an error naming the grader. With
  ``skip_bad`` they are dropped, with a warning.
* :func:`fit_context`: rows longer than the model's context (``max_position_embeddings`` in
  ``config.json``, read without loading weights). One such row makes every checkpoint try
  to allocate memory for it and be reported as failed, blaming the checkpoint. An error
  naming the file and row, or dropped with ``skip_bad``.
* :func:`architecture_mismatches` / :func:`require_one_architecture`: checkpoints whose
  shape (``model_type``, ``hidden_size``, ``num_hidden_layers``, ``vocab_size``) differs from
  the rest of their run. Pre-memorization accuracy takes a maximum over a run's history, so
  a stray model inside a run would be mixed into it: the ranking commands leave it out,
  named as not measured (exit 3: the others are ranked), ``ckptsel ls`` names it in a warning.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from ckptsel.data import Example, read_rows
from ckptsel.discover import Checkpoint, Run
from ckptsel.errors import DataError
from ckptsel.formats import BROKEN

log = logging.getLogger(__name__)

MOST = 0.5  # more than this fraction unparseable: the grader does not fit the data
SHAPE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def where(path: Path, index: int) -> str:
    """``file:line`` (or ``file: row N``) of the row at position ``index`` of a data file."""
    for row in read_rows(path):
        if row.index == index:
            return row.where
    return f"{path}: row {index + 1}"


# --------------------------------------------------------------------------- references vs grader


def gradable(examples: list[Example], path: Path, grader, grader_name: str, *,
             skip_bad: bool = False) -> list[Example]:
    """The examples whose reference the grader can read (all of them unless ``skip_bad`` drops some).

    Raises :class:`DataError` when most references have no answer the grader can find, unless
    ``skip_bad``; otherwise a warning counts them and shows the first.
    """
    from ckptsel.data import grader_coverage

    coverage = grader_coverage(examples, grader)
    bad = set(coverage.unparsed)
    if not bad:
        return examples
    first = next(e for e in examples if e.index in bad)
    what = (f"{where(path, first.index)}: the {grader_name!r} grader finds no answer in this reference "
            f"(ends {first.reference[-60:]!r}) nor in {len(bad) - 1} other(s) of {len(examples)}")
    if skip_bad:
        kept = [e for e in examples if e.index not in bad]
        if not kept:
            raise DataError(f"{what}: nothing left to measure (--skip-bad); check the recipe's grader")
        log.warning("%s: dropped them (--skip-bad)", what)
        return kept
    if len(bad) > MOST * len(examples):
        raise DataError(f"{what}: most samples would grade wrong whatever they say, so the grader does not fit "
                        "this data (choose another --grader or recipe, or --skip-bad to drop those rows)")
    log.warning("%s; their samples always grade wrong (--skip-bad drops them)", what)
    return examples


# --------------------------------------------------------------------------- rows vs the model


def model_config(ckpt: Checkpoint) -> dict | None:
    """The checkpoint's ``config.json`` (an adapter's: its base model's), or None when not at hand (a broken one)."""
    return ckpt.format.model_config(ckpt)


def _text_config(config: dict) -> dict:
    """Multimodal configs keep the language model's numbers under ``text_config``."""
    inner = config.get("text_config")
    return {**config, **inner} if isinstance(inner, dict) else config


def context_length(checkpoints: Sequence[Checkpoint]) -> int | None:
    """The smallest context (positions) among the checkpoints' configs; None when none states one."""
    found = []
    for ckpt in checkpoints:
        config = model_config(ckpt)
        if config is None:
            continue
        config = _text_config(config)
        value = next((config[k] for k in CONTEXT_KEYS if isinstance(config.get(k), int) and config[k] > 0), None)
        if value is not None:
            found.append(value)
    return min(found, default=None)


def fit_context(examples: list[Example], lengths: Mapping[str, int], checkpoints: Sequence[Checkpoint], path: Path,
                *, skip_bad: bool = False) -> list[Example]:
    """The examples whose prompt + target fit the model's context; a longer one raises
    :class:`DataError` naming the file and row (``skip_bad``: dropped, with a warning).

    ``lengths``: token count of prompt + target (+ EOS) per example uid, as
    :func:`ckptsel.data.token_lengths` counts them.
    """
    context = context_length(checkpoints)
    if context is None or not examples:
        return examples
    long = [e for e in examples if lengths.get(e.uid, 0) > context]
    if not long:
        return examples
    first = long[0]
    what = (f"{where(path, first.index)}: {lengths[first.uid]} tokens (prompt + target), longer than the model's "
            f"context of {context} positions (max_position_embeddings)"
            + (f"; {len(long)} such rows" if len(long) > 1 else ""))
    if not skip_bad:
        raise DataError(f"{what}; shorten or drop it (--skip-bad drops such rows)")
    kept = [e for e in examples if lengths.get(e.uid, 0) <= context]
    if not kept:
        raise DataError(f"{what}: no row fits")
    log.warning("%s: dropped %d row(s) (--skip-bad)", what, len(long))
    return kept


# --------------------------------------------------------------------------- one architecture per run


def shape(ckpt: Checkpoint) -> tuple | None:
    """(model_type, hidden_size, num_hidden_layers, vocab_size) from the config; None when unreadable."""
    if ckpt.format.is_adapter:  # adapters of one base share its shape; their own rank may differ
        return None
    config = model_config(ckpt)
    if config is None:
        return None
    config = _text_config(config)
    return tuple(config.get(k) for k in SHAPE_KEYS)


def architecture_mismatches(run: Run) -> list[tuple[Checkpoint, str]]:
    """(checkpoint, one line) for each checkpoint whose shape differs from the most common one in its run."""
    shapes = {i: s for i, c in enumerate(run.checkpoints) if (s := shape(c)) is not None}
    if len(set(shapes.values())) < 2:
        return []
    common, _ = Counter(shapes.values()).most_common(1)[0]
    found = []
    for i, s in shapes.items():
        if s != common:
            diff = ", ".join(f"{k} {v} (the run's: {w})" for k, v, w in zip(SHAPE_KEYS, s, common) if v != w)
            ckpt = run.checkpoints[i]
            found.append((ckpt, f"{ckpt.path}: another architecture than the rest of run {run.name}: {diff}"))
    return found


def exclude_other_architectures(runs: Sequence[Run]) -> list[str]:
    """Mark each checkpoint whose shape differs from the rest of its run as unusable (the broken format),
    so pre-memorization accuracy never mixes it into the run's history; returns one line per checkpoint.

    The ranking commands then report it as not measured (exit 3) and rank the others; a run left
    with nothing measurable is exit 2 as usual.
    """
    lines = []
    for run in runs:
        for ckpt, line in architecture_mismatches(run):
            ckpt.format, ckpt.error = BROKEN, f"{line}; not ranked with them (rank it on its own)"
            log.warning("%s", ckpt.error)
            lines.append(ckpt.error)
    return lines
