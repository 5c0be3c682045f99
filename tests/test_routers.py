"""Router capture on tiny OLMoE, Qwen2-MoE, Qwen3-MoE and Mixtral models, saved and reloaded in both layouts."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptsel.errors import CkptselError
from ckptsel.measure.routers import capture_routers, find_routers, router_means, target_token_mask

FAMILIES = ("olmoe", "qwen2_moe", "qwen3_moe", "mixtral")
# (gate, up, down) names of one expert's projections on disk, and the MoE block's name.
EXPERT_NAMES = {
    "olmoe": ("gate_proj", "up_proj", "down_proj", "mlp"),
    "qwen2_moe": ("gate_proj", "up_proj", "down_proj", "mlp"),
    "qwen3_moe": ("gate_proj", "up_proj", "down_proj", "mlp"),
    "mixtral": ("w1", "w3", "w2", "block_sparse_moe"),
}


def tiny_moe_config(family: str, tokenizer, **overrides):
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

    common = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, num_experts_per_tok=2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    if family == "olmoe":
        return OlmoeConfig(**common, num_experts=4, **overrides)
    if family == "qwen2_moe":  # with its shared expert, which is not routed
        return Qwen2MoeConfig(
            **common, num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=16, **overrides
        )
    if family == "qwen3_moe":
        return Qwen3MoeConfig(
            **common, num_experts=4, moe_intermediate_size=16, head_dim=8, norm_topk_prob=True, **overrides
        )
    return MixtralConfig(**common, num_local_experts=4, **overrides)


def fuse_experts(src, dst, family: str) -> None:
    """Rewrite a per-expert checkpoint in the fused layout by hand (stack experts, cat gate|up)."""
    gate, up, down, block = EXPERT_NAMES[family]
    shutil.copytree(src, dst)
    tensors = load_file(src / "model.safetensors")
    out, experts = {}, {}
    for key, value in tensors.items():
        m = re.fullmatch(rf"(.*\.{block})\.experts\.(\d+)\.(\w+)\.weight", key)
        if m:
            experts.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = value
        else:
            out[key] = value
    for prefix, by_id in experts.items():
        ids = sorted(by_id)
        out[f"{prefix}.experts.gate_up_proj"] = torch.stack([torch.cat([by_id[e][gate], by_id[e][up]]) for e in ids])
        out[f"{prefix}.experts.down_proj"] = torch.stack([by_id[e][down] for e in ids])
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="session")
def moe_dirs(tmp_path_factory, tokenizer):
    """family -> (per-expert folder as transformers saves it, hand-fused folder)."""
    from transformers import AutoModelForCausalLM

    dirs = {}
    for i, family in enumerate(FAMILIES):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_config(tiny_moe_config(family, tokenizer))
        root = tmp_path_factory.mktemp(family)
        model.save_pretrained(root / "per-expert")
        tokenizer.save_pretrained(root / "per-expert")
        fuse_experts(root / "per-expert", root / "fused", family)
        dirs[family] = (root / "per-expert", root / "fused")
    return dirs


def load(path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def batch(rows: list[tuple[list[int], list[int]]]):
    """Right-padded ids, attention mask and target-token mask, as the scoring pass builds them."""
    width = max(len(p) + len(t) for p, t in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, (p, t) in enumerate(rows):
        ids[r, : len(p) + len(t)] = torch.tensor(p + t)
        mask[r, : len(p) + len(t)] = 1
    targets = target_token_mask([len(p) for p, _ in rows], [len(t) for _, t in rows], width)
    return ids, mask, targets


def routed(model, rows, source="auto"):
    ids, mask, targets = batch(rows)
    with torch.no_grad(), capture_routers(model, source) as routers:
        out = model(input_ids=ids, attention_mask=mask, **routers.forward_kwargs)
        return routers.reduce(targets, out), routers


ROWS = [([1, 40, 41, 42], [50, 51, 52, 2]), ([1, 60, 61], [70, 71, 72, 73, 74, 75, 2]), ([1, 45], [46, 2])]


# --- layouts ----------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_saves_per_expert_and_loads_fused_to_identical_weights(family, moe_dirs):
    per_expert, fused = moe_dirs[family]
    gate, _, _, block = EXPERT_NAMES[family]
    saved = load_file(per_expert / "model.safetensors")
    assert f"model.layers.0.{block}.experts.3.{gate}.weight" in saved
    assert not any("gate_up_proj" in k for k in saved)
    a, b = load(per_expert), load(fused)
    params_b = dict(b.named_parameters())
    assert all(torch.equal(p, params_b[name]) for name, p in a.named_parameters())
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    with torch.no_grad():  # equal to float32 rounding: the fused kernel may sum in another order
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=1e-6)
    # The hand-fused tensors are exactly what transformers writes when asked for its own layout.
    native = per_expert.parent / "native"
    a.save_pretrained(native, save_original_format=False)
    written = load_file(native / "model.safetensors")
    mine = load_file(fused / "model.safetensors")
    fused_keys = [k for k in written if k.endswith(("gate_up_proj", "experts.down_proj"))]
    assert len(fused_keys) == 4
    for key in fused_keys:
        assert torch.equal(written[key], mine[key.replace(".mlp.", f".{block}.")])


@pytest.mark.parametrize("family", FAMILIES)
def test_routing_weights_identical_from_both_layouts(family, moe_dirs):
    per_expert, fused = moe_dirs[family]
    w_a, _ = routed(load(per_expert), ROWS)
    w_b, _ = routed(load(fused), ROWS)
    assert w_a.shape == (3, 2, 4)
    np.testing.assert_allclose(w_a, w_b, rtol=0, atol=1e-6)


# --- capture ----------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_weights_are_distributions_and_match_a_manual_gate_computation(family, moe_dirs):
    model = load(moe_dirs[family][0])
    captured = {}
    norm = model.model.layers[1].post_attention_layernorm  # its output is layer 1's router input
    handle = norm.register_forward_hook(lambda m, a, out: captured.setdefault("x", out.detach()))
    try:
        weights, routers = routed(model, ROWS)
    finally:
        handle.remove()
    assert routers.source == "output" and routers.layer_names == ("model.layers.0.mlp.gate", "model.layers.1.mlp.gate")
    np.testing.assert_allclose(weights.sum(axis=-1), 1.0, atol=1e-6)
    gate = model.model.layers[1].mlp.gate.weight.detach()
    probs = torch.softmax(captured["x"] @ gate.T, dim=-1)  # (batch, seq, experts)
    _, _, targets = batch(ROWS)
    for r in range(len(ROWS)):
        manual = probs[r][targets[r]].mean(dim=0).numpy()
        np.testing.assert_allclose(weights[r, 1], manual, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(routers.gate_vectors()[1], gate.numpy())


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_does_not_change_an_examples_weights(family, moe_dirs):
    model = load(moe_dirs[family][0])
    alone, _ = routed(model, [ROWS[0]])
    padded, _ = routed(model, ROWS)  # row 0 is padded to the longest row's width
    np.testing.assert_allclose(padded[0], alone[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(padded[0], padded[2], atol=1e-3)  # examples do differ


def test_single_target_token_gives_that_tokens_distribution(moe_dirs):
    model = load(moe_dirs["olmoe"][0])
    ids, mask, _ = batch(ROWS[:1])
    one = torch.zeros_like(mask, dtype=torch.bool)
    one[0, 5] = True
    with torch.no_grad(), capture_routers(model, "hooks") as routers:
        model(input_ids=ids, attention_mask=mask)
        token = routers.reduce(one)
    with torch.no_grad(), capture_routers(model, "hooks") as routers:
        model(input_ids=ids, attention_mask=mask)
        mean = routers.reduce(batch(ROWS[:1])[2])
    np.testing.assert_allclose(token.sum(axis=-1), 1.0, atol=1e-6)
    assert not np.allclose(token, mean, atol=1e-4)


def test_output_and_hook_sources_agree_and_hooks_are_removed(moe_dirs):
    model = load(moe_dirs["olmoe"][0])
    from_output, routers = routed(model, ROWS, "output")
    hooks_before = [len(m._forward_hooks) for m in routers.layout.modules]  # transformers' own stay
    from_hooks, _ = routed(model, ROWS, "hooks")
    np.testing.assert_array_equal(from_output, from_hooks)
    assert [len(m._forward_hooks) for m in routers.layout.modules] == hooks_before


def test_each_forward_replaces_the_previous_capture(moe_dirs):
    model = load(moe_dirs["olmoe"][0])
    ids, mask, targets = batch(ROWS)
    with torch.no_grad(), capture_routers(model, "hooks") as routers:
        model(input_ids=ids[:1], attention_mask=mask[:1])  # e.g. a generation step, never reduced
        model(input_ids=ids, attention_mask=mask)
        weights = routers.reduce(targets)
        with pytest.raises(RuntimeError, match="captured 0 router outputs"):
            routers.reduce(targets)
    np.testing.assert_array_equal(weights, routed(model, ROWS)[0])


def test_empty_target_row_is_nan():
    logits = [torch.randn(2 * 3, 4)]
    mask = torch.tensor([[False, True, True], [False, False, False]])
    out = router_means(logits, mask)
    assert np.isfinite(out[0]).all() and np.isnan(out[1]).all()


def test_target_token_mask_marks_target_inputs_only():
    mask = target_token_mask([2, 1], [3, 1], width=5)
    assert mask.int().tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]


def test_qwen3_dense_layers_have_no_router(tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_moe_config("qwen3_moe", tokenizer, mlp_only_layers=[0]))
    layout = find_routers(model)
    assert layout.names == ("model.layers.1.mlp.gate",) and layout.num_experts == 4
    assert routed(model.eval(), ROWS)[0].shape == (3, 1, 4)


def test_peft_wrapped_model(moe_dirs):
    from peft import LoraConfig, get_peft_model

    model = load(moe_dirs["mixtral"][0])
    plain, _ = routed(model, ROWS)
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # random B: LoRA acts
    wrapped = get_peft_model(model, lora).eval()
    for source in ("output", "hooks"):
        weights, routers = routed(wrapped, ROWS, source)
        assert routers.layer_names == ("model.layers.0.mlp.gate", "model.layers.1.mlp.gate")
        assert weights.shape == plain.shape and not np.allclose(weights, plain, atol=1e-4)  # LoRA active
    np.testing.assert_allclose(routed(wrapped, ROWS, "output")[0], routed(wrapped, ROWS, "hooks")[0], atol=1e-7)


def test_dense_model_has_no_routers(tiny_llama_dir, moe_dirs):
    from ckptsel.measure.routers import declares_experts

    model = load(tiny_llama_dir)
    assert find_routers(model) is None and not declares_experts(model)
    assert all(declares_experts(load(moe_dirs[family][0])) for family in FAMILIES)
    with pytest.raises(CkptselError, match="not a mixture-of-experts model"):
        with capture_routers(model):
            pass


class _ToyMoE(torch.nn.Module):
    """An MoE without transformers' router declaration: plain ``nn.Linear`` gates, (B, S, E) logits."""

    def __init__(self, hidden=8, experts=3, layers=2):
        super().__init__()
        from transformers import PretrainedConfig

        self.config = PretrainedConfig(num_experts=experts)
        self.embed = torch.nn.Embedding(20, hidden)
        self.layers = torch.nn.ModuleList(
            torch.nn.ModuleDict({"gate": torch.nn.Linear(hidden, experts)}) for _ in range(layers)
        )

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = h + torch.softmax(layer["gate"](h), -1).sum(-1, keepdim=True)
        return h


def test_hook_fallback_on_linear_gates():
    torch.manual_seed(0)
    toy = _ToyMoE()
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 6, 7]])
    targets = torch.tensor([[False, True, True, False], [False, False, True, True]])
    with torch.no_grad(), capture_routers(toy) as routers:
        assert routers.source == "hooks" and routers.layer_names == ("layers.0.gate", "layers.1.gate")
        toy(ids)
        weights = routers.reduce(targets)
    h0 = toy.embed(ids).detach()
    manual = torch.softmax(toy.layers[0]["gate"](h0), -1).detach()
    np.testing.assert_allclose(weights[1, 0], manual[1, 2:].mean(0).numpy(), rtol=1e-6)
    with pytest.raises(CkptselError, match="use source='hooks'"):
        with capture_routers(toy, "output"):
            pass


def test_routing_weights_keeps_input_order_whatever_the_batching(moe_dirs):

    model = load(moe_dirs["qwen3_moe"][0])
    expected, _ = routed(model, ROWS)
    auto, gates = routing_weights(model, ROWS)
    one_by_one, _ = routing_weights(model, ROWS, batch_size=1, source="hooks")
    np.testing.assert_allclose(auto, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(one_by_one, expected, rtol=1e-5, atol=1e-6)
    assert gates.shape == (2, 4, 32)


def test_scoring_pass_captures_the_same_routing_weights_as_a_separate_pass(tokenizer, tmp_path):
    """Router capture inside score_token_pairs equals routing_weights() and leaves the NLL unchanged."""
    from ckptsel.measure.scoring import encode_pairs, score_token_pairs

    model = _tiny_olmoe_for_scoring(tokenizer)
    prompts = ["1+2=?\n", "12+7+3=?\n", "9*9=?\n"]
    targets = ["1+2=3\n#### 3", "12+7=19\n19+3=22\n#### 22", "#### 81"]
    pairs = encode_pairs(tokenizer, prompts, targets)
    plain = score_token_pairs(model, pairs, batch_size=2)
    routed = score_token_pairs(model, pairs, batch_size=2, routers=True)
    weights, gates = routing_weights(model, pairs, batch_size=1)
    np.testing.assert_allclose(routed.nll, plain.nll, atol=1e-6)
    assert plain.router_weights is None
    np.testing.assert_allclose(routed.router_weights, weights, atol=1e-6)
    np.testing.assert_allclose(routed.router_weights.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(routed.gate_vectors, gates)


def _tiny_olmoe_for_scoring(tokenizer):
    import torch
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(0)
    config = OlmoeConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
    )
    return OlmoeForCausalLM(config).eval()


@torch.inference_mode()
def routing_weights(
    model, pairs: list[tuple[list[int], list[int]]], *, batch_size: int | None = None, source: str = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """Routing weights of (prompt ids, target ids) pairs on their own, without scoring them: the
    oracle the scoring pass's capture is checked against.

    Returns ``(weights (N, L, E), gate_vectors (L, E, H))``. Batches are cut and padded as
    the scoring pass cuts and pads them; only the last position goes through the LM head.
    """
    from ckptsel.measure.scoring import CPU_TOKEN_BUDGET, GPU_TOKEN_BUDGET, plan_batches

    device = model.get_input_embeddings().weight.device
    lengths = [len(p) + len(t) for p, t in pairs]
    budget = GPU_TOKEN_BUDGET if device.type == "cuda" else CPU_TOKEN_BUDGET
    batches = plan_batches(lengths, [len(t) for _, t in pairs], batch_size=batch_size, token_budget=budget)
    was_training = model.training
    model.eval()  # Mixtral jitters its router logits in training mode
    try:
        with capture_routers(model, source) as routers:
            out = np.full((len(pairs), routers.num_layers, routers.num_experts), np.nan, dtype=np.float32)
            for rows in batches:
                width = max(lengths[i] for i in rows)
                ids = torch.zeros((len(rows), width), dtype=torch.long)
                mask = torch.zeros_like(ids)
                for r, i in enumerate(rows):
                    ids[r, : lengths[i]] = torch.tensor(pairs[i][0] + pairs[i][1])
                    mask[r, : lengths[i]] = 1
                result = model(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    logits_to_keep=1,
                    use_cache=False,
                    **routers.forward_kwargs,
                )
                targets = target_token_mask([len(pairs[i][0]) for i in rows], [len(pairs[i][1]) for i in rows], width)
                out[rows] = routers.reduce(targets, result)
            return out, routers.gate_vectors()
    finally:
        model.train(was_training)
