"""Full weights pickled by ``torch.save`` (``pytorch_model.bin``, shards, ``pytorch_model.bin.index.json``)
beside ``config.json``. Listed and fingerprinted like any checkpoint, but loading them runs pickled
code: only with ``--allow-pickle``, and then with ``weights_only=True``. Not merged."""

from __future__ import annotations

from ckptsel.errors import CheckpointError
from ckptsel.formats.base import Checkpoint, LoadOptions
from ckptsel.formats.files import Layout
from ckptsel.formats.hf import PICKLE_MERGE_REFUSAL, ModelFolder

LAYOUT = Layout("pickle", "pytorch_model.bin.index.json", "pytorch_model.bin", "pytorch_model-*-of-*.bin")


class PickleModel(ModelFolder):
    name = "pickle"
    looks_for = "pytorch_model*.bin"
    layout = LAYOUT
    label_name = "pickle .bin"

    def check_load(self, ckpt: Checkpoint, options: LoadOptions) -> None:
        if not options.allow_pickle:
            raise CheckpointError(f"{ckpt.path}: only pickled (.bin) weights; pass --allow-pickle to load them")

    def merge_refusal(self, ckpt: Checkpoint) -> str | None:
        return PICKLE_MERGE_REFUSAL


PICKLE = PickleModel()
