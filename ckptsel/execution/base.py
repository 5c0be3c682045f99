"""The :class:`Executor` interface, and the in-process default.

The pattern is the standard library's ``concurrent.futures.Executor``: the code that measures
(:func:`ckptsel.collect.collect`, :func:`ckptsel.verify.run.verify_file`) hands a worker
function and its items to an executor and never asks which backend it got. The worker functions
live beside their callers; an executor only decides where they run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from typing_extensions import Self

T = TypeVar("T")
R = TypeVar("R")


class Executor(Protocol):
    """Runs a worker function over items, ``slots`` of them at a time.

    ``in_process``: the workers run in this process, one at a time, in the order given, each
    when the caller asks for the next result. A worker may then be a closure over this process's
    objects (a loaded model, the store), and the caller may act on one item's result (advance
    the alternative-solution harvest, ckptsel.proxies) before the next starts. Otherwise
    ``fn``, the items and ``args`` must pickle (``fn`` a module-level function), results come
    back in any order, and the caller orders what needs order (ckptsel.collect).

    Entering an executor may start its backend; entering it again (one executor shared by a
    sweep's runs) is a no-op, and ``slots`` is read only once it has been entered.
    """

    in_process: bool

    @property
    def slots(self) -> int:
        """How many workers run at once."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc) -> None: ...

    def map(self, fn: Callable[..., R], items: Sequence[T], *args) -> Iterator[tuple[int, R]]:
        """``fn(item, *args)`` for each of ``items``: ``(position in items, result)`` pairs as workers finish.

        A worker catches what belongs to one item (a checkpoint that fails to load) and returns
        it as that item's result; an exception out of ``fn`` is a bug, raised here. A backend
        that cannot go on (a cluster lost mid-run) raises :class:`ckptsel.errors.CkptselError`.
        """
        ...


class InProcessExecutor:
    """The default: every worker runs in this process, one after another, in the order given."""

    in_process = True
    slots = 1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def map(self, fn: Callable[..., R], items: Sequence[T], *args) -> Iterator[tuple[int, R]]:
        for position, item in enumerate(items):
            yield position, fn(item, *args)
