"""The key-value table's keys (ckptsel.store_keys): byte for byte what stores written before hold.

Each literal below was produced by the code before the keys moved into one module (the
f-strings in pipeline.py, proxies.py, verify/run.py and merge/recommend.py); a key that changes
loses every entry written under the old one.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ckptsel import store_keys
from ckptsel.settings import ProxySettings

FP = "f" * 64


def test_each_scheme_is_the_key_stores_already_hold():
    rendering = {"grader": "gsm8k", "append_eos": True}
    assert (store_keys.rendered_rows("d" * 64, "tok-digest", rendering, 512, True)
            == "rendered:82e4233532146f51a000cbafa4f07bfe")
    assert (store_keys.alt_harvest("0123456789abcdef", FP, ProxySettings())
            == f"alt-harvest/0123456789abcdef/{FP}/0.2/3/0.6/None")
    assert (store_keys.alt_harvest("k", "a", ProxySettings(alt_min_coverage=0.5, alt_grader="lab-steps"))
            == "alt-harvest/k/a/0.5/3/0.6/lab-steps")
    assert store_keys.verify_summary(FP) == f"verify/{FP}"
    assert store_keys.verify_task(FP, "0123456789abcdef") == f"verify-task/{FP}/0123456789abcdef"
    assert store_keys.merge_recommendation("ab" * 32) == "merge-recommend:" + "ab" * 32


def test_render_reads_its_rows_under_the_old_key(tmp_path):
    """The call site: a data file rendered before is found again (no tokenizer needed on a hit)."""
    from ckptsel.prepare import render
    from ckptsel.recipes import load_recipe

    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "What is 2 + 3?", "answer": "2 + 3 = 5\\n#### 5"}\n'
                    '{"question": "What is 4 + 1?", "answer": "4 + 1 = 5\\n#### 5"}\n')

    class Store:
        def __init__(self):
            self.asked: list[str] = []

        def get_value(self, key, default=None):
            self.asked.append(key)
            return {"examples": [], "skipped": [], "budgets": {"u": 3}, "lengths": {}}

    store = Store()
    rendered = render(data, load_recipe("gsm8k"), store, tokenizer_identity="tok-digest", skip_bad=False,
                      tokenizer=None)
    assert store.asked == ["rendered:a1561469b1ed59de7d7ed1c23eccbe4b"] and rendered.budgets == {"u": 3}


def test_verify_summaries_and_merge_comparisons_are_read_back_under_their_keys(tmp_path):
    from ckptsel.report.inputs import stored_merge_comparison
    from ckptsel.select import CheckpointMetrics, Ranking
    from ckptsel.store import Store
    from ckptsel.sweep import Threshold
    from ckptsel.verify import Measured, Verification, stored_summaries
    from ckptsel.verify.run import save_summary

    with Store.open(tmp_path) as store:
        save_summary(store, Measured(0, "/r/checkpoint-1", 1, FP, accuracy=0.5, n=4),
                     Verification("test.jsonl", "gsm8k", "greedy", "key1", 4, 16, []))
        store.put_value(f"merge-recommend:{FP}", {"candidates": [{"candidate": "step 1"}], "rule": "r"})
        assert [s["accuracy"] for s in stored_summaries(store, FP)] == [0.5]
        ranking = Ranking([CheckpointMetrics(0, "/r/checkpoint-1", 1, None, None, FP)], Threshold("nll", 0.1, 0.1),
                          4, 0, "rule")
        assert stored_merge_comparison(store, ranking)["rows"] == [{"candidate": "step 1"}]
    keys = sorted(k for (k,) in sqlite3.connect(Path(tmp_path) / "results.sqlite3").execute("SELECT key FROM kv"))
    assert keys == [f"merge-recommend:{FP}", f"verify/{FP}"]
