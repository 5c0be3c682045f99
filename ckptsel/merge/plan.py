"""What to merge, checked before any weight is read: inputs, method, weights, base, output form.

:func:`plan_merge` turns the user's request into a :class:`MergePlan` or raises a one-line
:class:`MergeError`. Everything here reads configs and safetensors headers only (through
:mod:`ckptsel.discover`), so a bad request fails in milliseconds, not after minutes of merging.

Weights are *relative*: every method receives them normalised to sum to 1. For linear
merges that is mergekit's own default (``normalize: true``); methods with a ``normalize``
switch (ties, task_arithmetic, dare_*, della*, breadcrumbs*) get ``normalize: true`` too,
so ``--weights 1,3`` means the same thing everywhere: a quarter and three quarters. Checkpoints
of one run are not independent tasks, and adding their full task vectors (mergekit's
default for task_arithmetic) would overshoot. ``--param normalize=false`` restores
mergekit's raw behaviour. slerp takes ``t = w2 / (w1 + w2)``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ckptsel.discover import Checkpoint, describe, discover
from ckptsel.errors import CheckpointError, CkptselError
from ckptsel.formats.base import LoadOptions


class MergeError(CkptselError):
    """A merge request that cannot be carried out as asked."""


@dataclass(frozen=True)
class MethodInfo:
    """How ckptsel drives one mergekit method (mergekit's registry holds the math)."""

    needs_base: bool          # task vectors are taken against --base-model
    takes_weights: bool       # per-checkpoint weights (mergekit parameter "weight", or slerp's t)
    min_inputs: int = 1       # checkpoints, not counting the base
    max_inputs: int | None = None
    summary: str = ""


# The methods `ckptsel merge` offers for full checkpoints, in one explicit table. LoRA
# adapters are merged by ckptsel itself, exactly in ΔW space, with the methods in ADAPTER_METHODS.
METHODS: dict[str, MethodInfo] = {
    "linear": MethodInfo(False, True, 1, None, "weighted average of the weights (Wortsman et al. 2022)"),
    "slerp": MethodInfo(False, True, 2, 2, "spherical interpolation between two checkpoints"),
    "nuslerp": MethodInfo(False, True, 2, 2, "slerp with row-wise/flattened options"),
    "multislerp": MethodInfo(False, True, 2, None, "spherical weighted average of several checkpoints"),
    "karcher": MethodInfo(False, False, 2, None, "Riemannian (Karcher) mean, unweighted"),
    "model_stock": MethodInfo(True, False, 2, None, "Model Stock: interpolate toward the base by angle"),
    "task_arithmetic": MethodInfo(True, True, 1, None, "base + weighted sum of task vectors"),
    "ties": MethodInfo(True, True, 1, None, "TIES: trim, elect sign, merge task vectors"),
    "dare_ties": MethodInfo(True, True, 1, None, "DARE drop-and-rescale, then TIES sign election"),
    "dare_linear": MethodInfo(True, True, 1, None, "DARE drop-and-rescale, linear"),
    "breadcrumbs": MethodInfo(True, True, 1, None, "Model Breadcrumbs: drop outliers and small deltas"),
    "breadcrumbs_ties": MethodInfo(True, True, 1, None, "Breadcrumbs with TIES sign election"),
    "della": MethodInfo(True, True, 1, None, "DELLA magnitude-based pruning, TIES"),
    "della_linear": MethodInfo(True, True, 1, None, "DELLA magnitude-based pruning, linear"),
}

# Methods ckptsel computes exactly on LoRA deltas (lora.py): both are linear in the ΔW_k once
# model_stock's per-module ratio is known, so the result is again an adapter.
ADAPTER_METHODS = ("linear", "model_stock")

# adapter_config.json fields whose non-default values change what an adapter computes in a way
# ΔW = scale·B·A does not capture; such adapters are refused, not merged approximately.
_UNSUPPORTED_ADAPTER_FIELDS = {
    "use_dora": "DoRA rescales each weight by a learned magnitude, so its effect is not a sum of ΔW",
    "lora_bias": "lora_bias adds a bias to lora_B",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "alora_invocation_tokens": "activated LoRA only applies after its invocation tokens",
    "layer_replication": "layer_replication changes the base model's layers",
    "use_qalora": "QA-LoRA",
}
# init_lora_weights values that modify the base weights at initialisation: the adapter is then
# relative to a different base than the one on disk.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "eva", "lora_ga", "mica")

Output = Literal["full", "adapter"]


@dataclass(frozen=True)
class MergePlan:
    """A checked merge request: everything the builders need, nothing loaded yet."""

    inputs: tuple[Checkpoint, ...]
    weights: tuple[float, ...]                 # as given; see normalized_weights
    method: str
    adapters: bool                             # the inputs are adapters (ΔW sum, lora.py), else full (mergekit)
    output: Output                             # what is written
    base_model: str | None = None              # full merges: --base-model; adapters: their base (path or hub id)
    base: Checkpoint | None = None             # the base as a local checkpoint, when it is one
    parameters: Mapping[str, object] = field(default_factory=dict)  # extra mergekit method parameters
    rank: int | None = None                    # adapters: truncate the merged ΔW to this rank by SVD
    dtype: str | None = None                   # output dtype; None keeps the inputs'
    device: str = "cpu"
    seed: int = 0                              # for the random methods (dare_*, della*)
    allow_pickle: bool = False                 # formats read through a converted copy (ZeRO shards) may unpickle
    cache_dir: str | None = None               # where converted copies live (None: the default cache dir)

    @property
    def load_options(self) -> LoadOptions:
        """How the inputs' formats read them (their ``check_load`` and ``model_folder``: a converted copy
        is read from, or made in, ``cache_dir``). Nothing is loaded onto a device here."""
        return _options(vars(self))

    def model_folder(self, ckpt: Checkpoint) -> Path:
        """The safetensors model folder a full checkpoint is merged from: its own, or its format's converted
        copy (made on first use; ckptsel/DESIGN.md, *Adding a checkpoint format*)."""
        try:
            return ckpt.format.model_folder(ckpt, self.load_options)
        except CheckpointError as exc:
            raise MergeError(str(exc) if str(ckpt.path) in str(exc) else f"{ckpt.path}: {exc}") from None

    @property
    def weighted(self) -> bool:
        """Whether the weights enter the merge (model_stock and karcher take none)."""
        return METHODS[self.method].takes_weights

    @property
    def normalized_weights(self) -> tuple[float, ...]:
        total = math.fsum(self.weights)
        return tuple(w / total for w in self.weights)

    def estimated_bytes(self) -> int:
        """Bytes the output will take: an upper estimate from the inputs' weight files."""
        def size(ckpt: Checkpoint) -> int:
            files = sum(f.stat().st_size for f in ckpt.weight_files)
            if ckpt.format.converts and ckpt.num_parameters and ckpt.dtype in _ITEMSIZE:
                # Read through a converted copy: its weights, not the shards (ZeRO's hold the optimizer's states).
                return min(files, ckpt.num_parameters * _ITEMSIZE[ckpt.dtype])
            return files

        factor = 1.0
        if self.dtype is not None and self.inputs[0].dtype in _ITEMSIZE:
            factor = _ITEMSIZE[self.dtype] / _ITEMSIZE[self.inputs[0].dtype]
        if not self.adapters:
            return int(max(size(c) for c in self.inputs) * factor)
        if self.output == "full":
            return int(size(self.base) * factor)
        return int(sum(size(c) for c in self.inputs) * factor)  # ranks concatenate

    def describe(self) -> dict:
        """A JSON-ready summary, the shape the sidecar and ``--json`` use."""
        return {
            "method": self.method,
            "inputs_kind": "adapter" if self.adapters else "full",
            "output": self.output,
            "weights": list(self.weights) if self.weighted else None,
            "normalized_weights": list(self.normalized_weights) if self.weighted else None,
            "base_model": self.base_model,
            "parameters": dict(self.parameters),
            "rank": self.rank,
            "dtype": self.dtype,
            "device": self.device,
            "seed": self.seed,
        }


_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
DTYPES = ("float32", "bfloat16", "float16", "float64")


def parse_weights(text: str) -> list[float]:
    """``"1,2,1"`` -> [1.0, 2.0, 1.0]; a one-line error naming the bad item otherwise."""
    out = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise MergeError(f"--weights: {item.strip()!r} is not a number (expected e.g. 1,2,1)") from None
        if not math.isfinite(value):
            raise MergeError(f"--weights: {item.strip()!r} is not a finite number")
        out.append(value)
    return out


def parse_params(items: Sequence[str]) -> dict[str, object]:
    """``["density=0.5", "int8_mask=true"]`` -> {"density": 0.5, "int8_mask": True} (YAML scalars)."""
    import yaml

    params: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MergeError(f"--param {item!r}: expected KEY=VALUE, e.g. density=0.5")
        params[key.strip()] = yaml.safe_load(value)
    return params


def _options(settings: Mapping) -> LoadOptions:
    """The load options a merge reads its inputs with (no dtype: nothing is loaded onto a device)."""
    return LoadOptions(dtype=None, device=settings["device"], allow_pickle=settings["allow_pickle"],
                       cache_dir=settings["cache_dir"])


def _check_usable(ckpt: Checkpoint, options: LoadOptions | None = None) -> None:
    """A one-line MergeError when the checkpoint's format says merge cannot read it (broken, pickled...), or,
    for a full checkpoint, cannot read it with ``options`` (ZeRO shards without ``--allow-pickle``)."""
    refusal = ckpt.format.merge_refusal(ckpt)
    if refusal is not None:
        raise MergeError(f"{ckpt.path}: {refusal}")
    if options is not None and not ckpt.format.is_adapter:
        try:
            ckpt.format.check_load(ckpt, options)
        except CheckpointError as exc:
            raise MergeError(str(exc)) from None


def adapter_config(ckpt: Checkpoint) -> dict:
    """The adapter's config, refused with the reason when its effect is not an exact ΔW."""
    cfg = json.loads((ckpt.path / "adapter_config.json").read_text())
    where = f"{ckpt.path / 'adapter_config.json'}"
    if cfg.get("peft_type", "LORA") != "LORA":
        raise MergeError(f"{where}: peft_type {cfg['peft_type']}; only LoRA adapters merge exactly")
    for key, why in _UNSUPPORTED_ADAPTER_FIELDS.items():
        if cfg.get(key):
            raise MergeError(f"{where}: {key} is set; cannot merge exactly ({why})")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise MergeError(f"{where}: init_lora_weights={init!r} changes the base weights; "
                         "convert the adapter to plain LoRA first")
    return cfg


def _same_base(a: str, b: str) -> bool:
    if Path(a).is_dir() and Path(b).is_dir():
        return os.path.realpath(a) == os.path.realpath(b)
    return a == b


def check_output(plan: MergePlan, out: str | os.PathLike) -> None:
    """The output must not be, contain, or sit inside an input or the base (``--force`` would delete it)."""
    target = Path(os.path.realpath(out))
    for path in [c.path for c in plan.inputs] + ([plan.base.path] if plan.base else []):
        src = Path(os.path.realpath(path))
        if target == src or src.is_relative_to(target) or target.is_relative_to(src):
            raise MergeError(f"output {out} overlaps input {path}; choose another -o")


def plan_merge(
    checkpoints: Sequence[Checkpoint | str | os.PathLike],
    *,
    method: str = "linear",
    weights: Sequence[float] | None = None,
    base_model: str | os.PathLike | None = None,
    parameters: Mapping[str, object] | None = None,
    rank: int | None = None,
    full: bool = False,
    dtype: str | None = None,
    device: str = "cpu",
    seed: int = 0,
    out: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> MergePlan:
    """Check a merge request and return its plan; raise :class:`MergeError` (one line) if it
    cannot be done. ``checkpoints`` are folders (a Trainer run expands to all its checkpoints)
    or already discovered :class:`Checkpoint` objects. ``out``, when given, is checked not to
    overlap an input. Full checkpoints that transformers cannot read as they lie (DeepSpeed ZeRO, FSDP)
    are merged from their converted copies in ``cache_dir`` (made when the merge is built, once;
    ``allow_pickle`` lets ZeRO's pickled shards be read)."""
    from ckptsel.measure.loading import resolve_device

    device = str(resolve_device(device))
    base_model = os.fspath(base_model) if base_model is not None else None
    # Each argument on its own, so the order (and so each weight's checkpoint) is the order
    # given; a Trainer run expands to its checkpoints in step order.
    inputs = [c for arg in checkpoints for c in ([arg] if isinstance(arg, Checkpoint) else discover(arg, base_model))]
    if not inputs:
        raise MergeError("no checkpoints to merge")
    seen: dict[str, Path] = {}
    for ckpt in inputs:
        key = os.path.realpath(ckpt.path)
        if key in seen:
            raise MergeError(f"{ckpt.path} is given twice (also as {seen[key]})")
        seen[key] = ckpt.path
    cache_dir = os.fspath(cache_dir) if cache_dir is not None else None
    for ckpt in inputs:
        _check_usable(ckpt, _options(dict(device=device, allow_pickle=allow_pickle, cache_dir=cache_dir)))

    weights_given = weights is not None
    weights = [1.0] * len(inputs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(inputs):
        raise MergeError(f"--weights has {len(weights)} values for {len(inputs)} checkpoints "
                         f"({', '.join(c.path.name for c in inputs)})")
    if not math.fsum(weights):
        raise MergeError("--weights sum to 0; they are relative and are divided by their sum")
    if dtype is not None and dtype not in DTYPES:
        raise MergeError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")

    adapters = [c.path.name for c in inputs if c.format.is_adapter]
    if adapters and len(adapters) < len(inputs):
        fulls = [c.path.name for c in inputs if not c.format.is_adapter]
        raise MergeError(f"cannot mix LoRA adapters ({', '.join(adapters)}) with full models ({', '.join(fulls)})")
    common = dict(weights=tuple(weights), method=method, dtype=dtype, device=device, seed=seed,
                  allow_pickle=allow_pickle, cache_dir=cache_dir)
    if adapters:
        plan = _plan_adapters(inputs, rank=rank, full=full, parameters=parameters, weights_given=weights_given,
                              **common)
    else:
        plan = _plan_full(inputs, base_model=base_model, parameters=parameters, rank=rank, full=full,
                          weights_given=weights_given, **common)
    if out is not None:
        check_output(plan, out)
    return plan


def _plan_adapters(inputs, *, method, rank, full, parameters, weights_given, **common) -> MergePlan:
    if method not in ADAPTER_METHODS:
        raise MergeError(f"LoRA adapters merge exactly with --method {' or '.join(ADAPTER_METHODS)} only "
                         f"(got {method!r}); for other methods merge each adapter into its base with --full first")
    if method == "model_stock" and len(inputs) < METHODS[method].min_inputs:
        raise MergeError(f"model_stock merges at least {METHODS[method].min_inputs} adapters; got {len(inputs)}")
    if method == "model_stock" and weights_given:
        raise MergeError("model_stock takes no --weights")
    if parameters:
        raise MergeError(f"--param {', '.join(parameters)}: LoRA merges take no method parameters")
    if full and rank is not None:
        raise MergeError("--rank truncates a merged adapter; it does not apply with --full")
    configs = [adapter_config(c) for c in inputs]
    first = inputs[0]
    for ckpt, cfg in zip(inputs[1:], configs[1:]):
        if not _same_base(ckpt.base_model, first.base_model):
            raise MergeError(f"adapters have different base models: {first.base_model} ({first.path.name}) "
                             f"vs {ckpt.base_model} ({ckpt.path.name})")
        for key in ("fan_in_fan_out", "bias", "modules_to_save"):
            if cfg.get(key) != configs[0].get(key):
                raise MergeError(f"{ckpt.path / 'adapter_config.json'}: {key}={cfg.get(key)!r} differs from "
                                 f"{first.path.name}'s {configs[0].get(key)!r}")
    base = None
    if Path(first.base_model).is_dir():
        base = describe(Path(os.path.abspath(first.base_model)))
    if full:
        if base is None:
            raise MergeError(f"--full needs the base model as a local folder; {first.base_model} is not one "
                             "(pass --base-model PATH)")
        _check_usable(base, _options(common))
        if base.format.is_adapter:
            raise MergeError(f"base model {base.path}: a LoRA adapter, not a full model")
    return MergePlan(inputs=tuple(inputs), adapters=True, output="full" if full else "adapter", method=method,
                     base_model=first.base_model, base=base, rank=rank, **common)


def _plan_full(inputs, *, method, base_model, parameters, rank, full, weights, weights_given, **common) -> MergePlan:
    info = METHODS.get(method)
    if info is None:
        raise MergeError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    if rank is not None:
        raise MergeError("--rank applies to merges of LoRA adapters, not full models")
    if full:
        raise MergeError("--full writes merged LoRA adapters as a full model; these inputs are full models already")
    n = len(inputs)
    if n < info.min_inputs or (info.max_inputs is not None and n > info.max_inputs):
        expected = (f"exactly {info.min_inputs}" if info.min_inputs == info.max_inputs
                    else f"at least {info.min_inputs}")
        raise MergeError(f"{method} merges {expected} checkpoints; got {n}")
    if not info.takes_weights and weights_given:
        raise MergeError(f"{method} takes no --weights")
    archs = {c.architecture for c in inputs}
    if len(archs) > 1:
        raise MergeError(f"checkpoints have different architectures: {', '.join(sorted(map(str, archs)))}")
    sizes = {c.num_parameters for c in inputs}
    if len(sizes) > 1:
        raise MergeError(f"checkpoints have different parameter counts: {', '.join(map(str, sorted(sizes)))}")
    base = None
    if info.needs_base:
        if base_model is None:
            raise MergeError(f"{method} needs --base-model (the model the checkpoints were fine-tuned from)")
        if not Path(base_model).is_dir():
            raise MergeError(f"--base-model {base_model}: not a local folder")
        base = describe(Path(os.path.abspath(base_model)))
        _check_usable(base, _options(common))
        if any(os.path.realpath(c.path) == os.path.realpath(base.path) for c in inputs):
            raise MergeError(f"--base-model {base_model} is also one of the checkpoints; "
                             f"{method} takes task vectors against it, so list only the fine-tuned ones")
        if base.format.is_adapter:
            raise MergeError(f"--base-model {base_model}: a LoRA adapter, not a full model")
        if base.num_parameters not in sizes:
            raise MergeError(f"--base-model {base_model}: {base.num_parameters} parameters, "
                             f"the checkpoints have {sizes.pop()}")
        base_model = str(base.path)
    elif base_model is not None:
        raise MergeError(f"{method} does not use --base-model; drop it")
    params = dict(parameters or {})
    known = _mergekit_parameters(method)
    unknown = sorted(set(params) - known)
    if unknown:
        raise MergeError(f"--param {unknown[0]}: not a parameter of {method} "
                         f"(its parameters: {', '.join(sorted(known)) or 'none'})")
    return MergePlan(inputs=tuple(inputs), adapters=False, output="full", base_model=base_model, base=base,
                     parameters=params, weights=weights, method=method, **common)


def _mergekit_parameters(method: str) -> set[str]:
    """Names mergekit's own method spec accepts, minus the ones ckptsel sets from --weights."""
    from mergekit.merge_methods import registry

    spec = registry.get(method).spec
    return {p.name for p in spec.parameters} - {"weight", "t"}
