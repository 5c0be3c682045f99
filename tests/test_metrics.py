"""ckptsel.metrics on hand-made arrays whose answers are worked out in the comments."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from ckptsel import metrics as M

NAN = np.nan


def naive_premem(acc, nll, threshold):
    """PM_i(J) written straight from the formula with loops, as an independent reference."""
    n_ckpt, n_ex = acc.shape
    out = np.full((n_ckpt, n_ex), NAN)
    for i in range(n_ex):
        for J in range(n_ckpt):
            if np.isnan(acc[J, i]):
                continue
            best = 0.0
            for j in range(J + 1):
                if not np.isnan(acc[j, i]) and nll[j, i] >= threshold:
                    best = max(best, acc[j, i])
            out[J, i] = min(best, acc[J, i])
    return out


# --- memorisation indicators ------------------------------------------------


def test_memorized_rules_and_nan():
    nll = np.array([0.05, 0.1, 0.2, NAN])
    assert M.memorized(nll, 0.1).tolist() == [True, False, False, False]
    copies = np.array([0.4, 0.5, 1.0, NAN])
    assert M.memorized_by_copy(copies).tolist() == [False, True, True, False]
    assert M.memorized_by_copy(copies, fraction=0.8).tolist() == [False, False, True, False]


def test_first_memorized():
    nll = np.array(
        [
            [0.50, 0.05, 0.5],
            [0.05, 0.01, 0.5],
            [0.50, 0.50, 0.5],  # example 0 un-memorises again: still first memorised at 1
        ]
    )
    assert M.first_memorized(M.memorized(nll, 0.1)).tolist() == [1, 0, -1]
    assert M.first_memorized(M.memorized_by_copy(np.array([[0.0, 1.0], [0.6, 0.2]]))).tolist() == [1, 0]


# --- pre-memorization accuracy --------------------------------------------------


# Three checkpoints x three examples, threshold 0.1:
#   ex 0: acc .4 .8 .2, memorised from j=1 -> credit .4 0 0 -> running max .4 .4 .4
#         PM = min(.4,.4) min(.4,.8) min(.4,.2) = .4 .4 .2  (the min bites at j=2)
#   ex 1: acc .2 .6 1., memorised at j=2   -> credit .2 .6 0 -> PM .2 .6 .6
#   ex 2: memorised from the start          -> PM 0 0 0
ACC = np.array([[0.4, 0.2, 1.0], [0.8, 0.6, 1.0], [0.2, 1.0, 1.0]])
NLL = np.array([[0.5, 0.5, 0.01], [0.05, 0.5, 0.01], [0.05, 0.05, 0.01]])


def test_premem_per_example_by_hand():
    expected = np.array([[0.4, 0.2, 0.0], [0.4, 0.6, 0.0], [0.2, 0.6, 0.0]])
    np.testing.assert_allclose(M.premem_accuracy_per_example(ACC, NLL, 0.1), expected)


def test_premem_accuracy_by_hand():
    np.testing.assert_allclose(M.premem_accuracy(ACC, NLL, 0.1), [0.6 / 3, 1.0 / 3, 0.8 / 3])
    # A looser threshold memorises nothing: PM_i(J) = max_{j<=J} acc_ij capped by acc_iJ = acc_iJ
    # except where accuracy fell (ex 0 at j=2 keeps .2 because of the min).
    np.testing.assert_allclose(M.premem_accuracy(ACC, NLL, 0.001), M.train_accuracy(ACC))


def test_premem_matches_loop_reference_on_random_data():
    rng = np.random.default_rng(3)
    acc = rng.integers(0, 6, size=(7, 40)) / 5.0
    nll = rng.uniform(0.0, 0.3, size=(7, 40))
    acc[rng.random(acc.shape) < 0.1] = NAN
    nll[rng.random(nll.shape) < 0.1] = NAN
    np.testing.assert_allclose(
        M.premem_accuracy_per_example(acc, nll, 0.12), naive_premem(acc, nll, 0.12), equal_nan=True
    )


def test_premem_nan_policy():
    acc = np.array([[0.5, NAN], [0.5, 1.0], [NAN, NAN]])
    nll = np.array([[NAN, 0.5], [0.5, 0.5], [0.5, 0.5]])
    per_example = M.premem_accuracy_per_example(acc, nll, 0.1)
    # ex 0: j=0 nll unknown -> no credit, PM 0; j=1 credit .5 -> PM .5; j=2 not measured -> NaN.
    # ex 1: j=0 not measured -> NaN; j=1 -> 1.0.
    np.testing.assert_allclose(per_example, [[0.0, NAN], [0.5, 1.0], [NAN, NAN]], equal_nan=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an all-NaN checkpoint must not warn
        np.testing.assert_allclose(M.premem_accuracy(acc, nll, 0.1), [0.0, 0.75, NAN], equal_nan=True)


def test_premem_copy_rule_mask_variant():
    acc = np.array([[0.6, 0.2], [1.0, 0.8]])
    copies = np.array([[0.2, 0.0], [0.8, 0.4]])
    # ex 0 copies at j=1 -> credit .6 0 -> PM .6 .6; ex 1 never copies -> PM .2 .8
    per_example = M.premem_accuracy_per_example_from_mask(acc, M.memorized_by_copy(copies))
    np.testing.assert_allclose(per_example, [[0.6, 0.2], [0.6, 0.8]])
    np.testing.assert_allclose(M.premem_accuracy_from_mask(acc, M.memorized_by_copy(copies)), [0.4, 0.7])


def test_premem_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="checkpoints, examples"):
        M.premem_accuracy_per_example_from_mask(np.zeros((2, 3)), np.zeros((3, 2), dtype=bool))


# --- per-checkpoint summaries -------------------------------------------------


def test_named_means():
    acc = np.array([[0.0, 1.0, NAN], [0.5, 0.5, 1.0]])
    np.testing.assert_allclose(M.train_accuracy(acc), [0.5, 2.0 / 3])
    np.testing.assert_allclose(M.copy_rate(np.array([[0.2, 0.4]])), [0.3])
    nll = np.array([[0.05, 0.5, NAN], [0.05, 0.05, 0.5]])
    frac = M.memorized_fraction(M.memorized(nll, 0.1), ~np.isnan(nll))
    np.testing.assert_allclose(frac, [0.5, 2.0 / 3])  # the NaN is left out, not counted as 0
    np.testing.assert_allclose(M.memorized_fraction(M.memorized(nll, 0.1)), [1.0 / 3, 2.0 / 3])


def test_support_diagnostic():
    # Four examples, three checkpoints; mask True = memorised.
    mask = np.array(
        [
            [True, True, False, False],
            [True, False, True, False],
            [True, False, True, False],
        ]
    )
    acc = np.array(
        [
            [1.0, 1.0, NAN, 0.5],  # ex 2 unmeasured before its memorisation at j=1
            [1.0, 1.0, 1.0, 0.5],
            [1.0, 1.0, 1.0, 0.5],
        ]
    )
    support = M.premem_support(acc, mask)
    assert support.n_examples == 4
    assert support.memorized_at_first == pytest.approx(2 / 3)  # of the 3 measured at j=0
    # No evidence: ex 0 and ex 1 (memorised at j=0) and ex 2 (unmeasured at j=0); ex 3 has it.
    assert support.no_evidence == pytest.approx(0.75)
    assert "67% of examples are already memorised" in support.warning(0.5)
    assert "save earlier or more frequent checkpoints" in support.warning(0.5)
    assert support.warning(0.7).startswith("75% of examples were never measured")
    assert support.warning(0.9) is None


# --- bootstrap ----------------------------------------------------------------


def test_bootstrap_constant_rows_have_zero_width():
    lo, hi = M.bootstrap_ci(np.array([[0.3] * 50, [1.0] * 50]), n_boot=200)
    np.testing.assert_allclose(lo, [0.3, 1.0])
    np.testing.assert_allclose(hi, [0.3, 1.0])


def test_bootstrap_width_matches_standard_error():
    # 400 Bernoulli(1/2) values with exactly 200 ones: SE = 0.5 / 20 = 0.025, so the 95%
    # interval is about 0.5 +- 1.96 * 0.025 = [0.451, 0.549].
    values = np.tile([0.0, 1.0], 200)[None, :]
    lo, hi = M.bootstrap_ci(values, n_boot=2000, seed=1)
    assert lo[0] == pytest.approx(0.451, abs=0.008)
    assert hi[0] == pytest.approx(0.549, abs=0.008)


def test_bootstrap_is_paired_and_seeded():
    rng = np.random.default_rng(0)
    x = rng.random(300)
    values = np.vstack([x, x + 0.1])
    lo, hi = M.bootstrap_ci(values, n_boot=500, seed=7)
    # Same resampled indices for both rows: the second row's means are exactly shifted.
    np.testing.assert_allclose(lo[1] - lo[0], 0.1, atol=1e-12)
    np.testing.assert_allclose(hi[1] - hi[0], 0.1, atol=1e-12)
    again = M.bootstrap_ci(values, n_boot=500, seed=7)
    other = M.bootstrap_ci(values, n_boot=500, seed=8)
    assert again[0].tolist() == lo.tolist()
    assert other[0][0] != lo[0]


def test_bootstrap_chunks_and_nan():
    # 10,000 examples -> 400 draws per chunk, so 1,000 draws take three chunks.
    values = np.tile([0.0, 1.0], 5000)[None, :].repeat(2, axis=0)
    values[1, :5000] = NAN  # row 1 keeps 2,500 zeros and 2,500 ones
    lo, hi = M.bootstrap_ci(values, n_boot=1000, seed=0)
    half_width = hi - lo
    # SE 0.5/100 = 0.005 -> width ~0.0196; row 1 has half the examples -> ~0.0277.
    assert half_width[0] == pytest.approx(0.0196, rel=0.15)
    assert half_width[1] == pytest.approx(0.0277, rel=0.15)
    all_nan = M.bootstrap_ci(np.full((1, 5), NAN), n_boot=50)
    assert np.isnan(all_nan[0]).all() and np.isnan(all_nan[1]).all()


# --- calibration ----------------------------------------------------------------


def test_paired_gap_by_hand():
    values = np.array([
        [1.0, 0.0, 1.0, 1.0],  # d to row 2: [0, -1, 0, 0]: mean -0.25, sd 0.5, se 0.25
        [1.0, NAN, 0.0, 1.0],  # shares examples 0, 2, 3: d [0, -1, 0]: mean -1/3, sd 0.577, se 1/3
        [1.0, 1.0, 1.0, 1.0],
        [NAN, NAN, NAN, NAN],  # nothing shared
    ])
    gap, se = M.paired_gap(values, ref=2)
    np.testing.assert_allclose(gap[:3], [-0.25, -1 / 3, 0.0])
    np.testing.assert_allclose(se[:3], [0.25, 1 / 3, 0.0])
    assert np.isnan(gap[3]) and se[3] == 0.0
    # Pairing removes what the examples share: a constant shift has no noise at all.
    shifted = np.array([[0.2, 0.9, 0.5], [0.3, 1.0, 0.6]])
    gap, se = M.paired_gap(shifted, ref=1)
    np.testing.assert_allclose(gap, [-0.1, 0.0])
    np.testing.assert_allclose(se, [0.0, 0.0], atol=1e-12)


def test_calibrate_perfect_separation():
    nll = np.array([[0.01, 0.02, 0.04], [0.2, 0.3, 0.5]])
    copies = np.array([[1.0, 0.6, 0.8], [0.0, 0.2, 0.4]])
    cal = M.calibrate_threshold(nll, copies)
    assert cal.threshold == pytest.approx(np.sqrt(0.04 * 0.2))  # geometric midpoint of the gap
    assert cal.balanced_accuracy == 1.0 and cal.auc == 1.0
    assert (cal.n_pairs, cal.n_positive) == (6, 3)


def test_calibrate_overlap_picks_smallest_best_cut():
    # Sorted: .01+ .02+ .05- .3+ .4- .5-   Balanced accuracy by cut after k values:
    # k=1 .667, k=2 .833, k=3 .667, k=4 .833, k=5 .667 -> tie, keep the smaller nu (k=2).
    nll = np.array([0.01, 0.02, 0.3, 0.05, 0.4, 0.5])
    copies = np.array([1.0, 1.0, 0.5, 0.0, 0.2, 0.0])
    cal = M.calibrate_threshold(nll, copies)
    assert cal.threshold == pytest.approx(np.sqrt(0.02 * 0.05))
    assert cal.balanced_accuracy == pytest.approx(5 / 6)
    assert (cal.true_positive_rate, cal.true_negative_rate) == (pytest.approx(2 / 3), 1.0)
    assert cal.auc == pytest.approx(8 / 9)  # positives below negatives in 8 of 9 pairs


def test_calibrate_drops_nan_pairs():
    nll = np.array([0.01, NAN, 0.2, 0.3])
    copies = np.array([1.0, 1.0, 0.0, NAN])
    cal = M.calibrate_threshold(nll, copies)
    assert (cal.n_pairs, cal.n_positive) == (2, 1)
    assert cal.threshold == pytest.approx(np.sqrt(0.01 * 0.2))


def test_calibrate_errors_say_why():
    nll = np.array([0.01, 0.2, 0.3])
    with pytest.raises(M.CalibrationError, match=r"none of 3 .* copy rate >= 0.5; give a fixed --threshold"):
        M.calibrate_threshold(nll, np.array([0.0, 0.2, 0.4]))
    with pytest.raises(M.CalibrationError, match="all 3"):
        M.calibrate_threshold(nll, np.ones(3))
    with pytest.raises(M.CalibrationError, match="same value"):
        M.calibrate_threshold(np.full(4, 0.1), np.array([1.0, 0.0, 1.0, 0.0]))


# --- agreement helpers ------------------------------------------------------------


def test_r2_identity_and_fitted():
    y = np.array([0.1, 0.2, 0.3])
    assert M.r2_identity(y, y) == 1.0
    # Shifted by .1: SSres = 3 * .01, SStot = .02 -> 1 - 1.5 = -0.5; the fitted line is perfect.
    assert M.r2_identity(y + 0.1, y) == pytest.approx(-0.5)
    assert M.r2_fitted(y + 0.1, y) == pytest.approx(1.0)
    # Fitted R^2 of x = 1..4, y = 2,4,5,4 equals Pearson r^2 = 3.5^2 / (5 * 4.75).
    assert M.r2_fitted([1, 2, 3, 4], [2, 4, 5, 4]) == pytest.approx(3.5**2 / 23.75)
    assert M.r2_identity([0.1, NAN, 0.3], [0.1, 0.5, 0.3]) == 1.0  # NaN pair dropped
    assert np.isnan(M.r2_identity([0.1, 0.2], [0.3, 0.3]))


def test_pearson_and_spearman_by_hand():
    x, y = [1, 2, 3, 4], [2, 4, 5, 4]
    assert M.pearson(x, y) == pytest.approx(3.5 / np.sqrt(5 * 4.75))
    # Ranks of y with the tie averaged: 1, 2.5, 4, 2.5 -> r = 3 / sqrt(5 * 4.5).
    assert M.spearman(x, y) == pytest.approx(3 / np.sqrt(22.5))
    assert M.spearman([1, 2, 3], [10, 200, 3000]) == pytest.approx(1.0)
    assert M.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(M.pearson([1, 1, 1], [1, 2, 3]))


def test_spearman_agrees_with_scipy_on_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(5)
    x, y = rng.integers(0, 5, 60), rng.integers(0, 5, 60)
    assert M.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
