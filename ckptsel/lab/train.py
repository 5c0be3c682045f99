"""Train one lab run through transformers' ``Trainer``, so the run is what users have.

A run folder holds ``checkpoint-N/`` folders (weights, config, tokenizer,
``trainer_state.json``), the data it was trained on (``train.jsonl``, ``test.jsonl``, GSM8K
layout) and ``recipe.yaml``, the ckptsel recipe that renders that data exactly as it was
trained: prompt ``"{question}\\n"`` (tokenised with BOS), target ``"{answer}"`` followed
by the EOS token, loss on target tokens only (prompt labels are -100).

Modes: full fine-tuning from random weights or from a pretrained base, and LoRA (peft) on
a pretrained base. A base is itself a lab run trained on a broad task mix; its final
model is saved as a plain model folder, and adapters name it by absolute path.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ckptsel.lab.models import ModelSpec
from ckptsel.lab.splits import Row, make_splits, write_jsonl
from ckptsel.lab.tasks import FAMILIES
from ckptsel.settings import DataSettings, ProxySettings, Recipe

log = logging.getLogger(__name__)

PROMPT_TEMPLATE = "{question}\n"
TARGET_TEMPLATE = "{answer}"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# on_step(done_steps, total_steps) -- how a caller draws progress.
StepCallback = Callable[[int, int], None]


class TrainSpec(BaseModel):
    """Everything that determines one run: data, model, optimisation, checkpoint schedule."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    families: list[str] = Field(["sum"], min_length=1, description="Task families of the training data (mixed).")
    n_train: int = Field(500, ge=1, description="Training examples (distinct questions, none a rewording of a test problem).")
    n_test: int = Field(100, ge=1, description="Held-out test examples (same for every run with this data seed).")
    data_seed: int = 0
    model: ModelSpec = ModelSpec()
    init: str = Field(
        "scratch",
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="'scratch' (random weights) or the name of one of the grid's pretrained bases.",
    )
    mode: Literal["full", "lora"] = "full"
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    lr: float = Field(1e-3, gt=0)
    epochs: float = Field(10.0, gt=0)
    batch_size: int = Field(32, ge=1)
    scheduler: Literal["constant_with_warmup", "cosine", "linear"] = "constant_with_warmup"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    decay_norms: bool = Field(
        False, description="Weight decay on the norm layers' gains too (the Trainer leaves them out). In pre-norm "
        "layers the weights before a norm are scale-invariant and free gains can undo the decay. At the grokking "
        "grid's settings held-out accuracy stayed <= 0.07 for 1,600 steps without it (recipes/lab/grokking.yaml).",
    )
    adam_beta2: float = Field(0.999, gt=0, lt=1)
    n_checkpoints: int = Field(10, ge=1, description="Checkpoints saved, evenly spaced in steps.")
    seed: int = 0

    @field_validator("families")
    @classmethod
    def _known_families(cls, families: list[str]) -> list[str]:
        unknown = [f for f in families if f not in FAMILIES]
        if unknown:
            raise ValueError(f"unknown {unknown}; known: {', '.join(FAMILIES)}")
        return families

    @model_validator(mode="after")
    def _lora_needs_base(self):
        if self.mode == "lora" and self.init == "scratch":
            raise ValueError("mode 'lora' needs a pretrained base as init (adapters on random weights learn little)")
        return self

    def steps(self) -> int:
        return max(1, math.ceil(math.ceil(self.n_train / self.batch_size) * self.epochs))


def ckptsel_recipe(name: str) -> Recipe:
    """The ckptsel recipe that renders the lab's data exactly as it was trained."""
    data = DataSettings(
        question_field="question",
        answer_field="answer",
        prompt_template=PROMPT_TEMPLATE,
        target_template=TARGET_TEMPLATE,
        append_eos=True,
        grader="gsm8k",
    )
    # Alternative solutions graded step by step: a tiny model's early right answers often come
    # through broken chains, and the alternative-solution NLL measured against those rises as
    # the model learns the steps (benchmarks/overmem_validation.py: Spearman with the true
    # held-out NLL 0.88 with lab-steps).
    proxies = ProxySettings(alt_grader="lab-steps")
    return Recipe(name=name, description="Lab run: character-level model, GSM8K layout.", data=data, proxies=proxies)


def render(row: Row) -> tuple[str, str]:
    """(prompt, target) text of a row, as trained."""
    return PROMPT_TEMPLATE.format(question=row.question), TARGET_TEMPLATE.format(answer=row.answer)


def encode(tokenizer, rows: list[Row]) -> list[dict]:
    """Input ids and labels: BOS + prompt (labels -100), then target + EOS (labels = ids)."""
    prompts, targets = zip(*(render(r) for r in rows)) if rows else ((), ())
    prompt_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    target_ids = tokenizer(list(targets), add_special_tokens=False)["input_ids"]
    out = []
    for p, t in zip(prompt_ids, target_ids):
        t = list(t) + [tokenizer.eos_token_id]
        out.append({"input_ids": list(p) + t, "labels": [-100] * len(p) + t})
    return out


def collate(features: list[dict], pad_id: int, router_loss: bool = False) -> dict:
    """Right-pad a batch; padding is masked out of attention and loss.

    ``router_loss`` asks an MoE model for its router logits, so the loss includes the
    load-balancing term as in real MoE fine-tuning (experts do not collapse onto one). It
    is a forward argument rather than a config flag: a config with
    ``output_router_logits: true`` would be saved into every checkpoint, and OLMoE then
    computes that loss during cached generation too, where it fails.
    """
    import torch

    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), width), -100, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for r, f in enumerate(features):
        n = len(f["input_ids"])
        ids[r, :n] = torch.tensor(f["input_ids"])
        labels[r, :n] = torch.tensor(f["labels"])
        mask[r, :n] = 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    return {**batch, "output_router_logits": True} if router_loss else batch


def write_data(spec: TrainSpec, run_dir: Path, name: str,
               rows: tuple[list[Row], list[Row]] | None = None) -> tuple[list[Row], list[Row]]:
    """Write train.jsonl, test.jsonl and recipe.yaml beside the run; return the rows. ``rows``: (train, test)
    given by the caller (a curated training set) instead of the spec's split."""
    train, test = rows if rows is not None else make_splits(spec.families, spec.n_train, spec.n_test, spec.data_seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(train, run_dir / "train.jsonl")
    write_jsonl(test, run_dir / "test.jsonl")
    recipe = ckptsel_recipe(name).model_dump(mode="json")
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return train, test


def _initial_model(spec: TrainSpec, tokenizer, base_dir: Path | None):
    from ckptsel.lab.models import build_model

    if spec.init == "scratch":
        return build_model(spec.model, tokenizer, spec.seed)
    if base_dir is None:
        raise ValueError(f"init {spec.init!r} needs the base model folder")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir.resolve())
    if spec.mode == "full":
        return model
    from peft import LoraConfig, get_peft_model

    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    lora = LoraConfig(
        r=spec.lora_rank,
        lora_alpha=spec.lora_alpha,
        target_modules=[t for t in LORA_TARGETS if t in present],
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def train_run(
    spec: TrainSpec,
    run_dir: Path,
    *,
    name: str = "lab",
    base_dir: Path | None = None,
    on_step: StepCallback | None = None,
    save_final_model: bool = False,
    callbacks: tuple = (),
    rows: tuple[list[Row], list[Row]] | None = None,
) -> Path:
    """Train ``spec`` into ``run_dir`` (checkpoint-N/ folders plus the data and recipe).

    ``base_dir`` is the pretrained base model folder when ``spec.init`` names a base. With ``save_final_model`` the
    final weights are also saved as a plain model folder, ``run_dir/final`` (how a base is
    made). ``callbacks``: more Trainer callbacks; one with an ``attach(trainer)`` method (a
    :class:`ckptsel.integrations.transformers.CkptselCallback`) attaches itself. ``rows``: (train, test)
    rows to train and evaluate on instead of the spec's split (``spec.n_train`` then sets only
    the step count: pass a spec whose ``n_train`` is ``len(train)``). Returns ``run_dir``.
    """
    import torch
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    from ckptsel.lab.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    train_rows, _ = write_data(spec, run_dir, name, rows)
    dataset = encode(tokenizer, train_rows)
    model = _initial_model(spec, tokenizer, base_dir)
    total = spec.steps()

    class _Progress(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if on_step is not None:
                on_step(state.global_step, state.max_steps)

    args = TrainingArguments(
        output_dir=str(run_dir),
        max_steps=total,
        per_device_train_batch_size=spec.batch_size,
        learning_rate=spec.lr,
        adam_beta2=spec.adam_beta2,
        lr_scheduler_type=spec.scheduler,
        warmup_steps=int(spec.warmup_ratio * total),
        weight_decay=spec.weight_decay,
        save_strategy="steps",
        save_steps=max(1, math.ceil(total / spec.n_checkpoints)),
        save_only_model=True,
        logging_steps=max(1, total // 50),
        report_to="none",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        dataloader_pin_memory=False,
        seed=spec.seed,
        data_seed=spec.seed,
    )
    router_loss = spec.model.kind == "moe"
    optimizer = None  # the Trainer's own: AdamW, weight decay on all but biases and norm gains
    if spec.decay_norms:
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=spec.lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, weight_decay=spec.weight_decay,
        )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=lambda feats: collate(feats, tokenizer.pad_token_id, router_loss),
        processing_class=tokenizer,
        callbacks=[_Progress()],
        optimizers=(optimizer, None),
    )
    trainer.remove_callback(PrinterCallback)  # the caller draws progress; no log dicts on stdout
    for callback in callbacks:
        if hasattr(callback, "attach"):  # logs through trainer.log, so it needs the trainer
            callback.attach(trainer)
        else:
            trainer.add_callback(callback)
    trainer.train()
    if save_final_model:
        final = model.merge_and_unload() if spec.mode == "lora" else model
        final.save_pretrained(run_dir / "final")
        tokenizer.save_pretrained(run_dir / "final")
    log.info("trained %s: %d steps into %s", name, total, run_dir)
    return run_dir
