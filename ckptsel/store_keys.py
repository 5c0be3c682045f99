"""The keys of the result store's key-value table (:meth:`ckptsel.store.Store.put_value`), one function per scheme.

Every entry the package keeps beside the measurements is named here, so a new kind of entry is
one function, and two never collide. The keys are part of the store's format: a function must
keep returning the same string for the same arguments (tests/test_store_keys.py pins each one),
or every store written before loses its entries.

=====================  ==========================================================  ===============================
key                    what it holds                                               written by
=====================  ==========================================================  ===============================
``rendered:<hash>``    a data file's rendered rows for one tokenizer and recipe    :func:`ckptsel.prepare.render`
``alt-harvest/...``    a run's alternative-solution set (``Harvest.to_json``)       :func:`ckptsel.collect.collect`
``verify/<fp>``        a checkpoint's verify summaries, per test set               :mod:`ckptsel.verify.run`
``verify-task/...``    one lm-eval task's per-document values for a checkpoint     :func:`ckptsel.verify.verify_tasks`
``merge-recommend:``   ``merge --recommend``'s comparison, by recommended checkpoint  :mod:`ckptsel.merge.recommend`
=====================  ==========================================================  ===============================

``<fp>`` is a checkpoint's content fingerprint (:func:`ckptsel.discover.fingerprint`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ckptsel.settings import ProxySettings

RENDER_SCHEME = "rendered/1"  # bump to render every data file again


def rendered_rows(data_digest: str, tokenizer: str, rendering: Mapping[str, Any], max_new_tokens: int | None,
                  skip_bad: bool) -> str:
    """A data file's rendered rows: its content hash, the tokenizer files' digest, the recipe's data
    section (``DataSettings.model_dump(mode="json")``), its sampling budget and ``--skip-bad``."""
    payload = {"scheme": RENDER_SCHEME, "data": data_digest, "tokenizer": tokenizer, "rendering": dict(rendering),
               "max_new_tokens": max_new_tokens, "skip_bad": skip_bad}
    return "rendered:" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def alt_harvest(settings_key: str, anchor: str, proxies: ProxySettings) -> str:
    """A run's alternative-solution set: the measurement settings, the run's first checkpoint
    (``anchor``, its fingerprint) and the harvest rule."""
    rule = f"{proxies.alt_min_coverage}/{proxies.alt_max_sources}/{proxies.alt_min_accuracy}/{proxies.alt_grader}"
    return f"alt-harvest/{settings_key}/{anchor}/{rule}"


def verify_summary(fingerprint: str) -> str:
    """A checkpoint's verify summaries (one entry per test set and settings), which ``ckptsel report`` reads."""
    return f"verify/{fingerprint}"


def verify_task(fingerprint: str, task_settings_key: str) -> str:
    """One named lm-eval task's result on a checkpoint (``task_settings_key``: task, limit, shots, dtype, seed)."""
    return f"verify-task/{fingerprint}/{task_settings_key}"


def merge_recommendation(fingerprint: str) -> str:
    """The comparison ``merge --recommend`` made, keyed by the fingerprint of the checkpoint it started from."""
    return f"merge-recommend:{fingerprint}"
