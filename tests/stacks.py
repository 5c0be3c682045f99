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
    python tests/stacks.py zero SRC OUT       DeepSpeed ZeRO-2 and ZeRO-3 on 2 gloo ranks:
        OUT/zero2/checkpoint-N/global_stepN/ + latest     engine.save_checkpoint, the Trainer's layout
        OUT/zero3/checkpoint-N/global_stepN/ + latest
        OUT/plain2/, OUT/plain3/                          the same weights (ZeRO's fp32 masters), safetensors
    python tests/stacks.py torchtune SRC OUT  torchtune's FullModelHFCheckpointer:
        OUT/tune/epoch_I/                                 its HF-format shards, index and copied configs

FSDP and ZeRO use world size 2, so shards of two ranks are on disk.
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


# --- DeepSpeed ZeRO --------------------------------------------------------------------------------


def _zero_worker(rank: int, src: str, out: str, port: int) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    import importlib

    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce on first use (a C++ toolchain, 90 s);
    # gloo does the same work without it. (deepspeed.comm.torch as an attribute is the torch package.)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    _init(rank, port)
    deepspeed.init_distributed(dist_backend="gloo")
    src, out = Path(src), Path(out)
    for stage in (2, 3):
        for step in _steps(src):
            name = f"checkpoint-{step}"
            model = AutoModelForCausalLM.from_pretrained(src / name, dtype=torch.float32)
            config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                      "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                      "steps_per_print": 10**9}
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
            loss = engine(**_batch(step + rank)).loss  # one real ZeRO training step
            engine.backward(loss)
            engine.step()
            folder = out / f"zero{stage}" / name
            engine.save_checkpoint(str(folder), tag=f"global_step{step}")
            # The reference: the trained weights (fp32 training: the module's are ZeRO's fp32 masters),
            # gathered from the ranks' partitions under ZeRO-3.
            params = dict(engine.module.named_parameters())
            with deepspeed.zero.GatheredParameters(list(params.values()), enabled=stage == 3):
                state = {k: v.detach().clone() for k, v in params.items()}
            if rank == 0:
                plain = AutoModelForCausalLM.from_pretrained(src / name, dtype=torch.float32)
                missing, unexpected = plain.load_state_dict(state, strict=False)
                assert not unexpected and not [k for k in missing if "rotary" not in k], (missing, unexpected)
                plain.save_pretrained(out / f"plain{stage}" / name)
                _copy(src / name, out / f"plain{stage}" / name, MODEL_FILES[2:] + ("trainer_state.json",))
                _copy(src / name, folder, MODEL_FILES + ("trainer_state.json",))  # the Trainer writes these
            dist.barrier()
    dist.destroy_process_group()


def build_zero(src: Path, out: Path, port: int) -> None:
    import torch.multiprocessing as mp

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    mp.spawn(_zero_worker, args=(str(src), str(out), port), nprocs=WORLD)
    for layout in ("zero2", "zero3", "plain2", "plain3"):
        _copy(src, out / layout, RUN_FILES)


# --- torchtune ------------------------------------------------------------------------------------------


def build_torchtune(src: Path, out: Path, port: int) -> None:
    """torchtune's FullModelHFCheckpointer: each checkpoint-N of SRC read into torchtune's format and saved back
    as epoch_I/ (I = 0, 1, ...) of one output dir, as a full fine-tune recipe does at the end of each epoch."""
    import torch

    try:
        from torchtune.training import FullModelHFCheckpointer
    except ImportError as exc:  # torchtune pins torchao versions that may not import with this torch
        print(f"torchtune does not import here: {exc}", file=sys.stderr)
        sys.exit(77)

    run = out / "tune"
    for epoch, step in enumerate(_steps(src)):
        checkpointer = FullModelHFCheckpointer(checkpoint_dir=str(src / f"checkpoint-{step}"),
                                               checkpoint_files=["model.safetensors"], model_type="LLAMA3",
                                               output_dir=str(run))
        state = checkpointer.load_checkpoint()
        assert all(isinstance(v, torch.Tensor) for v in state["model"].values())
        checkpointer.save_checkpoint(state, epoch=epoch)
        (run / f"epoch_{epoch}" / "trainer_state.json").unlink()  # copied from SRC; torchtune writes none
    _copy(src, run, RUN_FILES)


if __name__ == "__main__":
    what, src, out, port = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
    {"fsdp": build_fsdp, "zero": build_zero, "torchtune": build_torchtune}[what](src, out, port)
    print(json.dumps({"built": what, "out": str(out)}))
