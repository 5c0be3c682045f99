"""The two interfaces measuring code is written against: a checkpoint :class:`Loader` and a :class:`Sampler`.

The measuring loop (:func:`ckptsel.collect.collect`) asks a loader for each checkpoint's model and
tokenizer and a sampler for k completions per prompt, and never asks which one it got.

Loaders: :class:`ckptsel.measure.loading.CheckpointLoader` (from disk, LoRA adapters hot-swapped
on one base), ``ckptsel.collect._LazyLoader`` (the same, made on first use, so a ranking served
from the store imports no torch) and ``ckptsel.integrations.transformers._InMemoryLoader`` (the
Trainer's model in memory for the checkpoint being saved).

Samplers: :class:`ckptsel.measure.sampling.TransformersSampler` (the default; seeded decoding
that does not depend on batch composition) and :class:`ckptsel.measure.vllm_backend.VllmSampler`
(``--backend vllm``).

No torch here: the store-only path imports this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ckptsel.discover import Checkpoint
    from ckptsel.settings import SamplingSettings


class LoadedCheckpoint(NamedTuple):
    """A model ready for scoring and sampling (eval mode, no grad) and its tokenizer."""

    model: Any
    tokenizer: Any


@runtime_checkable
class Loader(Protocol):
    """Loads checkpoints one after another; a loaded model is valid until the next :meth:`load`."""

    base_loads: int  # base models loaded for adapter checkpoints so far (read it, do not set it)

    def load(self, ckpt: Checkpoint) -> LoadedCheckpoint:
        """The checkpoint's model and tokenizer; :class:`ckptsel.errors.CheckpointError` (one line) when it
        cannot be loaded."""
        ...


@runtime_checkable
class Sampler(Protocol):
    """k completions per prompt (1 when greedy) from one loaded checkpoint."""

    def sample(
        self,
        model: Any,
        tokenizer: Any,
        prompts: Sequence[str],
        *,
        sampling: SamplingSettings,
        max_new_tokens: Sequence[int],
        keys: Sequence[str],
    ) -> list[list[str]]:
        """Decoded completions per prompt, in sample order. ``keys`` name the examples and seed their
        samples with ``sampling.seed``; ``max_new_tokens`` is one budget per prompt."""
        ...
