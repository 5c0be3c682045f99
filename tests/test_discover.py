"""Checkpoint discovery and ``ckptsel ls`` on real (tiny) Trainer, sharded, LoRA, pickle and MoE folders."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import save_tiny_llama

import ckptsel.formats.hashing as hashing
from ckptsel.cli import main
from ckptsel.discover import (
    discover,
    discover_runs,
    epoch_and_loss,
    fingerprint,
    moe_from_config,
    read_safetensors_header,
)
from ckptsel.errors import CheckpointError

STEPS_PER_EPOCH = 40
LOG_EVERY = 4


def loss_at(step: int) -> float:
    return round(2.0 - step / 100, 4)


def trainer_state(step: int) -> dict:
    """A trainer_state.json as the HF Trainer writes it at ``step``: losses every 4 steps,
    evals every 10 (whose eval_loss must not be read as the training loss), and the
    end-of-training ``train_loss`` summary."""
    history = []
    for s in range(1, step + 1):
        if s % LOG_EVERY == 0:
            history.append({"epoch": s / STEPS_PER_EPOCH, "grad_norm": 1.0, "learning_rate": 1e-4,
                            "loss": loss_at(s), "step": s})
        if s % 10 == 0:
            history.append({"epoch": s / STEPS_PER_EPOCH, "eval_loss": 5.0, "step": s})
    history.append({"epoch": step / STEPS_PER_EPOCH, "step": step, "train_loss": 9.9, "train_runtime": 1.0})
    return {"epoch": step / STEPS_PER_EPOCH, "global_step": step, "log_history": history,
            "logging_steps": LOG_EVERY, "max_steps": 120}


def write_state(folder, step: int) -> None:
    (folder / "trainer_state.json").write_text(json.dumps(trainer_state(step)))


def safetensors_param_count(path) -> int:
    """Independent of ckptsel: load the tensors and count elements."""
    from safetensors.numpy import load_file

    return sum(a.size for a in load_file(str(path)).values())


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory, tokenizer):
    """checkpoint-10/20/30/100 plus a final model at the root (step 120); checkpoint-30 is
    truncated and checkpoint-100 has no trainer_state.json of its own (the root's covers it)."""
    run = tmp_path_factory.mktemp("run")
    for step in (10, 20, 30, 100):
        save_tiny_llama(run / f"checkpoint-{step}", tokenizer, seed=step)
        if step != 100:
            write_state(run / f"checkpoint-{step}", step)
    weights = run / "checkpoint-30" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    save_tiny_llama(run, tokenizer, seed=120)
    write_state(run, 120)
    return run


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_llama_dir):
    """Two real PEFT LoRA checkpoints (r=4, alpha=8, q_proj/v_proj) on the tiny Llama."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    run = tmp_path_factory.mktemp("lora-run")
    model = get_peft_model(LlamaForCausalLM.from_pretrained(tiny_llama_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for step in (5, 15):
        torch.manual_seed(step)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_()
        model.save_pretrained(run / f"checkpoint-{step}")
    return run


# --- safetensors headers on hand-made bytes ------------------------------------------------------


def safetensors_bytes(entries: dict, data_len: int) -> bytes:
    header = json.dumps(entries).encode()
    return struct.pack("<Q", len(header)) + header + b"\0" * data_len


GOOD = {"__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]}}


def test_header_of_a_valid_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors_bytes(GOOD, 32))
    header = read_safetensors_header(path)
    assert header.num_parameters == 10
    assert header.tensors["b"].shape == (4,)
    assert header.data_start == 8 + len(json.dumps(GOOD))


@pytest.mark.parametrize("blob, reason", [
    (safetensors_bytes(GOOD, 20), "truncated (tensor data needs 32 bytes, file holds 20)"),
    (b"\x01\x02\x03", "truncated (3 bytes, no header)"),
    (struct.pack("<Q", 10**6) + b"{}", "corrupt or truncated header"),
    (struct.pack("<Q", 5) + b"nope!", "not JSON"),
    (safetensors_bytes({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}, 24), "does not fit"),
    (safetensors_bytes({"a": {"dtype": "F32", "shape": [2]}}, 8), "corrupt header entry for tensor 'a'"),
])
def test_broken_headers_name_file_and_reason(tmp_path, blob, reason):
    path = tmp_path / "model.safetensors"
    path.write_bytes(blob)
    with pytest.raises(CheckpointError, match="^model.safetensors: ") as info:
        read_safetensors_header(path)
    assert reason in str(info.value)


# --- pure helpers ------------------------------------------------------------------------------


def test_epoch_and_loss_pick_the_entry_at_or_before_the_step():
    history = [{"loss": 3.0, "epoch": 0.1, "step": 4}, {"eval_loss": 7.0, "epoch": 0.2, "step": 8},
               {"loss": 2.5, "epoch": 0.2, "step": 8}, {"loss": 2.0, "epoch": 0.3, "step": 12},
               {"train_loss": 9.0, "step": 12}]
    state = {"log_history": history, "global_step": 12, "epoch": 0.3}
    assert epoch_and_loss(state, 12) == (0.3, 2.0)          # state's own epoch at its global_step
    epoch, loss = epoch_and_loss(state, 10)                 # between logs: loss from step 8
    assert loss == 2.5
    assert epoch == pytest.approx(0.25)                     # scaled from the nearest log (0.2 at 8 or 0.3 at 12)
    assert epoch_and_loss(state, 3)[1] is None              # nothing logged yet
    assert epoch_and_loss({"log_history": []}, 5) == (None, None)


@pytest.mark.parametrize("config, expected", [
    ({"model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2}, (8, 2)),
    ({"model_type": "qwen3_moe", "num_experts": 128, "num_experts_per_tok": 8}, (128, 8)),
    ({"model_type": "olmoe", "num_experts": 64, "num_experts_per_tok": 8}, (64, 8)),
    ({"model_type": "deepseek_v3", "n_routed_experts": 256, "num_experts_per_tok": 8}, (256, 8)),
    ({"model_type": "llava", "text_config": {"num_local_experts": 4, "num_experts_per_tok": 1}}, (4, 1)),
    ({"model_type": "llama", "num_experts": None}, (None, None)),
    ({"model_type": "x", "num_experts": 1}, (None, None)),
])
def test_moe_from_config(config, expected):
    assert moe_from_config(config) == expected


# --- Trainer runs ------------------------------------------------------------------------------


def test_trainer_run_in_step_order_with_final_model_last(trainer_run):
    found = discover(trainer_run)
    assert [c.step for c in found] == [10, 20, 30, 100, 120]
    assert [c.kind for c in found] == ["full", "full", "error", "full", "full"]
    assert found[3].path == trainer_run / "checkpoint-100"
    assert found[4].path == trainer_run
    assert "final model at the run root" in found[4].notes


def test_corrupt_checkpoint_is_a_row_with_a_reason(trainer_run):
    broken = discover(trainer_run)[2]
    assert broken.error.startswith("model.safetensors: truncated (tensor data needs ")
    assert broken.architecture is None and broken.num_parameters is None


def test_epoch_and_loss_come_from_the_log_history(trainer_run):
    by_step = {c.step: c for c in discover(trainer_run)}
    assert by_step[10].train_loss == pytest.approx(loss_at(8))     # logged every 4 steps: nearest before 10
    assert by_step[10].epoch == pytest.approx(0.25)
    assert by_step[20].train_loss == pytest.approx(loss_at(20))
    assert by_step[100].train_loss == pytest.approx(loss_at(100))  # from the run root's trainer_state.json
    assert by_step[100].epoch == pytest.approx(2.5)
    assert by_step[120].train_loss == pytest.approx(loss_at(120))
    assert by_step[120].epoch == pytest.approx(3.0)


def test_model_facts_read_from_config_and_headers(trainer_run):
    ckpt = discover(trainer_run)[0]
    assert ckpt.architecture == "LlamaForCausalLM"
    assert ckpt.dtype == "float32"
    assert ckpt.num_parameters == safetensors_param_count(ckpt.path / "model.safetensors")
    assert ckpt.num_experts is None and ckpt.weight_format == "safetensors"


def test_explicit_checkpoints_are_sorted_by_step_when_all_steps_are_known(trainer_run, tiny_llama_dir):
    steps = [c.step for c in discover([trainer_run / "checkpoint-100", trainer_run / "checkpoint-10"])]
    assert steps == [10, 100]
    # Checkpoints of another folder are another run; each run keeps its own order.
    runs = discover_runs([trainer_run / "checkpoint-100", tiny_llama_dir, trainer_run / "checkpoint-10"])
    assert [[c.step for c in r.checkpoints] for r in runs] == [[10, 100], [None]]
    assert [r.name for r in runs] == [trainer_run.name, tiny_llama_dir.name]


def test_a_sweep_folder_is_several_runs_named_by_their_subfolders(trainer_run, tmp_path):
    sweep = tmp_path / "sweep"
    for name in ("lr2e-5", "lr1e-5", "seeds/s0"):
        shutil.copytree(trainer_run, sweep / name)
    (sweep / "notes").mkdir()  # neither a run nor holding one: ignored
    runs = discover_runs(sweep)
    assert [r.name for r in runs] == ["lr1e-5", "lr2e-5", "seeds/s0"]
    steps = [c.step for c in discover_runs(trainer_run)[0].checkpoints]
    for run in runs:
        assert [c.step for c in run.checkpoints] == steps and {c.run for c in run.checkpoints} == {run.name}
        assert run.path == sweep / run.name
    # Run folders given as arguments are runs each, named by their folders, lengthened where they clash.
    runs = discover_runs([sweep / "lr1e-5", sweep / "seeds" / "s0", sweep / "lr2e-5"])
    assert [r.name for r in runs] == ["lr1e-5", "s0", "lr2e-5"]
    shutil.copytree(trainer_run, tmp_path / "other" / "s0")
    runs = discover_runs([sweep / "seeds" / "s0", tmp_path / "other" / "s0"])
    assert [r.name for r in runs] == ["seeds/s0", "other/s0"]
    flat = discover([sweep / "lr1e-5", sweep / "lr2e-5"])
    assert [c.run for c in flat] == ["lr1e-5"] * len(steps) + ["lr2e-5"] * len(steps)


def test_an_empty_folder_is_still_one_clear_error(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (ckpt,) = discover(tmp_path / "empty")
    assert ckpt.kind == "error" and "no checkpoint-N/ folders" in ckpt.error


def test_step_from_folder_names_orders_a_shell_glob(tmp_path, tiny_llama_dir):
    folders = [shutil.copytree(tiny_llama_dir, tmp_path / name) for name in ("step_100", "step_20", "global_step5")]
    assert [c.step for c in discover(folders)] == [5, 20, 100]


@pytest.mark.parametrize("names, steps, tokens", [
    (["step312-tokens1248M", "step1000-tokens4B", "step156", "step2000-tokens8T"], [156, 312, 1000, 2000],
     [None, "1248M", "4B", "8T"]),
    (["global_step20", "global_step100", "global_step3"], [3, 20, 100], [None] * 3),
    (["iter_0000200", "iter_0001000", "iter_0000050"], [50, 200, 1000], [None] * 3),
    (["step_20", "step_100", "step_3"], [3, 20, 100], [None] * 3),
])
def test_pretraining_step_folders_are_one_run_in_step_order(tmp_path, tiny_llama_dir, names, steps, tokens):
    run = tmp_path / "pretrain"
    for name in names:
        shutil.copytree(tiny_llama_dir, run / name)
    (run / "notes").mkdir()  # not step-named: not a checkpoint
    (runs,) = [discover_runs(run)]
    assert len(runs) == 1 and runs[0].path == run
    found = runs[0].checkpoints
    assert [c.step for c in found] == steps and [c.tokens for c in found] == tokens
    assert {c.kind for c in found} == {"full"} and {c.run for c in found} == {"pretrain"}
    # A shell glob of the same folders: one run (the folder holding them), in step order.
    globbed = discover_runs(sorted(run.glob("[!n]*")))
    assert [r.path for r in globbed] == [run] and [c.step for c in globbed[0].checkpoints] == steps


def test_epoch_folders_order_by_epoch(tmp_path, tiny_llama_dir):
    run = tmp_path / "tune"
    for name in ("epoch_10", "epoch_2", "epoch_0"):
        shutil.copytree(tiny_llama_dir, run / name)
    found = discover(run)
    assert [c.path.name for c in found] == ["epoch_0", "epoch_2", "epoch_10"]
    assert [(c.step, c.epoch) for c in found] == [(None, 1.0), (None, 3.0), (None, 11.0)]  # epoch_0: 1 epoch done
    assert [c.path.name for c in discover(sorted(run.glob("epoch_*")))] == ["epoch_0", "epoch_2", "epoch_10"]


def test_ls_shows_a_pretraining_sweep_as_one_run_with_its_token_counts(tmp_path, tiny_llama_dir, monkeypatch):
    run = tmp_path / "olmoe"
    for name in ("step312-tokens1248M", "step156-tokens624M", "step1000-tokens4000M"):
        shutil.copytree(tiny_llama_dir, run / name)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["ls", "olmoe"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    out = result.output
    assert "tokens" in out and "3 checkpoints, 0 broken" in out and " in 2 runs" not in out
    assert out.index("step156-tokens624M") < out.index("step312-tokens1248M") < out.index("step1000-tokens4000M")
    assert out.index("624M") < out.index("1248M") < out.index("4000M")
    rows = json.loads(CliRunner().invoke(main, ["ls", "olmoe", "--json"]).stdout)
    assert [(r["step"], r["tokens"], r["run"]) for r in rows] == [
        (156, "624M", "olmoe"), (312, "1248M", "olmoe"), (1000, "4000M", "olmoe")]


def test_folder_name_wins_over_a_disagreeing_trainer_state(trainer_run, tmp_path):
    folder = shutil.copytree(trainer_run / "checkpoint-20", tmp_path / "run" / "checkpoint-25")
    ckpt = discover(folder.parent)[0]
    assert ckpt.step == 25
    assert ckpt.notes == ["trainer_state.json says global_step 20; using 25 from the folder name"]
    assert ckpt.train_loss == pytest.approx(loss_at(20))  # its history ends at step 20


def test_a_folder_given_twice_is_listed_once(trainer_run):
    found = discover([trainer_run, trainer_run / "checkpoint-10"])
    assert [c.step for c in found] == [10, 20, 30, 100, 120]


def test_missing_path_raises_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        discover([tmp_path / "nope"])
    (tmp_path / "w.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a folder"):
        discover(tmp_path / "w.safetensors")


# --- layouts -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory, tiny_llama_dir):
    from transformers import LlamaForCausalLM

    folder = tmp_path_factory.mktemp("sharded")
    LlamaForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(folder, max_shard_size="20KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama_dir / name, folder / name)
    return folder


def test_sharded_checkpoint_counts_all_shards(sharded_dir, tiny_llama_dir):
    ckpt = discover(sharded_dir)[0]
    single = discover(tiny_llama_dir)[0]
    assert ckpt.kind == "full"
    assert len(ckpt.weight_files) == len(list(sharded_dir.glob("model-*-of-*.safetensors"))) > 1
    assert ckpt.num_parameters == single.num_parameters == safetensors_param_count(tiny_llama_dir / "model.safetensors")
    assert fingerprint(ckpt) == fingerprint(single)  # same tensors, different sharding


def test_index_naming_a_missing_shard_is_an_error(sharded_dir, tmp_path):
    broken = shutil.copytree(sharded_dir, tmp_path / "broken")
    (broken / "model-00003-of-00007.safetensors").unlink()
    ckpt = discover(broken)[0]
    assert ckpt.kind == "error"
    assert ckpt.error == "model.safetensors.index.json names model-00003-of-00007.safetensors, which is missing"
    (broken / "model.safetensors.index.json").unlink()
    assert discover(broken)[0].error == "incomplete shards without an index: shard 3 of 7 is missing"


def test_pickle_weights_are_recognised_but_flagged(tmp_path, tiny_llama_dir):
    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "bin"
    folder.mkdir()
    torch.save(load_file(str(tiny_llama_dir / "model.safetensors")), folder / "pytorch_model.bin")
    shutil.copy(tiny_llama_dir / "config.json", folder / "config.json")
    ckpt = discover(folder)[0]
    assert (ckpt.kind, ckpt.weight_format, ckpt.dtype) == ("full", "pickle", "float32")
    assert ckpt.num_parameters is None
    assert any("--allow-pickle" in note for note in ckpt.notes)
    assert len(fingerprint(ckpt)) == 64


def test_moe_config_is_read(tmp_path):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    config = OlmoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                         eos_token_id=2, pad_token_id=0)
    model = OlmoeForCausalLM(config)
    model.save_pretrained(tmp_path / "moe")
    ckpt = discover(tmp_path / "moe")[0]
    assert (ckpt.architecture, ckpt.num_experts, ckpt.experts_per_token) == ("OlmoeForCausalLM", 4, 2)
    assert ckpt.num_parameters == sum(p.numel() for p in model.state_dict().values())


def test_incomplete_folders_are_errors(tmp_path, tiny_llama_dir):
    no_config = shutil.copytree(tiny_llama_dir, tmp_path / "no-config")
    (no_config / "config.json").unlink()
    (tmp_path / "empty").mkdir()
    found = discover([no_config, tmp_path / "empty"])
    assert [c.error for c in found] == [
        "no config.json next to the weights",
        "no weights: no model*.safetensors, pytorch_model*.bin, pytorch_model_fsdp_0/, global_stepN/ (DeepSpeed) "
        "or adapter_config.json, and no checkpoint-N/ folders",
    ]


# --- LoRA adapters -----------------------------------------------------------------------------


def test_lora_run(lora_run, tiny_llama_dir):
    found = discover(lora_run)
    assert [(c.step, c.kind) for c in found] == [(5, "adapter"), (15, "adapter")]
    ckpt = found[0]
    assert (ckpt.lora_rank, ckpt.lora_alpha, ckpt.target_modules) == (4, 8.0, ["q_proj", "v_proj"])
    assert ckpt.base_model == str(tiny_llama_dir)
    assert ckpt.architecture == "LlamaForCausalLM"
    assert ckpt.num_parameters == safetensors_param_count(ckpt.path / "adapter_model.safetensors") == 896
    assert fingerprint(found[0]) != fingerprint(found[1])


def test_base_model_override(lora_run, trainer_run, tmp_path):
    overridden = discover(lora_run, base_model=str(trainer_run / "checkpoint-20"))[0]
    assert overridden.base_model == str(trainer_run / "checkpoint-20")
    plain = discover(lora_run)[0]
    assert fingerprint(overridden) != fingerprint(plain)  # same adapter, different base weights


def test_adapter_without_any_base_is_an_error(lora_run, tmp_path):
    folder = shutil.copytree(lora_run / "checkpoint-5", tmp_path / "orphan")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (folder / "adapter_config.json").write_text(json.dumps(config))
    assert discover(folder)[0].error == "adapter_config.json has no base_model_name_or_path; pass --base-model"
    assert discover(folder, base_model="org/base-7b")[0].kind == "adapter"


# --- fingerprints ------------------------------------------------------------------------------


def _change_tensor(folder, name, scale: float, element_only: bool) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    if element_only:
        tensors[name].view(-1)[7] += 1e-3
    else:
        tensors[name] *= scale
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("sampled", [False, True])
def test_fingerprint_follows_content_not_location(tmp_path, tokenizer, monkeypatch, sampled):
    if sampled:  # the large-checkpoint path: three windows per tensor instead of every byte
        monkeypatch.setattr(hashing, "WHOLE_LIMIT", 0)
    a = save_tiny_llama(tmp_path / "a", tokenizer, seed=1)
    b = save_tiny_llama(tmp_path / "b", tokenizer, seed=1)
    moved = shutil.copytree(a, tmp_path / "elsewhere" / "a")
    fp = fingerprint(discover(a)[0])
    assert fingerprint(discover(b)[0]) == fp
    assert fingerprint(discover(moved)[0]) == fp
    _change_tensor(b, "model.layers.1.mlp.down_proj.weight", 1.01, element_only=not sampled)
    assert fingerprint(discover(b)[0]) != fp


def test_fingerprint_sees_config_changes_but_not_version_stamps(tmp_path, tiny_llama_dir):
    folder = shutil.copytree(tiny_llama_dir, tmp_path / "c")
    fp = fingerprint(discover(folder)[0])
    config = json.loads((folder / "config.json").read_text())
    config["transformers_version"] = "0.0.1"
    (folder / "config.json").write_text(json.dumps(config, indent=4))
    assert fingerprint(discover(folder)[0]) == fp
    config["rms_norm_eps"] = 1e-5
    (folder / "config.json").write_text(json.dumps(config))
    assert fingerprint(discover(folder)[0]) != fp


def test_broken_checkpoint_has_no_fingerprint(trainer_run):
    with pytest.raises(CheckpointError, match="cannot fingerprint a broken checkpoint"):
        fingerprint(discover(trainer_run)[2])


# --- CLI ---------------------------------------------------------------------------------------


def test_ls_table(trainer_run, monkeypatch):
    monkeypatch.chdir(trainer_run)
    result = CliRunner().invoke(main, ["ls", "."], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.index("checkpoint-20") < out.index("checkpoint-30") < out.index("checkpoint-100")
    assert "truncated" in out and "error" in out
    assert "Llama f32 25.0K" in out
    assert "5 checkpoints, 1 broken" in out


def test_ls_json(trainer_run):
    result = CliRunner().invoke(main, ["ls", str(trainer_run), "--json", "--fingerprint"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["step"] for r in rows] == [10, 20, 30, 100, 120]
    assert [r["kind"] for r in rows] == ["full", "full", "error", "full", "full"]
    assert rows[0]["path"] == str(trainer_run / "checkpoint-10")
    assert rows[0]["epoch"] == pytest.approx(0.25) and rows[0]["train_loss"] == pytest.approx(loss_at(8))
    assert rows[2]["error"].startswith("model.safetensors: truncated") and rows[2]["fingerprint"] is None
    assert rows[0]["error"] is None and len(rows[0]["fingerprint"]) == 64


def test_ls_lora_with_base_override(lora_run, trainer_run, tiny_llama_dir):
    base = str(trainer_run / "checkpoint-10")
    result = CliRunner().invoke(main, ["ls", str(lora_run), "--json", "--base-model", base])
    rows = json.loads(result.stdout)
    assert [(r["kind"], r["lora_rank"], r["base_model"]) for r in rows] == [("adapter", 4, base)] * 2
    table = CliRunner().invoke(main, ["ls", str(lora_run)], env={"COLUMNS": "200"}).output
    assert f"r=4 α=8 q_proj,v_proj on {tiny_llama_dir.name}" in table


def test_ls_does_not_import_torch(trainer_run):
    code = ("import sys\nfrom click.testing import CliRunner\nfrom ckptsel.cli import main\n"
            f"r = CliRunner().invoke(main, ['ls', {str(trainer_run)!r}, '--json', '--fingerprint'])\n"
            "assert r.exit_code == 0, r.output\n"
            "print(','.join(m for m in ('torch', 'transformers', 'safetensors', 'numpy') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_ls_missing_path_is_one_line_exit_2(tmp_path):
    result = CliRunner().invoke(main, ["ls", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"Error: {tmp_path / 'nope'}: no such file or directory"]


def test_ls_exits_1_when_every_checkpoint_found_is_broken(tmp_path):
    (tmp_path / "run" / "checkpoint-5").mkdir(parents=True)  # a checkpoint folder without weights
    result = CliRunner().invoke(main, ["ls", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)[0]["kind"] == "error"


def test_ls_of_a_folder_without_checkpoints_is_ranks_one_line_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "train.jsonl").write_text('{"question": "1+1", "answer": "#### 2"}\n')
    listed = CliRunner().invoke(main, ["ls", str(tmp_path / "empty")])
    ranked = CliRunner().invoke(main, ["rank", str(tmp_path / "empty"), "--data", str(tmp_path / "train.jsonl")])
    assert listed.exit_code == ranked.exit_code == 2
    line = listed.output.strip().splitlines()
    assert line == ranked.output.strip().splitlines()
    assert len(line) == 1 and line[0].startswith(f"Error: no loadable checkpoint under {tmp_path / 'empty'}")
