"""Does ``ckptsel merge RUN --recommend`` beat the best single checkpoint on the lab's held-out truth?

For each lab run (a run folder with ``checkpoint-N/``, ``train.jsonl``, ``recipe.yaml`` and
``ground_truth.json``), the library path of ``ckptsel merge --recommend`` ranks the run from
its training data (default settings, ``--max-examples`` examples, seed 0: the settings of
``benchmarks/overmem_validation.py``, so its result store makes the ranking free), builds
and measures the candidates, and writes the winner. Then the lab's ground truth of every
candidate is measured with :func:`ckptsel.lab.ground_truth.measure_checkpoint` and the run's
own ground-truth settings (k=5, T=0.8, top-p 0.95, the same seeds, budget and grader; the
perturbed-question accuracies are skipped: they are not part of this comparison). A single
checkpoint's numbers are read from ``ground_truth.json`` instead of being measured again.

Per run: true held-out reference NLL (``test_nll``) and held-out accuracy (``test_accuracy``)
of the written merge against (a) ckptsel's recommended single checkpoint and (b) the oracle
checkpoint with the lowest ``test_nll``. The [merge] issue's target: the merge's NLL lower
than the best single checkpoint's, its accuracy not lower by more than 0.01.

    cp -r /tmp/overmem/vmain /tmp/merge_cache   # the store of overmem_validation.py, copied
    python benchmarks/merge_recommend_validation.py /tmp/lab/main --cache-dir /tmp/merge_cache \\
        [--runs dense-lr0.003-n1500-e40 ...] [--lean-share 0.75] [--stock-anchor first] [--explore] \
        [--json out.json]

Without ``--runs``: the runs with truly over-memorized checkpoints (the lab's definition,
:func:`ckptsel.lab.summary.overmemorized`); ``--runs all`` takes every run. ``--lean-share``
sets the recommended checkpoint's share in the lean pair candidate (default ⅔).
``--stock-anchor first`` adds model_stock with the run's first checkpoint as its anchor: lab
runs are trained from scratch, so there is no base; on the lab its ratio t comes out near 1
(offsets from an early checkpoint are nearly parallel), so it matches the window's mean.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ACC_MARGIN = 0.01  # the issue's: merged held-out accuracy may be at most this much lower


def lab_runs(out: Path, names: list[str] | None) -> list[Path]:
    """Run folders under ``out``: the named ones, every one (``all``), or those with truly over-memorized
    checkpoints (the default)."""
    from ckptsel.lab.ground_truth import read_ground_truth
    from ckptsel.lab.summary import curves, overmemorized

    runs = sorted(p for p in out.iterdir() if (p / "ground_truth.json").is_file() and (p / "train.jsonl").is_file())
    if names == ["all"]:
        return runs
    if names:
        return [out / n for n in names]
    picked = []
    for run in runs:
        c = curves(read_ground_truth(run))
        if overmemorized(c.test_acc, c.test_nll).any():
            picked.append(run)
    return picked


def recommend_run(run: Path, cache_dir: Path, out: Path, max_examples: int, examples_seed: int,
                  anchor: Path | None = None, lean_share: float = 2 / 3):
    """The library path of ``ckptsel merge RUN --recommend`` with default settings; ``anchor``
    stands in for the base (``--base-model``), which enables the model_stock candidate."""
    from ckptsel.merge.recommend import recommend
    from ckptsel.pipeline import RankRequest, rank_runs
    from ckptsel.recipes import load_recipe
    from ckptsel.settings import EngineSettings
    from ckptsel.store import Store

    engine = EngineSettings()
    ranked = rank_runs(RankRequest(paths=(run,), recipe=load_recipe(str(run / "recipe.yaml")), data=run / "train.jsonl",
                                   max_examples=max_examples, examples_seed=examples_seed, engine=engine,
                                   cache_dir=cache_dir))
    with Store.open(cache_dir) as store:
        return recommend(ranked, store, engine=engine, out=out, force=True, work_dir=out.parent,
                         base_model=str(anchor) if anchor else None, lean_share=lean_share)


class Truth:
    """The lab's ground truth of one run, and of new models measured the same way."""

    def __init__(self, run: Path):
        from ckptsel.lab.ground_truth import GroundTruthSettings, read_ground_truth
        from ckptsel.lab.splits import read_jsonl
        from ckptsel.lab.tokenizer import build_tokenizer
        from ckptsel.measure.sampling import max_new_tokens_for

        self.stored = read_ground_truth(run)
        settings = GroundTruthSettings(**self.stored["settings"])
        self.settings = settings.model_copy(update={"perturbed": False})
        self.tokenizer = build_tokenizer()
        self.train = read_jsonl(run / "train.jsonl")[: settings.n_train_eval]
        self.test = read_jsonl(run / "test.jsonl")
        answers = [r.answer for r in self.train + self.test]
        self.budget = settings.sampling.max_new_tokens or max_new_tokens_for(
            [len(t) + 1 for t in self.tokenizer(answers, add_special_tokens=False)["input_ids"]])
        self.by_step = {p["step"]: p for p in self.stored["checkpoints"].values()}

    def of_step(self, step: int) -> dict:
        return self.by_step[step]

    def measure(self, folder: Path) -> dict:
        import torch

        from ckptsel.lab.ground_truth import load_checkpoint, measure_checkpoint

        model = load_checkpoint(folder)
        with torch.inference_mode():
            return measure_checkpoint(model, self.tokenizer, self.train, self.test, self.settings, self.budget)


def candidate_truth(rec, truth: Truth, work: Path) -> list[dict]:
    """True test NLL and accuracy of every candidate: the written merge, the others rebuilt into ``work``."""
    from ckptsel.merge import build

    rows = []
    for n, c in enumerate(rec.candidates):
        row = {"candidate": c.label, "name": c.spec.name, "chosen": n == rec.chosen, "eligible": rec.eligible[n],
               "proxy": getattr(c.metrics, rec.proxy) if c.metrics is not None and rec.proxy else None,
               "train_acc": getattr(c.metrics, "train_acc", None), "premem_acc": getattr(c.metrics, "premem_acc", None)}
        if c.spec.name == "single":
            point = truth.of_step(c.plan.inputs[0].step)
        elif n == rec.chosen:
            point = truth.measure(rec.result.path)  # the written merge itself
        else:
            folder = work / c.spec.name
            folder.mkdir(parents=True)
            build(c.plan, folder)
            point = truth.measure(folder)
        row.update(test_nll=point["test_nll"], test_accuracy=point["test_accuracy"])
        rows.append(row)
    return rows


def explore_pairs(run: Path, truth: Truth, work: Path) -> list[dict]:
    """``--explore``: the truth of every ½/½ merge of adjacent checkpoints, to see what the lab allows."""
    import shutil

    from ckptsel.discover import discover
    from ckptsel.merge import build, plan_merge

    checkpoints = [c for c in discover([run]) if c.path.name.startswith("checkpoint-")]
    rows = []
    for a, b in zip(checkpoints, checkpoints[1:]):
        folder = work / f"pair-{a.step}-{b.step}"
        folder.mkdir(parents=True)
        build(plan_merge([a, b]), folder)
        point = truth.measure(folder)
        shutil.rmtree(folder)
        rows.append({"steps": [a.step, b.step], "test_nll": point["test_nll"], "test_accuracy": point["test_accuracy"]})
    return rows


def run_figures(run: Path, rec, rows: list[dict], truth: Truth) -> dict:
    points = sorted(truth.by_step.values(), key=lambda p: p["step"])
    oracle = min(points, key=lambda p: p["test_nll"])
    best_acc = max(points, key=lambda p: p["test_accuracy"])
    single = rows[0]
    merged = next(r for r in rows if r["chosen"])
    return {
        "run": run.name,
        "recommended_step": rec.candidates[0].plan.inputs[0].step,
        "proxy": rec.proxy,
        "chosen": merged["candidate"],
        "merge": {"test_nll": merged["test_nll"], "test_accuracy": merged["test_accuracy"]},
        "single": {"test_nll": single["test_nll"], "test_accuracy": single["test_accuracy"]},
        "oracle_nll": _point(oracle),
        "oracle_acc": _point(best_acc),
        "target_vs_single": bool(merged["test_nll"] < single["test_nll"]
                                 and merged["test_accuracy"] >= single["test_accuracy"] - ACC_MARGIN),
        "target_vs_oracle": bool(merged["test_nll"] < oracle["test_nll"]
                                 and merged["test_accuracy"] >= oracle["test_accuracy"] - ACC_MARGIN),
        "candidates": rows,
    }


def _point(point: dict) -> dict:
    return {k: point[k] for k in ("step", "test_nll", "test_accuracy")}


def _f(value, spec=".3f") -> str:
    return "—" if value is None or (isinstance(value, float) and np.isnan(value)) else format(value, spec)


def print_report(figures: list[dict]) -> None:
    print("\nper run: true held-out NLL / accuracy (lab ground truth)")
    header = (f"{'run':<26} {'chosen':<46} {'merge nll':>9} {'acc':>6} {'rec step':>8} {'nll':>6} {'acc':>6} "
              f"{'oracle step':>11} {'nll':>6} {'acc':>6}  target(rec) target(oracle)")
    print(header)
    for f in figures:
        m, s, o = f["merge"], f["single"], f["oracle_nll"]
        print(f"{f['run']:<26} {f['chosen']:<46} {_f(m['test_nll']):>9} {_f(m['test_accuracy']):>6} "
              f"{f['recommended_step']:>8} {_f(s['test_nll']):>6} {_f(s['test_accuracy']):>6} "
              f"{o['step']:>11} {_f(o['test_nll']):>6} {_f(o['test_accuracy']):>6}  "
              f"{'yes' if f['target_vs_single'] else 'no':>11} {'yes' if f['target_vs_oracle'] else 'no':>14}")
    print("\nevery candidate: train-side numbers (what ckptsel saw) and the truth")
    print(f"{'run':<26} {'candidate':<48} {'train acc':>9} {'pre-mem':>8} {'proxy':>7} {'ok':>3} "
          f"{'test nll':>9} {'test acc':>9}")
    for f in figures:
        for r in f["candidates"]:
            mark = "*" if r["chosen"] else " "
            print(f"{f['run']:<26} {mark}{r['candidate']:<47} {_f(r['train_acc']):>9} {_f(r['premem_acc']):>8} "
                  f"{_f(r['proxy']):>7} {'yes' if r['eligible'] else 'no':>3} {_f(r['test_nll']):>9} "
                  f"{_f(r['test_accuracy']):>9}")
    explored = [f for f in figures if "pairs" in f]
    if explored:
        print("\n--explore: every ½/½ merge of adjacent checkpoints (truth) against the singles")
        for f in explored:
            s, o = f["single"], f["oracle_nll"]
            beats = [p for p in f["pairs"] if p["test_nll"] < s["test_nll"]
                     and p["test_accuracy"] >= s["test_accuracy"] - ACC_MARGIN]
            beats_oracle = [p for p in f["pairs"] if p["test_nll"] < o["test_nll"]
                            and p["test_accuracy"] >= o["test_accuracy"] - ACC_MARGIN]
            cells = " ".join(f"{p['steps'][0]}+{p['steps'][1]}:{p['test_nll']:.3f}/{p['test_accuracy']:.3f}"
                             for p in f["pairs"])
            print(f"{f['run']:<26} nll/acc {cells}")
            print(f"{'':<26} beat the recommended checkpoint: {len(beats)}; beat the lowest-NLL checkpoint: "
                  f"{len(beats_oracle)}")
    n = len(figures)
    if n:
        met = sum(f["target_vs_single"] for f in figures)
        met_oracle = sum(f["target_vs_oracle"] for f in figures)
        print(f"\ntarget met vs ckptsel's recommended checkpoint: {met}/{n} runs; "
              f"vs the oracle lowest-NLL checkpoint: {met_oracle}/{n}")
        merged_any = [f for f in figures if not f["chosen"].endswith("alone")]
        delta = {k: np.mean([f["merge"][k] - f["single"][k] for f in figures]) for k in ("test_nll", "test_accuracy")}
        print(f"a merge was chosen in {len(merged_any)}/{n} runs; mean Δ (merge − recommended) test NLL "
              f"{delta['test_nll']:+.4f}, test accuracy {delta['test_accuracy']:+.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lab_out", type=Path, help="A lab output folder.")
    parser.add_argument("--runs", nargs="*", help="Run names, or 'all' (default: the truly over-memorized runs).")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/merge_cache"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/merge_validation"), help="Where merges are written.")
    parser.add_argument("--max-examples", type=int, default=100)
    parser.add_argument("--examples-seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="Also write the figures as JSON here.")
    parser.add_argument("--stock-anchor", choices=["none", "first"], default="none",
                        help="Lab runs start from scratch, so they have no base: 'first' takes the run's first "
                             "checkpoint as model_stock's anchor (as --base-model would).")
    parser.add_argument("--lean-share", type=float, default=2 / 3,
                        help="The recommended checkpoint's share in the lean pair candidate (default ⅔).")
    parser.add_argument("--explore", action="store_true",
                        help="Also measure the truth of every adjacent ½/½ pair (what any pair merge could reach).")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    figures = []
    for run in lab_runs(args.lab_out, args.runs):
        start = time.perf_counter()
        out = args.work / run.name / "merged"
        anchor = min(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])) \
            if args.stock_anchor == "first" else None
        rec = recommend_run(run, args.cache_dir, out, args.max_examples, args.examples_seed, anchor, args.lean_share)
        truth = Truth(run)
        candidates = args.work / run.name / "candidates"
        if candidates.exists():
            import shutil

            shutil.rmtree(candidates)
        rows = candidate_truth(rec, truth, candidates)
        figures.append(run_figures(run, rec, rows, truth))
        if args.explore:
            figures[-1]["pairs"] = explore_pairs(run, truth, candidates)
        print(f"{run.name}: chose {rec.winner.label} ({rec.measured} new load(s)), "
              f"{time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
    print_report(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1, default=str))


if __name__ == "__main__":
    main()
