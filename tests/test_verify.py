"""ckptsel verify: the lm-eval task built offline, greedy results equal ckptsel's own sampler, the cache, the CLI."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
from click.testing import CliRunner

from ckptsel.cli import main
from ckptsel.verify import compare


@pytest.fixture(scope="module")
def lab_run(tmp_path_factory):
    """A tiny lab run: two checkpoints, train.jsonl, test.jsonl, recipe.yaml."""
    from ckptsel.lab.quick import train_tiny_run

    return train_tiny_run(tmp_path_factory.mktemp("lab") / "run", n_train=32, n_test=8, epochs=1, n_checkpoints=2)


def _examples(path, recipe_path, tokenizer):
    from ckptsel.data import load_data
    from ckptsel.recipes import load_recipe

    return load_data(path, load_recipe(recipe_path), tokenizer=tokenizer).examples


def _ckptsel_greedy(checkpoint, prompts, keys, budget):
    """ckptsel's own greedy decoding (the lab's ground-truth engine) on one checkpoint."""
    from ckptsel.measure.loading import CheckpointLoader
    from ckptsel.measure.sampling import sample_completions
    from ckptsel.settings import SamplingSettings

    with CheckpointLoader("cpu", "float32") as loader:
        loaded = loader.load(checkpoint)
        out = sample_completions(loaded.model, loaded.tokenizer, prompts, sampling=SamplingSettings(temperature=0),
                                 max_new_tokens=budget, keys=keys)
    return [group[0] for group in out]


# --------------------------------------------------------------------------- the task


def test_task_builds_offline_and_grades_with_ckptsel_grader(monkeypatch, tokenizer, lab_run):
    import datasets

    from ckptsel import graders
    from ckptsel.settings import SamplingSettings
    from ckptsel.verify import harness

    def no_network(*args, **kwargs):
        raise AssertionError(f"tried to open a connection: {args}")

    def no_download(*args, **kwargs):
        raise AssertionError("tried datasets.load_dataset")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(datasets, "load_dataset", no_download)
    examples = _examples(lab_run / "test.jsonl", lab_run / "recipe.yaml", tokenizer)
    task = harness.build_task(examples, graders.get("gsm8k"), SamplingSettings(k=3, temperature=0.8), 40)

    docs = list(task.eval_docs)
    assert [d["uid"] for d in docs] == [ex.uid for ex in examples]
    assert task.doc_to_text(docs[0]) == examples[0].prompt  # the prompt exactly as trained
    assert task.config.repeats == 3
    kwargs = task.config.generation_kwargs
    assert kwargs["do_sample"] is True and kwargs["temperature"] == 0.8 and kwargs["top_p"] == 0.95
    assert kwargs["top_k"] == 0 and kwargs["until"] == [] and kwargs["max_gen_toks"] == 40
    ref = examples[0].reference
    answer = ref.rsplit("#### ", 1)[1]
    # the grader is the metric: 2 of 3 samples reach the reference answer
    scored = task.process_results(docs[0], [[f"x\n#### {answer}", "#### -1", f"#### {answer}"]])
    assert scored == {"acc": pytest.approx(2 / 3)}

    greedy = harness.build_task(examples, graders.get("gsm8k"), SamplingSettings(temperature=0), 40)
    assert greedy.config.repeats == 1 and greedy.config.generation_kwargs["do_sample"] is False


# --------------------------------------------------------------------------- greedy: exact agreement


def test_greedy_verify_equals_ckptsel_greedy_sampling_on_lab_run(tmp_path, tokenizer, lab_run):
    from ckptsel.discover import discover
    from ckptsel.graders import get
    from ckptsel.recipes import load_recipe, override
    from ckptsel.store import Store
    from ckptsel.verify import verify_file

    checkpoints = discover([lab_run])
    recipe = override(load_recipe(lab_run / "recipe.yaml"), sampling={"temperature": 0.0})
    examples = _examples(lab_run / "test.jsonl", lab_run / "recipe.yaml", tokenizer)
    budget = 40
    with Store.open(tmp_path / "cache") as store:
        result = verify_file(checkpoints, examples, recipe, store, source="test.jsonl", engine=_cpu(),
                             max_new_tokens=budget)
        grade = get("gsm8k")
        for ckpt, measured in zip(checkpoints, result.checkpoints):
            ours = _ckptsel_greedy(ckpt, [ex.prompt for ex in examples], [ex.uid for ex in examples], budget)
            stored = store.get_many(measured.fingerprint, result.settings_key, "verify", [ex.uid for ex in examples])
            assert [stored[ex.uid].samples[0] for ex in examples] == ours  # token for token
            expected = np.mean([grade(text, ex.reference) for text, ex in zip(ours, examples)])
            assert measured.accuracy == pytest.approx(expected, abs=1e-12)
            assert measured.n == len(examples) and measured.error is None


def test_greedy_verify_exact_on_known_answers(tmp_path, tokenizer, tiny_llama_dir):
    """A random-weights model's own greedy outputs as the answers of half the rows: accuracy exactly 0.5."""
    from ckptsel.data import load_data
    from ckptsel.discover import discover
    from ckptsel.settings import DataSettings, Recipe, SamplingSettings
    from ckptsel.store import Store
    from ckptsel.verify import verify_file

    recipe = Recipe(data=DataSettings(question_field="q", answer_field="a", prompt_template="{q}=",
                                      target_template="{a}", grader="exact"),
                    sampling=SamplingSettings(temperature=0))
    questions = ["12+7", "3*9", "hello", "x", "answer me", "7-7", "(1+2)*3", "abc def"]
    ckpt = discover([tiny_llama_dir])[0]
    keys = [f"k{i}" for i in range(len(questions))]
    greedy = _ckptsel_greedy(ckpt, [f"{q}=" for q in questions], keys, 12)
    assert len({g.strip() for g in greedy}) > 2  # the outputs differ: agreement below is not trivial
    rows = [{"q": q, "a": g if i % 2 == 0 else "no such answer"} for i, (q, g) in enumerate(zip(questions, greedy))]
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_data(test, recipe, tokenizer=tokenizer).examples
    with Store.open(tmp_path / "cache") as store:
        result = verify_file([ckpt], examples, recipe, store, source=str(test), engine=_cpu(), max_new_tokens=12)
    assert result.checkpoints[0].accuracy == 0.5


def test_greedy_verify_exact_on_a_lora_adapter(tmp_path, tokenizer, tiny_llama_dir):
    """A LoRA checkpoint (random, non-zero adapter on the tiny base) goes through lm-eval as a PeftModel."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ckptsel.data import load_data
    from ckptsel.discover import discover
    from ckptsel.settings import DataSettings, Recipe, SamplingSettings
    from ckptsel.store import Store
    from ckptsel.verify import verify_file

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(tmp_path / "adapter")
    (ckpt,) = discover([tmp_path / "adapter"])
    assert ckpt.kind == "adapter"
    recipe = Recipe(data=DataSettings(question_field="q", answer_field="a", prompt_template="{q}=",
                                      target_template="{a}", grader="exact"),
                    sampling=SamplingSettings(temperature=0))
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"q": q, "a": "1"}) + "\n" for q in ["1+1", "2*8", "abc", "ten"]))
    examples = load_data(test, recipe, tokenizer=tokenizer).examples
    with Store.open(tmp_path / "cache") as store:
        result = verify_file([ckpt], examples, recipe, store, source=str(test), engine=_cpu(), max_new_tokens=10)
        stored = store.get_many(result.checkpoints[0].fingerprint, result.settings_key, "verify",
                                [ex.uid for ex in examples])
    ours = _ckptsel_greedy(ckpt, [ex.prompt for ex in examples], [ex.uid for ex in examples], 10)
    assert [stored[ex.uid].samples[0] for ex in examples] == ours
    plain = _ckptsel_greedy(discover([tiny_llama_dir])[0], [ex.prompt for ex in examples], ["x"] * 4, 10)
    assert ours != plain  # the adapter is really applied


def _cpu():
    from ckptsel.settings import EngineSettings

    return EngineSettings(device="cpu", dtype="float32")


# --------------------------------------------------------------------------- store, CLI


def test_cli_verify_pairs_predictions_and_reuses_the_store(tmp_path, lab_run, monkeypatch):
    from ckptsel.discover import discover
    from ckptsel.verify import harness

    checkpoints = discover([lab_run])
    ranking = {"checkpoints": [{"path": str(c.path), "step": c.step, "premem_acc": 0.1 * (i + 1),
                                "premem_ci": [0.0, 0.5]} for i, c in enumerate(checkpoints)]}
    (tmp_path / "rank.json").write_text(json.dumps(ranking))
    args = ["verify", str(lab_run), "--test-file", str(lab_run / "test.jsonl"), "--recipe", str(lab_run / "recipe.yaml"),
            "--greedy", "--max-new-tokens", "24", "--ranking", str(tmp_path / "rank.json"), "--cache-dir",
            str(tmp_path / "cache"), "--device", "cpu", "--json", "-q"]
    evaluated = []
    real_build = harness.build_task
    monkeypatch.setattr(harness, "build_task", lambda ex, *a, **k: evaluated.append(len(ex)) or real_build(ex, *a, **k))

    first = CliRunner().invoke(main, [*args, "--limit", "3"])
    assert first.exit_code == 0, first.output
    assert evaluated == [3, 3]
    second = CliRunner().invoke(main, args)  # 8 questions: only the 5 new ones run
    assert second.exit_code == 0, second.output
    assert evaluated == [3, 3, 5, 5]
    out = json.loads(second.stdout)["verifications"][0]
    assert out["mode"] == "greedy" and out["n_examples"] == 8 and out["max_new_tokens"] == 24
    assert [c["predicted"] for c in out["checkpoints"]] == [0.1, 0.2]
    assert [c["n"] for c in out["checkpoints"]] == [8, 8]
    third = CliRunner().invoke(main, args)  # everything cached: no lm-eval at all
    assert third.exit_code == 0 and evaluated == [3, 3, 5, 5]
    assert all(c["from_cache"] for c in json.loads(third.stdout)["verifications"][0]["checkpoints"])
    assert json.loads(third.stdout)["verifications"][0]["checkpoints"] == [
        {**c, "from_cache": True} for c in out["checkpoints"]
    ]


def test_cli_verify_refuses_a_test_row_longer_than_the_context(tmp_path, lab_run, monkeypatch):
    """The test rows are prepared as training rows are (ckptsel.prepare.checked_rows): one longer than the
    model's context is one line naming the file and row before lm-eval runs; --skip-bad drops it."""
    from ckptsel.verify import harness

    rows = [json.loads(line) for line in (lab_run / "test.jsonl").read_text().splitlines()]
    rows[1] = {**rows[1], "question": "1+" * 400 + "1=?"}
    test = tmp_path / "long.jsonl"
    test.write_text("".join(json.dumps(r) + "\n" for r in rows))
    evaluated = []
    monkeypatch.setattr(harness, "build_task", lambda ex, *a, **k: evaluated.append(len(ex)) or 1 / 0)
    args = ["verify", str(lab_run), "--test-file", str(test), "--recipe", str(lab_run / "recipe.yaml"), "--greedy",
            "--max-new-tokens", "8", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and evaluated == []
    assert f"{test}:2: " in result.output and "longer than the model's context" in result.output


def test_cli_named_task_from_include_path(tmp_path, lab_run):
    """A named lm-eval task (local YAML, local data through the json builder) runs offline."""
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny.yaml").write_text(
        "task: tiny_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {lab_run / 'test.jsonl'}\ntest_split: test\noutput_type: generate_until\n"
        'doc_to_text: "{{question}}\\n"\ndoc_to_target: "{{answer}}"\n'
        "generation_kwargs:\n  until: []\n  do_sample: false\n  max_gen_toks: 8\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    result = CliRunner().invoke(main, ["verify", str(lab_run / "checkpoint-1"), "--tasks", "tiny_local",
                                       "--include-path", str(tmp_path / "tasks"), "--limit", "2", "--cache-dir",
                                       str(tmp_path / "cache"), "--device", "cpu", "--json", "-q"])
    assert result.exit_code == 0, result.output
    (v,) = json.loads(result.stdout)["verifications"]
    assert v["source"] == "tiny_local" and v["metric"] == "exact_match,none"
    assert v["checkpoints"][0]["n"] == 2 and v["checkpoints"][0]["accuracy"] == 0.0


@pytest.mark.parametrize("extra", [[], ["--test-file", "t.jsonl", "--tasks", "gsm8k"]])
def test_cli_needs_exactly_one_test_source(tmp_path, extra):
    result = CliRunner().invoke(main, ["verify", str(tmp_path), *extra])
    assert result.exit_code == 2
    assert "exactly one of --test-file or --tasks" in result.output


# --------------------------------------------------------------------------- the comparison math


def test_agreement_on_hand_made_numbers():
    a = compare.agreement([0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.5])
    # Σ(y - x)² = 0.01; Σ(y - ȳ)² = 0.0875
    assert a.r2_identity == pytest.approx(1 - 0.01 / 0.0875)
    assert a.spearman == pytest.approx(1.0)
    assert a.mean_abs_error == pytest.approx(0.025)
    assert a.n == 4


def test_agreement_needs_three_pairs_and_skips_missing():
    a = compare.agreement([0.1, None, 0.3], [0.2, 0.5, None])
    assert a.n == 1 and a.r2_identity is None and a.spearman is None
    assert a.mean_abs_error == pytest.approx(0.1)


def test_interval_is_a_bootstrap_over_questions():
    per_example = np.array([[1, 0, 1, 1, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0]], dtype=float)
    acc, lo, hi = compare.accuracy_with_interval(per_example)
    assert acc.tolist() == [0.75, 0.0]
    assert 0.25 <= lo[0] < 0.75 < hi[0] <= 1.0
    assert lo[1] == hi[1] == 0.0


def test_predictions_pair_by_fingerprint_before_path(tmp_path):
    from ckptsel.select import Ranking

    rows = [{"path": str(tmp_path / "a"), "fingerprint": "f1", "premem_acc": 0.3},
            {"path": str(tmp_path / "b"), "fingerprint": "f2", "premem_acc": 0.4}]
    ranking = Ranking.from_json({"checkpoints": rows})
    index = compare.predictions_from_ranking(ranking)
    assert compare.lookup(index, "f2", tmp_path / "moved").premem_acc == 0.4
    assert compare.lookup(index, None, tmp_path / "a").premem_acc == 0.3
    assert compare.lookup(index, "unknown", tmp_path / "c") is None


def test_evaluate_skips_lm_evals_environment_report(monkeypatch):
    """No git subprocess (its "fatal: not a git repository" reached users) and no 2 s collect_env per call."""
    from lm_eval import evaluator

    from ckptsel.verify import harness

    originals = evaluator.get_git_commit_hash, evaluator.add_env_info

    def fake_simple_evaluate(**kwargs):
        storage = {"git_hash": evaluator.get_git_commit_hash()}
        evaluator.add_env_info(storage)
        return storage

    monkeypatch.setattr(evaluator, "simple_evaluate", fake_simple_evaluate)
    assert harness.evaluate(object(), []) == {"git_hash": None}
    assert (evaluator.get_git_commit_hash, evaluator.add_env_info) == originals  # restored after the call
