"""What one agent trains on: its samples from a step's transcript, and their padded micro-batches.

[`build_samples`] takes an agent's own prompt ids and sampled tokens from the trained stages of a
[`~ilr.interaction.Transcript`], one advantage per completion; [`collate_samples`] pads a few of them into a
[`MicroBatch`] in TRL's layout. Plain data and pure functions: no model, no accelerator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ilr.sampler import RngStream, seed_sequence


if TYPE_CHECKING:
    from ilr.interaction import Transcript


__all__ = ["MicroBatch", "TrainingSample", "build_samples", "collate_samples"]


@dataclass
class TrainingSample:
    """
    One completion an agent is trained on: its own prompt and its own generated tokens, nothing else.

    Args:
        prompt_ids (`list[int]`):
            The prompt the agent saw, tokenised with its own chat template (peer text lives here).
        completion_ids (`list[int]`):
            The tokens the agent sampled (EOS included when it stopped).
        advantage (`float`):
            GRPO advantage of the completion.
        truncated (`bool`):
            Whether it hit `max_completion_length` (masked out with `mask_truncated_completions`).
        stage (`str`):
            Stage it comes from.
        question (`int`):
            Index of its question in the step.
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    advantage: float
    truncated: bool
    stage: str
    question: int


@dataclass
class MicroBatch:
    """
    Padded tensors of a few [`TrainingSample`]s: prompts left-padded, completions right-padded (TRL's layout).

    Besides the full rows (one per sample, for [`~ilr.grpo.per_token_logps`]), it holds each distinct prompt once, for
    [`~ilr.grpo.grouped_per_token_logps`]: consecutive samples with the same prompt (the completions of one group)
    share a prompt row.

    Args:
        input_ids (`torch.Tensor` of shape `(B, P + T)`):
            Prompt ids followed by completion ids.
        attention_mask (`torch.Tensor` of shape `(B, P + T)`):
            1 on real tokens.
        completion_mask (`torch.Tensor` of shape `(B, T)`):
            1 on the completion tokens that are trained.
        advantages (`torch.Tensor` of shape `(B,)`):
            One advantage per completion.
        prompt_ids (`torch.Tensor` of shape `(N, P)`, *optional*):
            Each run of consecutive samples with the same prompt, its prompt once, left-padded to the same P.
        prompt_mask (`torch.Tensor` of shape `(N, P)`, *optional*):
            1 on the prompt tokens of `prompt_ids`.
        group_sizes (`list[int]`, *optional*):
            How many consecutive samples each row of `prompt_ids` is the prompt of (they add up to B).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    advantages: torch.Tensor
    prompt_ids: torch.Tensor | None = None
    prompt_mask: torch.Tensor | None = None
    group_sizes: list[int] | None = None

    @property
    def logits_to_keep(self) -> int:
        return self.completion_mask.size(1)

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.input_ids[:, -self.logits_to_keep :]

    @property
    def completion_attention_mask(self) -> torch.Tensor:
        """1 on every completion token, trained or not (`completion_mask` leaves out masked truncated ones)."""
        return self.attention_mask[:, -self.logits_to_keep :]


def collate_samples(
    samples: Sequence[TrainingSample],
    pad_token_id: int,
    *,
    device: torch.device | str = "cpu",
    mask_truncated: bool = False,
) -> MicroBatch:
    """
    Pad a few samples into one [`MicroBatch`], with one prompt row per run of consecutive samples sharing a prompt.

    Args:
        samples (`Sequence[TrainingSample]`):
            The samples, all of one agent.
        pad_token_id (`int`):
            The agent's padding id.
        device (`torch.device` or `str`, *optional*, defaults to `"cpu"`):
            Where the tensors go.
        mask_truncated (`bool`, *optional*, defaults to `False`):
            Leave completions that hit the length limit out of the loss (`mask_truncated_completions`).

    Returns:
        [`MicroBatch`]
    """
    prompt_width = max(len(sample.prompt_ids) for sample in samples)
    completion_width = max(len(sample.completion_ids) for sample in samples)
    size = len(samples)
    input_ids = torch.full((size, prompt_width + completion_width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((size, prompt_width + completion_width), dtype=torch.long)
    completion_mask = torch.zeros((size, completion_width), dtype=torch.long)
    for row, sample in enumerate(samples):
        prompt_start = prompt_width - len(sample.prompt_ids)
        completion_end = prompt_width + len(sample.completion_ids)
        input_ids[row, prompt_start:prompt_width] = torch.tensor(sample.prompt_ids, dtype=torch.long)
        input_ids[row, prompt_width:completion_end] = torch.tensor(sample.completion_ids, dtype=torch.long)
        attention_mask[row, prompt_start:completion_end] = 1
        if not (mask_truncated and sample.truncated):
            completion_mask[row, : len(sample.completion_ids)] = 1
    advantages = torch.tensor([sample.advantage for sample in samples], dtype=torch.float32)
    # The prompt rows are the full rows' prompt part at the first sample of each run: same width, same padding.
    run_starts = [row for row in range(size) if row == 0 or samples[row].prompt_ids != samples[row - 1].prompt_ids]
    group_sizes = [end - start for start, end in zip(run_starts, [*run_starts[1:], size])]
    return MicroBatch(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        completion_mask=completion_mask.to(device),
        advantages=advantages.to(device),
        prompt_ids=input_ids[run_starts, :prompt_width].to(device),
        prompt_mask=attention_mask[run_starts, :prompt_width].to(device),
        group_sizes=group_sizes,
    )


def build_samples(
    transcript: Transcript,
    agent_index: int,
    advantages: dict[str, torch.Tensor],
    train_stages: Sequence[str],
    *,
    seed: int,
    step: int,
) -> list[TrainingSample]:
    """
    The completions one agent trains on: its own prompt ids and its own sampled tokens from its trained stages.

    Args:
        transcript ([`~ilr.interaction.Transcript`]):
            The step's discussion.
        agent_index (`int`):
            The agent.
        advantages (`dict[str, torch.Tensor]`):
            Per trained stage, `[m, Q, n]` advantages.
        train_stages (`Sequence[str]`):
            The trained stages, in order.
        seed (`int`):
            The run's seed.
        step (`int`):
            Seeds the shuffle (as TRL shuffles a generation batch before cutting it into micro-batches).

    Returns:
        `list[TrainingSample]`: stage after stage (`train_stages` order); within a stage, the groups (one question's
        completions) in a shuffled order, each group's samples together. Unlike TRL, which shuffles single samples,
        groups stay whole, so that a micro-batch holds whole groups (when its size is a multiple of the group size) and
        the update computes each group's shared prompt once.
    """
    samples = []
    for stage_index, stage in enumerate(train_stages):
        groups = [
            [
                TrainingSample(
                    prompt_ids=list(group.prompt_ids),
                    completion_ids=list(group.completion_ids[k]),
                    advantage=float(advantages[stage][agent_index, group.question, k]),
                    truncated=group.finish_reasons[k] == "length",
                    stage=stage,
                    question=group.question,
                )
                for k in range(group.num_samples)
            ]
            for group in transcript.groups_for(agent_index, [stage])
        ]
        order = seed_sequence(seed, step, RngStream.SAMPLE_ORDER, agent_index, stage_index).permutation(len(groups))
        samples.extend(sample for i in order for sample in groups[i])
    return samples
