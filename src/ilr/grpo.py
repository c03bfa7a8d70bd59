"""GRPO maths with TRL 1.16 semantics: group advantages and the clipped surrogate loss.

The ILR trainer computes its own advantages (from calibrated rewards, per agent and stage) and its own loss (one
backward per agent), so it cannot call `GRPOTrainer` methods. These functions mirror, formula for formula:

- [`group_advantages`]: the advantage block of `GRPOTrainer._generate_and_score_completions`
  (`multi_objective_aggregation="sum_then_normalize"`, TRL's default);
- [`grpo_loss`]: `GRPOTrainer._compute_loss` for the loss types `grpo`, `bnpo`, `dr_grpo` and `dapo`, with TRL's
  defaults for everything else: token-level importance sampling, no `delta`, no entropy masking or bonus, no
  off-policy sequence masking, no vLLM importance-sampling correction.

`tests/test_grpo.py` checks loss values and gradients against a real `GRPOTrainer` for every loss type: pin trl's minor
version, since all of those TRL methods are private. Pure tensor maths: no model, no I/O. The log-probabilities the
loss takes come from [`~ilr.logps.per_token_logps`] (`GRPOTrainer._get_per_token_logps_and_entropies`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# The loss types the ILR trainer implements and the reward scalings: one home, the recipe rules.
from ilr.recipe_rules import ILR_LOSS_TYPES as LOSS_TYPES
from ilr.recipe_rules import SCALE_REWARDS


__all__ = [
    "LOSS_TYPES",
    "SCALE_REWARDS",
    "group_advantages",
    "grpo_loss",
    "nanstd",
]

# TRL adds this to the std before dividing, so a group whose rewards are all equal gets advantage 0, not NaN.
ADVANTAGE_STD_EPS = 1e-4


def nanstd(tensor: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """
    Bessel-corrected standard deviation ignoring NaNs, as `trl.trainer.utils.nanstd`.

    Args:
        tensor (`torch.Tensor`):
            Input values; NaN entries are left out.
        dim (`int`, *optional*):
            Dimension to reduce. Defaults to all dimensions.
        keepdim (`bool`, *optional*, defaults to `False`):
            Whether to keep the reduced dimension.

    Returns:
        `torch.Tensor`: The standard deviation; NaN where fewer than two values are not NaN.
    """
    dims = dim if dim is not None else tuple(range(tensor.dim()))
    mean = torch.nanmean(tensor, dim=dims, keepdim=True)
    variance = torch.nanmean((tensor - mean) ** 2, dim=dims, keepdim=keepdim)
    count = (~torch.isnan(tensor)).sum(dim=dims, keepdim=keepdim)
    return torch.sqrt(variance * count / (count - 1))


def group_advantages(rewards: torch.Tensor, scale_rewards: str | bool = "group") -> torch.Tensor:
    """
    GRPO advantages of one batch of groups: mean-centred per group, then scaled as TRL's `scale_rewards` says.

    `A[q, k] = (R[q, k] - mean_k R[q]) / (std + 1e-4)` with `std` the group's std (`"group"`), the std of the whole
    batch (`"batch"`), or no division at all (`"none"`). Standard deviations are Bessel-corrected, as in TRL.

    NaN policy (TRL's, for completions on which every reward function returned `None`): a NaN reward is left out of the
    group mean and of the std (nan-aware statistics), and its advantage is 0, so it neither biases its group's
    baseline nor moves the policy. A group with a single scorable reward gets advantage 0 everywhere in `"group"` mode
    (its std is undefined), and a group without any gets 0.

    Args:
        rewards (`torch.Tensor` of shape `(Q, G)`):
            Total reward of each completion: question, sample. The G samples of a row share one prompt. NaN = cannot
            score. For `"batch"`, pass the whole batch gathered from all processes, as TRL does.
        scale_rewards (`str` or `bool`, *optional*, defaults to `"group"`):
            `"group"`, `"batch"` or `"none"`; `True`/`False` mean `"group"`/`"none"` as in `GRPOConfig`.

    Returns:
        `torch.Tensor` of shape `(Q, G)`: The advantages, never NaN.
    """
    scale_rewards = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"`scale_rewards` must be one of {list(SCALE_REWARDS)} (got {scale_rewards!r}).")
    if rewards.dim() != 2:
        raise ValueError(
            f"`rewards` must have shape (num_questions, num_generations) (got {tuple(rewards.shape)}); reshape a flat "
            "reward vector with `.view(-1, num_generations)`."
        )
    if not rewards.is_floating_point():
        rewards = rewards.float()
    advantages = rewards - torch.nanmean(rewards, dim=1, keepdim=True)
    if scale_rewards == "group":
        # TRL uses std 0 for groups of one sample (possible only in evaluation).
        std = nanstd(rewards, dim=1, keepdim=True) if rewards.size(1) > 1 else torch.zeros_like(rewards)
        advantages = advantages / (std + ADVANTAGE_STD_EPS)
    elif scale_rewards == "batch":
        std = nanstd(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
        advantages = advantages / (std + ADVANTAGE_STD_EPS)
    return torch.nan_to_num(advantages, nan=0.0)


def grpo_loss(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    loss_type: str,
    epsilon_low: float,
    epsilon_high: float,
    beta: float = 0.0,
    ref_per_token_logps: torch.Tensor | None = None,
    max_completion_length: int | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    use_bias_correction_kl: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """
    Clipped GRPO surrogate loss with TRL's per-`loss_type` normalisation.

    Per token: `r = exp(logp - old_logp)`, `L = -min(r * A, clip(r, 1 - epsilon_low, 1 + epsilon_high) * A)`, plus
    `beta * r * (exp(ref - logp) - (ref - logp) - 1)` (the k3 KL estimator, importance-weighted by r as TRL does by
    default) when `beta > 0`. Masked tokens are left out, then:

    - `grpo`: mean over each sequence's tokens, then mean over sequences;
    - `bnpo`: sum over all tokens / number of completion tokens of this micro-batch;
    - `dr_grpo`: sum over all tokens / (B * `max_completion_length`);
    - `dapo`: sum over all tokens / `num_items_in_batch`.

    Gradient accumulation, as in TRL: `grpo`, `bnpo` and `dr_grpo` are micro-batch means, so divide the returned loss by
    the number of accumulation steps; `dapo` is already normalised over the whole accumulated batch by
    `num_items_in_batch`. TRL's exact dapo normaliser is (completion tokens of the generation batch, all processes) /
    num_processes * gradient_accumulation_steps / steps_per_generation; with one process and `steps_per_generation ==
    gradient_accumulation_steps` (TRL's default) that is the completion-token count of the whole accumulated batch.

    Args:
        per_token_logps (`torch.Tensor` of shape `(B, T)`):
            Log-probabilities under the current policy, with gradient (from [`per_token_logps`]).
        old_per_token_logps (`torch.Tensor` of shape `(B, T)`, *optional*):
            Log-probabilities under the policy that sampled the completions. `None` means on-policy, as in TRL: the
            detached current values, so the ratio is 1 and the loss value is a weighted mean of -A (0 for `grpo` with
            centred advantages) while the gradient is not zero.
        advantages (`torch.Tensor` of shape `(B,)` or `(B, T)`):
            One advantage per sequence, or per token.
        completion_mask (`torch.Tensor` of shape `(B, T)`):
            1 for completion tokens to train on, 0 for padding.
        loss_type (`str`):
            `"grpo"`, `"bnpo"`, `"dr_grpo"` or `"dapo"`.
        epsilon_low (`float`):
            Lower clip range (`GRPOConfig.epsilon`).
        epsilon_high (`float`):
            Upper clip range (`GRPOConfig.epsilon_high`, or `epsilon` when that is unset).
        beta (`float`, *optional*, defaults to `0.0`):
            KL coefficient; `0.0` skips the KL term (and needs no reference model).
        ref_per_token_logps (`torch.Tensor` of shape `(B, T)`, *optional*):
            Log-probabilities under the reference model. Required when `beta > 0`.
        max_completion_length (`int`, *optional*):
            `GRPOConfig.max_completion_length`. Required for `dr_grpo`.
        num_items_in_batch (`int` or `torch.Tensor`, *optional*):
            Completion-token count the `dapo` loss is divided by (see above). Required for `dapo`.
        use_bias_correction_kl (`bool`, *optional*, defaults to `True`):
            Multiply the per-token KL by the (differentiable) ratio r, which makes its gradient the unbiased reverse-KL
            gradient off-policy (`GRPOConfig.use_bias_correction_kl`, on by default in TRL 1.16). It changes the KL
            gradient even on-policy, where r is 1 but its derivative is not 0.

    Returns:
        `tuple[torch.Tensor, dict[str, float]]`: The scalar loss and the metrics TRL logs under the same names:
        `clip_ratio/low_mean`, `clip_ratio/high_mean`, `clip_ratio/region_mean` (token means over the mask),
        `clip_ratio/low_min`, `clip_ratio/high_max` (extremes of the per-sequence means) and `kl` (token mean of the
        KL term as added to the loss, only when `beta > 0`). They cover this call's tokens only; TRL also reduces them across processes.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"`loss_type` must be one of {list(LOSS_TYPES)} (got {loss_type!r}).")
    if per_token_logps.shape != completion_mask.shape:
        raise ValueError(
            f"`per_token_logps` and `completion_mask` must have the same shape (B, T) (got "
            f"{tuple(per_token_logps.shape)} and {tuple(completion_mask.shape)})."
        )
    if beta != 0.0 and ref_per_token_logps is None:
        raise ValueError(f"`beta` is {beta}, so the KL term needs `ref_per_token_logps`; pass it or set `beta=0.0`.")
    if loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError("`loss_type='dr_grpo'` divides by B * `max_completion_length`; pass `max_completion_length`.")
    if loss_type == "dapo" and num_items_in_batch is None:
        raise ValueError(
            "`loss_type='dapo'` divides by the completion-token count of the whole accumulated batch; pass "
            "`num_items_in_batch`."
        )

    if old_per_token_logps is None:
        old_per_token_logps = per_token_logps.detach()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    mask = completion_mask.to(per_token_logps.dtype)

    ratio = torch.exp(per_token_logps - old_per_token_logps)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss = -torch.min(ratio * advantages, clipped_ratio * advantages)
    if beta != 0.0:
        ref_minus_logp = ref_per_token_logps - per_token_logps
        per_token_kl = torch.exp(ref_minus_logp) - ref_minus_logp - 1
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * ratio
        per_token_loss = per_token_loss + beta * per_token_kl

    masked_loss_sum = (per_token_loss * mask).sum()
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = masked_loss_sum / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = masked_loss_sum / (per_token_loss.size(0) * max_completion_length)
    else:  # dapo
        loss = masked_loss_sum / torch.as_tensor(num_items_in_batch, dtype=mask.dtype, device=mask.device).clamp(
            min=1.0
        )

    with torch.no_grad():
        metrics = _clip_metrics(ratio, advantages, mask, epsilon_low, epsilon_high)
        if beta != 0.0:
            metrics["kl"] = _masked_mean(per_token_kl, mask)
    return loss, metrics


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    return ((values * mask).sum() / mask.sum().clamp(min=1.0)).item()


def _clip_metrics(
    ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, epsilon_low: float, epsilon_high: float
) -> dict[str, float]:
    # A token counts as clipped only where the clip is active in the min: below the range with A < 0, above it with
    # A > 0 (elsewhere the unclipped term is the minimum and the gradient flows).
    is_low_clipped = ((ratio < 1 - epsilon_low) & (advantages < 0)).to(mask.dtype)
    is_high_clipped = ((ratio > 1 + epsilon_high) & (advantages > 0)).to(mask.dtype)
    is_region_clipped = torch.maximum(is_low_clipped, is_high_clipped)
    # Per-sequence means: NaN for an empty sequence, skipped by the min/max like TRL's nanmin/nanmax.
    low_per_sequence = (is_low_clipped * mask).sum(-1) / mask.sum(-1)
    high_per_sequence = (is_high_clipped * mask).sum(-1) / mask.sum(-1)
    return {
        "clip_ratio/low_mean": _masked_mean(is_low_clipped, mask),
        "clip_ratio/high_mean": _masked_mean(is_high_clipped, mask),
        "clip_ratio/region_mean": _masked_mean(is_region_clipped, mask),
        "clip_ratio/low_min": _nan_extreme(low_per_sequence, torch.amin),
        "clip_ratio/high_max": _nan_extreme(high_per_sequence, torch.amax),
    }


def _nan_extreme(values: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor]) -> float:
    finite_values = values[~torch.isnan(values)]
    return reduce(finite_values).item() if finite_values.numel() else float("nan")
