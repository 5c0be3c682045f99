"""Target NLL against hand computations on the tiny Llama (float32, CPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ckptsel.measure.scoring import encode_pairs, plan_batches, score_targets, token_nll_entropy

PROMPTS = [
    "What is 2+3?\n",
    "Q: A farmer has 17 sheep and buys 5 more. How many?\n",
    "x\n",
    "Natalia sold clips to 48 of her friends in April, and then half as many in May.\n",
    "Compute 7*6.\n",
    "Hi\n",
]
TARGETS = [
    "2+3=5\n#### 5",
    "17+5=22\n#### 22",
    "#### 0",
    "48/2=24 in May; 48+24=72\n#### 72",
    "42",
    "a much longer answer that goes on for a while to make the lengths differ\n#### 1",
]



def hand_scores(model, tokenizer, prompt: str, target: str, append_eos: bool = True):
    """One unpadded full forward, log-softmax everywhere, sliced at the target positions."""
    p = tokenizer(prompt)["input_ids"]
    t = tokenizer(target, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if append_eos else [])
    ids = torch.tensor([p + t])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    pos = torch.arange(len(p) - 1, len(p) + len(t) - 1)
    nll = -logp[pos, torch.tensor(t)]
    ent = -(logp[pos].exp() * logp[pos]).sum(-1)
    return nll.mean().item(), ent.mean().item(), len(t)


def test_nll_and_entropy_equal_hand_computation(model, tokenizer):
    res = score_targets(model, tokenizer, PROMPTS, TARGETS)
    for i, (p, t) in enumerate(zip(PROMPTS, TARGETS)):
        nll, ent, n = hand_scores(model, tokenizer, p, t)
        assert res.n_tokens[i] == n == len(t) + 1  # char-level: one token per char, plus EOS
        assert res.nll[i] == pytest.approx(nll, abs=1e-5)
        assert res.entropy[i] == pytest.approx(ent, abs=1e-5)
    # A random 2-layer model is near uniform over ~100 characters: the numbers are real NLLs.
    assert np.all((res.nll > 3.0) & (res.nll < 6.0))


def test_prompt_tokens_excluded_matches_trainer_loss(model, tokenizer):
    """Same number as a Trainer's loss with the prompt labels masked to -100, not the unmasked one."""
    prompt, target = PROMPTS[1], TARGETS[1]
    [(p, t)] = encode_pairs(tokenizer, [prompt], [target])
    ids = torch.tensor([p + t])
    masked = ids.clone()
    masked[0, : len(p)] = -100
    with torch.no_grad():
        loss_target = model(ids, labels=masked).loss.item()
        loss_all = model(ids, labels=ids).loss.item()
    nll = score_targets(model, tokenizer, [prompt], [target]).nll[0]
    assert nll == pytest.approx(loss_target, abs=1e-5)
    assert abs(nll - loss_all) > 1e-3


def test_eos_is_scored_when_appended(model, tokenizer):
    with_eos = score_targets(model, tokenizer, PROMPTS, TARGETS, append_eos=True)
    without = score_targets(model, tokenizer, PROMPTS, TARGETS, append_eos=False)
    np.testing.assert_array_equal(with_eos.n_tokens, without.n_tokens + 1)
    for i, (p, t) in enumerate(zip(PROMPTS, TARGETS)):
        ids = torch.tensor([tokenizer(p + t)["input_ids"]])
        with torch.no_grad():
            eos_nll = -torch.log_softmax(model(ids).logits[0, -1].double(), -1)[tokenizer.eos_token_id].item()
        total = without.nll[i] * without.n_tokens[i] + eos_nll
        assert with_eos.nll[i] * with_eos.n_tokens[i] == pytest.approx(total, abs=1e-4)


def test_scores_do_not_depend_on_batch_size_or_order(model, tokenizer):
    prompts, targets = PROMPTS * 2, TARGETS[::-1] + TARGETS  # 12 pairs, mixed lengths
    auto = score_targets(model, tokenizer, prompts, targets)
    for bs in (1, 3, 8):
        other = score_targets(model, tokenizer, prompts, targets, batch_size=bs)
        np.testing.assert_allclose(other.nll, auto.nll, atol=1e-5, rtol=0)
        np.testing.assert_allclose(other.entropy, auto.entropy, atol=1e-5, rtol=0)
    perm = np.random.default_rng(0).permutation(len(prompts))
    shuffled = score_targets(model, tokenizer, [prompts[i] for i in perm], [targets[i] for i in perm], batch_size=5)
    np.testing.assert_allclose(shuffled.nll, auto.nll[perm], atol=1e-5, rtol=0)


def test_empty_target_without_eos_is_nan(model, tokenizer):
    res = score_targets(model, tokenizer, ["Q\n", "Q\n"], ["", "1"], append_eos=False)
    assert res.n_tokens.tolist() == [0, 1]
    assert math.isnan(res.nll[0]) and not math.isnan(res.nll[1])


def test_token_nll_entropy_chunking_and_known_values():
    # Two rows over a 3-token vocabulary: uniform, and a peaked one.
    logits = torch.tensor([[0.0, 0.0, 0.0], [math.log(8.0), 0.0, 0.0]])
    labels = torch.tensor([1, 0])
    nll, ent = token_nll_entropy(logits, labels)
    assert nll[0] == pytest.approx(math.log(3))
    assert nll[1] == pytest.approx(-math.log(0.8))
    assert ent[0] == pytest.approx(math.log(3))
    assert ent[1] == pytest.approx(-(0.8 * math.log(0.8) + 2 * 0.1 * math.log(0.1)))
    chunked = token_nll_entropy(logits, labels, chunk_elems=3)  # one row per chunk
    np.testing.assert_allclose(chunked[0], nll)
    np.testing.assert_allclose(chunked[1], ent)


def test_plan_batches_by_budget_and_by_size():
    lengths = [10, 50, 20, 40, 30]
    scored = [5, 5, 5, 5, 5]
    # Longest first: 50, 40, 30, 20, 10. Budget 100: [50, 40] (2x50=100), [30, 20, 10] (3x30=90).
    assert plan_batches(lengths, scored, token_budget=100) == [[1, 3], [4, 2, 0]]
    assert plan_batches(lengths, scored, batch_size=2) == [[1, 3], [4, 2], [0]]
    # Scored-token cap: at most 10 target tokens per batch.
    assert plan_batches(lengths, scored, token_budget=1000, scored_budget=10) == [[1, 3], [4, 2], [0]]
    # A row longer than the budget still gets its own batch.
    assert plan_batches([500, 5], [1, 1], token_budget=100) == [[0], [1]]
