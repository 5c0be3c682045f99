"""Verify ckptsel's prediction on a test set, with lm-eval.

INTERFACE:

    verify_file(checkpoints, examples, recipe, store, *, source, engine, max_new_tokens, seed, executor) -> Verification
    verify_tasks(checkpoints, names, store, *, engine, limit, num_fewshot, include_path, seed) -> [Verification]
    Verification.attach_predictions(ranking)   pair with pre-memorization accuracy (a select.Ranking); R², Spearman
    stored_summaries(store, fingerprint) -> [dict]  measured accuracies kept for ``ckptsel report``

Modules: :mod:`~ckptsel.verify.harness` (the lm-eval task and model wrapper),
:mod:`~ckptsel.verify.run` (checkpoints x store), :mod:`~ckptsel.verify.compare` (pure math).
"""

from ckptsel.verify.run import (
    Measured,
    Verification,
    default_budget,
    stored_summaries,
    unique_examples,
    verify_file,
    verify_tasks,
)

__all__ = [
    "Measured",
    "Verification",
    "default_budget",
    "stored_summaries",
    "unique_examples",
    "verify_file",
    "verify_tasks",
]
