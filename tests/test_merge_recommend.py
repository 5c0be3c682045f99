"""`ckptsel merge RUN --recommend`: candidates from the ranking, measured, the best one written."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from click.testing import CliRunner

from ckptsel import store_keys
from ckptsel.cli import main
from ckptsel.merge.recommend import (
    LEAN_SHARE,
    CandidateSpec,
    RecommendError,
    choose,
    frozen_premem_warning,
    plan_candidates,
)

pytestmark = pytest.mark.filterwarnings("ignore")

FAST = ["--max-examples", "6", "-k", "2", "--max-new-tokens", "24", "--quiet"]


def recommend_args(run, cache, out, *extra, data_from=None):
    data_from = data_from or run
    return ["merge", str(run), "--recommend", "--data", str(data_from / "train.jsonl"), "--recipe",
            str(data_from / "recipe.yaml"), "--cache-dir", str(cache), "-o", str(out), *FAST, *extra]


def invoke(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


# --- pure parts: which candidates, which winner ------------------------------------------------


def test_candidates_follow_the_ranking():
    # 5 checkpoints, the 4th flagged, the recommended one is index 1: pairs (0, 1), neighbours 0..2,
    # window 1..2 (the flagged 3 is left out, so the last unflagged one is 4 and the window is 1, 2, 4).
    specs, notes = plan_candidates([False, False, False, True, False], 1, base_known=False)
    assert specs == [CandidateSpec("single", (1,)), CandidateSpec("pair", (0, 1)),
                     CandidateSpec("lean_pair", (0, 1), weights=(1 - LEAN_SHARE, LEAN_SHARE)),
                     CandidateSpec("neighbours", (0, 1, 2)),
                     CandidateSpec("window", (1, 2, 4))]
    assert notes == []
    # The flagged successor is skipped by the neighbours too.
    specs, _ = plan_candidates([False, False, True, False], 1, base_known=False, lean_share=0.75)
    assert specs[2].weights == (0.25, 0.75) and specs[3] == CandidateSpec("neighbours", (0, 1, 3))
    # Recommended is first: no pairs; a window of one member is skipped; model_stock over the pair then.
    specs, notes = plan_candidates([False, True, None], 0, base_known=True)
    assert [s.name for s in specs] == ["single"] and len(notes) == 4
    specs, notes = plan_candidates([False, False, True], 1, base_known=True)
    assert specs[-1] == CandidateSpec("model_stock", (0, 1), "model_stock")
    assert [s.name for s in specs] == ["single", "pair", "lean_pair", "model_stock"] and len(notes) == 2
    # With a successor, model_stock takes the window.
    specs, _ = plan_candidates([False, False, False], 1, base_known=True)
    assert specs[-1] == CandidateSpec("model_stock", (1, 2), "model_stock")
    with pytest.raises(RecommendError, match="recommends no checkpoint"):
        plan_candidates([False, False], None, base_known=False)
    with pytest.raises(RecommendError, match="single measured checkpoint"):
        plan_candidates([False, None], 0, base_known=False)


def test_labels_name_the_shares():
    from ckptsel.merge.recommend import _label

    steps = [100, 200, 300]
    assert _label(CandidateSpec("pair", (0, 1)), steps[:2]) == "½ step 100 + ½ step 200"
    lean = CandidateSpec("lean_pair", (0, 1), weights=(1 / 3, 2 / 3))
    assert _label(lean, steps[:2]) == "⅓ step 100 + ⅔ step 200"
    assert _label(CandidateSpec("lean_pair", (0, 1), weights=(0.3, 0.7)), steps[:2]) == "3/10 step 100 + 7/10 step 200"
    assert _label(CandidateSpec("neighbours", (0, 1, 2)), steps) == "mean of step 100, step 200, step 300"
    assert _label(CandidateSpec("model_stock", (1, 2), "model_stock"), steps[1:]) == "model_stock of step 200, step 300"


def test_choose_takes_the_lowest_proxy_within_tolerance():
    premem = np.array([0.50, 0.495, 0.40, np.nan])
    proxy = np.array([1.0, 0.9, 0.5, 0.1])
    winner, eligible = choose(premem, proxy, tolerance=0.01)
    # row 2 lost 0.10 pre-memorization accuracy, row 3 has none measured: only rows 0 and 1 qualify.
    assert eligible.tolist() == [True, True, False, False] and winner == 1
    assert choose(premem, proxy, tolerance=0.2)[0] == 2
    assert choose(premem, None)[0] == 0
    assert choose(premem, np.array([1.0, 1.0, 1.0, 1.0]))[0] == 0  # ties: the simpler candidate
    assert choose(np.array([np.nan, 0.5]), np.array([np.nan, 0.1]))[0] == 0  # nothing to compare against


def test_a_merge_around_a_fully_memorised_pick_carries_a_warning():
    # Pre-memorization accuracy is frozen once (nearly) every example is memorised: it cannot judge a merge.
    warning = frozen_premem_warning("pair", 1.0, 0.99)
    assert warning is not None and "100% of its examples memorised" in warning and "ckptsel verify" in warning
    assert frozen_premem_warning("lean_pair", 0.99, 0.99) is not None
    assert frozen_premem_warning("single", 1.0, 0.99) is None  # nothing merged: nothing to judge
    assert frozen_premem_warning("pair", 0.8, 0.99) is None  # PM can still move: the tolerance test means something
    assert frozen_premem_warning("pair", float("nan"), 0.99) is None


# --- end to end on a tiny trained run ----------------------------------------------------------


@pytest.fixture(scope="module")
def first_recommend(tiny_run, tmp_path_factory):
    """One `merge --recommend` into a fresh cache: (its folder, the --json report). Its cache, with the
    run and every candidate measured, also serves the kill test."""
    folder = tmp_path_factory.mktemp("recommend")
    result = invoke(recommend_args(tiny_run, folder / "cache", folder / "merged", "--json"))
    assert result.exit_code == 0, result.output
    return folder, json.loads(result.stdout)


def test_recommend_writes_the_winner_with_the_comparison(tiny_run, first_recommend):
    tmp_path, report = first_recommend
    out = tmp_path / "merged"
    rows = report["candidates"]
    names = [r["name"] for r in rows]
    assert names[:3] == ["single", "pair", "lean_pair"] and set(names) <= {"single", "pair", "lean_pair",
                                                                            "neighbours", "window"}
    assert sum(r["chosen"] for r in rows) == 1 and rows[0]["eligible"]
    chosen = next(r for r in rows if r["chosen"])
    assert report["chosen"] == chosen["candidate"] and report["proxy"] in ("alt_nll", "perturb_nll")
    assert "lowest" in report["rule"] and "0.01" in report["rule"]
    # The winner has the lowest proxy among the eligible candidates.
    eligible = [r for r in rows if r["eligible"]]
    assert chosen["proxy"] == min(r["proxy"] for r in eligible)
    assert all(r["train_acc"] is not None and r["premem_acc"] is not None for r in rows)
    # The frozen-PM caveat is attached exactly when its rule says (rows[0]: the recommended checkpoint alone).
    import yaml

    memorized_min = yaml.safe_load((tiny_run / "recipe.yaml").read_text())["stages"]["memorized_min"]
    expected = frozen_premem_warning(chosen["name"], rows[0]["memorized_frac"], memorized_min)
    assert report.get("warnings", []) == ([expected] if expected else [])
    # Merges are new checkpoints with their own fingerprints; the run's were all cached from the ranking.
    assert len({r["fingerprint"] for r in rows}) == len(rows)
    assert report["measured"] == len(rows) - 1

    sidecar = json.loads((out / "ckptsel_merge.json").read_text())
    assert sidecar["justification"]["chosen"] == chosen["candidate"]
    assert [r["candidate"] for r in sidecar["justification"]["candidates"]] == [r["candidate"] for r in rows]
    assert [i["step"] for i in sidecar["inputs"]] == chosen["steps"]
    card = (out / "README.md").read_text()
    assert all(r["candidate"] in card for r in rows) and report["rule"] in card
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "merged"]  # candidates cleaned up

    # The comparison is in the store under the recommended checkpoint, and `report` reads it back
    # (from the store for the ranking's recommended checkpoint, or from the merge's sidecar).
    from ckptsel.report import build_inputs
    from ckptsel.report.inputs import merge_comparison
    from ckptsel.select import Ranking
    from ckptsel.store import Store

    labels = [r["candidate"] for r in rows]
    ranking = {"recommended": {"index": 1},
               "checkpoints": [{"fingerprint": "0" * 64}, {"fingerprint": rows[0]["fingerprint"]}]}
    with Store.open(tmp_path / "cache") as store:
        stored = store.get_value(store_keys.merge_recommendation(rows[0]["fingerprint"]))
        shown = build_inputs(Ranking.from_json(ranking), store=store).merges
        assert build_inputs(Ranking.from_json({**ranking, "recommended": {"index": 0}}), store=store).merges == []
    assert stored["chosen"] == chosen["candidate"] and stored["output"] == str(out.absolute())
    assert [[r["candidate"] for r in m["rows"]] for m in shown] == [labels]
    assert [r["candidate"] for r in merge_comparison(out)["rows"]] == labels

    # A rerun measures nothing (merges keep their fingerprints) and needs --force to replace OUT.
    refused = CliRunner().invoke(main, recommend_args(tiny_run, tmp_path / "cache", out))
    assert refused.exit_code == 2 and "--force" in refused.output
    again = invoke(recommend_args(tiny_run, tmp_path / "cache", out, "--json", "--force"))
    assert again.exit_code == 0, again.output
    rerun = json.loads(again.stdout)
    assert rerun["measured"] == 0 and rerun["candidates"] == rows

    # Without --json: the rich table names every candidate, the rule and what was written.
    table = invoke(recommend_args(tiny_run, tmp_path / "cache", out, "--force"))
    assert table.exit_code == 0, table.output
    assert all(label in table.stdout for label in labels) and "rule: among the candidates" in table.stdout
    assert f"wrote {chosen['candidate']} to {out.absolute()}" in table.stdout


def test_bad_input_is_one_line_exit_2(tiny_run, tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    shutil.copytree(tiny_run / "checkpoint-2", single / "checkpoint-2")
    cases = [
        (recommend_args(single, tmp_path / "c", tmp_path / "o1", data_from=tiny_run), "needs at least two"),
        (recommend_args(tiny_run, tmp_path / "c", tmp_path / "o2", "--grader", "nope"), "nope"),
        (recommend_args(tmp_path / "missing", tmp_path / "c", tmp_path / "o3", data_from=tiny_run), "no such file"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1


def test_lora_run_gets_a_model_stock_candidate(lab_lora_run, tmp_path):
    """A LoRA run knows its base (adapter_config.json), so model_stock is built, on the adapters' ΔW."""
    out = tmp_path / "merged"
    result = invoke(recommend_args(lab_lora_run, tmp_path / "cache", out, "--json"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    stock = [r for r in report["candidates"] if r["name"] == "model_stock"]
    assert len(stock) == 1 and stock[0]["method"] == "model_stock" and "error" not in stock[0]
    assert stock[0]["candidate"].startswith("model_stock of step ") and len(stock[0]["steps"]) >= 2
    assert stock[0]["premem_acc"] is not None and stock[0]["proxy"] is not None
    assert "model_stock" not in report.get("skipped", "")
    assert (out / "adapter_config.json").is_file()  # the winner is an adapter, whichever it is


# A wrapper around the CLI whose candidate measurement sleeps: the built candidates are on disk
# when it prints "measuring", and SIGKILL lands there.
_KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    import ckptsel.merge.recommend as recommend
    from ckptsel.cli import main

    def measure(*args, **kwargs):
        print("measuring", flush=True)
        time.sleep(120)

    recommend._measure = measure
    main(sys.argv[1:])
""")


def test_kill_9_while_comparing_candidates_leaves_nothing(tiny_run, first_recommend, tmp_path):
    shutil.copytree(first_recommend[0] / "cache", tmp_path / "cache")  # the ranking is free, so it gets to the merges
    out = tmp_path / "merged"
    args = recommend_args(tiny_run, tmp_path / "cache", out)
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, *args], stdout=subprocess.PIPE, text=True)
    watchdog = threading.Timer(120, proc.kill)  # a hung subprocess fails the test instead of blocking it
    watchdog.start()
    try:
        line = proc.stdout.readline()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        watchdog.cancel()
        proc.kill()
    assert line.strip() == "measuring" and proc.returncode == -signal.SIGKILL
    assert not out.exists()
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".merged.ckptsel-partial-")]
    assert len(stale) == 1 and any((folder / "config.json").is_file() for folder in stale[0].iterdir())

    # The rerun removes the dead process's candidates and writes the merge.
    rerun = invoke(recommend_args(tiny_run, tmp_path / "cache", out, "--json"))
    assert rerun.exit_code == 0, rerun.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "merged"]
