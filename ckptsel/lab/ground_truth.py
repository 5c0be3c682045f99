"""Ground truth per checkpoint: what ckptsel tries to predict, measured directly.

For every ``checkpoint-N/`` of a run, on the held-out test split:

* ``test_accuracy`` -- sampled accuracy with the settings ckptsel uses on the training
  side (k=5, T=0.8, top-p 0.95, seeded), graded by the same grader (``gsm8k``);
* ``test_nll`` -- held-out reference NLL: mean over test examples of the per-token NLL of
  the reference solution (teacher-forced, prompt excluded, EOS included), the quantity
  whose rise Ruan et al. call over-memorization;
* ``test_perturbed_accuracy`` -- sampled accuracy on equivalent, reworded questions;

and on the first ``n_train_eval`` training examples: ``train_accuracy``,
``train_copy_rate`` (samples equal to the trained trace), ``train_nll`` (the trained
trace), ``train_alt_nll`` (another valid trace of the same question, never trained on:
the ideal form of ckptsel's alternative-solution proxy) and ``train_perturbed_accuracy``.
Per-example values sit under ``per_example`` for the per-example claims (Kang et al.:
robustness to perturbation follows pre-memorization accuracy).

Written to ``RUN/ground_truth.json`` keyed by checkpoint step. Sampling and scoring are
ckptsel's own engine (:mod:`ckptsel.measure`), so the ground truth and the tool measure
the same thing the same way.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ckptsel.lab.splits import Row, read_jsonl
from ckptsel.lab.train import PROMPT_TEMPLATE
from ckptsel.settings import SamplingSettings

log = logging.getLogger(__name__)

GRADER = "gsm8k"
FILENAME = "ground_truth.json"

# on_checkpoint(done, total) -- how a caller draws progress.
CheckpointCallback = Callable[[int, int], None]


class GroundTruthSettings(BaseModel):
    """How the ground truth is measured (part of a grid recipe)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sampling: SamplingSettings = SamplingSettings()
    n_train_eval: int = Field(100, ge=1, description="Training examples measured (the first N of train.jsonl).")
    perturbed: bool = Field(True, description="Also measure accuracy on perturbed questions.")
    batch_size: int = Field(256, ge=1, description="Rows per decoding batch (tiny models: large batches are cheap).")


def checkpoint_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of each ``checkpoint-N`` folder, in step order."""
    found = []
    for p in Path(run_dir).iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def load_checkpoint(path: Path):
    """A full model folder, or a LoRA adapter on the base its config names."""
    from transformers import AutoModelForCausalLM

    adapter_config = path / "adapter_config.json"
    if not adapter_config.exists():
        return AutoModelForCausalLM.from_pretrained(path)
    from peft import PeftModel

    base = json.loads(adapter_config.read_text())["base_model_name_or_path"]
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), path)


def _prompt(question: str) -> str:
    return PROMPT_TEMPLATE.format(question=question)


def _accuracy(
    model, tokenizer, questions: list[str], rows: list[Row], keys: list[str], settings: GroundTruthSettings, budget: int
) -> tuple[np.ndarray, list[list[str]]]:
    """Per-question fraction of k samples graded correct, and the samples themselves."""
    from ckptsel.graders import get
    from ckptsel.measure.sampling import sample_completions

    grade = get(GRADER)
    prompts = [_prompt(q) for q in questions]
    samples = sample_completions(
        model,
        tokenizer,
        prompts,
        sampling=settings.sampling,
        max_new_tokens=budget,
        keys=keys,
        batch_size=settings.batch_size,
    )
    acc = np.array([np.mean([grade(s, r.answer) for s in group]) for group, r in zip(samples, rows)])
    return acc, samples


def measure_checkpoint(model, tokenizer, train: list[Row], test: list[Row], settings: GroundTruthSettings, budget: int) -> dict:
    """All ground-truth numbers for one loaded model (see the module docstring)."""
    from ckptsel.measure.sampling import copy_rate
    from ckptsel.measure.scoring import score_targets

    per: dict[str, np.ndarray] = {}
    test_prompts = [_prompt(r.question) for r in test]
    per["test_accuracy"], _ = _accuracy(
        model, tokenizer, [r.question for r in test], test, [f"test/{i}" for i in range(len(test))], settings, budget
    )
    per["test_nll"] = score_targets(model, tokenizer, test_prompts, [r.answer for r in test]).nll

    train_prompts = [_prompt(r.question) for r in train]
    per["train_accuracy"], samples = _accuracy(
        model, tokenizer, [r.question for r in train], train, [f"train/{i}" for i in range(len(train))], settings, budget
    )
    per["train_copy_rate"] = np.array([copy_rate(group, r.answer) for group, r in zip(samples, train)])
    per["train_nll"] = score_targets(model, tokenizer, train_prompts, [r.answer for r in train]).nll
    with_alt = [i for i, r in enumerate(train) if r.alternative]
    alt = np.full(len(train), np.nan)
    if with_alt:
        scored = score_targets(
            model, tokenizer, [train_prompts[i] for i in with_alt], [train[i].alternative for i in with_alt]
        )
        alt[with_alt] = scored.nll
    per["train_alt_nll"] = alt

    if settings.perturbed:
        per["test_perturbed_accuracy"], _ = _accuracy(
            model, tokenizer, [r.perturbed for r in test], test, [f"test-p/{i}" for i in range(len(test))], settings, budget
        )
        per["train_perturbed_accuracy"], _ = _accuracy(
            model, tokenizer, [r.perturbed for r in train], train, [f"train-p/{i}" for i in range(len(train))], settings, budget
        )
    # NaN where no example has a value (train_alt_nll of a family with one trace per question, modadd).
    summary = {name: float(np.nanmean(values)) if not np.isnan(values).all() else float("nan") for name, values in per.items()}
    per_example = {name: [None if np.isnan(v) else round(float(v), 5) for v in values] for name, values in per.items()}
    return {**summary, "per_example": per_example}


def _state(path: Path) -> dict:
    state_file = path / "trainer_state.json"
    return json.loads(state_file.read_text()) if state_file.exists() else {}


def write_ground_truth(
    run_dir: Path, settings: GroundTruthSettings, *, on_checkpoint: CheckpointCallback | None = None
) -> Path:
    """Measure every checkpoint of ``run_dir`` and write ``ground_truth.json``; return its path."""
    import torch

    from ckptsel.lab.tokenizer import build_tokenizer
    from ckptsel.measure.sampling import max_new_tokens_for

    run_dir = Path(run_dir)
    tokenizer = build_tokenizer()
    train = read_jsonl(run_dir / "train.jsonl")[: settings.n_train_eval]
    test = read_jsonl(run_dir / "test.jsonl")
    budget = settings.sampling.max_new_tokens or max_new_tokens_for(
        [len(t) + 1 for t in tokenizer([r.answer for r in train + test], add_special_tokens=False)["input_ids"]]
    )
    checkpoints = checkpoint_dirs(run_dir)
    results: dict[str, dict] = {}
    for done, (step, path) in enumerate(checkpoints, 1):
        model = load_checkpoint(path)
        with torch.inference_mode():
            measured = measure_checkpoint(model, tokenizer, train, test, settings, budget)
        results[str(step)] = {"step": step, "epoch": _state(path).get("epoch"), **measured}
        log.info("ground truth %s step %d: test acc %.3f", run_dir.name, step, measured["test_accuracy"])
        if on_checkpoint is not None:
            on_checkpoint(done, len(checkpoints))
    payload = {
        "settings": settings.model_dump(mode="json"),
        "grader": GRADER,
        "n_test": len(test),
        "n_train_eval": len(train),
        "checkpoints": results,
    }
    out = run_dir / FILENAME
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(out)
    return out


def read_ground_truth(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / FILENAME).read_text())
