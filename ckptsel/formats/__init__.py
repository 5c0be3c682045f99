"""Checkpoint formats: how a checkpoint folder is recognised, described, fingerprinted, loaded and merged.

    base.py         the Checkpoint record and the CheckpointFormat protocol (with its defaults)
    files.py        safetensors headers, JSON configs, weight layouts: read without loading weights
    hashing.py      content hashing for fingerprints
    hf.py           Hugging Face model folders (config.json beside weights, from_pretrained) and hub cache
    safetensors.py  full weights in safetensors, single file or sharded
    pickle.py       full weights in pickled .bin files (loaded only with --allow-pickle)
    peft.py         PEFT (LoRA) adapters on a base model
    fsdp.py         FSDP sharded (torch.distributed.checkpoint) and full-state (.bin) checkpoints, converted
    zero.py         DeepSpeed ZeRO shards, converted with DeepSpeed's zero_to_fp32
    dcp.py          reading torch.distributed.checkpoint folders (safe metadata, shard checks, conversion)
    converted.py    converted copies in the cache: keyed by fingerprint, made once, atomically; cache dir
    broken.py       what a checkpoint that cannot be used gets
    registry.py     FORMATS in detection order, format_of(folder)

Code outside this package branches on a checkpoint's ``format`` (``ckpt.format.is_adapter``,
``.usable``, ``.load(...)``, ``.merge_refusal(...)``), never on the ``kind`` string, which stays
only as what ``ckptsel ls --json`` prints. Adding a format: ckptsel/DESIGN.md, "Where things go".
"""

from ckptsel.formats.base import Checkpoint, CheckpointFormat, LoadOptions
from ckptsel.formats.registry import (
    BROKEN, DEEPSPEED_ZERO, FORMATS, FSDP_FULL, FSDP_SHARDED, PEFT_ADAPTER, PICKLE, SAFETENSORS, claimed, format_of,
    no_weights, owned,
)

__all__ = ["BROKEN", "DEEPSPEED_ZERO", "FORMATS", "FSDP_FULL", "FSDP_SHARDED", "PEFT_ADAPTER", "PICKLE", "SAFETENSORS",
           "Checkpoint", "CheckpointFormat", "LoadOptions", "claimed", "format_of", "no_weights", "owned"]
