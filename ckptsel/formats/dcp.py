"""Reading ``torch.distributed.checkpoint`` (DCP) folders: ``.metadata`` plus ``__R_I.distcp`` shards.

DCP is what FSDP writes with ``SHARDED_STATE_DICT`` (accelerate and the Trainer: ``{"model": state_dict}``
in ``pytorch_model_fsdp_0/``), and what ``torch.distributed.checkpoint.save`` writes anywhere. The
``.metadata`` file is a pickle of torch's metadata classes; the shards hold each tensor chunk as a
small ``torch.save`` archive at an offset the metadata records.

Safety: ``.metadata`` is never handed to ``pickle.load``. :func:`read_metadata` unpickles it with an
allowlist of the classes DCP writes there (dataclasses, ``torch.Size``, dtypes, a path); anything
else is refused with one line. For listing, those classes are replaced by plain records, so
``ckptsel ls`` neither imports torch nor runs code from the file; for loading, the real classes are
used and torch reads every tensor chunk with ``weights_only=True``. No pickle flag is needed.

:func:`tensors` gives each tensor's name, shape and dtype without reading a shard, :func:`check_files`
that every chunk's byte span lies inside its shard (a missing or torn ``.distcp`` is named before any
load), and :func:`convert` writes the tensors as safetensors shards, reading one shard's worth of
tensors at a time so the peak memory stays near the largest output shard.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import pickle
import warnings
from pathlib import Path
from typing import Any, NamedTuple

from ckptsel.errors import CheckpointError

METADATA = ".metadata"
SHARD_GLOB = "*.distcp"
# Prefixes that wrappers add to parameter names (torch.compile, FSDP1 and activation checkpointing wrappers).
WRAPPER_PREFIXES = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
MAX_SHARD_BYTES = 2 * 2**30

# What a DCP metadata pickle may refer to (torch 2.x writes these): module -> names.
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed._shard.sharded_tensor.metadata": {"TensorProperties", "MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"LoadItemType", "WriteItemType"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size", "float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "int64", "int32",
              "int16", "int8", "uint8", "bool", "complex64", "complex128", "strided"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}
_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1,
             "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1, "complex64": 8, "complex128": 16}


class _Record:
    """A plain stand-in for one of DCP's metadata classes when listing: its pickled state as attributes."""

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args = args
        return obj

    def __init__(self, *args, **kwargs):
        self.args = args
        self.__dict__.update(kwargs)

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots) of a class with __slots__
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)


def _stand_in(module: str, name: str):
    """What a global becomes when listing: records for the dataclasses, plain values for the rest."""
    if module == "torch" and name == "Size":
        return lambda dims=(): tuple(dims)
    if module == "torch":
        return name                                  # a dtype or layout, by name
    if module == "torch.serialization":
        return lambda layout: str(layout)
    if module == "pathlib":
        return lambda *parts: "/".join(map(str, parts))
    if module == "collections":
        return dict
    if name in ("_MEM_FORMAT_ENCODING", "MEM_FORMAT_ENCODING", "LoadItemType", "WriteItemType"):
        return lambda value: value                   # enums, by value
    return type(name, (_Record,), {})


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, real: bool, where: str):
        super().__init__(file)
        self._real, self._where, self._seen = real, where, {}

    def find_class(self, module: str, name: str):
        if name not in _ALLOWED.get(module, ()):
            raise CheckpointError(f"{self._where}: refers to {module}.{name}, which DCP metadata does not hold; "
                                  "not read")
        if self._real:
            return getattr(importlib.import_module(module), name)
        return self._seen.setdefault((module, name), _stand_in(module, name))


def read_metadata(folder: Path, real: bool = False):
    """The folder's ``.metadata``: torch's ``Metadata`` (``real``) or a plain stand-in with the same attributes.
    :class:`CheckpointError` naming the file when it is missing or not DCP metadata."""
    path = folder / METADATA
    where = f"{folder.name}/{METADATA}"
    if not path.is_file():
        raise CheckpointError(f"{where}: missing (the save did not finish, or the folder is not a DCP checkpoint)")
    try:
        with open(path, "rb") as fh:
            metadata = _MetadataUnpickler(fh, real, where).load()
    except CheckpointError:
        raise
    except Exception as exc:  # truncated or foreign bytes: pickle raises many types
        raise CheckpointError(f"{where}: unreadable ({type(exc).__name__}: {str(exc)[:80]})") from None
    if not hasattr(metadata, "state_dict_metadata") or not hasattr(metadata, "storage_data"):
        raise CheckpointError(f"{where}: not DCP metadata")
    return metadata


class TensorMeta(NamedTuple):
    key: str                   # the name the checkpoint stores it under (e.g. "model.model.embed_tokens.weight")
    name: str                  # the model's parameter name ("model.embed_tokens.weight")
    shape: tuple[int, ...]
    dtype: str                 # torch-style name, e.g. "bfloat16"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ITEMSIZE.get(self.dtype, 4)


def tensors(metadata, prefix: str = "model.") -> list[TensorMeta]:
    """The model's tensors in the checkpoint, in stored order: those under ``prefix`` (accelerate and
    the Trainer save ``{"model": state_dict}``), or every tensor when none is; wrapper prefixes stripped."""
    found = []
    for key, md in metadata.state_dict_metadata.items():
        size = getattr(md, "size", None)
        if size is None:  # bytes (non-tensor) entries: optimizer steps, RNG states
            continue
        dtype = str(getattr(md.properties, "dtype", "float32")).removeprefix("torch.")
        found.append(TensorMeta(key, key, tuple(int(d) for d in size), dtype))
    if any(t.key.startswith(prefix) for t in found):
        found = [t._replace(name=t.key[len(prefix):]) for t in found if t.key.startswith(prefix)]
    return [t._replace(name=_unwrapped(t.name)) for t in found]


def _unwrapped(name: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def check_files(folder: Path, metadata) -> list[Path]:
    """The shard files the metadata names, each checked to hold the byte spans recorded for it."""
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        rel = str(getattr(info, "relative_path", ""))
        needed[rel] = max(needed.get(rel, 0), int(info.offset) + int(info.length))
    files = []
    for rel in sorted(needed):
        path = folder / rel
        if not path.is_file():
            raise CheckpointError(f"{folder.name}/{rel}: missing ({METADATA} names it; a rank's shard was not saved)")
        size = path.stat().st_size
        if size < needed[rel]:
            raise CheckpointError(f"{folder.name}/{rel}: truncated (its tensors need {needed[rel]} bytes, "
                                  f"the file holds {size})")
        files.append(path)
    return files


def convert(folder: Path, out: Path, *, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Write the model's tensors of the DCP ``folder`` as safetensors into ``out`` (``model.safetensors``, or
    numbered shards with ``model.safetensors.index.json``); returns the tensor names written.

    Tensors are read a shard's worth at a time (``torch.distributed.checkpoint.load`` into tensors
    allocated from the metadata, no process group), so the peak memory is about one output shard
    plus torch's read buffers, not the whole model.
    """
    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    metadata = read_metadata(folder, real=True)
    listed = tensors(metadata)
    groups: list[list[TensorMeta]] = [[]]
    size = 0
    for t in listed:
        if groups[-1] and size + t.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    names = [f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)]
    if len(groups) == 1:
        names = ["model.safetensors"]
    weight_map = {}
    for group, name in zip(groups, names):
        nested: dict[str, Any] = {}
        flat = {}
        for t in group:  # rebuild the nesting DCP flattened ("model" -> {...}) from the stored key
            tensor = torch.empty(t.shape, dtype=getattr(torch, t.dtype))
            *parents, leaf = _path(metadata, t.key)
            node = nested
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = tensor
            flat[t.name] = tensor
        try:
            with warnings.catch_warnings(), _dcp_logger_off():
                warnings.simplefilter("ignore", UserWarning)  # "assuming ... load in a single process": it is
                dcp.load(nested, storage_reader=_safe_reader(folder),
                         planner=DefaultLoadPlanner(allow_partial_load=True), no_dist=True)
        except CheckpointError:
            raise
        except (Exception, CheckpointException) as exc:  # a torn chunk fails inside torch.load with many types
            raise CheckpointError(f"{folder.name}: cannot read a tensor chunk ({_one_line(_cause(exc))})") from None
        save_file(flat, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(flat, name))
        del nested, flat
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in listed)}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [t.name for t in listed]


@contextlib.contextmanager
def _dcp_logger_off():
    """torch's DCP event logger logs a failed load with its traceback; the failure is reported as one line here."""
    import torch.distributed.checkpoint.logger as events

    logger = getattr(events, "_dcp_logger", None)
    disabled = getattr(logger, "disabled", None)
    if logger is not None:
        logger.disabled = True
    try:
        yield
    finally:
        if logger is not None:
            logger.disabled = disabled


def _path(metadata, key: str) -> tuple[str, ...]:
    """The nested path of a flattened key (``planner_data`` records it; a key without nesting is itself)."""
    mapping = getattr(metadata, "planner_data", None) or {}
    path = mapping.get(key)
    return tuple(str(p) for p in path) if path else (key,)


def _safe_reader(folder: Path):
    """torch's FileSystemReader, with ``.metadata`` read through the allowlist."""
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata = read_metadata(Path(self.path), real=True)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(folder)


def _cause(exc: BaseException) -> BaseException:
    """The first rank's own exception inside torch's CheckpointException (failures: rank -> (exception, trace))."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        inner = first[0] if isinstance(first, tuple) and first else first
        if isinstance(inner, BaseException):
            return inner
    return exc


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:120] if text else ''}".rstrip(": ")
