"""benchmarks/gpu_check.py's CPU mode, so the script written for a GPU cannot rot between GPU runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"  # ../shared beside the repo, read by benchmarks/bench_common.py


@pytest.fixture(scope="module")
def quick_check(tmp_path_factory):
    """One ``gpu_check.py --cpu --quick --json`` run: (exit code, output, figures)."""
    tmp = tmp_path_factory.mktemp("gpu-check")
    out = tmp / "cpu.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CKPTSEL_BENCH_CACHE": str(tmp / "cache")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu", "--quick", "--json", str(out)],
        check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    figures = json.loads(out.read_text()) if out.is_file() else None
    return proc.returncode, proc.stdout + proc.stderr, figures


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_dir(), reason="shared GSM8K data not present")
def test_quick_cpu_check_runs_every_part_and_the_scorers_agree(quick_check):
    code, output, figures = quick_check
    assert code == 0, output[-3000:]
    assert figures is not None and figures["ok"] and figures["failures"] == {}
    assert figures["machine"]["device"] == "cpu" and figures["machine"]["torch"]

    for name in ("workload", "plain"):
        scoring = figures["scoring"][name]
        assert scoring["requests"] > 0 and scoring["target_tokens"] > scoring["requests"]
        # ckptsel's scorer and lm-eval's loglikelihood on identical requests: the same NLLs in float32.
        assert scoring["agree"] and scoring["max_per_token_diff"] < 1e-4
        for side in ("ckptsel", "lm-eval"):
            assert positive(scoring[side]["target_tok_s"]) and positive(scoring[side]["counted_flops"])
            assert scoring[side]["mfu"] is None  # no peak on a CPU
        assert positive(scoring["ratio"])
    assert figures["scoring"]["workload"]["requests"] == 6 * figures["scoring"]["plain"]["requests"]

    variants = figures["sampling"]["variants"]
    assert set(variants) == {"ckptsel", "generate", "generate_static", "generate_static_compile", "ckptsel_compile"}
    for name, v in variants.items():
        assert positive(v["tok_s"]) and positive(v["warmup_s"]), name
        assert all(n > 0 for n in v["tokens"]), name
    assert figures["sampling"]["winner"] in variants

    rank = figures["rank"]
    assert rank["checkpoints"] == 8 and rank["ranked"] == 8
    assert positive(rank["wall_s"])
    phases = rank["phases_s"]
    assert positive(phases["load"]) and positive(phases["score"]) and positive(phases["sample"])
    assert phases["rest"] >= 0  # the timed phases do not overlap: they fit inside the wall time


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_dir(), reason="shared GSM8K data not present")
def test_quick_cpu_check_prints_each_figure_with_its_units(quick_check):
    code, output, _ = quick_check
    assert code == 0, output[-3000:]
    for text in ("machine:", "software:", "torch", "target tok/s", "ratio", "generated tok/s", "winner:", "[rank]",
                 "wall", "load ", "sample "):
        assert text in output, text
