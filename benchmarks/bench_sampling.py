"""Figure (b): sampling throughput, ckptsel against a plain per-question ``model.generate`` loop.

Both draw k samples per GSM8K training question (gsm8k recipe prompts) with the same
settings: temperature 0.8, top-p 0.95, no top-k, the same ``max_new_tokens``, stopping at
EOS. ckptsel: ``sample_token_ids``, the engine under ``sample_completions`` (seeded per
(question, sample), decoded in batches across questions). The baseline: for each question
``model.generate(do_sample=True, temperature, top_p, top_k=0, num_return_sequences=k,
max_new_tokens)``. Throughput is generated tokens per second (EOS not counted), each side
its own count: random weights stop at EOS at random (the lab's character vocabulary of 100
makes EOS a 1-in-100 draw; a 152k vocabulary almost never stops).

    python benchmarks/bench_sampling.py --size lab --questions 32
    python benchmarks/bench_sampling.py --size qwen0.5b --questions 8 --max-new-tokens 32 --repeats 2
"""

from __future__ import annotations

import argparse

import bench_common as bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=bench.SIZES, default="lab")
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides (default 1)")
    parser.add_argument("--batch-size", type=int, default=None, help="ckptsel's decode batch (default: automatic)")
    args = parser.parse_args()
    bench.setup(args.threads)

    import torch

    from ckptsel.measure.sampling import sample_seed, sample_token_ids

    model, tokenizer = bench.load_model(args.size)
    examples = bench.gsm8k_examples(args.questions)
    eos = tokenizer.eos_token_id
    settings = dict(temperature=0.8, top_p=0.95)
    prompt_ids = [tokenizer(ex.prompt)["input_ids"] for ex in examples]
    rows = [ids for ids in prompt_ids for _ in range(args.k)]
    seeds = [sample_seed(0, ex.uid, s) for ex in examples for s in range(args.k)]
    print(bench.describe(model, args.size))
    print(
        f"{bench.machine()}; {len(examples)} questions x k={args.k}, max_new_tokens {args.max_new_tokens}, "
        f"prompts {sum(map(len, prompt_ids)) / len(prompt_ids):.0f} tokens on average"
    )
    tokens: dict[str, list[int]] = {"generate": [], "ckptsel": []}

    def ours():
        out = sample_token_ids(model, rows, seeds=seeds, max_new_tokens=args.max_new_tokens, eos_ids={eos},
                               pad_id=tokenizer.pad_token_id, batch_size=args.batch_size, **settings)
        tokens["ckptsel"].append(sum(len(ids) for ids in out))

    def generate():
        total = 0
        for ids in prompt_ids:
            prompt = torch.tensor([ids])
            out = model.generate(
                input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0,
                num_return_sequences=args.k, max_new_tokens=args.max_new_tokens, eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id, **settings,
            )
            for seq in out[:, len(ids):].tolist():
                total += seq.index(eos) if eos in seq else len(seq)
        tokens["generate"].append(total)

    sample_token_ids(model, rows[:2], seeds=seeds[:2], max_new_tokens=4, eos_ids={eos}, **settings)  # warm-up
    model.generate(input_ids=torch.tensor(prompt_ids[:1]), do_sample=True, max_new_tokens=4, pad_token_id=0)
    times = bench.interleaved({"generate": generate, "ckptsel": ours}, args.repeats)
    rate = {name: bench.median([n / t for n, t in zip(tokens[name], times[name])]) for name in times}
    for name in ("generate", "ckptsel"):
        print(f"  {name:9} {rate[name]:9,.1f} generated tok/s   {sum(tokens[name]):,} tokens in {bench.fmt_times(times[name])}")
    print(f"  ratio {rate['ckptsel'] / rate['generate']:.2f}x (median of {args.repeats}, interleaved); "
          f"load average {bench.load():.2f}")


if __name__ == "__main__":
    main()
