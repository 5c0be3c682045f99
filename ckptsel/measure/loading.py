"""Load checkpoints one after another, each once; LoRA adapters share one base model.

A ranking run walks the checkpoints of one training run in order. How a checkpoint is read is
its format's business (``ckpt.format.check_load`` and ``load``, ckptsel/formats/); this module
decides when, and what stays in memory. Full checkpoints are loaded one at a time (the previous
one is released first, so two never share memory). Adapter checkpoints (``ckpt.format.is_adapter``)
are hot-swapped on a base model (their format's ``load``) that is loaded once per distinct base:
the first adapter wraps the base with ``PeftModel.from_pretrained``; a next one with the same
LoRA config and tensors (the usual case within a run) has its weights copied into the loaded
adapter's, any other is ``load_adapter``-ed, activated, and the previous adapter deleted. The
base weights are never merged or modified, so adapter j scores exactly as if loaded fresh on a
clean base. Tokenizers are built once per distinct set of tokenizer files.

Safety defaults (ckptsel/DESIGN.md): only local files (nothing is downloaded), safetensors only
unless ``allow_pickle`` (then ``.bin`` files load with ``weights_only=True``), no remote
code unless ``trust_remote_code``. Defaults for speed: CUDA when present, bf16 and SDPA
attention there, float32 on CPU.

Any failure becomes one :class:`~ckptsel.errors.CheckpointError` line naming the checkpoint
and the reason, so a caller can record it and go on with the next checkpoint. One is not a
checkpoint's fault: an adapter's base named by a hub id that is neither a local folder nor
in the Hugging Face cache raises :class:`~ckptsel.errors.CkptselError` (exit 2), saying to
pass ``--base-model``. ``load_tokenizer`` is :func:`ckptsel.tokenizers.load_tokenizer`.
"""

from __future__ import annotations

import gc
import logging
import weakref
from pathlib import Path
from typing import Any

import torch

from ckptsel.errors import CheckpointError, CkptselError
from ckptsel.formats import Checkpoint, LoadOptions
from ckptsel.measure.protocols import LoadedCheckpoint, Loader
from ckptsel.tokenizers import load_tokenizer, tokenizer_digest

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CkptselError(f"--device {name!r}: not a device (use auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CkptselError(f"--device {name!r}: CUDA is not available on this machine")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on a GPU that supports it (else float16), float32 on CPU."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise CkptselError(f"--dtype {name!r}: unknown (use auto, {', '.join(DTYPES)})")
    return DTYPES[name]


def dtype_name(engine) -> str:
    """The dtype ``engine`` settings run in, as a plain name ("float32", "bfloat16"): store keys and vLLM use it."""
    return str(resolve_dtype(engine.dtype, resolve_device(engine.device))).removeprefix("torch.")


class CheckpointLoader(Loader):
    """Yields (model, tokenizer) per checkpoint, loading each once and every base model once (a
    :class:`~ckptsel.measure.protocols.Loader`).

    Use as a context manager; a yielded model is valid until the next :meth:`load` (an
    adapter swap changes the same module in place)::

        with CheckpointLoader.for_engine(EngineSettings()) as loader:  # the one way loaders are made
            for ckpt in checkpoints:
                loaded = loader.load(ckpt)   # CheckpointError (one line) when it cannot be loaded
                score(loaded.model, loaded.tokenizer)

    ``base_loads`` counts base-model loads for adapters, ``full_loads`` full checkpoints.
    """

    def __init__(
        self,
        device: str = "auto",
        dtype: str = "auto",
        *,
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
        cache_dir: str | Path | None = None,
    ):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.trust_remote_code = trust_remote_code
        self.allow_pickle = allow_pickle
        self.options = LoadOptions(dtype=self.dtype, device=self.device, trust_remote_code=trust_remote_code,
                                   allow_pickle=allow_pickle, cache_dir=cache_dir)
        self.base_loads = 0
        self.full_loads = 0
        self._full = None  # the current full-checkpoint model
        self._peft = None  # PeftModel wrapping the current base
        self._base_key: str | None = None
        self._adapter: str | None = None  # name of the active adapter
        self._adapters_loaded = 0
        self._tokenizers: dict[str, Any] = {}  # tokenizer files' digest -> tokenizer

    @classmethod
    def for_engine(cls, engine) -> CheckpointLoader:
        """The loader an :class:`~ckptsel.settings.EngineSettings` asks for: device, dtype, whether remote code
        and pickled weights may be loaded, and where converted copies live. Every measurement makes its loader
        here, so none drops a setting."""
        return cls(engine.device, engine.dtype, trust_remote_code=engine.trust_remote_code,
                   allow_pickle=engine.allow_pickle, cache_dir=engine.cache_dir)

    def __enter__(self) -> CheckpointLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release every model this loader holds.

        No garbage collection here: what is left of a model after the loader lets go is held
        by the caller (the last checkpoint's handle, typically), which a collection cannot free.
        """
        self._drop_models(collect=False)

    def load(self, ckpt: Checkpoint) -> LoadedCheckpoint:
        """Load one checkpoint; raises CheckpointError (one line) when it cannot be loaded."""
        fmt = ckpt.format
        try:
            fmt.check_load(ckpt, self.options)  # a broken checkpoint raises its error here
            if fmt.is_adapter:
                model = self._swap_adapter(ckpt)
            else:
                self._drop_models(keep_base=True)
                self._full = _frozen(fmt.load(ckpt, self.options))
                self.full_loads += 1
                model = self._full
            tokenizer = self._tokenizer(ckpt)
        except CkptselError:  # CheckpointError, or a base model that is not there at all
            raise
        except Exception as exc:  # transformers/peft/safetensors raise many types; the user needs one line
            raise CheckpointError(f"{ckpt.path}: cannot load: {_one_line(exc)}") from exc
        return LoadedCheckpoint(model, tokenizer)

    def _swap_adapter(self, ckpt: Checkpoint):
        """The adapter on its base (checked by its format's ``check_load``): the base is loaded by the
        format's ``load`` when it is not the one held, and the adapter put on it or copied into the held one."""
        from peft import PeftModel

        name = f"adapter{self._adapters_loaded}"
        if self._peft is None or self._base_key != ckpt.base_model:
            self._drop_models()
            try:
                base = _frozen(ckpt.format.load(ckpt, self.options))
            except Exception as exc:
                reason = str(exc) if isinstance(exc, CheckpointError) else _one_line(exc)
                raise CheckpointError(f"{ckpt.path}: base model {reason}") from exc
            self.base_loads += 1
            self._peft = PeftModel.from_pretrained(base, str(ckpt.path), adapter_name=name, is_trainable=False)
            self._base_key = ckpt.base_model
        elif _copy_adapter_weights(self._peft, self._adapter, ckpt.path):
            return _frozen(self._peft)
        else:
            try:
                self._peft.load_adapter(str(ckpt.path), adapter_name=name, is_trainable=False)
            except Exception:
                if name in self._peft.peft_config:
                    self._peft.delete_adapter(name)
                raise
            self._peft.set_adapter(name, inference_mode=True)
            self._peft.delete_adapter(self._adapter)
        self._adapter = name
        self._adapters_loaded += 1
        return _frozen(self._peft)

    def _tokenizer(self, ckpt: Checkpoint):
        """The checkpoint's tokenizer, built once per distinct set of tokenizer files.

        A run's checkpoints carry identical tokenizer files (or none: then the base's); parsing
        a large vocabulary again for each costs a fraction of a second per checkpoint.
        """
        key = tokenizer_digest(ckpt)
        if key not in self._tokenizers:
            self._tokenizers[key] = load_tokenizer(ckpt, trust_remote_code=self.trust_remote_code)
        return self._tokenizers[key]

    def _drop_models(self, keep_base: bool = False, collect: bool = True) -> None:
        """Let go of the full model and (unless ``keep_base``) the base with its adapter, and free their memory."""
        held = (self._full, None if keep_base else self._peft)
        dropped = [weakref.ref(m) for m in held if m is not None] if collect else []
        del held
        self._full = None
        if not keep_base:
            self._peft = None
            self._base_key = None
            self._adapter = None
        _release_memory(self.device, dropped)


# Config fields that say where an adapter came from, not what it computes.
_PROVENANCE_FIELDS = ("base_model_name_or_path", "revision", "inference_mode")


def _copy_adapter_weights(peft_model, adapter: str, path: Path) -> bool:
    """Swap in the adapter at ``path`` by copying its tensors into the active ``adapter``'s; False if it doesn't fit.

    ``load_adapter`` builds fresh LoRA modules on every target layer (random initialisation,
    walks of the module tree): on CPU that takes about as long as reloading a 0.5B base.
    Successive checkpoints of one run have the same LoRA config and the same tensors, and then
    copying the new values in place yields exactly the model a fresh load gives. Only plain
    LoRA qualifies (no DoRA, no trained biases, no extra saved modules), with every other
    config field and every tensor name and shape equal; anything else takes the general path.
    """
    from peft import LoraConfig, PeftConfig
    from safetensors.torch import load_file

    if not (path / "adapter_model.safetensors").is_file():
        return False
    active = peft_model.peft_config[adapter]
    incoming = PeftConfig.from_pretrained(str(path))
    plain = [
        isinstance(c, LoraConfig) and not c.use_dora and c.bias == "none" and not c.modules_to_save
        for c in (active, incoming)
    ]
    fields = [{k: v for k, v in c.to_dict().items() if k not in _PROVENANCE_FIELDS} for c in (active, incoming)]
    if not all(plain) or fields[0] != fields[1]:
        return False
    weights = load_file(str(path / "adapter_model.safetensors"))
    tag = f".{adapter}."  # PEFT saves parameter names with the adapter name taken out
    params = {name.replace(tag, "."): p for name, p in peft_model.named_parameters() if tag in name}
    if weights.keys() != params.keys() or any(weights[k].shape != params[k].shape for k in params):
        return False
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(weights[key])
    return True


def _frozen(model):
    """Eval mode, no gradients: measurement only."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _release_memory(device: torch.device, dropped: list[weakref.ref]) -> None:
    """Free the ``dropped`` models' memory before the next model is read.

    A model nothing else refers to is gone already (reference counting); a full garbage
    collection, for one still reachable (a reference cycle, or a caller still holding it),
    walks every object of the process: about 0.25 s with transformers imported on a busy
    CPU core, which a re-rank of one new checkpoint would otherwise pay for nothing.
    """
    if any(ref() is not None for ref in dropped):
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")

