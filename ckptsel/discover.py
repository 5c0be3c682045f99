"""Find checkpoints and describe them without loading weights.

INTERFACE (other modules rely on it; keep these names and fields):

    Checkpoint                 one discovered checkpoint (below)
    Run                        one training trajectory: a name, its folder, its checkpoints in step order
    discover_runs(paths, base_model=None) -> list[Run]     the runs under ``paths``
    discover(paths, base_model=None) -> list[Checkpoint]   every run's checkpoints, run after run
    describe(folder, base_model=None) -> Checkpoint       one folder, no training state
    fingerprint(ckpt) -> str   content hash for the result store
    read_safetensors_header(path) -> SafetensorsHeader    tensor names, dtypes, shapes, offsets

Everything here reads JSON files and safetensors *headers* only (8-byte length + JSON),
so listing costs grow with the number of tensors, not their size: 100 checkpoints of a
7B model list in about half a second (``benchmarks/ls_speed.py``).

Layouts understood, per argument:

- a Trainer run: a folder with ``checkpoint-N/`` subfolders. They come in numeric order
  (100 after 20); a final model saved at the run root comes after all of them, with the
  step from the root ``trainer_state.json`` (``global_step``) or ``None``.
- a single checkpoint folder: full weights (``model.safetensors``, sharded safetensors with
  or without ``model.safetensors.index.json``, ``pytorch_model.bin`` shards) next to a
  ``config.json``, or a PEFT adapter (``adapter_config.json`` + ``adapter_model.*``).

- a sweep: a folder whose subfolders (to three levels down) are runs, such as
  ``sweep/lr1e-5/checkpoint-*/`` and ``sweep/lr2e-5/checkpoint-*/``. Each run is named by
  its path below the sweep folder (``lr1e-5``).

Runs (ckptsel/DESIGN.md, "Runs and sweeps"). Every checkpoint belongs to exactly one run
(``Checkpoint.run``), and pre-memorization accuracy's history stays inside its run. A Trainer
run folder is one run; each run of a sweep is one run; a model folder given on its own is a run
of its own; checkpoint folders named by their step (``checkpoint-N``, ``step_N``,
``global_stepN``, ``iterN``) given as arguments belong to the run of the folder that holds them,
so a shell glob of one run's checkpoints is one run. Run names are the folder names, lengthened
by parent folders where two would clash.

Order: runs in the order given (a sweep's runs by name); inside a run, by step, so a shell glob
(``run/step_*``, where ``step_100`` sorts before ``step_20``) still comes out in training
order. A folder given twice is listed once.

A broken checkpoint (no weights, truncated or corrupt safetensors, an index naming a missing
shard, no ``config.json``) is returned with ``kind="error"`` and a one-line ``error``; it
never stops the others from being listed. Only a path that does not exist raises.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

from ckptsel.errors import CheckpointError

log = logging.getLogger(__name__)


@dataclass
class Checkpoint:
    """One checkpoint as found on disk: what it is, where in training it was saved, and why
    it cannot be used (``kind="error"``, ``error``) if it cannot. Everything here comes from
    configs, headers and ``trainer_state.json``; no weights are loaded."""

    path: Path                       # absolute
    kind: Literal["full", "adapter", "error"]
    step: int | None = None
    epoch: float | None = None
    train_loss: float | None = None
    error: str | None = None
    weight_files: list[Path] = field(default_factory=list)
    weight_format: Literal["safetensors", "pickle", "none"] = "none"
    architecture: str | None = None
    dtype: str | None = None
    num_parameters: int | None = None
    num_experts: int | None = None       # None for dense models
    experts_per_token: int | None = None
    base_model: str | None = None        # adapters: base path or id
    lora_rank: int | None = None
    lora_alpha: float | None = None
    target_modules: list[str] | None = None
    notes: list[str] = field(default_factory=list)  # things a user should know that are not errors
    run: str | None = None               # the run it belongs to (Run.name); set by discover_runs

    def to_dict(self) -> dict:
        """A JSON-ready dict (paths as strings), the shape ``ckptsel ls --json`` prints."""
        out = asdict(self)
        out["path"] = str(self.path)
        out["weight_files"] = [str(p) for p in self.weight_files]
        return out


# --- safetensors headers ----------------------------------------------------------------

# safetensors dtype code -> (torch-style name, bytes per element); codes not listed here
# (sub-byte packed formats) are accepted without the size check.
_DTYPES = {
    "BOOL": ("bool", 1), "U8": ("uint8", 1), "I8": ("int8", 1),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "I16": ("int16", 2), "U16": ("uint16", 2), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I32": ("int32", 4), "U32": ("uint32", 4), "F32": ("float32", 4),
    "I64": ("int64", 8), "U64": ("uint64", 8), "F64": ("float64", 8), "C64": ("complex64", 8),
}
_ITEMSIZE = {code: size for code, (_, size) in _DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # the safetensors format's own limit


class TensorInfo(NamedTuple):
    dtype: str                 # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int                 # byte offsets into the data region
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    raw: bytes                 # the JSON header bytes exactly as stored
    tensors: dict[str, TensorInfo]
    params_by_dtype: dict[str, int]
    data_start: int            # 8 + header length
    file_size: int

    @property
    def num_parameters(self) -> int:
        return sum(self.params_by_dtype.values())


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """Parse and check a safetensors header without touching tensor data.

    Checks what a truncated or corrupt file breaks: the header fits in the file, is a JSON
    object, every tensor's byte span matches its shape and dtype, and all spans end inside
    the file. Raises :class:`CheckpointError` naming the file. This loop runs once per
    tensor of every checkpoint listed, so it is kept lean (no per-tensor dataclasses).
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path.name}: truncated ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            raise CheckpointError(f"{path.name}: corrupt or truncated header (declares {n} bytes, file has {size})")
        raw = f.read(n)
    try:
        entries = json.loads(raw)
    except ValueError:
        raise CheckpointError(f"{path.name}: corrupt header (not JSON)") from None
    if not isinstance(entries, dict):
        raise CheckpointError(f"{path.name}: corrupt header (not a JSON object)")
    entries.pop("__metadata__", None)
    tensors: dict[str, TensorInfo] = {}
    params: dict[str, int] = {}
    needed = 0
    for name, info in entries.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            count = math.prod(shape)  # a non-numeric dim makes this a non-int (or raises)
        except (KeyError, TypeError, ValueError):
            count = None
        if type(count) is not int or type(begin) is not int or type(end) is not int or type(dtype) is not str:
            raise CheckpointError(f"{path.name}: corrupt header entry for tensor {name!r}")
        itemsize = _ITEMSIZE.get(dtype)
        if not 0 <= begin <= end or (itemsize and count * itemsize != end - begin):
            raise CheckpointError(f"{path.name}: corrupt header (tensor {name!r}: {dtype} {list(shape)} "
                                  f"does not fit offsets {begin}..{end})")
        tensors[name] = TensorInfo(dtype, shape, begin, end)
        params[dtype] = params.get(dtype, 0) + count
        if end > needed:
            needed = end
    data_size = size - 8 - n
    if needed > data_size:
        raise CheckpointError(f"{path.name}: truncated (tensor data needs {needed} bytes, file holds {data_size})")
    return SafetensorsHeader(raw, tensors, params, 8 + n, size)


# --- configs -----------------------------------------------------------------------------

# Where MoE configs keep their expert counts: Mixtral `num_local_experts`; OLMoE and
# Qwen2/3-MoE `num_experts`; DeepSeek `n_routed_experts`; others `moe_num_experts`.
_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_TOP_K_KEYS = ("num_experts_per_tok", "moe_top_k", "num_selected_experts")


def moe_from_config(config: dict) -> tuple[int | None, int | None]:
    """(number of experts, experts per token) from a model config, or (None, None) if dense.

    Multimodal configs nest the language model under ``text_config``; it is checked too.
    """
    for cfg in (config, config.get("text_config")):
        if not isinstance(cfg, dict):
            continue
        for key in _EXPERT_KEYS:
            n = cfg.get(key)
            if isinstance(n, int) and n > 1:
                top_k = next((cfg[k] for k in _TOP_K_KEYS if isinstance(cfg.get(k), int)), None)
                return n, top_k
    return None, None


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_bytes())
    except ValueError as exc:
        raise CheckpointError(f"{path.name}: invalid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path.name}: expected a JSON object")
    return obj


def _architecture(config: dict) -> str | None:
    archs = config.get("architectures")
    return archs[0] if isinstance(archs, list) and archs else config.get("model_type")


def _config_dtype(config: dict) -> str | None:
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype if isinstance(dtype, str) else None


# --- trainer state -----------------------------------------------------------------------


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def epoch_and_loss(state: dict, step: int) -> tuple[float | None, float | None]:
    """Epoch and training loss at ``step`` from a ``trainer_state.json`` dict.

    Loss: the ``loss`` entry of ``log_history`` logged at ``step`` or nearest before it
    (the Trainer logs a running mean every ``logging_steps``; eval entries and the final
    ``train_loss`` summary are not per-step losses and are skipped).
    Epoch: the state's own ``epoch`` when it was saved at ``step``; otherwise scaled from
    the logged entry nearest to ``step``, since the Trainer's epoch is linear in the step.
    """
    loss, loss_step = None, -1
    nearest, distance = None, None   # the logged entry with an epoch whose step is closest to `step`
    for entry in state.get("log_history") or []:
        at = entry.get("step") if isinstance(entry, dict) else None
        if not isinstance(at, int):
            continue
        if loss_step <= at <= step and _is_number(entry.get("loss")):
            loss, loss_step = float(entry["loss"]), at
        if at > 0 and _is_number(entry.get("epoch")) and (distance is None or abs(at - step) < distance):
            nearest, distance = entry, abs(at - step)
    if state.get("global_step") == step and _is_number(state.get("epoch")):
        return float(state["epoch"]), loss
    epoch = nearest["epoch"] * step / nearest["step"] if nearest else None
    return epoch, loss


def _state_step(state: dict) -> int | None:
    """The step a trainer state was saved at: ``global_step``, else the last logged step."""
    if isinstance(state.get("global_step"), int):
        return state["global_step"]
    history = state.get("log_history") or []
    steps = [e["step"] for e in history if isinstance(e, dict) and isinstance(e.get("step"), int)]
    return max(steps, default=None)


# --- one checkpoint folder ----------------------------------------------------------------

# (format, index file, single file, unindexed shard pattern), in order of preference.
_FULL_LAYOUTS = (
    ("safetensors", "model.safetensors.index.json", "model.safetensors", "model-*-of-*.safetensors"),
    ("pickle", "pytorch_model.bin.index.json", "pytorch_model.bin", "pytorch_model-*-of-*.bin"),
)
_ADAPTER_LAYOUTS = (
    ("safetensors", None, "adapter_model.safetensors", None),
    ("pickle", None, "adapter_model.bin", None),
)
CHECKPOINT_DIR = re.compile(r"checkpoint-(\d+)")
_STEP_IN_NAME = re.compile(r"(?:checkpoint|global_step|step|iter)[-_]?(\d+)")
_SHARD = re.compile(r"-(\d+)-of-(\d+)\.")
_PICKLE_NOTE = "pickle weights: loading them runs pickled code and needs --allow-pickle"
NO_WEIGHTS = "no weights: no model*.safetensors, pytorch_model*.bin or adapter_config.json"


def _find_weights(folder: Path, layouts) -> tuple[str, list[Path], dict | None] | None:
    """(format, weight files, index weight_map or None) of the first layout present, checked
    for completeness; None if no layout is present."""
    for fmt, index_name, single_name, shard_glob in layouts:
        if index_name and (folder / index_name).is_file():
            weight_map = _read_json(folder / index_name).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_name}: no weight_map")
            for shard in sorted(set(weight_map.values())):
                if not (folder / shard).is_file():
                    raise CheckpointError(f"{index_name} names {shard}, which is missing")
            return fmt, [folder / s for s in sorted(set(weight_map.values()))], weight_map
        if (folder / single_name).is_file():
            return fmt, [folder / single_name], None
        shards = sorted(folder.glob(shard_glob)) if shard_glob else []
        if shards:
            found = {int(m[1]): int(m[2]) for m in map(_SHARD.search, (s.name for s in shards)) if m}
            total = max(found.values(), default=0)
            missing = [k for k in range(1, total + 1) if found.get(k) != total]
            if missing or not found:
                raise CheckpointError(f"incomplete shards without an index: shard {missing[0] if missing else '?'} "
                                      f"of {total} is missing")
            return fmt, shards, None
    return None


def _read_weights(ckpt: Checkpoint, fmt: str, files: list[Path], weight_map: dict | None) -> None:
    """Fill in format, files, parameter count and dtype from the weight file headers."""
    ckpt.weight_format, ckpt.weight_files = fmt, files
    if fmt == "pickle":
        ckpt.notes.append(_PICKLE_NOTE)
        return
    headers = {f.name: read_safetensors_header(f) for f in files}
    for tensor, shard in (weight_map or {}).items():
        if tensor not in headers[shard].tensors:
            raise CheckpointError(f"model.safetensors.index.json puts {tensor} in {shard}, which does not hold it")
    by_dtype: Counter[str] = Counter()
    for header in headers.values():
        by_dtype.update(header.params_by_dtype)
    ckpt.num_parameters = sum(by_dtype.values())
    if by_dtype:
        code = by_dtype.most_common(1)[0][0]
        ckpt.dtype = _DTYPES.get(code, (code.lower(),))[0]


def _describe_full(ckpt: Checkpoint) -> None:
    found = _find_weights(ckpt.path, _FULL_LAYOUTS)
    if found is None:
        raise CheckpointError(NO_WEIGHTS)
    _read_weights(ckpt, *found)
    if not (ckpt.path / "config.json").is_file():
        raise CheckpointError("no config.json next to the weights")
    config = _read_json(ckpt.path / "config.json")
    ckpt.architecture = _architecture(config)
    ckpt.num_experts, ckpt.experts_per_token = moe_from_config(config)
    ckpt.dtype = ckpt.dtype or _config_dtype(config)  # pickle weights have no header to read it from
    if config.get("auto_map"):
        ckpt.notes.append("custom model code (auto_map): loading it needs --trust-remote-code")
    ckpt.kind = "full"


def _describe_adapter(ckpt: Checkpoint, base_model: str | None) -> None:
    cfg = _read_json(ckpt.path / "adapter_config.json")
    if cfg.get("peft_type", "LORA") != "LORA":
        ckpt.notes.append(f"{cfg['peft_type']} adapter: only LoRA adapters merge exactly")
    ckpt.lora_rank = cfg["r"] if isinstance(cfg.get("r"), int) else None
    ckpt.lora_alpha = float(cfg["lora_alpha"]) if _is_number(cfg.get("lora_alpha")) else None
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        ckpt.target_modules = sorted(targets)
    elif isinstance(targets, str):  # peft also takes a regex over module names
        ckpt.target_modules = [targets]
    ckpt.base_model = base_model or cfg.get("base_model_name_or_path") or None
    if ckpt.base_model is None:
        raise CheckpointError("adapter_config.json has no base_model_name_or_path; pass --base-model")
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
        base_config = _read_json(base / "config.json")
        ckpt.architecture = _architecture(base_config)
        ckpt.num_experts, ckpt.experts_per_token = moe_from_config(base_config)
    else:
        ckpt.architecture = (cfg.get("auto_mapping") or {}).get("base_model_class")
        if base.is_absolute() or ckpt.base_model.startswith("."):
            ckpt.notes.append(f"base model {ckpt.base_model} not found")
    found = _find_weights(ckpt.path, _ADAPTER_LAYOUTS)
    if found is None:
        raise CheckpointError("adapter_config.json but no adapter_model.safetensors")
    _read_weights(ckpt, *found)
    ckpt.kind = "adapter"


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


def describe(folder: Path, base_model: str | None = None) -> Checkpoint:
    """Read one checkpoint folder's weights and config; a broken one gets ``kind="error"``.

    Training state (step, epoch, loss) is filled in by :func:`discover`, which knows the run.
    """
    ckpt = Checkpoint(path=folder, kind="error")
    try:
        if (folder / "adapter_config.json").is_file():
            _describe_adapter(ckpt, base_model)
        else:
            _describe_full(ckpt)
    except CheckpointError as exc:
        ckpt.kind, ckpt.error = "error", str(exc)
    except OSError as exc:
        ckpt.kind, ckpt.error = "error", f"cannot read {Path(exc.filename or folder).name}: {exc.strerror}"
    return ckpt


def _training_state(ckpt: Checkpoint, name_step: int | None, run_state: dict | None) -> None:
    """Set step, epoch and loss from the folder's own trainer_state.json, else the run's."""
    state, own_step = run_state, None
    own = ckpt.path / "trainer_state.json"
    if own.is_file():
        try:
            state = _read_json(own)
            own_step = _state_step(state)
        except (CheckpointError, OSError) as exc:
            reason = str(exc).removeprefix("trainer_state.json: ")
            ckpt.notes.append(f"trainer_state.json ignored: {reason}")
            log.warning("%s: corrupt, ignored (%s)", own, reason)
    match = _STEP_IN_NAME.fullmatch(ckpt.path.name)
    ckpt.step = name_step if name_step is not None else own_step if own_step is not None else (
        int(match[1]) if match else None)
    if name_step is not None and own_step is not None and own_step != name_step:
        ckpt.notes.append(f"trainer_state.json says global_step {own_step}; using {name_step} from the folder name")
    if state is not None and ckpt.step is not None:
        ckpt.epoch, ckpt.train_loss = epoch_and_loss(state, ckpt.step)


# --- runs and argument lists ---------------------------------------------------------------

_ROOT_MARKERS = ("config.json", "adapter_config.json", "model.safetensors", "model.safetensors.index.json",
                 "pytorch_model.bin", "pytorch_model.bin.index.json")


NO_CHECKPOINT_DIRS = ", and no checkpoint-N/ folders"


def no_loadable_checkpoint(paths, checkpoints: list[Checkpoint]) -> str | None:
    """The one line every command gives when ``paths`` hold no loadable checkpoint, else None."""
    if any(c.kind != "error" for c in checkpoints):
        return None
    reasons = "; ".join(f"{c.path.name}: {c.error}" for c in checkpoints[:3])
    return f"no loadable checkpoint under {', '.join(map(str, paths))} ({reasons})"


def nothing_found(checkpoints: list[Checkpoint]) -> bool:
    """True when no argument held anything that looks like a checkpoint (not even a broken one)."""
    return all(c.kind == "error" and (c.error or "").endswith(NO_CHECKPOINT_DIRS) for c in checkpoints)


def _read_state(path: Path) -> dict | None:
    try:
        return _read_json(path) if path.is_file() else None
    except (CheckpointError, OSError) as exc:
        log.warning("%s: corrupt, ignored (%s)", path, str(exc).removeprefix(f"{path.name}: "))
        return None


def _expand(root: Path, base_model: str | None) -> tuple[bool, list[Checkpoint]]:
    """(is_run, checkpoints) for one argument: a run's checkpoints in step order, or one checkpoint."""
    children = sorted(
        ((int(m[1]), p) for p in root.iterdir() if (m := CHECKPOINT_DIR.fullmatch(p.name)) and p.is_dir()),
        key=lambda sp: sp[0],
    )
    if not children:
        match = CHECKPOINT_DIR.fullmatch(root.name)
        run_state = _read_state(root.parent / "trainer_state.json") if match else None
        ckpt = describe(root, base_model)
        _training_state(ckpt, int(match[1]) if match else None, run_state)
        if ckpt.error == NO_WEIGHTS:
            ckpt.error += NO_CHECKPOINT_DIRS
        return False, [ckpt]
    run_state = _read_state(root / "trainer_state.json")
    found = []
    for step, folder in children:
        ckpt = describe(folder, base_model)
        _training_state(ckpt, step, run_state)
        found.append(ckpt)
    if any((root / m).is_file() for m in _ROOT_MARKERS) or any(root.glob("model-*-of-*.safetensors")):
        final = describe(root, base_model)
        _training_state(final, None, None)
        final.notes.append("final model at the run root")
        found.append(final)
    log.debug("%s: Trainer run with %d checkpoints", root, len(found))
    return True, found


@dataclass
class Run:
    """One training trajectory: its checkpoints in training order, and the folder that holds them.

    ``path`` is the run folder (a Trainer ``output_dir``); per-run files such as the training
    data a run was trained on (``--data-per-run``) are looked up there.
    """

    name: str
    path: Path
    checkpoints: list[Checkpoint]


_MAX_SWEEP_DEPTH = 3


def _has_weights(folder: Path) -> bool:
    return any((folder / m).is_file() for m in _ROOT_MARKERS) or any(folder.glob("model-*-of-*.safetensors"))


def _is_run_dir(folder: Path) -> bool:
    try:
        return _has_weights(folder) or any(CHECKPOINT_DIR.fullmatch(p.name) and p.is_dir() for p in folder.iterdir())
    except OSError:
        return False


def _sweep_runs(root: Path, depth: int = 1) -> list[Path]:
    """Run folders below ``root`` (not ``root`` itself), by name, at most ``_MAX_SWEEP_DEPTH`` levels down."""
    found: list[Path] = []
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return found
    for child in children:
        if _is_run_dir(child):
            found.append(child)
        elif depth < _MAX_SWEEP_DEPTH:
            found.extend(_sweep_runs(child, depth + 1))
    return found


def _unique_names(paths: list[Path]) -> list[str]:
    """Folder names, with parent folders prepended (``a/run``) where two runs would share a name."""
    parts = [p.parts for p in paths]
    depth = [1] * len(paths)
    while True:
        names = ["/".join(pp[-d:]) for pp, d in zip(parts, depth)]
        clash = {n for n in names if names.count(n) > 1}
        grow = [i for i, n in enumerate(names) if n in clash and depth[i] < len(parts[i])]
        if not grow:
            return names
        for i in grow:
            depth[i] += 1


def discover_runs(paths: str | os.PathLike | Iterable[str | os.PathLike], base_model: str | None = None) -> list[Run]:
    """The runs under ``paths`` (see the module docstring for the rules), each in training order.

    ``base_model`` overrides every adapter's ``base_model_name_or_path`` (a local folder is
    made absolute; anything else is kept as a hub id). Raises :class:`CheckpointError` only
    for a path that does not exist or is not a folder; broken checkpoints are returned with
    ``kind="error"``.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    roots = [Path(os.path.abspath(os.path.expanduser(p))) for p in paths]
    if not roots:
        raise CheckpointError("no checkpoint paths given")
    for root in roots:
        if not root.exists():
            raise CheckpointError(f"{root}: no such file or directory")
        if not root.is_dir():
            raise CheckpointError(f"{root}: not a folder; pass the checkpoint folder ({root.parent})")
    if base_model is not None and Path(base_model).expanduser().is_dir():
        base_model = os.path.abspath(os.path.expanduser(base_model))

    # (run folder, its checkpoints, whether the run is a whole folder) in the order given.
    groups: dict[Path, tuple[list[Checkpoint], bool]] = {}
    seen: set[Path] = set()

    def add(run_dir: Path, found: list[Checkpoint], whole: bool) -> None:
        for ckpt in found:
            if (key := ckpt.path.resolve()) not in seen:
                seen.add(key)
                groups.setdefault(run_dir, ([], whole))[0].append(ckpt)

    for root in roots:
        is_run, found = _expand(root, base_model)
        if is_run:
            add(root, found, True)
            continue
        sweep = _sweep_runs(root) if found[0].error and found[0].error.startswith(NO_WEIGHTS) else []
        if sweep:
            for run_dir in sweep:
                add(run_dir, _expand(run_dir, base_model)[1], True)
        elif _STEP_IN_NAME.fullmatch(root.name):  # checkpoint-N, step_N...: a checkpoint of the run that holds it
            add(root.parent, found, False)
        else:  # one model folder: a run of its own
            add(root, found, True)

    runs = []
    names = _unique_names(list(groups))
    sweep_names = {}
    for root in roots:  # a sweep's runs are named by their path below the sweep folder
        for run_dir in groups:
            if run_dir != root and root in run_dir.parents and run_dir not in sweep_names:
                sweep_names[run_dir] = run_dir.relative_to(root).as_posix()
    if len(set(sweep_names.values())) == len(sweep_names):
        names = [sweep_names.get(d, n) for d, n in zip(groups, names)]
    if len(set(names)) != len(names):
        names = _unique_names(list(groups))
    for (run_dir, (found, whole)), name in zip(groups.items(), names):
        if not whole and all(c.step is not None for c in found):
            found.sort(key=lambda c: c.step)
        for ckpt in found:
            ckpt.run = name
        runs.append(Run(name, run_dir, found))
    return runs


def discover(paths: str | os.PathLike | Iterable[str | os.PathLike], base_model: str | None = None) -> list[Checkpoint]:
    """Every run's checkpoints under ``paths``, run after run, each run in training order
    (:func:`discover_runs`; ``Checkpoint.run`` says which run each belongs to)."""
    return [ckpt for run in discover_runs(paths, base_model) for ckpt in run.checkpoints]


# --- fingerprint ----------------------------------------------------------------------------

FINGERPRINT_SCHEME = b"ckptsel-fingerprint/1"
WHOLE_LIMIT = 64 * 2**20   # checkpoints with at most this many weight bytes are hashed byte for byte
_WINDOW = 4096             # otherwise: bytes sampled at the start, middle and end of each tensor
_META_FILES = ("config.json", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "tokenizer.model")
# JSON keys that record where or with what a file was written, not what the model is.
_VOLATILE_KEYS = {"_name_or_path", "name_or_path", "transformers_version", "peft_version",
                  "base_model_name_or_path"}


def _feed(h, label: str, data: bytes) -> None:
    h.update(f"{label}\0{len(data)}\0".encode())
    h.update(data)


def _windows(begin: int, end: int, whole: bool) -> list[tuple[int, int]]:
    """(offset, length) pieces of the byte span begin..end to hash."""
    if whole:
        return [(begin, end - begin)]
    mid = max(begin, (begin + end - _WINDOW) // 2)
    return [(o, min(_WINDOW, end - o)) for o in sorted({begin, mid, max(begin, end - _WINDOW)})]


def _hash_safetensors(h, files: list[Path]) -> None:
    """Hash tensors by name, so the same weights sharded differently hash the same."""
    headers = {f: read_safetensors_header(f) for f in files}
    whole = sum(hd.file_size - hd.data_start for hd in headers.values()) <= WHOLE_LIMIT
    tensors = sorted((name, f, t) for f, hd in headers.items() for name, t in hd.tensors.items())
    fds = {f: os.open(f, os.O_RDONLY) for f in files}
    try:
        for name, f, t in tensors:
            _feed(h, "tensor", f"{name}:{t.dtype}:{list(t.shape)}".encode())
            for offset, length in _windows(t.begin, t.end, whole):
                h.update(os.pread(fds[f], length, headers[f].data_start + offset))
    finally:
        for fd in fds.values():
            os.close(fd)


def _hash_pickle(h, files: list[Path]) -> None:
    """Pickle files have no tensor map: hash them whole when small, else in 64 even windows."""
    sizes = {f: f.stat().st_size for f in files}
    whole = sum(sizes.values()) <= WHOLE_LIMIT
    for f in sorted(files, key=lambda p: p.name):
        _feed(h, "file", f"{f.name}:{sizes[f]}".encode())
        spans = [(0, sizes[f])] if whole else [(i * sizes[f] // 64, (i + 1) * sizes[f] // 64) for i in range(64)]
        with open(f, "rb") as fh:
            for begin, end in spans:
                for offset, length in _windows(begin, end, whole):
                    h.update(os.pread(fh.fileno(), length, offset))


def _canonical(path: Path) -> bytes:
    if path.suffix != ".json":
        return path.read_bytes()
    try:
        obj = json.loads(path.read_bytes())
    except ValueError:
        return path.read_bytes()
    if isinstance(obj, dict):
        obj = {k: v for k, v in obj.items() if k not in _VOLATILE_KEYS}
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@functools.lru_cache(maxsize=64)
def _folder_fingerprint(folder: str, stamp: tuple) -> str:
    """Fingerprint of a base-model folder; ``stamp`` (names, sizes, mtimes) keys the cache."""
    base = describe(Path(folder))
    if base.kind == "error":
        raise CheckpointError(f"base model {folder}: {base.error}")
    return fingerprint(base)


def _base_identity(base_model: str) -> bytes:
    folder = Path(base_model)
    if not folder.is_dir():
        return f"id:{base_model}".encode()
    stamp = tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(folder) if e.is_file()))
    return _folder_fingerprint(str(folder.resolve()), stamp).encode()


def fingerprint(ckpt: Checkpoint) -> str:
    """A content hash (sha256 hex) that keys a checkpoint's results in the store.

    Hashed: every tensor's name, dtype, shape and bytes (by name, so resharding does not
    change it); the model, adapter and tokenizer configs without the keys that only record
    where or with which version a file was written; for an adapter, the base model's own
    fingerprint (a local folder) or its hub id. Not hashed: paths and mtimes, so a copied
    or moved checkpoint keeps its fingerprint.

    Trade-off: checkpoints with up to ``WHOLE_LIMIT`` (64 MiB) of weights (LoRA adapters,
    test models) are hashed byte for byte, so any change is seen. Hashing a 15 GB model
    whole would cost tens of seconds per checkpoint per run, so larger ones are sampled:
    three 4 KiB windows (start, middle, end) of every tensor. Fine-tuning, merging or
    re-initialising changes essentially every element of a tensor it touches, so that is
    caught; an edit confined to a few unsampled elements of one tensor is not. Pickle files
    have no tensor map and are sampled in 64 evenly spaced windows per file.
    """
    if ckpt.kind == "error":
        raise CheckpointError(f"{ckpt.path}: cannot fingerprint a broken checkpoint ({ckpt.error})")
    h = hashlib.sha256(FINGERPRINT_SCHEME)
    _feed(h, "kind", ckpt.kind.encode())
    (_hash_safetensors if ckpt.weight_format == "safetensors" else _hash_pickle)(h, ckpt.weight_files)
    for name in _META_FILES:
        if (ckpt.path / name).is_file():
            _feed(h, name, _canonical(ckpt.path / name))
    if ckpt.kind == "adapter" and ckpt.base_model:
        _feed(h, "base", _base_identity(ckpt.base_model))
    return h.hexdigest()
