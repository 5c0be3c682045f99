"""Ray's speed-up and start-up cost: a lab run's checkpoints, one task at a time against two in parallel.

The same ranking (``ckptsel rank RUN --ray``, the library call behind it) three ways, each on a fresh
store: in this process (no Ray); on a local Ray with 1 CPU (one task at a time); with 2 CPUs (two
tasks at once). Every task runs torch on one thread (``--ray-cpus 1``). Printed: Ray's start-up
(``ray.init`` plus one worker per CPU up with torch and transformers imported: Ray reuses them
for the measurement tasks), each wall time, the speed-up of 2 tasks
over 1, and a check that the three rankings are identical. Run it on an idle machine: the
load average is printed beside the figures. On a GPU machine pass ``--gpus`` to time one task per
GPU instead.

    python benchmarks/bench_ray.py RUN [--checkpoints 4 --max-examples 32 --repeats 1]

RUN is a lab run folder (``ckptsel lab run main --out DIR`` writes them; the first
``--checkpoints`` checkpoint-N folders are used).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def _rank(run_dir: Path, cache: Path, max_examples: int, ray: bool, cpus: int = 1):
    from ckptsel.pipeline import RankRequest, rank_runs
    from ckptsel.recipes import load_recipe
    from ckptsel.settings import EngineSettings

    engine = EngineSettings(ray="local" if ray else None, ray_cpus=cpus)
    request = RankRequest(paths=(run_dir,), recipe=load_recipe(run_dir / "recipe.yaml"), data=run_dir / "train.jsonl",
                          max_examples=max_examples, engine=engine, cache_dir=cache)
    start = time.perf_counter()
    result = rank_runs(request)
    return time.perf_counter() - start, result


def _start_ray(cpus: int, gpus: int | None) -> float:
    import ray

    start = time.perf_counter()
    ray.init(num_cpus=cpus, num_gpus=gpus, include_dashboard=False, log_to_driver=False, configure_logging=False)

    @ray.remote(num_cpus=1)
    def ready():
        import ckptsel.measure.loading  # noqa: F401  (torch and transformers: what every task imports first)

        time.sleep(0.5)  # held, so that each of the `cpus` calls gets its own worker
        return os.getpid()

    pids = ray.get([ready.remote() for _ in range(cpus)])
    assert len(set(pids)) == cpus, pids
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--checkpoints", type=int, default=4)
    ap.add_argument("--max-examples", type=int, default=32)
    ap.add_argument("--gpus", type=int, help="GPUs on this machine: time one task per GPU (default: CPU tasks).")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    run = work / "run"
    steps = sorted(p for p in args.run.glob("checkpoint-*") if p.is_dir())[: args.checkpoints]
    for p in steps:
        shutil.copytree(p, run / p.name)
    for name in ("train.jsonl", "recipe.yaml"):
        shutil.copy(args.run / name, run / name)

    import torch

    torch.set_num_threads(1)
    figures = {"checkpoints": len(steps), "max_examples": args.max_examples, "load_before": os.getloadavg()[0]}
    figures["no_ray_s"], base = _rank(run, work / "c0", args.max_examples, ray=False)
    reference = base.to_json()
    reference.pop("cache")
    lanes = [("gpu", args.gpus)] if args.gpus else [("1 task", 1), ("2 tasks", 2)]
    for name, n in lanes:
        figures[f"{name}: ray start-up s"] = _start_ray(cpus=n if not args.gpus else n, gpus=args.gpus)
        seconds, result = _rank(run, work / f"c-{n}", args.max_examples, ray=True)
        out = result.to_json()
        out.pop("cache")
        figures[f"{name}: wall s"] = seconds
        figures[f"{name}: identical"] = out == reference
        ray.shutdown()
    figures["load_after"] = os.getloadavg()[0]
    if not args.gpus:
        figures["speed-up (2 tasks over 1)"] = figures["1 task: wall s"] / figures["2 tasks: wall s"]
    shutil.rmtree(work, ignore_errors=True)
    for k, v in figures.items():
        print(f"{k:<32} {v:.2f}" if isinstance(v, float) else f"{k:<32} {v}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
