r"""Dynamic Interaction: question difficulty, agent ability and the cooperate/compete rule (1PL IRT).

The probability that agent i answers question q correctly is the one-parameter logistic model with the 1.7 constant:

    P(q, i) = 1 / (1 + exp(-scale * (gamma_i - D_q)))

and agent i **cooperates** on q when `P(q, i) < 0.5` (the question is harder than the agent is able), **competes**
otherwise; `gamma_i == D_q` gives `P = 0.5`, so it competes. The mode is decided per agent: `cooperate[q, i]`.

Where D and gamma come from (`difficulty_source`):

- `self_rank`: in a pre-pass each agent rates every training question 1-10 (`prompts/self_rank.txt`). Replies are
  parsed with [`parse_self_rank`]; an unparsable reply gets that agent's median rating. Each agent's ratings are
  z-scored with its own mean and std over the **training** questions, giving `difficulty[q, i]`, agent i's own view of
  q on the logit scale. The agent also rates the validation questions, which are z-scored with the same training mean
  and std (one affine map per agent, so validation and training difficulties share a scale and the training
  difficulties do not depend on which validation set was drawn). `gamma_i` is then the ability whose expected
  accuracy over those validation difficulties equals the agent's measured validation accuracy
  ([`ability_from_accuracy`]).
- `pass_rate`: k samples per question and agent give correct counts `c[q, i]`; a joint 1PL fit by maximum likelihood
  ([`fit_1pl`]) gives `gamma` and a difficulty per question shared by all agents (`mean(D) = 0` fixes the origin, a
  small L2 prior keeps all-correct and all-wrong questions finite). There gamma comes out of the fit, on the same scale
  by construction.

With `ability_refresh_steps > 0`, [`update_ability`] re-solves gamma from the running training accuracy over the
difficulties of the questions it was measured on.

Everything here is pure maths on arrays (1PL, mode selection, rating parsing and z-scoring, ability inversion, the
joint fit, building an [`IRTEstimate`] from pre-pass results): no I/O, no model. The pre-passes that produce those
results with the agents' models, and the cache of estimates, are in [`ilr.irt`].
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import brentq, minimize
from scipy.special import expit, logit


__all__ = [
    "DEFAULT_IRT_SCALE",
    "IRTEstimate",
    "abilities_from_accuracy",
    "ability_from_accuracy",
    "cooperate_fraction",
    "describe_modes",
    "fill_missing_ratings",
    "fit_1pl",
    "irt_probability",
    "needs_irt",
    "parse_self_rank",
    "pass_rate_estimate",
    "select_modes",
    "self_rank_difficulty",
    "self_rank_estimate",
    "update_ability",
    "zscore_ratings",
]

logger = logging.getLogger(__name__)

DEFAULT_IRT_SCALE = 1.7
DIFFICULTY_SOURCES = ("self_rank", "pass_rate")
RATING_MIN, RATING_MAX = 1, 10
SELF_RANK_TEMPLATE = "self_rank"
# Accuracy is clipped to [eps, 1 - eps] before inversion, so 0% and 100% give finite abilities.
DEFAULT_ACCURACY_EPS = 1e-3
# Precision of the N(0, 1 / l2) prior on every gamma and D of the joint fit (prior std ~3.2 on the logit scale). It
# keeps all-correct / all-wrong questions finite, and it offsets most of joint maximum likelihood's known bias: with
# only k * m answers per question the per-question D's are noisy, which stretches the gammas apart. Simulated
# (D ~ N(0, 1), Q = 12,000, m = 2, k = 4), the gamma error is ~0.2-0.3 at l2 = 0.01 and ~0.05-0.13 at l2 = 0.1; for
# D ~ N(0, 2^2) larger l2 starts to shrink too much. The mode decisions barely move across 0.01 to 1.
DEFAULT_FIT_L2 = 0.1


# ---------------------------------------------------------------------------------------------------------------------
# The 1PL model and the interaction rule
# ---------------------------------------------------------------------------------------------------------------------


def _as_question_agent(difficulty: np.ndarray, num_agents: int) -> np.ndarray:
    """Broadcast a shared `[Q]` difficulty to `[Q, m]`; check a per-agent `[Q, m]` one."""
    difficulty = np.asarray(difficulty, dtype=float)
    if difficulty.ndim == 1:
        return np.broadcast_to(difficulty[:, None], (difficulty.shape[0], num_agents))
    if difficulty.ndim != 2 or difficulty.shape[1] != num_agents:
        raise ValueError(
            f"`difficulty` must have shape (Q,) or (Q, m) with m = {num_agents} agents (got {difficulty.shape})."
        )
    return difficulty


def irt_probability(gamma: np.ndarray, difficulty: np.ndarray, *, scale: float = DEFAULT_IRT_SCALE) -> np.ndarray:
    """
    1PL probability that each agent answers each question correctly.

    Args:
        gamma (`np.ndarray` of shape `(m,)`):
            Ability of each agent.
        difficulty (`np.ndarray` of shape `(Q, m)` or `(Q,)`):
            Difficulty of each question as seen by each agent, or shared by all agents.
        scale (`float`, *optional*, defaults to `1.7`):
            Logistic scaling constant.

    Returns:
        `np.ndarray` of shape `(Q, m)`: `1 / (1 + exp(-scale * (gamma[i] - difficulty[q, i])))`.
    """
    gamma = np.asarray(gamma, dtype=float)
    return expit(scale * (gamma[None, :] - _as_question_agent(difficulty, gamma.shape[0])))


def needs_irt(interaction_mode: str) -> bool:
    """
    Whether `interaction_mode` needs difficulty and ability estimates (only `dynamic` does), i.e. a pre-pass.

    Args:
        interaction_mode (`str`):
            `dynamic`, `cooperate`, `compete` or `ratio:p`.

    Returns:
        `bool`: `True` for `dynamic`.
    """
    # configs pulls in TRL (seconds to import); imported here so that the maths imports on its own.
    from ilr.configs import cooperate_probability

    return cooperate_probability(interaction_mode) is None


def select_modes(
    difficulty: np.ndarray,
    gamma: np.ndarray | None,
    interaction_mode: str,
    *,
    scale: float = DEFAULT_IRT_SCALE,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """
    Decide, for every question and agent, whether the agent cooperates (`True`) or competes (`False`).

    Args:
        difficulty (`np.ndarray` of shape `(Q, m)` or `(Q,)`):
            Difficulties of the batch's questions (per agent, or shared). Under a fixed mode only its shape is used
            (pass `np.zeros((Q, m))` when no estimates exist).
        gamma (`np.ndarray` of shape `(m,)` or `None`):
            Ability of each agent. Needed for `dynamic` only.
        interaction_mode (`str`):
            `dynamic`: cooperate iff `P(q, i) < 0.5`. `cooperate` / `compete`: everyone, always. `ratio:p`: each
            (question, agent) cooperates with probability p, independently.
        scale (`float`, *optional*, defaults to `1.7`):
            Logistic scaling constant of the 1PL model.
        rng (`np.random.Generator`, *optional*):
            Source of the `ratio:p` draws (0 < p < 1); required there so runs are reproducible.

    Returns:
        `np.ndarray` of dtype `bool` and shape `(Q, m)`: the cooperation mask `coop_mask[q, i]`.
    """
    from ilr.configs import cooperate_probability  # see `needs_irt`

    coop_probability = cooperate_probability(interaction_mode)
    if coop_probability is None:
        if gamma is None:
            raise ValueError("`interaction_mode: dynamic` needs the agents' abilities `gamma` (got None).")
        gamma = np.asarray(gamma, dtype=float)
        difficulty = _as_question_agent(difficulty, gamma.shape[0])
        # P < 0.5  <=>  scale * (gamma - D) < 0  <=>  gamma < D. Comparing the logit keeps the tie (gamma == D,
        # P = 0.5 -> compete) exact, where a rounded sigmoid could land either side of 0.5.
        return gamma[None, :] < difficulty
    difficulty = np.asarray(difficulty)
    if difficulty.ndim != 2:
        raise ValueError(
            f"Under a fixed interaction mode `difficulty` must be (Q, m) to give the shape (got {difficulty.shape})."
        )
    shape = difficulty.shape
    if coop_probability in (0.0, 1.0):
        return np.full(shape, coop_probability == 1.0)
    if rng is None:
        raise ValueError(f"`interaction_mode: {interaction_mode}` draws modes at random: pass a seeded `rng`.")
    return rng.random(shape) < coop_probability


def cooperate_fraction(coop_mask: np.ndarray) -> float:
    """
    Fraction of (question, agent) pairs that cooperate, logged as `interaction/coop_frac`.

    Args:
        coop_mask (`np.ndarray` of dtype `bool`):
            Output of [`select_modes`].

    Returns:
        `float`: Mean of the mask; `nan` for an empty mask.
    """
    coop_mask = np.asarray(coop_mask, dtype=bool)
    return float(coop_mask.mean()) if coop_mask.size else float("nan")


# ---------------------------------------------------------------------------------------------------------------------
# Self-rank ratings: parsing, filling, z-scoring
# ---------------------------------------------------------------------------------------------------------------------

# A number not glued to a digit, a decimal point or a minus sign before it ("-3" and "1.5" are not "3" and "5").
_NUMBER = r"(?<![\d.\-])(\d+(?:\.\d+)?)(?![\d])"
_RATING_PATTERNS = [
    # "Difficulty: 7", "Difficulty level: **7**", "difficulty of 7", "I'd rate it 7", "Rating: 7".
    re.compile(r"\b(?:difficulty|rating|rate[ds]?)\b[^\d\n]{0,40}?" + _NUMBER, re.IGNORECASE),
    # "7/10", "7 / 10", "7 out of 10".
    re.compile(_NUMBER + r"\s*(?:/|out\s+of)\s*10\b", re.IGNORECASE),
    # "**7**", "\boxed{7}".
    re.compile(r"\*\*\s*" + _NUMBER + r"\s*\*\*"),
    re.compile(r"\\boxed\{\s*" + _NUMBER + r"\s*\}"),
    # A reply that is nothing but the number: "7", "7.", "**7**".
    re.compile(r"\A[^\w]*" + _NUMBER + r"[^\w]*\Z"),
]


def parse_self_rank(text: str | None) -> int | None:
    """
    Read a 1-10 difficulty rating from an agent's reply.

    Rating-like numbers are those after "difficulty" / "rating" / "rate(d)", before "/10" or "out of 10", in bold, in
    `\\boxed{}`, or a reply that is only a number. The **last** of them within 1..10 wins (a model that revises its
    rating states the final one last); decimals are rounded half up; numbers outside 1..10 are rejected. Other numbers
    (from the problem, say) are ignored.

    Args:
        text (`str` or `None`):
            The reply.

    Returns:
        `int | None`: The rating, or `None` when the reply holds no rating in 1..10.
    """
    if not isinstance(text, str):
        return None
    candidates: list[tuple[int, float]] = []
    for pattern in _RATING_PATTERNS:
        candidates.extend((match.start(1), float(match.group(1))) for match in pattern.finditer(text))
    for _, value in sorted(candidates, reverse=True):
        rating = math.floor(value + 0.5)
        if RATING_MIN <= rating <= RATING_MAX:
            return rating
    return None


def fill_missing_ratings(ratings: np.ndarray, medians: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """
    Replace unparsable ratings (`nan`) with the agent's median rating.

    Args:
        ratings (`np.ndarray` of shape `(Q, m)`):
            Ratings, `nan` where the reply could not be parsed.
        medians (`np.ndarray` of shape `(m,)`, *optional*):
            Fill values; defaults to each agent's median over its parsed `ratings`. Pass the training medians when
            filling validation ratings, so both use one fill value.

    Returns:
        `tuple[np.ndarray, np.ndarray]`: The filled ratings `(Q, m)` and the medians used `(m,)`.
    """
    ratings = np.array(ratings, dtype=float)
    if ratings.ndim != 2:
        raise ValueError(f"`ratings` must have shape (Q, m) (got {ratings.shape}).")
    missing = np.isnan(ratings)
    if medians is None:
        medians = np.full(ratings.shape[1], (RATING_MIN + RATING_MAX) / 2)
        for agent in range(ratings.shape[1]):
            parsed = ratings[~missing[:, agent], agent]
            if parsed.size:
                medians[agent] = np.median(parsed)
            elif ratings.shape[0]:
                logger.warning(
                    "Agent %d: none of its %d self-rank replies could be parsed; every question gets the middle "
                    "rating, so all its difficulties are 0 (it always competes when gamma >= 0).",
                    agent,
                    ratings.shape[0],
                )
    medians = np.asarray(medians, dtype=float)
    for agent, count in enumerate(missing.sum(axis=0)):
        if count:
            logger.warning(
                "Agent %d: %d of %d self-rank ratings unparsable, set to its median %.1f.",
                agent,
                count,
                ratings.shape[0],
                medians[agent],
            )
    ratings[missing] = np.broadcast_to(medians, ratings.shape)[missing]
    return ratings, medians


def zscore_ratings(
    ratings: np.ndarray, mean: np.ndarray | None = None, std: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """
    Z-score each agent's ratings (columns) onto the logit scale: higher rating, harder, larger D.

    Args:
        ratings (`np.ndarray` of shape `(Q, m)`):
            Complete ratings (no `nan`).
        mean (`np.ndarray` of shape `(m,)`, *optional*):
            Per-agent centre; defaults to the column means of `ratings`.
        std (`np.ndarray` of shape `(m,)`, *optional*):
            Per-agent spread; defaults to the column standard deviations (ddof 0). An agent whose std is (near) zero,
            one that rated everything the same, gets difficulty 0 everywhere instead of a division by zero.

    Returns:
        `tuple[np.ndarray, np.ndarray, np.ndarray]`: The difficulties `(Q, m)` and the `mean` and `std` used, to map
        further ratings (validation) onto the same scale.
    """
    ratings = np.asarray(ratings, dtype=float)
    if ratings.ndim != 2 or np.isnan(ratings).any():
        raise ValueError("`ratings` must be a (Q, m) array without nan; fill it with `fill_missing_ratings` first.")
    mean = ratings.mean(axis=0) if mean is None else np.asarray(mean, dtype=float)
    std = ratings.std(axis=0) if std is None else np.asarray(std, dtype=float)
    spread = std > 1e-12
    difficulty = np.zeros_like(ratings)
    difficulty[:, spread] = (ratings[:, spread] - mean[spread]) / std[spread]
    return difficulty, mean, std


def self_rank_difficulty(
    train_ratings: np.ndarray, val_ratings: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """
    Difficulties from raw self-rank ratings: median fill, then per-agent z-scores with the training mean and std.

    Args:
        train_ratings (`np.ndarray` of shape `(Q, m)`):
            Each agent's ratings of the training questions, `nan` where unparsable.
        val_ratings (`np.ndarray` of shape `(V, m)`, *optional*):
            The same agents' ratings of the validation questions. They are filled with the training medians and mapped
            with the training mean and std, so they land on the training questions' scale.

    Returns:
        `tuple[np.ndarray, np.ndarray | None]`: Training difficulties `(Q, m)` and validation difficulties `(V, m)`
        (or `None`).
    """
    train_filled, medians = fill_missing_ratings(train_ratings)
    train_difficulty, mean, std = zscore_ratings(train_filled)
    if val_ratings is None:
        return train_difficulty, None
    val_filled, _ = fill_missing_ratings(val_ratings, medians=medians)
    val_difficulty, _, _ = zscore_ratings(val_filled, mean=mean, std=std)
    return train_difficulty, val_difficulty


# ---------------------------------------------------------------------------------------------------------------------
# Ability from accuracy
# ---------------------------------------------------------------------------------------------------------------------


def ability_from_accuracy(
    accuracy: float,
    difficulties: np.ndarray,
    *,
    scale: float = DEFAULT_IRT_SCALE,
    eps: float = DEFAULT_ACCURACY_EPS,
) -> float:
    """
    The ability whose expected accuracy over the given questions equals the measured one.

    Solves `mean_q P(gamma, D_q) = accuracy` for gamma; the left side rises strictly with gamma, so a bracketed root
    find (Brent) gives the unique root.

    Args:
        accuracy (`float`):
            Measured accuracy in [0, 1]; clipped to `[eps, 1 - eps]` so that 0% and 100% give finite abilities.
        difficulties (`np.ndarray` of shape `(n,)`):
            Difficulties of the questions the accuracy was measured on, on the scale gamma must share.
        scale (`float`, *optional*, defaults to `1.7`):
            Logistic scaling constant.
        eps (`float`, *optional*, defaults to `1e-3`):
            Accuracy clipping margin.

    Returns:
        `float`: gamma.
    """
    difficulties = np.asarray(difficulties, dtype=float).ravel()
    if not difficulties.size or not np.isfinite(difficulties).all():
        raise ValueError("`difficulties` must be a non-empty array of finite values.")
    if not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"`accuracy` must be in [0, 1] (got {accuracy}).")
    target = min(max(float(accuracy), eps), 1.0 - eps)

    def excess(gamma: float) -> float:
        return float(expit(scale * (gamma - difficulties)).mean()) - target

    # At the lower end every P <= target (each term is at most target), at the upper end every P >= target: a bracket.
    margin = abs(float(logit(target))) / scale + 1.0
    low, high = difficulties.min() - margin, difficulties.max() + margin
    return float(brentq(excess, low, high, xtol=1e-12, rtol=4 * np.finfo(float).eps, maxiter=200))


def abilities_from_accuracy(
    accuracy: np.ndarray,
    difficulty: np.ndarray,
    *,
    scale: float = DEFAULT_IRT_SCALE,
    eps: float = DEFAULT_ACCURACY_EPS,
) -> np.ndarray:
    """
    [`ability_from_accuracy`] for every agent.

    Args:
        accuracy (`np.ndarray` of shape `(m,)`):
            Each agent's accuracy on the questions.
        difficulty (`np.ndarray` of shape `(n, m)` or `(n,)`):
            Each agent's view of the questions' difficulties, or one shared difficulty.
        scale (`float`, *optional*, defaults to `1.7`):
            Logistic scaling constant.
        eps (`float`, *optional*, defaults to `1e-3`):
            Accuracy clipping margin.

    Returns:
        `np.ndarray` of shape `(m,)`: gamma.
    """
    accuracy = np.asarray(accuracy, dtype=float)
    difficulty = _as_question_agent(difficulty, accuracy.shape[0])
    return np.array(
        [ability_from_accuracy(acc, difficulty[:, i], scale=scale, eps=eps) for i, acc in enumerate(accuracy)]
    )


def update_ability(
    gamma: np.ndarray,
    running_accuracy: np.ndarray,
    difficulty: np.ndarray,
    *,
    scale: float = DEFAULT_IRT_SCALE,
    eps: float = DEFAULT_ACCURACY_EPS,
) -> np.ndarray:
    """
    Refresh the abilities from the running training accuracy (every `ability_refresh_steps` steps).

    Args:
        gamma (`np.ndarray` of shape `(m,)`):
            Current abilities, kept for an agent with no accuracy yet.
        running_accuracy (`np.ndarray` of shape `(m,)`):
            Each agent's accuracy over the recent training questions; `nan` for an agent without any.
        difficulty (`np.ndarray` of shape `(n, m)` or `(n,)`):
            Difficulties of the questions the running accuracy was measured on, so the new gamma is on their scale.
        scale (`float`, *optional*, defaults to `1.7`):
            Logistic scaling constant.
        eps (`float`, *optional*, defaults to `1e-3`):
            Accuracy clipping margin.

    Returns:
        `np.ndarray` of shape `(m,)`: The new abilities (a new array).
    """
    new_gamma = np.array(gamma, dtype=float)
    running_accuracy = np.asarray(running_accuracy, dtype=float)
    difficulty = _as_question_agent(difficulty, new_gamma.shape[0])
    for agent in np.flatnonzero(np.isfinite(running_accuracy)):
        new_gamma[agent] = ability_from_accuracy(running_accuracy[agent], difficulty[:, agent], scale=scale, eps=eps)
    return new_gamma


# ---------------------------------------------------------------------------------------------------------------------
# Joint 1PL fit from pass counts
# ---------------------------------------------------------------------------------------------------------------------


def fit_1pl(
    correct: np.ndarray,
    trials: int | np.ndarray,
    *,
    scale: float = DEFAULT_IRT_SCALE,
    l2: float = DEFAULT_FIT_L2,
    max_iter: int = 2000,
) -> tuple[np.ndarray, np.ndarray]:
    """
    Fit abilities and difficulties jointly to pass counts by penalised maximum likelihood.

    Model: `correct[q, i] ~ Binomial(trials[q, i], P(q, i))` with the 1PL `P`. The loss is the negative binomial
    log-likelihood plus `l2 / 2 * (|gamma|^2 + |D|^2)`, minimised by L-BFGS-B with its analytic gradient. The origin is
    fixed by `mean(D) = 0`: D is parametrised as `u - mean(u)` (the gradient is projected accordingly).

    Args:
        correct (`np.ndarray` of shape `(Q, m)`):
            Correct answers of agent i on question q.
        trials (`int` or `np.ndarray` of shape `(Q, m)`):
            Answers sampled per question and agent (k).
        scale (`float`, *optional*, defaults to `1.7`):
            Logistic scaling constant.
        l2 (`float`, *optional*, defaults to `0.1`):
            Precision of the Gaussian prior on every parameter; > 0 keeps all-correct / all-wrong questions finite.
            See `DEFAULT_FIT_L2` for the choice.
        max_iter (`int`, *optional*, defaults to `2000`):
            L-BFGS-B iteration limit.

    Returns:
        `tuple[np.ndarray, np.ndarray]`: `gamma` of shape `(m,)` and the shared difficulties `D` of shape `(Q,)`,
        with `D.mean() == 0`.
    """
    correct = np.asarray(correct, dtype=float)
    if correct.ndim != 2 or correct.shape[0] == 0:
        raise ValueError(f"`correct` must have shape (Q, m) with Q >= 1 (got {correct.shape}).")
    trials = np.broadcast_to(np.asarray(trials, dtype=float), correct.shape)
    if (correct < 0).any() or (correct > trials).any():
        raise ValueError("`correct` must satisfy 0 <= correct <= trials everywhere.")
    if l2 <= 0:
        raise ValueError(f"`l2` must be > 0 so that all-correct / all-wrong questions stay finite (got {l2}).")
    num_agents = correct.shape[1]

    # Start from smoothed pass rates: agent and question logits, mean D = 0.
    question_rate = (correct.sum(axis=1) + 0.5) / (trials.sum(axis=1) + 1.0)
    agent_rate = (correct.sum(axis=0) + 0.5) / (trials.sum(axis=0) + 1.0)
    start_difficulty = -logit(question_rate) / scale
    start_difficulty -= start_difficulty.mean()
    start_gamma = logit(agent_rate) / scale
    # Diagonal preconditioning: the curvature of a gamma (Q * k answers) is thousands of times that of a D (k * m
    # answers), which leaves plain L-BFGS crawling for hundreds of iterations at Q = 12,000. Optimising
    # `x = param * sqrt(curvature at the start)` evens them out: ~20 iterations.
    start_z = scale * (start_gamma[None, :] - start_difficulty[:, None])
    weight = trials * expit(start_z) * expit(-start_z) * scale**2
    unit = np.sqrt(np.concatenate([weight.sum(axis=0), weight.sum(axis=1)]) + l2)

    def loss_and_grad(x: np.ndarray) -> tuple[float, np.ndarray]:
        params = x / unit
        gamma, free = params[:num_agents], params[num_agents:]
        difficulty = free - free.mean()
        z = scale * (gamma[None, :] - difficulty[:, None])
        # -log L = sum k * log(1 + e^z) - c * z; logaddexp is the overflow-safe softplus.
        nll = float(np.sum(trials * np.logaddexp(0.0, z) - correct * z))
        penalty = 0.5 * l2 * float(gamma @ gamma + difficulty @ difficulty)
        residual = trials * expit(z) - correct  # d(-log L) / dz
        grad_gamma = scale * residual.sum(axis=0) + l2 * gamma
        grad_difficulty = -scale * residual.sum(axis=1) + l2 * difficulty
        # Chain rule through the centring D = u - mean(u) (project out the mean), then through the preconditioning.
        grad = np.concatenate([grad_gamma, grad_difficulty - grad_difficulty.mean()])
        return nll + penalty, grad / unit

    result = minimize(
        loss_and_grad,
        np.concatenate([start_gamma, start_difficulty]) * unit,
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": max_iter, "maxfun": 2 * max_iter, "ftol": 1e-12, "gtol": 1e-6},
    )
    if not result.success:
        logger.warning("1PL fit stopped before converging (%s); using the last iterate.", result.message)
    params = result.x / unit
    gamma, free = params[:num_agents], params[num_agents:]
    return gamma.copy(), free - free.mean()


# ---------------------------------------------------------------------------------------------------------------------
# Estimates (plain data)
# ---------------------------------------------------------------------------------------------------------------------

CACHE_FORMAT_VERSION = 1


@dataclass(eq=False)  # ndarray fields: compare with `to_dict()`
class IRTEstimate:
    """
    Difficulty and ability estimates of one set of agents on one set of training questions.

    Args:
        question_ids (`list[str]`):
            Training question ids, one per row of `difficulty`.
        difficulty (`np.ndarray` of shape `(Q, m)`):
            Difficulty of question q as seen by agent i (a shared `pass_rate` difficulty is repeated per agent).
        gamma (`np.ndarray` of shape `(m,)`):
            Ability of each agent, on the scale of its column of `difficulty`.
        source (`str`):
            `self_rank` or `pass_rate`.
        metadata (`dict`, *optional*):
            JSON-serialisable details: settings, agents' model ids and revisions, dataset fingerprint, parse failures,
            the cache key fields.
    """

    question_ids: list[str]
    difficulty: np.ndarray
    gamma: np.ndarray
    source: str
    metadata: dict[str, Any] = field(default_factory=dict)
    _row_of: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.question_ids = [str(question_id) for question_id in self.question_ids]
        self.gamma = np.asarray(self.gamma, dtype=float)
        if self.gamma.ndim != 1:
            raise ValueError(f"`gamma` must have shape (m,) (got {self.gamma.shape}).")
        self.difficulty = np.array(_as_question_agent(self.difficulty, self.gamma.shape[0]), dtype=float)
        if self.difficulty.shape[0] != len(self.question_ids):
            raise ValueError(
                f"`difficulty` has {self.difficulty.shape[0]} rows for {len(self.question_ids)} question ids."
            )
        if not (np.isfinite(self.difficulty).all() and np.isfinite(self.gamma).all()):
            raise ValueError("IRT estimates must be finite.")
        if self.source not in DIFFICULTY_SOURCES:
            raise ValueError(f"`source` must be one of {DIFFICULTY_SOURCES} (got {self.source!r}).")
        self._row_of = {question_id: row for row, question_id in enumerate(self.question_ids)}
        if len(self._row_of) != len(self.question_ids):
            raise ValueError("`question_ids` contains duplicates.")

    @property
    def num_agents(self) -> int:
        return self.gamma.shape[0]

    def difficulty_for(self, question_ids: Sequence[str]) -> np.ndarray:
        """
        Rows of `difficulty` for a batch of questions.

        Args:
            question_ids (`Sequence[str]`):
                Ids of the batch's questions.

        Returns:
            `np.ndarray` of shape `(len(question_ids), m)`.
        """
        try:
            rows = [self._row_of[str(question_id)] for question_id in question_ids]
        except KeyError as err:
            raise KeyError(
                f"Question {err.args[0]!r} has no IRT estimate; was the cache built on this dataset?"
            ) from None
        return self.difficulty[rows]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (plain lists and floats)."""
        return {
            "format_version": CACHE_FORMAT_VERSION,
            "source": self.source,
            "question_ids": list(self.question_ids),
            "difficulty": self.difficulty.tolist(),
            "gamma": self.gamma.tolist(),
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IRTEstimate:
        """Inverse of [`to_dict`]; raises `ValueError`, `KeyError` or `TypeError` on malformed input."""
        if data.get("format_version") != CACHE_FORMAT_VERSION:
            raise ValueError(f"Unsupported IRT cache format {data.get('format_version')!r}.")
        metadata = data.get("metadata", {})
        if not isinstance(metadata, dict):
            raise TypeError("`metadata` must be a mapping.")
        return cls(
            question_ids=list(data["question_ids"]),
            difficulty=np.asarray(data["difficulty"], dtype=float),
            gamma=np.asarray(data["gamma"], dtype=float),
            source=data["source"],
            metadata=metadata,
        )


# ---------------------------------------------------------------------------------------------------------------------
# Estimates from pre-pass results
# ---------------------------------------------------------------------------------------------------------------------


def self_rank_estimate(
    question_ids: Sequence[str],
    train_ratings: np.ndarray,
    val_ratings: np.ndarray,
    val_accuracy: np.ndarray,
    *,
    scale: float = DEFAULT_IRT_SCALE,
    eps: float = DEFAULT_ACCURACY_EPS,
    metadata: dict[str, Any] | None = None,
) -> IRTEstimate:
    """
    The `self_rank` estimate: z-scored ratings as difficulties, gamma from validation accuracy on the same scale.

    Args:
        question_ids (`Sequence[str]`):
            Training question ids, one per row of `train_ratings`.
        train_ratings (`np.ndarray` of shape `(Q, m)`):
            Ratings of the training questions ([`self_rank_prepass`]), `nan` where unparsable.
        val_ratings (`np.ndarray` of shape `(V, m)`):
            Ratings of the validation questions by the same agents.
        val_accuracy (`np.ndarray` of shape `(m,)`):
            Each agent's accuracy on those validation questions (e.g. `pass_rate_prepass(..., k=1).mean(axis=0)`).
        scale (`float`, *optional*, defaults to `1.7`):
            Logistic scaling constant.
        eps (`float`, *optional*, defaults to `1e-3`):
            Accuracy clipping margin.
        metadata (`dict`, *optional*):
            Stored with the estimate.

    Returns:
        `IRTEstimate`
    """
    train_difficulty, val_difficulty = self_rank_difficulty(train_ratings, val_ratings)
    gamma = abilities_from_accuracy(val_accuracy, val_difficulty, scale=scale, eps=eps)
    unparsed = [int(np.isnan(np.asarray(r, dtype=float)).sum()) for r in (train_ratings, val_ratings)]
    details = {
        "scale": scale,
        "val_accuracy": np.asarray(val_accuracy, dtype=float).tolist(),
        "unparsed_ratings": {"train": unparsed[0], "validation": unparsed[1]},
    }
    return IRTEstimate(list(question_ids), train_difficulty, gamma, "self_rank", {**details, **(metadata or {})})


def pass_rate_estimate(
    question_ids: Sequence[str],
    correct: np.ndarray,
    trials: int | np.ndarray,
    *,
    scale: float = DEFAULT_IRT_SCALE,
    l2: float = DEFAULT_FIT_L2,
    metadata: dict[str, Any] | None = None,
) -> IRTEstimate:
    """
    The `pass_rate` estimate: [`fit_1pl`] on the pass counts, the shared difficulty repeated for every agent.

    Args:
        question_ids (`Sequence[str]`):
            Training question ids, one per row of `correct`.
        correct (`np.ndarray` of shape `(Q, m)`):
            Correct answers out of `trials` ([`pass_rate_prepass`]).
        trials (`int` or `np.ndarray` of shape `(Q, m)`):
            Samples per question and agent (k).
        scale (`float`, *optional*, defaults to `1.7`):
            Logistic scaling constant.
        l2 (`float`, *optional*, defaults to `0.1`):
            Prior precision of the fit.
        metadata (`dict`, *optional*):
            Stored with the estimate.

    Returns:
        `IRTEstimate`
    """
    gamma, shared_difficulty = fit_1pl(correct, trials, scale=scale, l2=l2)
    details = {
        "scale": scale,
        "l2": l2,
        "train_accuracy": (
            np.sum(correct, axis=0) / np.sum(np.broadcast_to(trials, np.shape(correct)), axis=0)
        ).tolist(),
    }
    return IRTEstimate(list(question_ids), shared_difficulty, gamma, "pass_rate", {**details, **(metadata or {})})


def describe_modes(estimate: IRTEstimate, agent_names: Sequence[str]) -> tuple[str, str | None]:
    """
    What an IRT estimate means for the run: each agent's ability, the range of the questions' difficulty and the share
    of training questions each agent will cooperate on; and a warning when every question gets the same mode.

    Args:
        estimate ([`IRTEstimate`]):
            The run's estimate.
        agent_names (`Sequence[str]`):
            One name per agent.

    Returns:
        `tuple[str, str | None]`: The summary line, and the warning (or `None` when both modes occur).
    """
    coop = select_modes(estimate.difficulty, estimate.gamma, "dynamic")
    shares = ", ".join(f"{name} {100 * coop[:, i].mean():.0f}%" for i, name in enumerate(agent_names))
    abilities = ", ".join(f"{name} {gamma:+.2f}" for name, gamma in zip(agent_names, estimate.gamma))
    low, high = float(estimate.difficulty.min()), float(estimate.difficulty.max())
    line = (
        f"Dynamic Interaction ({estimate.source}): abilities {abilities}; question difficulty {low:+.2f} to "
        f"{high:+.2f}; cooperation on {shares} of the {len(estimate.question_ids)} training questions."
    )
    if coop.all() or not coop.any():
        mode, side = ("cooperate", "harder") if coop.all() else ("compete", "easier")
        warning = (
            f"Every training question is {side} than every agent's ability, so dynamic interaction will {mode} on "
            "all of them (abilities refreshed during the run may change this). For both modes, train on data whose "
            "difficulty straddles the agents' ability; to choose the mode yourself, set `interaction_mode` to "
            "`cooperate`, `compete` or `ratio:<p>`."
        )
        return line, warning
    return line, None
