"""Find checkpoints and describe them without loading weights.

INTERFACE (other modules rely on it; keep these names and fields):

    Checkpoint                 one discovered checkpoint (below)
    discover(paths, base_model=None) -> list[Checkpoint]   in training order
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


@dataclass
class Checkpoint:
    path: Path                       # absolute
    kind: Literal["full", "adapter", "error"]
    step: int | None = None
    epoch: float | None = None
    train_loss: float | None = None
    error: str | None = None
    weight_files: list[Path] = field(default_factory=list)
    weight_format: Literal["safetensors", "pickle", "none"] = "none"
    architecture: str | None = None
    dtype: str | None = None
    num_parameters: int | None = None
    num_experts: int | None = None       # None for dense models
    experts_per_token: int | None = None
    base_model: str | None = None        # adapters: base path or id
    lora_rank: int | None = None
    lora_alpha: float | None = None
    target_modules: list[str] | None = None
