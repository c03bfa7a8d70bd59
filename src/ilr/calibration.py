r"""Perception Calibration: fold the peers' reward statistics into each agent's reward.

For m >= 2 agents trained together, the calibrated reward of agent i's k-th response is (ILR paper, section 4):

    R'_{i,k} = R_{i,k} + sum_{l != i} clip( (R_{i,k} - avg_l) / (max_l - min_l), -1/(m-1), +1/(m-1) )

with peer l's statistics over the same question and stage (`calibration_scope: group`) or the whole batch (`batch`);
NaN rewards (unscorable) stay NaN and are left out of every statistic. Pure tensor code: no I/O, no model.

When the formula changes GRPO's gradient and when it is a no-op (with two agents and 0/1 rewards it never changes a
stage's gradient direction): docs/calibration.md.
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
