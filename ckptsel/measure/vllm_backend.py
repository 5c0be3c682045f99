"""Sampling through vLLM (``--backend vllm``): :mod:`ckptsel.measure.sampling`'s contract, faster on a GPU.

Why: sampling k completions per training question is most of a run's cost, and vLLM's paged
KV cache and continuous batching decode many times more tokens per second on a GPU than a
transformers decode loop. vLLM is optional: nothing imports it unless ``backend="vllm"``.

What is the same as the default (hf) backend: the prompts are ckptsel's own token ids (its
tokenizer, BOS included, exactly as scored), each prompt has its own token budget, each
example's samples are seeded by its key (:func:`~ckptsel.measure.sampling.sample_seed` with
sample index 0 seeds one request of n=k), temperature 0 is greedy with one completion,
generation stops at ckptsel's EOS set, and completions are decoded by ckptsel's tokenizer
without special tokens.

What differs: vLLM draws its random numbers its own way, so its samples are not bit-identical
to the hf backend's for the same seed. The result store keys the two apart
(:func:`ckptsel.collect.settings_key` includes the backend when it is not hf). Scoring (target
NLL, proxies, routers) stays on transformers; only sampling moves.

Engines: one per base model, kept across the adapter checkpoints of a LoRA run (each adapter
a ``LoRARequest`` with its own id); one per full checkpoint, the previous freed first. vLLM
picks its GPU itself (``CUDA_VISIBLE_DEVICES``) and, since the transformers model for scoring
shares the GPU, is given a share of the memory free when its engine starts.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence

from ckptsel.discover import Checkpoint
from ckptsel.errors import CkptselError
from ckptsel.measure.protocols import Sampler
from ckptsel.settings import EngineSettings, SamplingSettings

log = logging.getLogger(__name__)

NOT_INSTALLED = "--backend vllm: vllm is not installed (pip install vllm); the default backend hf needs nothing"
# The LoRA ranks a vLLM engine can be built for (max_lora_rank); an adapter's rank is rounded up.
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
# Share of the GPU memory free at engine start that vLLM may take (weights, KV cache, activations).
FREE_MEMORY_SHARE = 0.85


def require_vllm():
    """The ``vllm`` module, or a one-line CkptselError saying it is not installed."""
    try:
        import vllm
    except ImportError:
        raise CkptselError(NOT_INSTALLED) from None
    return vllm


class VllmSampler(Sampler):
    """k completions per prompt from one checkpoint at a time, on a vLLM engine (a
    :class:`~ckptsel.measure.protocols.Sampler`).

    Use as a context manager; call :meth:`use` with each checkpoint before its transformers
    model loads (a previous engine that cannot serve it is freed then, not after the next
    model has taken the memory), then :meth:`sample` as often as needed. ``engines_built``
    counts engine starts.
    """

    def __init__(self, engine: EngineSettings):
        self._vllm = require_vllm()
        self.engine = engine
        self.engines_built = 0
        self._llm = None
        self._llm_key: tuple[str, int | None] | None = None  # (model path, max LoRA rank or None)
        self._checkpoint: Checkpoint | None = None
        self._lora_ids: dict[str, int] = {}  # adapter path -> vLLM LoRA id (unique, from 1)

    def __enter__(self) -> VllmSampler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def use(self, ckpt: Checkpoint) -> None:
        """Sample from ``ckpt`` from now on; frees the current engine unless it can serve ``ckpt``."""
        self._checkpoint = ckpt
        if self._llm_key is not None and not _serves(self._llm_key, _engine_key(ckpt)):
            self.close()

    def sample(
        self,
        model,
        tokenizer,
        prompts: Sequence[str],
        *,
        sampling: SamplingSettings,
        max_new_tokens: Sequence[int],
        keys: Sequence[str],
    ) -> list[list[str]]:
        """k completions per prompt (1 when greedy), as :func:`~ckptsel.measure.sampling.sample_completions`.

        ``model`` is the checkpoint's transformers model, read only for its generation
        config's EOS ids; ``max_new_tokens`` is one budget per prompt.
        """
        from ckptsel.measure.sampling import eos_ids, sample_seed

        if not len(prompts) == len(keys) == len(max_new_tokens):
            raise ValueError(f"{len(prompts)} prompts, {len(keys)} keys, {len(max_new_tokens)} token budgets")
        if self._checkpoint is None:
            raise RuntimeError("VllmSampler.use(checkpoint) must come before sample()")
        llm = self._engine_for(self._checkpoint, sampling.seed)
        greedy = sampling.temperature == 0
        eos = eos_ids(model, tokenizer)
        params = [
            self._vllm.SamplingParams(
                n=1 if greedy else sampling.k,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=budget,
                seed=None if greedy else sample_seed(sampling.seed, key, 0),
                stop_token_ids=sorted(eos),
            )
            for key, budget in zip(keys, max_new_tokens)
        ]
        prompt_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
        outputs = llm.generate(
            [{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False, lora_request=self._lora_request()
        )
        return [
            tokenizer.batch_decode([_without_eos(s.token_ids, eos) for s in out.outputs], skip_special_tokens=True)
            for out in outputs
        ]

    def close(self) -> None:
        """Free the engine and its GPU memory (vLLM holds most of the GPU while an engine lives)."""
        if self._llm is None:
            return
        del self._llm
        self._llm, self._llm_key = None, None
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _engine_for(self, ckpt: Checkpoint, seed: int):
        """The engine serving ``ckpt``: the current one when it can, else a new one."""
        key = _engine_key(ckpt)
        if self._llm_key is not None and _serves(self._llm_key, key):
            return self._llm
        from ckptsel.measure.loading import dtype_name

        self.close()
        model, lora_rank = key
        options = {  # ckptsel's dtype (bf16 on GPU for auto), as vLLM names it
            "model": model, "dtype": dtype_name(self.engine), "seed": seed,
            "trust_remote_code": self.engine.trust_remote_code,
        }
        if lora_rank is not None:
            options.update(enable_lora=True, max_lora_rank=lora_rank)
        share = _memory_share()
        if share is not None:
            options["gpu_memory_utilization"] = share
        log.info("starting a vLLM engine for %s", model)
        self._llm = self._vllm.LLM(**options)
        self._llm_key = key
        self.engines_built += 1
        return self._llm

    def _lora_request(self):
        """The current adapter's LoRARequest (None for a full checkpoint); each adapter path keeps one id."""
        if not self._checkpoint.format.is_adapter:
            return None
        from vllm.lora.request import LoRARequest

        path = str(self._checkpoint.path)
        lora_id = self._lora_ids.setdefault(path, len(self._lora_ids) + 1)
        return LoRARequest(f"ckptsel-{lora_id}", lora_id, path)


def _engine_key(ckpt: Checkpoint) -> tuple[str, int | None]:
    """What an engine must be built for: the full checkpoint's folder, or the base model and the LoRA rank."""
    if not ckpt.format.is_adapter:
        return str(ckpt.path), None
    if not ckpt.base_model:
        raise CkptselError(f"{ckpt.path}: adapter without a base model; pass --base-model")
    return str(ckpt.base_model), _lora_rank(ckpt)


def _serves(current: tuple[str, int | None], wanted: tuple[str, int | None]) -> bool:
    """An engine serves a checkpoint built for the same model, with LoRA rank room when it is an adapter."""
    (model, rank), (wanted_model, wanted_rank) = current, wanted
    if model != wanted_model or (rank is None) != (wanted_rank is None):
        return False
    return rank is None or rank >= wanted_rank


def _lora_rank(ckpt: Checkpoint) -> int:
    """The smallest max_lora_rank vLLM accepts that fits the adapter's rank (read by discovery)."""
    rank = ckpt.lora_rank or LORA_RANKS[0]
    fitting = [r for r in LORA_RANKS if r >= rank]
    if not fitting:
        raise CkptselError(f"{ckpt.path}: LoRA rank {rank} is above vLLM's largest ({LORA_RANKS[-1]})")
    return fitting[0]


def _memory_share() -> float | None:
    """gpu_memory_utilization for a new engine: a share of the memory free now (None without CUDA: vLLM's default)."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return round(FREE_MEMORY_SHARE * free / total, 3)


def _without_eos(token_ids: Sequence[int], eos: set[int]) -> list[int]:
    """A completion's tokens without the EOS that ended it (the hf backend never keeps it)."""
    ids = list(token_ids)
    return ids[:-1] if ids and ids[-1] in eos else ids
