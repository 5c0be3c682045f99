"""Train the lab's main grid and check that the phenomena the tool relies on are really there.

Issue 3's checks, on the final checkpoints (or the run's curve where stated):

- held-out accuracy spans >= 0.4 from the worst run to the best;
- small-data / long-training runs memorise: train accuracy - held-out accuracy >= 0.2 and
  the samples copy the trained trace (copy rate > 0.5);
- at least two runs over-memorise: held-out reference NLL rises to >= 1.25x its running
  minimum while held-out accuracy stays within 0.05 of the run's best (and that best is
  at least 0.3: a run that never solves anything is memorising, not over-memorising).

Resumable: finished runs in --out are reused, so a second call only prints the table.
Wall time and CPU time are reported (the CPU time is what a shared machine cannot inflate).

Run:  python benchmarks/lab_grid.py --out runs/lab-main --jobs 2 [--grid main] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

from ckptsel.cli.lab import resolve_grid
from ckptsel.lab.ground_truth import read_ground_truth
from ckptsel.lab.grid import load_grid
from ckptsel.lab.runner import run_grid
from ckptsel.lab.summary import phenomena, summarize


def _cpu_seconds() -> float:
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", default="main", help="grid name (recipes/lab/NAME.yaml) or file")
    parser.add_argument("--out", type=Path, default=Path("runs/lab-main"))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print the summaries and checks as JSON")
    args = parser.parse_args()

    grid = load_grid(resolve_grid(args.grid))
    started, cpu0 = time.time(), _cpu_seconds()

    def progress(event) -> None:
        if event.phase in ("done", "failed", "skipped"):
            print(f"[{time.time() - started:6.0f} s] {event.phase:7s} {event.run} {event.message}", flush=True)

    results = run_grid(grid, args.out, jobs=args.jobs, on_event=progress)
    wall, cpu = time.time() - started, _cpu_seconds() - cpu0
    finished = {e.run for e in results if e.phase in ("done", "skipped")}
    names = [n for n in grid.expand() if n in finished]
    summaries = [summarize(n, read_ground_truth(args.out / n)) for n in names]
    checks = phenomena(summaries)
    if args.json:
        print(json.dumps({"wall_s": wall, "cpu_s": cpu, "runs": [s.as_dict() for s in summaries], "checks": checks}, indent=1))
        return
    header = f"{'run':34s} {'steps':>5s} {'test':>5s} {'best':>5s} {'train':>5s} {'gap':>6s} {'copy':>5s} {'pert':>5s} {'nll min':>7s} {'nll end':>7s} {'rise':>5s}  over-mem at"
    print(header)
    print("-" * len(header))
    for s in summaries:
        pert = "-" if s.final_perturbed_acc is None else f"{s.final_perturbed_acc:.2f}"
        print(
            f"{s.run:34s} {s.steps:5d} {s.final_test_acc:5.2f} {s.best_test_acc:5.2f} {s.final_train_acc:5.2f} "
            f"{s.gap:+6.2f} {s.final_copy_rate:5.2f} {pert:>5s} {s.min_test_nll:7.3f} {s.final_test_nll:7.3f} "
            f"{s.max_nll_rise:5.2f}  {','.join(map(str, s.overmemorized_steps)) or '-'}"
        )
    spread = checks["accuracy_spread"]
    print(f"\nheld-out accuracy spread: {spread['value']:.2f} (need >= 0.4) -> {'OK' if spread['ok'] else 'MISSING'}")
    mem = checks["memorising_runs"]
    print(f"memorising runs (gap >= 0.2 and copy > 0.5): {', '.join(mem['runs']) or 'none'} -> {'OK' if mem['ok'] else 'MISSING'}")
    over = checks["overmemorized_runs"]
    print(f"over-memorising runs (NLL >= 1.25x running min while acc within 0.05 of best, best >= 0.3; need >= 2): {', '.join(over['runs']) or 'none'} -> {'OK' if over['ok'] else 'MISSING'}")
    print(f"this call: {wall:.0f} s wall, {cpu:.0f} s CPU ({len([e for e in results if e.phase == 'done'])} runs trained)")


if __name__ == "__main__":
    main()
