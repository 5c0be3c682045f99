"""Does ``CkptselCallback(stop_on_overmemorization=True)`` stop lab runs at the right save?

For every lab run (a run folder with ``checkpoint-N/``, ``train.jsonl``, ``recipe.yaml`` and
``ground_truth.json``, as ``ckptsel lab run`` writes them) this replays what the callback
computes during training, save after save: at save j, :func:`ckptsel.collect.collect` on the
checkpoints up to j (only checkpoint j is measured; the earlier ones come from the store, and
the alternative-solution set is decided from checkpoints <= j, exactly as in the callback),
then :func:`ckptsel.select.rank` of those j checkpoints. The callback stops after the first
``patience`` saves in a row whose own checkpoint is flagged over-memorized.

Replay, not retraining: stopping does not change what comes before the stop (the schedule
depends on ``max_steps``, not on when training ends, and the callback leaves training
bit-identical: tests/test_callback.py), so the stopped run's checkpoints are the full run's
first ones, and the callback measures them in memory exactly as they are measured here from
disk (tests/test_callback.py compares the two). What replay does not show is the callback's
own time; ``callback_cost.py`` prints that.

Printed per run and pooled:

* the save at which it stops against the first checkpoint flagged in the full run's ranking
  (all checkpoints), and the lab's truly over-memorized checkpoints
  (:func:`ckptsel.lab.summary.overmemorized`: held-out NLL >= 1.25 x its minimum so far with
  held-out accuracy within 0.05 of the run's best);
* training compute saved: 1 - stop step / final step (steps are equal cost);
* the true held-out accuracy of the stopped run's recommended checkpoint (recommendation among
  the checkpoints up to the stop) against the full run's oracle (its best checkpoint) and the
  full run's own recommendation.

    python benchmarks/callback_validation.py LAB_OUT [--runs NAME ...] [--max-examples 100]
        [--patience 1 2] [--cache-dir DIR] [--json out.json]

LAB_OUT is a ``ckptsel lab run main --out LAB_OUT`` folder (or any folder of lab runs).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def lab_runs(out: Path, names: list[str] | None) -> list[Path]:
    candidates = [out, *sorted(p for p in out.iterdir() if p.is_dir())]
    runs = [p for p in candidates if (p / "ground_truth.json").is_file() and (p / "train.jsonl").is_file()]
    return [p for p in runs if names is None or p.name in names]


def replay(run: Path, cache_dir: Path, max_examples: int | None) -> list:
    """The callback's ranking after each save: one :class:`ckptsel.select.Ranking` per checkpoint."""
    from ckptsel.collect import collect, select_examples
    from ckptsel.data import load_data
    from ckptsel.discover import discover_runs
    from ckptsel.measure.loading import load_tokenizer
    from ckptsel.recipes import load_recipe
    from ckptsel.select import rank
    from ckptsel.settings import SelectionSettings
    from ckptsel.store import Store

    (found,) = discover_runs([run])
    checkpoints = [c for c in found.checkpoints if c.path.name.startswith("checkpoint-")]
    recipe = load_recipe(run / "recipe.yaml")
    tokenizer = load_tokenizer(checkpoints[0])
    examples = select_examples(load_data(run / "train.jsonl", recipe, tokenizer=tokenizer).examples,
                               SelectionSettings(max_examples=max_examples))
    rankings = []
    with Store.open(cache_dir) as store:
        for j in range(1, len(checkpoints) + 1):
            collected = collect(checkpoints[:j], examples, recipe, store, tokenizer=tokenizer,
                                proxy_settings=recipe.proxies)
            rankings.append(rank([collected], store, recipe.memorization, recipe.stages,
                                 pathway_settings=recipe.pathways, run_names=[found.name],
                                 run_paths=[str(found.path)]))
    return rankings


def stop_index(rankings: list, patience: int) -> int | None:
    """The save (0-based) at which the callback stops: ``patience`` flagged saves in a row."""
    in_a_row = 0
    for j, ranking in enumerate(rankings):
        in_a_row = in_a_row + 1 if ranking.checkpoints[j].stage == "over-memorized" else 0
        if in_a_row >= patience:
            return j
    return None


def run_figures(run: Path, rankings: list, patiences: list[int]) -> dict:
    from ckptsel.lab.summary import curves, overmemorized

    truth = json.loads((run / "ground_truth.json").read_text())
    by_step = {p["step"]: p for p in truth["checkpoints"].values()}
    full = rankings[-1]
    steps = [c.step for c in full.checkpoints]
    acc = [by_step[s]["test_accuracy"] for s in steps]
    oracle = max(acc)
    c = curves(truth)
    true_over = [s for s, flag in zip(c.steps, overmemorized(c.test_acc, c.test_nll)) if flag]
    flagged_full = [c.step for c in full.checkpoints if c.stage == "over-memorized"]
    rec_full = full.checkpoints[full.recommended].step if full.recommended is not None else None
    out = {
        "run": run.name, "steps": steps, "final_step": steps[-1], "test_accuracy": acc, "oracle": oracle,
        "true_overmemorized": [int(s) for s in true_over], "flagged_full": flagged_full,
        "first_flagged_full": flagged_full[0] if flagged_full else None,
        "recommended_full": rec_full, "recommended_full_acc": by_step[rec_full]["test_accuracy"] if rec_full else None,
        "stage_at_save": [r.checkpoints[j].stage for j, r in enumerate(rankings)],
        "stops": {},
    }
    for p in patiences:
        j = stop_index(rankings, p)
        if j is None:
            out["stops"][p] = None
            continue
        ranking = rankings[j]
        rec = ranking.checkpoints[ranking.recommended].step if ranking.recommended is not None else None
        out["stops"][p] = {
            "stop_step": steps[j], "saved": 1 - steps[j] / steps[-1], "recommended": rec,
            "recommended_acc": by_step[rec]["test_accuracy"] if rec is not None else None,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lab_out", type=Path)
    parser.add_argument("--runs", nargs="*", help="Only these run names.")
    parser.add_argument("--max-examples", type=int, default=100, help="The callback's default budget.")
    parser.add_argument("--patience", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/ckptsel-callback-validation"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import os

    import torch

    torch.set_num_threads(1)
    figures = []
    for run in lab_runs(args.lab_out, args.runs):
        started = time.time()
        rankings = replay(run, args.cache_dir, args.max_examples)
        fig = run_figures(run, rankings, args.patience)
        figures.append(fig)
        stages = " ".join({"underfit": "u", "generalizing": "g", "over-memorized": "O"}.get(s, "?")
                          for s in fig["stage_at_save"])
        print(f"\n{fig['run']} ({time.time() - started:.0f} s, load {os.getloadavg()[0]:.1f}): "
              f"stage at each save [{stages}] over steps {fig['steps']}")
        print(f"  full run: first flagged {fig['first_flagged_full']}, flagged {fig['flagged_full']}, truly "
              f"over-memorized {fig['true_overmemorized']}; recommended {fig['recommended_full']} "
              f"(true acc {_f(fig['recommended_full_acc'])}), oracle {fig['oracle']:.2f}")
        for p, stop in fig["stops"].items():
            if stop is None:
                print(f"  patience {p}: never stops")
                continue
            print(f"  patience {p}: stops at {stop['stop_step']} of {fig['final_step']} (saves "
                  f"{stop['saved']:.0%} of training); recommends {stop['recommended']}, true acc "
                  f"{_f(stop['recommended_acc'])} vs oracle {fig['oracle']:.2f}")
    print("\npooled:")
    for p in args.patience:
        stopped = [f for f in figures if f["stops"][p] is not None]
        over = [f for f in figures if f["true_overmemorized"]]
        saved = [f["stops"][p]["saved"] for f in stopped]
        gaps = [f["oracle"] - f["stops"][p]["recommended_acc"] for f in stopped if f["stops"][p]["recommended_acc"] is not None]
        print(f"  patience {p}: {len(stopped)} of {len(figures)} runs stop ({len(over)} truly over-memorize; "
              f"stopped among those: {sum(f['stops'][p] is not None for f in over)}); compute saved "
              f"{_mean(saved):.0%} mean over stopped runs, {sum(saved) / max(len(figures), 1):.0%} over all runs; "
              f"oracle minus stopped-run recommendation: mean {_mean(gaps):.3f}, max {max(gaps, default=float('nan')):.3f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


def _f(value) -> str:
    return "—" if value is None else f"{value:.2f}"


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


if __name__ == "__main__":
    main()
