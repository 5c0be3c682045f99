"""Pathway metrics on hand-made router outputs with known pathways and distances."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ckptsel import pathways as pw
from ckptsel.pathways import (
    consistency_from_cosines,
    layer_cosines,
    mean_pairwise_distance,
    pathway,
    pathway_consistency,
    pathway_distance,
    pathways,
)


def levenshtein(a, b) -> int:
    """Textbook dynamic programme, independent of rapidfuzz."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def brute_mean(seqs) -> float:
    pairs = list(itertools.combinations(seqs, 2))
    return sum(levenshtein(a, b) for a, b in pairs) / len(pairs)


# --- pathways ---------------------------------------------------------------


def test_pathway_keeps_experts_until_cutoff_and_tags_layers():
    w = np.array(
        [
            [0.05, 0.5, 0.3, 0.15],  # 1 (0.5), 2 (0.8): reached -> stop
            [0.1, 0.1, 0.7, 0.1],  # 2 (0.7), then 0 (ties by id) -> 0.8
            [0.25, 0.25, 0.25, 0.25],  # 0, 1, 2, 3: 0.75 < 0.8 needs the fourth
        ]
    )
    assert pathway(w).tolist() == [1, 2, 4 + 2, 4 + 0, 8, 9, 10, 11]
    assert pathway(w, order="expert").tolist() == [1, 2, 4, 6, 8, 9, 10, 11]
    assert pathway(w, cutoff=0.5).tolist() == [1, 6, 8, 9]
    assert pathway(w, cutoff=1.0).tolist() == [1, 2, 3, 0, 6, 0 + 4, 5, 7, 8, 9, 10, 11]


def test_pathway_cutoff_is_a_fraction_of_the_layer_total_in_float32():
    # float32 router averages: 0.5 + 0.3 lands a rounding error away from 0.8 and still counts.
    w = np.array([[0.5, 0.3, 0.2, 0.0]], dtype=np.float32)
    assert pathway(w).tolist() == [0, 1]
    assert pathway(w * 3.0).tolist() == [0, 1]


def test_pathways_batch_equals_one_at_a_time():
    rng = np.random.default_rng(1)
    w = rng.dirichlet(np.ones(8), size=(5, 3))
    for order in ("weight", "expert"):
        batch = pathways(w, 0.7, order)
        assert [p.tolist() for p in batch] == [pathway(w[i], 0.7, order).tolist() for i in range(5)]
    assert pathways(np.zeros((0, 3, 8))) == []


@pytest.mark.parametrize(
    "weights, cutoff",
    [(np.ones((2, 4)), 0.8), (np.full((1, 2, 4), np.nan), 0.8), (np.ones((1, 2, 4)), 0.0), (-np.ones((1, 2, 4)), 0.8)],
)
def test_pathways_rejects_bad_input(weights, cutoff):
    with pytest.raises(ValueError):
        pathways(weights, cutoff)


# --- distance ---------------------------------------------------------------


def test_distance_of_hand_made_pathways():
    # E=4, two layers. A: layer 0 {0,1}, layer 1 {2}; B: layer 0 {2}, layer 1 {0,1}.
    a = np.array([0, 1, 4 + 2])
    b = np.array([2, 4 + 0, 4 + 1])
    result = pathway_distance([a, b, a], num_experts=4, num_layers=2)
    # d(a,b)=3 (three substitutions, one across the layer boundary), d(a,a)=0: (3+3+0)/3.
    assert result.mean == pytest.approx(2.0)
    # Per layer: {0,1} vs {2} and {2} vs {0,1} are 2 each -> (2+2+0)/3, less than the whole's
    # sum (4): the whole sequence may substitute across the boundary.
    assert result.per_layer.tolist() == pytest.approx([4 / 3, 4 / 3])
    assert (result.n_examples, result.n_unique) == (3, 2)
    assert result.mean_length == pytest.approx(3.0)


def test_layer_tags_keep_experts_of_different_layers_apart():
    # Untagged, [0,1,2,3] vs [3,0,1,2] is 2 edits; tagged, no symbol is shared: 4.
    a = np.array([0, 1, 2, 4 + 3])
    b = np.array([3, 4 + 0, 4 + 1, 4 + 2])
    assert levenshtein([0, 1, 2, 3], [3, 0, 1, 2]) == 2
    assert pathway_distance([a, b], num_experts=4, num_layers=2).mean == 4.0


def test_shared_pathways_have_zero_distance_and_one_unique():
    same = [np.array([1, 5, 6])] * 50
    result = pathway_distance(same, num_experts=4, num_layers=2)
    assert result.mean == 0.0 and result.n_unique == 1
    assert result.per_layer.tolist() == [0.0, 0.0]


def test_fewer_than_two_pathways_give_nan():
    assert np.isnan(pathway_distance([np.array([1, 5])], 4, 2).mean)
    assert np.isnan(pathway_distance([], 4, 2).mean)
    assert pathway_distance([], 4, 2).as_dict()["mean"] is None


def test_mean_pairwise_matches_textbook_dp_with_duplicates_and_blocks(monkeypatch):
    rng = np.random.default_rng(0)
    seqs = ["".join(rng.choice(list("abcdef"), size=rng.integers(0, 9))) for _ in range(25)]
    seqs += seqs[:7]  # duplicates exercise the c^T D c sum
    expected = brute_mean(seqs)
    assert mean_pairwise_distance(seqs) == pytest.approx(expected)
    monkeypatch.setattr(pw, "_CELLS_PER_CALL", 40)  # force row blocks of the upper triangle
    assert mean_pairwise_distance(seqs, workers=1) == pytest.approx(expected)
    ints = [[ord(c) for c in s] for s in seqs]
    assert mean_pairwise_distance(ints) == pytest.approx(expected)


def test_symbol_encoding_preserves_equality_beyond_one_byte():
    rng = np.random.default_rng(3)
    paths = [rng.integers(0, 70_000, size=rng.integers(1, 6)) for _ in range(12)]
    paths[5] = paths[2].copy()
    expected = brute_mean([p.tolist() for p in paths])
    assert pathway_distance(paths, num_experts=70_000, num_layers=1).mean == pytest.approx(expected)


def test_more_distinct_symbols_than_a_string_holds_fall_back_to_integer_lists(monkeypatch):
    monkeypatch.setattr(pw, "_STR_CODES", 5)  # as if beyond the surrogate range (0xD800 symbols)
    rng = np.random.default_rng(6)
    paths = [rng.choice(40, size=rng.integers(3, 9), replace=False) for _ in range(12)]
    paths[7] = paths[3].copy()
    assert isinstance(pw._as_strings(paths)[0], list)
    result = pathway_distance(paths, num_experts=40, num_layers=1)
    assert result.n_unique == 11
    assert result.mean == pytest.approx(brute_mean([p.tolist() for p in paths]))


def test_per_layer_matches_segments():
    rng = np.random.default_rng(4)
    paths = pathways(rng.dirichlet(np.ones(6), size=(15, 3)), 0.6)
    result = pathway_distance(paths, num_experts=6, num_layers=3)
    for layer in range(3):
        segments = [(p[p // 6 == layer] % 6).tolist() for p in paths]
        assert result.per_layer[layer] == pytest.approx(brute_mean(segments))
    assert result.mean == pytest.approx(brute_mean([p.tolist() for p in paths]))


def test_per_layer_with_empty_segments():
    # E=4: layer 0 segments [0,1], [], [2]; layer 1 segments [], [0], [] (an example may skip a layer).
    result = pathway_distance([np.array([0, 1]), np.array([4]), np.array([2])], num_experts=4, num_layers=2)
    assert result.per_layer.tolist() == pytest.approx([(2 + 2 + 1) / 3, (1 + 0 + 1) / 3])
    assert result.mean == pytest.approx((2 + 2 + 1) / 3)  # [0,1] vs [4]: 2; [0,1] vs [2]: 2; [4] vs [2]: 1


def test_max_examples_subsamples_reproducibly_and_estimates_the_mean():
    rng = np.random.default_rng(5)
    paths = pathways(rng.dirichlet(np.full(8, 0.5), size=(400, 4)), 0.8)
    full = pathway_distance(paths, 8, 4).mean
    sub = pathway_distance(paths, 8, 4, max_examples=150, seed=1)
    assert sub.n_examples == 150
    assert sub.mean == pathway_distance(paths, 8, 4, max_examples=150, seed=1).mean
    assert sub.mean != pathway_distance(paths, 8, 4, max_examples=150, seed=2).mean
    assert sub.mean == pytest.approx(full, rel=0.05)


def test_below_the_pair_budget_the_distance_is_the_exact_all_pairs_mean():
    rng = np.random.default_rng(7)
    paths = pathways(rng.dirichlet(np.ones(6), size=(20, 3)), 0.8)  # <= 190 distinct pairs
    got = pathway_distance(paths, 6, 3, max_pairs=190)
    assert got.exact and got.stderr == 0.0 and got.per_layer_stderr.tolist() == [0.0] * 3
    assert got.mean == pytest.approx(brute_mean([p.tolist() for p in paths]))
    assert got.as_dict()["exact"] is True and got.as_dict()["stderr"] == 0.0


def test_the_budget_counts_distinct_pathways_not_examples():
    a, b, c = np.array([0, 4]), np.array([1, 5]), np.array([2, 4])
    got = pathway_distance([a, b, c] * 100, 4, 2, max_pairs=3)  # 44,850 pairs of examples, 3 distinct
    assert got.exact
    assert got.mean == pytest.approx((2 + 1 + 2) * 100 * 100 / (300 * 299 / 2))  # d(a,b)=2, d(a,c)=1, d(b,c)=2


def test_above_the_pair_budget_a_seeded_estimate_with_its_standard_error():
    rng = np.random.default_rng(8)
    paths = pathways(rng.dirichlet(np.full(8, 0.7), size=(300, 4)), 0.8)
    exact = pathway_distance(paths, 8, 4)
    got = pathway_distance(paths, 8, 4, max_pairs=2000, seed=3)
    assert not got.exact and got.as_dict()["exact"] is False
    assert 0.0 < got.stderr < 0.05 * exact.mean  # sd / sqrt(2000): a few percent of the mean at most
    assert abs(got.mean - exact.mean) < 4 * got.stderr
    assert got.mean != exact.mean  # an estimate, not the exact value by another route
    # Every layer is over budget too and shares the sampled pairs; each within a few of its standard errors.
    assert (got.per_layer_stderr > 0).all()
    assert np.all(np.abs(got.per_layer - exact.per_layer) < 4 * got.per_layer_stderr)
    again = pathway_distance(paths, 8, 4, max_pairs=2000, seed=3)
    assert (again.mean, again.stderr) == (got.mean, got.stderr)
    assert pathway_distance(paths, 8, 4, max_pairs=2000, seed=4).mean != got.mean


def test_sampled_pairs_are_distinct_examples_and_uniform_over_unordered_pairs():
    first, second = pw.sample_pairs(3, 30_000, np.random.default_rng(0))
    assert (first != second).all()
    pairs = np.sort(np.stack([first, second]), axis=0)
    _, counts = np.unique(pairs, axis=1, return_counts=True)
    assert len(counts) == 3 and np.allclose(counts / 30_000, 1 / 3, atol=0.02)


def test_max_examples_applies_before_the_pair_budget():
    rng = np.random.default_rng(9)
    paths = pathways(rng.dirichlet(np.ones(8), size=(200, 4)), 0.8)
    subset = pathway_distance(paths, 8, 4, max_examples=60, seed=2)
    both = pathway_distance(paths, 8, 4, max_examples=60, max_pairs=500, seed=2)
    assert subset.exact and both.n_examples == subset.n_examples == 60 and not both.exact
    assert abs(both.mean - subset.mean) < 4 * both.stderr  # estimates the subset's all-pairs mean


# --- consistency ------------------------------------------------------------


def test_consistency_on_hand_made_gate_vectors():
    eye = np.eye(2)
    gates = np.stack([eye, eye, -eye])  # layer 2's expert vectors point the other way
    weights = np.array(
        [
            [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]],  # cos: 1 then -1
            [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]],  # cos: 0 then -1
            [[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]],  # cos: 1/sqrt2 then 0
        ]
    )
    result = pathway_consistency(weights, gates)
    r = 1 / np.sqrt(2)
    assert result.per_example.tolist() == pytest.approx([0.0, -0.5, r / 2])
    assert result.per_pair.tolist() == pytest.approx([(1 + 0 + r) / 3, (-1 - 1 + 0) / 3])
    assert result.consistency == pytest.approx((0.0 - 0.5 + r / 2) / 3)
    assert result.complexity == pytest.approx(1 - result.consistency)


def test_consistency_is_one_for_a_shared_direction_and_ignores_scale():
    gates = np.stack([np.eye(3), 4.0 * np.eye(3)])  # same directions, different lengths
    weights = np.array([[[0.2, 0.3, 0.5], [0.2, 0.3, 0.5]]])
    result = pathway_consistency(weights, gates)
    assert result.consistency == pytest.approx(1.0) and result.complexity == pytest.approx(0.0)


def test_zero_embedding_is_left_out_not_counted_as_zero():
    gates = np.stack([np.eye(2), np.array([[1.0, 0.0], [0.0, 0.0]])])
    weights = np.array([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]])  # second: e_1 = 0
    result = pathway_consistency(weights, gates)
    assert np.isnan(result.per_example[1])
    assert result.consistency == pytest.approx(1.0)
    assert result.as_dict()["per_pair"] == [pytest.approx(1.0)]


def test_consistency_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        pathway_consistency(np.ones((2, 3, 4)), np.ones((3, 5, 8)))


def test_stored_cosines_give_the_same_consistency_for_any_subset():
    rng = np.random.default_rng(7)
    weights, gates = rng.dirichlet(np.ones(4), size=(30, 3)), rng.normal(size=(3, 4, 16))
    cos = layer_cosines(weights, gates)
    assert cos.shape == (30, 2)
    subset = rng.random(30) < 0.5
    direct = pathway_consistency(weights[subset], gates)
    stored = consistency_from_cosines(cos[subset])
    assert stored.consistency == pytest.approx(direct.consistency)
    assert np.allclose(stored.per_pair, direct.per_pair)
    empty = consistency_from_cosines(cos[:0])
    assert np.isnan(empty.consistency) and empty.per_pair.shape == (2,)


# --- per checkpoint, from stored records (what ckptsel rank reports) ---------


def test_pathway_metrics_from_stored_records_use_only_memorised_examples():
    from ckptsel.select import pathway_metrics
    from ckptsel.settings import PathwaySettings
    from ckptsel.store import Record

    # 2 layers x 3 experts; at cut-off 0.5 each layer keeps its top expert only.
    w = {
        "a": [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]],  # pathway (0, 4)
        "b": [[0.1, 0.6, 0.3], [0.1, 0.8, 0.1]],  # (1, 4): distance 1 from a
        "c": [[0.1, 0.2, 0.7], [0.1, 0.1, 0.8]],  # (2, 5): distance 2 from a and b, but not memorised
    }
    cos = {"a": [0.5], "b": [0.1], "c": [-1.0]}
    records = {u: Record(nll=0.0, array=np.array(w[u], np.float16), data={"layer_cos": cos[u]}) for u in w}
    records["d"] = Record(nll=0.0)  # measured before routing was captured: left out
    uids = ["a", "b", "c", "d"]
    got = pathway_metrics(records, uids, np.array([True, True, False, True]), PathwaySettings(cutoff=0.5))
    assert got.distance == pytest.approx(1.0) and got.n_examples == 2 and got.n_unique == 2
    assert got.per_layer["distance"] == pytest.approx([1.0, 0.0])
    assert got.consistency == pytest.approx(0.3) and got.complexity == pytest.approx(0.7)
    assert got.per_layer["consistency"] == pytest.approx([0.3]) and got.mean_length == 2.0
    everything = pathway_metrics(records, uids, np.ones(4, bool), PathwaySettings(cutoff=0.5))
    assert everything.distance == pytest.approx((1 + 2 + 2) / 3) and everything.n_examples == 3
    assert everything.distance_exact and everything.distance_stderr == 0.0
    sampled = pathway_metrics(records, uids, np.ones(4, bool), PathwaySettings(cutoff=0.5, max_pairs=2))
    assert not sampled.distance_exact and sampled.distance_stderr > 0
    assert len(sampled.per_layer["distance_stderr"]) == 2
    none = pathway_metrics(records, uids, np.zeros(4, bool), PathwaySettings())
    assert np.isnan(none.distance) and np.isnan(none.complexity) and none.n_examples == 0
    assert len(none.per_layer["distance"]) == 2
    no_routing = {"d": Record(nll=0.0), "e": Record(nll=0.0, array=np.zeros(0, np.float16))}
    assert pathway_metrics(no_routing, ["d", "e"], np.ones(2, bool), PathwaySettings()) is None
