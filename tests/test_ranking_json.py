"""Ranking.from_json: `ckptsel rank --json` read back into the Ranking that wrote it."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from ckptsel.columns import KEYS
from ckptsel.errors import CkptselError
from ckptsel.select import CheckpointMetrics, PathwayMetrics, Ranking, RunSummary
from ckptsel.stages import Flag
from ckptsel.sweep import Threshold

GOLDEN = Path(__file__).parent / "golden"
ADDED_KEYS = ("sample_diversity", "distinct_samples")
NAN = math.nan


def same(a, b) -> bool:
    """Equal, field by field, with NaN equal to NaN (dataclass == compares NaN as unequal)."""
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and all(
            same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a) if f.compare)
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def row(index, step, run, **fields) -> CheckpointMetrics:
    values = {k: fields.pop(k) for k in list(fields) if k in KEYS}  # the columns go in `values`
    return CheckpointMetrics(index, f"/sweep/{run}/checkpoint-{step}", step, step / 10, 1.0 - step / 1000,
                             f"fp{index}", run=run, values=values, **fields)


def sweep_ranking() -> Ranking:
    """Two runs; a flagged checkpoint, one that failed, an MoE row with pathways, NaN where nothing was measured."""
    flag = Flag(0.9, 0.95, 0.1, 0.8, 0.5, "alt_nll", 0.61, 0.42, 0.61 / 0.42, 0.25)
    moe = PathwayMetrics(4.5, 0.8, 0.2, 12, 10, 7, 3.5, {"distance": [4.0, NAN], "consistency": [0.8]},
                         distance_exact=False, distance_stderr=0.03)
    rows = [
        row(0, 100, "a", train_acc=0.2, premem_acc=0.15, premem_ci=(0.1, 0.2), memorized_frac=0.0, stage="underfit",
            alt_nll=0.5),
        row(1, 200, "a", train_acc=0.9, premem_acc=0.4, premem_ci=(0.3, 0.5), memorized_frac=0.8, stage="over-memorized",
            flag=flag, proxy_ratio=0.61 / 0.42, alt_nll=0.61, pathways=moe, recommended_in_run=True),
        row(2, 100, "b", error="/sweep/b/checkpoint-100: cannot load: broken"),
        row(3, 200, "b", train_acc=0.7, premem_acc=0.45, premem_ci=(NAN, NAN), recommended_in_run=True),
    ]
    runs = [RunSummary("a", "/sweep/a", [0, 1], 1, 12, "alt_nll", 0.1, ["run a: few checkpoints"],
                       per_example={"premem": np.ones((2, 3))}),
            RunSummary("b", "/sweep/b", [2, 3], 3, 12, None, 0.12)]
    threshold = Threshold("nll", None, 0.1, auto=0.11, auto_auc=0.9, scope="run", per_run={"a": 0.1, "b": 0.12})
    return Ranking(rows, threshold, 12, 3, "the sweep's rule", proxy=None, stage_rule="a stage rule",
                   alt_coverage=NAN, alt_sources=[], n_heldout=0, warnings=["run a: few checkpoints"],
                   pathway_rule="pathways (MoE): ...", runs=runs)


def test_a_sweep_with_a_flag_a_failure_and_pathways_round_trips():
    ranking = sweep_ranking()
    data = json.loads(json.dumps(ranking.to_json()))  # through text, as a file
    back = Ranking.from_json(data)
    assert same(back, ranking)
    assert back.to_json() == ranking.to_json()
    assert isinstance(back.checkpoints[1].flag, Flag) and back.checkpoints[1].flag.reason() == ranking.checkpoints[1].flag.reason()
    assert back.checkpoints[1].pathways.per_layer["distance"][1] != back.checkpoints[1].pathways.per_layer["distance"][1]
    assert back.checkpoints[3].premem_ci[0] != back.checkpoints[3].premem_ci[0]  # NaN, written as null
    assert back.run_of(3).name == "b" and back.is_sweep and back.runs[0].indices == [0, 1]
    assert back.runs[0].per_example == {}  # the per-example arrays are not in the JSON
    assert back == dataclasses.replace(back)  # == works (the arrays are not compared)


def test_one_run_keeps_its_alternative_solution_sources():
    rows = [row(i, step, "r", train_acc=0.1 * i, premem_acc=0.1 * i, alt_nll=0.3) for i, step in enumerate((5, 10, 15))]
    ranking = Ranking(rows, Threshold("copy", None, None), 8, 2, "rule", proxy="alt_nll", alt_coverage=0.5,
                      alt_sources=[0, 2], n_heldout=4, runs=[RunSummary("r", None, [0, 1, 2], 2, 8)])
    back = Ranking.from_json(ranking.to_json())
    assert back.alt_sources == [0, 2] and back.to_json()["alt_sources"] == [5, 15]
    assert same(back, ranking)


@pytest.mark.parametrize("name", ["run_rank", "sweep_rank", "lora_rank"])
def test_rank_json_of_real_runs_reads_back_to_the_same_json(name):
    data = json.loads((GOLDEN / f"{name}.json").read_text())
    extra = {k: data.pop(k) for k in ("settings_key", "cache")}  # RankResult's, not the ranking's
    assert extra["cache"]
    ranking = Ranking.from_json(data)
    out = ranking.to_json()
    assert [r.pop("fingerprint") for r in out["checkpoints"]] == [None] * len(out["checkpoints"])  # not in the golden
    for r in out["checkpoints"]:  # columns added after the goldens were written (tests/test_golden.py): not in them
        assert [r.pop(key) for key in ADDED_KEYS] == [None] * len(ADDED_KEYS)
    assert out == data
    assert len(ranking.checkpoints) == len(data["checkpoints"]) and ranking.recommended == data["recommended"]["index"]


def test_missing_optional_fields_take_their_defaults():
    ranking = Ranking.from_json({"checkpoints": [{"path": "/r/checkpoint-1", "premem_acc": 0.3}, {"fingerprint": "f"}],
                                 "recommended": {"index": 0}})
    first, second = ranking.checkpoints
    assert (first.index, first.path, first.step, first.premem_acc) == (0, "/r/checkpoint-1", None, 0.3)
    assert math.isnan(first.train_acc) and math.isnan(first.premem_ci[1]) and first.flag is None
    assert (second.index, second.path, second.fingerprint) == (1, "", "f")
    assert ranking.recommended == 0 and ranking.runs == [] and ranking.threshold.rule == "nll"
    assert ranking.n_examples == 0 and ranking.rule == "" and math.isnan(ranking.alt_coverage)
    nulls = Ranking.from_json({"rule": None, "n_examples": None, "stage_rule": None, "warnings": None})
    assert (nulls.rule, nulls.n_examples, nulls.stage_rule, nulls.warnings) == ("", 0, "", [])


@pytest.mark.parametrize("data, message", [
    ([], "ranking: expected an object, got []"),
    ({"checkpoints": {}}, "checkpoints: expected a list, got {}"),
    ({"checkpoints": [{"premem_acc": "high"}]}, "checkpoints[0].premem_acc: expected a number, got 'high'"),
    ({"checkpoints": [{"step": 1.5}]}, "checkpoints[0].step: expected an integer, got 1.5"),
    ({"checkpoints": [{"premem_ci": [0.1]}]}, "checkpoints[0].premem_ci: expected two numbers, got [0.1]"),
    ({"checkpoints": [{"flag": {"reason": "memorised"}}]}, "checkpoints[0].flag: no 'train_acc'"),
    ({"checkpoints": [{}], "recommended": {"index": 1}}, "recommended.index: 1 is not a checkpoint of the ranking"),
    ({"checkpoints": [{}], "recommended": {"step": 1}}, "recommended: no 'index'"),
    ({"threshold": {"used": "auto"}}, "threshold.used: expected a number, got 'auto'"),
    ({"checkpoints": [{"step": 1}], "alt_sources": [2]}, "alt_sources: step 2 is not a checkpoint of the ranking"),
])
def test_a_malformed_ranking_is_one_line_naming_the_field(data, message):
    with pytest.raises(CkptselError) as err:
        Ranking.from_json(data)
    assert str(err.value).startswith(message)
