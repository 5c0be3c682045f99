"""Checkpoint folders written by real training stacks, for tests/test_layouts.py.

Run as a script in a child process (the distributed libraries set process-wide state: process
groups, environment variables), each builder takes the checkpoints of a plain Trainer run (the lab's
``tiny_run``), trains every one of them one more step with the stack on CPU, and saves the result
both the stack's own way and as a plain safetensors folder (the reference the tests compare with):

    python tests/stacks.py fsdp SRC OUT       FSDP2 (fully_shard) on 2 gloo ranks:
        OUT/sharded/checkpoint-N/pytorch_model_fsdp_0/    torch.distributed.checkpoint, {"model": ...},
                                                          no config.json (the run folder has it)
        OUT/full/checkpoint-N/pytorch_model_fsdp.bin      the full state dict, torch.save, no config at all
        OUT/plain/checkpoint-N/                           the same weights, save_pretrained (safetensors)

FSDP uses world size 2, so shards of two ranks are on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

RUN_FILES = ("train.jsonl", "recipe.yaml")
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
WORLD = 2


def _steps(src: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in src.glob("checkpoint-*"))


def _batch(step: int):
    import torch

    g = torch.Generator().manual_seed(step)
    ids = torch.randint(3, 20, (2, 12), generator=g)
    return {"input_ids": ids, "labels": ids}


def _copy(src: Path, dst: Path, names) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)


def _init(rank: int, port: int) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)


# --- FSDP ------------------------------------------------------------------------------------------


def _fsdp_worker(rank: int, src: str, out: str, port: int) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    _init(rank, port)
    src, out = Path(src), Path(out)
    for step in _steps(src):
        name = f"checkpoint-{step}"
        model = AutoModelForCausalLM.from_pretrained(src / name, dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model(**_batch(step + rank)).loss.backward()  # one real FSDP training step
        optimizer.step()
        dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=out / "sharded" / name / "pytorch_model_fsdp_0")
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            (out / "full" / name).mkdir(parents=True)
            torch.save(full, out / "full" / name / "pytorch_model_fsdp.bin")
            plain = AutoModelForCausalLM.from_pretrained(src / name, dtype=torch.float32)
            plain.load_state_dict(full)
            plain.save_pretrained(out / "plain" / name)
            _copy(src / name, out / "plain" / name, MODEL_FILES[2:] + ("trainer_state.json",))
            for layout in ("sharded", "full"):
                _copy(src / name, out / layout / name, ("trainer_state.json",))
        dist.barrier()
    dist.destroy_process_group()


def build_fsdp(src: Path, out: Path, port: int) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_fsdp_worker, args=(str(src), str(out), port), nprocs=WORLD)
    first = src / f"checkpoint-{_steps(src)[0]}"
    _copy(first, out / "sharded", MODEL_FILES)  # config and tokenizer only in the run folder
    for layout in ("sharded", "full", "plain"):
        _copy(src, out / layout, RUN_FILES)


if __name__ == "__main__":
    what, src, out, port = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
    {"fsdp": build_fsdp}[what](src, out, port)
    print(json.dumps({"built": what, "out": str(out)}))
