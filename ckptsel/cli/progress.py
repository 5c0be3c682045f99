"""Progress display for the measurement loop (stderr; silent with --quiet)."""

from __future__ import annotations

import threading


class CollectProgress:
    """Two bars: checkpoints done, and the current checkpoint's phase (load, score, sample...)."""

    def __init__(self, console, n_checkpoints: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("{task.description:<28}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=console.quiet,
        )
        self._overall = self._progress.add_task("checkpoints", total=n_checkpoints)
        self._phase = self._progress.add_task("", total=1, visible=False)
        self._seen: set[int] = set()
        self._lock = threading.Lock()  # a sweep's runs on Ray report from one thread each

    def __enter__(self):
        self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        self._progress.__exit__(*exc)

    def update(self, event) -> None:
        with self._lock:
            self._update(event)

    def _update(self, event) -> None:
        name = event.checkpoint.path.name
        label = {"load": "loading", "cached": "cached", "done": "measured"}.get(event.phase, event.phase)
        self._progress.update(
            self._phase, description=f"{name}: {label}", completed=event.done, total=max(event.total, 1), visible=True
        )
        if event.index not in self._seen:
            self._seen.add(event.index)
            self._progress.update(self._overall, completed=len(self._seen) - 1)
        if event.phase in ("cached", "done"):  # done: a Ray task's results arrived
            self._progress.update(self._overall, completed=len(self._seen))
