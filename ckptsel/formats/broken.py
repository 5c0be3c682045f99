"""A checkpoint that cannot be used: no format claims its folder, or its format could not read it
(truncated weights, an index naming a missing shard, no ``config.json``...). ``Checkpoint.error``
says why in one line. It is listed (kind ``error``) and never fingerprinted, loaded or merged, so
one bad checkpoint does not lose the others' results."""

from __future__ import annotations

from pathlib import Path

from ckptsel.errors import CheckpointError
from ckptsel.formats.base import Checkpoint, CheckpointFormat, LoadOptions


class Broken(CheckpointFormat):
    name = "broken"
    kind = "error"
    usable = False

    def detect(self, folder: Path) -> bool:
        return False  # given by describe(), never detected

    def describe(self, ckpt: Checkpoint, base_model: str | None) -> None:
        raise CheckpointError(ckpt.error or "unreadable checkpoint")

    def label(self, ckpt: Checkpoint) -> str:
        return ""

    def model_config(self, ckpt: Checkpoint) -> dict | None:
        return None

    def fingerprint(self, ckpt: Checkpoint, h) -> None:
        raise CheckpointError(f"{ckpt.path}: cannot fingerprint a broken checkpoint ({ckpt.error})")

    def check_load(self, ckpt: Checkpoint, options: LoadOptions) -> None:
        raise CheckpointError(f"{ckpt.path}: {ckpt.error or 'unreadable checkpoint'}")

    def load(self, ckpt: Checkpoint, options: LoadOptions):
        self.check_load(ckpt, options)

    def merge_refusal(self, ckpt: Checkpoint) -> str | None:
        return ckpt.error or "unreadable checkpoint"


BROKEN = Broken()
