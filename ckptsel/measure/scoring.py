"""Teacher-forced target NLL: nll_i = mean_t -log p(y_t | x, y_<t), prompt tokens excluded.

Tokenisation (it must match how the model was fine-tuned, or every NLL is off):
the prompt is tokenised *with* the tokenizer's special tokens (a Llama tokenizer prepends
BOS), the target *without* them, and the two id lists are concatenated; with
``append_eos`` the EOS id follows the target. This is how SFT trainers that tokenise a
(prompt, completion) pair build their inputs, and how ``ckptsel.lab.train.encode`` does. Note
that tokenising the two parts separately can differ from tokenising ``prompt + target``
as one string at the boundary for BPE vocabularies; the separate form is the one the loss
was computed on, so it is the one scored here.

How the work is kept small: pairs are sorted by total length and cut into batches under a
token budget (padding stays small); rows are right-padded, so with causal attention the pad
tokens never influence a real position; the model's own ``logits_to_keep`` boolean mask
projects only the hidden states at target positions through the LM head (with a large
vocabulary that head is most of the cost); log-softmax runs in float32 in row chunks.
The result never depends on batch size or order, only on each (prompt, target) pair.

Several targets per prompt (perturbations, alternative solutions) come in as separate
pairs; :func:`score_token_pairs` is the place where shared prompt prefixes can be scored
once (issue 9).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ckptsel.errors import DataError

TokenPair = tuple[list[int], list[int]]

# Automatic batch size: padded tokens per forward pass, and elements of the logits matrix
# the model returns (target tokens x vocabulary, in the model's dtype). On CPU a few rows of
# GSM8K length already make large matmuls, and bigger batches measured slower (cache
# misses); on a GPU a larger batch keeps the device busy.
CPU_TOKEN_BUDGET, GPU_TOKEN_BUDGET = 1024, 32768
CPU_LOGITS_BUDGET, GPU_LOGITS_BUDGET = 2**27, 2**30
# Elements per float32 log-softmax chunk: on CPU 1 MiB, about an L2 cache, which makes the
# passes over it 2-3x faster than over main memory; on a GPU, large enough to fill it.
CPU_FLOAT32_CHUNK, GPU_FLOAT32_CHUNK = 2**18, 2**26


@dataclass(frozen=True)
class ScoreResult:
    """Per-pair scores, in input order.

    ``nll``: mean negative log-likelihood per target token, nats (NaN for an empty target).
    ``n_tokens``: target tokens scored (EOS included when appended).
    ``entropy``: mean predictive entropy over the same positions, nats.
    """

    nll: np.ndarray
    n_tokens: np.ndarray
    entropy: np.ndarray
    # MoE models scored with ``routers=True``: per-pair router softmax averaged over the target
    # tokens (N, layers, experts), and the routers' expert vectors (layers, experts, hidden).
    router_weights: np.ndarray | None = None
    gate_vectors: np.ndarray | None = None

    @property
    def ppl(self) -> np.ndarray:
        return np.exp(self.nll)


def encode_pairs(tokenizer, prompts: Sequence[str], targets: Sequence[str], *, append_eos: bool = True) -> list[TokenPair]:
    """Token ids of each (prompt, target) pair, split the way an SFT trainer splits them."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    if append_eos and tokenizer.eos_token_id is None:
        raise DataError("append_eos is set but the tokenizer has no EOS token")
    prompt_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    target_ids = tokenizer(list(targets), add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if append_eos else []
    pairs = []
    for i, (p, t) in enumerate(zip(prompt_ids, target_ids)):
        if not p and t:
            raise DataError(
                f"pair {i}: empty prompt and the tokenizer adds no BOS, so the first target token has no context"
            )
        pairs.append((list(p), list(t) + eos))
    return pairs


def score_targets(
    model,
    tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    append_eos: bool = True,
    batch_size: int | None = None,
    routers: bool = False,
) -> ScoreResult:
    """Score each target given its prompt; see the module docstring for tokenisation.

    ``routers``: on a mixture-of-experts model, also capture each pair's routing weights in
    the same forward pass (``ckptsel.measure.routers``); ignored for dense models.
    """
    pairs = encode_pairs(tokenizer, prompts, targets, append_eos=append_eos)
    return score_token_pairs(model, pairs, batch_size=batch_size, routers=routers)


def plan_batches(
    lengths: Sequence[int],
    scored: Sequence[int],
    *,
    batch_size: int | None = None,
    token_budget: int = CPU_TOKEN_BUDGET,
    scored_budget: int | None = None,
) -> list[list[int]]:
    """Cut indices into batches of similar length, longest first.

    ``lengths`` are the total (padded-to) lengths, ``scored`` the target-token counts.
    With ``batch_size`` the batches have that many rows; otherwise a batch grows while
    rows x longest length stays within ``token_budget`` and the scored tokens within
    ``scored_budget``. A single row is never split, however long. Longest first, so an
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
            if full:
                batches.append(current)
                current, current_scored = [], 0
        current.append(i)
        current_scored += scored[i]
    if current:
        batches.append(current)
    return batches


@torch.inference_mode()
def score_token_pairs(
    model, pairs: Sequence[TokenPair], *, batch_size: int | None = None, routers: bool = False
) -> ScoreResult:
    """Score already-tokenised (prompt ids, target ids) pairs; the engine under :func:`score_targets`."""
    from ckptsel.measure.routers import capture_routers, find_routers

    if routers and find_routers(model) is not None:
        with capture_routers(model) as capture:
            return _score_all(model, pairs, batch_size, capture)
    return _score_all(model, pairs, batch_size, None)


def _score_all(model, pairs: Sequence[TokenPair], batch_size: int | None, capture) -> ScoreResult:
    n = len(pairs)
    nll_sum = np.zeros(n)
    ent_sum = np.zeros(n)
    n_tokens = np.array([len(t) for _, t in pairs], dtype=np.int64)
    device = _input_device(model)
    gpu = device.type == "cuda"
    vocab = model.config.get_text_config().vocab_size
    batches = plan_batches(
        [len(p) + len(t) for p, t in pairs],
        n_tokens.tolist(),
        batch_size=batch_size,
        token_budget=GPU_TOKEN_BUDGET if gpu else CPU_TOKEN_BUDGET,
        scored_budget=(GPU_LOGITS_BUDGET if gpu else CPU_LOGITS_BUDGET) // vocab,
    )
    weights = None
    if capture is not None:
        weights = np.full((n, capture.num_layers, capture.num_experts), np.nan, dtype=np.float32)
    was_training = model.training
    model.eval()
    try:
        for rows in batches:
            rows = [i for i in rows if n_tokens[i] > 0]
            if not rows:
                continue
            nll, ent, owner, routed = _score_batch(model, [pairs[i] for i in rows], device, capture)
            row_ids = np.asarray(rows)[owner]
            np.add.at(nll_sum, row_ids, nll)
            np.add.at(ent_sum, row_ids, ent)
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
            router_weights=weights,
            gate_vectors=gates,
        )


def _score_batch(model, pairs: list[TokenPair], device: torch.device, capture=None):
    """One forward pass: per-target-token NLL, entropy, the batch row each belongs to, and routing weights."""
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
    out = model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        logits_to_keep=keep.to(device),
        use_cache=False,
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

