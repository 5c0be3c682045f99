"""Atomic output: a merge is built in a temporary folder beside the target and renamed into place.

A crash or ``kill -9`` at any moment leaves either no target (first write) or the old target
untouched (``--force``), never a half-written one. Temporary folders are named
``.<target>.ckptsel-partial-<pid>-<token>`` so they are recognisable; the next merge into the
same parent folder removes those whose process is gone.

Replacing an existing target (``--force``) swaps the two folders with one
``renameat2(RENAME_EXCHANGE)`` call on Linux, so there is no moment without a complete
target; then the old one is deleted. Where the kernel or filesystem cannot exchange, the old
target is first renamed to ``.<target>.ckptsel-replaced-<pid>-<token>``; if the process dies
before the new one is in place, the next run puts the old one back.

Free disk space is checked before anything is written, from the plan's size estimate.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import secrets
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from ckptsel.errors import CkptselError

log = logging.getLogger(__name__)

# Files a merged model carries over from an input: the tokenizer and the generation config.
CARRIED_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.ckptsel-(?P<what>partial|replaced)-(?P<pid>\d+)-[0-9a-f]{8}$")
_MARGIN = 1.05          # free space needed, relative to the estimate
_SLACK = 16 * 2**20     # plus configs, tokenizer and card


def leftover_name(target: Path, what: str) -> Path:
    """A recognisable sibling of ``target`` for a partial build or a replaced target."""
    return target.parent / f".{target.name}.ckptsel-{what}-{os.getpid()}-{secrets.token_hex(4)}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clean_leftovers(parent: Path) -> list[Path]:
    """Remove partial builds of dead processes in ``parent``; restore a replaced target whose
    replacement never arrived. Returns the paths dealt with."""
    handled = []
    if not parent.is_dir():
        return handled
    for entry in parent.iterdir():
        m = _LEFTOVER.match(entry.name)
        if m is None or not entry.is_dir() or _alive(int(m["pid"])):
            continue
        target = parent / m["name"]
        if m["what"] == "replaced" and not target.exists():
            entry.rename(target)
            log.warning("restored %s from an interrupted replacement", target)
        else:
            shutil.rmtree(entry, ignore_errors=True)
            log.info("removed leftover %s", entry.name)
        handled.append(entry)
    return handled


def check_free_space(folder: Path, needed: int) -> None:
    """Raise a one-line error if ``folder``'s filesystem has less room than the estimate."""
    free = shutil.disk_usage(folder).free
    want = int(needed * _MARGIN) + _SLACK
    if free < want:
        raise CkptselError(f"{folder}: not enough free disk space for the merge "
                           f"(need about {want / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free)")


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _publish(built: Path, target: Path) -> None:
    """Move ``built`` to ``target``, replacing an existing target."""
    if not target.exists():
        built.rename(target)
    elif _exchange(built, target):
        shutil.rmtree(built)  # `built` now holds the old target
    else:
        old = leftover_name(target, "replaced")
        target.rename(old)
        built.rename(target)
        shutil.rmtree(old)


def check_target(target: Path, force: bool) -> None:
    """Refuse an existing target unless ``force`` (and anything that is not a folder)."""
    if target.exists() and not target.is_dir():
        raise CkptselError(f"{target}: exists and is not a folder")
    if target.exists() and not force:
        raise CkptselError(f"{target}: already exists; pass --force to replace it")


@contextlib.contextmanager
def staged(target: Path, *, force: bool = False, needed_bytes: int = 0) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; on normal exit it becomes ``target``.

    Refuses an existing target unless ``force``. On an exception the temporary folder is
    removed and ``target`` is left as it was.
    """
    from ckptsel.outputs import write_errors

    target = Path(os.path.abspath(target))
    check_target(target, force)
    with write_errors(target):  # a full disk or a read-only folder: one line, the partial folder removed
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(target.parent)
        check_free_space(target.parent, needed_bytes)
        tmp = leftover_name(target, "partial")
        tmp.mkdir()
        try:
            yield tmp
            _publish(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def copy_files(src: Path, dst: Path, names: Iterable[str]) -> list[str]:
    """Copy the named files that exist in ``src`` to ``dst``; returns the names copied."""
    copied = []
    for name in names:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied
