"""Workers as Ray tasks, on many GPUs and nodes (``--ray``): an :class:`~ckptsel.execution.base.Executor`.

Each item handed to :meth:`RayExecutor.map` is one Ray task holding one GPU (``num_gpus=1``)
on GPU machines, or ``--ray-cpus`` CPUs elsewhere, with torch on that many threads. Tasks
return what the worker returns; the caller (this process) alone writes the result store, so
the store can live on the driver's local disk. The checkpoints must be readable at the same
path on every node (a shared filesystem), and ckptsel importable there.

Faults: a worker that dies mid-task (killed, out of memory, a node lost) is retried by Ray
(``max_retries``); nothing of its partial work reaches the caller, so there are no partial or
duplicate records. When Ray itself cannot go on (the head node or this machine's raylet gone,
the retries spent) the run stops with one line: what came back before is stored, so a rerun
measures only the rest.

Without ray installed, ``--ray`` is a one-line error saying what to install.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ckptsel.errors import CkptselError

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)

INSTALL = "pip install 'ckptsel[ray]'"
MAX_RETRIES = 3  # Ray's default for tasks; a worker killed mid-task is re-run this many times


def require_ray():
    """The ``ray`` module, or a one-line :class:`CkptselError` saying what to install."""
    try:
        import ray
    except ImportError:
        raise CkptselError(f"--ray needs Ray, which is not installed: {INSTALL}") from None
    return ray


@dataclass
class RayExecutor:
    """Where Ray tasks run. ``address``: ``None``/"local" starts a local Ray on this machine;
    "auto" or ``HOST:PORT`` (or ``ray://HOST:PORT``) joins an existing cluster. Each task asks for
    ``gpus`` GPUs (default: 1 when the cluster has GPUs) and ``cpus`` CPUs, and runs torch with
    ``cpus`` threads."""

    address: str | None = None
    cpus: int = 1
    gpus: float | None = None
    in_process = False
    _task: object = field(default=None, init=False, repr=False)

    def __enter__(self) -> Self:
        if self._task is not None:  # entered already: one executor shared by a sweep's runs
            return self
        ray = require_ray()
        if not ray.is_initialized():
            address = None if self.address in (None, "local") else self.address
            kwargs = {"address": address, "log_to_driver": False, "configure_logging": False}
            if address is None:
                kwargs.update(include_dashboard=False)
            try:
                ray.init(**kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = "" if address is None else f" {address}"
                raise CkptselError(f"--ray{where}: cannot start or reach Ray ({str(exc).splitlines()[0]})") from None
        if self.gpus is None:
            self.gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        self._task = ray.remote(max_retries=MAX_RETRIES, retry_exceptions=False)(_run)
        return self

    def __exit__(self, *exc) -> None:
        """Ray stays up for the next run of a sweep (it shuts down with the process)."""

    @property
    def slots(self) -> int:
        """How many tasks the cluster runs at once with these requests."""
        resources = require_ray().cluster_resources()
        by_cpu = int(resources.get("CPU", 1) // max(self.cpus, 1))
        by_gpu = int(resources.get("GPU", 0) // self.gpus) if self.gpus else by_cpu
        return max(1, min(by_cpu, by_gpu))

    def map(self, fn: Callable, items: Sequence, *args) -> Iterator[tuple[int, object]]:
        """One task per item, all submitted now; ``(position, result)`` pairs as the tasks finish.

        The tasks carry ``fn``'s name, so a worker process reads ``ray::<fn>`` in ``ps``."""
        if self._task is None:
            raise RuntimeError("RayExecutor.map outside 'with executor:'")
        task = self._task.options(name=fn.__name__, num_cpus=self.cpus, num_gpus=self.gpus)
        refs = {task.remote(fn, self.cpus, item, *args): position for position, item in enumerate(items)}
        return ((refs[ref], answer) for ref, answer in self._wait(list(refs)))

    def _wait(self, refs: list):
        """(reference, result) pairs as the tasks finish.

        A task whose worker or node died is retried by Ray; when Ray itself cannot go on (the head
        node or this machine's raylet is gone, the retries are spent) the run stops with one line:
        every result that came back before is in the store, so a rerun measures only the rest."""
        ray = require_ray()
        pending = list(refs)
        while pending:
            try:
                done, pending = ray.wait(pending, num_returns=1)
                answer = ray.get(done[0])
            except ray.exceptions.RayTaskError:
                raise  # an exception inside ckptsel's own task code: a bug, reported as one
            except ray.exceptions.RayError as exc:
                log.debug("Ray failed", exc_info=True)
                first = (str(exc).strip().splitlines() or [""])[0]
                raise CkptselError(f"--ray: the Ray cluster failed mid-run ({type(exc).__name__}: {first}); what was "
                                   "measured before is kept in the result store: rerun the same command to measure "
                                   "only the rest") from None
            yield done[0], answer


def _run(fn: Callable, threads: int, item, *args):
    """In a Ray worker: ``fn(item, *args)`` with torch on ``threads`` threads."""
    import torch

    torch.set_num_threads(max(1, threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return fn(item, *args)
