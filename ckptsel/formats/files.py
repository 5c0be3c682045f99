"""Reading checkpoint files without loading weights: safetensors headers, JSON configs, weight layouts.

Everything a format's ``detect`` and ``describe`` need to look at a folder: the 8-byte length +
JSON header of a safetensors file (never its tensor data), ``config.json`` fields (architecture,
dtype, mixture-of-experts counts), and the index / single file / numbered shards layouts that
Hugging Face folders use for their weights.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from ckptsel.errors import CheckpointError

# --- safetensors headers ----------------------------------------------------------------

# safetensors dtype code -> (torch-style name, bytes per element); codes not listed here
# (sub-byte packed formats) are accepted without the size check.
DTYPES = {
    "BOOL": ("bool", 1), "U8": ("uint8", 1), "I8": ("int8", 1),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "I16": ("int16", 2), "U16": ("uint16", 2), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I32": ("int32", 4), "U32": ("uint32", 4), "F32": ("float32", 4),
    "I64": ("int64", 8), "U64": ("uint64", 8), "F64": ("float64", 8), "C64": ("complex64", 8),
}
_ITEMSIZE = {code: size for code, (_, size) in DTYPES.items()}
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


def safetensors_totals(files: list[Path], weight_map: dict | None = None,
                       index_name: str = "model.safetensors.index.json") -> tuple[int, str | None]:
    """(parameter count, most common dtype as a torch-style name or None) over the files' headers,
    checking that every tensor the index puts in a shard is there."""
    headers = {f.name: read_safetensors_header(f) for f in files}
    for tensor, shard in (weight_map or {}).items():
        if tensor not in headers[shard].tensors:
            raise CheckpointError(f"{index_name} puts {tensor} in {shard}, which does not hold it")
    by_dtype: Counter[str] = Counter()
    for header in headers.values():
        by_dtype.update(header.params_by_dtype)
    if not by_dtype:
        return 0, None
    code = by_dtype.most_common(1)[0][0]
    return sum(by_dtype.values()), DTYPES.get(code, (code.lower(),))[0]


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


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; :class:`CheckpointError` naming the file when it is not one."""
    try:
        obj = json.loads(path.read_bytes())
    except ValueError as exc:
        raise CheckpointError(f"{path.name}: invalid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path.name}: expected a JSON object")
    return obj


def config_in(folder: Path | None) -> dict | None:
    """``folder/config.json`` as a dict, or None when there is none or it does not read as a JSON object."""
    if folder is None or not (folder / "config.json").is_file():
        return None
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def architecture(config: dict) -> str | None:
    archs = config.get("architectures")
    return archs[0] if isinstance(archs, list) and archs else config.get("model_type")


def config_dtype(config: dict) -> str | None:
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype if isinstance(dtype, str) else None


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# --- weight layouts ------------------------------------------------------------------------

_SHARD = re.compile(r"-(\d+)-of-(\d+)\.")


class Layout(NamedTuple):
    """How one format names its weight files: an index (JSON with a ``weight_map``), a single
    file, or numbered shards without an index; ``encoding`` is the files' ``weight_format``."""

    encoding: str                 # "safetensors" or "pickle"
    index: str | None
    single: str
    shards: str | None            # glob of unindexed shards, e.g. "model-*-of-*.safetensors"

    def present(self, folder: Path) -> bool:
        """Whether any of the layout's files is in ``folder`` (file names only)."""
        return ((self.index is not None and (folder / self.index).is_file()) or (folder / self.single).is_file()
                or (self.shards is not None and any(folder.glob(self.shards))))


class Weights(NamedTuple):
    encoding: str
    files: list[Path]
    weight_map: dict | None       # the index's tensor -> shard map, when there is an index
    index: str | None             # the index file's name, for messages


def find_weights(folder: Path, *layouts: Layout) -> Weights | None:
    """The weight files of the first layout present, checked for completeness (an index naming
    a missing shard, a gap in the numbered shards: :class:`CheckpointError`); None if none is present."""
    for layout in layouts:
        if layout.index and (folder / layout.index).is_file():
            weight_map = read_json(folder / layout.index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{layout.index}: no weight_map")
            for shard in sorted(set(weight_map.values())):
                if not (folder / shard).is_file():
                    raise CheckpointError(f"{layout.index} names {shard}, which is missing")
            return Weights(layout.encoding, [folder / s for s in sorted(set(weight_map.values()))], weight_map,
                           layout.index)
        if (folder / layout.single).is_file():
            return Weights(layout.encoding, [folder / layout.single], None, None)
        shards = sorted(folder.glob(layout.shards)) if layout.shards else []
        if shards:
            found = {int(m[1]): int(m[2]) for m in map(_SHARD.search, (s.name for s in shards)) if m}
            total = max(found.values(), default=0)
            missing = [k for k in range(1, total + 1) if found.get(k) != total]
            if missing or not found:
                raise CheckpointError(f"incomplete shards without an index: shard {missing[0] if missing else '?'} "
                                      f"of {total} is missing")
            return Weights(layout.encoding, shards, None, None)
    return None


# --- torch.save archives, read without running them ---------------------------------------------


class Inert:
    """What any class or function named in a pickle becomes when read by :func:`read_torch_pickle`: an
    object of a stand-in class named after it (``type(x).__name__``), holding the arguments it would have
    been called with (``args``) and the state pickle would have set (``state``); nothing runs."""

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"Inert({type(self).__name__}{self.args!r})"


class TensorRef(NamedTuple):
    """A tensor in a torch.save archive, by shape and dtype (its data never read)."""

    shape: tuple[int, ...]
    dtype: str


def read_torch_pickle(path: Path, max_bytes: int = 256 * 2**20):
    """The object a ``torch.save`` zip archive holds, read without running anything from it: every class
    or function the pickle names becomes an :class:`Inert` record, tensors become :class:`TensorRef`
    (shape, dtype), containers and plain values stay what they are. Only the archive's ``data.pkl``
    is read, never tensor data. :class:`CheckpointError` naming the file when it is not such an archive
    (torn, truncated, the legacy format)."""
    import io
    import pickle
    import zipfile

    class _Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) in (("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset")):
                return {"OrderedDict": _Dict, "set": set, "frozenset": frozenset}[name]
            if module == "torch._utils" and name.startswith("_rebuild_parameter"):
                return lambda data, *rest: data
            if module == "torch._utils" and name.startswith("_rebuild_tensor"):
                return lambda storage, offset, size, *rest: TensorRef(tuple(size), getattr(storage, "dtype", "?"))
            if module == "torch" and name == "Size":
                return lambda dims=(): tuple(dims)
            if module == "torch" and name.endswith("Storage"):
                return name.removesuffix("Storage").lower()
            return type(f"{module}.{name}", (Inert,), {})

        def persistent_load(self, pid):  # ('storage', storage_type, key, location, numel)
            kind = pid[1] if isinstance(pid, tuple) and len(pid) > 1 else None
            dtype = getattr(kind, "name", kind)
            return _Storage(str(dtype).rsplit(".", 1)[-1] if dtype is not None else "?")

    try:
        with zipfile.ZipFile(path) as archive:
            entry = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if entry is None:
                raise CheckpointError(f"{path.name}: not a torch.save archive (no data.pkl)")
            if archive.getinfo(entry).file_size > max_bytes:
                raise CheckpointError(f"{path.name}: data.pkl over {max_bytes} bytes")
            data = archive.read(entry)
    except zipfile.BadZipFile:
        raise CheckpointError(f"{path.name}: torn or truncated (not a complete torch.save archive)") from None
    try:
        return _Unpickler(io.BytesIO(data)).load()
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path.name}: unreadable pickle ({type(exc).__name__})") from None


class _Storage(NamedTuple):
    dtype: str


class _Dict(dict):
    """An OrderedDict read by :func:`read_torch_pickle`: a dict that ignores the state pickle may BUILD into it."""

    def __setstate__(self, state):
        pass
