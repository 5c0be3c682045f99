"""The checkpoint formats ckptsel reads, in detection order: the first whose ``detect`` claims a
folder describes it. One explicit table (no registration by import side effect); a new format is
one module implementing :class:`~ckptsel.formats.base.CheckpointFormat` plus its entry here.

Order matters where layouts overlap: an adapter folder may also hold model files (its
``adapter_config.json`` decides), and safetensors weights win over ``.bin`` ones in the same folder.
A folder no format claims, or whose format's ``describe`` fails, gets :data:`BROKEN`.
"""

from __future__ import annotations

from pathlib import Path

from ckptsel.errors import CheckpointError
from ckptsel.formats.base import CheckpointFormat
from ckptsel.formats.broken import BROKEN
from ckptsel.formats.fsdp import FSDP_FULL, FSDP_SHARDED
from ckptsel.formats.peft import PEFT_ADAPTER
from ckptsel.formats.pickle import PICKLE
from ckptsel.formats.safetensors import SAFETENSORS
from ckptsel.formats.zero import DEEPSPEED_ZERO

FORMATS: tuple[CheckpointFormat, ...] = (
    PEFT_ADAPTER,   # adapter_config.json (+ adapter_model.safetensors / .bin)
    SAFETENSORS,    # model.safetensors, its shards, its index
    PICKLE,         # pytorch_model.bin, its shards, its index (loads only with --allow-pickle)
    FSDP_FULL,      # pytorch_model_fsdp.bin (FSDP FULL_STATE_DICT; --allow-pickle), converted into the cache
    FSDP_SHARDED,   # pytorch_model_fsdp_0/ or a folder of .distcp shards (FSDP SHARDED_STATE_DICT), converted
    DEEPSPEED_ZERO,  # global_stepN/ with ZeRO shards, a latest tag (--allow-pickle, DeepSpeed), converted
)

__all__ = ["BROKEN", "DEEPSPEED_ZERO", "FORMATS", "FSDP_FULL", "FSDP_SHARDED", "PEFT_ADAPTER", "PICKLE",
           "SAFETENSORS", "claimed", "format_of", "no_weights", "owned"]


def format_of(folder: Path) -> CheckpointFormat:
    """The first format in :data:`FORMATS` that claims ``folder``; :class:`CheckpointError` (see
    :func:`no_weights`) when none does."""
    for fmt in FORMATS:
        if fmt.detect(folder):
            return fmt
    raise CheckpointError(no_weights())


def owned(folder: Path) -> list[Path]:
    """The subfolders that belong to the checkpoint in ``folder`` (its format's ``owns``); none when no
    format claims it."""
    return next((fmt.owns(folder) for fmt in FORMATS if fmt.detect(folder)), [])


def claimed(folder: Path) -> bool:
    """Whether some format claims ``folder`` (a run root holding a final model, a sweep's run folder)."""
    return any(fmt.detect(folder) for fmt in FORMATS)


def no_weights() -> str:
    """The one line for a folder no format claims, naming what each looks for (model weights first)."""
    wanted = [fmt.looks_for for fmt in sorted(FORMATS, key=lambda f: f.is_adapter) if fmt.looks_for]
    listed = wanted[0] if len(wanted) == 1 else f"{', '.join(wanted[:-1])} or {wanted[-1]}"
    return f"no weights: no {listed}"
