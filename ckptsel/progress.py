"""Progress of the measurement loops, as events: the library reports, the CLI draws (ckptsel.cli.progress)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ckptsel.discover import Checkpoint


@dataclass(frozen=True)
class Progress:
    """One step of progress, for the CLI's bar: ``done`` of ``total`` work units in a phase."""

    checkpoint: Checkpoint
    index: int  # position of the checkpoint in the run
    phase: str  # "load", a measurement kind, "lm-eval", "done" or "cached"
    done: int
    total: int


ProgressFn = Callable[[Progress], None]


def emit(callback: ProgressFn | None, ckpt: Checkpoint, index: int, phase: str, done: int, total: int) -> None:
    """Send one :class:`Progress` event to ``callback`` (nothing without one)."""
    if callback is not None:
        callback(Progress(ckpt, index, phase, done, total))
