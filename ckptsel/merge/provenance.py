"""What every merged checkpoint says about itself: a JSON sidecar and a model card.

``ckptsel_merge.json`` is for programs (the result store, ``ckptsel verify``): the inputs with
their content fingerprints, the raw and normalised weights, method, parameters, base, and
the metrics that justified the merge. ``README.md`` says the same for people, with the
command line that reproduces it. Neither file is part of the output's own fingerprint
(:func:`ckptsel.discover.fingerprint` hashes weights and model/tokenizer configs only), so the
sidecar can record it.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path

from ckptsel import __version__
from ckptsel.merge.plan import MergePlan

SIDECAR = "ckptsel_merge.json"
CARD = "README.md"


def sidecar(plan: MergePlan, *, fingerprints: list[str], base_fingerprint: str | None, report: Mapping,
            justification: Mapping | None, output_fingerprint: str) -> dict:
    """The sidecar's content (JSON-ready)."""
    weights = zip(plan.weights, plan.normalized_weights) if plan.weighted else [(None, None)] * len(plan.inputs)
    inputs = [
        {"path": str(c.path), "kind": c.kind, "step": c.step, "fingerprint": fp, "weight": w, "normalized_weight": nw}
        for c, fp, (w, nw) in zip(plan.inputs, fingerprints, weights)
    ]
    return {
        "ckptsel_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **plan.describe(),
        "inputs": inputs,
        "base_fingerprint": base_fingerprint,
        "report": dict(report),
        "justification": dict(justification) if justification else None,
        "output_fingerprint": output_fingerprint,
        "command": reproduce_command(plan),
    }


def reproduce_command(plan: MergePlan, out: str = "OUT") -> str:
    """The ``ckptsel merge`` command line that rebuilds this merge."""
    args = ["ckptsel", "merge", *(str(c.path) for c in plan.inputs), "--method", plan.method]
    if plan.weighted and any(w != 1.0 for w in plan.weights):
        args += ["--weights", ",".join(f"{w:g}" for w in plan.weights)]
    if plan.base_model is not None and (not plan.adapters or plan.output == "full"):
        args += ["--base-model", plan.base_model]
    for key, value in plan.parameters.items():
        args += ["--param", f"{key}={json.dumps(value)}"]
    if plan.rank is not None:
        args += ["--rank", str(plan.rank)]
    if plan.output == "full" and plan.adapters:
        args.append("--full")
    if plan.dtype is not None:
        args += ["--dtype", plan.dtype]
    read = [*plan.inputs, *([plan.base] if plan.base else [])]
    if plan.allow_pickle and any(c.format.converts for c in read):
        args.append("--allow-pickle")  # ZeRO's pickled shards, read through their converted copies
    return shlex.join(args + ["-o", out])


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return f"`{json.dumps(value)}`"
    return str(value).replace("|", "\\|")


def _table(rows: list[Mapping]) -> list[str]:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return lines


def model_card(meta: Mapping, name: str) -> str:
    """README.md for a merged checkpoint, from the sidecar's content."""
    base = meta.get("base_model")
    front = ["---", "library_name: transformers" if meta["output"] == "full" else "library_name: peft",
             "tags:", "- ckptsel", "- merge"]
    if base:
        front.append(f"base_model: {json.dumps(base)}")
    front.append("---")
    what = ("full checkpoints" if meta["inputs_kind"] != "adapter" else "LoRA adapters (exact weighted sum of ΔW)"
            if meta["method"] == "linear" else "LoRA adapters (exact, in ΔW space)")
    n = len(meta["inputs"])
    subject = (f"A `{meta['method']}` merge of {n} {what}" if n > 1 else
               f"One checkpoint, written unchanged (a `{meta['method']}` merge of one)")
    lines = [*front, "", f"# {name}", "",
             f"{subject}, written by ckptsel {meta['ckptsel_version']} on {meta['created']}.", "", "## Inputs", ""]
    weighted = meta["weights"] is not None
    lines += _table([
        {"checkpoint": i["path"], "step": i["step"] if i["step"] is not None else "",
         **({"weight": i["weight"], "normalised": i["normalized_weight"]} if weighted else {}),
         "fingerprint": i["fingerprint"][:16]}
        for i in meta["inputs"]
    ])
    if weighted:
        lines += ["", "Weights are relative: they are divided by their sum before merging."]
    lines += ["", "## Method", ""]
    facts = {"method": meta["method"], "output": meta["output"], "base model": base,
             "parameters": meta["parameters"] or None, "rank": meta["rank"], "dtype": meta["dtype"],
             **{k: v for k, v in meta["report"].items() if k != "mergekit_config"}}
    lines += [f"- {k}: {_cell(v)}" for k, v in facts.items() if v is not None]
    lines += ["", "## Why this merge", ""]
    justification = meta.get("justification")
    if not justification:
        lines.append("Requested explicitly; no metrics were attached.")
    else:
        for key, value in justification.items():
            if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
                lines += ["", f"**{key}**", "", *_table(value), ""]
            else:
                lines.append(f"- {key}: {_cell(value)}")
    lines += ["", "## Reproduce", "", "```sh", meta["command"], "```"]
    if "mergekit_config" in meta["report"]:
        lines += ["", "or with mergekit itself (`mergekit-yaml mergekit_config.yml OUT`):", "",
                  "```yaml", meta["report"]["mergekit_config"], "```"]
    lines += ["", f"Output fingerprint: `{meta['output_fingerprint']}`", ""]
    return "\n".join(lines)


def write_provenance(folder: Path, meta: Mapping, name: str) -> None:
    (folder / SIDECAR).write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
    (folder / CARD).write_text(model_card(meta, name), encoding="utf-8")
