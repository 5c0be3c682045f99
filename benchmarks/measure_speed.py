"""Throughput of the measurement engine on a small Llama, GSM8K lengths, random weights.

Scoring: target tokens scored per second by ``score_targets`` (auto batch), next to a
naive loop (one example per forward, logits at every position). Sampling: sampled tokens
per second by ``sample_token_ids``, the engine under ``sample_completions`` (k samples per
question, seeded per row; token ids, since a widened vocabulary has ids the char tokenizer
cannot decode), next to a
plain per-question ``model.generate`` loop with the same settings. Random weights rarely
emit EOS, so every sample runs to the token budget: this measures decoding speed, not
answer length.

    python benchmarks/measure_speed.py [--layers 4 --hidden 256 --vocab 32000 --examples 64 --questions 8 --threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/work/shared/data/gsm8k/train.jsonl")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=None,
                        help="LM-head size (default: the char vocabulary); larger ids are never used, only paid for")
    parser.add_argument("--examples", type=int, default=64, help="scored (question, answer) pairs")
    parser.add_argument("--questions", type=int, default=8, help="questions sampled, k each")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ckptsel.lab.tokenizer import build_tokenizer
    from ckptsel.measure.sampling import sample_seed, sample_token_ids
    from ckptsel.measure.scoring import score_targets

    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab or len(tokenizer), hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
        max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    with tempfile.TemporaryDirectory() as tmp:  # save + load: the model as the loader would give it
        LlamaForCausalLM(config).save_pretrained(tmp)
        model = LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()[: args.examples]]
    prompts = [r["question"] + "\n" for r in rows]
    targets = [r["answer"] for r in rows]
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model: Llama {args.layers} layers, hidden {args.hidden}, vocab {config.vocab_size}, {params:.1f}M params; "
          f"torch threads {torch.get_num_threads()}; load {os.getloadavg()[0]:.1f}")

    score_targets(model, tokenizer, prompts[:4], targets[:4])  # warm-up
    t = time.perf_counter()
    res = score_targets(model, tokenizer, prompts, targets)
    ours = time.perf_counter() - t
    n_target = int(res.n_tokens.sum())
    n_total = n_target + sum(len(tokenizer(p)["input_ids"]) for p in prompts)
    t = time.perf_counter()
    with torch.inference_mode():
        for p, y in zip(prompts, targets):
            ids = torch.tensor([tokenizer(p)["input_ids"] + tokenizer(y, add_special_tokens=False)["input_ids"] + [2]])
            torch.log_softmax(model(ids).logits.float(), -1)
    naive = time.perf_counter() - t
    print(f"scoring: {len(prompts)} examples, {n_target} target tokens ({n_total} with prompts): "
          f"{n_target / ours:,.0f} target tok/s ({n_total / ours:,.0f} tok/s all) in {ours:.2f} s; "
          f"naive per-example loop {n_target / naive:,.0f} target tok/s -> {naive / ours:.2f}x")

    qs = prompts[: args.questions]
    prompt_ids = [tokenizer(q)["input_ids"] for q in qs for _ in range(args.k)]
    seeds = [sample_seed(0, str(i), s) for i in range(len(qs)) for s in range(args.k)]
    decode = dict(temperature=0.8, top_p=0.95, eos_ids={tokenizer.eos_token_id})
    sample_token_ids(model, prompt_ids[:1], seeds=seeds[:1], max_new_tokens=4, **decode)  # warm-up
    t = time.perf_counter()
    out = sample_token_ids(model, prompt_ids, seeds=seeds, max_new_tokens=args.max_new_tokens, **decode)
    ours = time.perf_counter() - t
    n_sampled = sum(len(ids) for ids in out)
    t = time.perf_counter()
    n_plain = 0
    for q in qs:
        ids = tokenizer(q, return_tensors="pt")
        gen = model.generate(**ids, do_sample=True, temperature=0.8, top_p=0.95, top_k=0, num_return_sequences=args.k,
                             max_new_tokens=args.max_new_tokens, pad_token_id=0)
        n_plain += int((gen[:, ids["input_ids"].shape[1]:] != 0).sum())
    plain = time.perf_counter() - t
    print(f"sampling: {len(qs)} questions x k={args.k}, up to {args.max_new_tokens} new tokens: "
          f"{n_sampled / ours:,.0f} sampled tok/s in {ours:.2f} s; "
          f"per-question generate(num_return_sequences=k) {n_plain / plain:,.0f} tok/s -> "
          f"{(n_sampled / ours) / (n_plain / plain):.2f}x")


if __name__ == "__main__":
    main()
