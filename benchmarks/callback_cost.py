"""What the Trainer callback costs: its time as a fraction of training time, at lab size.

Trains one run of a lab grid (default: main.yaml's ``dense-lr0.001-n1500-e40``, 1,880 steps,
8 saves; the regime that over-memorizes) with :class:`ckptsel.integrations.transformers.CkptselCallback`
attached at its default budget (``max_examples=100``, the recipe's k=5 samples, all proxies),
one torch thread, into a fresh folder and an empty store. Printed: training time without the
callback's share, the callback's time per save and in all, and the fraction
callback / training, in wall seconds and in CPU seconds of this process (on a shared machine
CPU time is the steadier figure; the load average is printed beside it).

    python benchmarks/callback_cost.py [--grid main] [--run dense-lr0.001-n1500-e40] [--max-examples 100]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", default="main")
    parser.add_argument("--run", default="dense-lr0.001-n1500-e40")
    parser.add_argument("--max-examples", type=int, default=None, help="Default: the callback's default.")
    parser.add_argument("--out", type=Path, help="Folder to train into (default: a temporary one, removed after).")
    args = parser.parse_args()

    import torch
    import transformers

    from ckptsel.cli.lab import resolve_grid
    from ckptsel.integrations.transformers import DEFAULT_MAX_EXAMPLES, CkptselCallback
    from ckptsel.lab.grid import load_grid
    from ckptsel.lab.train import train_run

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    grid = load_grid(resolve_grid(args.grid))
    spec = grid.expand()[args.run]
    if spec.init != "scratch":
        raise SystemExit(f"{args.run}: needs a pretrained base; pick a run trained from scratch")
    budget = args.max_examples or DEFAULT_MAX_EXAMPLES
    work = args.out or Path(tempfile.mkdtemp(prefix="ckptsel-callback-cost-"))
    run = work / args.run
    costs: list[tuple[float, float]] = []  # (wall, cpu) per save

    class Timed(CkptselCallback):
        def measure_save(self, *a, **kw):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return super().measure_save(*a, **kw)
            finally:
                costs.append((time.perf_counter() - wall, time.process_time() - cpu))

    def show(report) -> None:
        print(f"  {report.line()}", flush=True)

    from ckptsel.lab.train import write_data

    write_data(spec, run, args.run)
    callback = Timed(data=run / "train.jsonl", recipe=run / "recipe.yaml", max_examples=budget,
                     cache_dir=work / "cache", on_measured=show)
    load0 = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    train_run(spec, run, name=args.run, callbacks=[callback])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    cb_wall, cb_cpu = sum(c[0] for c in costs), sum(c[1] for c in costs)
    train_wall, train_cpu = wall - cb_wall, cpu - cb_cpu
    print(f"\n{args.grid}/{args.run}: {spec.steps()} steps, {len(costs)} saves, callback budget {budget} examples "
          f"(k={callback.recipe.sampling.k}); load average {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"  training (without the callback):  {train_wall:7.1f} s wall  {train_cpu:7.1f} CPU-s")
    print(f"  callback, all saves:              {cb_wall:7.1f} s wall  {cb_cpu:7.1f} CPU-s "
          f"({cb_wall / len(costs):.1f} s a save)")
    print(f"  callback / training:              {cb_wall / train_wall:7.1%} wall  {cb_cpu / train_cpu:7.1%} CPU")
    if args.out is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
