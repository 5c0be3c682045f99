"""FSDP checkpoints as accelerate and the Trainer write them, in their two layouts.

``SHARDED_STATE_DICT`` (:data:`FSDP_SHARDED`): ``checkpoint-N/pytorch_model_fsdp_0/``, a
``torch.distributed.checkpoint`` folder (``.metadata`` plus one ``__R_0.distcp`` shard per rank) holding
``{"model": state_dict}``, usually with no ``config.json`` beside it; a DCP folder given on its own is
read the same way. Read with ``torch.distributed.checkpoint`` on CPU, no process group, no new
dependency and no pickle flag (ckptsel/formats/dcp.py says why that is safe).

``FULL_STATE_DICT`` (:data:`FSDP_FULL`): ``pytorch_model_fsdp.bin``, the whole state dict pickled by
``torch.save``; it loads only with ``--allow-pickle``, and then with ``weights_only=True``. (When the
Trainer also wrote ``model.safetensors`` beside it, that folder is a plain safetensors checkpoint.)

Both are converted once into the cache (ckptsel/formats/converted.py), keyed by their content
fingerprint: safetensors weights plus the ``config.json`` and tokenizer of the checkpoint, else of
its run folder, else of ``--base-model`` (:func:`ckptsel.formats.hf.model_source`). Every load, merge
and verify reads that copy; the weights are checked against the config's model first, so a
mismatched config is one line, not a model with random tensors.
"""

from __future__ import annotations

import math
from pathlib import Path

from ckptsel.errors import CheckpointError
from ckptsel.formats import dcp
from ckptsel.formats.base import Checkpoint, LoadOptions
from ckptsel.formats.converted import converted_copy
from ckptsel.formats.hf import (
    PICKLE_NOTE, ConvertedFolder, check_tensors, copy_model_files, describe_from, model_source,
)

SHARDED_DIR = "pytorch_model_fsdp_0"   # accelerate's folder for the first (only) model
FULL_FILE = "pytorch_model_fsdp.bin"


class FsdpSharded(ConvertedFolder):
    name = "fsdp-sharded"
    fingerprint_tag = "dcp"
    kind = "full"
    looks_for = f"{SHARDED_DIR}/"

    def detect(self, folder: Path) -> bool:
        return (folder / SHARDED_DIR).is_dir() or any(folder.glob(dcp.SHARD_GLOB))

    def dcp_folder(self, ckpt: Checkpoint) -> Path:
        return ckpt.path / SHARDED_DIR if (ckpt.path / SHARDED_DIR).is_dir() else ckpt.path

    def describe(self, ckpt: Checkpoint, base_model: str | None) -> None:
        folder = self.dcp_folder(ckpt)
        metadata = dcp.read_metadata(folder)
        tensors = dcp.tensors(metadata)
        if not tensors:
            raise CheckpointError(f"{folder.name}/{dcp.METADATA}: no tensors")
        ckpt.weight_files = [folder / dcp.METADATA, *dcp.check_files(folder, metadata)]
        ckpt.weight_format = "dcp"
        ckpt.num_parameters = sum(math.prod(t.shape) for t in tensors)
        dtypes = [t.dtype for t in tensors]
        ckpt.dtype = max(set(dtypes), key=dtypes.count)
        describe_from(ckpt, model_source(ckpt, base_model))

    def label(self, ckpt: Checkpoint) -> str:
        ranks = len(ckpt.weight_files) - 1
        return f"FSDP sharded (DCP, {ranks} shard{'s' * (ranks != 1)}) → converted copy"

    def model_folder(self, ckpt: Checkpoint, options: LoadOptions) -> Path:
        folder = self.dcp_folder(ckpt)

        def convert(out: Path) -> None:
            shapes = {t.name: t.shape for t in dcp.tensors(dcp.read_metadata(folder))}
            check_tensors(ckpt, shapes, options, f"{ckpt.path.name}/{folder.name}"
                          if folder != ckpt.path else folder.name)
            dcp.convert(folder, out)
            copy_model_files(ckpt, out)

        return converted_copy(ckpt, options.cache_dir, convert, what="torch.distributed.checkpoint → safetensors")


class FsdpFull(ConvertedFolder):
    name = "fsdp-full"
    fingerprint_tag = "fsdp-bin"
    kind = "full"
    looks_for = ""  # pytorch_model*.bin, as the pickle format says

    def detect(self, folder: Path) -> bool:
        return (folder / FULL_FILE).is_file()

    def describe(self, ckpt: Checkpoint, base_model: str | None) -> None:
        ckpt.weight_files, ckpt.weight_format = [ckpt.path / FULL_FILE], "pickle"
        describe_from(ckpt, model_source(ckpt, base_model))
        ckpt.notes.append(PICKLE_NOTE)

    def label(self, ckpt: Checkpoint) -> str:
        return "FSDP full state (pickle .bin) → converted copy"

    def check_load(self, ckpt: Checkpoint, options: LoadOptions) -> None:
        if not options.allow_pickle:
            raise CheckpointError(f"{ckpt.path}: {FULL_FILE} is pickled; pass --allow-pickle to load it "
                                  "(read with weights_only=True)")

    def model_folder(self, ckpt: Checkpoint, options: LoadOptions) -> Path:
        self.check_load(ckpt, options)

        def convert(out: Path) -> None:
            import torch
            from safetensors.torch import save_file

            try:
                state = torch.load(ckpt.path / FULL_FILE, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # truncated zip, a global outside weights_only's allowlist...
                raise CheckpointError(f"{FULL_FILE}: unreadable with weights_only=True "
                                      f"({type(exc).__name__}: {str(exc).splitlines()[0][:100]})") from None
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise CheckpointError(f"{FULL_FILE}: not a state dict of tensors")
            state = {dcp._unwrapped(k): v for k, v in state.items()}
            check_tensors(ckpt, {k: tuple(v.shape) for k, v in state.items()}, options, FULL_FILE)
            save_file(_untied(state), str(out / "model.safetensors"), metadata={"format": "pt"})
            copy_model_files(ckpt, out)

        return converted_copy(ckpt, options.cache_dir, convert, what="FSDP full state (.bin) → safetensors")


def _untied(state: dict) -> dict:
    """safetensors refuses tensors sharing memory (tied embeddings): store each name's own contiguous copy."""
    seen: dict = {}
    out = {}
    for name, tensor in state.items():
        ptr = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        out[name] = tensor.clone() if ptr in seen else tensor.contiguous()
        seen.setdefault(ptr, name)
    return out


FSDP_SHARDED = FsdpSharded()
FSDP_FULL = FsdpFull()
