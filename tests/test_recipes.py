"""Recipes: built-ins load and carry the paper's thresholds; bad files give one line naming file, line and field."""

from __future__ import annotations

import math

import pytest
from click.testing import CliRunner

from ckptsel import recipes
from ckptsel.cli import main
from ckptsel.cli.options import build_recipe
from ckptsel.errors import RecipeError
from ckptsel.recipes import builtin_recipes, load_recipe, override


def test_builtin_recipes_load_with_their_fields_graders_and_thresholds():
    assert {"gsm8k", "math", "metamath"} <= set(builtin_recipes())
    gsm8k, math_, metamath = load_recipe("gsm8k"), load_recipe("math"), load_recipe("metamath")

    assert (gsm8k.data.question_field, gsm8k.data.answer_field, gsm8k.data.grader) == ("question", "answer", "gsm8k")
    assert gsm8k.data.prompt_template == "Question: {question}\nAnswer:"
    assert gsm8k.data.target_template == " {answer}"
    assert (math_.data.question_field, math_.data.answer_field, math_.data.grader) == ("problem", "solution", "math")
    assert (metamath.data.question_field, metamath.data.answer_field) == ("query", "response")
    assert metamath.data.prompt_template.endswith("### Instruction:\n{query}\n\n### Response:")
    # nu = e^tau with Kang et al.'s tau = -2.3 (GSM8K) and -1.7 (MATH), to three decimals.
    assert gsm8k.memorization.threshold == pytest.approx(math.exp(-2.3), abs=5e-4)
    assert math_.memorization.threshold == pytest.approx(math.exp(-1.7), abs=5e-4)
    assert all(r.data.append_eos for r in (gsm8k, math_, metamath))


def test_recipe_from_a_path_takes_its_name_from_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("data:\n  prompt_template: \"Q: {question}\\nA:\"\n  grader: number\nsampling:\n  k: 3\n")
    recipe = load_recipe(str(path))
    assert recipe.name == "mine"
    assert recipe.data.prompt_template == "Q: {question}\nA:"
    assert (recipe.data.grader, recipe.sampling.k) == ("number", 3)


def test_unknown_key_names_file_line_and_field(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("name: typo\ndata:\n  grader: math\n  prompt_tempalte: 'x'\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value) == f"{path}:4: data.prompt_tempalte: unknown setting"


def test_bad_value_names_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("sampling:\n  k: 0\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml:2: sampling\.k: Input should be greater than or equal to 1"):
        load_recipe(path)


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\ndata: [unclosed\n")
    with pytest.raises(RecipeError, match=r"broken\.yaml:3: invalid YAML"):
        load_recipe(path)


def test_a_recipe_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="a recipe is a mapping of settings, got list"):
        load_recipe(path)


def test_unknown_name_and_missing_file():
    with pytest.raises(RecipeError, match=r"unknown recipe 'gsm9k' \(built in: .*gsm8k.*\)"):
        load_recipe("gsm9k")
    with pytest.raises(RecipeError, match="recipe file not found: nowhere/r.yaml"):
        load_recipe("nowhere/r.yaml")


def test_override_replaces_given_values_keeps_unset_ones_and_revalidates():
    recipe = load_recipe("gsm8k")
    changed = override(recipe, data={"grader": "math", "prompt_template": None}, sampling={"k": 2})
    assert (changed.data.grader, changed.sampling.k) == ("math", 2)
    assert changed.data.prompt_template == recipe.data.prompt_template
    assert recipe.data.grader == "gsm8k"  # the original is untouched
    with pytest.raises(RecipeError, match="options: sampling.top_p"):
        override(recipe, sampling={"top_p": 2.0})


def test_installed_layout_uses_the_packaged_recipes(tmp_path, monkeypatch):
    package = tmp_path / "site-packages" / "ckptsel"
    (package / "_recipes").mkdir(parents=True)
    (package / "_recipes" / "only.yaml").write_text("data:\n  grader: exact\n")
    (tmp_path / "site-packages" / "recipes").mkdir()  # someone else's folder: must be ignored
    monkeypatch.setattr(recipes, "_PACKAGE_DIR", package)
    assert list(builtin_recipes()) == ["only"]
    assert load_recipe("only").data.grader == "exact"


def test_a_recipes_folder_without_pyproject_is_not_ours(tmp_path, monkeypatch):
    package = tmp_path / "site-packages" / "ckptsel"
    package.mkdir(parents=True)
    (tmp_path / "site-packages" / "recipes").mkdir()
    monkeypatch.setattr(recipes, "_PACKAGE_DIR", package)
    with pytest.raises(RecipeError, match="built-in recipes not found"):
        builtin_recipes()


def test_cli_options_override_the_recipe_and_read_escapes():
    recipe = build_recipe(
        recipe_name="math", prompt_template=r"Q: {question}\n\tA:", target_template=None,
        system_prompt=None, grader="gsm8k", append_eos=False, question_field=None, answer_field=None, chat_template=None,
    )
    assert recipe.name == "math"
    assert recipe.data.prompt_template == "Q: {question}\n\tA:"
    assert recipe.data.target_template == " {solution}"
    assert (recipe.data.grader, recipe.data.append_eos, recipe.data.question_field) == ("gsm8k", False, "problem")
    assert build_recipe(prompt_template=r"a\\nb").data.prompt_template == "a\\nb"


def test_cli_bad_recipe_is_one_line_exit_2(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "q", "answer": "#### 1"}\n')
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  nope: 1\n")
    result = CliRunner().invoke(main, ["data", str(data), "--recipe", str(bad)])
    assert result.exit_code == 2
    assert result.output.strip() == f"Error: {bad}:2: data.nope: unknown setting"
