"""Do the pathway metrics track held-out accuracy through grokking? The lab's grokking runs.

Li, Fan & Zhou (2025, arXiv 2506.21551) report that, once training loss has converged, pathway
distance and pathway complexity keep changing with held-out accuracy (|Pearson r| 0.92-0.99):
routing goes from sample-specific to shared as the model groks. This script checks that claim on
``recipes/lab/grokking.yaml`` (modular addition, OLMoE 8 experts top-2, weight decay 1.0): runs that
grok (training loss flat for a long stretch, then held-out accuracy rising) and controls that do not.

Per run (a folder with ``checkpoint-N/``, ``train.jsonl``, ``recipe.yaml``, ``ground_truth.json``)
the metrics come from ``ckptsel rank RUN --json`` (the store, greedy decoding, ``--max-examples``
training examples), three times, the last two re-ranked from the store without loading a checkpoint:

* ``mem``: the recipe as trained (pathways over the memorised examples, target NLL < nu);
* ``all``: ``--threshold 1000``: every measured example counts as memorised (the memorised set is
  empty before the training loss falls);
* ``set``: pathways with each layer's experts as a set (``pathways: order: expert``), memorised examples;

and ``answer``: routing averaged over the answer positions only, not the whole target (the token
aggregation is a choice the paper leaves open; ckptsel has no setting for it, so this one is read with
ckptsel's router capture outside the store: :func:`answer_token_pathways`).

Against held-out accuracy (``ground_truth.json``: greedy answers on every held-out pair), beside
the baselines a user already has: the training loss the Trainer logged at the checkpoint (as
``ckptsel rank`` reports it), the weight norm (L2 over all parameters, read from the checkpoint)
and pre-memorization accuracy.

Statistics per run: Pearson r with held-out accuracy over all checkpoints and over the
*converged* stretch: the checkpoints from the first whose training loss has made 95% of its drop
from the first checkpoint to the run's minimum (``CONVERGED``; chosen from the training side only).
Lead/lag: within the converged stretch, the step at which each series first makes half its change
from the stretch's first checkpoint to its last three (the mean); ``lag`` = that step minus held-out
accuracy's (negative: the metric moves first). A series whose change is under ``FLAT`` of its range
over the run has no half-change step ("-"). A run "groks" when its held-out accuracy rises by at least
``GROKS`` within the converged stretch (a column); the median rows are over the seeds (``grok-*``) and
over the other runs, the controls.

    python benchmarks/grokking_pathways.py LAB_OUT --cache-dir DIR [--max-examples 100 --json out.json]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

CONVERGED = 0.95   # converged: the training loss has made this fraction of its drop
FLAT = 0.1         # a change below this fraction of the series' range over the run is no movement
GROKS = 0.1        # held-out accuracy rises at least this much within the converged stretch
VARIANTS = {"mem": ([], None), "all": (["--threshold", "1000"], None), "set": ([], "expert")}
SERIES = ("distance_mem", "complexity_mem", "distance_all", "complexity_all", "distance_set",
          "distance_answer", "complexity_answer", "train_loss", "weight_norm", "premem_acc")


def checkpoint_dirs(run: Path) -> list[tuple[int, Path]]:
    found = [(int(m[1]), p) for p in run.iterdir() if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name))]
    return sorted(found)


def weight_norm(checkpoint: Path) -> float:
    from safetensors.numpy import load_file

    total = 0.0
    for shard in sorted(checkpoint.glob("*.safetensors")):
        total += sum(float(np.sum(np.square(t, dtype=np.float64))) for t in load_file(shard).values())
    return total ** 0.5


def rank(run: Path, cache_dir: Path, max_examples: int, extra: list[str], order: str | None) -> dict[int, dict]:
    """``ckptsel rank RUN --json`` (greedy), as a user runs it; checkpoint step -> its row."""
    recipe = run / "recipe.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        if order is not None:  # the recipe's pathways section, changed: a re-rank from the store
            data = yaml.safe_load(recipe.read_text())
            data["pathways"]["order"] = order
            recipe = Path(tmp) / "recipe.yaml"
            recipe.write_text(yaml.safe_dump(data, sort_keys=False))
        command = [sys.executable, "-m", "ckptsel", "rank", str(run), "--data", str(run / "train.jsonl"),
                   "--recipe", str(recipe), "--max-examples", str(max_examples), "--temperature", "0",
                   "--cache-dir", str(cache_dir), "--json", "--quiet", *extra]
        done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode not in (0, 3):
        raise SystemExit(f"{' '.join(command)}\nexit {done.returncode}: {done.stderr.strip()}")
    return {c["step"]: c for c in json.loads(done.stdout)["checkpoints"]}


def answer_token_pathways(run: Path, n: int) -> dict[int, tuple[float, float]]:
    """Step -> (distance, complexity) with routing averaged over the *answer* positions only.

    ckptsel averages the router softmax over the positions whose input is a target token
    (ckptsel/DESIGN.md, *Pathways*): here "####", the space, the digits and EOS, four of them the
    same characters in every example. This check of that choice reads the positions that predict
    the answer (inputs: the space after "####" and each digit) with ckptsel's own router capture and
    pathway functions, on the first ``n`` training rows, all examples; outside the store, as
    ckptsel has no setting for it.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from ckptsel.lab.splits import read_jsonl
    from ckptsel.lab.tokenizer import build_tokenizer
    from ckptsel.lab.train import collate, encode
    from ckptsel.measure.routers import capture_routers
    from ckptsel.pathways import consistency_from_cosines, layer_cosines, pathway_distance, pathways

    tokenizer = build_tokenizer()
    rows = read_jsonl(run / "train.jsonl")[:n]
    features = encode(tokenizer, rows)
    batch = collate(features, tokenizer.pad_token_id)
    mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    for i, (f, row) in enumerate(zip(features, rows)):
        start = f["labels"].count(-100) + 4  # the prompt's length, then "####": the space
        mask[i, start : start + 1 + len(str(row.value))] = True
    out = {}
    for step, path in checkpoint_dirs(run):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.inference_mode(), capture_routers(model) as routers:
            outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            **routers.forward_kwargs)
            weights = routers.reduce(mask, outputs)
            gates = routers.gate_vectors()
        distance = pathway_distance(pathways(weights), routers.num_experts, routers.num_layers).mean
        out[step] = (distance, consistency_from_cosines(layer_cosines(weights, gates)).complexity)
    return out


def measure(run: Path, cache_dir: Path, max_examples: int) -> list[dict]:
    truth = json.loads((run / "ground_truth.json").read_text())["checkpoints"]
    ranked = {name: rank(run, cache_dir, max_examples, extra, order) for name, (extra, order) in VARIANTS.items()}
    answer = answer_token_pathways(run, max_examples)
    rows = []
    for step, path in checkpoint_dirs(run):
        mem, every, as_set = (ranked[v][step] for v in VARIANTS)
        rows.append({
            "step": step,
            "test_accuracy": truth[str(step)]["test_accuracy"],
            "train_accuracy": truth[str(step)]["train_accuracy"],
            "train_loss": mem["train_loss"],
            "weight_norm": weight_norm(path),
            "premem_acc": mem["premem_acc"],
            "memorized_frac": mem["memorized_frac"],
            "distance_mem": mem["pathways"]["distance"],
            "complexity_mem": mem["pathways"]["complexity"],
            "distance_all": every["pathways"]["distance"],
            "complexity_all": every["pathways"]["complexity"],
            "distance_set": as_set["pathways"]["distance"],
            "unique_all": every["pathways"]["n_unique"],
            "distance_answer": answer[step][0],
            "complexity_answer": answer[step][1],
        })
    return rows


def _column(rows: list[dict], key: str) -> np.ndarray:
    return np.array([np.nan if r[key] is None else r[key] for r in rows], dtype=float)


def converged_from(loss: np.ndarray) -> int:
    """Index of the first checkpoint whose training loss has made CONVERGED of its drop."""
    drop = loss[0] - np.nanmin(loss)
    return int(np.argmax(loss <= loss[0] - CONVERGED * drop))


def half_step(values: np.ndarray, steps: np.ndarray, span: np.ndarray) -> float:
    """First step within the stretch at which the series has made half its change; NaN if it barely moves."""
    x = values[span]
    if np.isnan(x).any() or len(x) < 4:
        return float("nan")
    change = x[-3:].mean() - x[0]
    scale = np.nanmax(values) - np.nanmin(values)
    if not scale > 0 or abs(change) < FLAT * scale:
        return float("nan")
    return float(steps[span][np.argmax((x - x[0]) / change >= 0.5)])


def analyse(rows: list[dict]) -> dict:
    from ckptsel.metrics import pearson

    steps = np.array([r["step"] for r in rows])
    acc = _column(rows, "test_accuracy")
    start = converged_from(_column(rows, "train_loss"))
    span = np.arange(start, len(rows))
    acc_half = half_step(acc, steps, span)
    out = {"converged_step": int(steps[start]), "n_converged": len(span),
           "acc_at_convergence": float(acc[start]), "acc_final": float(acc[-1]),
           "groks": bool(acc[span][-3:].mean() - acc[start] >= GROKS), "acc_half_step": acc_half}
    for key in SERIES:
        x = _column(rows, key)
        ok = ~np.isnan(x)
        post = span[ok[span]]
        out[key] = {
            "r": pearson(x[ok], acc[ok]) if ok.sum() >= 3 else float("nan"),
            "r_converged": pearson(x[post], acc[post]) if len(post) >= 3 else float("nan"),
            "lag": half_step(x, steps, span) - acc_half,
        }
    return out


def _cell(value: float, fmt: str) -> str:
    return "-" if value is None or np.isnan(value) else format(value, fmt)


def print_table(report: dict) -> None:
    print("\nPearson r with held-out accuracy: all checkpoints | converged stretch | lag of the half-change step "
          "(steps; negative: moves before accuracy)")
    print(f"{'run':16s}{'conv@':>6s}{'acc conv>end':>13s}{'acc½':>6s}{'groks':>6s}" + "".join(f"{k:>20s}" for k in SERIES))
    for name, run in report["runs"].items():
        a = run["analysis"]
        cells = [f"{_cell(a[k]['r'], '+.2f')} {_cell(a[k]['r_converged'], '+.2f')} {_cell(a[k]['lag'], '+.0f')}"
                 for k in SERIES]
        acc = f"{a['acc_at_convergence']:.2f}>{a['acc_final']:.2f}"
        print(f"{name:16s}{a['converged_step']:>6d}{acc:>13s}{_cell(a['acc_half_step'], '.0f'):>6s}"
              f"{'yes' if a['groks'] else 'no':>6s}" + "".join(f"{c:>20s}" for c in cells))
    for label, seeds in (("seeds (grok-*)", True), ("controls", False)):
        picked = [r["analysis"] for n, r in report["runs"].items() if n.startswith("grok") is seeds]
        if not picked:
            continue
        cells = []
        for k in SERIES:
            rs = [a[k]["r_converged"] for a in picked if not np.isnan(a[k]["r_converged"])]
            lags = [a[k]["lag"] for a in picked if not np.isnan(a[k]["lag"])]
            med = lambda v, f: format(statistics.median(v), f) if v else "-"  # noqa: E731
            cells.append(f"{med(rs, '+.2f')} |{med([abs(r) for r in rs], '.2f')}| {med(lags, '+.0f')}")
        print(f"{f'median, {len(picked)} {label}':47s}" + "".join(f"{c:>20s}" for c in cells))
    print("(median rows: signed r and |r| over the converged stretch, then the median lag)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lab_out", type=Path, help="the grokking grid's output folder, or one run folder")
    parser.add_argument("--cache-dir", type=Path, required=True, help="result store for ckptsel rank")
    parser.add_argument("--max-examples", type=int, default=100, help="training examples measured per checkpoint")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    if checkpoint_dirs(args.lab_out):
        runs = [args.lab_out]
    else:
        runs = sorted(p for p in args.lab_out.iterdir() if p.is_dir() and (p / "ground_truth.json").is_file())
    if not runs:
        raise SystemExit(f"{args.lab_out}: no run with ground_truth.json")
    report = {"settings": {k: str(v) for k, v in vars(args).items()}, "runs": {}}
    for run in runs:
        rows = measure(run, args.cache_dir, args.max_examples)
        report["runs"][run.name] = {"checkpoints": rows, "analysis": analyse(rows)}
        print(f"{run.name}:", flush=True)
        for r in rows:
            print(f"  step {r['step']:5d}  held-out {r['test_accuracy']:.3f}  train acc {r['train_accuracy']:.2f}  "
                  f"loss {r['train_loss']:.4f}  |w| {r['weight_norm']:6.1f}  PM {_cell(r['premem_acc'], '.3f')}  "
                  f"mem {r['memorized_frac']:.2f}  distance mem/all/set {_cell(r['distance_mem'], '6.2f')} "
                  f"{r['distance_all']:6.2f} {_cell(r['distance_set'], '6.2f')}  complexity mem/all "
                  f"{_cell(r['complexity_mem'], '.3f')} {r['complexity_all']:.3f}  distinct {r['unique_all']}  answer tokens: "
                  f"distance {r['distance_answer']:.2f} complexity {r['complexity_answer']:.3f}",
                  flush=True)
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=float))


if __name__ == "__main__":
    main()
