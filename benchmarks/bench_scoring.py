"""Figure (a): target-NLL scoring throughput, ckptsel against lm-eval's HF ``loglikelihood``.

Both score identical (context, continuation) requests built from GSM8K training questions
(gsm8k recipe: ``Question: {q}\\nAnswer:`` and `` {answer}``, EOS appended) with the same
in-memory model and tokenizer:

workload  ckptsel's own: per question, the target and two alternative solutions after the
          prompt, and the target after each of the three prompt perturbations of
          ``ckptsel.proxies`` (preamble, format, instruction): 6 requests, all in one call.
plain     one continuation per question: (prompt, target).

The ``bound`` line is the most any exact scheme could save: every distinct prefix of a
request (a trie node) goes through the model once, the LM head runs at target positions only.

ckptsel: ``score_token_pairs`` on the pairs ``encode_pairs`` gives. lm-eval:
``HFLM(pretrained=model, tokenizer=tokenizer).loglikelihood`` on ``Instance`` requests whose
continuation is the target followed by the EOS token's text; the script checks that lm-eval
tokenises every request into exactly our ids, and that the two agree on every request's
sum of log-probabilities. Throughput is target tokens scored per second (EOS included), the
same count for both.

    python benchmarks/bench_scoring.py --size lab --questions 64
    python benchmarks/bench_scoring.py --size qwen0.5b --questions 4 --repeats 3
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import bench_common as bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=bench.SIZES, default="lab")
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides (default 1)")
    parser.add_argument("--lm-eval-batch", type=int, default=8, help="lm-eval's batch size (its default is 1)")
    args = parser.parse_args()
    bench.setup(args.threads)

    import numpy as np
    from lm_eval.models.huggingface import HFLM

    from ckptsel.measure.scoring import encode_pairs, score_token_pairs

    model, tokenizer = bench.load_model(args.size)
    examples = bench.gsm8k_examples(args.questions)

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.lm_eval_batch, device="cpu", add_bos_token=True,
              max_length=model.config.max_position_embeddings)
    head_params = model.get_output_embeddings().weight.numel()
    body_params = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    body_params -= 0 if model.config.tie_word_embeddings else head_params
    print(bench.describe(model, args.size))
    print(f"{bench.machine()}; lm-eval batch size {args.lm_eval_batch}")

    for name, requests in requests_for(examples).items():
        prompts, targets = [p for p, _ in requests], [t for _, t in requests]
        pairs = encode_pairs(tokenizer, prompts, targets, append_eos=True)
        instances = lm_eval_instances(lm, tokenizer, requests, pairs, name)
        n_target = sum(len(t) for _, t in pairs)

        results = {}
        counter = WorkCounter(model)

        def ours():
            counter.side = "ckptsel"
            results["ckptsel"] = score_token_pairs(model, pairs)

        def theirs():
            counter.side = "lm-eval"
            results["lm-eval"] = lm.loglikelihood(instances, disable_tqdm=True)

        score_token_pairs(model, pairs[:2])  # warm-up, both sides, not counted
        lm.loglikelihood(instances[:2], disable_tqdm=True)
        times = bench.interleaved({"lm-eval": theirs, "ckptsel": ours}, args.repeats)
        counter.close()

        res = results["ckptsel"]
        ours_sum = -(res.nll * res.n_tokens)
        theirs_sum = np.array([ll for ll, _ in results["lm-eval"]])
        diff = np.abs(ours_sum - theirs_sum)
        per_token = float((diff / res.n_tokens).max())
        print(f"\n[{name}] {len(pairs)} requests ({len(examples)} questions), {n_target:,} target tokens")
        print(
            f"  agreement: max |sum logprob difference| {diff.max():.2e} nats on sums up to {np.abs(theirs_sum).max():,.0f}; "
            f"max per token {per_token:.1e}"
        )
        if per_token > 1e-5:
            raise SystemExit(f"{name}: ckptsel and lm-eval disagree by {per_token:.1e} nats per token")
        work = {side: [n // args.repeats for n in counter.counts[side]] for side in ("lm-eval", "ckptsel")}
        (body_theirs, head_theirs), (body_ours, head_ours) = work["lm-eval"], work["ckptsel"]
        macs = {side: body * body_params + head * head_params for side, (body, head) in work.items()}
        print(
            f"  work: token positions through the model (padding included) {body_theirs:,} vs {body_ours:,}, "
            f"through the LM head {head_theirs:,} vs {head_ours:,}: {macs['lm-eval'] / macs['ckptsel']:.2f}x "
            "fewer weight multiply-adds (attention aside)"
        )
        least = distinct_prefixes([(p + t)[:-1] for p, t in pairs])
        print(
            f"  bound: exact sharing cannot go below the {least:,} distinct prefixes of the requests, "
            f"{macs['lm-eval'] / (least * body_params + n_target * head_params):.2f}x fewer multiply-adds than lm-eval"
        )
        t_ours, t_theirs = bench.median(times["ckptsel"]), bench.median(times["lm-eval"])
        print(f"  lm-eval   {n_target / t_theirs:10,.0f} target tok/s   {bench.fmt_times(times['lm-eval'])}")
        print(f"  ckptsel   {n_target / t_ours:10,.0f} target tok/s   {bench.fmt_times(times['ckptsel'])}")
        print(f"  ratio {t_theirs / t_ours:.2f}x (median of {args.repeats}, interleaved); load average {bench.load():.2f}")


def requests_for(examples) -> dict[str, list[tuple[str, str]]]:
    """The (prompt, target) requests of both workloads (module docstring), for ``examples``."""
    from ckptsel.proxies import PERTURBATIONS

    workload = []
    for ex in examples:
        workload += [(ex.prompt, ex.target)] + [(ex.prompt, alt) for alt in bench.alternative_solutions(ex.target)]
        workload += [(perturb(ex.prompt), ex.target) for perturb in PERTURBATIONS.values()]
    return {"workload": workload, "plain": [(ex.prompt, ex.target) for ex in examples]}


def lm_eval_instances(lm, tokenizer, requests: list[tuple[str, str]], pairs, name: str) -> list:
    """lm-eval ``loglikelihood`` requests for ``requests``, continuation = target + EOS text.

    Exits unless lm-eval tokenises every request into exactly the ids of ``pairs`` (ckptsel's).
    """
    from lm_eval.api.instance import Instance

    same = sum(lm._encode_pair(p, t + tokenizer.eos_token) == pair for (p, t), pair in zip(requests, pairs))
    if same != len(pairs):
        raise SystemExit(f"{name}: lm-eval tokenises {len(pairs) - same} of {len(pairs)} requests differently")
    return [
        Instance(request_type="loglikelihood", doc={}, arguments=(p, t + tokenizer.eos_token), idx=i)
        for i, (p, t) in enumerate(requests)
    ]


def distinct_prefixes(sequences: list[list[int]]) -> int:
    """Nodes of the trie of ``sequences``: positions that must go through the model, whatever is shared."""
    root: dict = {}
    count = 0
    for seq in sequences:
        node = root
        for token in seq:
            if token not in node:
                node[token] = {}
                count += 1
            node = node[token]
    return count


class WorkCounter:
    """Token positions entering the model and rows leaving its LM head, per side of the comparison."""

    def __init__(self, model):
        self.side: str | None = None  # None: not counted (warm-up)
        self.counts: dict[str | None, list[int]] = defaultdict(lambda: [0, 0])
        self._hooks = [
            model.get_input_embeddings().register_forward_hook(self._body),
            model.get_output_embeddings().register_forward_hook(self._head),
        ]

    def _body(self, module, args, output) -> None:
        self.counts[self.side][0] += args[0].numel()

    def _head(self, module, args, output) -> None:
        self.counts[self.side][1] += output.shape[:-1].numel()

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


if __name__ == "__main__":
    main()
