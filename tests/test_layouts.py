"""Checkpoints as training stacks write them: pretraining step folders, FSDP, DeepSpeed ZeRO, torchtune.

Each layout is built with the real library where it runs here (tests/stacks.py: FSDP2 and DeepSpeed ZeRO-2/3
on two gloo ranks on CPU) from the lab's tiny Trainer run, and ranked; the numbers must equal those of the
same weights saved as plain safetensors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckptsel.cli import main

FAST = ["--max-examples", "6", "-k", "2", "--max-new-tokens", "24", "--quiet", "--json"]
COMPARED = ("train_acc", "target_nll", "premem_acc")


def rank(run: Path, cache: Path, *extra: str, exit_code: int = 0) -> dict:
    args = ["rank", str(run), "--data", str(run / "train.jsonl"), "--recipe", str(run / "recipe.yaml"),
            "--cache-dir", str(cache), *FAST, *extra]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == exit_code, result.output
    return json.loads(result.stdout)


def numbers(ranked: dict) -> list[list]:
    return [[c[k] for k in COMPARED] for c in ranked["checkpoints"]]


def copy_run_files(src: Path, dst: Path) -> None:
    for name in ("train.jsonl", "recipe.yaml"):
        shutil.copy(src / name, dst / name)


# --- pretraining step folders --------------------------------------------------------------------------


def test_a_pretraining_sweep_of_step_folders_ranks_as_one_run_in_step_order(tiny_run, tmp_path):
    """OLMo/OLMoE-style folders (stepN/, stepN-tokensXM/) of one run: one run, in step order, the same numbers
    as the Trainer run they were copied from."""
    sweep = tmp_path / "olmoe"
    steps = sorted(int(p.name.split("-")[1]) for p in tiny_run.glob("checkpoint-*"))
    names = [f"step{s * 78}" if i == 0 else f"step{s * 78}-tokens{s * 312}M" for i, s in enumerate(steps)]
    for step, name in zip(steps, names):
        shutil.copytree(tiny_run / f"checkpoint-{step}", sweep / name,
                        ignore=shutil.ignore_patterns("trainer_state.json"))
    copy_run_files(tiny_run, sweep)

    listed = json.loads(CliRunner().invoke(main, ["ls", str(sweep), "--json"]).stdout)
    assert [(r["step"], r["tokens"]) for r in listed] == [(s * 78, None if i == 0 else f"{s * 312}M")
                                                           for i, s in enumerate(steps)]
    ranked = rank(sweep, tmp_path / "cache")
    original = rank(tiny_run, tmp_path / "cache-original")
    assert [c["step"] for c in ranked["checkpoints"]] == [s * 78 for s in steps]
    assert len({c["run"] for c in ranked["checkpoints"]}) == 1
    assert numbers(ranked) == numbers(original)
    assert len({c["target_nll"] for c in ranked["checkpoints"]}) == len(steps)  # the checkpoints differ
