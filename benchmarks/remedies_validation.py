"""Do the papers' remedies work in the lab? Curation by pre-memorization accuracy, and reweighting.

**curation** (Kang et al.: new data for the examples with the lowest pre-memorization accuracy is worth
1.5-2x as much as i.i.d. new data). Per seed: a base training set of mixed difficulty (sums of 4-5 terms,
products of 3-4, maxima of 3-5 numbers), a base run trained on it and ranked by ckptsel from its training
data alone (every row measured); a pool of candidate new rows, ``--variants`` per base row, each a *variant*
of its source (same family, same number of operands, new numbers; never a test problem); then, for each
strategy and budget B, ``ckptsel curate --pool --budget B`` chooses B rows and a run is trained from scratch
on base + chosen, and its held-out accuracy measured (150 test problems, k = 5
samples). Every run trains for the same number of steps (1200, batch 32): new data changes what the
model sees, not how long it trains. The i.i.d. strategy also runs at larger budgets, so that **data efficiency** -- the i.i.d. budget
that reaches the premem strategy's accuracy at B, over B (interpolated on the mean i.i.d. curve) -- can be read.

**reweighting** (Ruan et al.: memorization-aware reweighting mitigates over-memorization): the main lab
grid's configurations that truly over-memorize (``recipes/lab/main.yaml``, ``--configs``) trained again with
``CkptselCallback(reweight=W)``; against the same runs without it (``--main``, the trained grid): the held-out
NLL's rise over its running minimum at the end, the best and final held-out accuracy, sample diversity at the
end, and the over-memorized flag rate (ckptsel's, from the training data).

Nothing here is tuned: the strategies, budgets, W and the base configuration are fixed below before any run.

    python benchmarks/remedies_validation.py curation --out /tmp/remedies --jobs 2 [--seeds 0 1] [--quick]
    python benchmarks/remedies_validation.py reweighting --out /tmp/remedies --main /tmp/lab/main --jobs 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np

STRATEGIES = ("premem", "iid", "train-acc", "loss")
FAMILIES = ["sum", "product", "max"]
BASE = {"n_train": 500, "n_test": 150, "steps": 1200, "lr": 0.003, "batch_size": 32, "scheduler": "cosine",
        "model": {"hidden_size": 96, "num_layers": 3, "num_heads": 4, "intermediate_size": 256}}
QUICK = {"n_train": 60, "n_test": 40, "steps": 30, "lr": 0.003, "batch_size": 16, "scheduler": "cosine",
         "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}}
BUDGETS, IID_EXTRA = (125, 250, 500), (1000,)
QUICK_BUDGETS, QUICK_IID_EXTRA = (10, 20), (40,)
REWEIGHT = 0.25
OVERMEMORIZING = ("dense-lr0.001-n1500-e40", "moe-lr0.001-n1500-e40")


# --------------------------------------------------------------------------- curation


def _spec(config: dict, n_train: int, seed: int, n_checkpoints: int):
    from ckptsel.lab.models import ModelSpec
    from ckptsel.lab.train import TrainSpec

    # A fixed number of steps for every run: new data changes what is trained on, not for how long.
    epochs = config["steps"] * config["batch_size"] / n_train
    return TrainSpec(families=FAMILIES, n_train=n_train, n_test=config["n_test"], data_seed=seed, seed=seed,
                     model=ModelSpec(**config["model"]), lr=config["lr"], epochs=epochs,
                     batch_size=config["batch_size"], scheduler=config["scheduler"], n_checkpoints=n_checkpoints)


def variants(base, test, per_row: int, seed: int) -> list[dict]:
    """``per_row`` new rows per base row: same family and number of operands, new numbers, none a test problem
    or a base question; each names its source (the base row's question) in ``source``."""
    from ckptsel.lab.splits import Row, _other
    from ckptsel.lab.tasks import FAMILIES as TABLE

    rng = random.Random(f"pool-{seed}")
    test_keys = {(r.family, tuple(sorted(_operands(r)))) for r in test}
    taken = {r.question for r in base}
    pool = []
    for row in base:
        family, want = TABLE[row.family], len(_operands(row))
        made = 0
        for _ in range(10_000):
            if made == per_row:
                break
            problem = family.draw(rng)
            if len(problem.operands) != want or (problem.family, problem.key) in test_keys or problem.question in taken:
                continue
            taken.add(problem.question)
            answer = family.trace(problem, rng)
            new = Row(problem.question, answer, problem.family, problem.value, family.perturb(problem, rng).question,
                      _other(family, problem, answer, rng))
            pool.append({**asdict(new), "source": row.question})
            made += 1
    return pool


def _operands(row) -> list[int]:
    import re

    return [int(x) for x in re.findall(r"\d+", row.question)]


def _train_and_measure(job: dict) -> dict:
    """One run: train on the given rows, measure its ground truth; returns the job with its figures."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from ckptsel.lab.ground_truth import GroundTruthSettings, read_ground_truth, write_ground_truth
    from ckptsel.lab.splits import Row, read_jsonl
    from ckptsel.lab.train import train_run

    out = Path(job["dir"])
    if not (out / "ground_truth.json").is_file():
        train = [Row(**{k: v for k, v in r.items() if k != "source"}) for r in job["train"]]
        test = read_jsonl(Path(job["test"]))
        started = time.time()
        train_run(_spec(job["config"], len(train), job["seed"], job["checkpoints"]), out, name=out.name,
                  rows=(train, test))
        write_ground_truth(out, GroundTruthSettings(n_train_eval=20, perturbed=False))
        job["seconds"] = time.time() - started
    truth = read_ground_truth(out)["checkpoints"]
    last = truth[max(truth, key=int)]
    return {**{k: v for k, v in job.items() if k not in ("train", "config")}, "test_accuracy": last["test_accuracy"],
            "test_nll": last["test_nll"]}


def curation(args) -> dict:
    from ckptsel.lab.splits import make_splits, write_jsonl

    config = QUICK if args.quick else BASE
    budgets, extra = (QUICK_BUDGETS, QUICK_IID_EXTRA) if args.quick else (BUDGETS, IID_EXTRA)
    root = args.out / ("curation-quick" if args.quick else "curation")
    results = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        bases = {}
        for seed in args.seeds:
            base, test = make_splits(FAMILIES, config["n_train"], config["n_test"], seed)
            folder = root / f"seed{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            write_jsonl(test, folder / "test.jsonl")
            bases[seed] = (base, test, folder)
        base_jobs = [{"dir": str(folder / "base"), "train": [asdict(r) for r in base], "test": str(folder / "test.jsonl"),
                      "config": config, "seed": seed, "checkpoints": 6, "strategy": "base", "budget": 0}
                     for seed, (base, test, folder) in bases.items()]
        results += list(pool.map(_train_and_measure, base_jobs))
        jobs = []
        for seed, (base, test, folder) in bases.items():
            pool_file = folder / "pool.jsonl"
            pool_file.write_text("".join(json.dumps(r) + "\n" for r in variants(base, test, args.variants, seed)))
            for strategy in STRATEGIES:
                for budget in (*budgets, *(extra if strategy == "iid" else ())):
                    chosen = _curate(folder / "base", pool_file, strategy, budget, seed, args)
                    jobs.append({"dir": str(folder / f"{strategy}-{budget}"), "train": [asdict(r) for r in base] + chosen,
                                 "test": str(folder / "test.jsonl"), "config": config, "seed": seed, "checkpoints": 1,
                                 "strategy": strategy, "budget": budget,
                                 "hard_share": _share_hard(chosen)})
        for done in pool.map(_train_and_measure, jobs):
            results.append(done)
            print(f"  seed {done['seed']} {done['strategy']:9s} +{done['budget']:4d}: held-out accuracy "
                  f"{done['test_accuracy']:.3f}", flush=True)
    summary = summarize_curation(results, budgets)
    # Which strategies fell back to the i.i.d. order (every row tied at the pick): the same rows, file for file.
    summary["same_rows_as_iid"] = {
        f"{strategy} +{budget} seed {seed}": (folder / f"chosen-{strategy}-{budget}.jsonl").read_bytes()
        == (folder / f"chosen-iid-{budget}.jsonl").read_bytes()
        for seed, (_, _, folder) in bases.items() for strategy in ("train-acc", "loss") for budget in budgets}
    return summary


def _curate(base_run: Path, pool_file: Path, strategy: str, budget: int, seed: int, args) -> list[dict]:
    out = base_run.parent / f"chosen-{strategy}-{budget}.jsonl"
    if not out.is_file():
        command = [sys.executable, "-m", "ckptsel", "curate", str(base_run), "--data", str(base_run / "train.jsonl"),
                   "--recipe", str(base_run / "recipe.yaml"), "--cache-dir", str(args.out / "cache"), "--quiet",
                   "--pool", str(pool_file), "--budget", str(budget), "--strategy", strategy,
                   "--curate-seed", str(seed), "-o", str(out)]
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return [json.loads(line) for line in out.read_text().splitlines()]


def _share_hard(rows: list[dict]) -> dict[str, float]:
    """What the chosen rows are: share of each family (a view of where the budget went)."""
    families = [r["family"] for r in rows]
    return {f: round(families.count(f) / len(families), 3) for f in FAMILIES} if families else {}


def summarize_curation(results: list[dict], budgets) -> dict:
    by = {}
    for r in results:
        by.setdefault((r["strategy"], r["budget"]), []).append(r["test_accuracy"])
    mean = {k: float(np.mean(v)) for k, v in by.items()}
    iid_budgets = sorted(b for s, b in by if s == "iid")
    iid_curve = np.maximum.accumulate([mean[("iid", b)] for b in iid_budgets])  # more data never hurts, on average

    def iid_budget_for(accuracy: float) -> float:
        if accuracy <= mean[("base", 0)]:
            return 0.0
        xs, ys = [0, *iid_budgets], [mean[("base", 0)], *iid_curve]
        for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
            if y0 < accuracy <= y1:
                return x0 + (accuracy - y0) / (y1 - y0) * (x1 - x0)
        return math.inf  # beyond the largest i.i.d. budget

    efficiency = {s: {b: iid_budget_for(mean[(s, b)]) / b for b in budgets if (s, b) in mean}
                  for s in STRATEGIES}
    spread = {k: float(np.std(v, ddof=1)) if len(v) > 1 else math.nan for k, v in by.items()}
    shares = {}  # where each strategy's budget went, by family (per seed)
    for r in results:
        if r.get("hard_share"):
            shares[f"{r['strategy']} +{r['budget']} seed {r['seed']}"] = r["hard_share"]
    return {"runs": results, "mean_accuracy": {f"{s} +{b}": v for (s, b), v in sorted(mean.items())},
            "seed_std": {f"{s} +{b}": v for (s, b), v in sorted(spread.items())},
            "data_efficiency": {s: {str(b): e for b, e in v.items()} for s, v in efficiency.items()},
            "budget_by_family": shares}


# --------------------------------------------------------------------------- reweighting


def _reweighted_run(job: dict) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from ckptsel.integrations.transformers import CkptselCallback
    from ckptsel.lab.ground_truth import GroundTruthSettings, write_ground_truth
    from ckptsel.lab.train import TrainSpec, train_run, write_data

    source, out = Path(job["source"]), Path(job["dir"])
    if not (out / "ground_truth.json").is_file():
        spec = TrainSpec(**json.loads((source / "run.json").read_text())["spec"])
        write_data(spec, out, out.name)  # the data and recipe exist before training (the callback reads them)
        callback = CkptselCallback(out / "train.jsonl", str(out / "recipe.yaml"), max_examples=100,
                                   cache_dir=Path(job["cache"]), reweight=job["reweight"],
                                   on_measured=lambda report: None)
        train_run(spec, out, name=out.name, callbacks=(callback,))
        write_ground_truth(out, GroundTruthSettings(n_train_eval=100))
        (out / "reweighted.json").write_text(json.dumps(sorted(callback.down_weighted)))
    return job


def reweighting(args) -> dict:
    from ckptsel.lab.ground_truth import read_ground_truth

    root = args.out / "reweighting"
    jobs = [{"source": str(args.main / name), "dir": str(root / f"{name}-w{REWEIGHT:g}"), "reweight": REWEIGHT,
             "cache": str(args.out / "cache")} for name in args.configs]
    for job in jobs:
        if not (Path(job["source"]) / "run.json").is_file():
            raise SystemExit(f"{job['source']}: not a trained lab run (no run.json); train the main grid first")
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(_reweighted_run, jobs))
    out = {}
    for job in jobs:
        row = {}
        for label, folder in (("without", Path(job["source"])), (f"with w={REWEIGHT:g}", Path(job["dir"]))):
            truth = read_ground_truth(folder)["checkpoints"]
            steps = sorted(truth, key=int)
            acc = np.array([truth[s]["test_accuracy"] for s in steps])
            nll = np.array([truth[s]["test_nll"] for s in steps])
            ranked = _rank(folder, args.out / "cache")
            row[label] = {"heldout_nll_rise_end": float(nll[-1] / np.minimum.accumulate(nll)[-1]),
                          "heldout_nll_rise_max": float(np.max(nll / np.minimum.accumulate(nll))),
                          "best_accuracy": float(acc.max()), "final_accuracy": float(acc[-1]),
                          "final_sample_diversity": ranked["checkpoints"][-1].get("sample_diversity"),
                          "flagged": sum(c["flag"] is not None for c in ranked["checkpoints"]),
                          "checkpoints": len(steps)}
        out[Path(job["source"]).name] = row
    return out


def _rank(folder: Path, cache: Path) -> dict:
    command = [sys.executable, "-m", "ckptsel", "rank", str(folder), "--data", str(folder / "train.jsonl"),
               "--recipe", str(folder / "recipe.yaml"), "--cache-dir", str(cache), "--max-examples", "100", "--quiet",
               "--json"]
    done = subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(done.stdout)


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("curation", "reweighting"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", type=int, default=3, help="pool rows per base row")
    parser.add_argument("--quick", action="store_true", help="a tiny variant (minutes), to check the pipeline")
    parser.add_argument("--main", type=Path, help="the trained main lab grid (reweighting's runs without it)")
    parser.add_argument("--configs", nargs="+", default=list(OVERMEMORIZING))
    args = parser.parse_args()
    started = time.time()
    result = curation(args) if args.what == "curation" else reweighting(args)
    result = {"seconds": time.time() - started, **result}
    (args.out / f"{args.what}{'-quick' if args.quick else ''}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
