"""Does the sweep ranking pick the right run? Kang et al.'s released arrays and the lab grid as one sweep.

Part 1, ``--kang DIR`` (default: the GSM8K arrays beside the repository, ``shared/data/kang2024``):
Kang et al.'s per-example measurements of 13 Llama3-8B GSM8K fine-tunes (1 to 12 epochs, learning
rates 5e-7 to 2e-4, full/half/quarter data; 51 checkpoints) go through
:func:`ckptsel.sweep.rank_sweep` exactly as released (train accuracy of k=5 samples, target NLL),
with the gsm8k recipe's ν = 0.100. Printed: the identity-line R² of pre-memorization accuracy
against test accuracy over all checkpoints (and of raw train accuracy), and the test accuracy of
the sweep's pick against the sweep's best checkpoint, beside simpler picks (highest PM; the
highest-PM run's last checkpoint; the last checkpoint of the run with the highest train accuracy).
No copy rates were released, so ``--threshold auto`` cannot be checked on these arrays.

Part 2, ``--lab DIR``: a lab output folder (``ckptsel lab run main --out DIR``) ranked as one
sweep, as ``ckptsel rank DIR --data-per-run train.jsonl`` does (the library call behind it), on
``--max-examples`` training examples per run (default 100), with ν fixed (the recipe's), auto
calibrated per run, and auto pooled over the sweep. Printed for each: pooled identity R² of PM
against the lab's true held-out accuracy over all checkpoints, the pick's true held-out accuracy
against the sweep's oracle (the best checkpoint by true held-out accuracy), and the ν used. The
lab's runs are each other's data-size sweep: runs with the same data file content are measured
on the same examples, so their comparison is paired.

    python benchmarks/sweep_validation.py [--kang DIR] [--lab DIR --cache-dir DIR [--ray]] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

KANG = Path(__file__).resolve().parents[2] / "shared" / "data" / "kang2024"


def kang_runs(folder: Path):
    """RunArrays of every released run, and its test accuracy per checkpoint."""
    from ckptsel.sweep import RunArrays

    runs, truth = [], {}
    for path in sorted(folder.glob("gsm8k_*.npz")):
        d = np.load(path)
        name = path.stem.removeprefix("gsm8k_orig_").removesuffix("_bs128")
        runs.append(RunArrays(name=name, steps=[int(s) for s in d["steps"]], acc=d["train_acc"], nll=d["train_nll"],
                              examples=[str(i) for i in d["train_idx"]]))
        truth[name] = np.asarray(d["test_acc"], dtype=float)
    if not runs:
        raise SystemExit(f"{folder}: no gsm8k_*.npz files")
    return runs, truth


def picks(result, truth: dict[str, np.ndarray], train_acc: dict[str, np.ndarray]) -> dict[str, float]:
    """True accuracy of the sweep's pick and of the simpler rules, and the sweep's best."""
    rows = _rows(result)
    true = {(r.run, r.index): float(truth[r.run][r.index]) for r in rows}
    best_pm = max(rows, key=lambda r: r.premem_acc)
    last = {r.run: r for r in rows}  # the last row of each run
    best_run_last = last[best_pm.run]
    best_train = max(last.values(), key=lambda r: train_acc[r.run][r.index])
    rec = next(r for r in rows if (r.run, r.step) == result.recommended)
    return {
        "sweep_pick": true[(rec.run, rec.index)],
        "sweep_pick_run": rec.run,
        "sweep_pick_step": rec.step,
        "highest_pm": true[(best_pm.run, best_pm.index)],
        "highest_pm_run_last": true[(best_run_last.run, best_run_last.index)],
        "highest_train_acc_run_last": true[(best_train.run, best_train.index)],
        "oracle": max(true.values()),
    }


def _rows(result) -> list:
    """One row per (run, checkpoint) of a ckptsel.sweep.SweepResult: run, index, step, premem_acc, train_acc."""
    from types import SimpleNamespace

    return [SimpleNamespace(run=r.name, index=j, step=r.steps[j], premem_acc=float(r.columns["premem_acc"][j]),
                            train_acc=float(r.columns["train_acc"][j])) for r in result.runs for j in range(len(r.steps))]


def r2_table(result, truth) -> dict[str, float]:
    from ckptsel.metrics import r2_identity

    rows = _rows(result)
    pm = np.array([r.premem_acc for r in rows])
    train = np.array([r.train_acc for r in rows])
    test = np.array([truth[r.run][r.index] for r in rows])
    return {"r2_premem": r2_identity(pm, test), "r2_train_acc": r2_identity(train, test), "n": len(rows)}


def part_kang(folder: Path) -> dict:
    from ckptsel.sweep import rank_sweep

    runs, truth = kang_runs(folder)
    start = time.perf_counter()
    result = rank_sweep(runs, recipe="gsm8k")
    seconds = time.perf_counter() - start
    train = {r.run: None for r in result.rows}
    train = {name: np.array([r.train_acc for r in result.rows if r.run == name]) for name in train}
    out = {"runs": len(runs), "seconds": seconds, "nu": result.threshold.used, **r2_table(result, truth),
           **picks(result, truth, train)}
    out["per_run"] = [{"run": rr.name, "pick_step": rr.steps[rr.recommended], "pick_pm":
                       float(rr.columns["premem_acc"][rr.recommended]),
                       "pick_test": float(truth[rr.name][rr.recommended]), "best_test": float(truth[rr.name].max())}
                      for rr in result.runs]
    return out


def part_lab(folder: Path, cache_dir: Path | None, max_examples: int, ray: bool = False) -> dict:
    from ckptsel.discover import discover_runs
    from ckptsel.lab.ground_truth import read_ground_truth
    from ckptsel.metrics import r2_identity
    from ckptsel.pipeline import RankRequest, rank_runs
    from ckptsel.recipes import load_recipe
    from ckptsel.settings import EngineSettings

    engine = EngineSettings(ray="local" if ray else None)
    runs = [r for r in discover_runs(folder) if (r.path / "ground_truth.json").is_file()]
    if not runs:
        raise SystemExit(f"{folder}: no lab runs (run folders with ground_truth.json)")
    # Only the checkpoint-N folders: the lab's ground truth is per checkpoint.
    for run in runs:
        run.checkpoints[:] = [c for c in run.checkpoints if c.path.name.startswith("checkpoint-")]
    truth = {}
    for run in runs:
        gt = read_ground_truth(run.path)
        truth[run.name] = {int(step): v for step, v in gt["checkpoints"].items()}
    recipe = load_recipe(runs[0].path / "recipe.yaml")
    out = {"runs": len(runs), "checkpoints": sum(len(r.checkpoints) for r in runs), "modes": {}}
    for mode, threshold in (("fixed", None), ("auto per run", "auto-run"), ("auto pooled", "auto")):
        start = time.perf_counter()
        result = rank_runs(RankRequest(paths=(folder,), recipe=recipe, data_per_run="train.jsonl",
                                       threshold=threshold, max_examples=max_examples, cache_dir=cache_dir,
                                       runs=tuple(runs), engine=engine))
        seconds = time.perf_counter() - start
        ranking = result.ranking
        rows = [c for c in ranking.checkpoints if c.error is None]
        test = np.array([truth[c.run][c.step]["test_accuracy"] for c in rows])
        pm = np.array([c.premem_acc for c in rows])
        train = np.array([c.train_acc for c in rows])
        rec = ranking.checkpoints[ranking.recommended]
        best = max(rows, key=lambda c: truth[c.run][c.step]["test_accuracy"])
        per_run_oracle = sum(
            truth[c.run][c.step]["test_accuracy"] >= max(v["test_accuracy"] for v in truth[c.run].values()) - 0.02
            for c in ranking.checkpoints if c.recommended_in_run)
        th = ranking.threshold
        out["modes"][mode] = {
            "seconds": seconds, "measured": result.loaded,
            "nu": th.used, "nu_per_run": th.per_run, "fell_back": th.fell_back,
            "r2_premem": r2_identity(pm, test), "r2_train_acc": r2_identity(train, test),
            "pick": f"{rec.run}@{rec.step}", "pick_test": truth[rec.run][rec.step]["test_accuracy"],
            "oracle": f"{best.run}@{best.step}", "oracle_test": truth[best.run][best.step]["test_accuracy"],
            "run_picks_within_0.02_of_run_oracle": f"{per_run_oracle}/{len(ranking.runs)}",
            "warnings": [w for w in ranking.warnings if "threshold" in w or "auto" in w],
        }
    return out


def _f(v, spec=".3f"):
    return "—" if v is None else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kang", type=Path, default=KANG)
    ap.add_argument("--skip-kang", action="store_true")
    ap.add_argument("--lab", type=Path, help="A lab output folder (ckptsel lab run main --out DIR).")
    ap.add_argument("--cache-dir", type=Path)
    ap.add_argument("--max-examples", type=int, default=100)
    ap.add_argument("--ray", action="store_true", help="Measure on a local Ray (one task per core).")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    report = {}
    if not args.skip_kang:
        k = report["kang"] = part_kang(args.kang)
        print(f"Kang et al. GSM8K (Llama3-8B): {k['runs']} runs, {k['n']} checkpoints, nu = {k['nu']:.3f}, "
              f"rank_sweep {k['seconds']:.2f} s")
        print(f"  identity R², pre-memorization accuracy vs test accuracy: {k['r2_premem']:.3f}")
        print(f"  identity R², raw train accuracy vs test accuracy:        {k['r2_train_acc']:.3f}")
        print(f"  test accuracy of the sweep's pick ({k['sweep_pick_run']} step {k['sweep_pick_step']}): "
              f"{k['sweep_pick']:.3f}   sweep's best: {k['oracle']:.3f}")
        print(f"  simpler picks: highest PM {k['highest_pm']:.3f} · last checkpoint of the highest-PM run "
              f"{k['highest_pm_run_last']:.3f} · last checkpoint of the highest-train-acc run "
              f"{k['highest_train_acc_run_last']:.3f}")
        for r in k["per_run"]:
            print(f"    {r['run']:<28} pick step {r['pick_step']:>5}  PM {r['pick_pm']:.3f}  test {r['pick_test']:.3f}"
                  f"  (run best {r['best_test']:.3f})")
    if args.lab is not None:
        lab = report["lab"] = part_lab(args.lab, args.cache_dir, args.max_examples, args.ray)
        print(f"lab sweep {args.lab}: {lab['runs']} runs, {lab['checkpoints']} checkpoints, "
              f"{args.max_examples} examples per run")
        for mode, m in lab["modes"].items():
            nu = _f(m["nu"]) if m["nu"] is not None else "per run " + ", ".join(
                f"{v:.3f}" for v in m["nu_per_run"].values())
            print(f"  {mode:<13} nu {nu}{' (fell back)' if m['fell_back'] else ''}: R² PM {m['r2_premem']:.3f} "
                  f"(train acc {m['r2_train_acc']:.3f}); pick {m['pick']} true {m['pick_test']:.3f} vs oracle "
                  f"{m['oracle']} {m['oracle_test']:.3f}; run picks within 0.02 of their run's oracle "
                  f"{m['run_picks_within_0.02_of_run_oracle']}; {m['seconds']:.1f} s, {m['measured']} loads")
            for w in m["warnings"]:
                print(f"    warning: {w}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
