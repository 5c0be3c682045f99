"""Can anything measured on the training questions tell a small training set memorised from one that generalises?

On every lab grid the runs of 100-300 training examples trained for 60-80 epochs answer their training questions
(train accuracy 1.0, pre-memorization accuracy 0.4-0.8) while held-out accuracy stays at 0.1-0.2; the runs of
500-600 examples look the same on their training questions and reach 0.6-0.85 held out. Pre-memorization
accuracy cannot tell them apart (benchmarks/nu_aggregation.py), so the over-memorized flag fires on both and is
"false" on the first (the lab's truth calls over-memorization only runs that generalise). This script asks the
models themselves, greedy, on each run's first ``--max-examples`` training questions at its last checkpoint:

  train        the training question as trained (the reference);
  twin         the lab's equivalent question (operands reordered, same answer): a surface change a user could make;
  format       the prompt under ckptsel's ``format`` perturbation (its newlines doubled: ckptsel.proxies);
  valid        right *and* every step of the trace valid (the ``lab-steps`` grader);
  recite       on the question with every number redrawn (same digit count), the *original* answer given, where
               the redrawn question's answer differs: recitation of a memorised answer;
  fresh        the redrawn question answered right (its answer computed by the lab's task: an oracle a
               training-data-only tool does not have; it stands in for held-out accuracy and checks the pipeline).

Per lab and run size, the mean of each probe beside held-out accuracy; a probe is a signal only if it is low where
held-out accuracy is low and high where it is high.

    python benchmarks/small_data_probes.py /tmp/lab/main /tmp/lab/heldout [/tmp/lab/check ...] [--json F]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

PROBES = ("train", "twin", "format", "valid", "recite", "fresh")
_NUMBER = re.compile(r"\d+")


def redraw_numbers(question: str, rng: random.Random) -> str:
    """Every number replaced by a different one of as many digits."""
    def swap(match: re.Match) -> str:
        old = match.group(0)
        low, high = (10 ** (len(old) - 1), 10 ** len(old) - 1) if len(old) > 1 else (1, 9)
        while (new := str(rng.randint(low, high))) == old:
            pass
        return new
    return _NUMBER.sub(swap, question)


def lab_answer(question: str) -> int:
    """The value of a lab question of the sum or max family (``7+1+5=?``, ``max(3,9)=?``)."""
    expression = question.split("=")[0]
    if expression.startswith("max("):
        return max(int(t) for t in expression[4:-1].split(","))
    return sum(int(t) for t in expression.split("+"))


def final_answer(text: str) -> int | None:
    match = re.search(r"####\s*(-?\d+)", text)
    return int(match.group(1)) if match else None


def probe_run(run: Path, max_examples: int) -> dict:
    """Each probe's rate at the last checkpoint of one lab run, beside its held-out accuracy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ckptsel import graders
    from ckptsel.lab.ground_truth import read_ground_truth
    from ckptsel.measure.sampling import sample_completions
    from ckptsel.measure.text import max_new_tokens_for
    from ckptsel.proxies import PERTURBATIONS
    from ckptsel.recipes import load_recipe
    from ckptsel.settings import SamplingSettings

    rows = [json.loads(line) for line in (run / "train.jsonl").read_text().splitlines()[:max_examples]]
    template = load_recipe(run / "recipe.yaml").data.prompt_template  # the prompt as the run was trained on it
    rng = random.Random(0)
    redrawn = [redraw_numbers(r["question"], rng) for r in rows]
    folder = max(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    budgets = [max_new_tokens_for([len(tokenizer(r["answer"])["input_ids"])]) for r in rows]
    keys = [str(i) for i in range(len(rows))]

    def answer(questions: list[str], perturb=lambda prompt: prompt) -> list[str]:
        """Each question's greedy completion, prompted with the run's template (and ``perturb`` applied)."""
        prompts = [perturb(template.format(question=q)) for q in questions]
        with torch.no_grad():
            done = sample_completions(model, tokenizer, prompts, sampling=SamplingSettings(k=1, temperature=0.0),
                                      max_new_tokens=budgets, keys=keys)
        return [c[0] for c in done]

    plain = answer([r["question"] for r in rows])
    twin = [final_answer(t) for t in answer([r.get("perturbed") or r["question"] for r in rows])]
    shifted = [final_answer(t) for t in answer([r["question"] for r in rows], PERTURBATIONS["format"])]
    given = [final_answer(t) for t in answer(redrawn)]
    values, other_values = [r["value"] for r in rows], [lab_answer(q) for q in redrawn]
    valid = graders.get("lab-steps")
    rates = {
        "train": np.mean([final_answer(t) == v for t, v in zip(plain, values)]),
        "twin": np.mean([a == v for a, v in zip(twin, values)]),
        "format": np.mean([a == v for a, v in zip(shifted, values)]),
        "valid": np.mean([valid(t, r["answer"]) for t, r in zip(plain, rows)]),
        "recite": np.mean([g == v != o for g, v, o in zip(given, values, other_values)]),
        "fresh": np.mean([g == o for g, o in zip(given, other_values)]),
    }
    step = folder.name.split("-")[1]
    return {"run": run.name, "n_train": json.loads((run / "run.json").read_text())["spec"]["n_train"],
            "step": int(step), "test_accuracy": read_ground_truth(run)["checkpoints"][step]["test_accuracy"],
            **{k: float(v) for k, v in rates.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("labs", nargs="+", type=Path, help="lab output folders (runs with ground_truth.json)")
    parser.add_argument("--max-examples", type=int, default=100)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    results = []
    for lab in args.labs:
        for run in sorted(p.parent for p in lab.glob("*/ground_truth.json")):
            if "families" in (spec := json.loads((run / "run.json").read_text())["spec"]) and not set(
                    spec["families"]) <= {"sum", "max"}:
                continue
            results.append({"lab": lab.name, **probe_run(run, args.max_examples)})
            last = results[-1]
            print(f"{lab.name}/{run.name}: last checkpoint held-out {last['test_accuracy']:.2f}; " + ", ".join(
                f"{p} {last[p]:.2f}" for p in PROBES), flush=True)
    by_size: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in results:
        by_size[(r["lab"], r["n_train"])].append(r)
    print("\n| lab | training examples | runs | held-out | " + " | ".join(PROBES) + " |")
    print("|---|---|---|---|" + "---|" * len(PROBES))
    for (lab, n), lasts in sorted(by_size.items()):
        print(f"| {lab} | {n} | {len(lasts)} | {np.mean([c['test_accuracy'] for c in lasts]):.2f} | " + " | ".join(
            f"{np.mean([c[p] for c in lasts]):.2f}" for p in PROBES) + " |")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
