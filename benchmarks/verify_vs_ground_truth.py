"""Does `ckptsel verify` (lm-eval) measure what the lab's ground truth measures? Per checkpoint of a lab run.

Two comparisons on the run's held-out test.jsonl, with the lab's own generation budget:

* greedy: the lab's ground-truth code (ckptsel's sampler, temperature 0) against verify
  --greedy (lm-eval's HF generate). Expected: equal, question by question;
* sampled: RUN/ground_truth.json (k samples, T=0.8, top-p 0.95, ckptsel's seeded sampler)
  against verify with the same k, T and top-p (lm-eval's sampler, its own random stream).
  Expected: equal within sampling error -- reported as the paired difference over questions
  and its z-score.

    python benchmarks/verify_vs_ground_truth.py RUN [--steps 120,480] [--limit 50] [--cache-dir DIR]

``--limit N`` compares on the first N test questions (the lab's per-question values for those
questions; the sampling seeds are per question, so a subset is the same draw) and ``--steps``
on some checkpoints only, to keep a run to minutes.

Measured 2026-11-21 on /tmp/lab/main (steps 235, 940, 1880; lm-eval 0.4.13, CPU float32):
dense-lr0.001-n3000-e20, first 50 test questions -- greedy equal on 50/50 questions at every
step (0.220, 0.740, 0.900); sampled z = +1.31, -0.32, +0.18. moe-lr0.001-n1500-e40, first 100
-- greedy equal on 100/100 (0.100, 0.670, 0.590); sampled z = +2.63, -0.41, +0.51. The one
|z| > 1.96 is the lab's draw: at that step, ckptsel's own sampler over 12 seeds gives 0.076 (seed
0, the ground truth) to 0.129, mean 0.100, sd 0.0135; lm-eval's 0.112 sits inside that spread.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its notes about pre-loaded models are expected here


def lab_budget(run: Path, settings) -> int:
    """The generation budget write_ground_truth used: from the first n_train_eval train and all test answers."""
    from ckptsel.lab.splits import read_jsonl
    from ckptsel.lab.tokenizer import build_tokenizer
    from ckptsel.measure.sampling import max_new_tokens_for

    if settings.sampling.max_new_tokens is not None:
        return settings.sampling.max_new_tokens
    tokenizer = build_tokenizer()
    rows = read_jsonl(run / "train.jsonl")[: settings.n_train_eval] + read_jsonl(run / "test.jsonl")
    ids = tokenizer([r.answer for r in rows], add_special_tokens=False)["input_ids"]
    return max_new_tokens_for([len(t) + 1 for t in ids])


def greedy_ground_truth(run: Path, checkpoints: list[Path], n_test: int, budget: int) -> dict:
    """The lab's ground-truth code run greedily on a scratch copy of the run: the chosen
    checkpoints linked, the first ``n_test`` test rows copied, nothing of the run rewritten."""
    from ckptsel.lab.ground_truth import GroundTruthSettings, write_ground_truth
    from ckptsel.settings import SamplingSettings

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for path in checkpoints:
            (scratch / path.name).symlink_to(path.resolve())
        (scratch / "train.jsonl").symlink_to((run / "train.jsonl").resolve())
        test_lines = (run / "test.jsonl").read_text().splitlines(keepends=True)[:n_test]
        (scratch / "test.jsonl").write_text("".join(test_lines))
        settings = GroundTruthSettings(sampling=SamplingSettings(temperature=0, max_new_tokens=budget),
                                       n_train_eval=1, perturbed=False)
        return json.loads(write_ground_truth(scratch, settings).read_text())


def main() -> None:
    import numpy as np

    from ckptsel.data import load_data
    from ckptsel.discover import discover
    from ckptsel.lab.ground_truth import GroundTruthSettings, read_ground_truth
    from ckptsel.measure.loading import load_tokenizer
    from ckptsel.recipes import load_recipe, override
    from ckptsel.settings import EngineSettings
    from ckptsel.store import Store
    from ckptsel.verify import verify_file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--limit", type=int, default=None, help="Only the first N test questions.")
    parser.add_argument("--steps", default=None, help="Only these checkpoint steps (comma-separated).")
    args = parser.parse_args()
    run = args.run.resolve()
    truth = read_ground_truth(run)
    gt_settings = GroundTruthSettings(**truth["settings"])
    budget = lab_budget(run, gt_settings)
    checkpoints = discover([run])
    if args.steps:
        wanted = {int(s) for s in args.steps.split(",")}
        checkpoints = [c for c in checkpoints if c.step in wanted]
    recipe = load_recipe(run / "recipe.yaml")
    tokenizer = load_tokenizer(checkpoints[0])
    examples = load_data(run / "test.jsonl", recipe, tokenizer=tokenizer).examples[: args.limit]
    engine = EngineSettings(device="cpu", dtype="float32")
    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="verify-bench-"))
    print(f"run {run}: {len(checkpoints)} checkpoints, {len(examples)} test questions, budget {budget} tokens")

    t0 = time.perf_counter()
    lab_greedy = greedy_ground_truth(run, [c.path for c in checkpoints], len(examples), budget)
    t_lab = time.perf_counter() - t0
    with Store.open(cache) as store:
        t0 = time.perf_counter()
        greedy = verify_file(checkpoints, examples, override(recipe, sampling={"temperature": 0.0}), store,
                             source="test.jsonl", engine=engine, max_new_tokens=budget)
        t_greedy = time.perf_counter() - t0
        sampling = gt_settings.sampling.model_dump(include={"k", "temperature", "top_p"})
        t0 = time.perf_counter()
        sampled = verify_file(checkpoints, examples, override(recipe, sampling=sampling), store,
                              source="test.jsonl", engine=engine, max_new_tokens=budget)
        t_sampled = time.perf_counter() - t0

    uids = [ex.uid for ex in examples]
    print("\ngreedy: lab ground-truth code (ckptsel sampler) vs ckptsel verify (lm-eval HF generate)")
    print(f"{'step':>6} {'lab':>7} {'verify':>7} {'diff':>8} {'questions equal':>16}")
    worst = 0.0
    for ckpt, m in zip(checkpoints, greedy.checkpoints):
        lab = lab_greedy["checkpoints"][str(ckpt.step)]
        per_lab = lab["per_example"]["test_accuracy"]
        same = sum(abs(m.per_example[u] - a) < 1e-9 for u, a in zip(uids, per_lab))
        worst = max(worst, abs(m.accuracy - lab["test_accuracy"]))
        print(f"{ckpt.step:>6} {lab['test_accuracy']:>7.3f} {m.accuracy:>7.3f} {m.accuracy - lab['test_accuracy']:>+8.3f} "
              f"{same:>9}/{len(uids)}")
    print(f"max |diff| {worst:.4f}")

    print(f"\nsampled (k={sampling['k']}, T={sampling['temperature']}, top-p {sampling['top_p']}): "
          "RUN/ground_truth.json vs ckptsel verify")
    print(f"{'step':>6} {'lab':>7} {'verify':>7} {'verify 95% CI':>15} {'diff':>8} {'se(diff)':>9} {'z':>6}")
    zs = []
    for ckpt, m in zip(checkpoints, sampled.checkpoints):
        lab = truth["checkpoints"][str(ckpt.step)]
        per_lab = lab["per_example"]["test_accuracy"][: len(uids)]
        d = np.array([m.per_example[u] - a for u, a in zip(uids, per_lab)])
        se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan
        z = float(d.mean() / se) if se > 0 else 0.0
        zs.append(z)
        print(f"{ckpt.step:>6} {np.mean(per_lab):>7.3f} {m.accuracy:>7.3f} "
              f"{f'[{m.ci[0]:.3f}, {m.ci[1]:.3f}]':>15} {d.mean():>+8.3f} {se:>9.4f} {z:>+6.2f}")
    within = sum(abs(z) <= 1.96 for z in zs)
    print(f"|z| <= 1.96 for {within}/{len(zs)} checkpoints (paired over questions)")
    print(f"\ntime: lab greedy {t_lab:.1f} s, verify greedy {t_greedy:.1f} s, verify sampled {t_sampled:.1f} s "
          f"(cache {cache})")


if __name__ == "__main__":
    main()
