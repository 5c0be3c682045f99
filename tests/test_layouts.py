"""Checkpoints as training stacks write them: pretraining step folders, FSDP, DeepSpeed ZeRO, torchtune.

Each layout is built with the real library where it runs here (tests/stacks.py: FSDP2 and DeepSpeed ZeRO-2/3
on two gloo ranks on CPU) from the lab's tiny Trainer run, and ranked; the numbers must equal those of the
same weights saved as plain safetensors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckptsel.cli import main

FAST = ["--max-examples", "6", "-k", "2", "--max-new-tokens", "24", "--quiet", "--json"]
COMPARED = ("train_acc", "target_nll", "premem_acc")


def rank(run: Path, cache: Path, *extra: str, exit_code: int = 0) -> dict:
    args = ["rank", str(run), "--data", str(run / "train.jsonl"), "--recipe", str(run / "recipe.yaml"),
            "--cache-dir", str(cache), *FAST, *extra]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == exit_code, result.output
    return json.loads(result.stdout)


def numbers(ranked: dict) -> list[list]:
    return [[c[k] for k in COMPARED] for c in ranked["checkpoints"]]


def copy_run_files(src: Path, dst: Path) -> None:
    for name in ("train.jsonl", "recipe.yaml"):
        shutil.copy(src / name, dst / name)


# --- pretraining step folders --------------------------------------------------------------------------


def test_a_pretraining_sweep_of_step_folders_ranks_as_one_run_in_step_order(tiny_run, tmp_path):
    """OLMo/OLMoE-style folders (stepN/, stepN-tokensXM/) of one run: one run, in step order, the same numbers
    as the Trainer run they were copied from."""
    sweep = tmp_path / "olmoe"
    steps = sorted(int(p.name.split("-")[1]) for p in tiny_run.glob("checkpoint-*"))
    names = [f"step{s * 78}" if i == 0 else f"step{s * 78}-tokens{s * 312}M" for i, s in enumerate(steps)]
    for step, name in zip(steps, names):
        shutil.copytree(tiny_run / f"checkpoint-{step}", sweep / name,
                        ignore=shutil.ignore_patterns("trainer_state.json"))
    copy_run_files(tiny_run, sweep)

    listed = json.loads(CliRunner().invoke(main, ["ls", str(sweep), "--json"]).stdout)
    assert [(r["step"], r["tokens"]) for r in listed] == [(s * 78, None if i == 0 else f"{s * 312}M")
                                                           for i, s in enumerate(steps)]
    ranked = rank(sweep, tmp_path / "cache")
    original = rank(tiny_run, tmp_path / "cache-original")
    assert [c["step"] for c in ranked["checkpoints"]] == [s * 78 for s in steps]
    assert len({c["run"] for c in ranked["checkpoints"]}) == 1
    assert numbers(ranked) == numbers(original)
    assert len({c["target_nll"] for c in ranked["checkpoints"]}) == len(steps)  # the checkpoints differ


# --- FSDP ----------------------------------------------------------------------------------------------


def tree(root: Path) -> dict[str, int]:
    """Every file under ``root`` with its size: what a command must leave as it found it."""
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def count_conversions(monkeypatch):
    """How many converted copies are made (each conversion goes through converted_copy's ``convert``)."""
    import ckptsel.formats.converted as converted

    made = []
    original = converted.converted_copy

    def counting(ckpt, cache_dir, convert, *, what):
        def counted(folder):
            made.append(ckpt.path.name)
            convert(folder)

        return original(ckpt, cache_dir, counted, what=what)

    for module in ("fsdp", "zero"):
        monkeypatch.setattr(f"ckptsel.formats.{module}.converted_copy", counting)
    return made


@pytest.mark.slow
def test_fsdp_sharded_ranks_like_the_same_weights_in_safetensors(fsdp_stack, tmp_path, count_conversions):
    """accelerate's SHARDED_STATE_DICT layout (pytorch_model_fsdp_0/, 2 ranks' .distcp shards, no config.json in
    the checkpoint: the run folder's is used) ranks with the numbers of the same weights saved as safetensors;
    the conversion happens once, into the cache, and nothing is written into the run."""
    run = shutil.copytree(fsdp_stack / "sharded", tmp_path / "sharded")
    before = tree(run)
    listed = json.loads(CliRunner().invoke(main, ["ls", str(run), "--json"]).stdout)
    assert [(r["format"], r["weight_format"], r["error"]) for r in listed] == [("fsdp-sharded", "dcp", None)] * 3
    assert listed[0]["base_model"] == str(run)  # config.json and tokenizer from the run folder
    table = CliRunner().invoke(main, ["ls", str(run)], env={"COLUMNS": "200"}).output
    assert "FSDP sharded (DCP, 2 shards) → converted copy" in table and "3 checkpoints, 0 broken" in table

    cache = tmp_path / "cache"
    ranked = rank(run, cache)
    reference = rank(fsdp_stack / "plain", tmp_path / "cache-plain")
    assert numbers(ranked) == numbers(reference)
    assert len({c["target_nll"] for c in ranked["checkpoints"]}) == 3
    assert sorted(count_conversions) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    copies = sorted(p.name for p in (cache / "converted").iterdir() if p.is_dir())
    assert copies == sorted(c["fingerprint"] for c in ranked["checkpoints"])  # keyed by content fingerprint

    again = rank(run, cache, "-k", "3")  # new measurements (other settings): the copies are read, not made again
    assert len(count_conversions) == 3
    assert [c["fingerprint"] for c in again["checkpoints"]] == [c["fingerprint"] for c in ranked["checkpoints"]]
    assert tree(run) == before


@pytest.mark.slow
def test_fsdp_full_state_bin_needs_allow_pickle_and_a_config(fsdp_stack, tmp_path):
    """FULL_STATE_DICT's pytorch_model_fsdp.bin with no config anywhere: one line naming --base-model; with it but
    without --allow-pickle nothing loads; with both, the numbers of the same weights in safetensors."""
    run = shutil.copytree(fsdp_stack / "full", tmp_path / "full")
    base = fsdp_stack / "sharded"  # a folder with the model's config.json and tokenizer
    listed = json.loads(CliRunner().invoke(main, ["ls", str(run), "--json"]).stdout)
    assert {r["error"] for r in listed} == {"no config.json here or in the run folder (full/); pass --base-model PATH "
                                            "(the model's folder: config.json and tokenizer)"}
    listed = json.loads(CliRunner().invoke(main, ["ls", str(run), "--json", "--base-model", str(base)]).stdout)
    assert [(r["format"], r["weight_format"], r["error"]) for r in listed] == [("fsdp-full", "pickle", None)] * 3

    refused = CliRunner().invoke(main, ["rank", str(run), "--data", str(run / "train.jsonl"), "--recipe",
                                        str(run / "recipe.yaml"), "--cache-dir", str(tmp_path / "cache"),
                                        "--base-model", str(base), *FAST])
    assert refused.exit_code == 2 and "pytorch_model_fsdp.bin is pickled; pass --allow-pickle" in refused.output
    assert not (tmp_path / "cache" / "converted").exists() or not any((tmp_path / "cache" / "converted").iterdir())
    ranked = rank(run, tmp_path / "cache", "--base-model", str(base), "--allow-pickle")
    reference = rank(fsdp_stack / "plain", tmp_path / "cache-plain")
    assert numbers(ranked) == numbers(reference)


@pytest.mark.slow
def test_the_cache_command_reports_and_clears_converted_copies(fsdp_stack, tmp_path, count_conversions):
    run = shutil.copytree(fsdp_stack / "sharded", tmp_path / "sharded")
    cache = tmp_path / "cache"
    rank(run, cache)
    shown = json.loads(CliRunner().invoke(main, ["cache", "--cache-dir", str(cache), "--json"]).stdout)
    sizes = [sum(f.stat().st_size for f in p.iterdir()) for p in (cache / "converted").iterdir() if p.is_dir()]
    assert shown["converted"]["copies"] == 3 and shown["converted"]["bytes"] == sum(sizes) > 3 * 100_000
    assert {i["source"] for i in shown["converted"]["items"]} == {str(run / f"checkpoint-{s}") for s in (2, 4, 6)}
    assert shown["store"]["bytes"] > 0
    table = CliRunner().invoke(main, ["cache", "--cache-dir", str(cache)]).output
    assert "converted copies  3, " in table and "KiB" in table

    cleared = json.loads(CliRunner().invoke(main, ["cache", "--cache-dir", str(cache), "--clear", "--json"]).stdout)
    assert cleared["cleared"] == {"copies": 3, "bytes": sum(sizes)} and cleared["converted"]["copies"] == 0
    assert [p for p in (cache / "converted").iterdir()] == []
    assert (cache / "results.sqlite3").is_file()  # the results stay
    rank(run, cache, "-k", "3")  # measured again: converted again
    assert len(count_conversions) == 6


# --- DeepSpeed ZeRO ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_ranks_like_the_same_weights_in_safetensors(zero_stack, tmp_path, stage, count_conversions):
    """A real ZeRO-2 / ZeRO-3 run on 2 ranks (Trainer layout: checkpoint-N/ with config.json, latest and
    global_stepN/ holding only the ranks' shards) is converted with DeepSpeed's zero_to_fp32 into the cache and
    ranks with the numbers of its fp32 weights saved as safetensors."""
    run = shutil.copytree(zero_stack / f"zero{stage}", tmp_path / "zero")
    before = tree(run)
    listed = json.loads(CliRunner().invoke(main, ["ls", str(run), "--json"]).stdout)
    assert [(r["step"], r["format"], r["error"]) for r in listed] == [(2, "deepspeed-zero", None),
                                                                     (4, "deepspeed-zero", None),
                                                                     (6, "deepspeed-zero", None)]
    reference = json.loads(CliRunner().invoke(main, ["ls", str(zero_stack / f"plain{stage}"), "--json"]).stdout)
    assert listed[0]["num_parameters"] == reference[0]["num_parameters"]  # from the shards' pickles, not run
    assert f"ZeRO-{stage}: converted once" in listed[0]["notes"][0]
    table = CliRunner().invoke(main, ["ls", str(run)], env={"COLUMNS": "200"}).output
    assert f"DeepSpeed ZeRO-{'3' if stage == 3 else '1/2'}, 2 ranks → converted copy" in table

    refused = CliRunner().invoke(main, ["rank", str(run), "--data", str(run / "train.jsonl"), "--recipe",
                                        str(run / "recipe.yaml"), "--cache-dir", str(tmp_path / "cache"), *FAST])
    assert refused.exit_code == 2 and "DeepSpeed's .pt shards are pickles; pass --allow-pickle" in refused.output
    ranked = rank(run, tmp_path / "cache", "--allow-pickle")
    assert numbers(ranked) == numbers(rank(zero_stack / f"plain{stage}", tmp_path / "cache-plain"))
    assert len({c["target_nll"] for c in ranked["checkpoints"]}) == 3
    rank(run, tmp_path / "cache", "--allow-pickle", "-k", "3")
    assert len(count_conversions) == 3  # once per checkpoint
    assert tree(run) == before


def test_without_deepspeed_one_line_says_what_to_install(zero_stack, tmp_path, monkeypatch):
    import ckptsel.formats.zero as zero

    monkeypatch.setattr(zero, "deepspeed_installed", lambda: False)
    run = zero_stack / "zero2"
    listed = json.loads(CliRunner().invoke(main, ["ls", str(run), "--json"]).stdout)
    assert "DeepSpeed is not installed: pip install 'ckptsel[deepspeed]'" in listed[0]["notes"]
    result = CliRunner().invoke(main, ["rank", str(run), "--data", str(run / "train.jsonl"), "--recipe",
                                       str(run / "recipe.yaml"), "--cache-dir", str(tmp_path / "cache"),
                                       "--allow-pickle", *FAST])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "reading DeepSpeed ZeRO checkpoints needs DeepSpeed: pip install " \
                                "'ckptsel[deepspeed]'" in errors[0]


def test_zero2_weights_are_written_shard_by_shard_with_an_index(zero_stack, tmp_path):
    """ZeRO-1/2's writer (views into the mapped partitions; a parameter spanning two ranks' partitions copied)
    splits the weights into numbered shards with an index when they exceed the shard size, each tensor equal to
    the same weights saved by save_pretrained."""
    import torch
    from safetensors.torch import load_file

    from ckptsel.formats.zero import _convert_zero12, _weights_only

    out = tmp_path / "out"
    out.mkdir()
    with _weights_only():
        assert _convert_zero12(zero_stack / "zero2" / "checkpoint-2" / "global_step2", out, max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 3 and set(index["weight_map"].values()) == set(files)
    ours = {}
    for name in files:
        shard = load_file(out / name)
        assert all(index["weight_map"][k] == name for k in shard)
        ours.update(shard)
    reference = load_file(zero_stack / "plain2" / "checkpoint-2" / "model.safetensors")
    assert set(ours) == set(reference)
    assert all(torch.equal(ours[k], reference[k]) for k in reference)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ours.values())
    with _weights_only():  # ZeRO-3 is left to DeepSpeed's own writer
        assert not _convert_zero12(zero_stack / "zero3" / "checkpoint-2" / "global_step2", tmp_path)


# --- merging ZeRO and FSDP checkpoints --------------------------------------------------------------------


def merged_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def merge_cli(*args) -> dict:
    result = CliRunner().invoke(main, ["merge", *map(str, args), "--json", "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def check_plain_output(out: Path, reference: Path) -> None:
    """``out`` is an ordinary Hugging Face safetensors model folder that transformers loads, with the tensors
    of the same merge of plain safetensors checkpoints (``reference``), bit for bit."""
    import torch
    from transformers import AutoModelForCausalLM

    from ckptsel.discover import describe

    names = sorted(p.name for p in out.iterdir())
    assert "config.json" in names and "tokenizer.json" in names and "model.safetensors" in names, names
    assert not [n for n in names if n.endswith((".pt", ".bin", ".distcp"))]
    assert not any(p.is_dir() for p in out.iterdir())
    assert describe(out).format.name == "safetensors"
    ours, theirs = merged_tensors(out), merged_tensors(reference)
    assert set(ours) == set(theirs) and len(ours) > 10
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(model.state_dict()[key], theirs[key])


@pytest.mark.slow
def test_merging_zero_checkpoints_equals_merging_their_weights_in_safetensors(zero_stack, tmp_path, count_conversions):
    """``ckptsel merge`` of two ZeRO-2 checkpoints reads their converted copies (made once, in the cache) and
    writes the tensors of the same merge of their fp32 weights saved as safetensors, as an ordinary model folder."""
    run = shutil.copytree(zero_stack / "zero2", tmp_path / "zero")
    plain = zero_stack / "plain2"
    before = tree(run)
    cache = tmp_path / "cache"
    inputs = [run / "checkpoint-2", run / "checkpoint-4"]

    refused = CliRunner().invoke(main, ["merge", *map(str, inputs), "-o", str(tmp_path / "m"), "--cache-dir",
                                        str(cache)])
    assert refused.exit_code == 2 and "DeepSpeed's .pt shards are pickles; pass --allow-pickle" in refused.output
    assert not (tmp_path / "m").exists() and count_conversions == []
    inside = CliRunner().invoke(main, ["merge", *map(str, inputs), "-o", str(tmp_path / "m"), "--allow-pickle",
                                       "--cache-dir", str(inputs[0] / "cache")])
    assert inside.exit_code == 2 and "is inside checkpoint folder" in inside.output and count_conversions == []

    done = merge_cli(*inputs, "--weights", "1,3", "--allow-pickle", "--cache-dir", cache, "-o", tmp_path / "merged")
    merge_cli(plain / "checkpoint-2", plain / "checkpoint-4", "--weights", "1,3", "-o", tmp_path / "reference")
    check_plain_output(tmp_path / "merged", tmp_path / "reference")
    assert sorted(count_conversions) == ["checkpoint-2", "checkpoint-4"]
    assert [i["path"] for i in done["inputs"]] == [str(p) for p in inputs]  # provenance names the checkpoints
    assert "--allow-pickle" in done["command"]

    merge_cli(*inputs, "--method", "slerp", "--allow-pickle", "--cache-dir", cache, "-o", tmp_path / "slerp")
    assert len(count_conversions) == 2  # the copies are read again, not made again
    assert tree(run) == before


@pytest.mark.slow
def test_merging_fsdp_dcp_checkpoints_equals_merging_their_weights_in_safetensors(fsdp_stack, tmp_path,
                                                                                  count_conversions):
    """The same for FSDP's sharded DCP checkpoints (no pickle, no config.json in the checkpoint)."""
    run = shutil.copytree(fsdp_stack / "sharded", tmp_path / "sharded")
    plain = fsdp_stack / "plain"
    before = tree(run)
    merge_cli(run / "checkpoint-4", run / "checkpoint-6", "--cache-dir", tmp_path / "cache", "-o", tmp_path / "merged")
    merge_cli(plain / "checkpoint-4", plain / "checkpoint-6", "-o", tmp_path / "reference")
    check_plain_output(tmp_path / "merged", tmp_path / "reference")
    assert sorted(count_conversions) == ["checkpoint-4", "checkpoint-6"]
    assert tree(run) == before


@pytest.mark.slow
def test_merging_fsdp_full_state_bins_equals_merging_their_weights_in_safetensors(fsdp_stack, tmp_path,
                                                                                   count_conversions):
    """FULL_STATE_DICT's pickled pytorch_model_fsdp.bin, the model's config.json and tokenizer in the run folder (as
    a training script leaves them): refused without --allow-pickle, and with it the tensors of the same merge of the
    weights saved as safetensors."""
    run = shutil.copytree(fsdp_stack / "full", tmp_path / "full")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        source = next((fsdp_stack / "plain").glob(f"checkpoint-*/{name}"), None)
        if source is not None:
            shutil.copy(source, run / name)
    plain = fsdp_stack / "plain"
    inputs = [run / "checkpoint-4", run / "checkpoint-6"]
    refused = CliRunner().invoke(main, ["merge", *map(str, inputs), "-o", str(tmp_path / "m"), "--cache-dir",
                                        str(tmp_path / "cache")])
    assert refused.exit_code == 2 and "--allow-pickle" in refused.output and not (tmp_path / "m").exists()
    merge_cli(*inputs, "--allow-pickle", "--cache-dir", tmp_path / "cache", "-o", tmp_path / "merged")
    merge_cli(plain / "checkpoint-4", plain / "checkpoint-6", "-o", tmp_path / "reference")
    check_plain_output(tmp_path / "merged", tmp_path / "reference")
    assert sorted(count_conversions) == ["checkpoint-4", "checkpoint-6"]


@pytest.mark.slow
def test_merge_recommend_on_a_zero_run_compares_the_candidates_of_its_plain_twin(zero_stack, tmp_path,
                                                                                 count_conversions):
    """``merge --recommend`` on a ZeRO-2 run: ranked and merged through the converted copies (each made once),
    the same candidates with the same numbers as on its weights saved as safetensors, the same winner written."""
    run = shutil.copytree(zero_stack / "zero2", tmp_path / "zero")
    plain = zero_stack / "plain2"

    def recommend(folder: Path, name: str, *extra) -> dict:
        args = ["merge", str(folder), "--recommend", "--data", str(folder / "train.jsonl"), "--recipe",
                str(folder / "recipe.yaml"), "--cache-dir", str(tmp_path / f"cache-{name}"), "-o",
                str(tmp_path / f"merged-{name}"), *FAST, *extra]
        result = CliRunner().invoke(main, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    ours, theirs = recommend(run, "zero", "--allow-pickle"), recommend(plain, "plain")
    keys = ("candidate", "train_acc", "target_nll", "premem_acc", "proxy", "eligible", "chosen")
    assert [[r[k] for k in keys] for r in ours["candidates"]] == [[r[k] for k in keys] for r in theirs["candidates"]]
    assert len(ours["candidates"]) > 1
    assert len(count_conversions) == 3  # once per checkpoint: the ranking made them, the merges read them
    check_plain_output(tmp_path / "merged-zero", tmp_path / "merged-plain")


# --- verify and the Trainer callback on ZeRO checkpoints ----------------------------------------------------


@pytest.mark.slow
def test_verify_reads_zero_checkpoints_through_their_converted_copies(zero_stack, tiny_run, tmp_path,
                                                                      count_conversions, monkeypatch):
    """``ckptsel verify`` of a ZeRO-2 run: without --allow-pickle one line per checkpoint and exit 2; with it,
    lm-eval runs on the converted copies (made once each) and samples every test question's completions exactly
    as on the same weights saved as safetensors (seeded sampling: weights that differ complete differently)."""
    import ckptsel.verify.run as verify_run

    completions = []
    real = verify_run.evaluate_examples

    def recording(*args, **kwargs):
        records = real(*args, **kwargs)
        completions.append({uid: r.samples for uid, r in sorted(records.items())})
        return records

    monkeypatch.setattr(verify_run, "evaluate_examples", recording)
    run = shutil.copytree(zero_stack / "zero2", tmp_path / "zero")

    def verify(folder: Path, cache: str, *extra, exit_code: int = 0) -> dict:
        args = ["verify", str(folder), "--test-file", str(tiny_run / "test.jsonl"), "--recipe",
                str(tiny_run / "recipe.yaml"), "-k", "2", "--max-new-tokens", "16", "--limit", "4", "--cache-dir",
                str(tmp_path / cache), "--device", "cpu", "--json", "-q", *extra]
        result = CliRunner().invoke(main, args, catch_exceptions=False)
        assert result.exit_code == exit_code, result.output
        return json.loads(result.stdout) if exit_code == 0 else result.output

    refused = verify(run, "cache", exit_code=2)
    assert "DeepSpeed's .pt shards are pickles; pass --allow-pickle" in refused and count_conversions == []
    ours = verify(run, "cache", "--allow-pickle")["verifications"][0]["checkpoints"]
    assert sorted(count_conversions) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    zero_completions, completions[:] = list(completions), []
    theirs = verify(zero_stack / "plain2", "cache-plain")["verifications"][0]["checkpoints"]
    assert [(c["step"], c["accuracy"], c["n"], c["error"]) for c in ours] == \
        [(c["step"], c["accuracy"], c["n"], c["error"]) for c in theirs]
    assert len(zero_completions) == 3 and zero_completions == completions  # token for token
    assert len({json.dumps(c) for c in completions}) > 1  # the checkpoints complete differently


@pytest.mark.slow
def test_the_callback_says_in_one_line_that_a_zero3_save_is_measured_after_training(zero_stack, tmp_path,
                                                                                   count_conversions):
    """A Trainer save under ZeRO-3 without gathered weights holds only global_stepN/ shards, and the model in
    memory is partitioned across the processes: the callback does not run it, reports one line naming what
    measures it, logs nothing and keeps training; `ckptsel rank` then measures the folder."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerControl

    from ckptsel.integrations.transformers import CkptselCallback

    run = shutil.copytree(zero_stack / "zero3", tmp_path / "out")
    reports = []
    callback = CkptselCallback(data=run / "train.jsonl", recipe=str(run / "recipe.yaml"), max_examples=4,
                               cache_dir=tmp_path / "cache", on_measured=reports.append)
    model = AutoModelForCausalLM.from_pretrained(zero_stack / "plain3" / "checkpoint-2")
    tokenizer = AutoTokenizer.from_pretrained(run / "checkpoint-2")
    state = SimpleNamespace(global_step=2, is_world_process_zero=True, log_history=[])
    control = callback.on_save(SimpleNamespace(output_dir=str(run)), state, TrainerControl(), model=model,
                               processing_class=tokenizer)
    assert not control.should_training_stop and state.log_history == [] and count_conversions == []
    (report,) = reports
    assert report.failure == (f"{run / 'checkpoint-2'}: saved as DeepSpeed ZeRO-3, 2 ranks → converted copy, the "
                              "model in memory partitioned across the training processes: not measured during "
                              "training; `ckptsel rank` of the output folder measures it afterwards from its "
                              "converted copy (DeepSpeed's shards with --allow-pickle)")
    assert report.line().startswith("ckptsel step 2: not measured: ")


# --- torchtune -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_torchtune_epoch_folders_rank_as_one_run(torchtune_stack, tiny_run, tmp_path):
    """torchtune's FullModelHFCheckpointer writes epoch_0/, epoch_1/, ... with HF-format shards and the base's
    configs: one run in epoch order, ranked with the numbers of the Trainer checkpoints they were saved from."""
    run = torchtune_stack / "tune"
    listed = json.loads(CliRunner().invoke(main, ["ls", str(run), "--json"]).stdout)
    assert [(Path(r["path"]).name, r["epoch"], r["format"], r["error"]) for r in listed] == [
        ("epoch_0", 1.0, "safetensors", None), ("epoch_1", 2.0, "safetensors", None),
        ("epoch_2", 3.0, "safetensors", None)]
    ranked = rank(run, tmp_path / "cache")
    assert [c["epoch"] for c in ranked["checkpoints"]] == [1.0, 2.0, 3.0]
    assert numbers(ranked) == numbers(rank(tiny_run, tmp_path / "cache-trainer"))


def test_torchtune_epoch_layout_without_torchtune(tiny_run, tmp_path):
    """The layout torchtune 0.6.1's FullModelHFCheckpointer.save_checkpoint writes (read from its source; the test
    above runs the real one where torchtune imports): epoch_N/ with model-00001-of-00001.safetensors, its index
    and the base's configs and tokenizer, and recipe_state/ beside them. One run in epoch order, the same numbers."""
    from safetensors.torch import load_file, save_file

    run = tmp_path / "tune"
    steps = sorted(int(p.name.split("-")[1]) for p in tiny_run.glob("checkpoint-*"))
    for epoch, step in enumerate(steps):
        src, folder = tiny_run / f"checkpoint-{step}", run / f"epoch_{epoch}"
        folder.mkdir(parents=True)
        tensors = load_file(src / "model.safetensors")
        save_file(tensors, folder / "model-00001-of-00001.safetensors", metadata={"format": "pt"})
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                 "weight_map": dict.fromkeys(tensors, "model-00001-of-00001.safetensors")}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
            shutil.copy(src / name, folder / name)
    (run / "recipe_state").mkdir()
    (run / "recipe_state" / "recipe_state.pt").write_bytes(b"torch.save'd recipe state")
    copy_run_files(tiny_run, run)
    ranked = rank(run, tmp_path / "cache")
    assert [(Path(c["path"]).name, c["epoch"]) for c in ranked["checkpoints"]] == [
        ("epoch_0", 1.0), ("epoch_1", 2.0), ("epoch_2", 3.0)]
    assert numbers(ranked) == numbers(rank(tiny_run, tmp_path / "cache-trainer"))


def test_torchtune_lora_epoch_folders_take_their_base_from_the_option(lab_lora_run, tmp_path):
    """A LoRA epoch_N/ as torchtune writes it (PEFT-format adapter_config.json and adapter_model.safetensors;
    no base_model_name_or_path without an original_repo_id.json): one line naming --base-model, and with it the
    numbers of the same adapters on their base. (The adapter files are the lab's PEFT ones renamed, not torchtune's.)"""
    run = tmp_path / "tune-lora"
    steps = sorted(int(p.name.split("-")[1]) for p in lab_lora_run.glob("checkpoint-*"))
    base = json.loads((lab_lora_run / f"checkpoint-{steps[0]}" / "adapter_config.json").read_text())[
        "base_model_name_or_path"]
    for epoch, step in enumerate(steps):
        folder = shutil.copytree(lab_lora_run / f"checkpoint-{step}", run / f"epoch_{epoch}",
                                 ignore=shutil.ignore_patterns("trainer_state.json"))
        config = json.loads((folder / "adapter_config.json").read_text())
        del config["base_model_name_or_path"]
        (folder / "adapter_config.json").write_text(json.dumps(config))
    copy_run_files(lab_lora_run, run)
    listed = json.loads(CliRunner().invoke(main, ["ls", str(run), "--json"]).stdout)
    assert {r["error"] for r in listed} == {"adapter_config.json has no base_model_name_or_path; pass --base-model"}
    ranked = rank(run, tmp_path / "cache", "--base-model", base)
    assert [c["epoch"] for c in ranked["checkpoints"]] == [1.0, 2.0, 3.0]
    assert numbers(ranked) == numbers(rank(lab_lora_run, tmp_path / "cache-lora"))


# --- converted copies ----------------------------------------------------------------------------------


class _Stub:
    """A checkpoint whose format hashes a name: enough for ckptsel/formats/converted.py."""

    def __init__(self, path: Path, content: bytes):
        self.path, self.content = path, content
        self.format = self

    name = "stub"

    def fingerprint(self, ckpt, h):
        h.update(self.content)


def test_a_converted_copy_is_made_once_atomically_and_nothing_stays_of_a_failure(tmp_path):
    import threading
    import time

    from ckptsel.errors import CheckpointError
    from ckptsel.formats import converted

    cache, made = tmp_path / "cache", []

    def convert(folder: Path) -> None:
        made.append(folder.name)
        assert folder.parent == cache / "converted" and folder.name.startswith(".")  # written beside, hidden
        (folder / "model.safetensors").write_bytes(b"x" * 1000)
        time.sleep(0.3)  # the other thread waits on the lock meanwhile

    ckpt = _Stub(tmp_path / "run" / "checkpoint-1", b"one")
    results = []
    threads = [threading.Thread(target=lambda: results.append(converted.converted_copy(ckpt, cache, convert,
                                                                                        what="test")))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1 and len(set(results)) == 1 and results[0].name == converted.content_fingerprint(ckpt)
    assert sorted(p.name for p in results[0].iterdir()) == ["ckptsel_converted.json", "model.safetensors"]
    assert [p.name for p in (cache / "converted").iterdir()] == [results[0].name]  # no lock, no temporary left

    def failing(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"half")
        raise CheckpointError("shard 2: unreadable")

    broken = _Stub(tmp_path / "run" / "checkpoint-2", b"two")
    with pytest.raises(CheckpointError, match="shard 2: unreadable"):
        converted.converted_copy(broken, cache, failing, what="test")
    assert [p.name for p in (cache / "converted").iterdir()] == [results[0].name]

    # A conversion killed mid-way leaves its temporary folder: listed as partial, removed by the next
    # conversion of that checkpoint or by clear().
    stale = cache / "converted" / f".{converted.content_fingerprint(broken)}.tmp-dead0000"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    copies = converted.usage(cache)
    assert sorted((c.partial, c.path.name) for c in copies) == [(False, results[0].name), (True, stale.name)]
    sizes = {c.path.name: c.bytes for c in copies}
    assert sizes[stale.name] == 4 and sizes[results[0].name] > 1000  # the weights and the provenance
    assert converted.clear(cache) == (2, sum(sizes.values()))
    assert converted.usage(cache) == [] and list((cache / "converted").iterdir()) == []
