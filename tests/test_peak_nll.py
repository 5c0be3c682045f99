"""The peak-nll memorisation rule: an example is memorised when every target token's NLL is below nu.

Measured in the scoring pass (the costliest token, beside the mean), stored in schema 2's
``peak_nll`` column (older stores are migrated in place and their target scores re-measured only
when the rule asks for them), and read by the ranking instead of the mean.
"""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
import torch

from ckptsel import metrics
from ckptsel.measure.scoring import encode_pairs, score_targets
from ckptsel.settings import PEAK_NLL_THRESHOLD, MemorizationSettings, OvermemSettings
from ckptsel.store import SCHEMA_VERSION, Record, Store
from ckptsel.sweep import RunArrays, rank_run

from test_rank import invoke, rank_args

PROMPTS = ["What is 2+3?\n", "x\n", "Compute 7*6.\n"]
TARGETS = ["2+3=5\n#### 5", "#### 0", "a longer answer\n#### 1"]


def test_peak_nll_is_the_costliest_target_token(model, tokenizer):
    res = score_targets(model, tokenizer, PROMPTS, TARGETS, batch_size=2)
    for i, (p, t) in enumerate(encode_pairs(tokenizer, PROMPTS, TARGETS)):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([p + t])).logits[0].double(), dim=-1)
        per_token = -logp[torch.arange(len(p) - 1, len(p) + len(t) - 1), torch.tensor(t)]
        assert res.peak_nll[i] == pytest.approx(per_token.max().item(), abs=1e-5)
        assert res.peak_nll[i] > res.nll[i]  # a random model's tokens differ: the max is above the mean


def test_an_empty_target_has_no_peak(model, tokenizer):
    res = score_targets(model, tokenizer, ["Hi\n"], [""], append_eos=False)
    assert np.isnan(res.peak_nll[0])


def test_the_rule_has_its_own_default_nu():
    assert MemorizationSettings(rule="peak-nll").threshold == PEAK_NLL_THRESHOLD
    assert MemorizationSettings(rule="peak-nll", threshold=0.5).threshold == 0.5
    assert MemorizationSettings().threshold == 0.1
    assert MemorizationSettings(rule="peak-nll").nll_measure == "peak_nll"
    assert MemorizationSettings().nll_measure == "nll"


def _arrays(peak: np.ndarray | None) -> RunArrays:
    acc = np.array([[0.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    nll = np.array([[0.5, 0.05, 0.05], [0.05, 0.05, 0.05], [0.01, 0.01, 0.01]])  # mean: memorised early
    return RunArrays(name="r", steps=[1, 2, 3], acc=acc, nll=nll,
                     measures={} if peak is None else {"peak_nll": peak})


def test_ranking_compares_nu_with_the_costliest_token():
    # The mean says examples 1 and 2 are memorised from the first checkpoint; their costliest
    # token says they are not until the last one.
    peak = np.array([[3.0, 2.0, 2.0], [1.5, 1.5, 1.5], [0.2, 0.2, 0.2]])
    mean_rule = rank_run(_arrays(peak), MemorizationSettings(), OvermemSettings(), 0.1, n_boot=10)
    peak_rule = rank_run(_arrays(peak), MemorizationSettings(rule="peak-nll"), OvermemSettings(), 1.0, n_boot=10)
    acc, nll = _arrays(None).acc, _arrays(None).nll
    assert mean_rule.columns["premem_acc"] == pytest.approx(metrics.premem_accuracy(acc, nll, 0.1))
    assert peak_rule.columns["premem_acc"] == pytest.approx(metrics.premem_accuracy(acc, peak, 1.0))
    assert peak_rule.columns["premem_acc"][1] == 1.0 and mean_rule.columns["premem_acc"][1] < 0.5
    assert peak_rule.columns["memorized_frac"].tolist() == pytest.approx([0.0, 0.0, 1.0])
    # The nu band is on the same measure.
    assert peak_rule.columns["premem_nu_low"] == pytest.approx(metrics.premem_accuracy(acc, peak, 2.0))


def test_arrays_without_the_peak_are_refused_not_read_as_memorised():
    with pytest.raises(ValueError, match="peak_nll"):
        rank_run(_arrays(None), MemorizationSettings(rule="peak-nll"), OvermemSettings(), 1.0, n_boot=10)


def _v1_store(folder) -> None:
    """A store as ckptsel wrote it before schema 2: no peak_nll column, one target score."""
    folder.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(folder / "results.sqlite3")
    db.executescript("""
        CREATE TABLE schema_version (version INTEGER NOT NULL);
        INSERT INTO schema_version VALUES (1);
        CREATE TABLE series (id INTEGER PRIMARY KEY, fingerprint TEXT NOT NULL, settings TEXT NOT NULL,
                             kind TEXT NOT NULL, UNIQUE (fingerprint, settings, kind));
        CREATE TABLE results (series INTEGER NOT NULL REFERENCES series(id), uid TEXT NOT NULL,
                              nll REAL, n_tokens INTEGER, entropy REAL, acc REAL, copy_rate REAL,
                              samples TEXT, data TEXT, array BLOB, UNIQUE (series, uid));
        INSERT INTO series VALUES (1, 'fp', 'key', 'score');
        INSERT INTO results (series, uid, nll, n_tokens) VALUES (1, 'a', 0.5, 7);
    """)
    db.commit()
    db.close()


def test_a_schema_1_store_is_migrated_in_place(tmp_path):
    _v1_store(tmp_path)
    with Store.open(tmp_path) as store:
        [old] = store.get_many("fp", "key", "score", ["a"]).values()
        assert old.nll == 0.5 and old.peak_nll is None
        assert store.missing("fp", "key", "score", ["a"]) == []
        assert store.missing("fp", "key", "score", ["a"], with_field="peak_nll") == ["a"]
        store.put_many("fp", "key", "score", {"a": Record(nll=0.5, n_tokens=7, peak_nll=2.5)})
        assert store.missing("fp", "key", "score", ["a"], with_field="peak_nll") == []
        assert store.matrix(["fp"], "key", "score", ["a"], "peak_nll").tolist() == [[2.5]]
    db = sqlite3.connect(tmp_path / "results.sqlite3")
    assert db.execute("SELECT max(version) FROM schema_version").fetchone()[0] == SCHEMA_VERSION == 2
    db.close()
    with Store.open(tmp_path):  # a second open finds it current
        pass


def test_rank_with_peak_nll_rescoring_only_what_lacks_it(learning_run, tmp_path):
    first = invoke(rank_args(learning_run, tmp_path, "--json"))
    assert first.exit_code == 0, first.output
    mean_rule = json.loads(first.stdout)
    # Forget the stored peaks, as a store written before them would have none.
    db = sqlite3.connect(tmp_path / "results.sqlite3")
    db.execute("UPDATE results SET peak_nll = NULL")
    db.commit()
    db.close()
    again = invoke(rank_args(learning_run, tmp_path, "--json"))  # the mean rule does not need them
    assert mean_rule["cache"]["measured"] == 4
    assert json.loads(again.stdout)["cache"] == {"measured": 0, "from_cache": 4}
    peak = invoke(rank_args(learning_run, tmp_path, "--json", "--memorization", "peak-nll"))
    assert peak.exit_code == 0, peak.output
    out = json.loads(peak.stdout)
    assert out["threshold"]["rule"] == "peak-nll" and out["threshold"]["used"] == PEAK_NLL_THRESHOLD
    assert out["cache"]["measured"] == 4  # the target scores, again; samples are reused
    from ckptsel.collect import select_examples
    from ckptsel.data import load_examples
    from ckptsel.recipes import load_recipe
    from ckptsel.settings import SelectionSettings

    examples = load_examples(learning_run / "train.jsonl", load_recipe(str(learning_run / "recipe.yaml")))
    uids = [ex.uid for ex in select_examples(examples, SelectionSettings(max_examples=6))]
    fps = [r["fingerprint"] for r in out["checkpoints"]]
    with Store.open(tmp_path) as store:
        acc = store.matrix(fps, out["settings_key"], "sample", uids, "acc")
        peak_nll = store.matrix(fps, out["settings_key"], "score", uids, "peak_nll")
        nll = store.matrix(fps, out["settings_key"], "score", uids, "nll")
    assert not np.isnan(peak_nll).any() and (peak_nll >= nll).all()
    assert [r["premem_acc"] for r in out["checkpoints"]] == pytest.approx(
        metrics.premem_accuracy(acc, peak_nll, PEAK_NLL_THRESHOLD).tolist())
