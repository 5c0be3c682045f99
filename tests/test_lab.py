"""The lab: tasks, splits, tokenizer, training, ground truth, grids, and the CLI on a tiny grid."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
from click.testing import CliRunner

from ckptsel.errors import RecipeError
from ckptsel.graders import get as get_grader
from ckptsel.lab.grid import load_grid
from ckptsel.lab.splits import make_splits
from ckptsel.lab.summary import nll_rise, overmemorized, phenomena, summarize
from ckptsel.lab.tasks import FAMILIES

GSM8K = get_grader("gsm8k")


def _value(line: str) -> int:
    """The value of one trace line: an expression of +, -, * over integers, or max(...)."""
    assert re.fullmatch(r"max\(\d+(,\d+)*\)|\d+([+*-]\d+)*", line), f"unexpected trace line {line!r}"
    if line.startswith("max("):
        return max(int(x) for x in line[4:-1].split(","))
    return eval(line, {"__builtins__": {}})  # digits and + - * only (checked above)


def _n_terms(line: str) -> int:
    return len(re.findall(r"\d+", line))


@pytest.mark.parametrize("name", sorted(set(FAMILIES) - {"modadd"}))
def test_every_trace_is_valid_and_gradeable(name):
    family = FAMILIES[name]
    rng = random.Random(0)
    several = 0
    for _ in range(40):
        problem = family.draw(rng)
        traces = family.traces(problem)
        assert family.trace(problem, rng) in traces
        several += len(traces) >= 2
        for trace in traces:
            *lines, last = trace.split("\n")
            assert last == f"#### {problem.value}"
            assert GSM8K.extract(trace) == str(problem.value)
            # Every line is an equivalent expression, one term shorter than the one before.
            assert [_value(line) for line in lines] == [problem.value] * len(lines)
            counts = [_n_terms(line) for line in lines]
            assert counts == sorted(counts, reverse=True) and len(set(counts)) == len(counts)
            assert not counts or counts[-1] == 2
        perturbed = family.perturb(problem, rng)
        assert perturbed.value == problem.value and perturbed.key == problem.key
    assert several >= 35, "most questions must have several valid traces"


def test_sum_traces_are_every_merge_order():
    problem = FAMILIES["sum"]._problem((1, 2, 4, 8))
    traces = FAMILIES["sum"].traces(problem)
    assert "3+4+8\n7+8\n#### 15" in traces and "1+2+12\n1+14\n#### 15" in traces
    assert len(traces) == 6  # (4-1)! merge orders, all distinct here


def test_modadd_is_one_symbol_per_operand_and_splits_by_unordered_pair():
    family = FAMILIES["modadd"]
    problem = family._problem(12, 4)
    assert problem.question == "m+e=?" and family.traces(problem) == [f"#### {16 % family.p}"]
    assert GSM8K.extract(family.trace(problem, random.Random(0))) == str(problem.value)
    assert family.perturb(problem, random.Random(0)).question == "e+m=?"
    train, test = make_splits(["modadd"], 150, 80, seed=0)

    def pair(question: str) -> tuple[str, ...]:  # "m+e=?" -> ("e", "m"): the problem up to operand order
        return tuple(sorted(question[:3].split("+")))

    assert len({pair(r.question) for r in test}) == 80
    assert not {pair(r.question) for r in test} & {pair(r.question) for r in train}


def test_word_problem_never_goes_negative():
    family = FAMILIES["word"]
    rng = random.Random(1)
    for _ in range(100):
        problem = family.draw(rng)
        for trace in family.traces(problem):
            for line in trace.split("\n")[:-1]:
                for k in range(1, _n_terms(line) + 1):  # every prefix of the expression
                    prefix = re.match(r"\d+([+-]\d+){%d}" % (k - 1), line).group(0)
                    assert _value(prefix) >= 0, (trace, prefix)


def _problem_keys(rows) -> set:
    """What identifies a problem regardless of wording: the multiset of its signed operands."""
    keys = set()
    for r in rows:
        numbers = [int(x) for x in re.findall(r"\d+", r.question)]
        if r.family == "word":
            signs = [1] + [1 if w == "got" else -1 for w in re.findall(r"got|lost", r.question)]
            numbers = [numbers[0], *sorted(s * n for s, n in zip(signs[1:], numbers[1:]))]
        else:
            numbers = sorted(numbers)
        keys.add((r.family, tuple(numbers)))
    return keys


def test_splits_are_disjoint_nested_and_seeded():
    families = ["sum", "word", "max", "product"]
    train_small, test_a = make_splits(families, 30, 20, seed=3)
    train_big, test_b = make_splits(families, 90, 20, seed=3)
    assert test_a == test_b, "the test split must not depend on the training size"
    assert train_big[:30] == train_small, "a smaller training set is a prefix of a larger one"
    assert not _problem_keys(train_big) & _problem_keys(test_a)
    _, test_other_seed = make_splits(families, 30, 20, seed=4)
    assert test_other_seed != test_a
    for row in train_big:
        assert GSM8K(row.answer, f"#### {row.value}")
        assert row.alternative != row.answer
        assert row.perturbed != row.question or row.family in ("sum", "product", "max")


def test_splits_refuse_more_problems_than_exist():
    with pytest.raises(RecipeError, match="distinct problems"):
        make_splits(["product"], 500, 10, seed=0)


def test_tokenizer_round_trip_with_bos_and_eos(tokenizer):
    row = make_splits(["word"], 1, 1, seed=0)[0][0]
    text = f"{row.question}\n{row.answer}"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2
    assert len(ids) == len(text) + 1  # one token per character
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_encode_masks_the_prompt_and_appends_eos(tokenizer):
    from ckptsel.lab.train import encode

    row = make_splits(["sum"], 1, 1, seed=0)[0][0]
    (feature,) = encode(tokenizer, [row])
    n_prompt = len(row.question) + 2  # BOS + question + newline
    assert feature["labels"][:n_prompt] == [-100] * n_prompt
    assert feature["labels"][n_prompt:] == feature["input_ids"][n_prompt:]
    assert feature["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(feature["input_ids"][n_prompt:-1]) == row.answer


def test_micro_run_writes_trainer_checkpoints_and_ground_truth(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ckptsel.lab.ground_truth import read_ground_truth
    from ckptsel.lab.quick import train_tiny_run

    run = train_tiny_run(tmp_path / "run", n_train=32, epochs=2, n_checkpoints=2, ground_truth=True)
    steps = sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))
    assert steps == [2, 4]  # 32 examples / batch 16 = 2 steps per epoch, 2 epochs
    ckpt = run / "checkpoint-4"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert model.config.architectures == ["LlamaForCausalLM"]
    assert AutoTokenizer.from_pretrained(ckpt).eos_token_id == 2
    for name in ("train.jsonl", "test.jsonl", "recipe.yaml"):
        assert (run / name).exists()
    truth = read_ground_truth(run)
    assert sorted(truth["checkpoints"], key=int) == ["2", "4"]
    point = truth["checkpoints"]["4"]
    assert len(point["per_example"]["test_accuracy"]) == 16 and len(point["per_example"]["train_nll"]) == 8
    assert 0.5 < point["test_nll"] < 5.0  # a barely trained character model: well above 0, below ln(vocab)
    assert 0.0 <= point["test_accuracy"] <= 1.0


def test_recipe_beside_the_run_renders_data_as_trained(tmp_path):
    import yaml

    from ckptsel.lab.train import ckptsel_recipe
    from ckptsel.settings import Recipe

    recipe = Recipe.model_validate(yaml.safe_load(yaml.safe_dump(ckptsel_recipe("x").model_dump(mode="json"))))
    assert recipe.data.prompt_template == "{question}\n" and recipe.data.append_eos
    assert recipe.data.grader == "gsm8k"


def test_lora_run_points_at_an_absolute_base(tmp_path):
    from ckptsel.lab.ground_truth import load_checkpoint
    from ckptsel.lab.quick import train_tiny_run

    run = train_tiny_run(tmp_path, mode="lora", kind="moe", n_train=32, epochs=1, n_checkpoints=1)
    config = json.loads((run / "checkpoint-2" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "base" / "final").resolve())
    model = load_checkpoint(run / "checkpoint-2")
    assert model.base_model.model.config.num_experts == 4


# ---- grids ---------------------------------------------------------------------------


def _write(tmp_path, text):
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return path


def test_grid_expands_the_product_of_axes(tmp_path):
    grid = load_grid(
        _write(
            tmp_path,
            "name: g\ndefaults: {n_test: 10}\naxes:\n  lr: [0.001, 0.003]\n  n_train: [50, 100]\n  model.kind: [dense, moe]\n"
            "runs:\n  - {name: extra, epochs: 3}\n",
        )
    )
    runs = grid.expand()
    assert len(runs) == 9
    assert runs["lr0.003-n100-moe"].model.kind == "moe" and runs["lr0.003-n100-moe"].n_train == 100
    assert runs["extra"].epochs == 3 and runs["extra"].n_test == 10
    assert runs["extra"].model.kind == "dense", "an axis must not leak into other runs"


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: g\naxes:\n  lr: [0.001, -1]\n", r"line 3: field axes\.lr: .*greater than 0"),
        ("name: g\nbogus: 1\n", r"line 2: field bogus: Extra inputs"),
        ("name: g\ndefaults:\n  families: [sum, nope]\n", r"line 3: field defaults\.families: .*unknown \['nope'\]"),
        ("name: g\nruns:\n  - {name: a, mode: lora, init: base}\n", r"line 3: field runs\.0\.init: no base named 'base'"),
        ("name: g\nruns:\n  - {name: a, mode: lora}\n", r"line 3: field runs\.0: .*needs a pretrained base"),
        ("name: g\nbases:\n  b: {init: x}\n", r"line 3: field bases: .*base 'b' must be trained from scratch"),
        ("name: [g\n", r"line 2: invalid YAML"),
        ("- just\n- a list\n", r"a grid is a YAML mapping"),
    ],
)
def test_grid_errors_name_the_line_and_field(tmp_path, text, message):
    with pytest.raises(RecipeError, match=message):
        load_grid(_write(tmp_path, text))


def test_bundle_axis_moves_fields_together(tmp_path):
    grid = load_grid(
        _write(tmp_path, "name: g\naxes:\n  lr: [0.001]\n  data:\n    - {n_train: 50, epochs: 40}\n    - {n_train: 500, epochs: 4}\n")
    )
    runs = grid.expand()
    assert sorted(runs) == ["lr0.001-n50-e40", "lr0.001-n500-e4"]
    assert runs["lr0.001-n500-e4"].epochs == 4 and runs["lr0.001-n50-e40"].n_train == 50


def test_runs_on_a_base_take_its_architecture(tmp_path):
    grid = load_grid(
        _write(
            tmp_path,
            "name: g\nbases:\n  moe-base: {model: {kind: moe, hidden_size: 48}}\n"
            "defaults: {init: moe-base}\naxes:\n  mode: [full, lora]\n",
        )
    )
    runs = grid.expand()
    assert sorted(runs) == ["full", "lora"]
    assert runs["lora"].model.kind == "moe" and runs["lora"].model.hidden_size == 48 and runs["lora"].init == "moe-base"


def test_builtin_grids_validate():
    from ckptsel.recipes import recipes_dir

    grids = sorted((recipes_dir() / "lab").glob("*.yaml"))
    assert {g.stem for g in grids} >= {"main", "ci"}
    assert len(load_grid(recipes_dir() / "lab" / "main.yaml").expand()) >= 12


# ---- summaries (pure functions, hand-made curves) --------------------------------------


def test_nll_rise_is_relative_to_the_running_minimum():
    np.testing.assert_allclose(nll_rise([2.0, 1.0, 1.5, 0.8, 1.2]), [1.0, 1.0, 1.5, 1.0, 1.5])


def test_overmemorized_needs_both_the_rise_and_the_accuracy():
    acc = np.array([0.2, 0.80, 0.82, 0.70, 0.79])
    nll = np.array([1.0, 0.40, 0.45, 0.60, 0.60])
    # step 3: NLL 1.5x min but accuracy 0.12 below best; step 4: 1.5x and within 0.05 of 0.82
    assert overmemorized(acc, nll).tolist() == [False, False, False, False, True]
    # the same curves at a tenth of the accuracy: memorising without ever solving is not stage (c)
    assert not overmemorized(acc / 10, nll).any()


def test_summarize_and_phenomena():
    def truth(accs, nlls, train_acc, copy):
        points = {
            str(s): {"step": s, "test_accuracy": a, "test_nll": n, "train_accuracy": train_acc, "train_copy_rate": copy}
            for s, a, n in zip((10, 20, 30), accs, nlls)
        }
        return {"checkpoints": points}

    mem = summarize("mem", truth([0.1, 0.15, 0.1], [1.0, 0.9, 1.1], 0.9, 0.8))
    good = summarize("good", truth([0.3, 0.8, 0.79], [0.5, 0.3, 0.4], 0.85, 0.1))
    good2 = summarize("good2", truth([0.3, 0.7, 0.7], [0.5, 0.3, 0.39], 0.75, 0.1))
    assert mem.gap == pytest.approx(0.8) and good.overmemorized_steps == [30]
    assert good2.overmemorized_steps == [30] and good2.max_nll_rise == pytest.approx(1.3)
    checks = phenomena([mem, good, good2])
    assert checks["accuracy_spread"]["value"] == pytest.approx(0.69) and checks["accuracy_spread"]["ok"]
    assert checks["memorising_runs"]["runs"] == ["mem"]
    assert checks["overmemorized_runs"]["runs"] == ["good", "good2"] and checks["overmemorized_runs"]["ok"]


# ---- CLI ---------------------------------------------------------------------------------

_TINY_GRID = """\
name: tiny
ground_truth: {sampling: {k: 2}, n_train_eval: 4, batch_size: 64}
defaults:
  n_test: 6
  epochs: 1
  batch_size: 16
  n_checkpoints: 2
  model: {hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 32}
axes:
  n_train: [16, 32]
"""


def test_cli_lab_run_is_resumable_and_tabulates(tmp_path):
    from ckptsel.cli import main

    grid = _write(tmp_path, _TINY_GRID)
    out = tmp_path / "out"
    (out / ".partial" / "n32").mkdir(parents=True)
    (out / ".partial" / "n32" / "checkpoint-999").mkdir()  # debris of an interrupted run
    runner = CliRunner()
    result = runner.invoke(main, ["lab", "run", str(grid), "--out", str(out), "--json", "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["runs"] == {
        "n16": {"status": "done", "message": json.loads(result.stdout)["runs"]["n16"]["message"]},
        "n32": {"status": "done", "message": json.loads(result.stdout)["runs"]["n32"]["message"]},
    }
    assert sorted(p.name for p in (out / "n32").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not (out / ".partial" / "n32").exists()

    again = runner.invoke(main, ["lab", "run", str(grid), "--out", str(out), "--json", "-q"])
    assert {r["status"] for r in json.loads(again.stdout)["runs"].values()} == {"skipped"}

    table = runner.invoke(main, ["lab", "table", str(out), "--json"])
    assert table.exit_code == 0, table.output
    rows = json.loads(table.stdout)["runs"]
    assert [r["run"] for r in rows] == ["n16", "n32"] and rows[1]["steps"] == 2


def test_cli_lab_run_refuses_a_changed_spec(tmp_path):
    from ckptsel.cli import main

    out = tmp_path / "out"
    (out / "n16").mkdir(parents=True)
    (out / "n16" / "run.json").write_text(json.dumps({"spec": {"n_train": 999}}))
    result = CliRunner().invoke(main, ["lab", "run", str(_write(tmp_path, _TINY_GRID)), "--out", str(out), "-q"])
    assert result.exit_code == 2
    assert "other settings" in result.output


def test_cli_demo_on_a_tiny_grid(tmp_path, monkeypatch):
    """The demo trains, lists, ranks beside the truth, and ends with the report written and named."""
    import ckptsel.cli.demo as demo_module
    from ckptsel.cli import main

    grid = tmp_path / "demo.yaml"
    grid.write_text(_TINY_GRID.replace("axes:\n  n_train: [16, 32]\n", "runs:\n  - {name: demo, n_train: 32}\n"))
    monkeypatch.setattr(demo_module, "DEMO_GRID", str(grid))
    monkeypatch.setattr(demo_module, "DEMO_EXAMPLES", 6)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["demo", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "2 checkpoints" in result.stdout  # ckptsel ls on the trained run
    assert "held-out" in result.stdout and "pre-mem acc" in result.stdout  # prediction beside the truth
    assert "ckptsel rank: 2 checkpoint(s), 6 example(s)" in result.output
    report = out / "report.html"
    assert report.is_file() and "<title>ckptsel demo: demo</title>" in report.read_text()
    assert f"report written to {report}" in result.output
    assert "ckptsel verify" in result.output and "--recommend" in result.output  # what to try next
    assert (out / "demo" / "ground_truth.json").exists()
    # The callback measured each save during training (one line each), into the demo's store.
    assert result.output.count("ckptsel step ") == 2 and "pre-mem acc" in result.output.split("2/4")[0]
    run = out / "demo"
    again = CliRunner().invoke(main, ["rank", str(run), "--data", str(run / "train.jsonl"), "--recipe",
                                      str(run / "recipe.yaml"), "--max-examples", "6", "--cache-dir",
                                      str(out / "cache"), "--json", "--quiet"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["cache"] == {"measured": 0, "from_cache": 2}


def test_grokking_grid_trains_a_quick_variant_that_rank_measures_with_pathways(tmp_path):
    """recipes/lab/grokking.yaml: its runs, shrunk to seconds, train and rank with pathway metrics."""
    from ckptsel.cli import main
    from ckptsel.lab.ground_truth import read_ground_truth, write_ground_truth
    from ckptsel.lab.quick import TINY_MOE
    from ckptsel.lab.train import train_run
    from ckptsel.recipes import recipes_dir

    grid = load_grid(recipes_dir() / "lab" / "grokking.yaml")
    runs = grid.expand()
    grokking = {n: s for n, s in runs.items() if n.startswith("grok")}
    assert len(grokking) >= 3 and len({s.seed for s in grokking.values()}) == len(grokking)
    for spec in runs.values():
        assert spec.families == ["modadd"] and spec.model.kind == "moe" and spec.n_checkpoints >= 20
        assert spec.batch_size >= spec.n_train  # full batch: one step per epoch
    main_spec = next(iter(grokking.values()))
    controls = [s for n, s in runs.items() if n not in grokking]
    assert main_spec.weight_decay > 0 and any(s.weight_decay == 0 for s in controls)
    assert any(s.n_train < main_spec.n_train for s in controls) and any(s.n_train > main_spec.n_train for s in controls)

    quick = main_spec.model_copy(update={"model": TINY_MOE, "n_train": 40, "n_test": 12, "epochs": 6, "n_checkpoints": 3})
    run = train_run(quick, tmp_path / "run", name="grok-quick")
    write_ground_truth(run, grid.ground_truth)
    truth = read_ground_truth(run)["checkpoints"]
    assert sorted(truth, key=int) == ["2", "4", "6"]
    assert all(0.0 <= c["test_accuracy"] <= 1.0 for c in truth.values())

    args = ["rank", str(run), "--data", str(run / "train.jsonl"), "--recipe", str(run / "recipe.yaml"),
            "--temperature", "0", "--threshold", "1000", "--cache-dir", str(tmp_path / "cache"), "--json", "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["checkpoints"]
    assert [r["step"] for r in rows] == [2, 4, 6]
    for row in rows:
        assert row["pathways"]["n_examples"] == 40
        assert row["pathways"]["distance"] >= 0 and 0 <= row["pathways"]["complexity"] <= 2


def test_a_run_recorded_before_a_new_spec_field_matches_at_its_default(tmp_path):
    from ckptsel.lab.runner import RUN_FILE, _check_same_spec
    from ckptsel.lab.train import TrainSpec

    spec = TrainSpec()
    old = {k: v for k, v in spec.model_dump(mode="json").items() if k not in ("decay_norms", "adam_beta2")}
    (tmp_path / RUN_FILE).write_text(json.dumps({"spec": old}))
    _check_same_spec(tmp_path, spec)  # the fields it lacks are at their defaults: the same run
    with pytest.raises(RecipeError, match="other settings"):
        _check_same_spec(tmp_path, spec.model_copy(update={"decay_norms": True}))
