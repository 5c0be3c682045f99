"""Teacher-forced target NLL: nll_i = mean_t -log p(y_t | x, y_<t), prompt tokens excluded.

Tokenisation (it must match how the model was fine-tuned, or every NLL is off) is
:func:`ckptsel.tokenizers.encode_pairs`, TRL's ``SFTTrainer`` rule: the prompt and the prompt
+ target are each tokenised with the tokenizer's special tokens (a Llama tokenizer prepends
BOS); the target is what the joint encoding adds after their common prefix (at a BPE merge
across the boundary that includes the merged token); then the EOS id (``append_eos``) or,
for a chat rendering, the template's end of turn (``ends``). On the lab's character-level
tokenizer this equals tokenising the parts separately, as ``ckptsel.lab.train.encode`` does.

How the work is kept small: pairs are sorted by total length and cut into batches under a
token budget (padding stays small); rows are right-padded, so with causal attention the pad
tokens never influence a real position; the model's own ``logits_to_keep`` boolean mask
projects only the hidden states at target positions through the LM head (with a large
vocabulary that head is most of the cost); log-softmax runs in float32 in row chunks.
The result never depends on batch size or order, only on each (prompt, target) pair.

Shared prompt prefixes are run once. Pairs whose prompts begin alike (several targets for
one prompt: the training target and alternative solutions; prompt perturbations that keep
the question and change its frame) are grouped (:func:`share_prefixes`). A group's common
prefix goes through the model once, into a KV cache; the cache rows are repeated for the
group's members, and each member's forward pass covers only the rest of its prompt and its
target, at positions after the prefix. Causal attention makes this exact: a prefix token
never sees what follows it, so its keys and values are the same in every member. Prefixes
run in waves (a batch of groups); the rests of a wave's members are then sorted by length
across its groups and batched, so they carry as little padding as lone pairs do. Router
capture (``routers=True``) needs each target in a pass of its own shape and scores
unshared.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from ckptsel.tokenizers import TokenPair, encode_pairs  # noqa: F401  (re-exported: callers import it from here)
from ckptsel.tokenizers import common_prefix

# Automatic batch size: padded tokens per forward pass, and elements of the logits matrix
# the model returns (target tokens x vocabulary, in the model's dtype). On CPU a few rows of
# GSM8K length already make large matmuls, and bigger batches measured slower (cache
# misses); on a GPU a larger batch keeps the device busy.
CPU_TOKEN_BUDGET, GPU_TOKEN_BUDGET = 1024, 32768
CPU_LOGITS_BUDGET, GPU_LOGITS_BUDGET = 2**27, 2**30
# Elements per float32 log-softmax chunk: on CPU 1 MiB, about an L2 cache, which makes the
# passes over it 2-3x faster than over main memory; on a GPU, large enough to fill it.
CPU_FLOAT32_CHUNK, GPU_FLOAT32_CHUNK = 2**18, 2**26
# Most padding a row may carry, as a fraction of its batch's length: with few rows of scattered
# lengths (a small --max-examples) a full token budget would otherwise pad a third of a batch.
MAX_PADDING = 0.25
# Fewest prompt tokens worth sharing: below this a prefix saves less than its row in the prefix pass
# and its cache copies cost.
MIN_SHARED_PREFIX = 8


@dataclass(frozen=True)
class ScoreResult:
    """Per-pair scores, in input order.

    ``nll``: mean negative log-likelihood per target token, nats (NaN for an empty target).
    ``n_tokens``: target tokens scored (EOS included when appended).
    ``entropy``: mean predictive entropy over the same positions, nats.
    ``peak_nll``: the costliest target token's NLL, nats (NaN for an empty target): below nu only
    when *every* token of the target is reproduced near-certainly (the ``peak-nll`` memorisation rule).
    """

    nll: np.ndarray
    n_tokens: np.ndarray
    entropy: np.ndarray
    peak_nll: np.ndarray
    # MoE models scored with ``routers=True``: per-pair router softmax averaged over the target
    # tokens (N, layers, experts), and the routers' expert vectors (layers, experts, hidden).
    router_weights: np.ndarray | None = None
    gate_vectors: np.ndarray | None = None


def score_targets(
    model,
    tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    append_eos: bool = True,
    ends: Sequence[str | None] | None = None,
    batch_size: int | None = None,
    routers: bool = False,
) -> ScoreResult:
    """Score each target given its prompt; see the module docstring for tokenisation.

    ``ends``: per target, the chat template's end of turn (``Example.end_of_turn``) or None.
    ``routers``: on a mixture-of-experts model, also capture each pair's routing weights in
    the same forward pass (``ckptsel.measure.routers``); ignored for dense models.
    """
    pairs = encode_pairs(tokenizer, prompts, targets, append_eos=append_eos, ends=ends)
    return score_token_pairs(model, pairs, batch_size=batch_size, routers=routers)


def plan_batches(
    lengths: Sequence[int],
    scored: Sequence[int],
    *,
    batch_size: int | None = None,
    token_budget: int = CPU_TOKEN_BUDGET,
    scored_budget: int | None = None,
    max_padding: float | None = None,
) -> list[list[int]]:
    """Cut indices into batches of similar length, longest first.

    ``lengths`` are the total (padded-to) lengths, ``scored`` the target-token counts.
    With ``batch_size`` the batches have that many rows; otherwise a batch grows while
    rows x longest length stays within ``token_budget`` and the scored tokens within
    ``scored_budget``. With ``max_padding`` a row padded by more than that fraction of the
    batch's length starts a new batch (few rows of scattered lengths would otherwise share
    one wide batch). A single row is never split, however long. Longest first, so an
    out-of-memory error shows up on the first batch rather than after an hour.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    current_scored = 0
    for i in order:
        if current:
            if batch_size is not None:
                full = len(current) >= batch_size
            else:
                full = (len(current) + 1) * lengths[current[0]] > token_budget or (
                    scored_budget is not None and current_scored + scored[i] > scored_budget
                )
            if max_padding is not None:
                full = full or lengths[i] < (1 - max_padding) * lengths[current[0]]
            if full:
                batches.append(current)
                current, current_scored = [], 0
        current.append(i)
        current_scored += scored[i]
    if current:
        batches.append(current)
    return batches


def share_prefixes(
    prompts: Sequence[Sequence[int]], min_shared: int = MIN_SHARED_PREFIX
) -> list[tuple[int, list[int]]]:
    """Group prompts that begin with the same tokens: ``[(tokens shared, [prompt indices])]``.

    Sorted, prompts with a common beginning are neighbours, and a run of neighbours shares
    the smallest common prefix of adjacent pairs. Walking them in order, a prompt joins the
    current group when that lowers the tokens to compute: n members sharing s tokens, a
    newcomer that leaves s' in common joins iff n*s' > (n-1)*s (the n members each recompute
    s - s' tokens; the newcomer saves s'). A member shares at most its prompt minus the last
    token, whose logits predict the first target token. A group sharing fewer than
    ``min_shared`` tokens is not worth its place in the prefix pass; its prompts stand
    alone, as ``(0, [i])``. Every index appears once, in prompt order within a group.
    """
    order = sorted(range(len(prompts)), key=lambda i: (list(prompts[i]), i))
    groups: list[tuple[int, list[int]]] = []
    shared, members = 0, []
    for i in order:
        cap = max(len(prompts[i]) - 1, 0)
        if members:
            common = min(shared, cap, common_prefix(prompts[members[-1]], prompts[i]))
            n = len(members)
            if common >= min_shared and n * common > (n - 1) * shared:
                shared = common
                members.append(i)
                continue
            groups.extend(_close_group(shared, members))
        shared, members = cap, [i]
    if members:
        groups.extend(_close_group(shared, members))
    return groups


def _close_group(shared: int, members: list[int]) -> list[tuple[int, list[int]]]:
    return [(shared, members)] if len(members) > 1 else [(0, members)]


@torch.inference_mode()
def score_token_pairs(
    model, pairs: Sequence[TokenPair], *, batch_size: int | None = None, routers: bool = False
) -> ScoreResult:
    """Score already-tokenised (prompt ids, target ids) pairs; the engine under :func:`score_targets`.

    Pairs whose prompts share a prefix have it computed once (see the module docstring);
    the numbers equal scoring each pair on its own.
    """
    from ckptsel.measure.routers import capture_routers, find_routers

    if routers and find_routers(model) is not None:
        with capture_routers(model) as capture:
            return _score_all(model, pairs, batch_size, capture)
    return _score_all(model, pairs, batch_size, None)


def _score_all(model, pairs: Sequence[TokenPair], batch_size: int | None, capture) -> ScoreResult:
    n = len(pairs)
    nll_sum = np.zeros(n)
    ent_sum = np.zeros(n)
    peak = np.full(n, -np.inf)
    n_tokens = np.array([len(t) for _, t in pairs], dtype=np.int64)
    device = _input_device(model)
    gpu = device.type == "cuda"
    vocab = model.config.get_text_config().vocab_size

    def plan(lengths: list[int], scored: list[int]) -> list[list[int]]:
        return plan_batches(
            lengths,
            scored,
            batch_size=batch_size,
            token_budget=GPU_TOKEN_BUDGET if gpu else CPU_TOKEN_BUDGET,
            scored_budget=(GPU_LOGITS_BUDGET if gpu else CPU_LOGITS_BUDGET) // vocab,
            max_padding=MAX_PADDING,
        )

    live = [i for i in range(n) if n_tokens[i] > 0]
    share = capture is None and _plain_cache(model)
    groups = share_prefixes([pairs[i][0] for i in live]) if share else [(0, [k]) for k in range(len(live))]
    lone = [live[k] for shared, members in groups if not shared for k in members]
    groups = [(shared, [live[k] for k in members]) for shared, members in groups if shared]
    weights = None
    if capture is not None:
        weights = np.full((n, capture.num_layers, capture.num_experts), np.nan, dtype=np.float32)
    was_training = model.training
    model.eval()
    try:
        batches = chain(
            _shared_batches(model, pairs, groups, plan, device),
            _lone_batches(model, pairs, lone, plan, device, capture),
        )
        for rows, nll, ent, owner, routed in batches:
            row_ids = np.asarray(rows)[owner]
            np.add.at(nll_sum, row_ids, nll)
            np.add.at(ent_sum, row_ids, ent)
            np.maximum.at(peak, row_ids, nll)
            if routed is not None:
                weights[rows] = routed
    finally:
        model.train(was_training)
    gates = capture.gate_vectors() if capture is not None else None
    with np.errstate(invalid="ignore", divide="ignore"):
        return ScoreResult(
            nll=nll_sum / n_tokens,
            n_tokens=n_tokens,
            entropy=ent_sum / n_tokens,
            peak_nll=np.where(n_tokens > 0, peak, np.nan),
            router_weights=weights,
            gate_vectors=gates,
        )


def _lone_batches(model, pairs: Sequence[TokenPair], lone: list[int], plan, device: torch.device, capture):
    """Score the pairs ``lone`` whole; yields (pair indices, then :func:`_score_batch`'s four results) per batch."""
    for batch in plan([len(pairs[i][0]) + len(pairs[i][1]) for i in lone], [len(pairs[i][1]) for i in lone]):
        rows = [lone[b] for b in batch]
        yield rows, *_score_batch(model, [pairs[i] for i in rows], device, capture)


def _shared_batches(model, pairs: Sequence[TokenPair], groups: list[tuple[int, list[int]]], plan, device: torch.device):
    """Score groups sharing a prefix, a wave of groups at a time; yields as :func:`_lone_batches` does.

    One pass over the wave's prefixes fills a cache; the members' rests are then sorted by
    length across the wave's groups and batched, each row with its own group's cache row.
    """
    for wave in plan([shared for shared, _ in groups], [0] * len(groups)):
        prefixes = [pairs[groups[g][1][0]][0][: groups[g][0]] for g in wave]
        cache, prefix_mask = _run_prefixes(model, prefixes, device)
        members = [(w, i) for w, g in enumerate(wave) for i in groups[g][1]]
        rests = [(pairs[i][0][len(prefixes[w]) :], pairs[i][1]) for w, i in members]
        for batch in plan([len(p) + len(t) for p, t in rests], [len(t) for _, t in rests]):
            source = [members[b][0] for b in batch]
            prefix = (_select_rows(cache, source, device), prefix_mask[source], [len(prefixes[w]) for w in source])
            yield [members[b][1] for b in batch], *_score_batch(model, [rests[b] for b in batch], device, prefix=prefix)


def _score_batch(model, pairs: list[TokenPair], device: torch.device, capture=None, prefix=None):
    """One forward pass: per-target-token NLL, entropy, the batch row each belongs to, and routing weights.

    ``prefix``: (KV cache with one row per pair, its padding mask, each row's prefix length)
    when ``pairs`` hold the rests of prompts whose prefixes are in the cache. Rows are
    right-padded, so a padding slot is never attended to by a real position.
    """
    width = max(len(p) + len(t) for p, t in pairs)
    ids = torch.zeros((len(pairs), width), dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    keep = torch.zeros((len(pairs), width), dtype=torch.bool)  # positions whose logits predict a target token
    labels = []
    for r, (p, t) in enumerate(pairs):
        ids[r, : len(p) + len(t)] = torch.tensor(p + t)
        mask[r, : len(p) + len(t)] = 1
        keep[r, len(p) - 1 : len(p) + len(t) - 1] = True
        labels.extend(t)
    positions = torch.arange(width).expand(len(pairs), width)
    # Without a prefix no mask is needed: with causal attention a real position never sees the
    # right padding after it, and the model can then use its cheaper causal attention kernel.
    cache, attention_mask = None, None
    if prefix is not None:
        cache, prefix_mask, offsets = prefix
        attention_mask = torch.cat([prefix_mask, mask], dim=1).to(device)
        positions = positions + torch.tensor(offsets)[:, None]
    out = model(
        input_ids=ids.to(device),
        attention_mask=attention_mask,
        position_ids=positions.to(device),
        past_key_values=cache,
        logits_to_keep=keep.to(device),
        use_cache=cache is not None,
        **(capture.forward_kwargs if capture is not None else {}),
    )
    # Row-major boolean indexing keeps the (row, position) order that ``labels`` was built in.
    logits = out.logits.reshape(-1, out.logits.shape[-1])
    nll, ent = token_nll_entropy(logits, torch.tensor(labels, device=logits.device))
    owner = keep.nonzero()[:, 0].numpy()
    routed = None
    if capture is not None:
        # Router tokens are the positions whose *input* is a target token: ``keep`` shifted by one.
        targets = torch.zeros_like(keep)
        targets[:, 1:] = keep[:, :-1]
        routed = capture.reduce(targets, out)
    return nll, ent, owner, routed


def _run_prefixes(model, prefixes: list[list[int]], device: torch.device):
    """One right-padded pass over the prefixes into a fresh KV cache (no logits); returns it and the padding mask."""
    from transformers import DynamicCache

    width = max(len(p) for p in prefixes)
    ids = torch.zeros((len(prefixes), width), dtype=torch.long)
    mask = torch.zeros((len(prefixes), width), dtype=torch.long)
    for r, p in enumerate(prefixes):
        ids[r, : len(p)] = torch.tensor(p)
        mask[r, : len(p)] = 1
    cache = DynamicCache(config=model.config)
    model(  # no mask: right padding is invisible to causal attention (see _score_batch)
        input_ids=ids.to(device),
        position_ids=torch.arange(width).expand(len(prefixes), width).to(device),
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=torch.zeros((len(prefixes), width), dtype=torch.bool, device=device),
    )
    return cache, mask


def _select_rows(cache, rows: list[int], device: torch.device):
    """A new cache holding ``cache``'s batch rows ``rows`` (repeats allowed); ``cache`` is left as it was."""
    from transformers import DynamicCache

    index = torch.tensor(rows, device=device)
    kept = [(layer.keys.index_select(0, index), layer.values.index_select(0, index)) for layer in cache.layers]
    return DynamicCache(ddp_cache_data=kept)


def _plain_cache(model) -> bool:
    """Whether every layer caches plain full attention, which :func:`_select_rows` copies faithfully.

    Sliding-window, linear-attention and other special layers keep more state than keys and
    values (and a window counts cache slots, which the prefix padding would shift): no sharing.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    layers = DynamicCache(config=model.config).layers
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def token_nll_entropy(logits: torch.Tensor, labels: torch.Tensor, chunk_elems: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """-log softmax(logits)[label] and the entropy of softmax(logits), per row, in float32.

    Rows are processed in chunks (``*_FLOAT32_CHUNK`` elements), so the float32 copy of a
    large-vocabulary logits matrix never exists whole.
    """
    if chunk_elems is None:
        chunk_elems = GPU_FLOAT32_CHUNK if logits.device.type == "cuda" else CPU_FLOAT32_CHUNK
    step = max(1, chunk_elems // max(1, logits.shape[-1]))
    nll, ent = [], []
    for start in range(0, logits.shape[0], step):
        logp = torch.log_softmax(logits[start : start + step].float(), dim=-1)
        nll.append(-logp.gather(-1, labels[start : start + step, None]).squeeze(-1))
        ent.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(nll).double().cpu().numpy(), torch.cat(ent).double().cpu().numpy()


def _input_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device

