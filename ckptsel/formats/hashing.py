"""Content hashing for checkpoint fingerprints: tensors by name, pickle files in windows, configs without stamps.

:func:`ckptsel.discover.fingerprint` starts the hash (its scheme) and asks the checkpoint's format
to feed it (:meth:`~ckptsel.formats.base.CheckpointFormat.fingerprint`); the formats build on the
functions here. The bytes fed for a given checkpoint must never change: the result store keys
every result by them (``tests/test_formats.py`` pins a few).

Trade-off: checkpoints with up to ``WHOLE_LIMIT`` (64 MiB) of weights (LoRA adapters, test
models) are hashed byte for byte, so any change is seen. Hashing a 15 GB model whole would cost
tens of seconds per checkpoint per run, so larger ones are sampled: three 4 KiB windows (start,
middle, end) of every tensor. Fine-tuning, merging or re-initialising changes essentially every
element of a tensor it touches, so that is caught; an edit confined to a few unsampled elements
of one tensor is not. Pickle files have no tensor map and are sampled in 64 evenly spaced windows
per file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ckptsel.formats.files import read_safetensors_header

FINGERPRINT_SCHEME = b"ckptsel-fingerprint/1"  # the first bytes of every fingerprint's hash (ckptsel/discover.py)
WHOLE_LIMIT = 64 * 2**20   # checkpoints with at most this many weight bytes are hashed byte for byte
_WINDOW = 4096             # otherwise: bytes sampled at the start, middle and end of each tensor
META_FILES = ("config.json", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "tokenizer.model")
# JSON keys that record where or with what a file was written, not what the model is.
_VOLATILE_KEYS = {"_name_or_path", "name_or_path", "transformers_version", "peft_version",
                  "base_model_name_or_path"}


def feed(h, label: str, data: bytes) -> None:
    """Add one labelled, length-prefixed piece to the hash ``h``."""
    h.update(f"{label}\0{len(data)}\0".encode())
    h.update(data)


def _windows(begin: int, end: int, whole: bool) -> list[tuple[int, int]]:
    """(offset, length) pieces of the byte span begin..end to hash."""
    if whole:
        return [(begin, end - begin)]
    mid = max(begin, (begin + end - _WINDOW) // 2)
    return [(o, min(_WINDOW, end - o)) for o in sorted({begin, mid, max(begin, end - _WINDOW)})]


def hash_safetensors(h, files: list[Path]) -> None:
    """Hash tensors by name, so the same weights sharded differently hash the same."""
    headers = {f: read_safetensors_header(f) for f in files}
    whole = sum(hd.file_size - hd.data_start for hd in headers.values()) <= WHOLE_LIMIT
    tensors = sorted((name, f, t) for f, hd in headers.items() for name, t in hd.tensors.items())
    fds = {f: os.open(f, os.O_RDONLY) for f in files}
    try:
        for name, f, t in tensors:
            feed(h, "tensor", f"{name}:{t.dtype}:{list(t.shape)}".encode())
            for offset, length in _windows(t.begin, t.end, whole):
                h.update(os.pread(fds[f], length, headers[f].data_start + offset))
    finally:
        for fd in fds.values():
            os.close(fd)


def hash_files(h, files: list[Path]) -> None:
    """Files without a tensor map (pickles): hash them whole when small, else in 64 even windows."""
    sizes = {f: f.stat().st_size for f in files}
    whole = sum(sizes.values()) <= WHOLE_LIMIT
    for f in sorted(files, key=lambda p: p.name):
        feed(h, "file", f"{f.name}:{sizes[f]}".encode())
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


def hash_meta_files(h, folder: Path) -> None:
    """The model, adapter and tokenizer configs in ``folder``, without the keys that only record
    where or with which version a file was written."""
    for name in META_FILES:
        if (folder / name).is_file():
            feed(h, name, _canonical(folder / name))


def hash_checkpoint(h, kind: str, encoding: str, files: list[Path], folder: Path) -> None:
    """What a Hugging Face style folder's fingerprint holds: its kind, its weight files (safetensors
    by tensor, anything else as plain files) and the configs in ``folder``."""
    feed(h, "kind", kind.encode())
    (hash_safetensors if encoding == "safetensors" else hash_files)(h, files)
    hash_meta_files(h, folder)
