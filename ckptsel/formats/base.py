"""The checkpoint record, and the protocol every checkpoint format implements.

A format is one way checkpoints lie on disk (full safetensors weights, pickled ``.bin`` weights,
a PEFT adapter...). Everything ckptsel does that depends on the layout asks the checkpoint's
format, never a kind string:

    detect(folder)          is this folder mine? (file names only: it runs for every folder listed)
    describe(ckpt, base)    fill in the record from configs and headers, no weights loaded
    label(ckpt)             how ``ckptsel ls`` says it will be read
    owns(folder)            subfolders that belong to the checkpoint in ``folder`` (not checkpoints themselves)
    model_config(ckpt)      the model's config.json (an adapter's: its base's)
    fingerprint(ckpt, h)    what goes into its content hash (ckptsel/discover.py adds an adapter's base)
    check_load / load       whether it can be loaded with these options, and the model
    model_folder            a Hugging Face model folder with its weights (a converted copy for some formats)
    converts                whether model_folder converts into the cache (made once, before workers read it)
    is_adapter              a delta on a base model: loaded onto one shared base, merged in ΔW space
    merge_refusal(ckpt)     why ``ckptsel merge`` cannot take it (None: it can); a full checkpoint it takes is
                            merged from its model_folder

``usable`` is False only for the broken format (:mod:`ckptsel.formats.broken`), which a checkpoint
gets when no format claims its folder or its format's ``describe`` fails. Formats subclass
:class:`CheckpointFormat` explicitly to inherit its defaults; :mod:`ckptsel.formats.registry`
lists them in detection order.
"""

from __future__ import annotations

import copy
from abc import abstractmethod
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

from ckptsel.formats.files import config_in
from ckptsel.formats.hashing import hash_checkpoint


@dataclass
class Checkpoint:
    """One checkpoint as found on disk: its format, where in training it was saved, and why it
    cannot be used (the broken format, ``error``) if it cannot. Everything here comes from
    configs, headers and ``trainer_state.json``; no weights are loaded."""

    path: Path                       # absolute
    format: CheckpointFormat         # how it is laid out, read, loaded and merged
    step: int | None = None
    tokens: str | None = None            # tokens seen, as a stepN-tokensXM folder name says ("1248M")
    epoch: float | None = None
    train_loss: float | None = None
    error: str | None = None
    weight_files: list[Path] = field(default_factory=list)
    weight_format: str = "none"      # the weight files' encoding: "safetensors", "pickle" or "none"
    architecture: str | None = None
    dtype: str | None = None
    num_parameters: int | None = None
    num_experts: int | None = None       # None for dense models
    experts_per_token: int | None = None
    base_model: str | None = None        # adapters: base path or id; others: where config.json and tokenizer come from
    lora_rank: int | None = None
    lora_alpha: float | None = None
    target_modules: list[str] | None = None
    notes: list[str] = field(default_factory=list)  # things a user should know that are not errors
    run: str | None = None               # the run it belongs to (Run.name); set by discover_runs

    @property
    def kind(self) -> str:
        """``"full"``, ``"adapter"`` or ``"error"``, as ``ckptsel ls --json`` prints it; branch on ``format``."""
        return self.format.kind

    def to_dict(self) -> dict:
        """A JSON-ready dict (paths as strings), the shape ``ckptsel ls --json`` prints: the fields in
        order with ``kind`` second, and the format's name last."""
        out: dict[str, Any] = {"path": str(self.path), "kind": self.kind}
        for f in fields(self):
            if f.name not in ("path", "format"):
                out[f.name] = copy.deepcopy(getattr(self, f.name))
        out["weight_files"] = [str(p) for p in self.weight_files]
        out["format"] = self.format.name
        return out


@dataclass(frozen=True)
class LoadOptions:
    """How a checkpoint is to be loaded: what :class:`ckptsel.measure.loading.CheckpointLoader` resolved."""

    dtype: Any                       # a torch.dtype
    device: Any                      # a torch.device
    trust_remote_code: bool = False
    allow_pickle: bool = False       # pickled weights load (with weights_only=True) only when set
    cache_dir: Any = None            # where converted copies live (ckptsel/formats/converted.py); None: the default


class CheckpointFormat(Protocol):
    """One checkpoint format. Subclass it explicitly: ``detect``, ``describe`` and ``load`` must be
    written; the rest have defaults that fit a folder with its ``config.json`` beside the weights."""

    name: str                        # unique; ``ckptsel ls --json`` prints it as "format"
    kind: str = "full"               # Checkpoint.kind as serialised: "full", "adapter" or "error"
    looks_for: str = ""              # the files detect() looks for, for the "no weights" message
    is_adapter: bool = False         # see merge_refusal and ckptsel/measure/loading.py
    converts: bool = False           # model_folder is a converted copy in the cache (ckptsel/formats/converted.py)
    usable: bool = True              # False only for the broken format

    @abstractmethod
    def detect(self, folder: Path) -> bool:
        """Whether ``folder`` holds a checkpoint of this format (file names only, no reading)."""

    @abstractmethod
    def describe(self, ckpt: Checkpoint, base_model: str | None) -> None:
        """Fill in ``ckpt`` from configs and headers (weight_files, weight_format, architecture, dtype,
        num_parameters, ...; ``notes`` for what a user should know). Raise :class:`~ckptsel.errors.CheckpointError`
        (one line naming the file) when the folder is broken. ``base_model`` overrides an adapter's base."""

    def label(self, ckpt: Checkpoint) -> str:
        """How ``ckptsel ls`` says the checkpoint will be read (its "format" cell)."""
        return self.name

    def owns(self, folder: Path) -> list[Path]:
        """Subfolders of ``folder`` that are part of the checkpoint this format reads there (DeepSpeed's tag
        folder), so that ckptsel/discover.py does not take them for checkpoints of their own."""
        return []

    def model_config(self, ckpt: Checkpoint) -> dict | None:
        """The model's ``config.json`` as a dict (context length, shape checks), None when not at hand."""
        return config_in(ckpt.path)

    def fingerprint(self, ckpt: Checkpoint, h) -> None:
        """Feed what the checkpoint's own files hold into the sha256 ``h`` (ckptsel/formats/hashing.py).
        The default: its kind, its weight files (safetensors by tensor, others as files) and the configs beside
        them. The bytes fed must not change for existing checkpoints: the result store is keyed by them."""
        hash_checkpoint(h, self.kind, ckpt.weight_format, ckpt.weight_files, ckpt.path)

    def check_load(self, ckpt: Checkpoint, options: LoadOptions) -> None:
        """Raise :class:`~ckptsel.errors.CheckpointError` (one line) when ``ckpt`` cannot be loaded with
        ``options`` (pickled weights without ``allow_pickle``...); checked before every load."""

    @abstractmethod
    def load(self, ckpt: Checkpoint, options: LoadOptions) -> Any:
        """The model (a transformers causal LM on ``options.device`` in ``options.dtype``); the loader puts it in
        eval mode. For an adapter format: the base model, which the loader wraps with the adapter (PEFT) and then
        hot-swaps the next adapters on."""

    def model_folder(self, ckpt: Checkpoint, options: LoadOptions) -> Path:
        """A Hugging Face model folder (``config.json`` beside safetensors weights) with this checkpoint's
        weights, for what reads folders (mergekit): the checkpoint's own by default; formats that
        transformers cannot read as they lie return their converted copy (ckptsel/formats/converted.py),
        made on first use."""
        return ckpt.path

    def merge_refusal(self, ckpt: Checkpoint) -> str | None:
        """Why ``ckptsel merge`` cannot take ``ckpt``, or None when it can. Adapters (``is_adapter``) merge as
        the exact weighted sum of their LoRA ΔW (ckptsel/merge/lora.py); full checkpoints through mergekit,
        which reads the safetensors model folder :meth:`model_folder` gives (ckptsel/merge/full.py): the
        checkpoint's own, or its converted copy. Whether it can be read with the merge's options (``--allow-pickle``)
        is :meth:`check_load`'s to say."""
        return (f"{self.name} checkpoint: merge reads safetensors model folders and LoRA adapters only "
                "(convert it to a safetensors model folder first)")
