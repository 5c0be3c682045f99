"""Checkpoint loading: full folders, LoRA hot swap on one base, one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import save_tiny_llama
from ckptsel.discover import Checkpoint, discover
from ckptsel.errors import CheckpointError, CkptselError
from ckptsel.formats import BROKEN, PEFT_ADAPTER, PICKLE, SAFETENSORS
from ckptsel.measure.loading import CheckpointLoader, resolve_device, resolve_dtype
from ckptsel.measure.scoring import score_targets

PROMPTS = ["What is 2+3?\n", "Q: 17 sheep and 5 more?\n", "Compute 7*6.\n"]
TARGETS = ["2+3=5\n#### 5", "17+5=22\n#### 22", "#### 42"]


def save_adapter(path, base_dir, seed: int, rank: int = 4) -> None:
    """A LoRA (rank 4 by default) on q/v with random (non-zero) B, so every adapter changes the model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(path)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("lora-run")
    base_dir = save_tiny_llama(root / "base", tokenizer, seed=3)
    ckpts = []
    for step, seed in [(10, 1), (20, 2), (30, 5)]:
        save_adapter(root / f"checkpoint-{step}", base_dir, seed)
        ckpts.append(Checkpoint(path=root / f"checkpoint-{step}", format=PEFT_ADAPTER, step=step,
                                base_model=str(base_dir)))
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
        for ckpt in ckpts:
            loaded = loader.load(ckpt)
            # Same config each time: the weights are copied into the first adapter's modules.
            assert list(loaded.model.peft_config) == ["adapter0"] == [loaded.model.active_adapter]
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
        first = loader.load(Checkpoint(path=a, format=SAFETENSORS))
        assert not first.model.training and first.model.dtype == torch.float32
        assert first.model.device.type == "cpu"
        assert not any(p.requires_grad for p in first.model.parameters())
        nll_a = score_targets(first.model, first.tokenizer, PROMPTS, TARGETS).nll
        second = loader.load(Checkpoint(path=b, format=SAFETENSORS))
        nll_b = score_targets(second.model, second.tokenizer, PROMPTS, TARGETS).nll
        assert loader.full_loads == 2 and loader.base_loads == 0
    assert np.abs(nll_a - nll_b).max() > 1e-3


def test_bad_checkpoint_is_one_line_and_the_next_still_loads(tmp_path, tokenizer):
    good = save_tiny_llama(tmp_path / "good", tokenizer)
    broken = save_tiny_llama(tmp_path / "broken", tokenizer)
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    ckpts = [
        Checkpoint(path=tmp_path / "listed-bad", format=BROKEN, error="no config.json"),
        Checkpoint(path=broken, format=SAFETENSORS),
        Checkpoint(path=good, format=SAFETENSORS),
    ]
    with CheckpointLoader() as loader:
        results = [_load_or_error(loader, c) for c in ckpts]
    first, second, third = results
    assert isinstance(first, CheckpointError) and str(first) == f"{tmp_path / 'listed-bad'}: no config.json"
    assert isinstance(second, CheckpointError) and str(broken) in str(second) and "\n" not in str(second)
    assert not isinstance(third, CheckpointError)


def test_pickled_weights_need_the_flag(tmp_path, tokenizer):
    from safetensors.torch import load_file

    folder = save_tiny_llama(tmp_path / "pickled", tokenizer)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    (ckpt,) = discover(folder)
    assert ckpt.format is PICKLE
    with CheckpointLoader() as loader, pytest.raises(CheckpointError, match="--allow-pickle"):
        loader.load(ckpt)
    # Whatever a hand-made record says, a folder of .bin files is not read without the flag.
    with CheckpointLoader() as loader, pytest.raises(CheckpointError, match="only pickled .* --allow-pickle"):
        loader.load(Checkpoint(path=folder, format=SAFETENSORS))
    with CheckpointLoader(allow_pickle=True) as loader:
        assert loader.load(ckpt).model.config.num_hidden_layers == 2


def test_adapter_with_missing_base_reports_the_base(tmp_path, lora_run):
    _, ckpts = lora_run
    ckpt = Checkpoint(path=ckpts[0].path, format=PEFT_ADAPTER, base_model=str(tmp_path / "nowhere"))
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
    assert load_tokenizer(Checkpoint(path=own, format=PEFT_ADAPTER, base_model=str(base_dir))).model_max_length == 123
    bare = Checkpoint(path=ckpts[0].path, format=PEFT_ADAPTER, base_model=str(tmp_path / "missing"))
    with pytest.raises(CheckpointError, match="cannot load the tokenizer"):
        load_tokenizer(bare)


def test_garbage_is_collected_only_for_a_dropped_model_still_reachable(lora_run, tmp_path, tokenizer, monkeypatch):
    """A full gc pass costs a fraction of a second: it runs only while a dropped model is still alive."""
    from ckptsel.measure import loading

    calls = []
    monkeypatch.setattr(loading.gc, "collect", lambda: calls.append(1))
    _, ckpts = lora_run
    full = Checkpoint(path=save_tiny_llama(tmp_path / "full", tokenizer, seed=4), format=SAFETENSORS)
    with CheckpointLoader(device="cpu") as loader:
        held = loader.load(full)  # first load: nothing to drop
        loader.load(full)  # the previous model is still held here: collect
        assert calls == [1]
        del held
        loader.load(ckpts[0])  # the full model is dropped, and nothing refers to it: no collection
        loader.load(ckpts[1])  # adapter copied into the same modules: nothing dropped
        assert calls == [1]
    assert calls == [1]  # close never collects: what outlives it is held by the caller


def test_adapter_of_another_shape_is_loaded_afresh(lora_run, tmp_path, tokenizer):
    """A rank-8 adapter after rank-4 ones cannot be copied in place: PEFT loads it, and it scores as fresh."""
    base_dir, ckpts = lora_run
    wide = tmp_path / "checkpoint-40"
    save_adapter(wide, base_dir, seed=6, rank=8)
    with CheckpointLoader(device="cpu") as loader:
        loader.load(ckpts[0])
        loaded = loader.load(Checkpoint(path=wide, format=PEFT_ADAPTER, step=40, base_model=str(base_dir)))
        assert list(loaded.model.peft_config) == ["adapter1"] == [loaded.model.active_adapter]
        nll = score_targets(loaded.model, loaded.tokenizer, PROMPTS, TARGETS).nll
        back = loader.load(ckpts[0])  # and back to rank 4: afresh again, equal to its first load
        assert list(back.model.peft_config) == ["adapter2"]
        again = score_targets(back.model, back.tokenizer, PROMPTS, TARGETS).nll
        assert loader.base_loads == 1
    np.testing.assert_allclose(nll, fresh_adapter_nll(base_dir, wide, tokenizer), atol=1e-6, rtol=0)
    np.testing.assert_allclose(again, fresh_adapter_nll(base_dir, ckpts[0].path, tokenizer), atol=1e-6, rtol=0)


def test_tokenizer_is_built_once_per_distinct_tokenizer_files(tmp_path, tokenizer):
    import json
    import shutil

    a = save_tiny_llama(tmp_path / "a", tokenizer, seed=0)
    b = save_tiny_llama(tmp_path / "b", tokenizer, seed=1)
    c = tmp_path / "c"
    shutil.copytree(b, c)
    config = json.loads((c / "tokenizer_config.json").read_text())
    config["model_max_length"] = 77
    (c / "tokenizer_config.json").write_text(json.dumps(config))
    with CheckpointLoader(device="cpu") as loader:
        tok_a = loader.load(Checkpoint(path=a, format=SAFETENSORS)).tokenizer
        tok_b = loader.load(Checkpoint(path=b, format=SAFETENSORS)).tokenizer
        tok_c = loader.load(Checkpoint(path=c, format=SAFETENSORS)).tokenizer
    assert tok_a is tok_b  # same files in two folders: one tokenizer
    assert tok_c is not tok_b and tok_c.model_max_length == 77 != tok_b.model_max_length


def _load_or_error(loader, ckpt):
    """The loaded checkpoint, or the one-line error that stopped it loading."""
    try:
        return loader.load(ckpt)
    except CheckpointError as err:
        return err
