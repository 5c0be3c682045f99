"""Conversion cost: time and peak memory of making a converted copy (ckptsel/formats/converted.py), against
the size of the consolidated fp32 weights (issue 23's target: peak RSS ≤ 1.5× those weights; a second
rank converts nothing).

    python convert_cost.py --hidden 768 --layers 12 --vocab 32000      # 110M parameters, 0.44 GB fp32
    python convert_cost.py --hidden 1024 --layers 24 --vocab 151936 --layouts dcp bin

For one random Llama of the given shape it writes each layout once under $CKPTSEL_BENCH_CACHE (default
/tmp/ckptsel-bench/convert): ``dcp`` (``{"model": state_dict}`` saved by ``torch.distributed.checkpoint``
from one process: the layout of an FSDP ``SHARDED_STATE_DICT`` save, one shard), ``bin`` (FSDP
``FULL_STATE_DICT``'s ``pytorch_model_fsdp.bin``), ``zero`` and ``zero3`` (DeepSpeed ZeRO-2 / ZeRO-3 saves
of one gloo rank, with their AdamW state). Then, in a fresh process per layout, it converts the checkpoint
the way a ranking command does (``format.model_folder``) and reports wall time, the process's RSS before the
conversion (its imports) and its peak during it (VmHWM, reset just before), and asks for the copy again (the
second rank).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

CHILD = r"""
import json, sys, time
from pathlib import Path
mode, folder, cache = sys.argv[1], Path(sys.argv[2]), sys.argv[3]


def status(key):  # bytes, from /proc/self/status (VmRSS: now, VmHWM: the peak since the last reset)
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(key + ":"))


import torch, transformers, safetensors.torch  # what the conversion imports
import torch.distributed.checkpoint
from ckptsel.discover import describe
from ckptsel.formats import LoadOptions
if mode.startswith("zero"):
    import deepspeed.utils.zero_to_fp32
ckpt = describe(folder)
assert ckpt.error is None, ckpt.error
options = LoadOptions(dtype=torch.float32, device=torch.device("cpu"), allow_pickle=True, cache_dir=cache)
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset VmHWM: the peak below is the conversion's
before = status("VmRSS")
t = time.perf_counter()
ckpt.format.model_folder(ckpt, options)
seconds = time.perf_counter() - t
peak = status("VmHWM")
t = time.perf_counter()
ckpt.format.model_folder(ckpt, options)  # the second rank: finds the copy
print(json.dumps({"seconds": seconds, "again": time.perf_counter() - t, "before": before, "peak": peak}))
"""


def build(layout: str, where: Path, hidden: int, layers: int, vocab: int) -> Path:
    """One checkpoint folder of ``layout`` for a random Llama of this shape (config.json beside it)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = where / layout / "checkpoint-1"
    if folder.is_dir():
        return folder
    tmp = where / f".{layout}.building"
    shutil.rmtree(tmp, ignore_errors=True)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 256), tie_word_embeddings=False)
    ckpt = tmp / "checkpoint-1"
    ckpt.mkdir(parents=True)
    if layout in ("zero", "zero3"):
        config.save_pretrained(ckpt)
        stage = "3" if layout == "zero3" else "2"
        subprocess.run([sys.executable, __file__, "--zero-child", str(ckpt), "--stage", stage], check=True)
    else:
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        config.save_pretrained(ckpt)
        if layout == "dcp":
            import torch.distributed.checkpoint as dcp

            dcp.save({"model": model.state_dict()}, checkpoint_id=ckpt / "pytorch_model_fsdp_0", no_dist=True)
        else:
            torch.save(model.state_dict(), ckpt / "pytorch_model_fsdp.bin")
        del model
    (where / layout).mkdir(parents=True, exist_ok=True)
    os.rename(ckpt, folder)
    shutil.rmtree(tmp, ignore_errors=True)
    return folder


def zero_child(ckpt: Path, stage: int) -> None:
    """A one-rank DeepSpeed ZeRO run (gloo, CPU): one AdamW step, saved the Trainer's way."""
    import importlib

    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29631", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                      DS_ACCELERATOR="cpu")
    import deepspeed

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = LlamaForCausalLM(AutoConfig.from_pretrained(ckpt))
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    engine.save_checkpoint(str(ckpt), tag="global_step1")


def child(layout: str, folder: Path, cache: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    done = subprocess.run([sys.executable, "-c", CHILD, layout, str(folder), str(cache)], capture_output=True,
                          text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--layouts", nargs="+", default=["dcp", "bin", "zero"])
    parser.add_argument("--zero-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.zero_child:
        zero_child(args.zero_child, args.stage)
        return
    where = Path(os.environ.get("CKPTSEL_BENCH_CACHE", "/tmp/ckptsel-bench")) / "convert" / \
        f"h{args.hidden}-l{args.layers}-v{args.vocab}"
    print(f"load average {os.getloadavg()[0]:.1f}")
    for layout in args.layouts:
        folder = build(layout, where, args.hidden, args.layers, args.vocab)
        cache = where / f"cache-{layout}"
        shutil.rmtree(cache, ignore_errors=True)
        run = child(layout, folder, cache)
        copy = next(p for p in (cache / "converted").iterdir() if p.is_dir())
        weights = sum(p.stat().st_size for p in copy.glob("*.safetensors"))
        source = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        extra = run["peak"] - run["before"]
        print(f"{layout:5s} checkpoint {source / 1e9:5.2f} GB, fp32 weights {weights / 1e9:5.2f} GB: converted in "
              f"{run['seconds']:5.1f} s; RSS {run['before'] / 1e9:4.2f} GB before, peak {run['peak'] / 1e9:4.2f} GB "
              f"(+{extra / 1e9:4.2f} GB = {extra / weights:4.2f}× the weights); second rank "
              f"{run['again'] * 1000:4.0f} ms", flush=True)


if __name__ == "__main__":
    main()
