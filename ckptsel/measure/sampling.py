"""k seeded samples per question, each one independent of the batch it was decoded in.

Why not ``model.generate``: it draws from one random stream per batch, so a completion
depends on which other prompts shared its batch and on the batch size. Then a run that was
killed and resumed (different batches) would not equal an uninterrupted run. Here each
(seed, key, sample index) gets its own generator, drawn up front as one uniform number per
decoding step; the token at step s is the inverse-CDF pick of that uniform in the
temperature-scaled, top-p-filtered distribution. Nothing about a row's draws depends on
the other rows.

The decode loop: prompts (with BOS, as in scoring) left-padded with per-row positions,
one prefill per distinct prompt (the k samples of a question share it), then one token per
step for the whole batch (many questions at once), into a KV cache allocated once for the
longest budget and written in place; rows leave the batch when they emit EOS or reach their
budget, so a long straggler doesn't keep finished rows alive.
Temperature 0 is greedy decoding and yields one completion per prompt.

:class:`TransformersSampler` is this decoding as a :class:`~ckptsel.measure.protocols.Sampler`,
the one measurement uses unless ``--backend vllm``. Also here: the generation budget
(:func:`max_new_tokens_for`) and the copy rate, whose text normalisation lives in one function
(:func:`normalize_solution`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ckptsel.measure.protocols import Sampler
from ckptsel.measure.text import copy_rate, max_new_tokens_for, normalize_solution, sample_seed  # noqa: F401
from ckptsel.settings import SamplingSettings

# Rows decoded together when the batch size is automatic. A step's fixed costs (reading the
# weights, Python) are shared by all its rows: on one CPU core the lab model samples GSM8K at
# 800 tokens/s in batches of 20 rows, 1,500 with 80, 1,650 with 160. A 0.5B model's cache for
# 128 rows of 300 tokens is about 1 GB.
CPU_BATCH = 128
GPU_BATCH = 256
# And the positions a batch's cache may hold (rows x (longest prompt + budget)): a batch of long
# prompts gets fewer rows, so one over-long row cannot ask for the memory of 128 (GSM8K-sized
# batches stay whole: 128 rows x 400 positions).
CPU_POSITIONS = 2**16
GPU_POSITIONS = 2**20


def draw_tokens(
    logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float, candidates: int = 256
) -> torch.Tensor:
    """Pick one token per row: temperature, nucleus (top-p) filter, then the inverse CDF at ``uniforms``.

    The nucleus is the most probable tokens whose mass before them is below ``top_p`` (the
    top token always stays), as in transformers' ``TopPLogitsWarper``. Tokens are ordered by
    probability, ties by token id, so the pick is a function of the row alone (bf16 logits
    tie often).

    Sorting a 32k-150k vocabulary every step costs more than the model on CPU, so the
    nucleus is first looked for among the ``candidates`` most probable tokens; a row whose
    nucleus does not end inside them (a flat distribution) is sorted in full. Both paths
    give the same token.
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    uniforms = uniforms.to(probs.device, torch.float32)
    if candidates >= probs.shape[-1]:
        return _nucleus_pick(*_sorted_by_probability(probs), uniforms, top_p)[0]
    top_vals, top_ids = probs.topk(candidates, dim=-1)
    top_ids, by_id = top_ids.sort(dim=-1)  # topk leaves ties in no particular order
    sorted_p, order = top_vals.gather(-1, by_id).sort(dim=-1, descending=True, stable=True)
    tokens, n_kept = _nucleus_pick(sorted_p, top_ids.gather(-1, order), uniforms, top_p)
    # Exact only if the nucleus ends before the last candidate and no tie straddles the cut.
    last_kept = sorted_p.gather(-1, (n_kept - 1).unsqueeze(-1)).squeeze(-1)
    redo = (n_kept >= candidates) | (sorted_p[:, -1] >= last_kept)
    if bool(redo.any()):
        rows = redo.nonzero().squeeze(-1)
        tokens[rows] = _nucleus_pick(*_sorted_by_probability(probs[rows]), uniforms[rows], top_p)[0]
    return tokens


def _sorted_by_probability(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities in descending order (ties by token id: the sort is stable) and their token ids."""
    return probs.sort(dim=-1, descending=True, stable=True)


def _nucleus_pick(
    sorted_p: torch.Tensor, ids: torch.Tensor, uniforms: torch.Tensor, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse-CDF pick within the nucleus of descending ``sorted_p``; returns (token ids, nucleus sizes)."""
    kept = (sorted_p.cumsum(dim=-1) - sorted_p) < top_p
    kept[:, 0] = True
    n_kept = kept.sum(dim=-1)
    cum = (sorted_p * kept).cumsum(dim=-1)
    point = (uniforms * cum[:, -1]).unsqueeze(-1)
    pick = torch.searchsorted(cum, point, right=True).squeeze(-1)
    pick = torch.minimum(pick, n_kept - 1)
    return ids.gather(-1, pick.unsqueeze(-1)).squeeze(-1), n_kept


def sample_completions(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    sampling: SamplingSettings,
    max_new_tokens: int | Sequence[int],
    keys: Sequence[str],
    batch_size: int | None = None,
) -> list[list[str]]:
    """k completions per prompt (1 when greedy), decoded without special tokens, in sample order.

    ``keys`` name the examples (the store's example uid) and seed their samples together
    with ``sampling.seed``; the same key and seed always give the same completions.
    ``max_new_tokens`` is one budget for all, or one per prompt (``max_new_tokens_for([n_i])``
    with n_i the example's own target length: then a sample does not depend on which other
    examples were selected, and a rambling early checkpoint stops at its own example's budget).
    """
    if len(prompts) != len(keys):
        raise ValueError(f"{len(prompts)} prompts but {len(keys)} keys")
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(budgets)} token budgets")
    greedy = sampling.temperature == 0
    k = 1 if greedy else sampling.k
    prompt_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    rows = [(i, s) for i in range(len(prompts)) for s in range(k)]
    seeds = None if greedy else [sample_seed(sampling.seed, keys[i], s) for i, s in rows]
    out = sample_token_ids(
        model,
        [prompt_ids[i] for i, _ in rows],
        seeds=seeds,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        max_new_tokens=[budgets[i] for i, _ in rows],
        eos_ids=eos_ids(model, tokenizer),
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        batch_size=batch_size,
    )
    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    return [texts[i * k : (i + 1) * k] for i in range(len(prompts))]


class TransformersSampler(Sampler):
    """:func:`sample_completions` on the checkpoint's transformers model, ``batch_size`` rows at a time
    (None: automatic)."""

    def __init__(self, batch_size: int | None = None):
        self.batch_size = batch_size

    def sample(self, model, tokenizer, prompts: Sequence[str], *, sampling: SamplingSettings,
               max_new_tokens: Sequence[int], keys: Sequence[str]) -> list[list[str]]:
        return sample_completions(model, tokenizer, prompts, sampling=sampling, max_new_tokens=max_new_tokens,
                                  keys=keys, batch_size=self.batch_size)


def sample_token_ids(
    model,
    prompt_ids: Sequence[list[int]],
    *,
    seeds: Sequence[int] | None,
    temperature: float,
    top_p: float,
    max_new_tokens: int | Sequence[int],
    eos_ids: set[int],
    pad_id: int = 0,
    batch_size: int | None = None,
) -> list[list[int]]:
    """New token ids per row, EOS excluded; ``max_new_tokens`` for all rows or per row; ``seeds=None`` is greedy."""
    budgets = [max_new_tokens] * len(prompt_ids) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(prompt_ids) or min(budgets, default=1) < 1:
        raise ValueError("max_new_tokens must be >= 1, one for all rows or one per row")
    device = model.get_input_embeddings().weight.device
    gpu = device.type == "cuda"
    size = batch_size or (GPU_BATCH if gpu else CPU_BATCH)
    size = math.ceil(len(prompt_ids) / math.ceil(len(prompt_ids) / size)) if prompt_ids else size  # even batches
    order = sorted(range(len(prompt_ids)), key=lambda r: (-len(prompt_ids[r]), r))
    results: list[list[int]] = [[] for _ in prompt_ids]
    positions = None if batch_size else (GPU_POSITIONS if gpu else CPU_POSITIONS)
    was_training = model.training
    model.eval()
    try:
        for batch in _cut(order, [len(p) for p in prompt_ids], budgets, size, positions):
            width = max(budgets[r] for r in batch)
            uniforms = None
            if seeds is not None:
                uniforms = torch.stack([_uniforms(seeds[r], width) for r in batch]).to(device)
            decoded = _decode(
                model, [prompt_ids[r] for r in batch], [budgets[r] for r in batch], uniforms, temperature, top_p,
                eos_ids, pad_id,
            )
            for r, ids in zip(batch, decoded):
                results[r] = ids
    finally:
        model.train(was_training)
    return results


def _cut(order: list[int], prompt_lengths: list[int], budgets: list[int], size: int,
         positions: int | None) -> list[list[int]]:
    """Batches of at most ``size`` rows in ``order`` (longest prompt first); with ``positions``, also
    at most that many cache positions (rows x (longest prompt + largest budget)). A row is never split."""
    batches: list[list[int]] = []
    current: list[int] = []
    prompt = budget = 0  # the current batch's longest prompt and largest budget
    for r in order:
        wider = (max(prompt, prompt_lengths[r]) + max(budget, budgets[r])) * (len(current) + 1)
        if current and (len(current) >= size or (positions is not None and wider > positions)):
            batches.append(current)
            current, prompt, budget = [], 0, 0
        current.append(r)
        prompt, budget = max(prompt, prompt_lengths[r]), max(budget, budgets[r])
    if current:
        batches.append(current)
    return batches


def _uniforms(seed: int, n: int, block: int = 64) -> torch.Tensor:
    """The first n uniforms of ``seed``'s stream, drawn in fixed blocks so any n gives the same prefix."""
    generator = torch.Generator().manual_seed(seed)
    blocks = [torch.rand(block, generator=generator, dtype=torch.float64) for _ in range(-(-n // block))]
    return torch.cat(blocks)[:n] if blocks else torch.zeros(0, dtype=torch.float64)


@torch.inference_mode()
def _decode(model, prompts, budgets, uniforms, temperature, top_p, eos_ids, pad_id) -> list[list[int]]:
    """Decode one batch; ``uniforms`` is (rows, max budget) or None for greedy.

    Identical prompts (the k samples of one question) are prefilled once and their cache
    rows repeated. The KV cache, the attention mask and the output are allocated once for
    the longest budget and written in place (:class:`_PreallocatedLayer`). Finished rows are
    dropped from the batch (and the cache) once a quarter of the rows have finished, not one
    by one: each drop copies the whole cache.
    """
    device = model.get_input_embeddings().weight.device
    unique: dict[tuple[int, ...], int] = {}
    expand = torch.tensor([unique.setdefault(tuple(p), len(unique)) for p in prompts], device=device)
    width, steps = max(len(p) for p in unique), max(budgets)
    ids = torch.full((len(unique), width), pad_id, dtype=torch.long)
    mask = torch.ones((len(unique), width + steps), dtype=torch.long)  # generated positions are always attended
    for u, p in enumerate(unique):
        ids[u, width - len(p) :] = torch.tensor(p)
        mask[u, : width - len(p)] = 0
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask[:, :width].cumsum(-1) - 1).clamp_min(0)
    cache = _preallocated_cache(model, width + steps)
    logits = model(
        input_ids=ids, attention_mask=mask[:, :width], position_ids=positions, past_key_values=cache, use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1]
    if len(unique) < len(prompts):
        cache.batch_select_indices(expand)
    logits, mask, positions = logits[expand], mask[expand], positions[expand, -1:]

    live = torch.arange(len(prompts), device=device)  # batch row -> row of ``prompts``
    running = torch.ones(len(prompts), dtype=torch.bool, device=device)
    budget = torch.tensor(budgets, device=device)
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    out = torch.zeros((len(prompts), steps), dtype=torch.long, device=device)
    lengths = torch.zeros(len(prompts), dtype=torch.long, device=device)
    for step in range(steps):
        if uniforms is None:
            tokens = logits.argmax(-1)
        else:
            tokens = draw_tokens(logits, uniforms[live, step], temperature, top_p)
        emitted = running & ~torch.isin(tokens, eos)
        out[live, step] = tokens
        lengths[live] += emitted
        running = emitted & (budget > step + 1)
        n_running = int(running.sum())
        if n_running == 0:
            break
        if len(live) - n_running >= max(1, len(live) // 4):
            stay = running.nonzero().squeeze(-1)
            cache.batch_select_indices(stay)
            live, tokens, mask, positions = live[stay], tokens[stay], mask[stay], positions[stay]
            running, budget = running[stay], budget[stay]
        positions = positions + 1
        logits = model(
            input_ids=tokens.unsqueeze(-1), attention_mask=mask[:, : width + step + 1], position_ids=positions,
            past_key_values=cache, use_cache=True, logits_to_keep=1,
        ).logits[:, -1]
    # A row stops at its first EOS or at its budget: its tokens are the first ``lengths`` steps.
    return [row[:n] for row, n in zip(out.tolist(), lengths.tolist())]


class _PreallocatedLayer(DynamicLayer):
    """A full-attention cache layer whose buffers are allocated once, for the whole decode.

    ``DynamicLayer`` concatenates at every step, copying the whole cache each time (with
    many rows of long sequences that copy costs more than the attention reading it); here
    new keys and values are written in place and the layer exposes views of the filled part.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._keys = key_states.new_empty((*key_states.shape[:2], self.capacity, key_states.shape[-1]))
        self._values = value_states.new_empty((*value_states.shape[:2], self.capacity, value_states.shape[-1]))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows ``indices`` (repeats allowed), copying only the filled part of the buffers."""
        if self.length > 0:
            self._keys, self._values = (
                _gather_rows(buffer, indices, self.length) for buffer in (self._keys, self._values)
            )
            self.keys, self.values = self._keys[:, :, : self.length], self._values[:, :, : self.length]


def _gather_rows(buffer: torch.Tensor, indices: torch.Tensor, length: int) -> torch.Tensor:
    """A new buffer of ``buffer``'s shape holding rows ``indices`` of its first ``length`` positions.

    ``index_select`` into the filled part moves a fraction of what ``buffer[indices]`` would
    (the whole capacity, through the slower advanced-indexing kernel): 2-3x faster on CPU.
    """
    out = buffer.new_empty((len(indices), *buffer.shape[1:]))
    torch.index_select(buffer[:, :, :length], 0, indices, out=out[:, :, :length])
    return out


def _preallocated_cache(model, capacity: int) -> DynamicCache:
    """The model's ``DynamicCache`` with its plain full-attention layers preallocated to ``capacity`` tokens.

    Other layer kinds (sliding windows, linear attention) keep the class transformers chose.
    """
    cache = DynamicCache(config=model.config)
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            cache.layers[i] = _PreallocatedLayer(capacity)
    return cache


def eos_ids(model, tokenizer) -> set[int]:
    """EOS ids from the tokenizer and the model's generation config (chat models list several)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif config_eos:
        ids.update(config_eos)
    return ids


