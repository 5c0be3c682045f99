"""Shared prompt prefixes in score_token_pairs: the grouping rule, the work saved, and exactness."""

from __future__ import annotations

import numpy as np
import torch

from ckptsel.measure.scoring import encode_pairs, plan_batches, score_token_pairs, share_prefixes
from ckptsel.proxies import PERTURBATIONS

QUESTIONS = [
    "Natalia sold clips to 48 of her friends in April, and then half as many in May. How many in all?",
    "Weng earns $12 an hour for babysitting. Yesterday she did 50 minutes of babysitting. How much did she earn?",
]
SOLUTIONS = [
    ["48/2 = 24 in May.\n48+24 = 72\n#### 72", "In May she sold 24, so 72 in total.\n#### 72", "72"],
    ["12/60 = 0.2 per minute.\n0.2*50 = 10\n#### 10", "50 minutes is 5/6 of an hour: $10.\n#### 10"],
]



def workload(tokenizer):
    """ckptsel's own requests: each question with its solutions and its target under each perturbation."""
    prompts, targets = [], []
    for question, solutions in zip(QUESTIONS, SOLUTIONS):
        prompt = f"Question: {question}\nAnswer:"
        for solution in solutions:
            prompts.append(prompt)
            targets.append(" " + solution)
        for perturb in PERTURBATIONS.values():
            prompts.append(perturb(prompt))
            targets.append(" " + solutions[0])
    return encode_pairs(tokenizer, prompts, targets)


def alone(model, pairs):
    """Each pair scored in a call of its own: nothing to share."""
    results = [score_token_pairs(model, [pair]) for pair in pairs]
    return np.array([r.nll[0] for r in results]), np.array([r.entropy[0] for r in results])


def test_share_prefixes_on_hand_made_prompts():
    a = [1, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    b = a[:8] + [20, 21, 22]  # shares 8 tokens with a
    c = [1, 30, 31]  # shares only BOS
    groups = share_prefixes([a, c, a, b, a], min_shared=4)
    # Sorted: a, a, a (share 9 = all but the last token), then b (8 in common: 4 * 8 > 3 * 9), then c alone.
    assert groups == [(8, [0, 2, 4, 3]), (0, [1])]
    assert share_prefixes([a, c, a, b, a], min_shared=9) == [(9, [0, 2, 4]), (0, [3]), (0, [1])]
    # A newcomer that shrinks the prefix too much starts its own group: d keeps 5 of a's 9 (1 * 5 > 0 * 9: joins),
    # e keeps 2 of those 5 (2 * 2 > 1 * 5 fails: alone).
    d = a[:5] + [40, 41, 42]
    e = a[:2] + [50, 51, 52, 53]
    assert share_prefixes([a, d, e], min_shared=2) == [(5, [0, 1]), (0, [2])]
    assert share_prefixes([], min_shared=2) == []


def test_plan_batches_bounds_padding():
    # Longest first: 100, 90, 70, 60. A row shorter than 75% of its batch's longest starts a new batch.
    assert plan_batches([60, 100, 70, 90], [1] * 4, token_budget=10_000, max_padding=0.25) == [[1, 3], [2, 0]]
    assert plan_batches([60, 100, 70, 90], [1] * 4, token_budget=10_000) == [[1, 3, 2, 0]]


def test_shared_scoring_equals_each_pair_alone(model, tokenizer):
    pairs = workload(tokenizer)
    shared = score_token_pairs(model, pairs)
    nll, ent = alone(model, pairs)
    np.testing.assert_allclose(shared.nll, nll, atol=1e-5, rtol=0)
    np.testing.assert_allclose(shared.entropy, ent, atol=1e-5, rtol=0)
    assert np.all((shared.nll > 3.0) & (shared.nll < 6.0))  # real NLLs of a near-uniform random model
    for bs in (2, 3):  # groups split across batches still score the same
        np.testing.assert_allclose(score_token_pairs(model, pairs, batch_size=bs).nll, nll, atol=1e-5, rtol=0)


def test_shared_prefix_runs_once(model, tokenizer):
    """Three targets for one prompt: one pass over the prompt, one over the three targets."""
    prompt = "Question: " + QUESTIONS[0] + "\nAnswer:"
    targets = [" " + s for s in SOLUTIONS[0][:2]] + [" She sold 24 in May, 72 in all.\n#### 72"]  # similar lengths
    pairs = encode_pairs(tokenizer, [prompt] * 3, targets)
    shapes = []
    embeddings = model.get_input_embeddings()
    handle = embeddings.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    try:
        shared = score_token_pairs(model, pairs)
    finally:
        handle.remove()
    n_prompt = len(pairs[0][0])
    longest = max(len(t) for _, t in pairs)
    # The prefix is the prompt but its last token, whose logits predict the first target token.
    assert shapes == [(1, n_prompt - 1), (3, 1 + longest)]
    np.testing.assert_allclose(shared.nll, alone(model, pairs)[0], atol=1e-5, rtol=0)


def test_empty_targets_and_lone_prompts_mix_with_groups(model, tokenizer):
    prompts = ["Q: 2+2?\nA:", "Q: 2+2?\nA:", "Different prompt\n", "Q: 2+2?\nA:"]
    targets = [" 4", "", " four", " 2+2=4"]
    pairs = encode_pairs(tokenizer, prompts, targets, append_eos=False)
    res = score_token_pairs(model, pairs)
    assert res.n_tokens.tolist() == [2, 0, 5, 6]
    assert np.isnan(res.nll[1])
    keep = [0, 2, 3]
    np.testing.assert_allclose(res.nll[keep], alone(model, [pairs[i] for i in keep])[0], atol=1e-5, rtol=0)


def test_sharing_through_a_lora_wrapper(model, tokenizer):
    """The loader hands out PEFT-wrapped models for adapter checkpoints; the cache passes through."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    wrapped = get_peft_model(copy.deepcopy(model), config)
    wrapped.eval()
    pairs = workload(tokenizer)
    shared = score_token_pairs(wrapped, pairs)
    np.testing.assert_allclose(shared.nll, alone(wrapped, pairs)[0], atol=1e-5, rtol=0)
    assert np.abs(shared.nll - score_token_pairs(model, pairs).nll).max() > 1e-3  # the adapter is really applied
