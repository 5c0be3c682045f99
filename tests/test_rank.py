"""End to end: `ckptsel rank` on real (tiny) Trainer runs trained here."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from ckptsel import metrics
from ckptsel.cli import main

pytestmark = pytest.mark.filterwarnings("ignore")

# Few examples and samples: the plumbing is under test here, the metrics have their own tests.
FAST = ["--max-examples", "6", "-k", "2", "--max-new-tokens", "24", "--quiet"]


def rank_args(run, cache, *extra, data_from=None):
    data_from = data_from or run
    return [
        "rank", str(run), "--data", str(data_from / "train.jsonl"), "--recipe", str(data_from / "recipe.yaml"),
        "--cache-dir", str(cache), *FAST, *extra,
    ]


def invoke(args):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    return result


def test_rank_json_matches_the_formula_on_stored_measurements(learning_run, tmp_path):
    run = learning_run
    args = ["rank", str(run), "--data", str(run / "train.jsonl"), "--recipe", str(run / "recipe.yaml"),
            "--cache-dir", str(tmp_path), "--max-examples", "8", "-k", "2", "--quiet", "--json",
            "--heldout", str(run / "test.jsonl")]
    result = invoke(args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    rows = out["checkpoints"]
    assert [r["step"] for r in rows] == [40, 80, 120, 160]
    assert out["recommended"]["path"] in [r["path"] for r in rows]
    assert out["cache"] == {"measured": 4, "from_cache": 0}

    # Recompute PM(J) from the store with the public formula: the CLI must agree exactly.
    from ckptsel.store import Store

    from ckptsel.collect import select_examples
    from ckptsel.data import load_examples
    from ckptsel.recipes import load_recipe
    from ckptsel.settings import SelectionSettings

    examples = load_examples(run / "train.jsonl", load_recipe(str(run / "recipe.yaml")))
    uids = [ex.uid for ex in select_examples(examples, SelectionSettings(max_examples=8))]
    with Store.open(tmp_path) as store:
        fps = [r["fingerprint"] for r in rows]
        key = out["settings_key"]
        acc = store.matrix(fps, key, "sample", uids, "acc")
        nll = store.matrix(fps, key, "score", uids, "nll")
        from ckptsel.proxies import perturb_series

        perturbed = store.matrix(fps, key, perturb_series(("preamble", "format", "instruction")), uids, "nll")
    assert acc.shape == (4, 8) and not np.isnan(acc).any() and not np.isnan(nll).any()
    # This run answers and memorises: the formula's max, min and mask all matter here.
    nu = out["threshold"]["used"]
    assert acc.max() > 0 and (nll < nu).any() and (acc * (nll >= nu)).max() > 0
    expected = metrics.premem_accuracy(acc, nll, nu)
    assert [r["premem_acc"] for r in rows] == pytest.approx(expected.tolist())
    assert [r["train_acc"] for r in rows] == pytest.approx(acc.mean(axis=1).tolist())
    assert [r["memorized_frac"] for r in rows] == pytest.approx((nll < nu).mean(axis=1).tolist())
    assert expected[-1] < acc[-1].mean()  # memorised examples lose their credit: PM is not train accuracy
    # The nu band: the same formula at 2 nu and nu / 2.
    assert [r["premem_nu_low"] for r in rows] == pytest.approx(metrics.premem_accuracy(acc, nll, 2 * nu).tolist())
    assert [r["premem_nu_high"] for r in rows] == pytest.approx(metrics.premem_accuracy(acc, nll, nu / 2).tolist())
    for r in rows:
        lo, hi = r["premem_ci"]
        assert lo <= r["premem_acc"] <= hi
    # The proxies: the perturbation gap from the stored perturbed NLLs, the held-out NLL as the
    # flag's proxy (a held-out file was given), a stage for every checkpoint.
    assert [r["perturb_gap"] for r in rows] == pytest.approx((perturbed - nll).mean(axis=1).tolist())
    assert out["proxy"] == "heldout_nll" and out["n_heldout"] == 8
    assert all(r["heldout_nll"] > 0 and r["entropy"] > 0 for r in rows)
    assert all(r["stage"] in ("underfit", "generalizing", "over-memorized") for r in rows)
    assert "those not underfit among them" in out["rule"] and "the unflagged ones among those" in out["rule"]
    assert "heldout_nll" in out["rule"]


def test_rank_then_gate_on_the_same_cache_measures_nothing(tiny_run, tmp_path):
    result = invoke(rank_args(tiny_run, tmp_path, "--json", "--heldout", str(tiny_run / "test.jsonl")))
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["checkpoints"]
    # The tiny model never answers correctly: no alternative solutions, every checkpoint underfit.
    assert [r["stage"] for r in rows] == ["underfit"] * 3 and all(r["flag"] is None for r in rows)

    # The gate on the same run and cache measures nothing again; exit 0 pass, 1 fail.
    gate = ["gate", str(tiny_run), "--data", str(tiny_run / "train.jsonl"), "--recipe", str(tiny_run / "recipe.yaml"),
            "--cache-dir", str(tmp_path), *FAST, "--heldout", str(tiny_run / "test.jsonl"), "--json"]
    passed = invoke(gate)
    assert passed.exit_code == 0, passed.output
    report = json.loads(passed.stdout)
    assert report["passed"] and report["candidate"]["step"] == 6 and report["ranking"]["cache"]["measured"] == 0
    failed = invoke([*gate, "--min-premem-acc", "0.5"])
    assert failed.exit_code == 1 and json.loads(failed.stdout)["reasons"] == [
        "predicted test accuracy 0.000 (must be ≥ 0.5)"
    ]


def test_rank_is_incremental_when_a_checkpoint_is_added(tiny_run, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("checkpoint-2", "checkpoint-4"):
        shutil.copytree(tiny_run / name, partial / name)
    first = invoke(rank_args(partial, tmp_path / "cache", "--json", data_from=tiny_run))
    assert json.loads(first.stdout)["cache"] == {"measured": 2, "from_cache": 0}
    shutil.copytree(tiny_run / "checkpoint-6", partial / "checkpoint-6")
    second = invoke(rank_args(partial, tmp_path / "cache", "--json", data_from=tiny_run))
    assert second.exit_code == 0, second.output
    assert json.loads(second.stdout)["cache"] == {"measured": 1, "from_cache": 2}
    # Copying a checkpoint elsewhere keeps its fingerprint: measured values are reused, not recomputed.
    again = invoke(rank_args(tiny_run, tmp_path / "cache", "--json"))
    assert json.loads(again.stdout)["cache"] == {"measured": 0, "from_cache": 3}


def test_killed_rank_resumes_to_the_uninterrupted_result(tiny_run, tmp_path):
    args = rank_args(tiny_run, tmp_path / "killed", "--json", "--batch-size", "2")
    args[args.index("--max-examples") + 1] = "16"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ckptsel", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = tmp_path / "killed" / "results.sqlite3"
    deadline = time.time() + 120
    rows = 0
    while time.time() < deadline and proc.poll() is None:
        if db.exists():
            import sqlite3

            try:
                rows = sqlite3.connect(db).execute("SELECT count(*) FROM results").fetchone()[0]
            except sqlite3.OperationalError:
                rows = 0
            if rows >= 16:  # at least one chunk stored, the run not finished
                break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    resumed = invoke(args)
    assert resumed.exit_code == 0, resumed.output
    fresh = invoke([*args[:args.index("--cache-dir") + 1], str(tmp_path / "fresh"), *args[args.index("--cache-dir") + 2:]])
    a, b = json.loads(resumed.stdout), json.loads(fresh.stdout)
    assert a["cache"]["measured"] >= 1  # the kill left work to do
    for ra, rb in zip(a["checkpoints"], b["checkpoints"]):
        for field in ("train_acc", "premem_acc", "memorized_frac", "copy_rate", "target_nll"):
            assert ra[field] == pytest.approx(rb[field], abs=1e-6), field


def test_lora_run_loads_the_base_once(lab_lora_run, tmp_path):
    from ckptsel.collect import collect
    from ckptsel.data import load_examples
    from ckptsel.discover import discover
    from ckptsel.measure.loading import load_tokenizer
    from ckptsel.recipes import load_recipe, override
    from ckptsel.store import Store

    ckpts = discover([lab_lora_run])
    assert [c.kind for c in ckpts] == ["adapter"] * 3
    recipe = override(load_recipe(str(lab_lora_run / "recipe.yaml")), sampling={"k": 1, "max_new_tokens": 8})
    tokenizer = load_tokenizer(ckpts[0])
    examples = load_examples(lab_lora_run / "train.jsonl", recipe, tokenizer=tokenizer)[:4]
    with Store.open(tmp_path) as store:
        collected = collect(ckpts, examples, recipe, store, tokenizer=tokenizer)
    assert collected.failures == {}
    assert collected.loaded == 3
    assert collected.base_loads == 1


def test_unknown_grader_is_one_line_exit_2(tiny_run, tmp_path):
    result = CliRunner().invoke(main, rank_args(tiny_run, tmp_path, "--grader", "nope"))
    assert result.exit_code == 2
    assert "nope" in result.output and "Traceback" not in result.output


def test_recipe_proxies_pick_the_alternative_grader_and_the_option_overrides_it(tiny_run, tmp_path, monkeypatch):
    import ckptsel.collect as collect_module

    seen, real = [], collect_module.collect

    def spy(*args, proxy_settings, **kwargs):
        seen.append(proxy_settings.alt_grader)
        return real(*args, proxy_settings=proxy_settings, **kwargs)

    monkeypatch.setattr(collect_module, "collect", spy)
    recipe = (tiny_run / "recipe.yaml").read_text()
    assert "alt_grader: lab-steps" in recipe  # the lab grades its alternative solutions step by step
    assert invoke(rank_args(tiny_run, tmp_path)).exit_code == 0
    assert invoke(rank_args(tiny_run, tmp_path, "--alt-grader", "gsm8k")).exit_code == 0
    assert seen == ["lab-steps", "gsm8k"]
    # A grader the recipe names but nobody registered: a usage error before any work.
    bad = tmp_path / "bad.yaml"
    bad.write_text(recipe.replace("alt_grader: lab-steps", "alt_grader: nope"))
    args = rank_args(tiny_run, tmp_path)
    args[args.index("--recipe") + 1] = str(bad)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "nope" in result.output and "Traceback" not in result.output
    assert len(seen) == 2


def test_recipe_stages_set_the_flag_thresholds_and_proxy_option_overrides(tiny_run, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((tiny_run / "recipe.yaml").read_text() + "stages: {acc_margin: 0.07, proxy_rise: 0.4}\n")
    args = rank_args(tiny_run, tmp_path / "cache", "--json", "--proxy", "perturb_nll")
    args[args.index("--recipe") + 1] = str(recipe)
    result = invoke(args)
    assert result.exit_code == 0, result.output
    rule = json.loads(result.stdout)["stage_rule"]
    assert "train acc ≥ run best − 0.07" in rule and "perturb_nll ≥ 1.4× its minimum" in rule


def test_prefer_comes_from_the_recipe_and_the_option_overrides_it(tiny_run, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((tiny_run / "recipe.yaml").read_text() + "stages: {prefer: robustness}\n")
    args = rank_args(tiny_run, tmp_path / "cache", "--json")
    args[args.index("--recipe") + 1] = str(recipe)
    by_recipe = json.loads(invoke(args).stdout)["rule"]
    by_option = json.loads(invoke([*args, "--prefer", "accuracy"]).stdout)["rule"]
    assert by_recipe.startswith("robustness first: the highest pre-memorization accuracy")
    assert by_option.startswith("accuracy first: the checkpoints within 1 SE")


def test_template_field_missing_from_the_data_is_exit_2(tiny_run, tmp_path):
    result = CliRunner().invoke(main, rank_args(tiny_run, tmp_path, "--prompt-template", "{problem}\\n"))
    assert result.exit_code == 2
    assert "problem" in result.output and "Traceback" not in result.output


def test_a_checkpoint_that_fails_to_load_does_not_lose_the_others(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    config = run / "checkpoint-4" / "config.json"
    config.write_text(config.read_text().replace('"LlamaForCausalLM"', '"NoSuchModelForCausalLM"')
                      .replace('"model_type": "llama"', '"model_type": "no-such-model"'))
    result = CliRunner().invoke(main, rank_args(run, tmp_path / "cache", "--json"))
    assert result.exit_code == 3, result.output
    out = json.loads(result.stdout)
    by_step = {r["step"]: r for r in out["checkpoints"]}
    assert by_step[4]["error"] and "checkpoint-4" in by_step[4]["error"]
    assert by_step[2]["premem_acc"] is not None and by_step[6]["premem_acc"] is not None
    assert "checkpoint-4" in result.stderr


def test_choose_proxy_prefers_heldout_then_alternatives_with_coverage_then_perturbed():
    from ckptsel.select import choose_proxy
    from ckptsel.settings import OvermemSettings

    nan = np.full(3, np.nan)
    cols = {"heldout_nll": nan, "alt_nll": np.ones(3), "perturb_nll": np.ones(3)}
    assert choose_proxy(cols, 0.3, OvermemSettings()) == ("alt_nll", None)
    assert choose_proxy(cols, 0.01, OvermemSettings()) == ("perturb_nll", None)  # too few alternatives
    assert choose_proxy({**cols, "heldout_nll": np.ones(3)}, 0.3, OvermemSettings()) == ("heldout_nll", None)
    proxy, note = choose_proxy(cols, 0.3, OvermemSettings(proxy="heldout_nll"))
    assert proxy == "alt_nll" and "heldout_nll was not measured" in note
    assert choose_proxy({k: nan for k in cols}, 0.3, OvermemSettings()) == (None, None)


# --- MoE pathways -------------------------------------------------------------------


# nu = 10 nats: every example counts as memorised, so the pathway metrics cover all six. Samples
# are not under test here: one short one per question.
MOE = ["--threshold", "10", "-k", "1", "--max-new-tokens", "4"]


@pytest.fixture(scope="session")
def moe_run(tmp_path_factory, tiny_run, tokenizer):
    """Three checkpoints of the lab's tiny OLMoE (random weights: routing is what is under test) beside
    tiny_run's data and recipe; saving them takes a fraction of a second, training would take many."""
    from ckptsel.lab.models import build_model
    from ckptsel.lab.quick import TINY_MOE

    run = tmp_path_factory.mktemp("moe") / "run"
    run.mkdir()
    for name in ("train.jsonl", "recipe.yaml"):
        shutil.copy(tiny_run / name, run / name)
    for step in (2, 4, 6):
        build_model(TINY_MOE, tokenizer, seed=step).save_pretrained(run / f"checkpoint-{step}")
        tokenizer.save_pretrained(run / f"checkpoint-{step}")
    return run


def _stored_routing(cache, fingerprint, key, uids):
    from ckptsel.store import Store

    with Store.open(cache) as store:
        records = store.get_many(fingerprint, key, "score", uids)
    return np.stack([records[u].array for u in uids]), np.array([records[u].data["layer_cos"] for u in uids])


def _moe_uids(run):
    from ckptsel.collect import select_examples
    from ckptsel.data import load_examples
    from ckptsel.recipes import load_recipe
    from ckptsel.settings import SelectionSettings

    examples = load_examples(run / "train.jsonl", load_recipe(str(run / "recipe.yaml")))
    return [ex.uid for ex in select_examples(examples, SelectionSettings(max_examples=6))]


def test_moe_rank_reports_pathways_and_a_new_cutoff_measures_nothing(moe_run, tmp_path):
    from ckptsel.pathways import consistency_from_cosines, pathway_distance, pathways

    table = invoke(rank_args(moe_run, tmp_path, *MOE))
    assert table.exit_code == 0, table.output
    assert "pathway dist" in table.stdout and "pathway cplx" in table.stdout and "(n=6)" in table.stdout
    out = json.loads(invoke(rank_args(moe_run, tmp_path, *MOE, "--json")).stdout)
    assert out["cache"]["measured"] == 0 and "80%" in out["pathway_rule"]
    uids = _moe_uids(moe_run)
    for row in out["checkpoints"]:
        weights, cosines = _stored_routing(tmp_path, row["fingerprint"], out["settings_key"], uids)
        assert weights.shape == (6, 2, 4) and weights.dtype == np.float16
        np.testing.assert_allclose(weights.astype(float).sum(-1), 1.0, atol=3e-3)
        expected = pathway_distance(pathways(weights, 0.8), 4, 2)
        p = row["pathways"]
        assert p["distance"] == pytest.approx(expected.mean) and p["n_examples"] == 6
        assert p["per_layer"]["distance"] == pytest.approx(expected.per_layer.tolist())
        assert p["complexity"] == pytest.approx(consistency_from_cosines(cosines).complexity)
        assert len(p["per_layer"]["consistency"]) == 1

    # The cut-off is read at ranking time: a recipe with another one re-ranks from the store.
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((moe_run / "recipe.yaml").read_text() + "pathways:\n  cutoff: 0.25\n")
    with_cutoff = [*rank_args(moe_run, tmp_path, *MOE, "--json")]
    with_cutoff[with_cutoff.index("--recipe") + 1] = str(recipe)
    again = json.loads(invoke(with_cutoff).stdout)
    assert again["cache"]["measured"] == 0 and again["settings_key"] == out["settings_key"]
    assert "25%" in again["pathway_rule"]
    row = again["checkpoints"][-1]
    weights, _ = _stored_routing(tmp_path, row["fingerprint"], out["settings_key"], uids)
    # The top one of four experts always holds >= 25% of the weight: one expert per layer.
    assert row["pathways"]["mean_length"] == pytest.approx(2.0)
    assert out["checkpoints"][-1]["pathways"]["mean_length"] > 2.0
    assert row["pathways"]["distance"] == pytest.approx(pathway_distance(pathways(weights, 0.25), 4, 2).mean)


def test_moe_scores_stored_without_routing_are_rescored_and_nothing_else(moe_run, tmp_path):
    import sqlite3

    first = json.loads(invoke(rank_args(moe_run, tmp_path, *MOE, "--json")).stdout)
    db = sqlite3.connect(tmp_path / "results.sqlite3")
    kinds = "SELECT s.kind, count(*), count(r.array), max(r.rowid) FROM results r JOIN series s ON s.id = r.series"
    before = dict((k, rest) for k, *rest in db.execute(kinds + " GROUP BY s.kind"))
    assert before["score"][:2] == [18, 18]
    # A store written before routing capture: target scores without arrays.
    db.execute("UPDATE results SET array = NULL, data = NULL WHERE series IN (SELECT id FROM series WHERE kind = 'score')")
    db.commit()
    second = json.loads(invoke(rank_args(moe_run, tmp_path, *MOE, "--json")).stdout)
    assert second["cache"] == {"measured": 3, "from_cache": 0}
    after = dict((k, rest) for k, *rest in db.execute(kinds + " GROUP BY s.kind"))
    assert after["score"][:2] == [18, 18] and after["score"][2] > before["score"][2]  # re-scored, with arrays
    assert {k: v for k, v in after.items() if k != "score"} == {k: v for k, v in before.items() if k != "score"}
    for a, b in zip(first["checkpoints"], second["checkpoints"]):
        assert a["target_nll"] == pytest.approx(b["target_nll"])
        assert b["pathways"]["n_examples"] == a["pathways"]["n_examples"] == 6
        assert b["pathways"]["per_layer"]["consistency"] == pytest.approx(a["pathways"]["per_layer"]["consistency"])


def test_dense_rank_has_no_pathway_columns_or_keys(tiny_run, tmp_path):
    table = invoke(rank_args(tiny_run, tmp_path))
    assert table.exit_code == 0 and "target NLL" in table.stdout
    assert "pathway" not in table.stdout
    out = json.loads(invoke(rank_args(tiny_run, tmp_path, "--json")).stdout)
    assert "pathway_rule" not in out and all("pathways" not in row for row in out["checkpoints"])
    from ckptsel.store import Store

    with Store.open(tmp_path) as store:  # dense target scores carry no arrays, as before
        records = store.get_many(out["checkpoints"][0]["fingerprint"], out["settings_key"], "score", _moe_uids(tiny_run))
    assert len(records) == 6 and all(r.array is None and r.data is None for r in records.values())


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_other_moe_families_rank_with_pathways_from_either_layout(family, tiny_run, tokenizer, tmp_path):
    """The same weights saved per expert (step 2) and fused (step 4) rank to the same pathways."""
    import torch
    from test_routers import fuse_experts, tiny_moe_config  # shared with the router tests
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    run.mkdir()
    for name in ("train.jsonl", "recipe.yaml"):
        shutil.copy(tiny_run / name, run / name)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_moe_config(family, tokenizer)).save_pretrained(run / "checkpoint-2")
    tokenizer.save_pretrained(run / "checkpoint-2")
    fuse_experts(run / "checkpoint-2", run / "checkpoint-4", family)
    result = invoke(rank_args(run, tmp_path / "cache", *MOE, "--json"))
    assert result.exit_code == 0, result.output
    per_expert, fused = (row["pathways"] for row in json.loads(result.stdout)["checkpoints"])
    assert per_expert["n_examples"] == 6 and len(per_expert["per_layer"]["distance"]) == 2
    assert fused["distance"] == pytest.approx(per_expert["distance"])
    assert fused["complexity"] == pytest.approx(per_expert["complexity"], abs=1e-5)


_NO_TORCH = """
import json, sys
from ckptsel.cli import main
sys.argv = ["ckptsel", *json.loads(sys.argv[1])]
try:
    main()
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
"""


@pytest.mark.parametrize("command", ["rank", "gate", "report"])
def test_a_fully_stored_run_is_ranked_without_importing_torch(command, tiny_run, tmp_path):
    first = invoke(rank_args(tiny_run, tmp_path, "--json"))
    assert first.exit_code == 0, first.output
    args = rank_args(tiny_run, tmp_path, "--json")
    args[0] = command
    if command == "report":
        args += ["-o", str(tmp_path / "report.html")]
    if command == "gate":
        args += ["--allow-overmemorized"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _NO_TORCH, json.dumps(args)], capture_output=True, text=True,
                          env=env, timeout=300)
    status = json.loads(done.stderr.strip().splitlines()[-1])
    assert status == {"code": 0, "heavy": []}, done.stderr
    if command == "rank":
        again = json.loads(done.stdout)
        before = json.loads(first.stdout)
        assert again.pop("cache") == {"measured": 0, "from_cache": 3}
        before.pop("cache")
        assert again == before
