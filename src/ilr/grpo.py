"""GRPO maths with TRL 1.16 semantics: group advantages, per-token log-probabilities and the clipped surrogate loss.

The ILR trainer computes its own advantages (from calibrated rewards, per agent and stage) and its own loss (one
backward per agent), so it cannot call `GRPOTrainer` methods. These functions mirror, formula for formula:

- [`group_advantages`]: the advantage block of `GRPOTrainer._generate_and_score_completions`
  (`multi_objective_aggregation="sum_then_normalize"`, TRL's default);
- [`per_token_logps`]: `GRPOTrainer._get_per_token_logps_and_entropies` (log-probabilities of the temperature-scaled
  distribution, completion tokens only); [`grouped_per_token_logps`] gives the same numbers computing a prompt shared
  by several completions once (ILR's analyse and fuse prompts carry the peers' texts and dwarf the completions);
- [`grpo_loss`]: `GRPOTrainer._compute_loss` for the loss types `grpo`, `bnpo`, `dr_grpo` and `dapo`, with TRL's
  defaults for everything else: token-level importance sampling, no `delta`, no entropy masking or bonus, no
  off-policy sequence masking, no vLLM importance-sampling correction.

`tests/test_grpo.py` checks loss values and gradients against a real `GRPOTrainer` for every loss type: pin trl's minor
version, since all of those TRL methods are private. Only [`per_token_logps`] and [`grouped_per_token_logps`]
touch a model; nothing here does I/O.
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
    "grouped_per_token_logps",
    "grpo_loss",
    "nanstd",
    "per_token_logps",
    "supports_grouped_logps",
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


def per_token_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    temperature: float = 1.0,
    batch_size: int | None = None,
) -> torch.Tensor:
    """
    Log-probabilities of the last `logits_to_keep` tokens (the completion) under `softmax(logits / temperature)`.

    Matches `GRPOTrainer._get_per_token_logps_and_entropies`: the log-softmax runs in float32 whatever the model's
    dtype, and positions where `attention_mask` is 0 (padding after the completion's end) get log-probability 0.

    Args:
        model (`torch.nn.Module`):
            Causal LM returning `.logits` and accepting `logits_to_keep` (every transformers causal LM does).
        input_ids (`torch.Tensor` of shape `(B, P + T)`):
            Prompt ids (left-padded) followed by completion ids (right-padded).
        attention_mask (`torch.Tensor` of shape `(B, P + T)`):
            Prompt mask followed by completion mask.
        logits_to_keep (`int`):
            T, the completion length: only these positions are scored.
        temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature the completions were generated with; the logits are divided by it.
        batch_size (`int`, *optional*):
            Rows per forward pass, to bound memory. Defaults to all rows at once.

    Returns:
        `torch.Tensor` of shape `(B, T)`: Per-token log-probabilities in float32, differentiable w.r.t. the model.
    """
    batch_size = batch_size or input_ids.size(0)
    completion_ids = input_ids[:, -logits_to_keep:]
    completion_mask = attention_mask[:, -logits_to_keep:]
    chunk_logps = []
    for start in range(0, input_ids.size(0), batch_size):
        rows = slice(start, start + batch_size)
        # One extra position: the last prompt token predicts the first completion token; the last logit predicts
        # nothing and is dropped.
        logits = model(
            input_ids=input_ids[rows],
            attention_mask=attention_mask[rows],
            logits_to_keep=logits_to_keep + 1,
            use_cache=False,
        ).logits[:, :-1]
        logits = logits.float() / temperature
        target_logits = logits.gather(-1, completion_ids[rows].unsqueeze(-1)).squeeze(-1)
        chunk_logps.append(target_logits - torch.logsumexp(logits, dim=-1))
    logps = torch.cat(chunk_logps, dim=0)
    return logps.masked_fill(completion_mask == 0, 0.0)


def supports_grouped_logps(model: torch.nn.Module) -> bool:
    """
    Whether [`grouped_per_token_logps`] can run on `model`: a transformers causal LM whose cache is a plain
    `DynamicCache` of full-attention layers, without gradient checkpointing.

    Gradient checkpointing makes transformers drop the cache in training (`use_cache=False`). Sliding-window, chunked,
    linear-attention or quantized cache layers keep something other than every prompt position's keys and values, so
    the completions would not see what the full sequence shows them. This looks at the model only (the ref model and
    the no-grad passes fall back too under checkpointing); [`grouped_per_token_logps`] checks the cache it gets anyway.

    Args:
        model (`torch.nn.Module`):
            The model, unwrapped from any distributed wrapper (a PEFT model is fine).

    Returns:
        `bool`: `True` when the prompt's KV cache can be computed once and expanded.
    """
    from ilr.models import has_expandable_cache

    return not getattr(model, "is_gradient_checkpointing", False) and has_expandable_cache(model)


def grouped_per_token_logps(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    group_sizes: torch.Tensor | list[int] | int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """
    [`per_token_logps`] of completions that share prompts, each distinct prompt computed once.

    GRPO samples G completions per prompt, and [`per_token_logps`] runs the prompt G times, in the forward and in the
    backward pass. Here each prompt row runs once with `use_cache=True`, its KV cache is repeated to its completions
    (`repeat_interleave` along the batch: differentiable, so the completions' gradients reach the prompt's
    activations and through them the weights), and the completions run on that cache. Row by row this is the
    computation of [`per_token_logps`] on `[prompt, completion]`, so the values and gradients are the same up to
    floating-point rounding:

    ```
    per_token_logps:   [pad pad p1 p2 p3 | c1 c2 c3]   x G rows    logits at p3 c1 c2 (-> c1 c2 c3)
    grouped:           [pad pad p1 p2 p3]               x 1 row     logit at p3          (-> c1)
                       cache x G        + [c1 c2]       x G rows    logits at c1 c2      (-> c2 c3)
    ```

    Positions are those of the full sequence (`0 .. P - 1` for the prompt, `P .. P + T - 2` for the completion, as a
    transformers causal LM numbers `[prompt, completion]` itself), the completion forward attends with the mask of
    the full sequence, and the completion's last token, whose logit [`per_token_logps`] drops, is not run at all.

    Args:
        model (`torch.nn.Module`):
            Causal LM accepting `past_key_values`, `position_ids` and `logits_to_keep`, whose cache can be expanded
            ([`supports_grouped_logps`]); the cache it returns is checked.
        prompt_ids (`torch.Tensor` of shape `(N, P)`):
            One row per distinct prompt, left-padded.
        prompt_mask (`torch.Tensor` of shape `(N, P)`):
            1 on the prompts' tokens.
        completion_ids (`torch.Tensor` of shape `(B, T)`):
            The completions, right-padded, those of prompt row 0 first, then those of row 1, and so on.
        completion_mask (`torch.Tensor` of shape `(B, T)`):
            1 on the completions' tokens (their attention mask, not the loss mask): log-probabilities are 0 where it
            is 0, as in [`per_token_logps`].
        group_sizes (`torch.Tensor` of shape `(N,)`, `list[int]` or `int`):
            How many consecutive completion rows each prompt row has; an `int` is the same count for every prompt.
            They must add up to B.
        temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature the completions were generated with; the logits are divided by it.

    Returns:
        `torch.Tensor` of shape `(B, T)`: Per-token log-probabilities in float32, differentiable w.r.t. the model.
    """
    from ilr.models import is_expandable_cache, repeat_cache_rows

    num_prompts, prompt_width = prompt_ids.shape
    batch, width = completion_ids.shape
    device = prompt_ids.device
    if isinstance(group_sizes, int):
        group_sizes = [group_sizes] * num_prompts
    # From a list, the check needs no device synchronisation.
    total = sum(group_sizes) if isinstance(group_sizes, list) else int(group_sizes.sum())
    if len(group_sizes) != num_prompts or total != batch:
        raise ValueError(
            f"`group_sizes` must give one completion count per prompt row ({num_prompts}) adding up to the completion "
            f"rows ({batch}) (got {list(map(int, group_sizes))})."
        )
    repeats = torch.as_tensor(group_sizes, dtype=torch.long, device=device)
    positions = torch.arange(prompt_width + width, device=device).unsqueeze(0)

    prompt_outputs = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=positions[:, :prompt_width],
        use_cache=True,
        logits_to_keep=1,
    )
    cache = prompt_outputs.past_key_values
    if not is_expandable_cache(cache, prompt_width):
        raise ValueError(
            f"The prompt forward returned a cache that cannot be expanded to the completions ({type(cache).__name__}, "
            "e.g. gradient checkpointing disables the cache in training, or sliding-window layers); check "
            "`supports_grouped_logps(model)` first and use `per_token_logps` otherwise."
        )
    # The last prompt position predicts the first completion token.
    logits = prompt_outputs.logits[:, -1:].repeat_interleave(repeats, dim=0, output_size=batch)
    if width > 1:
        repeat_cache_rows(cache, repeats, batch)
        attention_mask = torch.cat(
            [prompt_mask.repeat_interleave(repeats, dim=0, output_size=batch), completion_mask[:, :-1]], dim=1
        )
        completion_logits = model(
            input_ids=completion_ids[:, :-1],
            attention_mask=attention_mask,
            position_ids=positions[:, prompt_width:-1],
            past_key_values=cache,
            use_cache=True,
        ).logits
        logits = torch.cat([logits, completion_logits], dim=1)
    logits = logits.float() / temperature
    target_logits = logits.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    logps = target_logits - torch.logsumexp(logits, dim=-1)
    return logps.masked_fill(completion_mask == 0, 0.0)


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
