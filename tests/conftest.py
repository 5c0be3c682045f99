"""Shared fixtures: tiny models built from configs, offline, in a few hundred milliseconds."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models run faster on one thread than on two contended ones (10 ms vs 135 ms a forward).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tokenizer():
    from ckptsel.lab.tokenizer import build_tokenizer

    return build_tokenizer()


def save_tiny_llama(path, tokenizer, seed: int = 0, **overrides):
    """Write a 2-layer, 32-wide Llama with random weights (and the tokenizer) to ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **overrides,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    """The tiny Llama of ``tiny_llama_dir``, float32, in eval mode (one per test module)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A trained lab run (full weights, 3 checkpoints, train/test data, recipe), shared by the
    ranking and merge tests; tests copy from it and never write into it."""
    from ckptsel.lab.quick import train_tiny_run

    return train_tiny_run(tmp_path_factory.mktemp("lab") / "run", n_checkpoints=3)


@pytest.fixture(scope="session")
def learning_run(tmp_path_factory):
    """A tiny run that learns its training set (4 checkpoints, about 12 s): train accuracy 0 ->
    1 on ``max`` questions, memorising on the way, so pre-memorization accuracy, the memorised
    fraction and their history are all non-trivial. Tests copy from it and never write into it."""
    from ckptsel.lab.quick import train_tiny_run

    return train_tiny_run(tmp_path_factory.mktemp("learning") / "run", families=("max",), n_train=24, epochs=80,
                          n_checkpoints=4)


@pytest.fixture(scope="session")
def lab_lora_run(tmp_path_factory):
    """The same as a LoRA run on a base (3 adapter checkpoints)."""
    from ckptsel.lab.quick import train_tiny_run

    return train_tiny_run(tmp_path_factory.mktemp("lab-lora"), mode="lora", n_checkpoints=3)


@pytest.fixture(scope="session")
def sweep(learning_run, tmp_path_factory):
    """Three runs: the learning run ("full"), its first half ("early") and its second half
    ("late", as if it had started there), all trained on the same data. Tests copy from it and never write into it."""
    import shutil

    root = tmp_path_factory.mktemp("sweep") / "sweep"
    steps = sorted(int(p.name.split("-")[1]) for p in learning_run.glob("checkpoint-*"))
    for name, keep in (("full", steps), ("early", steps[:2]), ("late", steps[2:])):
        for step in keep:
            shutil.copytree(learning_run / f"checkpoint-{step}", root / name / f"checkpoint-{step}")
        for f in ("train.jsonl", "recipe.yaml"):
            shutil.copy(learning_run / f, root / name / f)
    return root


def _free_port() -> int:
    """A TCP port nobody listens on now, for a gloo process group's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build_stack(what: str, tiny_run, tmp_path_factory):
    """Run tests/stacks.py in a child process (distributed libraries set process-wide state)."""
    import subprocess
    import sys
    from pathlib import Path

    port = _free_port()

    out = tmp_path_factory.mktemp(f"stack-{what}") / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(Path(__file__).parent / "stacks.py"), what, str(tiny_run), str(out),
                           str(port)], capture_output=True, text=True, timeout=900, env=env, check=False)
    if done.returncode == 77:  # the library is installed but does not import with this torch
        pytest.skip(done.stderr.strip().splitlines()[-1])
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def fsdp_stack(tiny_run, tmp_path_factory):
    """tiny_run's checkpoints trained one more step with FSDP2 on 2 gloo ranks, saved as accelerate does
    (sharded/: pytorch_model_fsdp_0/ DCP folders; full/: pytorch_model_fsdp.bin) and as plain safetensors
    (plain/): tests/stacks.py. Tests copy from it and never write into it."""
    return _build_stack("fsdp", tiny_run, tmp_path_factory)


@pytest.fixture(scope="session")
def zero_stack(tiny_run, tmp_path_factory):
    """The same with DeepSpeed ZeRO-2 and ZeRO-3 on 2 gloo ranks (zero2/, zero3/: Trainer-style checkpoint-N/
    with global_stepN/ and latest; plain2/, plain3/: the same weights as safetensors). Skipped without DeepSpeed."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed (pip install 'ckptsel[deepspeed]')")
    return _build_stack("zero", tiny_run, tmp_path_factory)


@pytest.fixture(scope="session")
def torchtune_stack(tiny_run, tmp_path_factory):
    """tiny_run's checkpoints saved back by torchtune's FullModelHFCheckpointer as tune/epoch_0..2/ (its HF-format
    shards, index and copied configs). Skipped without torchtune, or where it does not import."""
    import importlib.util

    if importlib.util.find_spec("torchtune") is None:
        pytest.skip("torchtune is not installed")
    return _build_stack("torchtune", tiny_run, tmp_path_factory)
