"""Hugging Face layouts shared by several formats: a model folder (``config.json`` beside its
weights), loaded by ``from_pretrained``; and the local hub cache, where an adapter's base named by
a hub id is looked up (nothing is downloaded)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ckptsel.errors import CheckpointError
from ckptsel.formats.base import Checkpoint, LoadOptions
from ckptsel.formats.files import Weights, architecture, config_dtype, moe_from_config, read_json, safetensors_totals

PICKLE_NOTE = "pickle weights: loading them runs pickled code and needs --allow-pickle"
PICKLE_MERGE_REFUSAL = ("pickle weights (.bin); merge reads safetensors only "
                        "(re-save with save_pretrained(..., safe_serialization=True))")


def read_weights(ckpt: Checkpoint, weights: Weights) -> None:
    """Fill in encoding, files, parameter count and dtype from the weight files' headers (pickles have none)."""
    ckpt.weight_format, ckpt.weight_files = weights.encoding, weights.files
    if weights.encoding == "pickle":
        ckpt.notes.append(PICKLE_NOTE)
        return
    ckpt.num_parameters, dtype = safetensors_totals(weights.files, weights.weight_map)
    ckpt.dtype = dtype or ckpt.dtype


def read_model_config(ckpt: Checkpoint) -> None:
    """Architecture, experts and dtype (when the weights did not say) from the ``config.json`` beside the weights."""
    if not (ckpt.path / "config.json").is_file():
        raise CheckpointError("no config.json next to the weights")
    config = read_json(ckpt.path / "config.json")
    ckpt.architecture = architecture(config)
    ckpt.num_experts, ckpt.experts_per_token = moe_from_config(config)
    ckpt.dtype = ckpt.dtype or config_dtype(config)  # pickle weights have no header to read it from
    if config.get("auto_map"):
        ckpt.notes.append("custom model code (auto_map): loading it needs --trust-remote-code")


def load_pretrained(path: Path | str, options: LoadOptions):
    """``AutoModelForCausalLM.from_pretrained`` from local files only: safetensors unless ``allow_pickle``
    (then ``.bin`` with ``weights_only=True``), SDPA attention on CUDA. ``path`` is a folder or a hub id
    in the local cache."""
    from transformers import AutoModelForCausalLM

    folder = Path(path)
    if folder.is_dir() and not options.allow_pickle and not any(folder.glob("*.safetensors")):
        raise CheckpointError(f"{folder}: only pickled (.bin) weights; pass --allow-pickle to load them")
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(path),
            dtype=options.dtype,
            device_map=str(options.device),
            trust_remote_code=options.trust_remote_code,
            use_safetensors=None if options.allow_pickle else True,
            weights_only=True,
            local_files_only=True,
            attn_implementation="sdpa" if options.device.type == "cuda" else None,
        )
    except OSError as exc:
        if folder.is_dir():
            raise
        raise CheckpointError(
            f"{path}: neither a folder nor in the local Hugging Face cache (nothing is downloaded)"
        ) from exc


# --- the local hub cache -------------------------------------------------------------------

_HUB_ID = re.compile(r"[\w.-]+(?:/[\w.-]+)?")


def hf_hub_cache() -> Path:
    """The local Hugging Face hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub"


def resolve_base_model(name: str, revision: str | None = None) -> str | None:
    """A base model as a local folder: ``name`` when it is one, else a hub id's snapshot in the cache, else None.

    The cache layout is ``models--ORG--NAME/snapshots/COMMIT/`` with ``refs/REVISION`` naming
    the commit (``main`` unless the adapter records a revision); nothing is downloaded.
    """
    if Path(name).expanduser().is_dir():
        return name
    if not _HUB_ID.fullmatch(name) or names_local_path(name):
        return None
    repo = hf_hub_cache() / f"models--{name.replace('/', '--')}"
    ref = revision or "main"
    commit = (repo / "refs" / ref).read_text().strip() if (repo / "refs" / ref).is_file() else ref
    snapshot = repo / "snapshots" / commit
    return str(snapshot) if (snapshot / "config.json").is_file() else None


def names_local_path(name: str) -> bool:
    """Whether a base model's name is written as a path (absolute, or starting with "."), so it
    is never looked up as a hub id."""
    return Path(name).is_absolute() or name.startswith(".")


def base_model_missing(name: str) -> str:
    """Why a base model cannot be used, and what to pass instead (one line)."""
    return (f"not a local folder and not in the Hugging Face cache ({hf_hub_cache()}); nothing is downloaded: "
            "pass --base-model PATH (the base model's folder)")
