"""Speed of the pathway metrics: edit distances, and router capture in the scoring pass.

Distances: ``pathway_distance`` (whole pathways plus the per-layer breakdown) for N
examples x L layers, on synthetic routing weights (Dirichlet per example and layer; a
small concentration gives peaked routing and short pathways, a large one flat routing
and long pathways). The cost is set by the pathway length, printed with each row, in
wall seconds and in CPU seconds of all threads (on a shared machine the CPU time / cores
is the better estimate of the wall time on an idle one). Target (issue 6): 1,000
examples x 16 layers in <= 2 s on 2 cores. Distances run under ``PathwaySettings``'
default pair budget (``--max-pairs``; 0: exact all pairs); a row marked "estimate" was
computed on sampled pairs and prints its standard error. ``--check-examples`` pathways of
the worst case are then measured both ways, to show the estimate's error against exact.

Capture: ``score_token_pairs`` as ``ckptsel rank`` runs it on an MoE checkpoint (with
``routers=True`` and the per-example layer cosines it stores) against plain scoring, and a
hand-written scoring pass (same batches, forward call and NLL) with and without
``capture_routers`` + ``reduce`` for both sources, on GSM8K train pairs with a randomly
initialised OLMoE. Runs alternate and
the median of each is reported, in CPU seconds of this process on one torch thread:
wall time on a shared machine moves by 2x between identical runs, CPU time hardly does.
Target: overhead <= 10%.

    python benchmarks/pathway_speed.py [--examples 1000 --layers 16 --workers 2 --max-pairs 50000
        --check-examples 1000 --pairs 16 --repeats 5 --skip capture]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from ckptsel.settings import PathwaySettings

DISTANCE_CASES = [  # (experts, Dirichlet concentration, cut-off)
    (4, 1.0, 0.8),  # the lab's MoE: 4 experts, top-2
    (8, 1.0, 0.8),  # Mixtral-like: 8 experts
    (64, 0.05, 0.8),  # OLMoE-like, peaked routing
    (64, 0.2, 0.8),
    (64, 1.0, 0.5),
    (64, 1.0, 0.8),  # OLMoE-like, flat routing: the worst case
]


def bench_distances(n: int, layers: int, workers: int, max_examples: int | None, max_pairs: int | None,
                    cases: list[tuple[int, float, float]] = DISTANCE_CASES) -> list[dict]:
    import numpy as np

    from ckptsel.pathways import pathway_distance, pathways

    rows = []
    for experts, alpha, cutoff in cases:
        rng = np.random.default_rng(0)
        weights = rng.dirichlet(np.full(experts, alpha), size=(n, layers))
        t0, c0 = time.perf_counter(), time.process_time()
        paths = pathways(weights, cutoff)
        t1 = time.perf_counter()
        result = pathway_distance(paths, experts, layers, workers=workers, max_examples=max_examples,
                                  max_pairs=max_pairs)
        t2, c2 = time.perf_counter(), time.process_time()
        rows.append({
            "experts": experts, "alpha": alpha, "cutoff": cutoff, "examples": result.n_examples,
            "mean_length": round(result.mean_length, 1), "distance": round(result.mean, 3),
            "exact": result.exact, "stderr": round(result.stderr, 4),
            "pathways_s": round(t1 - t0, 3), "distance_s": round(t2 - t1, 3), "cpu_s": round(c2 - c0, 3),
        })
        how = "exact   " if result.exact else f"estimate, stderr {result.stderr:.3f}"
        print(f"  E={experts:3d} alpha={alpha:<5} cutoff={cutoff}  N={result.n_examples}"
              f"  length {result.mean_length:6.1f}  distance {result.mean:8.2f} ({how})"
              f"  pathways {t1 - t0:5.2f}s  distances {t2 - t1:6.2f}s wall, {c2 - c0:6.2f} CPU s in all", flush=True)
    return rows


def check_estimate(n: int, layers: int, workers: int, max_pairs: int) -> dict:
    """The worst case on ``n`` examples, exact and under the pair budget: the estimate's error in its stderrs."""
    exact, estimate = (bench_distances(n, layers, workers, None, budget, DISTANCE_CASES[-1:])[0]
                       for budget in (None, max_pairs))
    error = estimate["distance"] - exact["distance"]
    z = error / estimate["stderr"] if estimate["stderr"] else float("nan")
    print(f"  estimate - exact = {error:+.3f} ({z:+.2f} standard errors); "
          f"{exact['distance_s']:.2f}s exact vs {estimate['distance_s']:.2f}s estimated")
    return {"exact": exact, "estimate": estimate, "error": round(error, 4), "error_in_stderr": round(z, 2)}


def bench_capture(n_pairs: int, repeats: int, data: Path, hidden: int, layers: int, experts: int, top_k: int) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, OlmoeConfig

    from ckptsel.lab.tokenizer import build_tokenizer
    from ckptsel.measure.routers import capture_routers, target_token_mask
    from ckptsel.measure.scoring import (
        CPU_TOKEN_BUDGET,
        encode_pairs,
        plan_batches,
        score_token_pairs,
        token_nll_entropy,
    )
    from ckptsel.pathways import layer_cosines

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = OlmoeConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 32), num_key_value_heads=max(1, hidden // 32), num_experts=experts,
        num_experts_per_tok=top_k, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False,
    )
    with tempfile.TemporaryDirectory() as tmp:  # save + load: the model as the loader gives it
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp)
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    rows = [json.loads(line) for line in data.read_text().splitlines()[:n_pairs]]
    pairs = encode_pairs(tokenizer, [r["question"] + "\n" for r in rows], [r["answer"] for r in rows])
    lengths = [len(p) + len(t) for p, t in pairs]
    batches = plan_batches(lengths, [len(t) for _, t in pairs], token_budget=CPU_TOKEN_BUDGET)

    @torch.inference_mode()
    def scoring_pass(source: str | None) -> np.ndarray | None:
        """What score_token_pairs does per batch, plus the router capture when ``source`` is set."""
        out_weights = []
        for batch in batches:
            chunk = [pairs[i] for i in batch]
            width = max(len(p) + len(t) for p, t in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            keep = torch.zeros((len(chunk), width), dtype=torch.bool)
            labels = []
            for r, (p, t) in enumerate(chunk):
                ids[r, : len(p) + len(t)] = torch.tensor(p + t)
                mask[r, : len(p) + len(t)] = 1
                keep[r, len(p) - 1 : len(p) + len(t) - 1] = True
                labels.extend(t)
            positions = torch.arange(width).expand(len(chunk), width)
            kwargs = dict(
                input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep, use_cache=False
            )
            if source is None:
                out = model(**kwargs)
            else:
                with capture_routers(model, source) as routers:
                    out = model(**kwargs, **routers.forward_kwargs)
                    targets = target_token_mask([len(p) for p, _ in chunk], [len(t) for _, t in chunk], width)
                    out_weights.append(routers.reduce(targets, out))
            logits = out.logits.reshape(-1, out.logits.shape[-1])
            token_nll_entropy(logits, torch.tensor(labels))
        return np.concatenate(out_weights) if out_weights else None

    def routed_scoring() -> None:
        """What ``ckptsel rank`` runs on an MoE checkpoint: scoring with capture, plus the stored cosines."""
        result = score_token_pairs(model, pairs, routers=True)
        layer_cosines(result.router_weights, result.gate_vectors)

    variants = {"score_token_pairs": lambda: score_token_pairs(model, pairs),
                "score_token_pairs+routers": routed_scoring, "pass": lambda: scoring_pass(None),
                "pass+output": lambda: scoring_pass("output"), "pass+hooks": lambda: scoring_pass("hooks")}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up (also installs transformers' output hooks once)
        fn()
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = time.process_time()
            fn()
            times[name].append(time.process_time() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = sum(lengths)
    result = {
        "model": f"OLMoE hidden {hidden}, {layers} layers, {experts} experts top-{top_k}",
        "pairs": len(pairs), "tokens": tokens, "batches": len(batches),
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "overhead_rank_pct": round(100 * (med["score_token_pairs+routers"] / med["score_token_pairs"] - 1), 1),
        "overhead_output_pct": round(100 * (med["pass+output"] / med["pass"] - 1), 1),
        "overhead_hooks_pct": round(100 * (med["pass+hooks"] / med["pass"] - 1), 1),
    }
    print(f"  {result['model']}: {len(pairs)} pairs, {tokens} tokens, {len(batches)} batches")
    for name, value in med.items():
        print(f"  {name:18s} median {value:.3f} CPU s  (runs: {', '.join(f'{t:.3f}' for t in times[name])})")
    print(f"  capture overhead: ckptsel rank's scoring {result['overhead_rank_pct']:+.1f}%, "
          f"output_router_logits {result['overhead_output_pct']:+.1f}%, "
          f"hooks {result['overhead_hooks_pct']:+.1f}%")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000, help="pathways compared")
    parser.add_argument("--layers", type=int, default=16, help="MoE layers of the pathways")
    parser.add_argument("--workers", type=int, default=-1, help="rapidfuzz threads (-1: all cores)")
    parser.add_argument("--max-examples", type=int, default=None, help="subsample for the distance (default: all)")
    parser.add_argument("--max-pairs", type=int, default=PathwaySettings().max_pairs,
                        help="pair budget of each mean (default: PathwaySettings'; 0: exact)")
    parser.add_argument("--check-examples", type=int, default=1000,
                        help="examples of the worst case measured exact and estimated (0: skip)")
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data/gsm8k/train.jsonl"))
    parser.add_argument("--pairs", type=int, default=16, help="scored pairs for the capture benchmark")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--model-layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for the capture benchmark")
    parser.add_argument("--skip", choices=["distance", "capture"], default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    import os

    import torch

    torch.set_num_threads(args.threads)
    results = {"cores": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)}
    print(f"{results['cores']} cores, 1-minute load average {results['load_avg_1m']}")
    if args.skip != "distance":
        print(f"pathway distance, {args.examples} examples x {args.layers} layers (whole + per-layer):")
        max_pairs = args.max_pairs or None
        results["distance"] = bench_distances(args.examples, args.layers, args.workers, args.max_examples, max_pairs)
        if args.check_examples and max_pairs:
            print(f"estimate against exact, worst case, {args.check_examples} examples x {args.layers} layers:")
            results["estimate_check"] = check_estimate(args.check_examples, args.layers, args.workers, max_pairs)
    if args.skip != "capture":
        print("router capture in the scoring pass:")
        results["capture"] = bench_capture(
            args.pairs, args.repeats, args.data, args.hidden, args.model_layers, args.experts, args.top_k
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
