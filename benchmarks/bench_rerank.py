"""Figure (d): the cost of re-ranking after one new checkpoint, as a fraction of a full run.

A run of C LoRA adapter checkpoints (as in ``bench_rank_lora.py``). ``ckptsel rank`` runs in
this process through click, three times per repeat: over the first C-1 checkpoints (the run
as it was; not timed), again after the C-th checkpoint appeared (the re-rank: C-1 checkpoints
come from the store, one is measured), and over all C into a fresh store (the full run).
The figure is re-rank time / full-run time; the target is at most 1.2/C.

    python benchmarks/bench_rerank.py --size qwen0.5b --max-examples 1
    python benchmarks/bench_rerank.py --size lab --max-examples 8 --repeats 3
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import bench_common as bench


def main() -> None:
    args = bench.lora_rank_parser(__doc__.splitlines()[0]).parse_args()
    bench.setup(args.threads)

    from click.testing import CliRunner

    from ckptsel.cli import main as cli

    source = bench.lora_run(args.size, args.checkpoints)
    steps = sorted((p for p in source.iterdir() if p.name.startswith("checkpoint-")), key=lambda p: int(p.name[11:]))
    steps = steps[: args.checkpoints]
    data = bench.DATA / "gsm8k" / "train.jsonl"

    def rank(run: Path, cache: Path) -> tuple[float, dict]:
        start = time.perf_counter()
        out = CliRunner().invoke(cli, [
            "rank", str(run), "--data", str(data), "--recipe", "gsm8k", "--max-examples", str(args.max_examples),
            "-k", str(args.k), "--max-new-tokens", str(args.max_new_tokens), "--device", "cpu",
            "--cache-dir", str(cache), "--json", "--quiet",
        ])
        seconds = time.perf_counter() - start
        if out.exit_code != 0:
            raise SystemExit(f"ckptsel rank failed ({out.exit_code}): {out.output[-2000:]}")
        return seconds, json.loads(out.stdout)["cache"]

    def link(checkpoint: Path, run: Path) -> None:  # hard links: a new "save" without copying weights
        shutil.copytree(checkpoint, run / checkpoint.name, copy_function=os.link)

    print(f"{bench.machine()}; {args.size}, {len(steps)} LoRA checkpoints, {args.max_examples} example(s), "
          f"k={args.k}, max_new_tokens {args.max_new_tokens}")
    times: dict[str, list[float]] = {"re-rank": [], "full": []}
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            run, full_run = tmp / "run", tmp / "full-run"
            run.mkdir()
            full_run.mkdir()
            for checkpoint in steps:
                link(checkpoint, full_run)
            for checkpoint in steps[:-1]:
                link(checkpoint, run)
            rank(run, tmp / "cache")  # the run before the new save
            link(steps[-1], run)
            order = ["re-rank", "full"] if r % 2 == 0 else ["full", "re-rank"]
            for name in order:
                seconds, cache = rank(run, tmp / "cache") if name == "re-rank" else rank(full_run, tmp / "full-cache")
                times[name].append(seconds)
                print(f"  {name:8} {seconds:7.1f} s   measured {cache['measured']}, from the store {cache['from_cache']}")
    fraction = bench.median(times["re-rank"]) / bench.median(times["full"])
    print(f"  re-rank {bench.fmt_times(times['re-rank'])}, full run {bench.fmt_times(times['full'])}")
    print(f"  re-rank / full run = {fraction:.3f} (target <= 1.2/C = {1.2 / len(steps):.3f}; 1/C = {1 / len(steps):.3f}); "
          f"load average {bench.load():.2f}")


if __name__ == "__main__":
    main()
