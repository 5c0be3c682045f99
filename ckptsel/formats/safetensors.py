"""Full weights in safetensors beside ``config.json``: ``model.safetensors``, or shards with or
without ``model.safetensors.index.json`` (Trainer ``checkpoint-N/`` folders, ``save_pretrained``)."""

from __future__ import annotations

from pathlib import Path

from ckptsel.errors import CheckpointError
from ckptsel.formats.base import Checkpoint, CheckpointFormat, LoadOptions
from ckptsel.formats.files import Layout, find_weights
from ckptsel.formats.hf import load_pretrained, read_model_config, read_weights

LAYOUT = Layout("safetensors", "model.safetensors.index.json", "model.safetensors", "model-*-of-*.safetensors")


class SafetensorsModel(CheckpointFormat):
    name = "safetensors"
    kind = "full"
    looks_for = "model*.safetensors"

    def detect(self, folder: Path) -> bool:
        return LAYOUT.present(folder)

    def describe(self, ckpt: Checkpoint, base_model: str | None) -> None:
        weights = find_weights(ckpt.path, LAYOUT)
        if weights is None:  # detect() said it was there
            raise CheckpointError("model.safetensors: gone while being read")
        read_weights(ckpt, weights)
        read_model_config(ckpt)

    def label(self, ckpt: Checkpoint) -> str:
        n = len(ckpt.weight_files)
        return "safetensors" if n < 2 else f"safetensors, {n} shards"

    def load(self, ckpt: Checkpoint, options: LoadOptions):
        return load_pretrained(ckpt.path, options)

    def merge_refusal(self, ckpt: Checkpoint) -> str | None:
        return None


SAFETENSORS = SafetensorsModel()
