"""Where the measurement runs: an :class:`Executor` handed to the code that measures.

``base``  the :class:`Executor` interface and :class:`InProcessExecutor`, the default
``ray``   :class:`~ckptsel.execution.ray.RayExecutor`: workers as Ray tasks (``--ray``)

:func:`executor_for` is the one place that turns the engine settings into an executor; the
pipeline and the CLI call it, and everything below takes the executor it is given
(ckptsel/DESIGN.md, "Adding an execution backend").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ckptsel.execution.base import Executor, InProcessExecutor

if TYPE_CHECKING:
    from ckptsel.settings import EngineSettings

__all__ = ["Executor", "InProcessExecutor", "executor_for"]


def executor_for(engine: EngineSettings) -> Executor:
    """The executor ``engine`` asks for: Ray tasks when ``engine.ray`` is set, else this process.

    Nothing is started here: a backend starts when the executor is entered (``with executor:``).
    """
    if engine.ray is not None:
        from ckptsel.execution.ray import RayExecutor

        return RayExecutor(engine.ray, engine.ray_cpus)
    return InProcessExecutor()
