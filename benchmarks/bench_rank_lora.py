"""Figure (c): ``ckptsel rank`` on LoRA checkpoints against reloading the base for every one.

A run of C LoRA adapter checkpoints (random adapter weights, rank 16 on every linear layer)
on one base model. ckptsel: ``ckptsel rank RUN --data gsm8k/train.jsonl --recipe gsm8k``,
invoked in this process through click (discovery, data, measurement into a fresh store,
ranking), which loads the base once and hot-swaps the adapters. The baseline: for every
checkpoint a fresh loader (base from disk, then ``PeftModel.from_pretrained``) and the same
measurement functions (``ckptsel.kinds.KINDS``) on the same examples, nothing stored. Both
sides' time spent getting a model ready (``CheckpointLoader.load``) is reported apart from
the total, and their target NLLs must agree (a hot-swapped adapter scores as a fresh one).

    python benchmarks/bench_rank_lora.py --size qwen0.5b --max-examples 1
    python benchmarks/bench_rank_lora.py --size lab --max-examples 4 --repeats 3
"""

from __future__ import annotations

import json
import tempfile
import time

import bench_common as bench


def main() -> None:
    args = bench.lora_rank_parser(__doc__.splitlines()[0]).parse_args()
    bench.setup(args.threads)

    import numpy as np
    from click.testing import CliRunner

    from ckptsel import graders
    from ckptsel.cli import main as cli
    from ckptsel.collect import budgets, select_examples
    from ckptsel.data import load_data
    from ckptsel.discover import discover
    from ckptsel.kinds import DEFAULT_KINDS, KINDS
    from ckptsel.measure import loading
    from ckptsel.measure.context import MeasureContext
    from ckptsel.measure.loading import CheckpointLoader, load_tokenizer
    from ckptsel.recipes import load_recipe, override
    from ckptsel.settings import EngineSettings, ProxySettings, SelectionSettings

    run = bench.lora_run(args.size, args.checkpoints)
    data = bench.DATA / "gsm8k" / "train.jsonl"
    checkpoints = discover(run)[: args.checkpoints]
    sampling = {"k": args.k, "max_new_tokens": args.max_new_tokens}
    recipe = override(load_recipe("gsm8k"), sampling=sampling)
    tokenizer = load_tokenizer(checkpoints[0])
    rows = load_data(data, recipe, tokenizer=tokenizer).examples
    examples = select_examples(rows, SelectionSettings(max_examples=args.max_examples))
    engine = EngineSettings(device="cpu")
    ctx = MeasureContext(engine, graders.get(recipe.data.grader), ProxySettings(), budgets(tokenizer, examples, recipe))

    load_seconds = {"ckptsel": 0.0, "reload": 0.0}
    side = {"name": "ckptsel"}
    original_load = CheckpointLoader.load

    def timed_load(self, ckpt):
        start = time.perf_counter()
        try:
            return original_load(self, ckpt)
        finally:
            load_seconds[side["name"]] += time.perf_counter() - start

    loading.CheckpointLoader.load = timed_load
    results: dict[str, list[float]] = {}

    def ckptsel_rank():
        side["name"] = "ckptsel"
        with tempfile.TemporaryDirectory() as cache:
            out = CliRunner().invoke(cli, [
                "rank", str(run), "--data", str(data), "--recipe", "gsm8k", "--max-examples", str(args.max_examples),
                "-k", str(args.k), "--max-new-tokens", str(args.max_new_tokens), "--device", "cpu",
                "--cache-dir", cache, "--json", "--quiet",
            ])
        if out.exit_code != 0:
            raise SystemExit(f"ckptsel rank failed ({out.exit_code}): {out.output[-2000:]}")
        ranked = json.loads(out.stdout)["checkpoints"]
        results["ckptsel"] = [c["target_nll"] for c in ranked]

    def reload_each():
        side["name"] = "reload"
        nll = []
        for ckpt in checkpoints:
            with CheckpointLoader.for_engine(engine) as loader:
                model, tok = loader.load(ckpt)
                # No alternative-solution set from random weights, no held-out file: what rank measures here.
                kinds = [kind for kind in DEFAULT_KINDS if kind not in ("alt", "heldout")]
                records = {kind: KINDS[kind].measure(model, tok, examples, recipe, ctx) for kind in kinds}
                nll.append(float(np.mean([r.nll for r in records["score"].values()])))
        results["reload"] = nll

    model, _ = bench.load_model(args.size)
    print(bench.describe(model, args.size))
    del model
    print(f"{bench.machine()}; {len(checkpoints)} LoRA checkpoints (rank 16, all linear layers), "
          f"{len(examples)} example(s), k={args.k}, max_new_tokens {args.max_new_tokens}; kinds: score, sample, perturb")
    times = bench.interleaved({"reload": reload_each, "ckptsel": ckptsel_rank}, args.repeats)
    diff = np.abs(np.array(results["ckptsel"]) - np.array(results["reload"])).max()
    print(f"  agreement: max |target NLL difference| over checkpoints {diff:.1e}")
    if diff > 1e-4:
        raise SystemExit("the hot-swapped adapters score differently from freshly loaded ones")
    for name, label in (("reload", "reload base per checkpoint"), ("ckptsel", "ckptsel rank (hot swap)")):
        per_run = load_seconds[name] / args.repeats
        print(f"  {label:27} {bench.median(times[name]):7.1f} s  {bench.fmt_times(times[name])}; "
              f"getting models ready {per_run:.1f} s per run")
    ratio = bench.median(times["reload"]) / bench.median(times["ckptsel"])
    load_ratio = load_seconds["reload"] / max(load_seconds["ckptsel"], 1e-9)
    print(f"  ratio {ratio:.2f}x end to end, {load_ratio:.1f}x on getting models ready "
          f"(median of {args.repeats}, interleaved); load average {bench.load():.2f}")


if __name__ == "__main__":
    main()
