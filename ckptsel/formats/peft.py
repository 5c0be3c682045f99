"""A PEFT adapter: ``adapter_config.json`` and ``adapter_model.safetensors`` (or a pickled
``adapter_model.bin``), a delta on a base model named in the config or by ``--base-model``.

Adapters are loaded onto their base (one base load for all adapters on it, ckptsel/measure/loading.py),
fingerprinted with their base's fingerprint (ckptsel/discover.py), and merged exactly as the weighted
sum of their LoRA ΔW (ckptsel/merge/lora.py). A hub id as base is read from the local Hugging Face
cache; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

from ckptsel.errors import CheckpointError, CkptselError
from ckptsel.formats.base import Checkpoint, CheckpointFormat, LoadOptions
from ckptsel.formats.files import Layout, architecture, config_in, find_weights, is_number, moe_from_config, read_json
from ckptsel.formats.hf import (
    PICKLE_MERGE_REFUSAL, base_model_missing, load_pretrained, names_local_path, read_weights, resolve_base_model,
)

CONFIG = "adapter_config.json"
LAYOUTS = (Layout("safetensors", None, "adapter_model.safetensors", None),
           Layout("pickle", None, "adapter_model.bin", None))


class PeftAdapter(CheckpointFormat):
    name = "peft"
    kind = "adapter"
    looks_for = CONFIG
    is_adapter = True

    def detect(self, folder: Path) -> bool:
        return (folder / CONFIG).is_file()

    def describe(self, ckpt: Checkpoint, base_model: str | None) -> None:
        cfg = read_json(ckpt.path / CONFIG)
        if cfg.get("peft_type", "LORA") != "LORA":
            ckpt.notes.append(f"{cfg['peft_type']} adapter: only LoRA adapters merge exactly")
        ckpt.lora_rank = cfg["r"] if isinstance(cfg.get("r"), int) else None
        ckpt.lora_alpha = float(cfg["lora_alpha"]) if is_number(cfg.get("lora_alpha")) else None
        targets = cfg.get("target_modules")
        if isinstance(targets, list):
            ckpt.target_modules = sorted(targets)
        elif isinstance(targets, str):  # peft also takes a regex over module names
            ckpt.target_modules = [targets]
        ckpt.base_model = base_model or cfg.get("base_model_name_or_path") or None
        if ckpt.base_model is None:
            raise CheckpointError(f"{CONFIG} has no base_model_name_or_path; pass --base-model")
        # A hub id (as trainers write it) is read from its snapshot in the local Hugging Face cache.
        named = ckpt.base_model
        local = resolve_base_model(named, None if base_model else cfg.get("revision"))
        if local is not None and local != named:
            ckpt.base_model = local
            ckpt.notes.append(f"base model {named} read from the Hugging Face cache")
        elif local is None and not names_local_path(named):
            ckpt.notes.append(f"base model {named}: {base_model_missing(named)}")
        base = Path(ckpt.base_model)
        if (base / "config.json").is_file():
            base_config = read_json(base / "config.json")
            ckpt.architecture = architecture(base_config)
            ckpt.num_experts, ckpt.experts_per_token = moe_from_config(base_config)
        else:
            ckpt.architecture = (cfg.get("auto_mapping") or {}).get("base_model_class")
            if base.is_absolute() or ckpt.base_model.startswith("."):
                ckpt.notes.append(f"base model {ckpt.base_model} not found")
        weights = find_weights(ckpt.path, *LAYOUTS)
        if weights is None:
            raise CheckpointError(f"{CONFIG} but no adapter_model.safetensors")
        read_weights(ckpt, weights)

    def label(self, ckpt: Checkpoint) -> str:
        alpha = f" α={ckpt.lora_alpha:g}" if ckpt.lora_alpha is not None else ""
        what = f"LoRA r={ckpt.lora_rank}{alpha}" if ckpt.lora_rank is not None else "adapter"
        base = ckpt.base_model or "?"
        base = Path(base).name if Path(base).is_absolute() else base
        return f"{what} {','.join(ckpt.target_modules or [])} on {base}"

    def model_config(self, ckpt: Checkpoint) -> dict | None:
        return config_in(Path(ckpt.base_model) if ckpt.base_model else None)  # adapters of one base share its

    def check_load(self, ckpt: Checkpoint, options: LoadOptions) -> None:
        if not ckpt.base_model:
            raise CheckpointError(f"{ckpt.path}: adapter without a base model; pass --base-model")
        if resolve_base_model(ckpt.base_model) is None and not names_local_path(ckpt.base_model):
            # A hub id that is not in the local cache: the same for every adapter on it, so no
            # checkpoint can be measured until the user names the base; a usage error, not a
            # broken checkpoint.
            raise CkptselError(f"{ckpt.path}: base model {ckpt.base_model} ({CONFIG}) is "
                               f"{base_model_missing(ckpt.base_model)}")
        if not options.allow_pickle and not (ckpt.path / "adapter_model.safetensors").is_file():
            pickled = (ckpt.path / "adapter_model.bin").is_file()
            hint = "; pass --allow-pickle to load adapter_model.bin" if pickled else ""
            raise CheckpointError(f"{ckpt.path}: no adapter_model.safetensors{hint}")

    def load(self, ckpt: Checkpoint, options: LoadOptions):
        """The base model; the loader wraps it with this adapter and hot-swaps the next ones on it."""
        return load_pretrained(resolve_base_model(ckpt.base_model) or ckpt.base_model, options)

    def merge_refusal(self, ckpt: Checkpoint) -> str | None:
        return PICKLE_MERGE_REFUSAL if ckpt.weight_format != "safetensors" else None


PEFT_ADAPTER = PeftAdapter()
