"""Intervals, paired tests and sample sizes (harness.statistics) against values computed another way."""
import math

import numpy as np
import pytest
from scipy import stats

from harness.statistics import Accuracy, discordant_test, examples_needed, holm, mcnemar, smallest_separable


@pytest.mark.parametrize("correct,total", [(0, 10), (10, 10), (317, 500), (1, 100), (50, 100)])
def test_interval_is_clopper_pearson_from_beta_quantiles(correct, total):
    low, high = Accuracy(correct, total).interval
    # Clopper-Pearson written with the beta distribution (not binomtest, which the code uses)
    expected_low = 0.0 if correct == 0 else stats.beta.ppf(0.025, correct, total - correct + 1)
    expected_high = 1.0 if correct == total else stats.beta.ppf(0.975, correct + 1, total - correct)
    assert low == pytest.approx(100 * expected_low, abs=1e-6) and high == pytest.approx(100 * expected_high, abs=1e-6)


def test_interval_by_hand_and_as_text():
    assert Accuracy(0, 10).interval[1] == pytest.approx(100 * (1 - 0.025 ** (1 / 10)))  # closed form at k = 0
    accuracy = Accuracy.of([True] * 317 + [False] * 183)
    assert accuracy.percent == pytest.approx(63.4) and accuracy.text() == "63.4 [59.0, 67.6]"
    assert accuracy.as_json()["correct"] == 317 and accuracy.as_json()["total"] == 500
    with pytest.raises(ValueError, match="0 <= correct <= total"):
        Accuracy(11, 10)


def test_mcnemar_exact_by_hand():
    first = np.array([True] * 15 + [False] * 85)
    assert mcnemar(first, np.zeros(100, bool)).p_value == pytest.approx(2 * 0.5 ** 15)
    assert mcnemar(first, np.zeros(100, bool), alternative="greater").p_value == pytest.approx(0.5 ** 15)
    one = np.zeros(100, bool)
    one[0] = True
    assert mcnemar(one, np.zeros(100, bool)).p_value == 1.0  # one example moves nothing
    assert discordant_test(3, 1).p_value == pytest.approx(2 * (1 + 4) / 16)  # P(X <= 1) + P(X >= 3), X ~ B(4, 1/2)
    assert discordant_test(0, 0).p_value == 1.0
    with pytest.raises(ValueError, match="same examples"):
        mcnemar(np.ones(3, bool), np.ones(4, bool))


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 -> 3 * 0.01, max(0.03, 2 * 0.03), max(0.06, 1 * 0.04)
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_examples_needed_by_hand_and_by_simulation():
    # Fleiss' formula by hand: (1.96 sqrt(2 * 0.59 * 0.41) + 0.8416 sqrt(0.6 * 0.4 + 0.58 * 0.42))^2 / 0.02^2
    by_hand = (1.959964 * math.sqrt(2 * 0.59 * 0.41) + 0.841621 * math.sqrt(0.24 + 0.58 * 0.42)) ** 2 / 0.02 ** 2
    assert examples_needed(0.6, 0.02) == math.ceil(by_hand)
    # the power it promises, simulated: two binomial samples of that size, two-sided z-test at 5%
    n = examples_needed(0.6, 0.05)
    rng = np.random.default_rng(0)
    a, b = rng.binomial(n, 0.6, 20000) / n, rng.binomial(n, 0.55, 20000) / n
    pooled = (a + b) / 2
    z = (a - b) / np.sqrt(2 * pooled * (1 - pooled) / n)
    assert np.mean(np.abs(z) > 1.959964) == pytest.approx(0.8, abs=0.02)
    # paired (McNemar, Connor 1987) needs fewer when the models disagree rarely
    assert examples_needed(0.6, 0.02, discordant=0.04) < examples_needed(0.6, 0.02)
    assert smallest_separable(0.6, examples_needed(0.6, 0.03)) == pytest.approx(0.03, abs=1e-3)
    with pytest.raises(ValueError, match="difference < accuracy"):
        examples_needed(0.6, 0.7)


def test_ranks_are_shared_until_an_adjacent_difference_is_significant_after_holm():
    from harness.reports.ranking import grouped_ranks

    n = 500
    top = np.zeros(n, bool); top[:300] = True
    close = top.copy(); close[299] = False                     # one example fewer: no evidence of a difference
    far = close.copy(); far[200:299] = False                   # 99 fewer: separable
    failing = np.ones(n, bool)                                 # best numbers, failing sanity: no rank
    ranks, to_next = grouped_ranks([failing, top, close, far, None], [False, True, True, True, True])
    assert ranks == ["—", "=1", "=1", "3", "—"]
    assert to_next[1] == 1.0 and to_next[2] < 1e-20 and to_next[0] is None and to_next[3] is None
    # Holm: with two pairs, the smaller p is doubled; a pair at p = 0.03 alone separates, beside a second it may not
    a = np.zeros(100, bool); a[:60] = True
    b = a.copy(); b[:6] = False                                # 6 vs 0 discordant: exact two-sided p = 0.03125
    c = b.copy(); c[50:54] = False                             # 4 vs 0: p = 0.125
    assert grouped_ranks([a, b], [True, True])[0] == ["1", "2"]
    assert grouped_ranks([a, b, c], [True, True, True])[0] == ["=1", "=1", "=1"]  # 0.0625 and 0.125 after Holm


def test_wide_tables_get_exact_counts_back_and_the_drift_check_reads_the_value():
    import pandas as pd

    from harness.reports import drift
    from harness.reports.ranking import with_intervals
    from harness.reports.markdown import _plain

    frame = with_intervals(pd.DataFrame({"Defense": ["a"], "Clean": [100 * 317 / 500], "pgd": [None]}), 500)
    accuracy = frame.loc[0, "Clean"]
    assert (accuracy.correct, accuracy.total) == (317, 500) and frame.loc[0, "pgd"] is None
    stored = _plain(accuracy)
    low, high = stats.binomtest(317, 500).proportion_ci(0.95, method="exact")
    assert stored["low"] == pytest.approx(100 * low) and stored["high"] == pytest.approx(100 * high)
    board = lambda value: {"tables": [{"section": "s", "columns": ["Defense", "Clean"], "rows": [["a", value]]}]}  # noqa: E731
    assert drift.compare(board(stored), board(_plain(Accuracy(320, 500)))) == []            # 0.6 points
    assert len(drift.compare(board(stored), board(_plain(Accuracy(330, 500))))) == 1        # 2.6 points


def test_seed_spread_reports_mean_range_and_which_spread_is_larger():
    import pandas as pd

    from harness.reports.ranking import seed_spread_frame

    def vector(correct, total=500):
        v = np.zeros(total, bool)
        v[:correct] = True
        return v

    seeds = {"steady": [(0, vector(480), vector(300)), (1, vector(482), vector(302)), (2, vector(478), vector(301))],
             "erratic": [(0, vector(480), vector(300)), (7, vector(470), vector(200))],
             "unfinished": [(0, vector(480), vector(300)), (1, vector(480), None)]}
    frame = seed_spread_frame(seeds, "Worst L∞ 0.3").set_index("Defense")
    assert frame.loc["steady", "Worst L∞ 0.3 by seed"] == "60.0 / 60.4 / 60.2"
    assert frame.loc["steady", "Worst L∞ 0.3 mean"] == pytest.approx(60.2)
    assert frame.loc["steady", "Worst L∞ 0.3 range"] == pytest.approx(0.4)
    low, high = stats.binomtest(300, 500).proportion_ci(0.95, method="exact")
    assert 100 * (high - low) / 2 == pytest.approx(frame.loc["steady", "Sampling ± (L∞ 0.3)"], abs=0.05)
    assert frame.loc["steady", "Larger spread"] == "sampling"
    assert frame.loc["erratic", "Larger spread"] == "training seed"      # 20-point range against ±4.3
    assert pd.isna(frame.loc["unfinished", "Worst L∞ 0.3 mean"]) and frame.loc["unfinished", "Clean range"] == 0


def test_power_command_prints_the_sample_sizes_and_rejects_bad_input():
    import subprocess
    import sys

    def power(*args):
        return subprocess.run([sys.executable, "-m", "harness", "power", *args], capture_output=True, text=True)

    done = power("--accuracy", "0.6", "--difference", "0.02", "--discordant", "0.1")
    assert done.returncode == 0
    assert f"{examples_needed(0.6, 0.02):,} test examples per model" in done.stdout
    assert f"{examples_needed(0.6, 0.02, discordant=0.1):,} examples" in done.stdout
    assert f"500 examples per model separate about {100 * smallest_separable(0.6, 500):.1f} points" in done.stdout
    bad = power("--accuracy", "0.6", "--difference", "0.7")
    assert bad.returncode == 2 and "need 0 < difference < accuracy < 1" in bad.stderr and "Traceback" not in bad.stderr
    assert power("--accuracy", "0.6", "--difference", "0.02", "--alpha", "5").returncode == 2
