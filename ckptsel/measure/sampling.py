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
step through a ``DynamicCache``; rows leave the batch when they emit EOS or reach their
budget, so a long straggler doesn't keep finished rows alive.
Temperature 0 is greedy decoding and yields one completion per prompt.

Also here: the generation budget (:func:`max_new_tokens_for`) and the copy rate, whose
text normalisation lives in one function (:func:`normalize_solution`).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence

import torch
from transformers import DynamicCache

from ckptsel.settings import SamplingSettings

# Rows decoded together when the batch size is automatic.
CPU_BATCH = 32
GPU_BATCH = 256


def max_new_tokens_for(target_token_lengths: Sequence[int]) -> int:
    """Budget that lets a model reproduce the longest target with room to spare: ceil(1.5 x longest) + 16."""
    return math.ceil(1.5 * max(target_token_lengths, default=0)) + 16


def sample_seed(seed: int, key: str, index: int) -> int:
    """A 63-bit seed for one (base seed, example key, sample index); stable across runs and machines."""
    digest = hashlib.sha256(f"{seed}\x1f{key}\x1f{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


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
        eos_ids=_eos_ids(model, tokenizer),
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        batch_size=batch_size,
    )
    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    return [texts[i * k : (i + 1) * k] for i in range(len(prompts))]


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
    size = batch_size or (GPU_BATCH if device.type == "cuda" else CPU_BATCH)
    size = math.ceil(len(prompt_ids) / math.ceil(len(prompt_ids) / size)) if prompt_ids else size  # even batches
    order = sorted(range(len(prompt_ids)), key=lambda r: (-len(prompt_ids[r]), r))
    results: list[list[int]] = [[] for _ in prompt_ids]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), size):
            batch = order[start : start + size]
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


def _uniforms(seed: int, n: int, block: int = 64) -> torch.Tensor:
    """The first n uniforms of ``seed``'s stream, drawn in fixed blocks so any n gives the same prefix."""
    generator = torch.Generator().manual_seed(seed)
    blocks = [torch.rand(block, generator=generator, dtype=torch.float64) for _ in range(-(-n // block))]
    return torch.cat(blocks)[:n] if blocks else torch.zeros(0, dtype=torch.float64)


@torch.inference_mode()
def _decode(model, prompts, budgets, uniforms, temperature, top_p, eos_ids, pad_id) -> list[list[int]]:
    """Decode one batch; ``uniforms`` is (rows, max budget) or None for greedy.

    Identical prompts (the k samples of one question) are prefilled once and their cache
    rows repeated. Finished rows are dropped from the batch (and the cache) once a quarter
    of the rows have finished, not one by one: each drop copies the whole cache.
    """
    device = model.get_input_embeddings().weight.device
    unique: dict[tuple[int, ...], int] = {}
    expand = torch.tensor([unique.setdefault(tuple(p), len(unique)) for p in prompts], device=device)
    width = max(len(p) for p in unique)
    ids = torch.full((len(unique), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(unique), width), dtype=torch.long)
    for u, p in enumerate(unique):
        ids[u, width - len(p) :] = torch.tensor(p)
        mask[u, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    cache = DynamicCache(config=model.config)
    logits = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1]
    if len(unique) < len(prompts):
        cache.batch_select_indices(expand)
    logits, mask, positions = logits[expand], mask[expand], positions[expand, -1:]

    live = torch.arange(len(prompts), device=device)  # batch row -> row of ``prompts``
    running = torch.ones(len(prompts), dtype=torch.bool, device=device)
    budget = torch.tensor(budgets, device=device)
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    generated: list[list[int]] = [[] for _ in prompts]
    for step in range(max(budgets)):
        if uniforms is None:
            tokens = logits.argmax(-1)
        else:
            tokens = draw_tokens(logits, uniforms[live, step], temperature, top_p)
        emitted = running & ~torch.isin(tokens, eos)
        for row, tok, keep in zip(live.tolist(), tokens.tolist(), emitted.tolist()):
            if keep:
                generated[row].append(tok)
        running = emitted & (budget > step + 1)
        n_running = int(running.sum())
        if n_running == 0:
            break
        if len(live) - n_running >= max(1, len(live) // 4):
            stay = running.nonzero().squeeze(-1)
            cache.batch_select_indices(stay)
            live, tokens, mask, positions = live[stay], tokens[stay], mask[stay], positions[stay]
            running, budget = running[stay], budget[stay]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        positions = positions + 1
        logits = model(
            input_ids=tokens.unsqueeze(-1), attention_mask=mask, position_ids=positions, past_key_values=cache,
            use_cache=True, logits_to_keep=1,
        ).logits[:, -1]
    return generated


def _eos_ids(model, tokenizer) -> set[int]:
    """EOS ids from the tokenizer and the model's generation config (chat models list several)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif config_eos:
        ids.update(config_eos)
    return ids


def normalize_solution(text: str) -> str:
    """Text as compared for copying: whitespace runs collapsed to one space, ends stripped.

    Case is kept: in math solutions it carries meaning (variables x and X, units mL and ML),
    so a case-folded match could call two different solutions copies.
    """
    return re.sub(r"\s+", " ", text).strip()


def copy_rate(completions: Sequence[str], target: str) -> float:
    """Fraction of samples equal to the training target after :func:`normalize_solution`."""
    if not completions:
        return float("nan")
    want = normalize_solution(target)
    return sum(normalize_solution(c) == want for c in completions) / len(completions)
