"""Do the pathway metrics track held-out accuracy? Validation on the lab's MoE runs.

For every MoE run in a lab output folder (a run folder: ``checkpoint-N/``, ``train.jsonl``,
``recipe.yaml`` and ``ground_truth.json``, as ``ckptsel lab`` writes them), per checkpoint:

* the target NLL and the routing weights of the first ``--n-train`` training examples
  (rendered as the run was trained: prompt ``"{question}\\n"`` with BOS, target + EOS);
* memorised examples: NLL below the run recipe's threshold nu (``--threshold`` overrides);
* pathway distance and pathway complexity over the memorised examples (DESIGN.md), and
  over all examples (the memorised set is small or empty early in a run);
* the training loss the Trainer logged last at that step, and the held-out test accuracy
  from ``ground_truth.json`` (k samples per test question, graded).

The paper (Li, Fan & Zhou 2025) reports |Pearson r| 0.92-0.99 between these metrics and
downstream accuracy once training loss has stopped moving. Our window: the checkpoints
from the one *before* test accuracy first exceeds its starting value by 10% of the run's
accuracy range, to the end (all checkpoints when that leaves fewer than 4; a run whose
accuracy never rises by 0.02 carries no signal and is reported but not counted). Pearson
and Spearman per run and metric; the headline is the median |r| over runs (target >= 0.8),
next to the training loss's.

    python benchmarks/pathway_validation.py LAB_OUT [--n-train 200 --cutoff 0.8 --order weight --json out.json]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

import numpy as np

METRICS = ("distance_mem", "complexity_mem", "distance_all", "complexity_all", "train_loss")
MIN_WINDOW = 4
RISE_FRACTION = 0.1
MIN_RISE = 0.02


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    found = [(int(m[1]), p) for p in run.iterdir() if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name))]
    return sorted(found)


def is_moe_run(run: Path) -> bool:
    from ckptsel.discover import moe_from_config

    ckpts = checkpoints(run)
    if not ckpts or not (run / "ground_truth.json").is_file():
        return False
    config = ckpts[0][1] / "config.json"
    if not config.is_file():  # an adapter run: the base decides
        adapter = json.loads((ckpts[0][1] / "adapter_config.json").read_text())
        config = Path(adapter["base_model_name_or_path"]) / "config.json"
    return moe_from_config(json.loads(config.read_text()))[0] is not None


def train_loss(checkpoint: Path, step: int) -> float:
    """The training loss the Trainer logged last at or before ``step``."""
    state = checkpoint / "trainer_state.json"
    if not state.is_file():
        return float("nan")
    history = json.loads(state.read_text()).get("log_history", [])
    logged = [e for e in history if "loss" in e and e.get("step", 0) <= step]
    return float(logged[-1]["loss"]) if logged else float("nan")


def measure_run(run: Path, n_train: int, threshold: float | None, cutoff: float, order: str) -> list[dict]:
    import torch

    from ckptsel.lab.ground_truth import load_checkpoint, read_ground_truth
    from ckptsel.lab.splits import read_jsonl
    from ckptsel.lab.tokenizer import build_tokenizer
    from ckptsel.measure.routers import routing_weights
    from ckptsel.measure.scoring import encode_pairs, score_token_pairs
    from ckptsel.pathways import consistency_from_cosines, layer_cosines, pathway_distance, pathways
    from ckptsel.recipes import load_recipe

    recipe = load_recipe(run / "recipe.yaml")
    nu = threshold if threshold is not None else recipe.memorization.threshold
    if nu == "auto":
        raise SystemExit(f"{run}: recipe threshold is 'auto'; pass --threshold")
    truth = read_ground_truth(run)["checkpoints"]
    rows = read_jsonl(run / "train.jsonl")[:n_train]
    tokenizer = build_tokenizer()
    pairs = encode_pairs(tokenizer, [f"{r.question}\n" for r in rows], [r.answer for r in rows], append_eos=True)
    out = []
    for step, path in checkpoints(run):
        t0 = time.perf_counter()
        model = load_checkpoint(path).eval()
        with torch.inference_mode():
            nll = score_token_pairs(model, pairs).nll
            weights, gates = routing_weights(model, pairs)
        num_layers, num_experts = weights.shape[1:]
        memorised = nll < nu
        paths = pathways(weights, cutoff, order)
        cosines = layer_cosines(weights, gates)
        row = {"step": step, "test_accuracy": truth.get(str(step), {}).get("test_accuracy", float("nan")),
               "train_loss": train_loss(path, step), "memorised": int(memorised.sum()), "mean_nll": float(nll.mean())}
        for suffix, keep in (("mem", memorised), ("all", np.ones_like(memorised))):
            chosen = [p for p, k in zip(paths, keep) if k]
            row[f"distance_{suffix}"] = pathway_distance(chosen, num_experts, num_layers).mean
            row[f"complexity_{suffix}"] = consistency_from_cosines(cosines[keep]).complexity
        out.append(row)
        print(f"  step {step:6d}  test acc {row['test_accuracy']:.3f}  loss {row['train_loss']:.3f}  memorised "
              f"{row['memorised']:4d}/{len(rows)}  distance mem/all {row['distance_mem']:7.3f} "
              f"{row['distance_all']:7.3f}  complexity mem/all {row['complexity_mem']:.4f} {row['complexity_all']:.4f}"
              f"  ({time.perf_counter() - t0:.1f}s)",
              flush=True)
    return out


def window(acc: np.ndarray) -> slice | None:
    """Checkpoints from the one before accuracy starts rising; None when it never rises."""
    rise = np.nanmax(acc) - acc[0]
    if not rise >= MIN_RISE:
        return None
    start = max(0, int(np.argmax(acc > acc[0] + RISE_FRACTION * rise)) - 1)
    return slice(start, None) if len(acc) - start >= MIN_WINDOW else slice(0, None)


def correlate(rows: list[dict]) -> dict | None:
    from ckptsel.metrics import pearson, spearman

    acc = np.array([r["test_accuracy"] for r in rows], dtype=float)
    span = window(acc)
    if span is None:
        return None
    result = {"window_steps": [r["step"] for r in rows[span]]}
    for metric in METRICS:
        values = np.array([r[metric] for r in rows], dtype=float)[span]
        result[metric] = {"pearson": pearson(values, acc[span]), "spearman": spearman(values, acc[span])}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lab_out", type=Path, help="a lab output folder (its MoE runs are used), or one run folder")
    parser.add_argument("--n-train", type=int, default=200, help="training examples measured per checkpoint")
    parser.add_argument("--threshold", type=float, default=None, help="memorisation nu (default: the run's recipe)")
    parser.add_argument("--cutoff", type=float, default=0.8)
    parser.add_argument("--order", choices=["weight", "expert"], default="weight")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if checkpoints(args.lab_out):
        candidates = [args.lab_out]
    else:
        candidates = sorted(p for p in args.lab_out.iterdir() if p.is_dir())
    runs = [r for r in candidates if is_moe_run(r)]
    if not runs:
        raise SystemExit(f"{args.lab_out}: no MoE run with ground_truth.json")
    report = {"settings": {k: str(v) for k, v in vars(args).items()}, "runs": {}}
    for run in runs:
        print(f"{run.name}:", flush=True)
        rows = measure_run(run, args.n_train, args.threshold, args.cutoff, args.order)
        report["runs"][run.name] = {"checkpoints": rows, "correlation": correlate(rows)}

    print("\nPearson r / Spearman rho with test accuracy (window: from the checkpoint before accuracy rises)")
    print(f"{'run':32s}" + "".join(f"{m:>18s}" for m in METRICS))
    counted = {m: [] for m in METRICS}
    n_counted = 0
    for name, run in report["runs"].items():
        corr = run["correlation"]
        if corr is None:
            print(f"{name:32s}  accuracy never rises by {MIN_RISE}: not counted")
            continue
        n_counted += 1
        cells = []
        for m in METRICS:
            r, rho = corr[m]["pearson"], corr[m]["spearman"]
            if not np.isnan(r):
                counted[m].append(abs(r))
            cells.append(f"{r:+.2f} / {rho:+.2f}")
        print(f"{name:32s}" + "".join(f"{c:>18s}" for c in cells))
    medians = {m: (statistics.median(v) if v else float("nan")) for m, v in counted.items()}
    report["median_abs_pearson"] = medians
    print(f"{f'median |r| over {n_counted} runs':32s}" + "".join(f"{medians[m]:>18.2f}" for m in METRICS))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=float))


if __name__ == "__main__":
    main()
