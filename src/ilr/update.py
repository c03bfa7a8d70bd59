"""The GRPO update of one agent on its own samples of a step.

[`grpo_update`] cuts the samples into micro-batches of `per_device_train_batch_size`, groups every
`gradient_accumulation_steps` of them into an optimizer step, repeats the pass `num_iterations` times, and trains with
[`~ilr.grpo.grpo_loss`]. Everything distributed (DDP's `no_sync`, a DeepSpeed engine's backward and step) is the
agent's [`~ilr.runtime.AgentRuntime`]'s business; this function reads the same for every launch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ilr.grpo import grpo_loss
from ilr.logps import grouped_per_token_logps, per_token_logps, supports_grouped_logps
from ilr.samples import MicroBatch, TrainingSample, collate_samples
from ilr.training_metrics import nanmean


if TYPE_CHECKING:
    from ilr.configs import ILRConfig
    from ilr.runtime import AgentRuntime


__all__ = ["grpo_update"]


def grpo_update(
    runtime: AgentRuntime, samples: list[TrainingSample], args: ILRConfig, *, share_prompt_forward: bool = True
) -> dict[str, float]:
    """
    GRPO updates of one agent on its own samples: micro-batches of `per_device_train_batch_size`, an optimizer step
    every `gradient_accumulation_steps` of them, `num_iterations` passes, gradients clipped to `max_grad_norm`.

    Old log-probabilities follow TRL: when the samples feed a single optimizer step (one accumulation window,
    `num_iterations == 1`) they are the detached current ones (ratio 1); otherwise later optimizer steps train on
    completions of an earlier policy, so they are computed once, before the first update. The first window's come
    from its own training forward pass, which runs before any update.

    Args:
        runtime ([`~ilr.runtime.AgentRuntime`]):
            The agent: model, optimizer, schedule, reference model, tokenizer.
        samples (`list[TrainingSample]`):
            From [`~ilr.samples.build_samples`], in training order.
        args ([`~ilr.configs.ILRConfig`]):
            The GRPO settings (TRL's meaning).
        share_prompt_forward (`bool`, *optional*, defaults to `True`):
            Compute a prompt shared by several samples of a micro-batch once
            ([`~ilr.logps.grouped_per_token_logps`]) where the model allows it; the values are the full rows'.

    Returns:
        `dict[str, float]`: loss, grad norm, learning rate and the loss function's clip (and KL) metrics, averaged
        over the optimizer steps.
    """
    accelerator, model, scheduler = runtime.accelerator, runtime.model, runtime.scheduler
    size = args.per_device_train_batch_size
    micro_batches = [
        collate_samples(
            samples[i : i + size],
            runtime.pad_token_id,
            device=accelerator.device,
            mask_truncated=args.mask_truncated_completions,
        )
        for i in range(0, len(samples), size)
    ]
    windows = [
        list(range(i, min(i + args.gradient_accumulation_steps, len(micro_batches))))
        for i in range(0, len(micro_batches), args.gradient_accumulation_steps)
    ]

    # A prompt shared by several samples of a micro-batch (a GRPO group: ILR's analyse and fuse prompts, carrying
    # the peers' texts, are ~20 tokens per generated token) runs once, its KV cache expanded to the completions:
    # the same log-probabilities and gradients as the full rows. Where the model cannot (gradient checkpointing,
    # sliding-window caches, ...) or no prompt is shared, the full rows run as in TRL.
    shares_prompts: dict[int, bool] = {}

    def logps_of(module: Any, batch: MicroBatch) -> torch.Tensor:
        shared = batch.group_sizes is not None and len(batch.group_sizes) < len(batch.advantages)
        if shared and share_prompt_forward:
            if id(module) not in shares_prompts:
                shares_prompts[id(module)] = supports_grouped_logps(accelerator.unwrap_model(module))
            if shares_prompts[id(module)]:
                return grouped_per_token_logps(
                    module,
                    batch.prompt_ids,
                    batch.prompt_mask,
                    batch.completion_ids,
                    batch.completion_attention_mask,
                    batch.group_sizes,
                    args.temperature,
                )
        return per_token_logps(module, batch.input_ids, batch.attention_mask, batch.logits_to_keep, args.temperature)

    # Computed once, before any update: the sampling policy, when more than one optimizer step trains on these
    # completions (else the detached current log-probs are the same numbers), and the reference policy (beta).
    # The first window trains before any update of this step: its own forward pass gives its old log-probs, kept
    # (detached) for the later iterations, so only the later windows need a pass of their own.
    off_policy = args.num_iterations > 1 or len(windows) > 1
    first_window = set(windows[0]) if windows else set()
    old_logps: list[torch.Tensor | None] = [None] * len(micro_batches)
    ref_logps: list[torch.Tensor | None] = [None] * len(micro_batches)
    with torch.no_grad():
        for index, batch in enumerate(micro_batches):
            if off_policy and index not in first_window:
                old_logps[index] = logps_of(model, batch)
            if args.beta != 0.0:
                ref_logps[index] = runtime.ref_logps(batch, logps_of)

    totals: dict[str, list[float]] = {}
    epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    for _ in range(args.num_iterations):
        for window in windows:
            # dapo normalises by the completion tokens of the whole accumulation window, on all processes.
            window_tokens = sum(micro_batches[i].completion_mask.sum() for i in window).float()
            num_items = accelerator.reduce(window_tokens, reduction="sum") / accelerator.num_processes
            window_loss = 0.0
            for position, index in enumerate(window):
                batch = micro_batches[index]
                with runtime.accumulation(boundary=position == len(window) - 1):
                    logps = logps_of(model, batch)
                    if off_policy and old_logps[index] is None:  # first window, first iteration
                        old_logps[index] = logps.detach()
                    loss, loss_metrics = grpo_loss(
                        logps,
                        old_logps[index],
                        batch.advantages,
                        batch.completion_mask,
                        loss_type=args.loss_type,
                        epsilon_low=args.epsilon,
                        epsilon_high=epsilon_high,
                        beta=args.beta,
                        ref_per_token_logps=ref_logps[index],
                        max_completion_length=args.max_completion_length,
                        num_items_in_batch=num_items,
                        use_bias_correction_kl=args.use_bias_correction_kl,
                    )
                    if args.loss_type != "dapo":  # micro-batch means: average over the window
                        loss = loss / len(window)
                    runtime.backward(loss)
                window_loss += loss.item()
                for key, value in loss_metrics.items():
                    totals.setdefault(key, []).append(value)
            totals.setdefault("learning_rate", []).append(scheduler.get_last_lr()[0])
            totals.setdefault("loss", []).append(window_loss)
            totals.setdefault("grad_norm", []).append(runtime.optimizer_step(args.max_grad_norm))
    return {key: nanmean(values) for key, values in totals.items()}
