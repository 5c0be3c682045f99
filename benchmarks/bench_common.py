"""What the bench_*.py scripts share: model sizes, the GSM8K workload, side-by-side timing.

Two model sizes, random weights (speed needs no trained weights; lengths come from the
real data):

``lab``       the lab's model (``ckptsel.lab.models.ModelSpec()``: Llama, 3 layers, width 96)
              with the lab's character-level tokenizer: GSM8K in characters.
``qwen0.5b``  the Qwen2.5-0.5B architecture (24 layers, width 896, GQA 14/2 heads, tied
              151,936-token vocabulary, 494M parameters) with a 32k byte-level BPE trained
              here on the GSM8K and MATH training text (no tokenizer can be downloaded).
              Loaded from the model folder, as ckptsel's loader loads it, transformers
              builds it as a Qwen2 tokenizer: Qwen's pre-tokenisation, digits one by one.
              Ids past the BPE's own vocabulary are never produced but are paid for in
              every LM-head projection and softmax, as with the real vocabulary.
``qwen-tiny`` the same Qwen2 architecture at test size (2 layers, width 64, GQA 4/2 heads,
              tied 4,096-token vocabulary) with the lab's character tokenizer: every code path
              of the 0.5B model in seconds on a CPU (``gpu_check.py --cpu --quick``).

Weights are written as safetensors and loaded back with ``from_pretrained``, so the model
is the one the loader would hand out (and a folder the rank benchmarks can point at).

Timing: every side runs once per repeat, interleaved, the order alternating between
repeats (A B, B A, ...) so slow drift of a shared machine's load hits both sides alike;
figures are medians. The load average is printed with every result.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

# The datasets; ``CKPTSEL_BENCH_DATA`` points elsewhere (a copy carried to a machine without them).
DATA = Path(os.environ.get("CKPTSEL_BENCH_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
CACHE = Path(os.environ.get("CKPTSEL_BENCH_CACHE", "/tmp/ckptsel-bench"))
SIZES = ("lab", "qwen0.5b", "qwen-tiny")
QWEN_VOCAB = 151936
BPE_VOCAB = 32000


def setup(threads: int) -> None:
    """Offline, quiet, and the same torch thread count for every side of a comparison."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging
    import warnings

    import torch
    import transformers

    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("lm-eval").setLevel(logging.ERROR)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


def machine() -> str:
    import torch

    return (
        f"CPU x{os.cpu_count()}, torch {torch.__version__}, {torch.get_num_threads()} torch thread(s), "
        f"load average {load():.2f}"
    )


def load() -> float:
    return os.getloadavg()[0]


# --------------------------------------------------------------------------- data


def gsm8k_examples(n: int, offset: int = 0):
    """The first ``n`` GSM8K training examples (from ``offset``), rendered with the gsm8k recipe."""
    from ckptsel.data import load_examples
    from ckptsel.recipes import load_recipe

    examples = load_examples(DATA / "gsm8k" / "train.jsonl", load_recipe("gsm8k"))
    return examples[offset : offset + n]


def alternative_solutions(target: str) -> list[str]:
    """Two other valid-looking solutions: without calculator annotations, and as numbered steps."""
    plain = re.sub(r"<<[^>]*>>", "", target)
    lines = plain.strip().splitlines()
    steps = "\n".join(f"Step {i + 1}: {line}" for i, line in enumerate(lines[:-1])) + "\n" + lines[-1]
    return [plain, " " + steps]


# --------------------------------------------------------------------------- models


def tokenizer_for(size: str):
    if size in ("lab", "qwen-tiny"):
        from ckptsel.lab.tokenizer import build_tokenizer

        return build_tokenizer()
    return bpe_tokenizer()


def bpe_tokenizer(vocab_size: int = BPE_VOCAB):
    """Byte-level BPE (GPT-2 pre-tokenisation) trained on GSM8K + MATH training text; cached on disk."""
    from transformers import PreTrainedTokenizerFast

    folder = CACHE / f"bpe{vocab_size}"
    if not (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

        texts = []
        for name, fields in (("gsm8k", ("question", "answer")), ("math", ("problem", "solution"))):
            for line in (DATA / name / "train.jsonl").read_text().splitlines():
                row = json.loads(line)
                texts.extend(row[f] for f in fields)
        core = Tokenizer(models.BPE(unk_token=None))
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
        specials = ["<pad>", "<s>", "</s>"]
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        core.train_from_iterator(texts, trainer)
        core.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
        )
        tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
        folder.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(folder)
    return PreTrainedTokenizerFast.from_pretrained(folder)


def model_config(size: str, tokenizer):
    from transformers import Qwen2Config

    from ckptsel.lab.models import ModelSpec, build_config

    if size == "lab":
        return build_config(ModelSpec(max_positions=4096), tokenizer)
    if size == "qwen-tiny":
        return Qwen2Config(
            vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    return Qwen2Config(
        vocab_size=QWEN_VOCAB, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def model_dir(size: str, seed: int = 0) -> Path:
    """A folder with random weights (normal, std 0.02; norms 1) and the tokenizer, written once and reused."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    folder = CACHE / f"{size}-seed{seed}"
    if (folder / "model.safetensors").is_file():
        return folder
    tokenizer = tokenizer_for(size)
    config = model_config(size, tokenizer)
    with torch.device("meta"):
        shapes = AutoModelForCausalLM.from_config(config).state_dict()
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, meta in shapes.items():
        if size.startswith("qwen") and name == "lm_head.weight":
            continue  # tied to the embedding
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(meta.shape)
        elif name.endswith(".bias"):
            tensors[name] = torch.zeros(meta.shape)
        else:
            tensors[name] = torch.randn(meta.shape, generator=generator) * 0.02
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load_model(size: str, seed: int = 0):
    """(model, tokenizer) as ckptsel's loader gives them on CPU: float32, eval mode, no gradients."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_dir(size, seed)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(folder)


def lora_run(size: str, n: int, rank: int = 16) -> Path:
    """A run folder of ``n`` LoRA adapter checkpoints (``checkpoint-100``, ...) on ``model_dir(size)``.

    Random adapter weights (normal, std 0.02, every linear layer of every block), seeded per
    checkpoint; each adapter names the base folder by absolute path, as a Trainer run would.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = CACHE / f"{size}-lora{n}-r{rank}"
    steps = [100 * (i + 1) for i in range(n)]
    if all((folder / f"checkpoint-{s}" / "adapter_model.safetensors").is_file() for s in steps):
        return folder
    base = AutoModelForCausalLM.from_pretrained(model_dir(size), dtype=torch.float32)
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=modules))
    for i, step in enumerate(steps):
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        model.save_pretrained(folder / f"checkpoint-{step}")
    return folder


def lora_rank_parser(description: str):
    """The options of the LoRA-run ``ckptsel rank`` figures (c) and (d): run size, checkpoints, work per checkpoint."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--size", choices=SIZES, default="qwen0.5b")
    parser.add_argument("--checkpoints", type=int, default=8)
    parser.add_argument("--max-examples", type=int, default=1)
    parser.add_argument("-k", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    return parser


def describe(model, size: str) -> str:
    config = model.config
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return (
        f"{size}: {config.model_type}, {config.num_hidden_layers} layers, width {config.hidden_size}, "
        f"vocab {config.vocab_size}, {params:,.1f}M parameters, float32"
    )


# --------------------------------------------------------------------------- timing


def interleaved(sides: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Wall seconds of each side per repeat, run alternately (A B, B A, ...)."""
    names = list(sides)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            sides[name]()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def fmt_times(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in values) + "] s"
