"""`ckptsel gate`: exit codes, candidates, policy files and their validation errors.

The measurement is replaced by a made-up ranking (three checkpoints: underfit, generalizing,
over-memorized), so these tests are about the gate's decisions; the gate on a real trained
run is tested end to end in test_rank.py.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from ckptsel.cli import main
from ckptsel.discover import Run
from ckptsel.pipeline import MeasuredRun, RankResult
from ckptsel.policy import GateRules, Policy, PolicyError, evaluate, load_policy
from ckptsel.select import CheckpointMetrics, Ranking, Threshold
from ckptsel.stages import Flag


def _ranking(paths) -> Ranking:
    flag = Flag(0.95, 0.95, 0.05, 0.9, 0.5, "alt_nll", 0.8, 0.5, 1.6, 0.25)
    rows = []
    for i, (path, stage, pm, mem, ratio) in enumerate(
        zip(paths, ["underfit", "generalizing", "over-memorized"], [0.2, 0.5, 0.52], [0.0, 0.4, 0.9], [1.0, 1.0, 1.6])
    ):
        rows.append(CheckpointMetrics(index=i, path=str(path), step=i + 1, epoch=None, train_loss=None, fingerprint=f"f{i}",
                                      premem_ci=(pm - 0.05, pm + 0.05), stage=stage, flag=flag if i == 2 else None,
                                      values={"train_acc": 0.3 + 0.3 * i, "premem_acc": pm, "memorized_frac": mem,
                                              "proxy_ratio": ratio}))
    return Ranking(rows, Threshold("nll", 0.1, 0.1), 10, recommended=1, rule="rule", proxy="alt_nll")


@pytest.fixture()
def fake(monkeypatch, tmp_path):
    """A run folder of three (empty) checkpoints; measuring it returns the made-up ranking."""
    from ckptsel.cli import measuring as rank_cli

    run = tmp_path / "run"
    for step in (1, 2, 3):
        (run / f"checkpoint-{step}").mkdir(parents=True)
    (tmp_path / "train.jsonl").write_text('{"question": "1+1=?", "answer": "#### 2"}\n')
    calls = []

    def run_ranking(request, *, command, quiet):
        checkpoints = [c for r in request.runs for c in r.checkpoints]
        calls.append(SimpleNamespace(checkpoints=checkpoints, overmem=request.recipe.stages, request=request))
        ranking = _ranking([c.path for c in checkpoints])
        ranking.checkpoints = ranking.checkpoints[: len(checkpoints)]
        collected = SimpleNamespace(failures={}, settings_key="k", loaded=len(checkpoints),
                                    measured=set(range(len(checkpoints))))
        measured = MeasuredRun(Run("run", run, list(checkpoints)), request.data, collected)
        return RankResult(ranking, [measured], request.recipe, len(checkpoints))

    monkeypatch.setattr(rank_cli, "run_ranking", run_ranking)
    return SimpleNamespace(run=run, data=tmp_path / "train.jsonl", calls=calls, dir=tmp_path)


def gate(fake, *args, path=None):
    argv = ["gate", str(path or fake.run), "--data", str(fake.data), "--cache-dir", str(fake.dir / "cache"), *args]
    return CliRunner().invoke(main, argv)


def test_last_checkpoint_flagged_fails_with_exit_1_and_the_reason(fake):
    result = gate(fake, "--json")
    assert result.exit_code == 1, result.output
    out = json.loads(result.stdout)
    assert out["passed"] is False and out["candidate"]["step"] == 3
    assert out["reasons"] == [out["candidate"]["flag"]["reason"]]
    assert "alt_nll 0.800 = 1.60×" in out["reasons"][0]
    plain = gate(fake)
    assert plain.exit_code == 1 and "FAIL" in plain.stdout and "not_overmemorized" in plain.stdout


def test_passes_with_exit_0(fake):
    assert gate(fake, "--allow-overmemorized").exit_code == 0
    result = gate(fake, "--candidate", "recommended", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["candidate"]["step"] == 2
    explicit = gate(fake, "--candidate", str(fake.run / "checkpoint-2"), "--min-premem-acc", "0.45")
    assert explicit.exit_code == 0, explicit.output


def test_thresholds_fail_with_the_numbers(fake):
    result = gate(fake, "--candidate", "recommended", "--min-premem-acc", "0.6", "--max-memorized", "0.3", "--json")
    assert result.exit_code == 1
    out = json.loads(result.stdout)
    assert out["reasons"] == ["predicted test accuracy 0.500 (must be ≥ 0.6)", "memorised fraction 0.400 (must be ≤ 0.3)"]


def test_drop_from_the_recommended_checkpoint_names_both_values():
    # The underfit checkpoint (0.2) against the recommended one (step 2, 0.5): a drop of 0.3.
    (check,) = [c for c in evaluate(_ranking(["a", "b", "c"]), 0, GateRules(max_drop_from_recommended=0.05))
                if c.name == "max_drop_from_recommended"]
    assert not check.passed and check.value == pytest.approx(0.3)
    assert check.detail == "predicted accuracy drop from the recommended step 2 (0.500 − 0.200) = 0.300 (must be ≤ 0.05)"


def test_one_checkpoint_is_judged_with_its_earlier_siblings_as_history(fake):
    result = gate(fake, "--json", path=fake.run / "checkpoint-2")
    assert result.exit_code == 0, result.output
    assert [c.path.name for c in fake.calls[-1].checkpoints] == ["checkpoint-1", "checkpoint-2"]
    assert json.loads(result.stdout)["candidate"]["step"] == 2


def test_policy_file_sets_candidate_rules_and_stage_thresholds(fake):
    policy = fake.dir / "policy.yaml"
    policy.write_text("candidate: recommended\nrules:\n  min_premem_acc: 0.45\nstages:\n  proxy_rise: 0.5\n")
    result = gate(fake, "--policy", str(policy), "--json")
    assert result.exit_code == 0, result.output
    assert fake.calls[-1].overmem.proxy_rise == 0.5
    assert json.loads(result.stdout)["policy"]["stages"]["proxy_rise"] == 0.5  # the thresholds applied
    # An option overrides the file.
    assert gate(fake, "--policy", str(policy), "--min-premem-acc", "0.55").exit_code == 1


def test_recipe_stages_apply_and_the_policy_overrides_only_what_it_sets(fake):
    recipe = fake.dir / "recipe.yaml"
    recipe.write_text("data: {grader: gsm8k}\nstages: {acc_margin: 0.07, proxy_rise: 0.4}\n")
    assert gate(fake, "--recipe", str(recipe)).exit_code == 1
    assert (fake.calls[-1].overmem.acc_margin, fake.calls[-1].overmem.proxy_rise) == (0.07, 0.4)
    policy = fake.dir / "policy.yaml"
    policy.write_text("stages:\n  proxy_rise: 0.5\n")
    assert gate(fake, "--recipe", str(recipe), "--policy", str(policy), "--proxy", "perturb_nll").exit_code == 1
    applied = fake.calls[-1].overmem
    assert (applied.acc_margin, applied.proxy_rise, applied.proxy) == (0.07, 0.5, "perturb_nll")


@pytest.mark.parametrize(
    "text, message",
    [
        ("candidate: last\nrules:\n  min_premem: 0.3\n", "policy.yaml:3: rules.min_premem: unknown setting"),
        ("rules:\n  max_memorized_frac: lots\n", "policy.yaml:2: rules.max_memorized_frac:"),
        ("stages:\n  acc_margin: 2\n", "policy.yaml:2: stages.acc_margin: Input should be less than or equal to 1"),
        ("candidate: best\n", "policy.yaml:1: candidate:"),
        ("rules: [1, 2\n", "policy.yaml:2: invalid YAML"),
        ("- a list\n", "a policy is a mapping"),
    ],
)
def test_invalid_policy_is_one_line_exit_2(fake, text, message):
    policy = fake.dir / "policy.yaml"
    policy.write_text(text)
    result = gate(fake, "--policy", str(policy))
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not fake.calls  # nothing was measured


def test_usage_and_input_errors_exit_2(fake):
    assert CliRunner().invoke(main, ["gate", str(fake.run)]).exit_code == 2  # --data missing
    assert gate(fake, "--policy", str(fake.dir / "missing.yaml")).exit_code == 2
    wrong = gate(fake, "--candidate", str(fake.dir))
    assert wrong.exit_code == 2 and "not a checkpoint of" in wrong.output


def test_a_candidate_that_could_not_be_measured_is_exit_2(fake, monkeypatch):
    from ckptsel.cli import measuring as rank_cli

    measure = rank_cli.run_ranking

    def failing(*args, **kwargs):
        run = measure(*args, **kwargs)
        run.ranking.checkpoints[-1].error = "checkpoint-3: cannot load"
        return run

    monkeypatch.setattr(rank_cli, "run_ranking", failing)
    result = gate(fake)
    assert result.exit_code == 2 and "candidate could not be measured" in result.output


def test_evaluate_fails_a_rule_whose_number_is_missing(tmp_path):
    ranking = _ranking(["a", "b", "c"])
    ranking.checkpoints[1].proxy_ratio = math.nan
    checks = evaluate(ranking, 1, GateRules(max_proxy_ratio=1.5))
    assert [(c.name, c.passed) for c in checks] == [("not_overmemorized", True), ("max_proxy_ratio", False)]
    assert "unmeasured" in checks[1].detail


def test_load_policy_defaults_and_errors(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(PolicyError, match="empty policy file"):  # a gate that checks nothing passes everything
        load_policy(empty)
    only_stages = tmp_path / "stages.yaml"
    only_stages.write_text("stages:\n  proxy_rise: 0.5\n")
    assert load_policy(only_stages).rules == Policy().rules  # the default rule: fail when over-memorized
    with pytest.raises(PolicyError, match="cannot read policy"):
        load_policy(tmp_path / "nope.yaml")


def test_the_example_ci_policy_is_valid():
    from pathlib import Path

    policy = load_policy(Path(__file__).resolve().parents[1] / "recipes" / "ci" / "policy.yaml")
    assert policy.candidate == "last"
    assert (policy.rules.min_premem_acc, policy.rules.max_drop_from_recommended) == (0.30, 0.05)
    assert policy.stages.proxy_rise == 0.25
