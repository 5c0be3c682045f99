"""Do the over-memorization proxies, the flag and the recommendation hold up on the lab?

For every run in a lab output folder (a run folder: ``checkpoint-N/``, ``train.jsonl``,
``recipe.yaml`` and ``ground_truth.json``, as ``ckptsel lab`` writes them), ckptsel ranks the
checkpoints from the training data alone (the library path of ``ckptsel rank``: target NLL,
k samples, perturbed-prompt NLL, alternative-solution NLL; no held-out file), and the
result is compared with the lab's ground truth (held-out accuracy ``test_accuracy``,
held-out reference NLL ``test_nll``, accuracy on perturbed held-out questions
``test_perturbed_accuracy``). Figures, as issue 5 asks:

1. Spearman correlation across a run's checkpoints between each proxy and ``test_nll``;
   the median over runs (target >= 0.8 for the better proxy); ``used``: the proxy ckptsel
   chose for that run (alternative-solution NLL when it had enough alternatives, else the
   perturbed-prompt NLL). Beside them, the lab's ideal alternative-solution NLL
   (``train_alt_nll``: another valid trace, never trained on), and for reference the plain
   training-target NLL and the negated entropy.
2. Flagged vs truly over-memorized checkpoints, pooled over runs. Truly over-memorized is the
   lab's own definition (:func:`ckptsel.lab.summary.overmemorized`, the [lab] issue's):
   ``test_nll`` >= 1.25 x its minimum so far while ``test_accuracy`` is within 0.05 of the
   run's best. Precision and recall (target >= 0.8).
3. The recommended checkpoint's true held-out accuracy against the run's best checkpoint
   (oracle), its last, and its lowest-train-loss checkpoint (the Trainer's logged loss;
   ckptsel's mean target NLL when none was logged): share of runs within 0.02 of the oracle
   (target >= 80%) and mean accuracy (target: above both baselines).
4. Robustness: accuracy lost on perturbed held-out questions (``test_accuracy -
   test_perturbed_accuracy``), flagged against unflagged non-underfit checkpoints (report).

Diagnostic: the share of harvested alternative solutions that are *valid* traces (every line
merges one adjacent pair of the line before; checked for the lab's ``sum`` and ``product``
questions). A sample graded correct by its final number can still have wrong steps; such a
text is no held-out-like reference, and its NLL rises as the model learns the steps.

    python benchmarks/overmem_validation.py LAB_OUT [--max-examples 100 --cache-dir DIR --json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

PROXIES = ("alt_nll", "perturb_nll", "perturb_gap", "neg_entropy", "target_nll", "lab_alt_nll", "used")
ORACLE_MARGIN = 0.02


def lab_runs(out: Path) -> list[Path]:
    """Run folders under ``out`` (or ``out`` itself) that have ground truth and training data."""
    candidates = [out, *sorted(p for p in out.rglob("*") if p.is_dir())]
    return [p for p in candidates if (p / "ground_truth.json").is_file() and (p / "train.jsonl").is_file()]


def rank_run(run: Path, cache_dir: Path, max_examples: int | None, examples_seed: int, alt_grader: str | None):
    """ckptsel's ranking of one run from its training data (the library path of ``ckptsel rank``)."""
    from ckptsel.collect import collect, select_examples
    from ckptsel.data import load_examples
    from ckptsel.discover import discover
    from ckptsel.measure.loading import load_tokenizer
    from ckptsel.recipes import load_recipe
    from ckptsel.select import rank
    from ckptsel.settings import ProxySettings, SelectionSettings
    from ckptsel.store import Store

    checkpoints = [c for c in discover([run]) if c.step is not None and c.path.name.startswith("checkpoint-")]
    recipe = load_recipe(str(run / "recipe.yaml"))
    tokenizer = load_tokenizer(checkpoints[0])
    examples = select_examples(load_examples(run / "train.jsonl", recipe, tokenizer=tokenizer),
                               SelectionSettings(max_examples=max_examples, examples_seed=examples_seed))
    proxies = ProxySettings(alt_grader=alt_grader)
    with Store.open(cache_dir) as store:
        collected = collect(checkpoints, examples, recipe, store, tokenizer=tokenizer, proxy_settings=proxies)
        ranking = rank(collected, store, recipe.memorization)
    return ranking, collected


def valid_trace(question: str, text: str) -> bool | None:
    """Is ``text`` a valid lab trace for a ``sum``/``product`` question? None for other questions.

    Stricter than the ``lab-steps`` grader (:mod:`ckptsel.graders.steps`), which sees only the
    completion and the reference: here the first line is checked against the question's terms.
    """
    import re

    expr = question.strip().removesuffix("=?")
    op = "+" if "+" in expr else "*" if "*" in expr else None
    if op is None or not re.fullmatch(rf"\d+(\{op}\d+)+", expr):
        return None
    merge = (lambda a, b: a + b) if op == "+" else (lambda a, b: a * b)
    terms = [int(t) for t in expr.split(op)]
    if not text.strip():
        return False
    *lines, last = [line.strip() for line in text.strip().splitlines()]
    for line in lines:
        if not re.fullmatch(rf"\d+(\{op}\d+)*", line):
            return False
        nxt = [int(t) for t in line.split(op)]
        merges = [terms[:k] + [merge(terms[k], terms[k + 1])] + terms[k + 2 :] for k in range(len(terms) - 1)]
        if nxt not in merges:
            return False
        terms = nxt
    total = terms[0]
    for t in terms[1:]:
        total = merge(total, t)
    return len(terms) <= 2 and last == f"#### {total}"  # the last merge is written as the answer


def alt_validity(collected) -> float:
    """Share of the harvested alternative solutions that are valid traces (NaN when none can be checked)."""
    if collected.harvest is None:
        return float("nan")
    questions = {ex.uid: ex.question for ex in collected.examples}
    checks = [valid_trace(questions[u], t) for u, t in collected.harvest.solutions(questions).items()]
    checks = [c for c in checks if c is not None]
    return sum(checks) / len(checks) if checks else float("nan")


def premem_rows(ranking, rows) -> np.ndarray:
    """Per-example pre-memorization accuracy, one row per checkpoint in ``rows`` (what the recommendation reads)."""
    row_of = {int(i): r for r, i in enumerate(ranking.per_example["measured_index"])}
    return np.asarray(ranking.per_example["premem"])[[row_of[c.index] for c in rows]]


def run_figures(run: Path, ranking, collected) -> dict:
    """Everything the summary needs about one run, as plain numbers per checkpoint."""
    from ckptsel.lab.summary import overmemorized
    from ckptsel.metrics import spearman

    truth = json.loads((run / "ground_truth.json").read_text())["checkpoints"]
    rows = [c for c in ranking.checkpoints if c.error is None and str(c.step) in truth]
    gt = [truth[str(c.step)] for c in rows]
    test_nll = np.array([g["test_nll"] for g in gt])
    test_acc = np.array([g["test_accuracy"] for g in gt])
    perturbed = np.array([g.get("test_perturbed_accuracy", np.nan) for g in gt])
    proxies = {
        "alt_nll": np.array([c.alt_nll for c in rows]),
        "perturb_nll": np.array([c.perturb_nll for c in rows]),
        "perturb_gap": np.array([c.perturb_gap for c in rows]),
        "neg_entropy": -np.array([c.entropy for c in rows]),
        "target_nll": np.array([c.target_nll for c in rows]),
        "lab_alt_nll": np.array([g.get("train_alt_nll", np.nan) for g in gt]),
    }
    used = {"alt_nll": "alt_nll", "perturb_nll": "perturb_nll"}.get(ranking.proxy)
    truly = overmemorized(test_acc, test_nll)
    flagged = np.array([c.flag is not None for c in rows])
    loss = np.array([c.train_loss if c.train_loss is not None else c.target_nll for c in rows])
    rec = next((r for r, c in enumerate(rows) if c.index == ranking.recommended), None)
    return {
        "run": run.name,
        "steps": [c.step for c in rows],
        "proxy_used": ranking.proxy,
        "alt_coverage": ranking.alt_coverage,
        "alt_valid": alt_validity(collected),
        "alt_sources": [ranking.checkpoints[i].step for i in ranking.alt_sources],
        "spearman": {
            **{name: spearman(values, test_nll) for name, values in proxies.items()},
            "used": spearman(proxies[used], test_nll) if used else float("nan"),
        },
        "proxies": {name: values.tolist() for name, values in proxies.items()},
        "memorized_frac": [c.memorized_frac for c in rows],
        "train_acc": [c.train_acc for c in rows],
        "premem_acc": [c.premem_acc for c in rows],
        "premem_lo": [c.premem_ci[0] for c in rows],
        "premem_per_example": premem_rows(ranking, rows).tolist(),
        "truly": truly.tolist(),
        "flagged": flagged.tolist(),
        "stages": [c.stage for c in rows],
        "test_acc": test_acc.tolist(),
        "test_nll": test_nll.tolist(),
        "perturb_drop": (test_acc - perturbed).tolist(),
        "acc": {
            "oracle": float(test_acc.max()),
            "recommended": float(test_acc[rec]) if rec is not None else float("nan"),
            "last": float(test_acc[-1]),
            "lowest_loss": float(test_acc[int(np.nanargmin(loss))]),
        },
        "recommended_step": rows[rec].step if rec is not None else None,
    }


def summarise(figures: list[dict]) -> dict:
    def median(name: str) -> float:
        values = [f["spearman"][name] for f in figures if not np.isnan(f["spearman"][name])]
        return statistics.median(values) if values else float("nan")

    truly = np.concatenate([f["truly"] for f in figures]).astype(bool)
    flagged = np.concatenate([f["flagged"] for f in figures]).astype(bool)
    hits = int((truly & flagged).sum())
    within = [f["acc"]["oracle"] - f["acc"]["recommended"] <= ORACLE_MARGIN for f in figures]
    drop = np.concatenate([f["perturb_drop"] for f in figures])
    stage = np.concatenate([f["stages"] for f in figures])
    return {
        "runs": len(figures),
        "median_spearman": {name: median(name) for name in PROXIES},
        "truly_overmemorized": int(truly.sum()),
        "flagged": int(flagged.sum()),
        "precision": hits / flagged.sum() if flagged.any() else float("nan"),
        "recall": hits / truly.sum() if truly.any() else float("nan"),
        "within_oracle_share": sum(within) / len(within),
        "mean_acc": {k: statistics.fmean(f["acc"][k] for f in figures) for k in ("oracle", "recommended", "last", "lowest_loss")},
        "perturb_drop": {
            "flagged": float(np.nanmean(drop[flagged])) if flagged.any() else float("nan"),
            "generalizing": float(np.nanmean(drop[stage == "generalizing"])) if (stage == "generalizing").any() else float("nan"),
        },
    }


def _f(value, spec=".3f") -> str:
    return "—" if value is None or (isinstance(value, float) and np.isnan(value)) else format(value, spec)


def print_report(figures: list[dict], summary: dict) -> None:
    print("\nPer run: Spearman(proxy, true held-out NLL) across checkpoints; recommended vs baselines (held-out acc)")
    head = f"{'run':<26}{'ckpts':>6}{'proxy':>12}{'alt cov':>8}{'valid':>6}" + "".join(f"{p:>12}" for p in PROXIES)
    print(head + f"{'flag/true':>10}{'rec step':>9}{'oracle':>8}{'rec':>7}{'last':>7}{'lowloss':>8}")
    for f in figures:
        flags = f"{sum(f['flagged'])}/{sum(f['truly'])}"
        print(f"{f['run'][:25]:<26}{len(f['steps']):>6}{str(f['proxy_used']):>12}{_f(f['alt_coverage'], '.2f'):>8}"
              f"{_f(f['alt_valid'], '.2f'):>6}"
              + "".join(f"{_f(f['spearman'][p], '+.2f'):>12}" for p in PROXIES)
              + f"{flags:>10}{str(f['recommended_step']):>9}{_f(f['acc']['oracle']):>8}{_f(f['acc']['recommended']):>7}"
              + f"{_f(f['acc']['last']):>7}{_f(f['acc']['lowest_loss']):>8}")
    s = summary
    print(f"\n{s['runs']} run(s)")
    print("median Spearman with true held-out NLL: "
          + ", ".join(f"{p} {_f(v, '+.2f')}" for p, v in s["median_spearman"].items()) + "   (target >= 0.8 for the better proxy)")
    print(f"over-memorized: {s['truly_overmemorized']} true, {s['flagged']} flagged; "
          f"precision {_f(s['precision'], '.2f')}, recall {_f(s['recall'], '.2f')}   (target >= 0.8 each)")
    m = s["mean_acc"]
    print(f"recommended within {ORACLE_MARGIN} of the oracle in {s['within_oracle_share']:.0%} of runs (target >= 80%); "
          f"mean held-out acc: oracle {m['oracle']:.3f}, recommended {m['recommended']:.3f}, last {m['last']:.3f}, "
          f"lowest train loss {m['lowest_loss']:.3f}")
    d = s["perturb_drop"]
    print(f"accuracy lost on perturbed held-out questions: flagged {_f(d['flagged'])}, "
          f"generalizing (unflagged, not underfit) {_f(d['generalizing'])}")


MARGINS = (0.05, 0.1, 0.15, 0.2)
STANDARD_ERRORS = (1.0, 1.96)


def margin_sweep(figures: list[dict], margins=MARGINS, standard_errors=STANDARD_ERRORS) -> list[dict]:
    """Flags and the recommendation for other ``acc_margin`` and ``recommend_se`` values, same measurements.

    ``acc_margin`` ("train accuracy near the run's best") decides whether a checkpoint whose
    train accuracy is still climbing by memorisation can be flagged. Flags feed the
    recommendation, so the sweep shows both sides of the trade; ``recommend_se`` decides how
    far below the best predicted accuracy the recommendation may go for a lower proxy.
    """
    from ckptsel import stages
    from ckptsel.settings import OvermemSettings

    rows = []
    for margin in margins:
        for se in standard_errors:
            settings = OvermemSettings(acc_margin=margin, recommend_se=se)
            truly = flagged = hits = within = 0
            chosen = []
            for f in figures:
                proxy = np.array(f["proxies"][f["proxy_used"]] if f["proxy_used"] in f["proxies"] else
                                 [np.nan] * len(f["steps"]), dtype=float)
                pm, test_acc = np.array(f["premem_acc"]), np.array(f["test_acc"])
                assessment = stages.assess(np.array(f["train_acc"]), pm, np.array(f["memorized_frac"]), proxy,
                                           f["proxy_used"] or "proxy", settings)
                flags = np.array([flag is not None for flag in assessment.flags])
                true = np.array(f["truly"], dtype=bool)
                truly, flagged, hits = truly + true.sum(), flagged + flags.sum(), hits + (true & flags).sum()
                tie_break = proxy if f["proxy_used"] else np.array(f["memorized_frac"])
                rec = stages.recommend(np.array(f["premem_per_example"], dtype=float), tie_break, flags,
                                       settings.proxy_tie, settings.recommend_se)
                if rec is not None:
                    within += test_acc.max() - test_acc[rec] <= ORACLE_MARGIN
                    chosen.append(test_acc[rec])
            rows.append({"acc_margin": margin, "recommend_se": se, "flagged": int(flagged),
                         "precision": hits / flagged if flagged else np.nan, "recall": hits / truly if truly else np.nan,
                         "within_oracle": within / len(figures),
                         "mean_recommended_acc": float(np.mean(chosen)) if chosen else np.nan})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lab_out", type=Path, help="A lab output folder (or one run folder).")
    parser.add_argument("--max-examples", type=int, default=100, help="Training examples measured per run.")
    parser.add_argument("--examples-seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/ckptsel-overmem-validation"))
    parser.add_argument("--json", type=Path, help="Also write the figures as JSON here.")
    parser.add_argument("--alt-grader", choices=["recipe", "lab-steps"], default="recipe",
                        help="Which samples count as alternative solutions: graded by the recipe's grader (final "
                        "answer), or the built-in lab-steps grader (ckptsel.graders.steps: every step checked).")
    args = parser.parse_args()

    runs = lab_runs(args.lab_out)
    if not runs:
        raise SystemExit(f"{args.lab_out}: no run folder with ground_truth.json and train.jsonl")
    figures = []
    for run in runs:
        started = time.time()
        alt_grader = "lab-steps" if args.alt_grader == "lab-steps" else None
        ranking, collected = rank_run(run, args.cache_dir, args.max_examples, args.examples_seed, alt_grader)
        figures.append(run_figures(run, ranking, collected))
        print(f"{run.name}: {len(figures[-1]['steps'])} checkpoints, {collected.loaded} loaded, "
              f"{time.time() - started:.0f} s", flush=True)
    summary = summarise(figures)
    print_report(figures, summary)
    sweep = margin_sweep(figures)
    summary["acc_margin_sweep"] = sweep
    print("\nacc_margin (train accuracy near the run's best) and recommend_se against flags and the recommendation,"
          " same measurements:")
    for row in sweep:
        print(f"  acc_margin {row['acc_margin']:<5g} recommend_se {row['recommend_se']:<5g} flagged {row['flagged']:>3}  precision {_f(row['precision'])}  "
              f"recall {_f(row['recall'])}  within 0.02 of oracle {row['within_oracle']:.0%}  "
              f"mean recommended acc {row['mean_recommended_acc']:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"runs": figures, "summary": summary}, indent=1, default=float))


if __name__ == "__main__":
    main()
