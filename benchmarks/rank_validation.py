"""Does pre-memorization train accuracy predict held-out accuracy on the lab? (issue [rank])

For every run in a lab output folder (``checkpoint-N/``, ``train.jsonl``, ``recipe.yaml``,
``ground_truth.json``, as ``ckptsel lab run`` writes them), ckptsel ranks the checkpoints from
the training data alone (the library path of ``ckptsel rank``) and the result is compared with
the lab's true held-out accuracy (``test_accuracy`` in ``ground_truth.json``). Printed:

1. R² against true held-out accuracy over all checkpoints of all runs, and over the final
   checkpoints only: identity-line R² (1 - Σ(y - x)² / Σ(y - ȳ)², as Kang et al. plot it) and
   fitted R² (least-squares line), for pre-memorization accuracy and for the baselines from
   the same runs — train accuracy (k samples, graded) and train loss (the Trainer's logged
   loss; ckptsel's mean target NLL where none was logged). A loss is not an accuracy, so its
   identity-line R² is not defined; its fitted R² is the comparison.
2. ν, the memorisation threshold (target NLL in nats/token), swept: identity and fitted R²
   of pre-memorization accuracy for fixed values and for ``auto`` (calibrated per run from the
   training side: the NLL level below which samples copy the training trace,
   :func:`ckptsel.metrics.calibrate_threshold`).
3. Per example: examples with low pre-memorization accuracy (final checkpoint) against high,
   and the accuracy they lose when the question is perturbed (the lab's ground truth measures
   ``train_accuracy`` and ``train_perturbed_accuracy`` on the first ``n_train_eval`` rows of
   ``train.jsonl``; pairs are the examples in both ckptsel's subset and those rows).

    python benchmarks/rank_validation.py LAB_OUT [--max-examples 100 --cache-dir DIR --json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from overmem_validation import lab_runs, rank_run

SOLVED = 0.8  # clean accuracy at which an example counts as solved, for the robustness figure
SWEEP = (0.02, 0.05, 0.1, 0.183, 0.3, 0.5, 0.75, 1.0)


def run_arrays(run: Path, ranking, collected) -> dict:
    """Per-checkpoint and per-example arrays of one run, aligned with its ground truth."""
    from ckptsel import metrics

    truth = json.loads((run / "ground_truth.json").read_text())["checkpoints"]
    pe = ranking.per_example
    measured = [int(i) for i in pe["measured_index"]]
    rows = [ranking.checkpoints[i] for i in measured]
    keep = [r for r, c in enumerate(rows) if str(c.step) in truth]
    acc, nll, copy = pe["acc"][keep], pe["nll"][keep], pe["copy"][keep]
    gt = [truth[str(rows[r].step)] for r in keep]
    try:
        auto = metrics.calibrate_threshold(nll, copy).threshold
    except metrics.CalibrationError:
        auto = float("nan")
    loss = np.array([rows[r].train_loss if rows[r].train_loss is not None else rows[r].target_nll for r in keep])
    return {
        "run": run.name,
        "steps": [rows[r].step for r in keep],
        "test_acc": np.array([g["test_accuracy"] for g in gt]),
        "premem": np.array([rows[r].premem_acc for r in keep]),
        "train_acc": np.array([rows[r].train_acc for r in keep]),
        "train_loss": loss,
        "acc": acc,
        "nll": nll,
        "copy": copy,
        "auto": auto,
        "threshold": ranking.threshold.used,
        "robustness": robustness_pairs(gt[-1], pe["premem"][keep][-1], collected),
    }


def robustness_pairs(final_truth: dict, premem_final: np.ndarray, collected) -> list[tuple[float, float, float]]:
    """(pre-memorization accuracy, clean accuracy, accuracy lost under perturbation) per example both measured."""
    per = final_truth.get("per_example", {})
    clean, perturbed = per.get("train_accuracy"), per.get("train_perturbed_accuracy")
    if clean is None or perturbed is None:
        return []
    pairs = []
    for j, ex in enumerate(collected.examples):
        if ex.index < len(clean) and clean[ex.index] is not None and perturbed[ex.index] is not None:
            pairs.append((float(premem_final[j]), float(clean[ex.index]), float(clean[ex.index]) - float(perturbed[ex.index])))
    return pairs


def robustness(pairs: np.ndarray) -> dict:
    """Accuracy lost under perturbation for low (< 0.5) vs high pre-memorization accuracy, and their rank correlation."""
    from ckptsel import metrics

    low = pairs[:, 0] < 0.5
    mean = lambda rows: float(rows[:, 2].mean()) if len(rows) else float("nan")  # noqa: E731
    return {"n": int(len(pairs)), "low_n": int(low.sum()), "high_n": int((~low).sum()), "drop_low": mean(pairs[low]),
            "drop_high": mean(pairs[~low]), "spearman": metrics.spearman(pairs[:, 0], pairs[:, 2])}


def premem_at(run: dict, threshold: float) -> np.ndarray:
    from ckptsel import metrics

    return metrics.premem_accuracy(run["acc"], run["nll"], threshold)


def premem_copy_rule(run: dict) -> np.ndarray:
    """Pre-memorization accuracy with ckptsel/DESIGN.md's alternative rule: memorised once samples copy the trace."""
    from ckptsel import metrics

    return metrics.premem_accuracy_from_mask(run["acc"], metrics.memorized_by_copy(run["copy"]))


def r2_row(predicted: np.ndarray, measured: np.ndarray, identity: bool = True) -> tuple[float, float]:
    from ckptsel import metrics

    return (metrics.r2_identity(predicted, measured) if identity else float("nan"),
            metrics.r2_fitted(predicted, measured))


def pooled(runs: list[dict], name: str, final_only: bool = False) -> np.ndarray:
    """One array per run concatenated: every checkpoint, or each run's final one."""
    return np.concatenate([r[name][-1:] if final_only else r[name] for r in runs])


def r2_scope(runs: list[dict], final_only: bool = False) -> dict:
    """R² against true held-out accuracy of pre-memorization accuracy and the baselines, over ``runs``."""
    y = pooled(runs, "test_acc", final_only)
    return {
        "n": int(y.size),
        "premem_acc": r2_row(pooled(runs, "premem", final_only), y),
        "train_acc": r2_row(pooled(runs, "train_acc", final_only), y),
        "train_loss": r2_row(pooled(runs, "train_loss", final_only), y, identity=False),
    }


def summarise(runs: list[dict]) -> dict:
    table = {"all checkpoints": r2_scope(runs), "final checkpoints": r2_scope(runs, final_only=True)}
    for size in sorted({_data_size(r["run"]) for r in runs} - {None}):
        table[f"n{size} runs"] = r2_scope([r for r in runs if _data_size(r["run"]) == size])
    y = pooled(runs, "test_acc")
    sweep = {f"{nu:g}": r2_row(np.concatenate([premem_at(r, nu) for r in runs]), y) for nu in SWEEP}
    auto_pm = [premem_at(r, r["auto"]) if not np.isnan(r["auto"]) else np.full(len(r["test_acc"]), np.nan) for r in runs]
    sweep["auto"] = r2_row(np.concatenate(auto_pm), y)
    sweep["copy rule"] = r2_row(np.concatenate([premem_copy_rule(r) for r in runs]), y)
    pairs = np.array([p for r in runs for p in r["robustness"]]).reshape(-1, 3)
    robust = {"all": robustness(pairs), "solved": robustness(pairs[pairs[:, 1] >= SOLVED])}
    return {"runs": len(runs), "r2": table, "threshold_sweep": sweep,
            "auto_thresholds": {r["run"]: r["auto"] for r in runs}, "robustness": robust}


def _data_size(run_name: str) -> int | None:
    """Training-set size from a lab run name such as ``dense-lr0.001-n300-e60`` (None when absent)."""
    import re

    match = re.search(r"-n(\d+)-", run_name)
    return int(match.group(1)) if match else None


def _f(x: float, spec: str = "+.3f") -> str:
    return "—" if x is None or np.isnan(x) else format(x, spec)


def print_summary(runs: list[dict], s: dict) -> None:
    print("\nPer run: pre-memorization accuracy (predicted) vs true held-out accuracy, by checkpoint")
    for r in runs:
        pairs = "  ".join(f"{st}:{p:.2f}/{t:.2f}" for st, p, t in zip(r["steps"], r["premem"], r["test_acc"]))
        print(f"  {r['run']:<26} nu={r['threshold']:.3g} auto={_f(r['auto'], '.3g')}  {pairs}")
    print(f"\n{s['runs']} run(s). R² against true held-out accuracy (identity line | fitted line)")
    print(f"  {'scope':<18} {'n':>4}  {'premem_acc':>17}  {'train_acc':>17}  {'train_loss':>17}")
    for scope, row in s["r2"].items():
        cells = "  ".join(f"{_f(row[m][0]):>7} | {_f(row[m][1]):>7}" for m in ("premem_acc", "train_acc", "train_loss"))
        print(f"  {scope:<18} {row['n']:>4}  {cells}")
    print("  target: identity-line R² >= 0.85 for premem_acc and above every baseline")
    print("\nnu (nats/token) against R² of pre-memorization accuracy, all checkpoints (identity | fitted)")
    for nu, (ri, rf) in s["threshold_sweep"].items():
        print(f"  nu={nu:<6} {_f(ri):>7} | {_f(rf):>7}")
    autos = [v for v in s["auto_thresholds"].values() if not np.isnan(v)]
    if autos:
        print(f"  auto: calibrated per run, median {np.median(autos):.3g} (range {min(autos):.3g}-{max(autos):.3g})")
    print("\nPerturbing the question: accuracy lost at the final checkpoint (examples measured by both sides)")
    for scope, rb in s["robustness"].items():
        label = "all examples" if scope == "all" else f"solved (clean acc >= {SOLVED:g})"
        print(f"  {label:<24} n={rb['n']:<4} premem < 0.5: {_f(rb['drop_low'])} (n={rb['low_n']}); "
              f">= 0.5: {_f(rb['drop_high'])} (n={rb['high_n']}); Spearman(premem, loss) {_f(rb['spearman'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lab_out", type=Path)
    parser.add_argument("--max-examples", type=int, default=100)
    parser.add_argument("--examples-seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/ckptsel-rank-validation"))
    parser.add_argument("--json", type=Path, help="Also write the figures as JSON.")
    args = parser.parse_args()

    runs_found = lab_runs(args.lab_out)
    if not runs_found:
        sys.exit(f"no lab runs (ground_truth.json + train.jsonl) under {args.lab_out}")
    runs = []
    for run in runs_found:
        start = time.perf_counter()
        ranking, collected = rank_run(run, args.cache_dir, args.max_examples, args.examples_seed, None)
        runs.append(run_arrays(run, ranking, collected))
        print(f"{run.name}: ranked in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    summary = summarise(runs)
    print_summary(runs, summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, default=float))


if __name__ == "__main__":
    main()
