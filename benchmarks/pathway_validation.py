"""Do the pathway metrics track held-out accuracy? Validation on the lab's MoE runs.

For every MoE run in a lab output folder (a run folder: ``checkpoint-N/``, ``train.jsonl``,
``recipe.yaml`` and ``ground_truth.json``, as ``ckptsel lab`` writes them), the library path
of ``ckptsel rank`` (``collect`` with the ``score`` kind, then ``select.rank``) on the run's
``--max-examples`` seeded training subset gives, per checkpoint:

* pathway distance and pathway complexity over the memorised examples (target NLL below the
  run recipe's threshold nu; ``--threshold`` overrides), as ``ckptsel rank`` reports them;
* the same over all measured examples (the memorised set is small or empty early in a run),
  and over one fixed set, the examples memorised at the run's last checkpoint (``_final``:
  the same examples at every checkpoint, as the paper follows its memorised samples);
* the training loss the Trainer logged last at that step, and the held-out test accuracy
  from ``ground_truth.json`` (k samples per test question, graded).

With ``--cache-dir`` pointing at a store that already holds the runs' target scores (a copy
of the over-memorization validation's store), only the routing weights are measured.

The paper (Li, Fan & Zhou 2025) reports |Pearson r| 0.92-0.99 between these metrics and
downstream accuracy once training loss has stopped moving. Our window: the checkpoints
from the one *before* test accuracy first exceeds its starting value by 10% of the run's
accuracy range, to the end (all checkpoints when that leaves fewer than 4; a run whose
accuracy never rises by 0.02 carries no signal and is reported but not counted). Pearson
and Spearman per run and metric; the headline is the median |r| over runs (target >= 0.8),
next to the training loss's. ``--window late`` instead takes the paper's regime from the
training side alone: the checkpoints from the first whose training loss has made 90% of its
total drop (3-5 of the lab's 8 checkpoints, so read its correlations as indications only).

    python benchmarks/pathway_validation.py LAB_OUT --cache-dir DIR [--max-examples 100 --cutoff 0.8
        --order weight --window rise --json out.json]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

import numpy as np

METRICS = ("distance_mem", "complexity_mem", "distance_all", "complexity_all", "distance_final", "complexity_final",
           "train_loss")
MIN_WINDOW = 4
RISE_FRACTION = 0.1
MIN_RISE = 0.02
LATE_DROP = 0.9  # --window late: training loss within 10% of its total drop of the final value


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


def measure_run(run: Path, cache_dir: Path, max_examples: int, threshold: float | None, cutoff: float,
                order: str) -> list[dict]:
    from ckptsel.collect import collect, select_examples
    from ckptsel.data import load_examples
    from ckptsel.discover import discover
    from ckptsel.lab.ground_truth import read_ground_truth
    from ckptsel.measure.loading import load_tokenizer
    from ckptsel.recipes import load_recipe, override
    from ckptsel.select import pathway_metrics, rank
    from ckptsel.settings import PathwaySettings, SelectionSettings
    from ckptsel.store import Store

    checkpoints = [c for c in discover([run]) if c.step is not None and c.path.name.startswith("checkpoint-")]
    recipe = load_recipe(str(run / "recipe.yaml"))
    if threshold is not None:
        recipe = override(recipe, memorization={"threshold": threshold})
    if recipe.memorization.threshold == "auto":
        raise SystemExit(f"{run}: recipe threshold is 'auto'; pass --threshold")
    settings = PathwaySettings(cutoff=cutoff, order=order)
    tokenizer = load_tokenizer(checkpoints[0])
    examples = select_examples(load_examples(run / "train.jsonl", recipe, tokenizer=tokenizer),
                               SelectionSettings(max_examples=max_examples))
    uids = [ex.uid for ex in examples]
    truth = read_ground_truth(run)["checkpoints"]
    t0 = time.perf_counter()
    with Store.open(cache_dir) as store:
        collected = collect(checkpoints, examples, recipe, store, tokenizer=tokenizer, kinds=("score",))
        ranking = rank(collected, store, recipe.memorization, pathway_settings=settings, n_boot=10)
        records = [store.get_many(c.fingerprint, collected.settings_key, "score", uids) for c in ranking.checkpoints]
    print(f"  {collected.loaded} checkpoint(s) loaded for routing weights, {time.perf_counter() - t0:.1f}s")
    final = ranking.per_example["memorized"][-1] & ~np.isnan(ranking.per_example["nll"][-1])
    out = []
    for c, stored in zip(ranking.checkpoints, records):
        mem = c.pathways
        whole = pathway_metrics(stored, uids, np.ones(len(uids), dtype=bool), settings)
        fixed = pathway_metrics(stored, uids, final, settings)
        row = {"step": c.step, "test_accuracy": truth.get(str(c.step), {}).get("test_accuracy", float("nan")),
               "train_loss": c.train_loss if c.train_loss is not None else float("nan"),
               "memorised": mem.n_examples, "mean_nll": c.target_nll,
               "distance_mem": mem.distance, "complexity_mem": mem.complexity,
               "distance_all": whole.distance, "complexity_all": whole.complexity,
               "distance_final": fixed.distance, "complexity_final": fixed.complexity,
               "length_all": whole.mean_length, "unique_all": whole.n_unique}
        out.append(row)
        print(f"  step {row['step']:6d}  test acc {row['test_accuracy']:.3f}  loss {row['train_loss']:.3f}  memorised "
              f"{row['memorised']:4d}/{len(uids)}  distance mem/all {row['distance_mem']:7.3f} "
              f"{row['distance_all']:7.3f}  complexity mem/all {row['complexity_mem']:.4f} {row['complexity_all']:.4f}"
              f"  all: length {row['length_all']:5.2f}, {row['unique_all']:3d} distinct",
              flush=True)
    return out


def window(acc: np.ndarray) -> slice | None:
    """Checkpoints from the one before accuracy starts rising; None when it never rises."""
    rise = np.nanmax(acc) - acc[0]
    if not rise >= MIN_RISE:
        return None
    start = max(0, int(np.argmax(acc > acc[0] + RISE_FRACTION * rise)) - 1)
    return slice(start, None) if len(acc) - start >= MIN_WINDOW else slice(0, None)


def late_window(loss: np.ndarray) -> slice:
    """Checkpoints once training loss has (nearly) stopped moving; chosen without the test set."""
    remaining = loss - loss[-1]
    return slice(int(np.argmax(remaining <= (1 - LATE_DROP) * remaining[0])), None)


def correlate(rows: list[dict], late: bool = False) -> dict | None:
    from ckptsel.metrics import pearson, spearman

    acc = np.array([r["test_accuracy"] for r in rows], dtype=float)
    span = window(acc)
    if span is None:
        return None
    if late:
        span = late_window(np.array([r["train_loss"] for r in rows], dtype=float))
    result = {"window_steps": [r["step"] for r in rows[span]]}
    for metric in METRICS:
        values = np.array([r[metric] for r in rows], dtype=float)[span]
        result[metric] = {"pearson": pearson(values, acc[span]), "spearman": spearman(values, acc[span])}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lab_out", type=Path, help="a lab output folder (its MoE runs are used), or one run folder")
    parser.add_argument("--cache-dir", type=Path, required=True, help="result store (a copy of one holding the runs)")
    parser.add_argument("--max-examples", type=int, default=100, help="training examples measured per checkpoint")
    parser.add_argument("--threshold", type=float, default=None, help="memorisation nu (default: the run's recipe)")
    parser.add_argument("--cutoff", type=float, default=0.8)
    parser.add_argument("--order", choices=["weight", "expert"], default="weight")
    parser.add_argument("--window", choices=["rise", "late"], default="rise",
                        help="checkpoints correlated: from accuracy's rise, or once training loss stops moving")
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
        rows = measure_run(run, args.cache_dir, args.max_examples, args.threshold, args.cutoff, args.order)
        report["runs"][run.name] = {"checkpoints": rows, "correlation": correlate(rows, args.window == "late")}

    print("\nPearson r / Spearman rho with test accuracy (window: "
          + ("once training loss has made 90% of its drop)" if args.window == "late"
             else "from the checkpoint before accuracy rises)"))
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
                counted[m].append(r)
            cells.append(f"{r:+.2f} / {rho:+.2f}")
        print(f"{name:32s}" + "".join(f"{c:>18s}" for c in cells))
    # |r| alone hides a sign that flips between runs: the signed median and the runs with a value go beside it.
    medians = {m: (statistics.median(map(abs, v)) if v else float("nan")) for m, v in counted.items()}
    signed = {m: (statistics.median(v) if v else float("nan")) for m, v in counted.items()}
    report["median_abs_pearson"] = medians
    report["median_pearson"] = signed
    report["runs_with_value"] = {m: len(v) for m, v in counted.items()}
    print(f"{f'median |r| over {n_counted} runs':32s}" + "".join(f"{medians[m]:>18.2f}" for m in METRICS))
    print(f"{'median signed r':32s}" + "".join(f"{signed[m]:>+18.2f}" for m in METRICS))
    print(f"{'runs with a value':32s}" + "".join(f"{len(counted[m]):>18d}" for m in METRICS))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=float))


if __name__ == "__main__":
    main()
