"""Seeded sampling: per-row determinism, greedy parity with generate(), the draw rule, copy rate."""

from __future__ import annotations

import math

import pytest
import torch

from ckptsel.measure.sampling import (
    copy_rate,
    draw_tokens,
    max_new_tokens_for,
    normalize_solution,
    sample_completions,
    sample_seed,
    sample_token_ids,
)
from ckptsel.settings import SamplingSettings

PROMPTS = [
    "What is 2+3?\n",
    "Q: A farmer has 17 sheep and buys 5 more. How many?\n",
    "x\n",
    "Natalia sold clips to 48 of her friends in April, and then half as many in May.\n",
    "Compute 7*6.\n",
    "Hi\n",
]



def test_completion_depends_only_on_key_and_sample_index(model, tokenizer):
    settings = SamplingSettings(k=2, temperature=0.8, top_p=0.95, seed=7)
    alone = sample_completions(model, tokenizer, [PROMPTS[1]], sampling=settings, max_new_tokens=24, keys=["ex1"])
    # Twelve mixed prompts, the same one in the middle with the same key, decoded in batches of 5.
    prompts = PROMPTS + PROMPTS[::-1]
    keys = [f"k{i}" for i in range(12)]
    prompts[7], keys[7] = PROMPTS[1], "ex1"
    mixed = sample_completions(model, tokenizer, prompts, sampling=settings, max_new_tokens=24, keys=keys, batch_size=5)
    assert len(alone) == 1 and len(alone[0]) == 2 and len(mixed) == 12
    assert mixed[7] == alone[0]
    assert alone[0][0] != alone[0][1]  # the two samples of one example differ
    assert mixed[7] != mixed[1]  # same prompt, different key: different samples
    assert sum(len(text) for group in mixed for text in group) > 200  # real text, not empty strings


def test_rows_leaving_the_batch_do_not_change_the_others(model, tokenizer):
    """Stop on many ids so rows finish at different steps; each row equals its solo decode."""
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS * 2]
    stop = set(tokenizer("aeiou 0123", add_special_tokens=False)["input_ids"])
    seeds = [sample_seed(0, "key", r) for r in range(len(prompt_ids))]
    kwargs = dict(temperature=1.0, top_p=0.9, max_new_tokens=30, eos_ids=stop)
    together = sample_token_ids(model, prompt_ids, seeds=seeds, batch_size=12, **kwargs)
    solo = [sample_token_ids(model, [p], seeds=[s], **kwargs)[0] for p, s in zip(prompt_ids, seeds)]
    assert together == solo
    lengths = {len(ids) for ids in together}
    assert len(lengths) >= 3  # rows really left the batch at different steps
    assert not any(stop & set(ids) for ids in together)  # the stop token itself is not returned


def test_greedy_equals_generate(model, tokenizer):
    settings = SamplingSettings(k=5, temperature=0.0)
    ours = sample_completions(model, tokenizer, PROMPTS, sampling=settings, max_new_tokens=20, keys=list(PROMPTS))
    assert all(len(group) == 1 for group in ours)  # greedy forces k = 1
    for prompt, [text] in zip(PROMPTS, ours):
        ids = tokenizer(prompt, return_tensors="pt")
        ref = model.generate(**ids, do_sample=False, max_new_tokens=20, pad_token_id=tokenizer.pad_token_id)
        assert text == tokenizer.decode(ref[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def test_draw_tokens_top_p_and_temperature_known_picks():
    # Probabilities 0.05, 0.5, 0.15, 0.3 at ids 0..3. top_p 0.7 keeps ids 1 (0.5) and 3 (0.3): 0.625 / 0.375.
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log().expand(4, 4)
    picks = draw_tokens(logits, torch.tensor([0.0, 0.6, 0.63, 0.999]), temperature=1.0, top_p=0.7)
    assert picks.tolist() == [1, 1, 3, 3]
    # Temperature 2 on logits (2 ln 2, 0): probabilities 2/3 and 1/3.
    two = torch.tensor([[2 * math.log(2.0), 0.0]]).expand(2, 2)
    assert draw_tokens(two, torch.tensor([0.66, 0.67]), temperature=2.0, top_p=1.0).tolist() == [0, 1]


def test_draw_tokens_frequencies_match_filtered_softmax():
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0])
    n = 40000
    picks = draw_tokens(logits.expand(n, 5), torch.rand(n, generator=torch.Generator().manual_seed(0)), 0.8, 0.9)
    probs = torch.softmax(logits / 0.8, -1)
    # Sorted: id 3 (.659), 0 (.189), 1 (.069), 4 (.054), 2 (.029). Mass before id 1 is .848 < .9: kept;
    # before id 4 it is .917: dropped, with id 2.
    kept = torch.tensor([1, 1, 0, 1, 0], dtype=torch.bool)
    want = torch.where(kept, probs, 0) / probs[kept].sum()
    freq = torch.bincount(picks, minlength=5).double() / n
    assert freq[2] == 0 and freq[4] == 0
    assert torch.allclose(freq, want.double(), atol=0.01)


def test_sample_seed_is_stable_and_distinct():
    assert sample_seed(0, "a", 0) == sample_seed(0, "a", 0)
    assert len({sample_seed(0, "a", 0), sample_seed(0, "a", 1), sample_seed(0, "b", 0), sample_seed(1, "a", 0)}) == 4
    assert 0 <= sample_seed(123, "x" * 100, 9) < 2**63


def test_max_new_tokens_for():
    assert max_new_tokens_for([10, 3]) == 31
    assert max_new_tokens_for([7]) == 27  # ceil(10.5) + 16
    assert max_new_tokens_for([]) == 16


def test_copy_rate_normalises_whitespace_but_keeps_case():
    target = "48/2 = 24\n#### 72"
    assert normalize_solution("  48/2  =\t24 \n\n#### 72 ") == "48/2 = 24 #### 72"
    samples = ["48/2 = 24 #### 72", " 48/2 = 24\n\n####  72\n", "48/2 = 25\n#### 73", "48/2 = 24\n#### 72."]
    assert copy_rate(samples, target) == 0.5
    assert copy_rate(["Let X = 1"], "Let x = 1") == 0.0
    assert math.isnan(copy_rate([], target))


@pytest.mark.parametrize("scale", [0.3, 3.0, 12.0])  # flat (full sort), mixed, peaked (candidates suffice)
def test_draw_tokens_candidate_shortcut_equals_full_sort(scale):
    gen = torch.Generator().manual_seed(int(scale * 10))
    logits = torch.randn(64, 3000, generator=gen) * scale
    logits[:8] = logits[:8].bfloat16().float()  # bf16 rounding: many exact ties
    logits[8, :5] = 4.0  # a five-way tie at the top
    uniforms = torch.rand(64, generator=gen)
    full = draw_tokens(logits, uniforms, 0.8, 0.95, candidates=3000)
    for candidates in (2, 16, 256):
        assert torch.equal(draw_tokens(logits, uniforms, 0.8, 0.95, candidates=candidates), full)
    assert len(set(full.tolist())) > 10  # real, varied picks


def test_per_row_budgets_and_prefix_stability(model, tokenizer):
    """A row's tokens depend on its own budget only, and a longer budget extends the same text."""
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    seeds = [sample_seed(3, p, 0) for p in PROMPTS]
    budgets = [5, 40, 12, 70, 1, 33]
    kwargs = dict(temperature=1.0, top_p=0.95, eos_ids={tokenizer.eos_token_id})
    mixed = sample_token_ids(model, prompt_ids, seeds=seeds, max_new_tokens=budgets, **kwargs)
    assert all(len(ids) <= b for ids, b in zip(mixed, budgets))
    assert sum(len(ids) == b for ids, b in zip(mixed, budgets)) >= 4  # most rows ran to their own budget
    long = sample_token_ids(model, prompt_ids, seeds=seeds, max_new_tokens=80, **kwargs)
    for ids, full in zip(mixed, long):
        assert ids == full[: len(ids)]
    with pytest.raises(ValueError):
        sample_token_ids(model, prompt_ids[:1], seeds=seeds[:1], max_new_tokens=0, **kwargs)


def test_preallocated_cache_writes_in_place_and_equals_a_dynamic_cache(model, tokenizer):
    """Decoding reads and writes one buffer per layer; the keys, values and logits are DynamicCache's."""
    from transformers import DynamicCache

    from ckptsel.measure.sampling import _preallocated_cache

    ids = torch.tensor([tokenizer(PROMPTS[3])["input_ids"]])
    ours, ref = _preallocated_cache(model, ids.shape[1] + 4), DynamicCache(config=model.config)
    with torch.inference_mode():
        logits = model(ids, past_key_values=ours, use_cache=True).logits[:, -1]
        model(ids, past_key_values=ref, use_cache=True)
        buffer = ours.layers[0]._keys.data_ptr()
        for _ in range(3):
            token = logits.argmax(-1, keepdim=True)
            logits = model(token, past_key_values=ours, use_cache=True).logits[:, -1]
            ref_logits = model(token, past_key_values=ref, use_cache=True).logits[:, -1]
            torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-6)
    assert ours.get_seq_length() == ref.get_seq_length() == ids.shape[1] + 3
    assert ours.layers[0]._keys.data_ptr() == buffer  # written in place, never reallocated
    for mine, theirs in zip(ours.layers, ref.layers):
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
