"""Time and peak memory of ``ckptsel merge`` against mergekit's own command line, same merge.

Builds three Llama checkpoints of a few tens of MB each (random weights, saved like any
Hugging Face model), then runs, alternating, ``ckptsel merge A B C -o X`` and
``mergekit-yaml merge.yml Y`` for the same linear merge, each as a fresh process. Peak memory is
the child's own maximum resident set size (``os.wait4``'s rusage, so the two never mix).
Prints the median wall time and peak RSS of each, their ratio (ckptsel / mergekit), and checks
that the two outputs are bit-identical.

    python benchmarks/merge_vs_mergekit.py                 # 3 x ~42 MB, 3 rounds
    python benchmarks/merge_vs_mergekit.py --hidden 768 --layers 8 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_models(root: Path, n: int, hidden: int, layers: int) -> list[Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ckptsel.lab.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 64), tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    paths = []
    for seed in range(n):
        torch.manual_seed(seed)
        path = root / f"ckpt-{seed}"
        LlamaForCausalLM(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths


def run(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode()}")
    proc.stderr.close()
    return seconds, usage.ru_maxrss / 1024  # Linux reports KiB


def max_abs_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    def tensors(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    x, y = tensors(a), tensors(b)
    if set(x) != set(y):
        return float("inf")
    return max((x[k].double() - y[k].double()).abs().max().item() for k in x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    ckptsel = [sys.executable, "-m", "ckptsel"]
    mergekit_yaml = shutil.which("mergekit-yaml") or sys.exit("mergekit-yaml is not on PATH")
    with tempfile.TemporaryDirectory(prefix="ckptsel-bench-") as tmp:
        root = Path(tmp)
        inputs = build_models(root, args.models, args.hidden, args.layers)
        size = sum(f.stat().st_size for f in inputs[0].glob("*.safetensors")) / 2**20
        config = root / "merge.yml"
        config.write_text("merge_method: linear\nmodels:\n" + "".join(
            f"  - model: {p}\n    parameters:\n      weight: 1.0\n" for p in inputs))
        ours_out, theirs_out = root / "ours", root / "theirs"
        times = {"ckptsel": [], "mergekit": []}
        peaks = {"ckptsel": [], "mergekit": []}
        for _ in range(args.rounds):
            for name, cmd, out in (
                ("ckptsel", [*ckptsel, "merge", *map(str, inputs), "-o", str(ours_out), "--force", "-q"], ours_out),
                ("mergekit", [mergekit_yaml, str(config), str(theirs_out), "--quiet"], theirs_out),
            ):
                if name == "mergekit":
                    shutil.rmtree(out, ignore_errors=True)
                seconds, peak = run(cmd, env)
                times[name].append(seconds)
                peaks[name].append(peak)
        diff = max_abs_diff(ours_out, theirs_out)

    t = {k: statistics.median(v) for k, v in times.items()}
    m = {k: max(v) for k, v in peaks.items()}
    print(f"linear merge of {args.models} x {size:.1f} MiB checkpoints (hidden {args.hidden}, {args.layers} layers), "
          f"{args.rounds} rounds, CPU")
    print(f"{'':10} {'median s':>9} {'peak RSS MiB':>13}")
    for name in ("ckptsel", "mergekit"):
        print(f"{name:10} {t[name]:9.2f} {m[name]:13.0f}")
    ratio_t, ratio_m = t["ckptsel"] / t["mergekit"], m["ckptsel"] / m["mergekit"]
    print(f"{'ratio':10} {ratio_t:9.2f} {ratio_m:13.2f}   (ckptsel / mergekit)")
    print(f"max |ckptsel - mergekit| over all tensors: {diff}")


if __name__ == "__main__":
    main()
