"""Per-token log-probabilities of completions under a model: the forward passes of the GRPO update.

- [`per_token_logps`]: `GRPOTrainer._get_per_token_logps_and_entropies` (log-probabilities of the temperature-scaled
  distribution, completion tokens only), one full row per sample;
- [`grouped_per_token_logps`]: the same numbers and gradients computing a prompt shared by several completions once
  (ILR's analyse and fuse prompts carry the peers' texts and dwarf the completions), its KV cache expanded to them;
  [`supports_grouped_logps`] says whether a model allows it.

The loss on these numbers is [`~ilr.grpo.grpo_loss`] (pure tensor maths).
"""

from __future__ import annotations

import torch

from ilr.models import has_expandable_cache, is_expandable_cache, repeat_cache_rows


__all__ = ["grouped_per_token_logps", "per_token_logps", "supports_grouped_logps"]


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
