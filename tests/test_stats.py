import math

import numpy as np
import pytest

from ilr.stats import (
    Interval,
    bootstrap_average,
    bootstrap_interval,
    crossed_bootstrap,
    paired_bootstrap,
    paired_crossed_bootstrap,
    pass_at_k,
)


def exact_pass_at_k(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


# ---------------------------------------------------------------------------------------------------------------------
# pass@k
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 1, 0.4),  # pass@1 is the fraction correct
        (5, 2, 5, 1.0),  # k = n: solved if any sample is correct
        (5, 0, 5, 0.0),  # k = n, nothing correct
        (5, 0, 1, 0.0),  # c = 0
        (5, 5, 1, 1.0),  # c = n
        (5, 5, 3, 1.0),
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (10, 3, 4, 1 - 35 / 210),
        (1, 1, 1, 1.0),
        (1, 0, 1, 0.0),
    ],
)
def test_pass_at_k_exact_small_cases(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_the_binomial_formula_on_a_grid():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(exact_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_is_stable_where_binomials_overflow_floats():
    # C(2000, 1000) ~ 1e600 overflows a float; the product form does not need it.
    value = pass_at_k(2000, 3, 1000)
    assert value == pytest.approx(exact_pass_at_k(2000, 3, 1000), rel=1e-10)
    assert 0.0 < value < 1.0


def test_pass_at_k_vectorised_over_problems():
    values = pass_at_k([5, 5, 5], [0, 2, 5], 1)
    np.testing.assert_allclose(values, [0.0, 0.4, 1.0])


@pytest.mark.parametrize(("n", "c", "k"), [(3, 1, 4), (3, 4, 1), (3, -1, 1), (3, 1, 0)])
def test_pass_at_k_rejects_impossible_inputs(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


# ---------------------------------------------------------------------------------------------------------------------
# Bootstrap intervals
# ---------------------------------------------------------------------------------------------------------------------
def test_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    true_p, covered, trials = 0.3, 0, 200
    for trial in range(trials):
        scores = (rng.random(200) < true_p).astype(float)
        interval = bootstrap_interval(scores, n_resamples=1000, seed=trial)
        covered += interval.low <= true_p <= interval.high
    assert 0.90 <= covered / trials <= 0.99


def test_two_level_bootstrap_covers_the_true_mean_with_several_samples_per_problem():
    # Problems differ in difficulty (p_i ~ Beta) and each gets 4 Bernoulli(p_i) samples; the estimand is E[p].
    rng = np.random.default_rng(1)
    alpha, beta = 1.5, 3.0
    true_mean, covered, trials = alpha / (alpha + beta), 0, 150
    for trial in range(trials):
        p = rng.beta(alpha, beta, size=150)
        samples = (rng.random((150, 4)) < p[:, None]).astype(float)
        interval = bootstrap_interval(samples, n_resamples=500, seed=trial)
        assert interval.method == "bootstrap-2level"
        covered += interval.low <= true_mean <= interval.high
    assert 0.90 <= covered / trials <= 0.995


def test_two_level_bootstrap_is_wider_than_resampling_problems_only():
    rng = np.random.default_rng(2)
    samples = (rng.random((100, 4)) < 0.5).astype(float)
    one_level = bootstrap_interval(samples.mean(axis=1), seed=0)
    two_level = bootstrap_interval(samples, seed=0)
    assert one_level.estimate == two_level.estimate
    assert two_level.high - two_level.low > one_level.high - one_level.low


def test_bootstrap_of_pass_at_k_uses_the_unbiased_estimator():
    rng = np.random.default_rng(3)
    samples = (rng.random((50, 8)) < 0.3).astype(float)
    interval = bootstrap_interval(samples, k=4, n_resamples=2000, seed=0)
    expected = pass_at_k(np.full(50, 8), samples.sum(axis=1).astype(int), 4).mean()
    assert interval.estimate == pytest.approx(expected)
    assert interval.low <= interval.estimate <= interval.high


def test_bootstrap_is_seeded():
    scores = np.random.default_rng(4).random(80)
    assert bootstrap_interval(scores, seed=7) == bootstrap_interval(scores, seed=7)
    assert bootstrap_interval(scores, seed=7) != bootstrap_interval(scores, seed=8)


def test_bootstrap_of_a_constant_is_a_point():
    interval = bootstrap_interval(np.ones(30))
    assert (interval.estimate, interval.low, interval.high) == (1.0, 1.0, 1.0)


def test_bootstrap_interval_rejects_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_interval([])
    with pytest.raises(ValueError, match="per-sample"):
        bootstrap_interval([1.0, 0.0], k=2)
    with pytest.raises(ValueError, match="binary"):
        bootstrap_interval([[0.5, 1.0]], k=1)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_interval([1.0], confidence=1.5)


def test_interval_serialises_to_plain_json():
    interval = bootstrap_interval([0.0, 1.0, 1.0], n_resamples=100)
    assert Interval(**interval.to_dict()) == interval


def test_bootstrap_average_weights_benchmarks_equally():
    small, large = np.ones(10), np.zeros(1000)
    interval = bootstrap_average([small, large], n_resamples=500)
    assert interval.estimate == pytest.approx(0.5)  # not the pooled mean, 10/1010
    assert interval.low <= 0.5 <= interval.high


# ---------------------------------------------------------------------------------------------------------------------
# Paired comparison
# ---------------------------------------------------------------------------------------------------------------------
def test_paired_comparison_of_identical_runs_is_exactly_zero():
    scores = {f"q{i}": float(i % 2) for i in range(40)}
    comparison = paired_bootstrap(scores, dict(scores))
    assert (comparison.difference.estimate, comparison.difference.low, comparison.difference.high) == (0.0, 0.0, 0.0)


def test_paired_comparison_detects_a_small_consistent_gain_that_unpaired_intervals_cannot():
    rng = np.random.default_rng(5)
    base = (rng.random(300) < 0.5).astype(float)
    better = base.copy()
    better[np.flatnonzero(base == 0)[:20]] = 1.0  # +20 problems solved, nothing lost: +6.7 points
    ids = [f"q{i}" for i in range(300)]
    comparison = paired_bootstrap(dict(zip(ids, better)), dict(zip(ids, base)), seed=0)
    assert comparison.difference.estimate == pytest.approx(20 / 300)
    assert comparison.difference.low > 0  # the paired interval excludes zero...
    a, b = bootstrap_interval(better, seed=0), bootstrap_interval(base, seed=0)
    assert a.low < b.high  # ...while the two separate intervals overlap


def test_paired_comparison_uses_only_shared_problem_ids():
    a = {"1": 1.0, "2": 1.0, "3": 0.0, "only_a": 1.0}
    b = {"3": 1.0, "2": 0.0, "1": 1.0, "only_b": 0.0, "only_b2": 1.0}
    comparison = paired_bootstrap(a, b, n_resamples=200)
    assert (comparison.n_common, comparison.n_only_a, comparison.n_only_b) == (3, 1, 2)
    assert comparison.mean_a == pytest.approx(2 / 3)
    assert comparison.mean_b == pytest.approx(2 / 3)
    assert comparison.difference.estimate == pytest.approx(0.0)
    assert comparison.to_dict()["difference"]["method"] == "paired-bootstrap"


def test_paired_comparison_without_shared_ids_is_an_error():
    with pytest.raises(ValueError, match="share no problem id"):
        paired_bootstrap({"a": 1.0}, {"b": 1.0})


# ---------------------------------------------------------------------------------------------------------------------
# Several runs (seeds) crossed with problems
# ---------------------------------------------------------------------------------------------------------------------
def test_crossed_bootstrap_counts_the_spread_between_seeds():
    # Seed 0 answers both questions, seed 1 neither: the questions agree, the seeds do not. Resampling the 2 seeds
    # gives a mean of 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so the 95% interval is [0, 1]; a bootstrap over
    # questions alone would give [0.5, 0.5].
    interval = crossed_bootstrap([{"q1": 1.0, "q2": 1.0}, {"q1": 0.0, "q2": 0.0}], n_resamples=4000)
    assert (interval.estimate, interval.low, interval.high) == (0.5, 0.0, 1.0)
    assert interval.method == "crossed-bootstrap"


def test_crossed_bootstrap_with_identical_seeds_is_the_question_bootstrap():
    runs = [{"q1": 1.0, "q2": 0.0, "q3": 0.0, "q4": 0.0}] * 3
    interval = crossed_bootstrap(runs, n_resamples=4000)
    assert interval.estimate == 0.25
    # Draws are k/4 for k correct questions among 4 drawn, P(k = 0) = (3/4)^4 = 0.32 > 2.5%: the low end is 0.
    assert interval.low == 0.0 and 0.5 <= interval.high <= 0.75
    constant = crossed_bootstrap([{"q1": 0.3, "q2": 0.3}, {"q1": 0.3, "q2": 0.3}], n_resamples=500)
    assert constant.low == pytest.approx(0.3) and constant.high == pytest.approx(0.3)


def test_crossed_bootstrap_uses_the_problems_every_run_has():
    interval = crossed_bootstrap([{"q1": 1.0, "q2": 0.0}, {"q1": 1.0, "q3": 0.0}], n_resamples=200)
    assert interval.estimate == 1.0  # only q1 is common
    with pytest.raises(ValueError, match="share no problem"):
        crossed_bootstrap([{"q1": 1.0}, {"q2": 1.0}])


def test_paired_crossed_bootstrap_pairs_questions():
    # a is b + 0.1 on every question, however hard: paired on the question, the difference never varies.
    b = {"easy": 0.9, "mid": 0.5, "hard": 0.0}
    a = {question: score + 0.1 for question, score in b.items()}
    comparison = paired_crossed_bootstrap([a], [b, {**b, "extra": 1.0}], n_resamples=2000)
    assert comparison.difference.estimate == pytest.approx(0.1)
    assert comparison.difference.low == pytest.approx(0.1) and comparison.difference.high == pytest.approx(0.1)
    assert (comparison.n_common, comparison.n_only_a, comparison.n_only_b) == (3, 0, 0)  # `extra` is not in every b
    assert comparison.mean_a == pytest.approx(1.7 / 3) and comparison.mean_b == pytest.approx(1.4 / 3)
    assert comparison.difference.method == "paired-crossed-bootstrap"


def test_paired_crossed_bootstrap_resamples_each_arms_seeds():
    # Arm a's seeds disagree completely (1 and 0 on the one question); b's single seed is 0: the difference is
    # 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4.
    comparison = paired_crossed_bootstrap([{"q": 1.0}, {"q": 0.0}], [{"q": 0.0}], n_resamples=4000)
    assert comparison.difference.estimate == 0.5
    assert (comparison.difference.low, comparison.difference.high) == (0.0, 1.0)
    with pytest.raises(ValueError, match="share no problem"):
        paired_crossed_bootstrap([{"q": 1.0}], [{"r": 1.0}])
