"""Full weights pickled by ``torch.save`` (``pytorch_model.bin``, shards, ``pytorch_model.bin.index.json``)
beside ``config.json``. Listed and fingerprinted like any checkpoint, but loading them runs pickled
code: only with ``--allow-pickle``, and then with ``weights_only=True``. Not merged."""

from __future__ import annotations

from pathlib import Path

from ckptsel.errors import CheckpointError
from ckptsel.formats.base import Checkpoint, CheckpointFormat, LoadOptions
from ckptsel.formats.files import Layout, find_weights
from ckptsel.formats.hf import PICKLE_MERGE_REFUSAL, load_pretrained, read_model_config, read_weights

LAYOUT = Layout("pickle", "pytorch_model.bin.index.json", "pytorch_model.bin", "pytorch_model-*-of-*.bin")


class PickleModel(CheckpointFormat):
    name = "pickle"
    kind = "full"
    looks_for = "pytorch_model*.bin"

    def detect(self, folder: Path) -> bool:
        return LAYOUT.present(folder)

    def describe(self, ckpt: Checkpoint, base_model: str | None) -> None:
        weights = find_weights(ckpt.path, LAYOUT)
        if weights is None:  # detect() said it was there
            raise CheckpointError("pytorch_model.bin: gone while being read")
        read_weights(ckpt, weights)
        read_model_config(ckpt)

    def label(self, ckpt: Checkpoint) -> str:
        n = len(ckpt.weight_files)
        return "pickle .bin" if n < 2 else f"pickle .bin, {n} shards"

    def check_load(self, ckpt: Checkpoint, options: LoadOptions) -> None:
        if not options.allow_pickle:
            raise CheckpointError(f"{ckpt.path}: only pickled (.bin) weights; pass --allow-pickle to load them")

    def load(self, ckpt: Checkpoint, options: LoadOptions):
        return load_pretrained(ckpt.path, options)

    def merge_refusal(self, ckpt: Checkpoint) -> str | None:
        return PICKLE_MERGE_REFUSAL


PICKLE = PickleModel()
