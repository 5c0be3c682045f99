"""Small runs on demand: end-to-end test fixtures and the demo.

:func:`train_tiny_run` makes a real Trainer run folder (checkpoint-N/ with weights, config,
tokenizer, trainer_state.json; train.jsonl, test.jsonl, recipe.yaml) in seconds. The model
is too small to learn much: it is for tests of the plumbing, not of the metrics (those use
the grids in ``recipes/lab/``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from ckptsel.lab.ground_truth import GroundTruthSettings, write_ground_truth
from ckptsel.lab.models import ModelSpec
from ckptsel.lab.train import TrainSpec, train_run
from ckptsel.settings import SamplingSettings

TINY_MODEL = ModelSpec(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
TINY_MOE = ModelSpec(kind="moe", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=32)


def train_tiny_run(
    out: Path,
    *,
    kind: Literal["dense", "moe"] = "dense",
    mode: Literal["full", "lora"] = "full",
    families: tuple[str, ...] = ("sum",),
    n_train: int = 48,
    n_test: int = 16,
    epochs: float = 2,
    n_checkpoints: int = 3,
    ground_truth: bool = False,
    seed: int = 0,
) -> Path:
    """Train a tiny run into ``out`` (a few seconds on one core) and return ``out``.

    ``mode="lora"`` first trains a tiny base into ``out/base`` (its final model folder is
    ``out/base/final``) and then LoRA adapters on it into ``out/run``; the adapter
    checkpoints name the base by absolute path. The returned path is then ``out/run``.
    With ``ground_truth`` it also writes ``ground_truth.json`` (k=2 samples, 8 train examples).
    """
    out = Path(out)
    model = TINY_MOE if kind == "moe" else TINY_MODEL
    spec = TrainSpec(
        families=list(families),
        n_train=n_train,
        n_test=n_test,
        model=model,
        lr=3e-3,
        epochs=epochs,
        batch_size=16,
        n_checkpoints=n_checkpoints,
        seed=seed,
    )
    base_dir = None
    run_dir = out
    if mode == "lora":
        train_run(spec, out / "base", name="tiny-base", save_final_model=True)
        base_dir = (out / "base" / "final").resolve()
        spec = spec.model_copy(update={"init": "base", "mode": "lora", "lora_rank": 4})
        run_dir = out / "run"
    train_run(spec, run_dir, name=f"tiny-{kind}-{mode}", base_dir=base_dir)
    if ground_truth:
        settings = GroundTruthSettings(sampling=SamplingSettings(k=2), n_train_eval=8, batch_size=64)
        write_ground_truth(run_dir, settings)
    return run_dir
