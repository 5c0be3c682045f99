"""Full weights in safetensors beside ``config.json``: ``model.safetensors``, or shards with or
without ``model.safetensors.index.json`` (Trainer ``checkpoint-N/`` folders, ``save_pretrained``)."""

from __future__ import annotations

from ckptsel.formats.base import Checkpoint
from ckptsel.formats.files import Layout
from ckptsel.formats.hf import ModelFolder

LAYOUT = Layout("safetensors", "model.safetensors.index.json", "model.safetensors", "model-*-of-*.safetensors")


class SafetensorsModel(ModelFolder):
    name = "safetensors"
    looks_for = "model*.safetensors"
    layout = LAYOUT
    label_name = "safetensors"

    def merge_refusal(self, ckpt: Checkpoint) -> str | None:
        return None


SAFETENSORS = SafetensorsModel()
