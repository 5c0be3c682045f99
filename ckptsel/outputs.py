"""Outputs: a folder is checked before any work, and a failed write is one line, not a traceback.

Every command that writes a file or folder (``merge -o``, ``merge --recommend -o``,
``report -o``, ``rank --export-examples``) calls :func:`check_writable` on its output before
it measures or merges anything, so an unwritable folder costs nothing. The writes themselves
are atomic (a temporary file or folder beside the output, then a rename: see
:mod:`ckptsel.merge.output`), and run inside :func:`write_errors`: a disk that fills up, a
file-size limit (``ulimit -f``), a read-only or forbidden folder become one
:class:`OutputError` naming the output (exit 2), with the temporary file already removed and
the inputs never touched.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ckptsel.errors import CkptselError

# errno -> what the user is told; these mean "this place cannot take the output", not a bug.
WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (a file-size limit, e.g. ulimit -f)",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
}
# The same failures as libraries word them without an errno (safetensors' Rust writer, mergekit).
_MESSAGES = {
    "no space left on device": errno.ENOSPC,
    "disk quota exceeded": errno.EDQUOT,
    "file too large": errno.EFBIG,
    "permission denied": errno.EACCES,
    "read-only file system": errno.EROFS,
}


class OutputError(CkptselError):
    """An output cannot be written there (no room, no permission, read-only)."""


def check_writable(path: str | os.PathLike, what: str = "output") -> None:
    """Raise :class:`OutputError` unless a file or folder can be created at ``path``.

    The nearest existing folder above ``path`` must accept a new file: that is tried (a
    probe file, removed at once), not read from permission bits, which root ignores and
    which say nothing of read-only mounts.
    """
    path = Path(os.path.abspath(path))
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{path}: cannot write the {what}: {parent} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ckptsel-write-test-", dir=parent)
    except OSError as exc:
        reason = WRITE_ERRNOS.get(exc.errno, exc.strerror or str(exc))
        raise OutputError(f"{path}: cannot write the {what} in {parent} ({reason})") from None
    os.close(fd)
    os.unlink(probe)


def write_failure(exc: BaseException, path: str | os.PathLike) -> OutputError | None:
    """The one-line error for a write to ``path`` that failed for lack of room or rights, else None.

    Looks through the exception's causes, and at the wording of errors that carry no errno.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        code = exc.errno if isinstance(exc, OSError) else None
        if code not in WRITE_ERRNOS:
            text = str(exc).lower()
            code = next((c for marker, c in _MESSAGES.items() if marker in text), None)
        if code in WRITE_ERRNOS:
            return OutputError(f"{path}: cannot write: {WRITE_ERRNOS[code]} (nothing was left behind)")
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def write_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn a write that failed for lack of room or rights into :func:`write_failure`'s one line.

    The caller removes its temporary output itself (before this sees the exception).
    """
    try:
        yield
    except OutputError:
        raise
    except Exception as exc:
        # A library error ckptsel rewords (mergekit's: MergeError) keeps the disk error as its cause.
        cause = exc.__cause__ if isinstance(exc, CkptselError) else exc
        failure = write_failure(cause, path) if cause is not None else None
        if failure is None:
            raise
        raise failure from None


def write_text_atomic(path: str | os.PathLike, text: str, mode: int = 0o644) -> Path:
    """Write ``text`` to ``path`` through a temporary file beside it; a failure leaves no file."""
    path = Path(path)
    with write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
                f.write(text)
            os.chmod(tmp, mode)  # mkstemp makes it private; outputs are meant to be shared
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path
