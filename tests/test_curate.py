"""Data curation (ckptsel.curate, `ckptsel curate`): the order, the pool, and the command on real runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from ckptsel import curate
from ckptsel.cli import main
from ckptsel.data import Example, Row
from ckptsel.errors import CkptselError


def _ex(i: int) -> Example:
    return Example(i, f"u{i}", f"question {i}", "ref", f"q{i}", f"t{i}")


def _measured(n: int, premem, acc=None, nll=None) -> curate.Measured:
    premem = np.asarray(premem, dtype=float)
    return curate.Measured([_ex(i) for i in range(n)], premem, np.asarray(acc if acc is not None else premem, float),
                           np.asarray(nll if nll is not None else np.zeros(n), float), [None] * n)


def test_premem_puts_the_least_learned_first_and_unmeasured_rows_last():
    rows = [_ex(i) for i in range(5)]
    order = curate.prioritize(rows, _measured(3, [0.8, 0.1, 0.5]), "premem")
    assert [p.index for p in order[:3]] == [1, 2, 0] and [p.priority for p in order] == [1, 2, 3, 4, 5]
    assert {p.index for p in order[3:]} == {3, 4} and not any(p.measured for p in order[3:])
    assert order[0].premem_acc == 0.1 and order[4].premem_acc is None


def test_each_strategy_orders_by_its_own_number():
    m = _measured(3, premem=[0.1, 0.5, 0.9], acc=[0.9, 0.2, 0.5], nll=[0.3, 0.1, 2.0])
    rows = [_ex(i) for i in range(3)]
    assert [p.index for p in curate.prioritize(rows, m, "train-acc")] == [1, 2, 0]
    assert [p.index for p in curate.prioritize(rows, m, "loss")] == [2, 0, 1]
    orders = {tuple(p.index for p in curate.prioritize([_ex(i) for i in range(40)], _measured(40, [0.5] * 40), "iid",
                                                       seed)) for seed in (0, 0, 1)}
    assert len(orders) == 2  # seeded: the same seed, the same order; another seed, another
    with pytest.raises(CkptselError, match="unknown strategy"):
        curate.prioritize(rows, m, "random")


def test_ties_are_broken_at_random_so_equal_examples_share_the_budget():
    firsts = {curate.prioritize([_ex(i) for i in range(4)], _measured(4, [0.0] * 4), "premem", seed)[0].index
              for seed in range(20)}
    assert len(firsts) > 1


def test_take_top_and_fraction():
    order = curate.prioritize([_ex(i) for i in range(10)], _measured(10, np.linspace(0, 1, 10)))
    assert [p.index for p in curate.take(order, top=3)] == [0, 1, 2]
    assert len(curate.take(order, fraction=0.25)) == 3  # rounded up
    with pytest.raises(CkptselError, match="not both"):
        curate.take(order, top=1, fraction=0.5)


def _pool(*sources) -> list[Row]:
    return [Row(n, f"pool.jsonl:{n + 1}", {"question": f"new {n}", "source": s}) for n, s in enumerate(sources)]


def test_the_pool_goes_to_the_first_sources_one_candidate_per_round():
    order = curate.prioritize([_ex(i) for i in range(3)], _measured(3, [0.9, 0.1, 0.5]))  # order: 1, 2, 0
    pool = _pool("u1", "u1", "u1", "question 2", "u0")  # by uid, or by the question's text
    two = curate.choose_from_pool(pool, order, 2)
    assert [r.values["source"] for r in two.rows] == ["u1", "question 2"] and two.sources == 2
    four = curate.choose_from_pool(pool, order, 4)
    assert [r.values["source"] for r in four.rows] == ["u1", "question 2", "u0", "u1"]  # round 2: the first again
    again = curate.choose_from_pool(pool, order, 4)
    assert [r.index for r in again.rows] == [r.index for r in four.rows]  # seeded


def test_a_pool_row_naming_no_training_row_is_one_line_or_skipped():
    order = curate.prioritize([_ex(0)], _measured(1, [0.5]))
    with pytest.raises(CkptselError, match=r"pool.jsonl:2: source 'nope' matches no training row"):
        curate.choose_from_pool(_pool("u0", "nope"), order, 1)
    choice = curate.choose_from_pool(_pool("u0", "nope"), order, 5, skip_bad=True)
    assert len(choice.rows) == 1 and len(choice.unmatched) == 1


# --------------------------------------------------------------------------- the command


def _args(run, cache, *extra):
    return ["curate", str(run), "--data", str(run / "train.jsonl"), "--recipe", str(run / "recipe.yaml"),
            "--cache-dir", str(cache), "--max-examples", "8", "-k", "3", "--quiet", *extra]


def _rank(run, cache):
    result = CliRunner().invoke(main, ["rank", str(run), "--data", str(run / "train.jsonl"), "--recipe",
                                       str(run / "recipe.yaml"), "--cache-dir", str(cache), "--max-examples", "8",
                                       "-k", "3", "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_curate_a_ranked_run_reads_the_store_and_writes_every_row(learning_run, tmp_path):
    ranking = _rank(learning_run, tmp_path / "cache")
    out = tmp_path / "priorities.jsonl"
    result = CliRunner().invoke(main, [*_args(learning_run, tmp_path / "cache", "-o", str(out)), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["checkpoints_loaded"] == 0  # ranked before: nothing measured again
    assert summary["step"] == ranking["recommended"]["step"]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    n_train = len(learning_run.joinpath("train.jsonl").read_text().splitlines())
    assert len(rows) == n_train and summary["measured"] == 8 and summary["unmeasured"] == n_train - 8
    measured = [r for r in rows if r["measured"]]
    assert [r["priority"] for r in rows] == list(range(1, n_train + 1)) and rows[:8] == measured
    values = [r["premem_acc"] for r in measured]
    assert values == sorted(values)  # lowest pre-memorization accuracy first


def test_curate_top_writes_training_rows_as_they_are_and_datasets_loads_them(learning_run, tmp_path):
    import datasets

    out = tmp_path / "hard.jsonl"
    result = CliRunner().invoke(main, [*_args(learning_run, tmp_path / "cache", "--top", "3", "-o", str(out))])
    assert result.exit_code == 0, result.output
    train = [json.loads(line) for line in learning_run.joinpath("train.jsonl").read_text().splitlines()]
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(written) == 3 and all(row in train for row in written)  # the file's own rows, untouched
    assert datasets.load_dataset("json", data_files=str(out), split="train").column_names == list(train[0])
    assert "come after the 8 measured ones" in result.stdout


def test_curate_with_a_pool_on_a_sweep_and_a_lora_run(sweep, lab_lora_run, tmp_path):
    for run, name in ((sweep, "late"), (lab_lora_run, None)):
        train = [json.loads(line) for line in (run / (name or ".") / "train.jsonl").read_text().splitlines()]
        pool = tmp_path / f"pool-{name}.jsonl"
        pool.write_text("".join(json.dumps({"question": r["question"] + " (again)", "answer": r["answer"],
                                            "source": r["question"]}) + "\n" for r in train)
                        + json.dumps({"question": "?", "answer": "1", "source": "not in the data"}) + "\n")
        out = tmp_path / f"new-{name}.jsonl"
        data = ["--data-per-run", "train.jsonl"] if name else ["--data", str(run / "train.jsonl")]
        args = ["curate", str(run), *data, "--recipe", str((run / name if name else run) / "recipe.yaml"),
                "--cache-dir", str(tmp_path / "cache"), "--max-examples", "6", "-k", "2", "--quiet",
                "--pool", str(pool), "--budget", "4", "-o", str(out), "--json", *(["--run", name] if name else [])]
        bad = CliRunner().invoke(main, args)
        assert bad.exit_code == 2 and "matches no training row" in bad.output and "--skip-bad" in bad.output
        result = CliRunner().invoke(main, [*args, "--skip-bad"])
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)
        assert summary["written"] == 4 and len(summary["unmatched_pool_rows"]) == 1
        assert (summary["run"] == name) if name else True
        written = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(written) == 4 and all(w["question"].endswith("(again)") for w in written)


def test_curate_usage_errors_are_one_line(learning_run, tmp_path):
    for extra, message in ((["--pool", "x.jsonl"], "--pool and --budget go together"),
                           (["--checkpoint", "999999"], "no measured checkpoint at step 999999"),
                           (["--top", "2", "--fraction", "0.5"], "not both")):
        result = CliRunner().invoke(main, [*_args(learning_run, tmp_path / "cache", "-o", str(tmp_path / "o.jsonl")),
                                           *extra])
        assert result.exit_code == 2 and message in result.output, result.output
