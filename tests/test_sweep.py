"""Sweeps: the ranking rule over arrays (ckptsel.sweep), and `ckptsel rank` of a folder of runs."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ckptsel import columns, metrics
from ckptsel.cli import main
from ckptsel.settings import MemorizationSettings, OvermemSettings
from ckptsel.sweep import RunArrays, gap_between, rank_sweep, shared_columns

pytestmark = pytest.mark.filterwarnings("ignore")


# --------------------------------------------------------------------------- the rule over arrays


def _run(name, acc, nll, **kw):
    acc = np.asarray(acc, dtype=float)
    return RunArrays(name=name, steps=list(range(1, acc.shape[0] + 1)), acc=acc, nll=np.asarray(nll, dtype=float), **kw)


def test_history_stays_inside_each_run():
    # Run a answers example 0 right before memorising it; run b starts memorised and never earns credit.
    a = _run("a", [[1.0, 0.0], [1.0, 0.5]], [[0.5, 0.5], [0.01, 0.5]])
    b = _run("b", [[1.0, 0.5]], [[0.01, 0.5]])
    result = rank_sweep([a, b], recipe="gsm8k")
    pm = {(r.name, step): pm for r in result.runs for step, pm in zip(r.steps, r.columns["premem_acc"])}
    assert pm[("a", 2)] == pytest.approx(metrics.premem_accuracy(a.acc, a.nll, 0.1)[-1]) == pytest.approx(0.75)
    # The same last checkpoint, without a's history: example 0 was never answered unmemorised.
    assert pm[("b", 1)] == pytest.approx(0.25)
    assert [r.name for r in result.runs] == ["a", "b"] and result.threshold.used == 0.1


def test_sweep_pick_is_the_most_accurate_run_and_each_run_keeps_its_own():
    rng = np.random.default_rng(0)
    low = _run("low", rng.uniform(0.0, 0.4, (3, 200)), np.full((3, 200), 1.0))
    high = _run("high", rng.uniform(0.4, 0.9, (3, 200)), np.full((3, 200), 1.0))
    result = rank_sweep([low, high], recipe="gsm8k")
    assert result.recommended[0] == "high"
    assert result.runs[result.recommended_run].name == "high"
    for rr in result.runs:  # each run's own pick is the single-run rule on that run alone
        alone = rank_sweep([low if rr.name == "low" else high], recipe="gsm8k")
        assert rr.recommended == alone.runs[0].recommended
        assert alone.recommended == (rr.name, rr.steps[rr.recommended])
    assert sum(r.recommended is not None for r in result.runs) == 2
    assert "across runs" in result.rule


def test_within_the_noise_the_lower_proxy_rise_wins():
    rng = np.random.default_rng(1)
    acc = rng.uniform(0.4, 0.6, (3, 50))
    nll = np.full((3, 50), 1.0)
    flat = np.ones((3, 50))
    rising = np.ones((3, 50)) * np.array([[1.0], [1.1], [1.2]])  # rises, but not enough to flag (1.25x)
    a = _run("rising", acc, nll, heldout=rising, examples=[str(i) for i in range(50)])
    b = _run("flat", acc + 0.001, nll, heldout=flat, examples=[str(i) for i in range(50)])
    overmem = OvermemSettings(proxy_tie=0.0)
    result = rank_sweep([a, b], memorization=MemorizationSettings(), overmem=overmem)
    picks = {rr.name: rr.recommended for rr in result.runs}
    ratios = {rr.name: rr.columns["proxy_ratio"][picks[rr.name]] for rr in result.runs}
    assert ratios["flat"] < ratios["rising"] or picks["rising"] == 0
    assert result.recommended[0] == "flat"
    # Far apart in accuracy, the more accurate run wins whatever its proxy.
    far = _run("rising", acc + 0.3, nll, heldout=rising, examples=[str(i) for i in range(50)])
    assert rank_sweep([far, b], overmem=overmem).recommended[0] == "rising"


def test_paired_where_runs_share_examples_unpaired_otherwise():
    a = _run("a", [[1.0, 0.0, 1.0]], [[1.0] * 3], examples=["x", "y", "z"])
    b = _run("b", [[0.0, 1.0, 1.0]], [[1.0] * 3], examples=["z", "x", "w"])
    left, right = shared_columns(a, b)
    assert [a.examples[i] for i in left] == [b.examples[j] for j in right] == ["x", "z"]
    assert shared_columns(a, _run("c", [[1.0] * 3], [[1.0] * 3])) is None  # no ids: not paired
    few = _run("d", [[1.0] * 5], [[1.0] * 5], examples=["x", "p", "q", "r", "s"])
    assert shared_columns(a, few) is None  # one shared example of three: not a paired comparison
    ra, rb = (rank_sweep([r], recipe="gsm8k").runs[0] for r in (a, b))
    gap, se = gap_between(a, ra, b, rb)
    d = np.array([1.0 - 1.0, 1.0 - 0.0])  # x: 1 vs 1, z: 1 vs 0
    assert gap == pytest.approx(d.mean()) and se == pytest.approx(d.std(ddof=1) / np.sqrt(2))
    c = _run("c", [[1.0, 1.0, 0.0, 0.0]], [[1.0] * 4])
    rc = rank_sweep([c], recipe="gsm8k").runs[0]
    gap, se = gap_between(a, ra, c, rc)
    va, vc = np.array([1.0, 0.0, 1.0]), np.array([1.0, 1.0, 0.0, 0.0])
    assert gap == pytest.approx(va.mean() - vc.mean())
    assert se == pytest.approx(np.sqrt(va.var(ddof=1) / 3 + vc.var(ddof=1) / 4))


def test_threshold_auto_pools_the_sweep_and_falls_back_to_the_recipe_when_nothing_copies():
    nll = np.array([[0.5, 0.4], [0.05, 0.3]])
    copies = np.array([[0.0, 0.0], [1.0, 0.0]])
    a = _run("a", np.ones((2, 2)), nll, copy=copies)
    b = _run("b", np.ones((2, 2)), nll * 2, copy=np.zeros((2, 2)))
    pooled = rank_sweep([a, b], recipe="gsm8k", threshold="auto")
    expected = metrics.calibrate_threshold(np.concatenate([nll.ravel(), (nll * 2).ravel()]),
                                           np.concatenate([copies.ravel(), np.zeros(4)])).threshold
    assert pooled.threshold.used == pytest.approx(expected) and not pooled.threshold.fell_back
    assert all(rr.threshold == pytest.approx(expected) for rr in pooled.runs)
    # Per run: run b has no copying pair, so it falls back to the recipe's nu, with a warning.
    per_run = rank_sweep([a, b], recipe="gsm8k", threshold="auto", threshold_scope="run")
    assert per_run.threshold.per_run["b"] == 0.1 and per_run.threshold.fell_back
    assert per_run.threshold.per_run["a"] == pytest.approx(metrics.calibrate_threshold(nll, copies).threshold)
    assert any("run b" in w and "0.1" in w for w in per_run.warnings)
    # Nothing copies anywhere: the sweep falls back too, rather than stopping.
    none = rank_sweep([b], recipe="gsm8k", threshold="auto")
    assert none.threshold.used == 0.1 and none.threshold.fell_back and "could not be fitted" in none.warnings[0]


def test_bad_arrays_are_named():
    with pytest.raises(ValueError, match="run x: acc and nll"):
        rank_sweep([RunArrays("x", [1], np.ones((1, 3)), np.ones((1, 2)))])
    with pytest.raises(ValueError, match="unique"):
        rank_sweep([_run("x", [[1.0]], [[1.0]]), _run("x", [[1.0]], [[1.0]])])
    with pytest.raises(ValueError, match="2 steps for 1"):
        rank_sweep([RunArrays("x", [1, 2], np.ones((1, 3)), np.ones((1, 3)))])


# --------------------------------------------------------------------------- ckptsel rank SWEEP


FAST = ["--max-examples", "6", "-k", "2", "--quiet"]


def _rank(sweep, cache, *extra, recipe=None):
    recipe = recipe or sweep / "full" / "recipe.yaml"
    args = ["rank", str(sweep), "--recipe", str(recipe), "--cache-dir", str(cache), *FAST, *extra]
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_rank_of_a_sweep_ranks_every_run_and_picks_one(sweep, tmp_path):
    result = _rank(sweep, tmp_path, "--data-per-run", "train.jsonl", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    runs = [r["run"] for r in out["checkpoints"]]
    assert runs == ["early"] * 2 + ["full"] * 4 + ["late"] * 2
    assert [r["name"] for r in out["runs"]] == ["early", "full", "late"]
    # Four distinct checkpoints: the copies share fingerprints, so each is measured once.
    assert out["cache"]["measured"] == 4
    rows = {(r["run"], r["step"]): r for r in out["checkpoints"]}
    # The same checkpoint with the same history: the same numbers; without its history: its own.
    assert rows[("early", 80)]["premem_acc"] == rows[("full", 80)]["premem_acc"]
    assert rows[("late", 120)]["train_acc"] == rows[("full", 120)]["train_acc"]
    assert rows[("late", 160)]["premem_acc"] <= rows[("full", 160)]["premem_acc"]
    rec = out["recommended"]
    assert rec["path"] in [r["path"] for r in out["checkpoints"]]
    assert any(r["recommended"]["path"] == rec["path"] for r in out["runs"])  # the sweep picks a run's pick

    # rank_sweep reproduces it from the stored arrays alone.
    from ckptsel.store import Store

    from ckptsel.collect import select_examples
    from ckptsel.data import load_examples
    from ckptsel.recipes import load_recipe
    from ckptsel.settings import SelectionSettings

    recipe = load_recipe(str(sweep / "full" / "recipe.yaml"))
    uids = [ex.uid for ex in select_examples(load_examples(sweep / "full" / "train.jsonl", recipe),
                                             SelectionSettings(max_examples=6))]
    arrays = []
    with Store.open(tmp_path) as store:
        for run in out["runs"]:
            own = [r for r in out["checkpoints"] if r["run"] == run["name"]]
            fps = [r["fingerprint"] for r in own]
            read = lambda kind, field: store.matrix(fps, out["settings_key"], kind, uids, field)  # noqa: E731
            arrays.append(RunArrays(run["name"], [r["step"] for r in own], read("sample", "acc"), read("score", "nll"),
                                    copy=read("sample", "copy_rate"), examples=uids))
    again = rank_sweep(arrays, recipe=recipe)
    assert [pm for r in again.runs for pm in r.columns["premem_acc"]] == pytest.approx(
        [r["premem_acc"] for r in out["checkpoints"]])
    assert [s for r in again.runs for s in r.stages] != [] and again.recommended[0] in {"early", "full", "late"}


def test_one_data_file_for_every_run_and_the_table(sweep, tmp_path):
    table = _rank(sweep, tmp_path, "--data", str(sweep / "full" / "train.jsonl"))
    assert table.exit_code == 0, table.output
    assert "3 runs" in table.stdout and "recommended:" in table.stdout and "run " in table.stdout
    assert table.stdout.count("☆") >= 2  # the other runs' own picks, listed
    listed = CliRunner().invoke(main, ["ls", str(sweep)])
    assert listed.exit_code == 0 and "in 3 runs" in listed.stdout and "early" in listed.stdout


def test_data_per_run_missing_file_names_the_run(sweep, tmp_path):
    broken = tmp_path / "sweep"
    shutil.copytree(sweep, broken)
    (broken / "late" / "train.jsonl").unlink()
    result = _rank(broken, tmp_path / "cache", "--data-per-run", "train.jsonl")
    assert result.exit_code == 2
    assert "run late" in result.output and "train.jsonl" in result.output and "Traceback" not in result.output
    neither = CliRunner().invoke(main, ["rank", str(sweep), "--cache-dir", str(tmp_path)])
    assert neither.exit_code == 2 and "--data-per-run" in neither.output


def test_threshold_auto_on_a_sweep_falls_back_with_a_warning(sweep, tmp_path):
    early = tmp_path / "early-only"
    shutil.copytree(sweep / "early", early / "early")
    shutil.copytree(sweep / "early", early / "again")
    result = _rank(early, tmp_path / "c", "--data-per-run", "train.jsonl", "--threshold", "auto", "--json",
                   recipe=early / "early" / "recipe.yaml")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["threshold"]["used"] == 0.1 and out["threshold"]["fell_back"]
    assert any("could not be fitted" in w for w in out["warnings"])


def test_gate_on_a_sweep_judges_the_sweeps_pick(sweep, tmp_path):
    args = ["gate", str(sweep), "--data-per-run", "train.jsonl", "--recipe", str(sweep / "full" / "recipe.yaml"),
            "--cache-dir", str(tmp_path), *FAST, "--allow-overmemorized", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["candidate"]["path"] == out["ranking"]["recommended"]["path"]


def test_report_of_a_sweep_shows_the_runs_side_by_side_with_their_truth(sweep, tmp_path):
    import re

    root = tmp_path / "sweep"
    shutil.copytree(sweep, root)
    for name, accs in (("early", {40: 0.11, 80: 0.22}), ("late", {120: 0.33, 160: 0.44})):
        points = {str(step): {"step": step, "test_accuracy": acc} for step, acc in accs.items()}
        (root / name / "ground_truth.json").write_text(json.dumps({"checkpoints": points}))
    out = tmp_path / "report.html"
    args = ["report", str(root), "--data-per-run", "train.jsonl", "--recipe", str(root / "full" / "recipe.yaml"),
            "--cache-dir", str(tmp_path / "cache"), *FAST, "-o", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    html = out.read_text()
    assert "Runs side by side" in html and "in 3 runs" in html
    # One line per run on the sweep's charts; the truth of two runs in the scatter, matched by run and step.
    chart = html[html.index('id="fig-sweep-premem-acc"'):]
    chart = chart[: chart.index("</figure>")]
    assert set(re.findall(r'data-series="([a-z]+)', chart)) == {"early", "full", "late"}
    scatter = html[html.index('id="fig-predicted-vs-measured"'):]
    scatter = scatter[: scatter.index("</figure>")]
    assert "over 4 checkpoints" in scatter  # early's 2 and late's 2; full has no ground truth
    assert "early/checkpoint-80" in html and "0.440" in html


def test_merge_recommend_on_a_sweep_merges_in_the_picked_run(sweep, tmp_path):
    out = tmp_path / "merged"
    args = ["merge", str(sweep), "--recommend", "--data-per-run", "train.jsonl", "--recipe",
            str(sweep / "full" / "recipe.yaml"), "--cache-dir", str(tmp_path / "cache"), *FAST, "-o", str(out),
            "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    ranked = CliRunner().invoke(main, ["rank", str(sweep), "--data-per-run", "train.jsonl", "--recipe",
                                       str(sweep / "full" / "recipe.yaml"), "--cache-dir", str(tmp_path / "cache"),
                                       *FAST, "--max-examples", "6", "--json"])
    pick = json.loads(ranked.stdout)["recommended"]["path"]
    run_dir = str(Path(pick).parent)
    inputs = json.loads((out / "ckptsel_merge.json").read_text())["inputs"]
    assert inputs and all(str(Path(i["path"]).parent) == run_dir for i in inputs)  # from the sweep pick's run


def test_accuracy_first_recommends_a_flagged_best_with_its_numbers_and_robustness_the_clean_one():
    """Checkpoint 3 is the most accurate and over-memorized. Half the examples peak at checkpoint 1, the other
    half at 2 (PM 0.75 each), every one is right at 3 and memorised there (PM 0.9: each keeps its best value from
    before memorisation; the gap to checkpoint 2 is -0.3 on half the examples, 3 standard errors); held-out NLL
    1.5x its minimum (checkpoint 2)."""
    from ckptsel.settings import OvermemSettings
    from ckptsel.sweep import RunArrays, rank_run

    acc = np.array([[0.2] * 10, [0.9] * 5 + [0.6] * 5, [0.6] * 5 + [0.9] * 5, [0.9] * 10])
    nll = np.array([[1.0] * 10, [0.3] * 10, [0.3] * 10, [0.02] * 10])
    heldout = np.array([[2.0] * 5, [1.1] * 5, [1.0] * 5, [1.5] * 5])
    run = RunArrays(name="r", steps=[10, 20, 30, 40], acc=acc, nll=nll, heldout=heldout)
    memorization = MemorizationSettings()
    default = rank_run(run, memorization, OvermemSettings(), 0.1)
    assert default.stages[3] == "over-memorized" and default.recommended == 3
    (warning,) = [w for w in default.warnings if "flagged over-memorized" in w]
    assert warning == ("the most accurate checkpoint (step 40) is flagged over-memorized: heldout_nll +50% over "
                       "its minimum; the best checkpoint that is not is step 30, -0.150 predicted accuracy "
                       "(--prefer robustness recommends it)")
    robust = rank_run(run, memorization, OvermemSettings(prefer="robustness"), 0.1)
    assert robust.recommended == 2 and not any("flagged over-memorized" in w for w in robust.warnings)


def test_a_checkpoint_is_not_scored_on_the_alternatives_it_sampled_itself():
    """Examples 0-1 got their alternatives from checkpoint 1, examples 2-3 from checkpoint 2: each
    scores its own samples at 0.2 and the others' at 0.5. Left out, the proxy is flat at 0.5; with
    them it would fall to 0.35 at the sources and 'rise' 1.43x at checkpoint 3."""
    from ckptsel.sweep import RunArrays, rank_run

    acc = np.array([[0.2] * 4, [0.8] * 4, [0.9] * 4, [0.9] * 4])
    nll = np.array([[1.0] * 4, [0.5] * 4, [0.05] * 4, [0.02] * 4])
    alt = np.array([[0.9] * 4, [0.2, 0.2, 0.5, 0.5], [0.5, 0.5, 0.2, 0.2], [0.5] * 4])
    arrays = dict(name="r", steps=[1, 2, 3, 4], acc=acc, nll=nll, alt=alt, alt_coverage=1.0)
    fair = rank_run(RunArrays(**arrays, alt_source_of=[1, 1, 2, 2]), MemorizationSettings(), OvermemSettings(), 0.1)
    assert fair.proxy == "alt_nll"
    assert fair.columns["alt_nll"].tolist() == pytest.approx([0.9, 0.5, 0.5, 0.5])
    assert "over-memorized" not in fair.stages
    biased = rank_run(RunArrays(**arrays), MemorizationSettings(), OvermemSettings(), 0.1)
    assert biased.columns["alt_nll"].tolist() == pytest.approx([0.9, 0.35, 0.35, 0.5])
    assert biased.stages[3] == "over-memorized"


def test_the_nu_band_bounds_pre_memorization_accuracy_over_half_to_twice_nu():
    """Example 0 is memorised below 0.15 from checkpoint 1 on, example 1 below 0.04: at nu = 0.1 only
    example 0 counts, at 0.2 both, at 0.05 neither."""
    from ckptsel.sweep import RunArrays, rank_run

    def nu_band(acc, nll, threshold):
        x = columns.Inputs({"acc": acc, "nll": nll}, np.zeros(acc.shape, bool), np.ones(acc.shape, bool), threshold)
        return {key: columns.BY_KEY[key].compute(x) for key in ("premem_nu_low", "premem_nu_high")}

    acc = np.array([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]])  # right before memorising, wrong after
    nll = np.array([[1.0, 1.0], [0.07, 0.15], [0.07, 0.15]])
    band = nu_band(acc, nll, 0.1)
    assert band["premem_nu_low"].tolist() == [1.0, 0.0, 0.0]  # nu 0.2: both memorised, min with acc 0
    assert band["premem_nu_high"].tolist() == [1.0, 0.0, 0.0]  # nu 0.05: neither, acc 0 at J
    acc = np.array([[0.0, 0.0], [0.5, 0.5], [1.0, 1.0]])  # never right before memorising
    band = nu_band(acc, nll, 0.1)
    ranked = rank_run(RunArrays(name="r", steps=[1, 2, 3], acc=acc, nll=nll), MemorizationSettings(),
                      OvermemSettings(), 0.1)
    assert band["premem_nu_low"][2] == 0.0  # both examples memorised at 0.2 before they were right
    assert ranked.columns["premem_acc"][2] == 0.5  # at 0.1 example 1 still counts (1.0), example 0 does not
    assert band["premem_nu_high"][2] == 1.0  # at 0.05 neither is memorised
    assert band["premem_nu_low"][2] <= ranked.columns["premem_acc"][2] <= band["premem_nu_high"][2]
    assert np.isnan(nu_band(acc, nll, None)["premem_nu_low"]).all()  # the copy rule: no nu, no band


def test_across_runs_an_underfit_pick_is_not_chosen_over_a_close_one_that_is_not():
    """Two runs' picks within one SE on 6 examples (0.083 and 0.333): the lower proxy rise belongs to the one
    below half the best, and it does not win."""
    from ckptsel.sweep import RunRanking, _sweep_pick

    def ranked(name, per_example, ratio):
        per_example = np.array([per_example], dtype=float)
        return RunRanking(name, [1], {"premem_acc": per_example.mean(axis=1), "proxy_ratio": np.array([ratio])},
                          (np.zeros(1), np.ones(1)), ["generalizing"], [None], "perturb_nll", 0, 0.1, per_example,
                          np.zeros_like(per_example, bool))

    ids = [f"e{i}" for i in range(6)]
    runs = [_run(n, np.zeros((1, 6)), np.ones((1, 6))) for n in ("low", "high")]
    runs = [dataclasses.replace(r, examples=ids) for r in runs]
    low, high = ranked("low", [0, 0.5, 0, 0, 0, 0], 1.0), ranked("high", [1, 0, 0, 0, 0, 1], 1.2)
    overmem = OvermemSettings()
    assert _sweep_pick(runs, [low, high], overmem) == 1
    # Without the underfit guard (nothing is below half the best) the lower rise would win.
    assert _sweep_pick(runs, [low, high], overmem.model_copy(update={"underfit_fraction": 0.1})) == 0
