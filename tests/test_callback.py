"""The Trainer callback: measures each save in memory, leaves training bit-identical, fills the
store that `ckptsel rank` reads, logs through the Trainer, stops when asked (Trainer and TRL)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ckptsel.cli import main

pytestmark = pytest.mark.filterwarnings("ignore")

# Few examples and samples: the plumbing is under test; `rank` takes the same options.
K, NEW_TOKENS, EXAMPLES = 2, 24, 8
RANK_FAST = ["-k", str(K), "--max-new-tokens", str(NEW_TOKENS), "--max-examples", str(EXAMPLES), "--quiet"]


def _spec(**update):
    from ckptsel.lab.quick import TINY_MODEL
    from ckptsel.lab.train import TrainSpec

    settings = {"families": ["sum"], "n_train": 48, "n_test": 16, "model": TINY_MODEL, "lr": 3e-3, "epochs": 2,
                "batch_size": 16, "n_checkpoints": 3}
    return TrainSpec(**{**settings, **update})


def _recipe(run: Path):
    from ckptsel.recipes import load_recipe, override

    return override(load_recipe(run / "recipe.yaml"), sampling={"k": K, "max_new_tokens": NEW_TOKENS})


def _callback(run: Path, cache: Path, **kw):
    """The callback, on the run's data (written first: the data and recipe exist before training)."""
    from ckptsel.integrations.transformers import CkptselCallback
    from ckptsel.lab.train import write_data

    if not (run / "recipe.yaml").is_file():
        write_data(_spec(), run, "cb")
    return CkptselCallback(data=run / "train.jsonl", recipe=_recipe(run), max_examples=EXAMPLES, cache_dir=cache,
                           on_measured=lambda report: None, **kw)


class _Logs:
    """A Trainer callback that records what reaches ``on_log`` (what TensorBoard and W&B are given)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Recorder(TrainerCallback):
            def __init__(self):
                self.logs = []

            def on_log(self, args, state, control, logs=None, **kwargs):
                self.logs.append({**(logs or {}), "step": state.global_step})

        return Recorder()


def _rank_json(run: Path, cache: Path, *extra) -> dict:
    args = ["rank", str(run), "--data", str(run / "train.jsonl"), "--recipe", str(run / "recipe.yaml"),
            "--cache-dir", str(cache), *RANK_FAST, "--json", *extra]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _same_measurements(a: dict, b: dict) -> None:
    for x, y in zip(a["checkpoints"], b["checkpoints"], strict=True):
        assert x["step"] == y["step"] and x["fingerprint"] == y["fingerprint"]
        for key in ("train_acc", "premem_acc", "memorized_frac", "copy_rate"):
            assert x[key] == y[key], (x["step"], key)
        for key in ("target_nll", "perturb_nll", "alt_nll", "entropy"):
            if x[key] is None or y[key] is None:
                assert x[key] == y[key], (x["step"], key)
            else:
                assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-6), (x["step"], key)


def _check_logged(recorder, callback, save_steps) -> None:
    """Every save logged its numbers through the Trainer, and they are what the callback measured."""
    logged = {e["step"]: e for e in recorder.logs if "ckptsel/premem_acc" in e}
    assert sorted(logged) == save_steps
    for report in callback.reports:
        entry = logged[report.step]
        for key in ("ckptsel/premem_acc", "ckptsel/train_acc", "ckptsel/memorized_frac", "ckptsel/stage",
                    "ckptsel/sample_diversity", "ckptsel/distinct_samples"):  # the columns marked `log`
            assert entry[key] == report.metrics[key]
        assert f"ckptsel/{report.proxy}" in entry
        assert entry["ckptsel/stage"] == {"underfit": 0, "generalizing": 1, "over-memorized": 2}[report.stage]


# ----------------------------------------------------------------------------- transformers Trainer


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """A lab run trained with the callback attached (full weights, 3 saves) and the callback."""
    from ckptsel.lab.train import train_run

    out = tmp_path_factory.mktemp("cb-full")
    run, cache = out / "run", out / "cache"
    callback, recorder = _callback(run, cache), _Logs()
    train_run(_spec(), run, name="cb", callbacks=[callback, recorder])
    return run, cache, callback, recorder


def test_trainer_logs_every_save_and_rank_measures_nothing(full_run, tmp_path):
    run, cache, callback, recorder = full_run
    _check_logged(recorder, callback, [2, 4, 6])
    assert [r.measured for r in callback.reports] == [1, 1, 1]  # each save: itself, in memory; the rest cached

    cached = _rank_json(run, cache)
    assert cached["cache"] == {"measured": 0, "from_cache": 3}
    # The same numbers as measuring the saved folders from disk into an empty store.
    fresh = _rank_json(run, tmp_path / "fresh")
    assert fresh["cache"]["measured"] == 3
    _same_measurements(cached, fresh)
    for report, row in zip(callback.reports, fresh["checkpoints"]):
        assert report.metrics["ckptsel/premem_acc"] == row["premem_acc"]


def test_rank_command_is_what_reads_the_store(full_run):
    run, cache, callback, _ = full_run
    command = callback.rank_command(run)
    assert command.startswith(f"ckptsel rank {run} --data {run / 'train.jsonl'}")
    assert f"--max-examples {EXAMPLES}" in command and f"--cache-dir {cache}" in command
    assert "--dtype" not in command  # float32 on CPU is rank's default here


def _train_with_dropout(out: Path, callbacks=(), *, lora_base: Path | None = None, attach: bool = True):
    """A Trainer run whose steps draw random numbers (attention dropout 0.1): what RNG leaks would change.
    Returns (final parameters, logged losses)."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        PrinterCallback,
        Trainer,
        TrainingArguments,
    )

    from ckptsel.lab.models import build_config
    from ckptsel.lab.tokenizer import build_tokenizer
    from ckptsel.lab.train import collate, encode, write_data

    spec = _spec()
    tokenizer = build_tokenizer()
    rows, _ = write_data(spec, out, "cb")
    if lora_base is None:
        config = build_config(spec.model, tokenizer)
        config.attention_dropout = 0.1
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    else:
        from peft import LoraConfig, get_peft_model

        model = AutoModelForCausalLM.from_pretrained(lora_base, attention_dropout=0.1)
        torch.manual_seed(0)  # LoRA's A matrices are drawn at random
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                                                 task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(out), max_steps=6, per_device_train_batch_size=16, learning_rate=3e-3,
                             save_strategy="steps", save_steps=2, save_only_model=True, logging_steps=1,
                             report_to="none", disable_tqdm=True, use_cpu=True, seed=0, data_seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=encode(tokenizer, rows), processing_class=tokenizer,
                      data_collator=lambda feats: collate(feats, tokenizer.pad_token_id))
    trainer.remove_callback(PrinterCallback)
    for cb in callbacks:
        cb.attach(trainer) if attach and hasattr(cb, "attach") else trainer.add_callback(cb)
    trainer.train()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return params, losses


def test_measures_in_the_model_dtype_under_that_dtype_key(tmp_path):
    """A bfloat16 model is measured in bfloat16: rank reuses it with --dtype bfloat16 (the command says so),
    and the float32 default of this machine is another key."""
    import torch
    from transformers import PrinterCallback, Trainer, TrainingArguments

    from ckptsel.lab.models import build_model
    from ckptsel.lab.tokenizer import build_tokenizer
    from ckptsel.lab.train import collate, encode, write_data

    run, cache = tmp_path / "run", tmp_path / "cache"
    tokenizer = build_tokenizer()
    rows, _ = write_data(_spec(), run, "cb")
    model = build_model(_spec().model, tokenizer, seed=0).to(torch.bfloat16)
    args = TrainingArguments(output_dir=str(run), max_steps=4, per_device_train_batch_size=16, learning_rate=3e-3,
                             save_strategy="steps", save_steps=2, save_only_model=True, report_to="none",
                             disable_tqdm=True, use_cpu=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=encode(tokenizer, rows), processing_class=tokenizer,
                      data_collator=lambda feats: collate(feats, tokenizer.pad_token_id))
    trainer.remove_callback(PrinterCallback)
    callback = _callback(run, cache).attach(trainer)
    trainer.train()
    assert "--dtype bfloat16" in callback.rank_command(run)
    assert _rank_json(run, cache, "--dtype", "bfloat16")["cache"] == {"measured": 0, "from_cache": 2}
    assert _rank_json(run, cache)["cache"]["measured"] == 2  # float32: not what the callback stored


def test_training_is_bit_identical_with_and_without_the_callback(tmp_path):
    import torch
    from transformers import TrainerCallback

    plain, plain_losses = _train_with_dropout(tmp_path / "plain")
    run = tmp_path / "with"
    callback = _callback(run, tmp_path / "cache")
    watched, watched_losses = _train_with_dropout(run, [callback])
    assert len(callback.reports) == 3 and all(r.failure is None for r in callback.reports)
    assert watched_losses == plain_losses and len(plain_losses) == 6
    assert plain.keys() == watched.keys()
    assert all(torch.equal(plain[n], watched[n]) for n in plain)

    class DrawsOnSave(TrainerCallback):  # the control: one random draw per save does change training
        def on_save(self, args, state, control, **kwargs):
            torch.rand(1)

    leaked, _ = _train_with_dropout(tmp_path / "leak", [DrawsOnSave()])
    assert not all(torch.equal(plain[n], leaked[n]) for n in plain)


def test_without_attach_the_numbers_go_to_the_trainer_state(tmp_path):
    run = tmp_path / "run"
    callback, recorder = _callback(run, tmp_path / "cache"), _Logs()
    _train_with_dropout(run, [callback, recorder], attach=False)
    assert not any("ckptsel/premem_acc" in e for e in recorder.logs)  # not through Trainer.log
    history = json.loads((run / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    logged = [e for e in history if "ckptsel/premem_acc" in e]
    assert [e["step"] for e in logged] == [2, 4]  # step 6's entry came after its own save
    assert [e["ckptsel/premem_acc"] for e in logged] == [r.metrics["ckptsel/premem_acc"] for r in callback.reports[:2]]


# ----------------------------------------------------------------------------- LoRA


@pytest.fixture(scope="module")
def lora_base(lab_lora_run):
    return (Path(lab_lora_run).parent / "base" / "final").resolve()


def test_lora_in_memory_equals_the_adapter_on_its_base_and_stays_bit_identical(lora_base, tmp_path):
    import torch

    plain, plain_losses = _train_with_dropout(tmp_path / "plain", lora_base=lora_base)
    run, cache = tmp_path / "run", tmp_path / "cache"
    callback, recorder = _callback(run, cache), _Logs()
    watched, watched_losses = _train_with_dropout(run, [callback, recorder], lora_base=lora_base)
    assert watched_losses == plain_losses
    assert all(torch.equal(plain[n], watched[n]) for n in plain)
    _check_logged(recorder, callback, [2, 4, 6])

    cached = _rank_json(run, cache)
    assert cached["cache"] == {"measured": 0, "from_cache": 3}
    fresh = _rank_json(run, tmp_path / "fresh")  # adapters loaded from disk onto the base
    assert fresh["cache"]["measured"] == 3
    _same_measurements(cached, fresh)


# ----------------------------------------------------------------------------- stopping


def test_stops_after_patience_flagged_saves(tmp_path, monkeypatch):
    """The stopping rule on a real Trainer: stages are scripted, so the rule alone is under test."""
    from ckptsel.integrations import transformers as integration
    from ckptsel.lab.train import train_run, write_data

    stages = iter(["generalizing", "over-memorized", "generalizing", "over-memorized", "over-memorized",
                   "over-memorized"])

    def scripted(self, folder, step, model, processing_class):
        stage = next(stages)
        return integration.SaveReport(step, folder, {"ckptsel/stage": float(integration.STAGE_CODES[stage])}, stage,
                                      None, None, None, 0.0, 0)

    monkeypatch.setattr(integration.CkptselCallback, "_measure", scripted)
    spec = _spec(epochs=6, n_checkpoints=6)  # 18 steps, a save every 3
    run = tmp_path / "run"
    write_data(spec, run, "cb")
    callback = _callback(run, tmp_path / "cache", stop_on_overmemorization=True, patience=2)
    train_run(spec, run, name="cb", callbacks=[callback])
    # saves at 3, 6, 9, 12, 15: flagged at 6 (reset by 9), then 12 and 15 -> stop at 15, not 18
    assert [r.step for r in callback.reports] == [3, 6, 9, 12, 15]
    assert [r.stop for r in callback.reports] == [False, False, False, False, True]
    state = json.loads((run / "checkpoint-15" / "trainer_state.json").read_text())
    assert state["global_step"] == 15 and not (run / "checkpoint-18").exists()


def test_stops_at_the_first_measured_flag(tmp_path):
    """A real flag: a run that learns and memorises its 24 questions (as tests/conftest.py's
    learning_run), with a 5% proxy rise and half its examples memorised as the thresholds, stops at the first
    flagged save (at the default 0.99 no save of this short run is flagged)."""
    from ckptsel.integrations.transformers import CkptselCallback
    from ckptsel.lab.train import train_run, write_data
    from ckptsel.recipes import override

    spec = _spec(families=["max"], n_train=24, epochs=80, n_checkpoints=8)  # 160 steps, a save every 20
    run, cache = tmp_path / "run", tmp_path / "cache"
    write_data(spec, run, "cb")
    recipe = override(_recipe(run), stages={"proxy_rise": 0.05, "memorized_min": 0.5})
    callback = CkptselCallback(data=run / "train.jsonl", recipe=recipe, max_examples=EXAMPLES, cache_dir=cache,
                               stop_on_overmemorization=True, on_measured=lambda report: None)
    train_run(spec, run, name="cb", callbacks=[callback])
    stages = [r.stage for r in callback.reports]
    assert "over-memorized" in stages, stages
    first = stages.index("over-memorized")
    assert len(callback.reports) == first + 1 and callback.reports[-1].stop  # stopped right there
    stop_step = callback.reports[-1].step
    assert stop_step < spec.steps()
    assert sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))[-1] == stop_step
    assert "1.05×" in callback.reports[-1].flag_reason  # the recipe's threshold, in the reason logged
    assert callback.reports[-1].recommended_step < stop_step  # the pick is among the unflagged saves before


def test_every_n_saves_measures_every_nth(tmp_path):
    from ckptsel.lab.train import train_run, write_data

    spec = _spec(epochs=4, n_checkpoints=4)  # 12 steps, saves at 3, 6, 9, 12
    run = tmp_path / "run"
    write_data(spec, run, "cb")
    callback = _callback(run, tmp_path / "cache", every_n_saves=2)
    train_run(spec, run, name="cb", callbacks=[callback])
    assert [r.step for r in callback.reports] == [3, 9]
    assert [r.measured for r in callback.reports] == [1, 1]  # save 9 does not read save 6 from disk


# ----------------------------------------------------------------------------- TRL SFTTrainer


def _sft(out: Path, callbacks, *, lora_base: Path | None = None):
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from ckptsel.lab.models import build_model
    from ckptsel.lab.tokenizer import build_tokenizer
    from ckptsel.lab.train import render, write_data

    spec = _spec()
    tokenizer = build_tokenizer()
    rows, _ = write_data(spec, out, "cb")
    data = Dataset.from_list([dict(zip(("prompt", "completion"), render(r))) for r in rows])
    peft_config = None
    if lora_base is None:
        model = build_model(spec.model, tokenizer, seed=0)
    else:
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(lora_base)
        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    args = SFTConfig(output_dir=str(out), max_steps=6, per_device_train_batch_size=16, learning_rate=3e-3,
                     save_strategy="steps", save_steps=3, save_only_model=True, logging_steps=1, report_to="none",
                     disable_tqdm=True, use_cpu=True, seed=0, max_length=256, dataset_num_proc=None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=peft_config)
    trainer.remove_callback(PrinterCallback)
    for cb in callbacks:
        cb.attach(trainer) if hasattr(cb, "attach") else trainer.add_callback(cb)
    trainer.train()
    return trainer


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_sft_trainer(mode, lora_base, tmp_path):
    run, cache = tmp_path / "run", tmp_path / "cache"
    callback, recorder = _callback(run, cache, stop_on_overmemorization=True), _Logs()
    trainer = _sft(run, [callback, recorder], lora_base=lora_base if mode == "lora" else None)
    kinds = {(run / f"checkpoint-{s}" / "adapter_config.json").is_file() for s in (3, 6)}
    assert kinds == {mode == "lora"}
    _check_logged(recorder, callback, [3, 6])
    assert trainer.state.global_step == 6  # nothing flagged in 6 steps of a tiny model: no stop
    cached = _rank_json(run, cache)
    assert cached["cache"] == {"measured": 0, "from_cache": 2}
    for report, row in zip(callback.reports, cached["checkpoints"]):
        assert math.isclose(report.metrics["ckptsel/train_acc"], row["train_acc"])


def test_sft_trainer_stops_when_asked(tmp_path, monkeypatch):
    """The stopping rule through TRL's SFTTrainer (stages scripted, as in test_stops_after_patience_flagged_saves)."""
    from ckptsel.integrations import transformers as integration

    def flagged(self, folder, step, model, processing_class):
        return integration.SaveReport(step, folder, {"ckptsel/stage": 2.0}, "over-memorized", None, None, None, 0.0, 0)

    monkeypatch.setattr(integration.CkptselCallback, "_measure", flagged)
    run = tmp_path / "run"
    callback = _callback(run, tmp_path / "cache", stop_on_overmemorization=True)
    trainer = _sft(run, [callback])
    assert trainer.state.global_step == 3 and [r.step for r in callback.reports] == [3]


# ----------------------------------------------------------------------------- memorization-aware reweighting


def test_reweighting_drops_memorised_examples_from_the_next_epoch(tmp_path):
    """nu = 100 marks every measured example memorised at the first save (step 2, in epoch 1); with weight 0
    they are never drawn again from epoch 2 on, and epoch 1 is the plain run's to the bit."""
    _, plain_losses = _train_with_dropout(tmp_path / "plain")
    run = tmp_path / "with"
    callback, recorder = _callback(run, tmp_path / "cache", threshold=100.0, reweight=0.0), _Logs()
    _, losses = _train_with_dropout(run, [callback, recorder])
    assert losses[:3] == plain_losses[:3] and losses[3:] != plain_losses[3:]  # 48 rows / 16 = 3 steps an epoch
    assert len(callback.down_weighted) == EXAMPLES
    sampler = callback._dataloader.batch_sampler.sampler
    drawn = [i for epoch in range(3) for i in (sampler.set_epoch(epoch) or list(sampler))]
    assert len(drawn) == 3 * 48 and set(drawn).isdisjoint(callback.down_weighted)
    logged = [e for e in recorder.logs if "ckptsel/reweighted" in e]
    assert [e["ckptsel/reweighted"] for e in logged] == [EXAMPLES] * 3 and logged[0]["ckptsel/reweight"] == 0.0


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_reweighting_in_an_sft_trainer(mode, lora_base, tmp_path):
    run = tmp_path / "run"
    callback = _callback(run, tmp_path / "cache", threshold=100.0, reweight=0.25)
    trainer = _sft(run, [callback], lora_base=lora_base if mode == "lora" else None)
    assert (run / "checkpoint-6" / "adapter_config.json").is_file() == (mode == "lora")
    assert trainer.state.global_step == 6 and len(callback.down_weighted) == EXAMPLES
    weights = callback._dataloader.batch_sampler.sampler.weights
    assert sorted(np.flatnonzero(weights < 1)) == sorted(callback.down_weighted) and set(weights) == {0.25, 1.0}


def test_the_reweighted_sampler_is_seeded_and_draws_in_proportion():
    from ckptsel.integrations.reweighting import ReweightedSampler, install

    sampler = ReweightedSampler(np.array([1.0, 1.0, 0.25, 0.0] * 500), seed=3)
    first, again = list(sampler), list(sampler)
    assert first == again and len(first) == 2000
    sampler.set_epoch(1)
    assert list(sampler) != first
    counts = np.bincount(np.array(first) % 4, minlength=4) / len(first)
    assert counts[3] == 0 and counts[2] == pytest.approx(0.25 / 2.25, abs=0.03)

    class Loader:  # what the Trainer hands over, with a dataset of another size than the training file
        dataset = list(range(10))
        batch_sampler = type("B", (), {"sampler": None})()

    assert "has 10 rows and the training file 12" in install(Loader(), 12, seed=0)


# ----------------------------------------------------------------------------- the ranking's preparation


def _saved_in_memory(ckpt: Path):
    """The model and tokenizer of a saved checkpoint, as the Trainer holds them at its save."""
    import torch
    from transformers import AutoModelForCausalLM

    from ckptsel.tokenizers import load_tokenizer

    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32), load_tokenizer(ckpt)


def _save(run: Path, step: int):
    """The Trainer's ``args`` and ``state`` at a save, as much as ``measure_save`` reads of them."""
    from types import SimpleNamespace

    return SimpleNamespace(output_dir=str(run)), SimpleNamespace(global_step=step, log_history=[])


def test_a_row_longer_than_the_context_fails_the_save_as_it_fails_rank(tiny_run, tmp_path):
    """The callback prepares its run as `ckptsel rank` does (ckptsel.prepare): a training row longer than the
    model's context (256 positions) is refused before any model work, naming the file and row, and the save
    reports it (training goes on) instead of measuring it."""
    import shutil

    from ckptsel.integrations.transformers import CkptselCallback

    first = min(Path(tiny_run).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    run = tmp_path / "run"
    shutil.copytree(first, run / first.name)
    rows = [json.loads(line) for line in (Path(tiny_run) / "train.jsonl").read_text().splitlines()]
    rows[5] = {**rows[5], "question": "1+" * 400 + "1=?"}
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    callback = CkptselCallback(data=data, recipe=_recipe(Path(tiny_run)), max_examples=None, cache_dir=tmp_path / "c",
                               on_measured=lambda report: None)
    model, tokenizer = _saved_in_memory(run / first.name)
    report = callback.measure_save(*_save(run, int(first.name.split("-")[1])), model, tokenizer)
    assert report.failure is not None and f"{data}:6: " in report.failure
    assert "longer than the model's context of 256" in report.failure
    assert report.measured == 0 and report.metrics == {}


def test_what_the_callback_reads_from_disk_is_read_with_its_engine_settings(tiny_run):
    """An earlier save the store lacks is read from disk with the callback's engine settings (remote code,
    pickled weights), on the model's device and dtype, and `rank_command` passes them on."""
    from ckptsel.discover import discover_runs
    from ckptsel.integrations.transformers import CkptselCallback, _InMemoryLoader
    from ckptsel.settings import EngineSettings

    callback = CkptselCallback(data=Path(tiny_run) / "train.jsonl", recipe=_recipe(Path(tiny_run)),
                               engine=EngineSettings(allow_pickle=True, trust_remote_code=True, dtype="bfloat16"),
                               batch_size=3, on_measured=lambda report: None)
    checkpoints = discover_runs([Path(tiny_run)])[0].checkpoints
    model, tokenizer = _saved_in_memory(checkpoints[-1].path)
    engine = callback.engine_for(model)
    assert (engine.device, engine.dtype, engine.batch_size) == ("cpu", "float32", 3)  # the model's, not the setting's
    loader = _InMemoryLoader(checkpoints[-1].path.resolve(), model, tokenizer, engine)
    assert loader.load(checkpoints[-1]).model is model
    loader.load(checkpoints[0])  # not the model in memory: read from disk
    assert loader.base_loads == 0 and loader._disk.full_loads == 1
    assert loader._disk.options.allow_pickle and loader._disk.options.trust_remote_code
    loader.close()
    command = callback.rank_command(tiny_run)
    assert "--allow-pickle" in command and "--trust-remote-code" in command


def test_a_data_warning_is_said_once_a_run_not_at_every_save(tiny_run, tmp_path, caplog):
    """The callback prepares the run at every save; a warning about the training file (a reference the grader
    cannot read) is the same each time, so it is logged at the first save only."""
    import logging
    import shutil

    from ckptsel.integrations.transformers import CkptselCallback

    saves = sorted(Path(tiny_run).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[:2]
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (Path(tiny_run) / "train.jsonl").read_text().splitlines()]
    rows[3] = {**rows[3], "answer": "no final answer here"}
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    callback = CkptselCallback(data=data, recipe=_recipe(Path(tiny_run)), max_examples=4, cache_dir=tmp_path / "c",
                               on_measured=lambda report: None)
    with caplog.at_level(logging.WARNING, logger="ckptsel"):
        for save in saves:
            shutil.copytree(save, run / save.name)
            model, tokenizer = _saved_in_memory(run / save.name)
            report = callback.measure_save(*_save(run, int(save.name.split("-")[1])), model, tokenizer)
            assert report.failure is None and report.measured == 1
    said = [r for r in caplog.records if "grader finds no answer" in r.getMessage()]
    assert len(said) == 1 and f"{data}:4" in said[0].getMessage()
