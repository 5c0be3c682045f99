"""Over-memorization proxies: perturbations, alternative-solution harvesting, and their collection on a tiny run."""

from __future__ import annotations

import pytest

from ckptsel import proxies as P
from ckptsel.data import Example
from ckptsel.settings import ProxySettings
from ckptsel.store import Record

pytestmark = pytest.mark.filterwarnings("ignore")


# Graders for the tiny runs below, reached as python:test_proxies:<name>. The tiny models never
# answer correctly, so "correct" is decided by the sample text itself.
def any_answer(completion: str, reference: str) -> bool:
    return True


def odd_length(completion: str, reference: str) -> bool:
    return len(completion) % 2 == 1


# --------------------------------------------------------------------------- perturbations


def test_perturbations_of_a_two_line_prompt():
    prompt = "Question: 2+3?\nAnswer:"
    assert P.PERTURBATIONS["preamble"](prompt) == "Here is a problem.\n\nQuestion: 2+3?\nAnswer:"
    assert P.PERTURBATIONS["format"](prompt) == "Question: 2+3?\n\nAnswer:"
    assert P.PERTURBATIONS["instruction"](prompt) == "Question: 2+3?\nSolve it step by step.\nAnswer:"


def test_perturbations_of_a_one_line_prompt_keep_its_trailing_newline():
    prompt = "7+3+5=?\n"
    assert P.PERTURBATIONS["format"](prompt) == "7+3+5=?\n\n"
    assert P.PERTURBATIONS["instruction"](prompt) == "7+3+5=?\nSolve it step by step.\n"
    assert P.PERTURBATIONS["format"]("7+3=?") == "\n7+3=?"
    assert P.PERTURBATIONS["instruction"]("7+3=?") == "7+3=?\nSolve it step by step."


def test_perturb_series_names_what_the_perturbations_do():
    a = P.perturb_series(("preamble", "format", "instruction"))
    assert a.startswith("perturb:") and a == P.perturb_series(("preamble", "format", "instruction"))
    assert P.perturb_series(("preamble", "format")) != a
    with pytest.raises(ValueError, match="nope"):
        P.perturb_series(("nope",))


# --------------------------------------------------------------------------- alternative solutions


def test_alternative_solution_is_the_first_correct_non_target_sample():
    target = "2+3=5\n#### 5"
    samples = ["3+2=6\n#### 6", "2+3=5\n####  5 ", "3+2=5\n#### 5", "2+3=5\n#### 5"]
    correct = [False, True, True, True]
    # The second sample is the target up to whitespace: a copy, not an alternative.
    assert P.alternative_solution(samples, correct, target) == "3+2=5\n#### 5"
    assert P.alternative_solution(samples[:2], correct[:2], target) is None
    # 3 of 4 correct: enough for min_accuracy 0.75, not for 0.8 (the question is not answered reliably).
    assert P.alternative_solution(samples, correct, target, min_accuracy=0.75) == "3+2=5\n#### 5"
    assert P.alternative_solution(samples, correct, target, min_accuracy=0.8) is None


def _examples(n: int) -> list[Example]:
    return [Example(i, f"u{i}", f"q{i}", str(i), f"q{i}\n", f"t{i}") for i in range(n)]


def _records(texts: dict[str, list[str]]) -> dict[str, Record]:
    return {uid: Record(samples=tuple(samples)) for uid, samples in texts.items()}


def grade_ok(text: str, reference: str) -> bool:
    return text.startswith("ok")


def test_harvest_fixes_the_set_once_it_covers_enough():
    ex = _examples(4)
    uids = [e.uid for e in ex]
    rule = ProxySettings(alt_min_coverage=0.5, alt_max_sources=3)
    h = P.Harvest()
    # Checkpoint A: no correct sample at all -> not a source, set stays open.
    h.harvest("A", _records({u: ["bad"] for u in uids}), ex, grade_ok)
    assert h.sources == [] and not h.decide(uids, rule)
    # Checkpoint B: one example (u1) has an alternative -> a source, coverage 1/4 < 0.5: open.
    h.harvest("B", _records({"u0": ["bad"], "u1": ["ok-b1", "ok-b1x"], "u2": ["t2"], "u3": ["bad"]}), ex, grade_ok)
    assert h.sources == ["B"] and h.coverage(uids) == 0.25 and not h.decide(uids, rule)
    # Checkpoint C adds u0 and u1 again: u1 keeps B's (the first source), coverage 2/4: fixed.
    h.harvest("C", _records({"u0": ["ok-c0"], "u1": ["ok-c1"], "u2": ["bad"], "u3": ["bad"]}), ex, grade_ok)
    assert h.decide(uids, rule) and h.sources == ["B", "C"]
    assert h.solutions(uids) == {"u0": "ok-c0", "u1": "ok-b1"}
    # A fixed set ignores later checkpoints.
    series = h.series
    h.harvest("D", _records({u: ["ok-d"] for u in uids}), ex, grade_ok)
    assert h.sources == ["B", "C"] and h.coverage(uids) == 0.5 and h.series == series
    assert P.Harvest.from_json(h.to_json()) == h


def test_a_fixed_set_fills_new_examples_from_its_own_sources_only():
    h = P.Harvest(sources=["B", "C"], found={"B": {"u0": None}, "C": {"u0": "ok-c0"}}, fixed=True)
    new = _examples(2)  # u1 joins (a larger --max-examples)
    assert h.solution("u1") is None
    h.harvest("B", _records({"u1": ["bad"]}), new, grade_ok)
    assert h.solution("u1") is None  # looked up in B only so far: undecided
    h.harvest("C", _records({"u1": ["ok-c1"]}), new, grade_ok)
    assert h.solutions(["u0", "u1"]) == {"u0": "ok-c0", "u1": "ok-c1"}
    assert h.harvest("Z", _records({"u1": ["ok-z"]}), new, grade_ok) == 0


# --------------------------------------------------------------------------- collection on a tiny run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from ckptsel.lab.quick import train_tiny_run

    return train_tiny_run(tmp_path_factory.mktemp("proxies") / "run", n_checkpoints=3, n_test=4)


def _collect(run, cache, grader: str, checkpoints=None, **proxy):
    from ckptsel.collect import collect
    from ckptsel.data import load_examples
    from ckptsel.discover import discover
    from ckptsel.measure.loading import load_tokenizer
    from ckptsel.recipes import load_recipe, override
    from ckptsel.store import Store

    ckpts = discover([run]) if checkpoints is None else checkpoints
    recipe = override(load_recipe(str(run / "recipe.yaml")), sampling={"k": 2, "max_new_tokens": 12},
                      data={"grader": grader})
    tokenizer = load_tokenizer(ckpts[0])
    examples = load_examples(run / "train.jsonl", recipe, tokenizer=tokenizer)[:6]
    heldout = load_examples(run / "test.jsonl", recipe, tokenizer=tokenizer)[:3]
    with Store.open(cache) as store:
        collected = collect(ckpts, examples, recipe, store, tokenizer=tokenizer, heldout=heldout,
                            proxy_settings=ProxySettings(**proxy))
        from ckptsel.select import measured_matrices

        matrices = measured_matrices(collected, store)
    return collected, matrices


def test_proxies_in_one_pass_with_a_stable_alternative_set(tiny, tmp_path):
    import numpy as np

    from ckptsel.discover import discover

    first, m = _collect(tiny, tmp_path, "python:test_proxies:any_answer")
    assert first.failures == {}
    assert first.loaded == 3  # one load per checkpoint: the first checkpoint's samples fixed the set
    h = first.harvest
    assert h.fixed and h.sources == [first.fingerprints[0]] and h.coverage(e.uid for e in first.examples) == 1.0
    # Every proxy measured for every checkpoint and example.
    for name, shape in [("alt", (3, 6)), ("perturb", (3, 6)), ("heldout", (3, 3)), ("entropy", (3, 6))]:
        assert m[name].shape == shape and not np.isnan(m[name]).any(), name
    assert (m["alt"] != m["nll"]).all()  # a different text than the target was scored
    # Three perturbations change the scored context: the perturbed NLL differs from the plain one.
    assert (m["perturb"] != m["nll"]).all()

    again, m2 = _collect(tiny, tmp_path, "python:test_proxies:any_answer")
    assert again.loaded == 0 and again.harvest == h
    np.testing.assert_array_equal(m2["alt"], m["alt"])

    # Incremental: a fresh cache that sees two checkpoints, then three, ends with the same set.
    ckpts = discover([tiny])
    part, _ = _collect(tiny, tmp_path / "inc", "python:test_proxies:any_answer", checkpoints=ckpts[:2])
    full, m3 = _collect(tiny, tmp_path / "inc", "python:test_proxies:any_answer", checkpoints=ckpts)
    assert part.loaded == 2 and full.loaded == 1
    assert full.harvest == h
    np.testing.assert_allclose(m3["alt"], m["alt"])


ODD = {"alt_grader": "python:test_proxies:odd_length", "alt_min_coverage": 1.0, "alt_max_sources": 2,
       "alt_min_accuracy": 0.0}


def test_a_set_fixed_late_costs_one_more_load_for_the_earlier_checkpoints(tiny, tmp_path):
    # Every sample is correct, but only odd-length ones count as alternative solutions (alt_grader),
    # and the set needs full coverage: the first checkpoint cannot fix it, the second does (max 2
    # sources), so the first is loaded once more for its alternative scores.
    collected, m = _collect(tiny, tmp_path, "python:test_proxies:any_answer", **ODD)
    h = collected.harvest
    assert h.fixed and h.sources == collected.fingerprints[:2]
    assert collected.loaded == 4
    assert collected.measured == {0, 1, 2}  # the revisit is a load, not another measured checkpoint
    import numpy as np

    covered = [i for i, e in enumerate(collected.examples) if h.solution(e.uid) is not None]
    assert covered and not np.isnan(m["alt"][:, covered]).any()
    assert all(len(h.solution(collected.examples[i].uid)) % 2 == 1 for i in covered)
    rerun, _ = _collect(tiny, tmp_path, "python:test_proxies:any_answer", **ODD)
    assert rerun.loaded == 0 and rerun.harvest == h
