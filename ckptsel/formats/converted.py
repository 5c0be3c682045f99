"""Converted copies: checkpoints that transformers cannot read as they lie, converted once into the cache.

An FSDP ``torch.distributed.checkpoint`` folder, DeepSpeed ZeRO shards or an FSDP full-state ``.bin``
without a ``config.json`` are converted into an ordinary Hugging Face model folder (``config.json``,
safetensors weights, the tokenizer files) the first time a command needs the weights; every load,
merge and verify after that reads the copy. Nothing is written into the user's folders.

* **Where.** ``<cache dir>/converted/<fingerprint>/``: the cache dir is ``--cache-dir``, else
  ``$CKPTSEL_CACHE``, else the user's cache dir (:func:`default_cache_dir`, the result store's too);
  the fingerprint is the checkpoint's content fingerprint, the result store's key for it
  (:func:`content_fingerprint`), so a moved checkpoint finds its copy and a changed one does not.
* **Once.** A second rank finds the copy and converts nothing. Processes that need the same copy at
  once (Ray workers sharing the cache folder) take a lock file beside it: one converts, the others
  wait and read its result.
* **Atomic.** A conversion writes into a hidden temporary folder beside its target and renames it
  into place when complete; a failed conversion removes it, so the cache never holds a partial copy
  under a fingerprint. A killed one leaves a ``.tmp-`` folder that the next conversion of that
  checkpoint, and ``ckptsel cache clear``, remove.
* **Accounted.** :func:`usage` says how many copies there are and how much disk they hold,
  :func:`clear` removes them (``ckptsel cache``).

Each copy carries ``ckptsel_converted.json``: the source folder, its format, how long the conversion
took and the copy's size.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ckptsel.errors import CheckpointError
from ckptsel.formats.hashing import FINGERPRINT_SCHEME

log = logging.getLogger(__name__)

CONVERTED = "converted"           # the folder of converted copies inside the cache dir
PROVENANCE = "ckptsel_converted.json"
_TMP = ".tmp-"
_LOCK = ".lock"


def default_cache_dir() -> Path:
    """``$CKPTSEL_CACHE`` when set, else the platform's user cache dir for ckptsel."""
    env = os.environ.get("CKPTSEL_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("ckptsel"))


def converted_root(cache_dir: str | os.PathLike | None) -> Path:
    """The folder holding converted copies for ``cache_dir`` (None: the default cache dir)."""
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return base / CONVERTED


def content_fingerprint(ckpt) -> str:
    """The checkpoint's content fingerprint, as :func:`ckptsel.discover.fingerprint` computes it for a
    full (non-adapter) checkpoint: the store's key, and the name of its converted copy."""
    h = hashlib.sha256(FINGERPRINT_SCHEME)
    ckpt.format.fingerprint(ckpt, h)
    return h.hexdigest()


def converted_copy(ckpt, cache_dir, convert: Callable[[Path], None], *, what: str) -> Path:
    """The converted copy of ``ckpt``, made by ``convert(folder)`` (which fills the empty ``folder``)
    when the cache does not hold it yet. ``what`` names the conversion in logs and provenance.

    Raises :class:`CheckpointError` (one line naming the checkpoint) when the conversion fails or the
    cache cannot be written; nothing of a failed conversion stays in the cache.
    """
    root = converted_root(cache_dir)
    key = content_fingerprint(ckpt)
    target = root / key
    if target.is_dir():
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"converted copies: cannot create {root}: {exc.strerror}") from None
    lock = root / f"{key}{_LOCK}"
    with _locked(lock):
        if target.is_dir():  # converted by another process while this one waited
            lock.unlink(missing_ok=True)
            return target
        for stale in root.glob(f".{key}{_TMP}*"):  # left by a killed conversion: this process holds the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f".{key}{_TMP}{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        started = time.perf_counter()
        try:
            log.info("%s: converting (%s) into %s", ckpt.path, what, target)
            with _quiet():  # conversion libraries print their progress; the command reports its own
                convert(tmp)
            size = folder_size(tmp)
            provenance = {"source": str(ckpt.path), "format": ckpt.format.name, "conversion": what,
                          "seconds": round(time.perf_counter() - started, 3), "bytes": size,
                          "converted": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
            try:
                os.rename(tmp, target)  # atomic: the copy appears complete or not at all
            except OSError as exc:
                # Made meanwhile by a process the lock did not hold off (a filesystem whose locks are per
                # node): that copy stands, this one goes.
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not target.is_dir():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
            lock.unlink(missing_ok=True)  # held: a process waiting on it sees it gone, locks afresh, finds the copy
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            lock.unlink(missing_ok=True)  # held: nothing of this attempt stays in the cache
            if isinstance(exc, CheckpointError):
                raise
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
                raise CheckpointError(f"{ckpt.path}: cannot write its converted copy into {root}: "
                                      f"{exc.strerror}") from None
            raise
    log.info("%s: converted in %.1f s", ckpt.path, time.perf_counter() - started)
    return target


@contextlib.contextmanager
def env_set(name: str, value: str) -> Iterator[None]:
    """The environment variable ``name`` set to ``value`` for the block, then as it was (unset included)."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Nothing on stdout (the command's: ``--json``) and no tqdm bars from the libraries a conversion calls."""
    with env_set("TQDM_DISABLE", "1"), open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        yield


@contextlib.contextmanager
def _locked(path: Path, wait: bool = True) -> Iterator[bool]:
    """An exclusive lock on the file ``path`` (created if missing) for the block: one conversion per copy.
    Yields False (without the lock) when ``wait`` is False and another process holds it. The lock file
    may be removed by its holder (:func:`clear`), so the lock taken is checked to be on the file that is
    there now."""
    import fcntl

    while True:
        fh = open(path, "a")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            fh.close()
            yield False
            return
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fh.fileno()).st_ino:
            break
        fh.close()  # removed or replaced while this process waited: lock the file that is there now
    try:
        yield True
    finally:
        fh.close()  # closing releases the lock


def folder_size(folder: Path) -> int:
    """Bytes of the files under ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# --- what the cache holds --------------------------------------------------------------------------


@dataclass(frozen=True)
class Copy:
    """One converted copy in the cache."""

    path: Path
    bytes: int
    source: str | None        # the checkpoint it was converted from (as last converted)
    format: str | None
    partial: bool = False     # a temporary folder left by a killed conversion

    def to_dict(self) -> dict:
        return {"path": str(self.path), "bytes": self.bytes, "source": self.source, "format": self.format,
                "partial": self.partial}


def usage(cache_dir=None) -> list[Copy]:
    """The converted copies under ``cache_dir`` (None: the default), partial ones included, by path."""
    root = converted_root(cache_dir)
    if not root.is_dir():
        return []
    copies = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        partial = folder.name.startswith(".") and _TMP in folder.name
        source = fmt = None
        if not partial and (folder / PROVENANCE).is_file():
            with contextlib.suppress(OSError, ValueError):
                meta = json.loads((folder / PROVENANCE).read_text())
                source, fmt = meta.get("source"), meta.get("format")
        copies.append(Copy(folder, folder_size(folder), source, fmt, partial))
    return copies


def clear(cache_dir=None) -> tuple[int, int]:
    """Remove every converted copy (and leftover of a killed conversion) under ``cache_dir``;
    returns (copies removed, bytes freed). A copy being written by a running conversion is
    left alone (its lock is held)."""
    root = converted_root(cache_dir)
    removed = freed = 0
    for copy in usage(cache_dir):
        lock = root / f"{copy.path.name.lstrip('.').split(_TMP)[0]}{_LOCK}"
        with _locked(lock, wait=False) as held:
            if not held:
                continue  # being converted now
            shutil.rmtree(copy.path)
            removed, freed = removed + 1, freed + copy.bytes
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
    return removed, freed
