"""Hugging Face layouts shared by several formats: a model folder (``config.json`` beside its
weights), loaded by ``from_pretrained``; and the local hub cache, where an adapter's base named by
a hub id is looked up (nothing is downloaded)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ckptsel.errors import CheckpointError
from ckptsel.formats.base import Checkpoint, CheckpointFormat, LoadOptions
from ckptsel.formats.files import (
    Layout,
    Weights,
    architecture,
    config_dtype,
    config_in,
    find_weights,
    moe_from_config,
    read_json,
    safetensors_totals,
)
from ckptsel.formats.hashing import feed, hash_files, hash_meta_files

PICKLE_NOTE = "pickle weights: loading them runs pickled code and needs --allow-pickle"
PICKLE_MERGE_REFUSAL = ("pickle weights (.bin); merge reads safetensors only "
                        "(re-save with save_pretrained(..., safe_serialization=True))")


class ModelFolder(CheckpointFormat):
    """A model folder: full weights in one ``layout`` (single file, shards, an index) beside ``config.json``,
    loaded by ``from_pretrained``. Subclasses set the layout and what ``ckptsel ls`` calls it."""

    kind = "full"
    layout: Layout
    label_name: str  # "safetensors", "pickle .bin": the ls label, ", N shards" added

    def detect(self, folder: Path) -> bool:
        return self.layout.present(folder)

    def describe(self, ckpt: Checkpoint, base_model: str | None) -> None:
        weights = find_weights(ckpt.path, self.layout)
        if weights is None:  # detect() said it was there
            raise CheckpointError(f"{self.layout.single}: gone while being read")
        read_weights(ckpt, weights)
        read_model_config(ckpt)

    def label(self, ckpt: Checkpoint) -> str:
        n = len(ckpt.weight_files)
        return self.label_name if n < 2 else f"{self.label_name}, {n} shards"

    def load(self, ckpt: Checkpoint, options: LoadOptions):
        return load_pretrained(ckpt.path, options)


class ConvertedFolder(CheckpointFormat):
    """A checkpoint transformers cannot read as it lies (DeepSpeed ZeRO shards, FSDP's states): subclasses make
    :meth:`model_folder` its converted copy in the cache (ckptsel/formats/converted.py); loading and merging
    read that copy. Its ``config.json`` may come from elsewhere (the run's folder, ``--base-model``)."""

    converts = True
    fingerprint_tag: str  # fed with the kind: "dcp", "fsdp-bin", "deepspeed-zero"

    def model_config(self, ckpt: Checkpoint) -> dict | None:
        return config_in(ckpt.path) or config_in(Path(ckpt.base_model) if ckpt.base_model else None)

    def fingerprint(self, ckpt: Checkpoint, h) -> None:
        """Kind, the weight files (whole when small, else sampled windows), the configs beside them and,
        when they come from elsewhere, the config folder's: the config decides what the weights mean."""
        feed(h, "kind", f"{ckpt.kind}:{self.fingerprint_tag}".encode())
        hash_files(h, ckpt.weight_files)
        hash_meta_files(h, ckpt.path)
        if ckpt.base_model:
            feed(h, "config-from", b"")
            hash_meta_files(h, Path(ckpt.base_model))

    def load(self, ckpt: Checkpoint, options: LoadOptions):
        return load_pretrained(self.model_folder(ckpt, options), options)

    def merge_refusal(self, ckpt: Checkpoint) -> str | None:
        return None  # merged from its converted copy (model_folder)


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


# --- checkpoints without their own config.json ------------------------------------------------------

# Files a converted copy takes from the folder that supplies the config (and from the checkpoint's own).
MODEL_FILES = ("config.json", "generation_config.json")
_TOKENIZER_PREFIXES = ("tokenizer", "special_tokens_map", "vocab", "merges", "added_tokens", "chat_template")


def model_source(ckpt: Checkpoint, base_model: str | None) -> Path:
    """Where a checkpoint's architecture (``config.json``) and tokenizer come from: its own folder, else its
    run's folder (the one holding it), else ``--base-model`` (a folder, or a hub id in the local cache).
    :class:`CheckpointError` naming what is missing and the option that supplies it."""
    for folder in (ckpt.path, ckpt.path.parent):
        if (folder / "config.json").is_file():
            return folder
    if base_model:
        local = resolve_base_model(base_model)
        if local is None:
            raise CheckpointError(f"no config.json here or in the run folder; --base-model {base_model}: "
                                  f"{base_model_missing(base_model)}")
        if not (Path(local) / "config.json").is_file():
            raise CheckpointError(f"no config.json here, in the run folder or in --base-model {base_model}")
        return Path(local)
    raise CheckpointError(f"no config.json here or in the run folder ({ckpt.path.parent.name}/); pass "
                          "--base-model PATH (the model's folder: config.json and tokenizer)")


def describe_from(ckpt: Checkpoint, source: Path) -> None:
    """Architecture, experts and dtype from ``source``'s ``config.json``; a checkpoint reading them from
    another folder records it as ``base_model`` (its tokenizer is read there too) with a note."""
    config = read_json(source / "config.json")
    ckpt.architecture = architecture(config)
    ckpt.num_experts, ckpt.experts_per_token = moe_from_config(config)
    ckpt.dtype = ckpt.dtype or config_dtype(config)
    if source != ckpt.path:
        ckpt.base_model = str(source)
        ckpt.notes.append(f"config.json and tokenizer from {source}")
    if config.get("auto_map"):
        ckpt.notes.append("custom model code (auto_map): loading it needs --trust-remote-code")


def copy_model_files(ckpt: Checkpoint, folder: Path) -> None:
    """Put the config and tokenizer files of ``ckpt`` (its own, else its ``base_model``'s) into ``folder``, a
    converted copy: a Hugging Face model folder of its own."""
    import shutil

    sources = [ckpt.path] + ([Path(ckpt.base_model)] if ckpt.base_model else [])
    for source in reversed(sources):  # the checkpoint's own files win
        for path in source.iterdir():
            if path.is_file() and (path.name in MODEL_FILES or path.name.startswith(_TOKENIZER_PREFIXES)):
                shutil.copyfile(path, folder / path.name)


def check_tensors(ckpt: Checkpoint, names: dict[str, tuple[int, ...]], options: LoadOptions, where: str) -> None:
    """Refuse weights that do not fit the model ``config.json`` describes: a missing or misshapen tensor
    would otherwise be initialised at random by ``from_pretrained``, with a warning only. The model is
    built on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    source = ckpt.base_model if ckpt.base_model and not (ckpt.path / "config.json").is_file() else ckpt.path
    config = AutoConfig.from_pretrained(str(source), local_files_only=True,
                                        trust_remote_code=options.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=options.trust_remote_code)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    tied = bool(getattr(config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False))
    missing = [k for k in expected if k not in names and not (tied and k == "lm_head.weight")]
    described = f"the {config.model_type} model that config.json ({source}) describes"
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: no tensor {missing[0]}{more} of {described}")
    for k, shape in names.items():
        if k in expected and expected[k] != tuple(shape):
            raise CheckpointError(f"{where}: {k} has shape {list(shape)}; {described} has {list(expected[k])}")


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
