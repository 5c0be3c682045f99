"""Only ckptsel's own output on stdout, whatever the libraries it runs print.

Scripts read ``ckptsel rank --json`` and ``ckptsel gate --json`` from stdout, so a stray line
there breaks them. Ray is the library that writes there on its own: its driver thread that
listens for cluster errors prints messages such as a node's "Raylet is terminated" to
``sys.stdout`` (with colour codes), at any moment -- during the run, after a node died, at
shutdown. :func:`guard_stdout` therefore, for the duration of a command:

* replaces ``sys.stdout`` with a stream that passes the command's own writes (from the thread
  that runs the command) to stdout and sends every other thread's writes to stderr, where the
  user still sees them;
* when stdout is a real file descriptor (a terminal, a pipe, a file), also points descriptor 1
  at stderr, so output written below Python (native code, child processes that inherit it)
  lands on stderr too; the command writes to a private copy of the original descriptor;
* once the command has returned, sends everything to stderr: Ray shuts down at interpreter
  exit, on the main thread, after the command's output is complete.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading


class CommandStdout(io.TextIOBase):
    """``sys.stdout`` while a command runs: the owner thread's writes go to ``own``, others' to ``other``."""

    def __init__(self, own, other, owner: threading.Thread):
        super().__init__()
        self._own = own
        self._other = other
        self._owner = owner
        self.sealed = False

    def _target(self):
        if self.sealed or threading.current_thread() is not self._owner:
            return self._other
        return self._own

    def write(self, text: str) -> int:
        return self._target().write(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        for stream in (self._own, self._other):
            with contextlib.suppress(Exception):
                stream.flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self._own.isatty()

    def fileno(self) -> int:
        return self._own.fileno()

    @property
    def encoding(self):
        return getattr(self._own, "encoding", "utf-8")

    @property
    def errors(self):
        return getattr(self._own, "errors", "strict")

    @property
    def buffer(self):
        """Binary writers (click's ``echo`` of bytes) are the command's own output."""
        return self._own.buffer

    def seal(self) -> None:
        """The command is done: from now on every write goes to ``other`` (stderr)."""
        self.flush()
        self.sealed = True


def _real_stdout_fd() -> bool:
    """True when ``sys.stdout`` writes to descriptor 1 (not a test runner's buffer)."""
    try:
        return sys.stdout.fileno() == 1
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False


def guard_stdout() -> CommandStdout:
    """Install the guard for the command about to run on this thread; returns it (call ``seal`` after)."""
    current = sys.stdout
    if isinstance(current, CommandStdout):
        return current
    own = current
    if _real_stdout_fd():
        current.flush()
        private = os.dup(1)
        os.set_inheritable(private, False)
        os.dup2(2, 1)  # descriptor 1 (native code, inheriting children) now writes to stderr
        own = open(private, "w", buffering=1, encoding=current.encoding, errors=current.errors)  # noqa: SIM115
    guard = CommandStdout(own, sys.stderr, threading.current_thread())
    sys.stdout = guard
    return guard
