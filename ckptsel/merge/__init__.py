"""Merge checkpoints: plan -> build -> provenance -> publish.

    plan.py        check the request (inputs, method, weights, base) from configs and headers
    full.py        full checkpoints: mergekit's methods through its Python API
    lora.py        LoRA adapters of one base: the exact weighted sum of their ΔW
    provenance.py  sidecar (ckptsel_merge.json) and model card (README.md)
    output.py      temporary folder beside the target, disk-space check, atomic rename

Two entry points:

- :func:`merge` writes a finished, provenance-carrying merge to ``out`` atomically::

      plan = plan_merge(["run/checkpoint-400", "run/checkpoint-500"], out="merged")
      result = merge(plan, "merged")

- :func:`build` writes only the merged model (weights, config, tokenizer) into a folder the
  caller owns, to *measure* a candidate before choosing it (``ckptsel merge --recommend``)::

      with tempfile.TemporaryDirectory() as tmp:
          build(plan_merge(ckpts, weights=[1, 1]), Path(tmp))
          ...score Path(tmp) like any checkpoint...
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ckptsel.merge.plan import (
    METHODS, MergeError, MergePlan, check_output, parse_params, parse_weights, plan_merge,
)

log = logging.getLogger(__name__)

__all__ = ["METHODS", "MergeError", "MergePlan", "MergeResult", "build", "merge", "parse_params",
           "parse_weights", "plan_merge"]

Progress = Callable[[str], None]


@dataclass
class MergeResult:
    """What :func:`merge` wrote: the sidecar's content plus timing."""

    path: Path
    meta: dict
    seconds: float
    replaced: bool = False

    def to_dict(self) -> dict:
        return {"path": str(self.path), "seconds": round(self.seconds, 3), "replaced": self.replaced, **self.meta}


def build(plan: MergePlan, folder: Path, *, progress_bars: bool = False) -> dict:
    """Write the merged model into the existing empty ``folder``; returns the builder's report
    (for adapters: modules, rank and, with ``plan.rank``, the SVD relative error)."""
    if not plan.adapters:
        from ckptsel.merge.full import build_full

        return build_full(plan, folder, progress_bars=progress_bars)
    from ckptsel.merge.lora import build_adapter, build_on_base

    return build_adapter(plan, folder) if plan.output == "adapter" else build_on_base(plan, folder)


def merge(
    plan: MergePlan,
    out: str | os.PathLike,
    *,
    force: bool = False,
    justification: Mapping | None = None,
    progress: Progress | None = None,
    progress_bars: bool = False,
) -> MergeResult:
    """Build ``plan`` into a temporary folder beside ``out``, add the sidecar and model card,
    and rename it into place (replacing an existing ``out`` only with ``force``).

    ``justification``: the metrics that led to this merge (a mapping; lists of dicts render as
    tables in the card). ``progress`` is called with each stage name: ``fingerprint``,
    ``build``, ``provenance``, ``built`` (everything written, not yet in place), ``published``.
    """
    from ckptsel.discover import describe, fingerprint
    from ckptsel.merge.output import check_target, staged
    from ckptsel.merge.provenance import sidecar, write_provenance

    start = time.perf_counter()
    out = Path(os.path.abspath(out))
    def stage(name: str) -> None:
        log.info("merge: %s", name)
        if progress is not None:
            progress(name)

    check_output(plan, out)
    check_target(out, force)  # before the slow part
    replaced = out.exists()
    stage("fingerprint")
    fingerprints = [fingerprint(c) for c in plan.inputs]
    base_fp = fingerprint(plan.base) if plan.base is not None else None
    with staged(out, force=force, needed_bytes=plan.estimated_bytes()) as folder:
        stage("build")
        report = build(plan, folder, progress_bars=progress_bars)
        stage("provenance")
        written = describe(folder)
        if not written.format.usable:
            raise MergeError(f"the merged output does not read back: {written.error}")
        meta = sidecar(plan, fingerprints=fingerprints, base_fingerprint=base_fp, report=report,
                       justification=justification, output_fingerprint=fingerprint(written))
        write_provenance(folder, meta, out.name)
        stage("built")
    stage("published")
    return MergeResult(out, meta, time.perf_counter() - start, replaced)
