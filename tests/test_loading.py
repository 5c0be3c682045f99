"""Checkpoint loading: full folders, LoRA hot swap on one base, one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import save_tiny_llama
from ckptsel.discover import Checkpoint
from ckptsel.errors import CheckpointError, CkptselError
from ckptsel.measure.loading import CheckpointLoader, resolve_device, resolve_dtype
from ckptsel.measure.scoring import score_targets

PROMPTS = ["What is 2+3?\n", "Q: 17 sheep and 5 more?\n", "Compute 7*6.\n"]
TARGETS = ["2+3=5\n#### 5", "17+5=22\n#### 22", "#### 42"]


def save_adapter(path, base_dir, seed: int) -> None:
    """A rank-4 LoRA on q/v with random (non-zero) B, so every adapter changes the model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(path)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("lora-run")
    base_dir = save_tiny_llama(root / "base", tokenizer, seed=3)
    ckpts = []
    for step, seed in [(10, 1), (20, 2), (30, 5)]:
        save_adapter(root / f"checkpoint-{step}", base_dir, seed)
        ckpts.append(Checkpoint(path=root / f"checkpoint-{step}", kind="adapter", step=step, base_model=str(base_dir)))
    return base_dir, ckpts


def fresh_adapter_nll(base_dir, adapter_dir, tokenizer) -> np.ndarray:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter_dir)).eval()
    return score_targets(model, tokenizer, PROMPTS, TARGETS).nll


def test_lora_hot_swap_equals_fresh_load_with_one_base_load(lora_run, tokenizer):
    base_dir, ckpts = lora_run
    swapped = []
    with CheckpointLoader(device="cpu") as loader:
        for ckpt, loaded in loader.each(ckpts):
            assert not isinstance(loaded, CheckpointError), loaded
            assert list(loaded.model.peft_config) == [loaded.model.active_adapter]  # old adapters are deleted
            assert loaded.tokenizer.eos_token_id == tokenizer.eos_token_id  # from the base folder
            swapped.append(score_targets(loaded.model, loaded.tokenizer, PROMPTS, TARGETS).nll)
        assert loader.base_loads == 1 and loader.full_loads == 0
    for ckpt, nll in zip(ckpts, swapped):
        np.testing.assert_allclose(nll, fresh_adapter_nll(base_dir, ckpt.path, tokenizer), atol=1e-6, rtol=0)
    # The adapters really differ from each other, so the comparison above could fail.
    assert np.abs(swapped[0] - swapped[1]).max() > 1e-3 and np.abs(swapped[1] - swapped[2]).max() > 1e-3


def test_full_checkpoints_load_in_eval_mode_float32_on_cpu(tmp_path, tokenizer):
    a = save_tiny_llama(tmp_path / "a", tokenizer, seed=0)
    b = save_tiny_llama(tmp_path / "b", tokenizer, seed=1)
    with CheckpointLoader() as loader:
        first = loader.load(Checkpoint(path=a, kind="full"))
        assert not first.model.training and first.model.dtype == torch.float32
        assert first.model.device.type == "cpu"
        assert not any(p.requires_grad for p in first.model.parameters())
        nll_a = score_targets(first.model, first.tokenizer, PROMPTS, TARGETS).nll
        second = loader.load(Checkpoint(path=b, kind="full"))
        nll_b = score_targets(second.model, second.tokenizer, PROMPTS, TARGETS).nll
        assert loader.full_loads == 2 and loader.base_loads == 0
    assert np.abs(nll_a - nll_b).max() > 1e-3


def test_bad_checkpoint_is_one_line_and_the_next_still_loads(tmp_path, tokenizer):
    good = save_tiny_llama(tmp_path / "good", tokenizer)
    broken = save_tiny_llama(tmp_path / "broken", tokenizer)
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    ckpts = [
        Checkpoint(path=tmp_path / "listed-bad", kind="error", error="no config.json"),
        Checkpoint(path=broken, kind="full"),
        Checkpoint(path=good, kind="full"),
    ]
    with CheckpointLoader() as loader:
        results = list(loader.each(ckpts))
    assert [c.path for c, _ in results] == [c.path for c in ckpts]
    first, second, third = (r for _, r in results)
    assert isinstance(first, CheckpointError) and str(first) == f"{tmp_path / 'listed-bad'}: no config.json"
    assert isinstance(second, CheckpointError) and str(broken) in str(second) and "\n" not in str(second)
    assert not isinstance(third, CheckpointError)


def test_pickled_weights_need_the_flag(tmp_path, tokenizer):
    from safetensors.torch import load_file

    folder = save_tiny_llama(tmp_path / "pickled", tokenizer)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    ckpt = Checkpoint(path=folder, kind="full", weight_format="pickle")
    with CheckpointLoader() as loader, pytest.raises(CheckpointError, match="--allow-pickle"):
        loader.load(ckpt)
    with CheckpointLoader(allow_pickle=True) as loader:
        assert loader.load(ckpt).model.config.num_hidden_layers == 2


def test_adapter_with_missing_base_reports_the_base(tmp_path, lora_run):
    _, ckpts = lora_run
    ckpt = Checkpoint(path=ckpts[0].path, kind="adapter", base_model=str(tmp_path / "nowhere"))
    with CheckpointLoader() as loader, pytest.raises(CheckpointError, match="base model .*nowhere"):
        loader.load(ckpt)


def test_device_and_dtype_resolution():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    if not torch.cuda.is_available():
        assert resolve_device("auto") == cpu
        with pytest.raises(CkptselError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(CkptselError, match="--dtype 'float8'"):
        resolve_dtype("float8", cpu)
    with pytest.raises(CkptselError, match="--device 'gpu0'"):
        resolve_device("gpu0")


def test_tokenizer_from_the_checkpoint_else_the_base(tmp_path, lora_run, tokenizer):
    from ckptsel.measure.loading import load_tokenizer

    base_dir, ckpts = lora_run
    assert load_tokenizer(ckpts[0]).model_max_length == tokenizer.model_max_length  # adapter folder has none: base's
    own = tmp_path / "own"
    save_adapter(own, base_dir, seed=9)
    tokenizer.save_pretrained(own)
    (own / "tokenizer_config.json").write_text(
        (own / "tokenizer_config.json").read_text().replace('"model_max_length": 4096', '"model_max_length": 123')
    )
    assert load_tokenizer(Checkpoint(path=own, kind="adapter", base_model=str(base_dir))).model_max_length == 123
    bare = Checkpoint(path=ckpts[0].path, kind="adapter", base_model=str(tmp_path / "missing"))
    with pytest.raises(CheckpointError, match="cannot load the tokenizer"):
        load_tokenizer(bare)
