"""Tiny model configurations: a dense Llama and an OLMoE mixture of experts.

Sized so that a run trains in a minute or two on one CPU core: the cost is the sequence
length (character-level tokens) times the width, so the models are narrow and shallow.
The MoE model routes every token to 2 of 4 experts in each of its layers, the smallest
setting in which routing pathways (Li, Fan, Zhou 2025) have room to differ between
examples. OLMoE is the family the pathway paper measured.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ModelKind = Literal["dense", "moe"]


class ModelSpec(BaseModel):
    """The architecture of a lab model (part of a grid recipe)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: ModelKind = "dense"
    hidden_size: int = Field(96, ge=8)
    num_layers: int = Field(3, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(256, ge=8, description="MLP width; per expert for the MoE model.")
    num_experts: int = Field(4, ge=2, description="MoE only.")
    experts_per_token: int = Field(2, ge=1, description="MoE only.")
    max_positions: int = Field(256, ge=16)


def build_config(spec: ModelSpec, tokenizer):
    """A transformers config for ``spec`` with the tokenizer's special-token ids."""
    from transformers import LlamaConfig, OlmoeConfig

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    if spec.kind == "dense":
        return LlamaConfig(**common)
    return OlmoeConfig(
        **common,
        num_experts=spec.num_experts,
        num_experts_per_tok=spec.experts_per_token,
        norm_topk_prob=True,
    )


def build_model(spec: ModelSpec, tokenizer, seed: int):
    """A freshly initialised causal LM for ``spec`` (seeded)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(build_config(spec, tokenizer))
