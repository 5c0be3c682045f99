"""A lost node at different moments: is ``ckptsel rank --json --ray`` still one JSON document with
the single-process ranking?

A Ray cluster of two nodes simulated on this machine with Ray's own ``ray.cluster_utils.Cluster``
(a head and one worker node, one CPU each), ``ckptsel rank RUN --json --ray ADDRESS --ray-cpus 1``
on a 9-checkpoint lab run, and the worker node removed ``t`` seconds into the run (as a preempted
machine), for ``--tries`` moments spread over the run. Printed per try: when the node went, the exit
code, whether stdout parses as exactly one JSON document, whether the ranking (everything but the
cache counts) equals a single-process run's, and how many of Ray's lines reached stderr.

    python benchmarks/ray_node_loss.py [--tries 10 --first 2 --last 20 --workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _argv(run: Path, cache: Path) -> list[str]:
    return ["rank", str(run), "--data", str(run / "train.jsonl"), "--recipe", str(run / "recipe.yaml"),
            "--max-examples", "6", "-k", "2", "--quiet", "--json", "--cache-dir", str(cache)]


def _ranking(stdout: str) -> dict:
    out = json.loads(stdout)  # raises on anything but exactly one JSON document
    out.pop("cache", None)
    return out


def _differences(a, b, where: str = "") -> list[str]:
    """Paths of the fields where two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [where or "."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tries", type=int, default=10)
    parser.add_argument("--first", type=float, default=2.0, help="seconds into the run of the earliest removal")
    parser.add_argument("--last", type=float, default=20.0, help="seconds into the run of the latest removal")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from ray.cluster_utils import Cluster

    from ckptsel.lab.quick import train_tiny_run

    work = args.workdir or Path(tempfile.mkdtemp(prefix="ckptsel-node-loss-"))
    run = work / "run"
    if not (run / "recipe.yaml").exists():
        train_tiny_run(run, families=("max",), n_train=24, epochs=80, n_checkpoints=9)
    shutil.rmtree(work / "single", ignore_errors=True)
    single = subprocess.run([sys.executable, "-m", "ckptsel", *_argv(run, work / "single")], capture_output=True,
                            text=True, check=True)
    reference = _ranking(single.stdout)
    print(f"run: {run} ({len(reference['checkpoints'])} checkpoints); single-process pick: "
          f"{reference['recommended']['path']}")
    print(f"{'removed at':>10}  {'exit':>4}  {'one JSON':>8}  {'same ranking':>12}  {'Ray lines on stderr':>19}  wall")
    clean = same = 0
    for n in range(args.tries):
        at = args.first + (args.last - args.first) * n / max(args.tries - 1, 1)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        worker = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        shutil.rmtree(work / f"cache-{n}", ignore_errors=True)  # a fresh store: everything is measured
        argv = [*_argv(run, work / f"cache-{n}"), "--ray", cluster.address, "--ray-cpus", "1"]
        start = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "ckptsel", *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        while proc.poll() is None and time.time() - start < at:
            time.sleep(0.05)
        removed = proc.poll() is None
        if removed:
            cluster.remove_node(worker)
        out, err = proc.communicate(timeout=600)
        wall = time.time() - start
        cluster.shutdown()
        (work / f"try-{n}.stdout").write_text(out)
        (work / f"try-{n}.stderr").write_text(err)
        try:
            ranking, parsed = _ranking(out), True
        except json.JSONDecodeError:
            ranking, parsed = None, False
        if parsed and ranking != reference:
            print(f"  differs from the single-process ranking in: {', '.join(_differences(ranking, reference))} "
                  f"(stdout in {work / f'try-{n}.stdout'})")
        clean += parsed
        same += ranking == reference
        ray_lines = sum("(raylet)" in line or "ray" in line.split(" ", 1)[0].lower() for line in err.splitlines())
        when = f"{at:.1f} s" if removed else "(ended)"
        print(f"{when:>10}  {proc.returncode:>4}  {'yes' if parsed else 'NO':>8}  "
              f"{'yes' if ranking == reference else 'NO':>12}  {ray_lines:>19}  {wall:.1f} s", flush=True)
    print(f"clean JSON {clean}/{args.tries}, identical rankings {same}/{args.tries}")


if __name__ == "__main__":
    main()
