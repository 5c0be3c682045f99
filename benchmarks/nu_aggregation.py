"""Which per-token aggregation of the target NLL makes "memorised" transfer between labs?

Kang et al. call an example memorised when its target's mean NLL per token is below nu. On a task
whose trace mostly copies the question (the held-out lab's ``max(62,69,36,64)`` rewrites), the
copied tokens are cheap whether or not the model can solve the task, so the mean is low early and
nu = 0.1 marks examples memorised in runs that generalise (benchmarks/README.md, "Does the pick hold
up"). A memorised trace is reproduced token by token, *including* the tokens where a model that
solves the task has a choice (which pair to merge next: several valid traces); so this script
re-scores every lab checkpoint's measured training examples token by token (the same examples and
tokenisation as ``ckptsel rank``: :func:`ckptsel.measure.scoring.encode_pairs`) and compares
aggregations -- mean (the paper's), max, the mean of the three costliest tokens, the 0.9 quantile,
the sum -- by the pooled identity R² of pre-memorization accuracy against held-out accuracy, nu
chosen on ``--main`` and reported on ``--heldout``; the same restricted to runs of at least 500 training
examples; and per run its size, the best PM against the best held-out accuracy and PM's Pearson with
held-out accuracy over the run: where the lab's small-data runs sit.

    python benchmarks/nu_aggregation.py --main /tmp/lab/main --heldout /tmp/lab/heldout \\
        --cache-dir /tmp/lab/cache --max-examples 100 [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pick_validation import LabRun, load_lab  # noqa: E402

AGGREGATIONS = {
    "mean": (np.mean, (0.03, 0.05, 0.07, 0.1, 0.15, 0.2)),
    "max": (np.max, (0.3, 0.5, 0.7, 1.0, 1.5, 2.0)),
    "top3": (lambda t: float(np.mean(np.sort(t)[-3:])), (0.3, 0.5, 0.7, 1.0, 1.5)),
    "q90": (lambda t: float(np.quantile(t, 0.9)), (0.1, 0.2, 0.3, 0.5, 0.7)),
    "sum": (np.sum, (1.0, 2.0, 3.0, 5.0)),
}


def token_nlls(folder: Path, run: LabRun, recipe) -> list[list[np.ndarray]]:
    """Per checkpoint, per measured example (the run's columns): the target's per-token NLL."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ckptsel.data import load_examples
    from ckptsel.measure.scoring import encode_pairs

    arrays = run.arrays
    path = folder / arrays.name
    tokenizer = AutoTokenizer.from_pretrained(path / f"checkpoint-{arrays.steps[0]}")
    by_uid = {e.uid: e for e in load_examples(path / "train.jsonl", recipe, tokenizer)}
    chosen = [by_uid[u] for u in arrays.examples]
    pairs = encode_pairs(tokenizer, [e.prompt for e in chosen], [e.target for e in chosen],
                         append_eos=recipe.data.append_eos, ends=[e.end_of_turn for e in chosen])
    out = []
    for step in arrays.steps:
        model = AutoModelForCausalLM.from_pretrained(path / f"checkpoint-{step}").eval()
        with torch.no_grad():
            out.append([torch.nn.functional.cross_entropy(
                model(input_ids=torch.tensor([p + t])).logits[0, len(p) - 1: len(p) + len(t) - 1].float(),
                torch.tensor(t), reduction="none").numpy() for p, t in pairs])
    return out


def pooled_r2(runs: list[LabRun], tokens: dict, aggregate, nu: float) -> float:
    from ckptsel import metrics

    predicted, measured = [], []
    for run in runs:
        values = np.array([[aggregate(t) for t in row] for row in tokens[run.arrays.name]])
        predicted.extend(metrics.premem_accuracy(run.arrays.acc, values, nu))
        measured.extend(run.test_acc)
    return metrics.r2_identity(np.array(predicted), np.array(measured))


LARGE = 500  # training examples: the runs small-data over-prediction leaves alone (benchmarks/README.md)


def train_rows(folder: Path, run: LabRun) -> int:
    """How many examples the run was trained on (its train.jsonl's rows)."""
    with open(folder / run.arrays.name / "train.jsonl", encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def large(runs: list[LabRun], tokens: dict, folder: Path) -> tuple[list[LabRun], dict]:
    return [r for r in runs if train_rows(folder, r) >= LARGE], tokens


def lab(folder: Path, cache_dir: Path, max_examples: int):
    import torch

    torch.set_num_threads(1)
    runs, recipe, _ = load_lab(folder, cache_dir, max_examples)
    return runs, {run.arrays.name: token_nlls(folder, run, recipe) for run in runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--main", type=Path, required=True, help="the main lab (nu chosen here)")
    parser.add_argument("--heldout", type=Path, required=True, help="the held-out lab (only reported)")
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--max-examples", type=int, default=100)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    labs = {"main": lab(args.main, args.cache_dir, args.max_examples),
            "heldout": lab(args.heldout, args.cache_dir, args.max_examples)}
    figures: dict = {"aggregations": {}, "runs": {}}
    print("pooled R² of PM vs held-out accuracy, main (tuned) / held-out (not tuned), per nu:")
    for name, (aggregate, grid) in AGGREGATIONS.items():
        row = {f"{nu:g}": [pooled_r2(*labs[k], aggregate, nu) for k in ("main", "heldout")] for nu in grid}
        chosen = max(row, key=lambda nu: row[nu][0])
        figures["aggregations"][name] = {"grid": row, "chosen_on_main": chosen}
        cells = "  ".join(f"{nu}: {m:.3f} / {h:.3f}" for nu, (m, h) in row.items())
        print(f"  {name:5s} {cells}   -> chosen on main: nu {chosen}: {row[chosen][0]:.3f} / {row[chosen][1]:.3f}")
    from ckptsel import metrics

    print(f"\nthe same on runs of >= {LARGE} training examples only (mean, nu 0.1 / max, nu 1.0), main / held-out: "
          + " · ".join(" / ".join(f"{pooled_r2(*large(*labs[k], folder), aggregate, nu):.3f}"
                                  for aggregate, nu in ((np.mean, 0.1), (np.max, 1.0)))
                       for k, folder in (("main", args.main), ("heldout", args.heldout))))
    print("\nper run: training examples; best PM (mean, nu 0.1) / best PM (max, nu 1.0) / best held-out accuracy; "
          "Pearson of PM (mean) with held-out accuracy over the run")
    for key, folder in (("main", args.main), ("heldout", args.heldout)):
        runs, tokens = labs[key]
        for run in runs:
            values = np.array([[np.max(t) for t in row] for row in tokens[run.arrays.name]])
            pm = metrics.premem_accuracy(run.arrays.acc, run.arrays.nll, 0.1)
            best = (float(np.nanmax(pm)), float(np.nanmax(metrics.premem_accuracy(run.arrays.acc, values, 1.0))),
                    float(run.test_acc.max()), metrics.pearson(pm, run.test_acc))
            figures["runs"][f"{key}/{run.arrays.name}"] = best
            print(f"  {key:8s} {run.arrays.name:28s} {train_rows(folder, run):5d}; {best[0]:.2f} / {best[1]:.2f} / "
                  f"{best[2]:.2f}; r {best[3]:+.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
