r"""Perception Calibration: fold the peers' reward statistics into each agent's reward.

For m >= 2 agents trained together, the calibrated reward of agent i's k-th response is (ILR paper, section 4):

    R'_{i,k} = R_{i,k} + sum_{l != i} clip( (R_{i,k} - avg_l) / (max_l - min_l), -1/(m-1), +1/(m-1) )

where avg_l, max_l and min_l are statistics of peer l's rewards, and GRPO then runs on R' as usual. Which rewards
enter the statistics is our choice (`calibration_scope`):

- `group` (default): peer l's G rewards for the *same question and stage*.
- `batch`: peer l's rewards for every question of the batch in that stage.

A peer whose rewards are all equal has `max_l - min_l == 0`; `calibration_eps` is then the denominator and the peer's
value itself its mean (never a rounded mean), so its term is exactly 0 for a reward equal to the peer's and ±1/(m-1)
(clipped) for any other reward.

## When calibration is a no-op (read this before reporting a calibration ablation)

Within one GRPO group (agent i, question q, stage), the peer statistics are the *same for every sample k*, in both
scopes. Calibration therefore applies one function to all G rewards of the group:

    f(R) = R + sum_{l != i} clip((R - avg_l) / range_l, -b, b),     b = 1/(m-1)

f is strictly increasing (the identity plus non-decreasing terms), and on the rewards of the group it is

1. **affine** with slope `a = 1 + sum_l 1/range_l` when no term of the group is clipped, whatever the reward values;
2. **affine on any two-valued set**, clipped or not: a strictly increasing map of two points is always affine. With
   **binary rewards** (accuracy 1/0) the slope is `a = f(1) - f(0) = 1 + sum_l [clip(1 - avg_l) - clip(-avg_l)]`:
   `min(1 - p_l, b) + min(p_l, b)` for a peer with mixed results (range 1, success rate p_l), `b` for a peer with
   constant results (range 0 -> eps);
3. for **m = 2 and binary rewards**, `b = 1` and each of those is exactly 1: **`a = 2` for every group** (1 where the
   peer has no scorable reward), i.e. `f(R) = 2R + c_q`. With `batch` scope, f is moreover the same for all questions.

How the three `scale_rewards` modes react to f (up to TRL's `+1e-4` on the std; NaN rewards are left out of every
statistic and get advantage 0 either way):

- `group`, `A = (R - mean_q) / (std_q + 1e-4)`: invariant under a positive affine map of the group's rewards. A slope
  a >= 1 gives `A' = A * (std + 1e-4) / (std + 1e-4 / a)`, a relative change below `1e-4 / std`.
- `none`, `A = R - mean_q`: multiplied by the group's slope a_q.
- `batch`, `A = (R - mean_q) / (std_batch + 1e-4)`: the numerator is multiplied by a_q, but the batch std is taken over
  *all* calibrated rewards, so the per-question intercepts c_q of `f = a_q R + c_q` enter it. With equal slopes the
  result is a uniform rescaling `A' = kappa * A` (kappa = 1 when the intercepts are equal too, e.g. `batch` scope).

Hence, per agent and stage (kappa: one positive factor for the whole batch; in brackets: with `batch` scope):

| rewards                       | `scale_rewards: group` | `batch`                 | `none`             |
|-------------------------------|------------------------|-------------------------|--------------------|
| binary, m = 2                 | unchanged              | x kappa (unchanged)     | x 2                |
| binary, m >= 3                | unchanged              | changed (unchanged)     | x a_q (x a)        |
| multi-valued, nothing clipped | unchanged              | changed (unchanged)     | x a_q (x a)        |
| multi-valued, clipping active | changed                | changed                 | changed            |

"x 2" and "x kappa" rescale the agent's whole policy gradient of that stage and step without changing its direction
(groups whose peer has no scorable reward keep slope 1): with `beta: 0` that is a per-step learning-rate factor (which
Adam largely normalises away); with `beta > 0` it also shifts the balance against the KL term, and with `batch`
scaling kappa can differ between the stages an agent trains on in one step. So in the paper's main setting, two agents
and a 0/1 accuracy reward, the formula cannot change the direction of a stage's GRPO gradient, whatever the
normalisation and scope.

When do terms get clipped with binary rewards? A mixed peer gives the term `R - p_l`: never clipped for m = 2
(`|R - p_l| <= 1 = b`), clipped for m >= 3 whenever `|R - p_l| > 1/(m-1)` (m = 3: for one of the two reward values
whenever `p_l != 1/2`). A constant peer (all correct or all wrong on the question, or on the whole batch with `batch`
scope) is clipped for every reward that differs from its value. So for m = 2, group scope, binary rewards, clipping
happens exactly when the peer solved all or none of its samples and the agent's reward differs; by points 2 and 3
it changes nothing beyond the first row of the table. `tests/test_calibration.py` checks the table's rows with
property tests.

## When calibration matters

It changes the relative weight of an agent's samples within a step only with:

- multi-valued rewards (accuracy plus a weighted format reward, the fraction of tests passed for code) *with clipping
  active*: f is then piecewise linear, not affine, on the group's rewards. It changes the gaps between them (never
  their order), under any `scale_rewards`;
- `scale_rewards: none` or `batch` with `group` scope and slopes a_q that differ between questions: m >= 3 agents, or
  multi-valued rewards. Calibration then re-weights questions by how spread (and, with clipping, how good) the peers'
  results are.

`batch` scope on its own changes the constants of f, never its monotonicity: it matters only through these cases
(it changes which terms are clipped). Everything else is a no-op or a uniform per-step rescaling.

Log `calibration/clip_frac` ([`CalibrationResult.clip_frac`]) and `calibration/adv_delta` ([`advantage_delta`], mean
|A' - A| between the advantages with and without calibration) to see whether calibration moved anything in a run, and
`calibration/reshaped_frac` and `calibration/sign_flip_frac` ([`advantage_change`]) to tell a rescaling (both 0) from a
change of the gradient's direction within groups.

## NaN rewards (a reward function returned `None`: cannot score)

- A NaN reward is left out of the peer statistics (nan-aware mean, max and min).
- An agent's own NaN reward stays NaN after calibration (never silently 0); the advantage code excludes it.
- A peer with no scorable reward in the scope (all NaN) contributes 0 to every term of that group (scope `batch`:
  of the whole batch): there is nothing to compare with.
- `clip_frac` counts only the terms that exist: own reward not NaN, peer statistics defined.

Pure tensor code: no I/O, no model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


__all__ = [
    "AdvantageChange",
    "CalibrationResult",
    "advantage_change",
    "advantage_delta",
    "calibrate_rewards",
    "peer_reward_stats",
]

# Same values as `ilr.configs.CALIBRATION_SCOPES` (a test keeps them equal); not imported from there, so that this
# pure module does not pull in trl.
_SCOPES = ("group", "batch")


@dataclass(frozen=True)
class CalibrationResult:
    """
    Calibrated rewards of one stage and the diagnostics to log.

    Args:
        rewards (`torch.Tensor` of shape `(m, Q, G)`):
            Calibrated rewards `R'`, same layout as the input: agent, question, sample. NaN where the raw reward was
            NaN.
        clip_frac (`torch.Tensor`, 0-dim):
            Fraction of the calibration terms (agent i, question, sample k, peer l != i) whose value the clip changed,
            i.e. `|R_{i,k} - avg_l| / range_l > 1/(m-1)`. Only existing terms count (see the NaN policy); `0.0` when
            there are none. Log as `calibration/clip_frac`.
        clip_frac_per_agent (`torch.Tensor` of shape `(m,)`):
            The same fraction over agent i's own terms.
        peer_mean (`torch.Tensor` of shape `(m, Q)`):
            avg_l: nan-aware mean of agent l's rewards over the scope, per question (constant over Q with `batch`
            scope). NaN when the scope holds no scorable reward.
        peer_max (`torch.Tensor` of shape `(m, Q)`):
            max_l, same layout.
        peer_min (`torch.Tensor` of shape `(m, Q)`):
            min_l, same layout.
    """

    rewards: torch.Tensor
    clip_frac: torch.Tensor
    clip_frac_per_agent: torch.Tensor
    peer_mean: torch.Tensor
    peer_max: torch.Tensor
    peer_min: torch.Tensor


def peer_reward_stats(
    rewards: torch.Tensor, *, scope: str = "group"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Nan-aware mean, max and min of each agent's rewards, as seen by its peers.

    Args:
        rewards (`torch.Tensor` of shape `(m, Q, G)`):
            Raw rewards: agent, question, sample. NaN = cannot score; excluded.
        scope (`str`, *optional*, defaults to `"group"`):
            `"group"`: over the G samples of each question; `"batch"`: over all questions and samples of the agent.

    Returns:
        `tuple[torch.Tensor, torch.Tensor, torch.Tensor]`: mean, max and min, each of shape `(m, Q)` (broadcast over
        Q for `batch` scope); NaN where the scope holds no scorable reward.
    """
    _check_scope(scope)
    if rewards.dim() != 3:
        raise ValueError(f"`rewards` must have shape (m, Q, G) (got {tuple(rewards.shape)}).")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    num_agents, num_questions, _ = rewards.shape
    # Reduce over the samples (group) or over questions and samples flattened (batch), then view back as (m, Q).
    grouped = rewards if scope == "group" else rewards.reshape(num_agents, 1, -1)
    is_scored = ~torch.isnan(grouped)
    has_scored = is_scored.any(dim=-1)
    mean = torch.nanmean(grouped, dim=-1)
    # torch has no nanmax/nanmin: mask NaN with the value that loses, and restore NaN for empty scopes.
    max_ = torch.where(is_scored, grouped, -torch.inf).amax(dim=-1)
    min_ = torch.where(is_scored, grouped, torch.inf).amin(dim=-1)
    nan = torch.full_like(mean, torch.nan)
    stats = (mean, torch.where(has_scored, max_, nan), torch.where(has_scored, min_, nan))
    # Own memory, not broadcast views: callers may write into the statistics they get back.
    return tuple(stat.expand(num_agents, num_questions).contiguous() for stat in stats)


def calibrate_rewards(rewards: torch.Tensor, *, scope: str = "group", eps: float = 1e-6) -> CalibrationResult:
    """
    Apply Perception Calibration to the rewards of one stage.

    `R'_{i,k} = R_{i,k} + sum_{l != i} clip((R_{i,k} - avg_l) / (max_l - min_l), -1/(m-1), +1/(m-1))`; see the module
    docstring for when this changes the GRPO advantages at all.

    Args:
        rewards (`torch.Tensor` of shape `(m, Q, G)`):
            Raw rewards of one stage: agent, question, sample (the G samples of a question share one context). NaN
            means "cannot score" (a reward function returned `None`).
        scope (`str`, *optional*, defaults to `"group"`):
            Where the peer statistics come from: `"group"` (peer l's G rewards for the same question) or `"batch"`
            (peer l's rewards for the whole batch of this stage).
        eps (`float`, *optional*, defaults to `1e-6`):
            Denominator used instead of a zero peer range `max_l - min_l`.

    Returns:
        [`CalibrationResult`]: The calibrated rewards (NaN where the raw reward is NaN), the clip fractions and the
        peer statistics.
    """
    if rewards.dim() != 3:
        raise ValueError(
            f"`rewards` must have shape (num_agents, num_questions, num_generations) (got {tuple(rewards.shape)}); "
            "stack the agents' (Q, G) reward tensors along a new first dimension."
        )
    num_agents = rewards.size(0)
    if num_agents < 2:
        raise ValueError(
            f"Perception Calibration needs at least 2 agents (got {num_agents}); set `calibration: false`."
        )
    if not eps > 0:
        raise ValueError(f"`eps` must be > 0 (got {eps}): it replaces a zero peer reward range as a denominator.")
    if not rewards.is_floating_point():
        rewards = rewards.float()

    peer_mean, peer_max, peer_min = peer_reward_stats(rewards, scope=scope)
    peer_range = peer_max - peer_min
    is_constant = peer_range == 0
    # A constant peer's mean is its value; computed, it can be an ulp off (2.2 in float32), and that ulp divided by
    # eps would be a spurious term of up to the clip bound.
    peer_mean = torch.where(is_constant, peer_max, peer_mean)
    peer_range = torch.where(is_constant, torch.full_like(peer_range, eps), peer_range)
    clip_bound = 1.0 / (num_agents - 1)

    # deviation[i, l, q, k] = (R[i, q, k] - avg[l, q]) / range[l, q]: agent i's k-th reward against peer l.
    deviation = (rewards[:, None] - peer_mean[None, :, :, None]) / peer_range[None, :, :, None]
    not_self = ~torch.eye(num_agents, dtype=torch.bool, device=rewards.device)
    peer_is_defined = ~torch.isnan(peer_mean)
    term_exists = not_self[:, :, None, None] & peer_is_defined[None, :, :, None]
    # An own NaN reward is kept in `term_exists`, so its term (and its calibrated reward) stays NaN; a peer without
    # scorable rewards contributes 0.
    terms = torch.where(term_exists, deviation.clamp(-clip_bound, clip_bound), torch.zeros_like(deviation))
    calibrated_rewards = rewards + terms.sum(dim=1)

    term_counted = term_exists & ~torch.isnan(rewards)[:, None]
    term_clipped = term_counted & (deviation.abs() > clip_bound)
    num_counted_per_agent = term_counted.flatten(1).sum(dim=1)
    num_clipped_per_agent = term_clipped.flatten(1).sum(dim=1)
    clip_frac_per_agent = num_clipped_per_agent / num_counted_per_agent.clamp(min=1)
    clip_frac = num_clipped_per_agent.sum() / num_counted_per_agent.sum().clamp(min=1)
    return CalibrationResult(
        rewards=calibrated_rewards,
        clip_frac=clip_frac.to(rewards.dtype),
        clip_frac_per_agent=clip_frac_per_agent.to(rewards.dtype),
        peer_mean=peer_mean,
        peer_max=peer_max,
        peer_min=peer_min,
    )


def advantage_delta(adv_calibrated: torch.Tensor, adv_raw: torch.Tensor) -> float:
    """
    Mean absolute change of the advantages caused by calibration, logged as `calibration/adv_delta`.

    Args:
        adv_calibrated (`torch.Tensor`):
            Advantages computed from the calibrated rewards.
        adv_raw (`torch.Tensor`, same shape):
            Advantages computed the same way from the raw rewards.

    Returns:
        `float`: `mean |A' - A|` over all entries (`0.0` for empty tensors). Near 0 means calibration did nothing to
        the policy gradient in this step; a larger value can still be a mere uniform rescaling of the advantages (see
        the module docstring).
    """
    if adv_calibrated.shape != adv_raw.shape:
        raise ValueError(
            f"`adv_calibrated` and `adv_raw` must have the same shape (got {tuple(adv_calibrated.shape)} and "
            f"{tuple(adv_raw.shape)})."
        )
    if adv_raw.numel() == 0:
        return 0.0
    return (adv_calibrated - adv_raw).abs().mean().item()


@dataclass(frozen=True)
class AdvantageChange:
    """
    What calibration did to one stage's GRPO advantages: a rescaling, or a change of the policy gradient's direction.

    Args:
        delta (`float`):
            `mean |A' - A|`, logged as `calibration/adv_delta`. Also positive for a mere rescaling.
        sign_flip_frac (`float`):
            Share of the samples whose advantage changed sign (pushed up before calibration, down after, or the
            reverse), logged as `calibration/sign_flip_frac`. 0 for any rescaling.
        reshaped_frac (`float`):
            Share of the groups (one agent, question) whose advantages are not a positive multiple of the raw ones,
            logged as `calibration/reshaped_frac`: calibration changed the weights of that group's samples relative to
            each other. 0 when calibration only rescaled groups (binary rewards with two agents, for example).
    """

    delta: float
    sign_flip_frac: float
    reshaped_frac: float


def advantage_change(adv_calibrated: torch.Tensor, adv_raw: torch.Tensor, *, rtol: float = 1e-5) -> AdvantageChange:
    """
    Compare the advantages computed from calibrated and from raw rewards, group by group.

    Args:
        adv_calibrated (`torch.Tensor` of shape `(..., G)`):
            Advantages from the calibrated rewards; the last dimension holds one group's samples.
        adv_raw (`torch.Tensor`, same shape):
            Advantages computed the same way from the raw rewards.
        rtol (`float`, *optional*, defaults to `1e-5`):
            Relative tolerance under which a group counts as a positive rescaling (float32 rounding).

    Returns:
        [`AdvantageChange`]: All zero for empty tensors.
    """
    delta = advantage_delta(adv_calibrated, adv_raw)
    if adv_raw.numel() == 0:
        return AdvantageChange(delta=0.0, sign_flip_frac=0.0, reshaped_frac=0.0)
    calibrated, raw = (
        adv_calibrated.reshape(-1, adv_raw.size(-1)).double(),
        adv_raw.reshape(-1, adv_raw.size(-1)).double(),
    )
    moved = (calibrated != 0) | (raw != 0)  # samples with a gradient before or after (0: NaN reward, constant group)
    flipped = torch.sign(calibrated) != torch.sign(raw)
    sign_flip_frac = (flipped & moved).sum().item() / max(moved.sum().item(), 1)
    # A group is a positive rescaling when A' = c A with c > 0: its cosine with A is 1.
    norms = calibrated.norm(dim=-1) * raw.norm(dim=-1)
    has_gradient = norms > 0
    cosine = (calibrated * raw).sum(dim=-1) / norms.clamp(min=torch.finfo(torch.float64).tiny)
    reshaped = has_gradient & (cosine < 1 - rtol)
    # A group with a gradient on one side only (constant before, spread after, or the reverse) is reshaped too.
    one_sided = (calibrated.norm(dim=-1) > 0) != (raw.norm(dim=-1) > 0)
    num_groups = (has_gradient | one_sided).sum().item()
    reshaped_frac = (reshaped | one_sided).sum().item() / max(num_groups, 1)
    return AdvantageChange(delta=delta, sign_flip_frac=sign_flip_frac, reshaped_frac=reshaped_frac)


def _check_scope(scope: str) -> None:
    if scope not in _SCOPES:
        raise ValueError(f"`scope` must be one of {list(_SCOPES)} (got {scope!r}).")
