"""Scoring a step: every reward function on every completion, and GRPO advantages of the rewards.

Plain data in and out ([`StepRewards`], [`CalibratedRewards`], tensors): no model, no accelerator. The trainer adds
the one distributed part (gathering a batch-wide scope from every process) around them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ilr.grpo import group_advantages


if TYPE_CHECKING:
    from ilr.interaction import Transcript


__all__ = ["CalibratedRewards", "StepRewards", "agent_advantages", "reward_names", "score_transcript"]

logger = logging.getLogger(__name__)


@dataclass
class StepRewards:
    """
    Raw rewards of one step. For each stage an array of shape `[m, Q, n]` (agent, question, sample; n is G for share
    and fuse, `analysis_samples` for analyse).

    Args:
        total (`dict[str, np.ndarray]`):
            Weighted sum of the reward functions (`reward_weights`). NaN where any function could not score the
            completion (returned `None`): never a silent 0.
        per_function (`dict[str, dict[str, np.ndarray]]`):
            `per_function[name][stage]`: each reward function's own values, NaN for `None`.
        unscored (`dict[str, int]`):
            Number of `None`s per reward function.
    """

    total: dict[str, np.ndarray]
    per_function: dict[str, dict[str, np.ndarray]]
    unscored: dict[str, int]


@dataclass
class CalibratedRewards:
    """
    Rewards of the trained stages after Perception Calibration (the raw rewards when `calibration: false`).

    Args:
        rewards (`dict[str, torch.Tensor]`):
            For each trained stage, `[m, Q, n]`; NaN stays NaN.
        clip_frac (`dict[str, float]`):
            `calibration/clip_frac` per trained stage (0.0 without calibration).
    """

    rewards: dict[str, torch.Tensor]
    clip_frac: dict[str, float]


def reward_names(reward_funcs: Sequence[Callable] | dict[str, Callable]) -> dict[str, Callable]:
    """
    Name each reward function for metrics: the recipe name for registry functions (`accuracy_reward` ->
    `accuracy`), else the function's `__name__` without a `_reward` suffix.

    Args:
        reward_funcs (`Sequence[Callable]` or `dict[str, Callable]`):
            The reward functions, or already a name -> function mapping.

    Returns:
        `dict[str, Callable]`: Name -> function, in the given order.
    """
    if isinstance(reward_funcs, dict):
        return dict(reward_funcs)
    named: dict[str, Callable] = {}
    for func in reward_funcs:
        name = getattr(func, "__name__", type(func).__name__).removesuffix("_reward")
        if name in named:
            raise ValueError(f"Two reward functions are both named {name!r}: pass a dict name -> function.")
        named[name] = func
    return named


def score_transcript(
    transcript: Transcript, reward_funcs: dict[str, Callable], reward_weights: Sequence[float]
) -> StepRewards:
    """
    Every reward function on every completion of every agent and stage, one call per function.

    Args:
        transcript ([`~ilr.interaction.Transcript`]):
            The step's discussion.
        reward_funcs (`dict[str, Callable]`):
            Name -> TRL-convention reward function (see [`reward_names`]).
        reward_weights (`Sequence[float]`):
            One weight per function, for the total.

    Returns:
        [`StepRewards`]: per stage `[m, Q, n]` arrays; `None` from a reward becomes NaN (and NaN in the total).
    """
    # Flatten (stage, agent, question, sample) so that each reward function sees the whole step at once (the maths
    # verifier deduplicates and parallelises across it).
    where: list[tuple[str, int, int, int]] = []
    completions: list[str] = []
    prompts: list[Any] = []
    completion_ids: list[list[int]] = []
    rows: list[dict[str, Any]] = []
    for stage in transcript.stages:
        for agent_index, groups in enumerate(transcript.groups[stage]):
            for group in groups:
                for sample, text in enumerate(group.texts):
                    where.append((stage, agent_index, group.question, sample))
                    completions.append(text)
                    prompts.append(group.prompt)
                    completion_ids.append(group.completion_ids[sample])
                    rows.append(transcript.questions[group.question])
    columns = {key: [row.get(key) for row in rows] for key in rows[0] if key not in ("prompt", "completion")}

    shapes = {
        stage: (transcript.num_agents, transcript.num_questions, transcript.groups[stage][0][0].num_samples)
        for stage in transcript.stages
    }
    per_function: dict[str, dict[str, np.ndarray]] = {}
    unscored: dict[str, int] = {}
    for name, func in reward_funcs.items():
        values = func(completions=completions, prompts=prompts, completion_ids=completion_ids, **columns)
        if len(values) != len(completions):
            raise RuntimeError(f"Reward `{name}` returned {len(values)} values for {len(completions)} completions.")
        arrays = {stage: np.full(shape, np.nan) for stage, shape in shapes.items()}
        for (stage, agent_index, question, sample), value in zip(where, values):
            if value is not None:
                arrays[stage][agent_index, question, sample] = float(value)
        unscored[name] = sum(value is None for value in values)
        if unscored[name]:
            logger.warning("Reward `%s` could not score %d of %d completions.", name, unscored[name], len(values))
        per_function[name] = arrays
    total = {
        stage: sum(weight * per_function[name][stage] for name, weight in zip(reward_funcs, reward_weights))
        for stage in transcript.stages
    }
    return StepRewards(total=total, per_function=per_function, unscored=unscored)


def agent_advantages(rewards: torch.Tensor, scale_rewards: str) -> torch.Tensor:
    """
    GRPO group advantages of one stage, agent by agent.

    Args:
        rewards (`torch.Tensor` of shape `(m, Q, n)`):
            One stage's rewards (NaN where unscored).
        scale_rewards (`str`):
            `group`, `batch` or `none`, as in TRL.

    Returns:
        `torch.Tensor` of shape `(m, Q, n)`: 0 where the reward is NaN.
    """
    return torch.stack([group_advantages(agent, scale_rewards) for agent in rewards])
