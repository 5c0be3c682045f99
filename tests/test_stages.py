"""ckptsel.stages on hand-made arrays whose answers are worked out in the comments."""

from __future__ import annotations

import numpy as np
import pytest

from ckptsel import stages as S
from ckptsel.settings import OvermemSettings

NAN = np.nan

# Five checkpoints of one run. Train accuracy keeps climbing (memorisation), predicted test
# accuracy levels off. Best train acc 0.93: "near best" (margin 0.05) is >= 0.88. Best
# predicted 0.50: underfit (below 0.8 x 0.50 = 0.40) are checkpoints 0 and 1.
ACC = np.array([0.20, 0.60, 0.90, 0.92, 0.93])
PM = np.array([0.15, 0.35, 0.45, 0.50, 0.48])
MEM = np.array([0.00, 0.20, 0.60, 0.99, 1.00])
# Baseline = running minimum over checkpoints 2.. (not underfit): 0.40 -> ratio [NaN, NaN, 1.0, 1.3, 1.5].
PROXY = np.array([1.00, 0.50, 0.40, 0.52, 0.60])
UNDERFIT = np.array([True, True, False, False, False])


def test_running_min_skips_missing_values():
    assert S.running_min(np.array([NAN, 3.0, 1.0, NAN, 2.0])).tolist()[1:] == [3.0, 1.0, 1.0, 1.0]
    assert np.isnan(S.running_min(np.array([NAN, 3.0]))[0])


def test_underfit_is_relative_to_the_best_predicted_accuracy():
    assert S.underfit(PM).tolist() == UNDERFIT.tolist()
    # With 0.5 x 0.50 = 0.25 only checkpoint 0 is underfit.
    assert S.underfit(PM, OvermemSettings(underfit_fraction=0.5)).tolist() == [True] + [False] * 4
    assert S.underfit(np.zeros(2)).tolist() == [True, True]  # never answers correctly
    assert S.underfit(np.full(2, NAN)).tolist() == [False, False]


def test_ratio_is_against_the_minimum_over_checkpoints_not_excluded():
    assert S.proxy_ratio(PROXY) == pytest.approx([1.0, 1.0, 1.0, 1.3, 1.5])  # nothing excluded: min 1.0, 0.5, 0.4
    ratio = S.proxy_ratio(PROXY, UNDERFIT)
    assert np.isnan(ratio[:2]).all() and ratio[2:] == pytest.approx([1.0, 1.3, 1.5])
    # A low value while underfit (0.25) would make 0.35-0.37 look risen (1.4-1.48x); past
    # underfitting the minimum is 0.35 and the proxy barely moves.
    ratio = S.proxy_ratio(np.array([1.00, 0.25, 0.35, 0.36, 0.37]), UNDERFIT)
    assert ratio[4] == pytest.approx(0.37 / 0.35)


def test_flag_needs_all_three_conditions():
    ratio = np.array([NAN, NAN, 1.0, 1.3, 1.5])
    # near best [F F T T T] & memorised >= 0.99 [F F F T T] & ratio >= 1.25 [F F F T T]
    assert S.overmemorized(ACC, MEM, ratio).tolist() == [False, False, False, True, True]
    low_memorised = np.array([0.0, 0.2, 0.6, 0.4, 0.4])  # proxy risen, accuracy high, targets not reproduced
    assert not S.overmemorized(ACC, low_memorised, ratio).any()
    assert not S.overmemorized(ACC, MEM, np.ones(5)).any()  # proxy never rises
    # Accuracy collapsed at the end (0.80 < 0.88): a broken checkpoint, not over-memorized.
    assert S.overmemorized(np.array([0.2, 0.6, 0.9, 0.93, 0.8]), MEM, ratio).tolist() == [False] * 3 + [True, False]
    # Thresholds move it: a 1.4x rise, memorized_min 1.0, or acc_margin 0.005 leave only the last.
    for settings in (OvermemSettings(proxy_rise=0.4), OvermemSettings(memorized_min=1.0),
                     OvermemSettings(acc_margin=0.005)):
        assert S.overmemorized(ACC, MEM, ratio, settings).tolist() == [False] * 4 + [True]
    # Missing values are never flagged.
    assert S.overmemorized(ACC, MEM, np.array([NAN, NAN, 1.0, 1.3, NAN])).tolist() == [False] * 3 + [True, False]
    assert not S.overmemorized(np.full(5, NAN), MEM, ratio).any()


def test_a_run_still_memorising_its_examples_is_not_over_memorized_by_default():
    """Memorised 0.60 / 0.80 / 0.90 with the proxy risen: one in ten examples can still become right before it is
    memorised, so pre-memorization accuracy may still rise; the default (0.99) waits, 0.5 (the default before
    2026-12-06) flagged checkpoints 3 and 4."""
    still_learning = np.array([0.00, 0.20, 0.60, 0.80, 0.90])
    ratio = np.array([NAN, NAN, 1.0, 1.3, 1.5])
    assert not S.overmemorized(ACC, still_learning, ratio).any()
    assert S.overmemorized(ACC, still_learning, ratio, OvermemSettings(memorized_min=0.5)).tolist() == [False] * 3 + [True] * 2
    assert OvermemSettings().memorized_min == 0.99


def test_assess_stages_and_flags_with_their_numbers():
    a = S.assess(ACC, PM, MEM, PROXY, "alt_nll")
    assert a.stages == ["underfit", "underfit", "generalizing", "over-memorized", "over-memorized"]
    assert a.flags[:3] == [None, None, None]
    f = a.flags[3]
    assert (f.train_acc, f.best_train_acc, f.memorized_frac) == (0.92, 0.93, 0.99)
    assert (f.proxy, f.proxy_value) == ("alt_nll", 0.52)
    assert (f.proxy_baseline, f.proxy_ratio) == pytest.approx((0.40, 1.3))
    assert "alt_nll 0.520 = 1.30× its minimum 0.400 since underfitting (≥ 1.25×)" in f.reason()
    assert f.to_json()["reason"] == f.reason()
    # Staged by train accuracy, checkpoint 2 (0.90 train, but 0.45 predicted) would not be the baseline.
    assert S.assess(ACC, np.zeros(5), MEM, PROXY, "alt_nll").stages == ["underfit"] * 5


def per_example(*rows: str) -> np.ndarray:
    """Per-example pre-memorization accuracy from strings of digits (tenths): "55" -> [0.5, 0.5]."""
    return np.array([[int(c) / 10 for c in row] for row in rows])


def test_recommend_best_unflagged_then_lowest_proxy_within_one_standard_error():
    # Ten examples. Checkpoint 2 is the best unflagged (mean 0.5). Checkpoint 1 misses two of
    # its examples: paired gaps d = [0,0,0,0,0,0,0,0,-5,-5]/10, mean -0.1, sd 0.2108, se 0.0667:
    # 0.1 is 1.5 standard errors down.
    pm = per_example("0000000000", "5555555500", "5555555555", "6666666666", "7777777777")
    flagged = np.array([False, False, False, True, True])
    proxy = np.array([1.00, 0.50, 0.55, 0.70, 0.80])
    robust = {"prefer": "robustness"}
    assert S.recommend(pm, proxy, flagged, **robust) == 2  # 1 lies outside one standard error: accuracy decides
    assert S.recommend(pm, proxy, flagged, se=2.0, **robust) == 1  # within two, and 1 has the lower proxy
    # Unflagged, the best (4) wins; every other checkpoint is clearly below it.
    assert S.recommend(pm, proxy, np.zeros(5, bool), **robust) == 4
    assert S.recommend(pm, proxy, np.zeros(5, bool)) == 4


def test_recommend_accuracy_first_passes_a_flagged_checkpoint_over_only_for_one_as_accurate():
    # The default. Flagged 4 is the most accurate (0.7) and every clean checkpoint is clearly
    # below it (3 is 0.1 down on every example: sd 0): 4 is recommended, flagged.
    pm = per_example("0000000000", "5555555500", "5555555555", "6666666666", "7777777777")
    proxy = np.array([1.00, 0.50, 0.55, 0.70, 0.80])
    assert S.recommend(pm, proxy, np.array([False, False, False, True, True])) == 4
    # 3 is now as accurate as 4 within two standard errors (gaps -0.1 on 2 of 10 examples: mean
    # -0.02, se 0.013) and clean: 4 is passed over for it, though 2 and 1 have lower proxies,
    # being clearly less accurate.
    pm = per_example("0000000000", "5555555500", "5555555555", "7777777766", "7777777777")
    assert S.recommend(pm, proxy, np.array([False, False, False, False, True]), se=2.0) == 3
    assert S.recommend(pm, proxy, np.array([False, False, False, False, True]), se=1.0) == 4  # not within one
    # Both close ones flagged: the lower proxy of the two.
    assert S.recommend(pm, proxy, np.array([False, False, False, True, True]), se=2.0) == 3
    with pytest.raises(ValueError):
        S.recommend(pm, proxy, np.zeros(5, bool), prefer="speed")


def test_recommend_pairs_the_examples():
    # Checkpoint 0 is 0.05 below checkpoint 1 on every example: the paired gap has sd 0, so it
    # is certainly worse, however many standard errors are allowed.
    pm = np.array([[0.45] * 10, [0.5] * 10])
    assert S.recommend(pm, np.array([0.1, 0.9]), np.zeros(2, bool), se=3.0) == 1
    # A NaN (unmeasured) example is left out of the pairing, not counted as 0.
    pm = np.array([[0.5, 0.5, NAN], [0.5, 0.5, 1.0]])
    assert S.recommend(pm, np.array([0.1, 0.9]), np.zeros(2, bool)) == 0  # gap 0 on the shared examples


def test_recommend_treats_proxy_values_within_the_tie_as_equal():
    # 2 is the best (0.65). 1 against 2, per example: d = [-0.2, +0.2, -0.2, 0], mean -0.05,
    # sd 0.191, se 0.096: within one standard error. 0 is 2.7 standard errors below.
    pm = per_example("5500", "7755", "9575")
    proxy = np.array([0.100, 0.121, 0.125])
    flagged = np.zeros(3, bool)
    assert S.recommend(pm, proxy, flagged) == 1  # strictly the lowest proxy among 1 and 2
    # 0.125 is within 5% of 0.121: a tie, and 2 predicts the higher accuracy.
    assert S.recommend(pm, proxy, flagged, tie=0.05) == 2
    # 3% is not enough (0.121 x 1.03 = 0.1246 < 0.125).
    assert S.recommend(pm, proxy, flagged, tie=0.03) == 1


def test_recommend_edge_cases():
    pm = per_example("33", "55")
    # Everything flagged: fall back to all checkpoints rather than recommend nothing.
    assert S.recommend(pm, np.array([1.0, 2.0]), np.array([True, True])) == 1
    # No proxy value anywhere: the best predicted accuracy.
    assert S.recommend(pm, np.full(2, NAN), np.zeros(2, bool)) == 1
    # Nothing measured.
    assert S.recommend(np.full((2, 3), NAN), np.ones(2), np.zeros(2, bool)) is None
    with pytest.raises(ValueError):
        S.recommend(pm, np.ones(3), np.zeros(2, bool))



def test_an_underfit_checkpoint_is_not_picked_over_a_close_one_that_is_not():
    from ckptsel import metrics

    stages = S
    """On 6 examples one SE spans 0.083 to 0.333: the underfit one's lower proxy must not win."""
    premem = np.array([[0.0] * 6, [1.0, 0, 0, 0, 0, 1.0], [0, 0.5, 0, 0, 0, 0]])  # PM 0, 0.333, 0.083
    proxy = np.array([np.nan, 1.0, 0.84])
    flagged = np.zeros(3, bool)
    assert stages.recommend(premem, proxy, flagged) == 2  # the lowest proxy among the close ones
    underfit = stages.underfit(metrics.per_checkpoint_mean(premem))
    assert underfit.tolist() == [True, False, True]
    assert stages.recommend(premem, proxy, flagged, underfit=underfit) == 1
    assert stages.recommend(premem[[0, 2]], proxy[[0, 2]], flagged[:2], underfit=np.array([True, True])) == 1
