"""Statistics for evaluation: the unbiased pass@k estimator and seeded bootstrap confidence intervals.

Pure numpy, no I/O. Every interval is a percentile bootstrap over *problems*, the unit that was sampled from the
population of possible questions:

- one sample per problem (the paper's protocol): resample problems with replacement;
- `n > 1` samples per problem: a two-level bootstrap, problems first, then each drawn problem's samples, so that both
  sources of variance (which questions, which completions) widen the interval;
- a paired comparison of two models on the same problems: resample the common problems once and take the mean
  difference on each draw, so that the (usually large) per-problem correlation cancels;
- an average over benchmarks (the paper's "Avg"): resample each benchmark's problems independently and average the
  benchmark means;
- several training runs (seeds) that all answer the same problems, a crossed design: resample runs and problems
  independently, so that the interval covers both the run-to-run and the question-to-question variance; a paired
  version compares two arms on the same problems, each arm's runs resampled on their own.

Resampling is vectorised in chunks of draws, so memory stays bounded for large benchmarks and many samples.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np


__all__ = [
    "Interval",
    "PairedComparison",
    "bootstrap_average",
    "bootstrap_interval",
    "crossed_bootstrap",
    "paired_bootstrap",
    "paired_crossed_bootstrap",
    "pass_at_k",
]

DEFAULT_RESAMPLES = 10_000
DEFAULT_CONFIDENCE = 0.95
# Elements materialised per chunk of bootstrap draws (draws x problems x samples), about 32 MB of float64.
_CHUNK_ELEMENTS = 4_000_000


@dataclass(frozen=True)
class Interval:
    """
    A point estimate with its bootstrap confidence interval.

    Args:
        estimate (`float`):
            The statistic on the observed data (not the bootstrap mean).
        low (`float`):
            Lower end of the interval.
        high (`float`):
            Upper end of the interval.
        confidence (`float`):
            Coverage the interval aims at, e.g. `0.95`.
        n_resamples (`int`):
            Bootstrap draws.
        method (`str`):
            `"bootstrap"` (over problems), `"bootstrap-2level"` (problems, then samples) or `"paired-bootstrap"`.
    """

    estimate: float
    low: float
    high: float
    confidence: float
    n_resamples: int
    method: str

    def to_dict(self) -> dict[str, float | int | str]:
        """Plain-JSON form."""
        return asdict(self)


@dataclass(frozen=True)
class PairedComparison:
    """
    Mean difference `a - b` over the problems two runs share, with its paired bootstrap interval.

    Args:
        difference (`Interval`):
            Mean of `a - b` over the common problems, and its interval.
        mean_a (`float`):
            Mean of `a` over the common problems.
        mean_b (`float`):
            Mean of `b` over the common problems.
        n_common (`int`):
            Problems present in both runs (the ones compared).
        n_only_a (`int`):
            Problems only in `a` (ignored).
        n_only_b (`int`):
            Problems only in `b` (ignored).
    """

    difference: Interval
    mean_a: float
    mean_b: float
    n_common: int
    n_only_a: int
    n_only_b: int

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return {**asdict(self), "difference": self.difference.to_dict()}


def pass_at_k(num_samples: int | Sequence[int] | np.ndarray, num_correct, k: int) -> float | np.ndarray:
    """
    Unbiased pass@k estimator of Chen et al. (2021): `1 - C(n - c, k) / C(n, k)`, per problem.

    Computed as `1 - prod_{i = n - c + 1}^{n} (1 - k / i)`, which never forms a binomial coefficient, so it is exact
    in floating point for any `n`; it is 1 when `n - c < k` (every draw of `k` contains a correct sample).

    Args:
        num_samples (`int` or array of `int`):
            Samples drawn per problem (`n`).
        num_correct (`int` or array of `int`):
            Correct samples per problem (`c`), same shape as `num_samples`.
        k (`int`):
            Samples allowed per problem; `1 <= k <= n`.

    Returns:
        `float` or `np.ndarray`: pass@k per problem (a float for scalar inputs).
    """
    n = np.asarray(num_samples, dtype=np.int64)
    c = np.asarray(num_correct, dtype=np.int64)
    n, c = np.broadcast_arrays(n, c)
    if k < 1:
        raise ValueError(f"`k` must be >= 1 (got {k}).")
    if np.any(n < k):
        raise ValueError(f"pass@{k} needs at least {k} samples per problem (got n = {int(n.min())}).")
    if np.any((c < 0) | (c > n)):
        raise ValueError("`num_correct` must lie in [0, num_samples] for every problem.")
    out = np.ones(n.shape, dtype=np.float64)
    for index in np.ndindex(n.shape):
        n_i, c_i = int(n[index]), int(c[index])
        if n_i - c_i >= k:
            out[index] = 1.0 - np.prod(1.0 - k / np.arange(n_i - c_i + 1, n_i + 1, dtype=np.float64))
    return float(out) if out.ndim == 0 else out


def _pass_at_k_of_counts(n: int, c: np.ndarray, k: int) -> np.ndarray:
    """pass@k for many counts `c` that share one `n` (bootstrap draws): a lookup table of the n + 1 possible values."""
    table = pass_at_k(np.full(n + 1, n), np.arange(n + 1), k)
    return table[c]


def _percentiles(draws: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(draws, [tail, 1.0 - tail])
    return float(low), float(high)


def _check_common(confidence: float, n_resamples: int) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"`confidence` must be in (0, 1) (got {confidence}).")
    if n_resamples < 1:
        raise ValueError(f"`n_resamples` must be >= 1 (got {n_resamples}).")


def bootstrap_interval(
    scores: Sequence[float] | Sequence[Sequence[float]] | np.ndarray,
    *,
    k: int | None = None,
    confidence: float = DEFAULT_CONFIDENCE,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Interval:
    """
    Percentile bootstrap interval of a benchmark score, resampling problems (and samples when there are several).

    Args:
        scores (array of shape `(problems,)` or `(problems, samples)`):
            One score per problem, or one per sample (every problem with the same number of samples). Scores are
            correctness (0/1) or partial credit in [0, 1].
        k (`int`, *optional*):
            With 2-D binary scores, report pass@k instead of the mean score (avg@n). Needs `k <= samples`.
        confidence (`float`, *optional*, defaults to `0.95`):
            Coverage of the interval.
        n_resamples (`int`, *optional*, defaults to `10000`):
            Bootstrap draws.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the draws: the same data and seed give the same interval.

    Returns:
        `Interval`: the score on the observed data and its interval; `method` is `"bootstrap"` for 1-D scores and
        `"bootstrap-2level"` for 2-D ones.
    """
    _check_common(confidence, n_resamples)
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim not in (1, 2) or values.shape[0] == 0:
        raise ValueError(f"`scores` must be a non-empty 1-D or 2-D array (got shape {values.shape}).")
    if k is not None and values.ndim == 1:
        raise ValueError("pass@k needs per-sample scores: pass a 2-D array of shape (problems, samples).")
    if k is not None and not np.isin(values, (0.0, 1.0)).all():
        raise ValueError("pass@k needs binary (0/1) per-sample scores.")
    rng = np.random.default_rng(seed)
    num_problems = values.shape[0]
    if values.ndim == 1:
        estimate = float(values.mean())
        draws = _draw_means_1level(values, num_problems, n_resamples, rng)
        low, high = _percentiles(draws, confidence)
        return Interval(estimate, low, high, confidence, n_resamples, "bootstrap")

    num_samples = values.shape[1]
    if k is not None and k > num_samples:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem (got {num_samples}).")

    def statistic(per_sample: np.ndarray) -> np.ndarray:  # (..., problems, samples) -> (...,)
        if k is None:
            return per_sample.mean(axis=-1).mean(axis=-1)
        counts = per_sample.sum(axis=-1).round().astype(np.int64)
        return _pass_at_k_of_counts(num_samples, counts, k).mean(axis=-1)

    estimate = float(statistic(values))
    draws = np.empty(n_resamples)
    chunk = max(1, _CHUNK_ELEMENTS // (num_problems * num_samples))
    for start in range(0, n_resamples, chunk):
        size = min(chunk, n_resamples - start)
        problems = rng.integers(0, num_problems, size=(size, num_problems))
        samples = rng.integers(0, num_samples, size=(size, num_problems, num_samples))
        draws[start : start + size] = statistic(values[problems[..., None], samples])
    low, high = _percentiles(draws, confidence)
    return Interval(estimate, low, high, confidence, n_resamples, "bootstrap-2level")


def _draw_means_1level(
    values: np.ndarray, num_problems: int, n_resamples: int, rng: np.random.Generator
) -> np.ndarray:
    draws = np.empty(n_resamples)
    chunk = max(1, _CHUNK_ELEMENTS // num_problems)
    for start in range(0, n_resamples, chunk):
        size = min(chunk, n_resamples - start)
        draws[start : start + size] = values[rng.integers(0, num_problems, size=(size, num_problems))].mean(axis=1)
    return draws


def bootstrap_average(
    groups: Sequence[Sequence[float] | np.ndarray],
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Interval:
    """
    Interval of an unweighted average of benchmark means (the paper's "Avg" over five maths benchmarks).

    Each benchmark's problems are resampled independently (they are independent samples), and every draw averages the
    benchmark means with equal weights, as the paper does, whatever the benchmark sizes.

    Args:
        groups (`list` of 1-D arrays):
            Per-problem scores of each benchmark (a problem's mean over its samples when there are several).
        confidence (`float`, *optional*, defaults to `0.95`):
            Coverage of the interval.
        n_resamples (`int`, *optional*, defaults to `10000`):
            Bootstrap draws.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the draws.

    Returns:
        `Interval`: the average of the observed means and its interval (`method="bootstrap"`).
    """
    _check_common(confidence, n_resamples)
    arrays = [np.asarray(group, dtype=np.float64) for group in groups]
    if not arrays or any(a.ndim != 1 or a.size == 0 for a in arrays):
        raise ValueError("`groups` must be a non-empty list of non-empty 1-D score arrays.")
    rng = np.random.default_rng(seed)
    estimate = float(np.mean([a.mean() for a in arrays]))
    draws = np.mean([_draw_means_1level(a, a.size, n_resamples, rng) for a in arrays], axis=0)
    low, high = _percentiles(draws, confidence)
    return Interval(estimate, low, high, confidence, n_resamples, "bootstrap")


def paired_bootstrap(
    scores_a: Mapping[str, float],
    scores_b: Mapping[str, float],
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> PairedComparison:
    """
    Paired comparison of two runs on the problems they share: mean difference `a - b` and its bootstrap interval.

    Problems are matched by id; only the common ones are compared, and each bootstrap draw resamples them once for
    both runs. An interval that excludes 0 is a difference the problem sample supports at that confidence.

    Args:
        scores_a (`Mapping[str, float]`):
            Problem id -> score of run `a` (correctness, or the mean over a problem's samples).
        scores_b (`Mapping[str, float]`):
            Problem id -> score of run `b` (the baseline).
        confidence (`float`, *optional*, defaults to `0.95`):
            Coverage of the interval.
        n_resamples (`int`, *optional*, defaults to `10000`):
            Bootstrap draws.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the draws.

    Returns:
        `PairedComparison`: the difference with its interval, both means and the overlap counts.

    Raises:
        `ValueError`: the runs share no problem id (different benchmarks, or ids written differently).
    """
    _check_common(confidence, n_resamples)
    common = [problem_id for problem_id in scores_a if problem_id in scores_b]
    if not common:
        raise ValueError(
            f"The two runs share no problem id ({len(scores_a)} vs {len(scores_b)} problems, e.g. "
            f"{next(iter(scores_a), None)!r} vs {next(iter(scores_b), None)!r}): a paired comparison needs results "
            "on the same benchmark problems. Compare runs of the same benchmark and data."
        )
    a = np.array([scores_a[i] for i in common], dtype=np.float64)
    b = np.array([scores_b[i] for i in common], dtype=np.float64)
    rng = np.random.default_rng(seed)
    differences = a - b
    draws = _draw_means_1level(differences, differences.size, n_resamples, rng)
    low, high = _percentiles(draws, confidence)
    return PairedComparison(
        difference=Interval(float(differences.mean()), low, high, confidence, n_resamples, "paired-bootstrap"),
        mean_a=float(a.mean()),
        mean_b=float(b.mean()),
        n_common=len(common),
        n_only_a=len(scores_a) - len(common),
        n_only_b=sum(1 for i in scores_b if i not in scores_a),
    )


def _run_matrix(runs: Sequence[Mapping[str, float]], problems: Sequence[str]) -> np.ndarray:
    return np.array([[run[problem] for problem in problems] for run in runs], dtype=np.float64)


def _common_problems(runs: Sequence[Mapping[str, float]], what: str) -> list[str]:
    if not runs or any(not run for run in runs):
        raise ValueError(f"{what}: need at least one run, each with at least one problem.")
    common = [problem for problem in runs[0] if all(problem in run for run in runs[1:])]
    if not common:
        raise ValueError(
            f"{what}: the runs share no problem id ({[len(run) for run in runs]} problems): every run must be "
            "evaluated on the same questions."
        )
    return common


def _crossed_draws(matrix: np.ndarray, problem_counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Means of `matrix` (runs x problems) over resampled runs, given each draw's problem counts (draws x problems)."""
    num_runs, num_problems = matrix.shape
    run_counts = rng.multinomial(num_runs, np.full(num_runs, 1.0 / num_runs), size=problem_counts.shape[0])
    return np.einsum("dr,rp,dp->d", run_counts, matrix, problem_counts) / (num_runs * num_problems)


def _draw_by_problem_counts(
    num_problems: int, n_resamples: int, rng: np.random.Generator, statistic: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """`statistic` of each bootstrap draw of the problems, given as counts (draws x problems), in bounded chunks."""
    draws = np.empty(n_resamples)
    chunk = max(1, _CHUNK_ELEMENTS // num_problems)
    for start in range(0, n_resamples, chunk):
        size = min(chunk, n_resamples - start)
        counts = rng.multinomial(num_problems, np.full(num_problems, 1.0 / num_problems), size=size)
        draws[start : start + size] = statistic(counts)
    return draws


def crossed_bootstrap(
    runs: Sequence[Mapping[str, float]],
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Interval:
    """
    Interval of a mean score over several runs (e.g. training seeds) that answered the same problems.

    Runs and problems are crossed (every run answers every problem), so each draw resamples the runs and the problems
    independently, with replacement, and takes the mean of the resampled runs x problems table: the interval widens
    with the spread between runs as well as between problems. With one run it is the plain bootstrap over problems.

    Args:
        runs (`Sequence[Mapping[str, float]]`):
            One mapping per run: problem id -> score (correctness, or the mean over a problem's samples). Only the
            problems every run has are used.
        confidence (`float`, *optional*, defaults to `0.95`):
            Coverage of the interval.
        n_resamples (`int`, *optional*, defaults to `10000`):
            Bootstrap draws.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the draws.

    Returns:
        `Interval`: the mean over runs and common problems and its interval (`method="crossed-bootstrap"`).
    """
    _check_common(confidence, n_resamples)
    matrix = _run_matrix(runs, _common_problems(runs, "crossed_bootstrap"))
    rng = np.random.default_rng(seed)
    draws = _draw_by_problem_counts(
        matrix.shape[1], n_resamples, rng, lambda counts: _crossed_draws(matrix, counts, rng)
    )
    low, high = _percentiles(draws, confidence)
    return Interval(float(matrix.mean()), low, high, confidence, n_resamples, "crossed-bootstrap")


def paired_crossed_bootstrap(
    runs_a: Sequence[Mapping[str, float]],
    runs_b: Sequence[Mapping[str, float]],
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> PairedComparison:
    """
    Paired comparison of two arms, each with several runs (seeds), on the problems they all share.

    Each draw resamples the common problems once for both arms (the pairing: a hard question counts against both),
    and each arm's runs on their own (runs of different arms are independent trainings, whatever their seeds), then
    takes the difference of the two resampled means.

    Args:
        runs_a (`Sequence[Mapping[str, float]]`):
            Arm `a`: one mapping per run, problem id -> score.
        runs_b (`Sequence[Mapping[str, float]]`):
            Arm `b` (the baseline), the same way.
        confidence (`float`, *optional*, defaults to `0.95`):
            Coverage of the interval.
        n_resamples (`int`, *optional*, defaults to `10000`):
            Bootstrap draws.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the draws.

    Returns:
        `PairedComparison`: `mean_a - mean_b` over the common problems with its interval
        (`method="paired-crossed-bootstrap"`), both means and the overlap counts (problems, not runs).

    Raises:
        `ValueError`: the arms share no problem id.
    """
    _check_common(confidence, n_resamples)
    problems_a = _common_problems(runs_a, "paired_crossed_bootstrap (a)")
    problems_b = set(_common_problems(runs_b, "paired_crossed_bootstrap (b)"))
    common = [problem for problem in problems_a if problem in problems_b]
    if not common:
        raise ValueError(
            f"The two arms share no problem id ({len(problems_a)} vs {len(problems_b)} problems): a paired comparison "
            "needs both evaluated on the same questions."
        )
    a, b = _run_matrix(runs_a, common), _run_matrix(runs_b, common)
    rng = np.random.default_rng(seed)
    num_problems = len(common)
    draws = _draw_by_problem_counts(
        num_problems, n_resamples, rng, lambda counts: _crossed_draws(a, counts, rng) - _crossed_draws(b, counts, rng)
    )
    low, high = _percentiles(draws, confidence)
    return PairedComparison(
        difference=Interval(
            float(a.mean() - b.mean()), low, high, confidence, n_resamples, "paired-crossed-bootstrap"
        ),
        mean_a=float(a.mean()),
        mean_b=float(b.mean()),
        n_common=num_problems,
        n_only_a=len(problems_a) - num_problems,
        n_only_b=len(problems_b) - num_problems,
    )
