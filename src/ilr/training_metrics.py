"""The metrics of a training step, slash-namespaced as TRL's, and the run's `metrics.jsonl`.

[`step_metrics`] is pure (plain data in, a flat `dict[str, float]` out); the trainer averages it across processes and
adds the running totals.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch


if TYPE_CHECKING:
    from ilr.calibration import AdvantageChange
    from ilr.interaction import Transcript
    from ilr.scoring import CalibratedRewards, StepRewards


__all__ = ["METRICS_NAME", "append_metrics", "nanmean", "step_metrics", "trim_metrics"]

METRICS_NAME = "metrics.jsonl"


def nanmean(values: np.ndarray | torch.Tensor | Sequence[float]) -> float:
    """The mean of the non-NaN values; NaN when there is none (without numpy's warning)."""
    values = np.asarray(values, dtype=float)
    return float(np.nanmean(values)) if values.size and not np.isnan(values).all() else float("nan")


def step_metrics(
    agent_names: Sequence[str],
    train_stages: Sequence[str],
    reward_names: Sequence[str],
    transcript: Transcript,
    rewards: StepRewards,
    calibrated: CalibratedRewards,
    adv_changes: dict[str, AdvantageChange],
    update_metrics: list[dict[str, float]],
    timings: dict[str, float],
    gamma: np.ndarray | None = None,
) -> dict[str, float]:
    """
    One process's metrics of a step: `ilr/<agent>/<stage>/...` and `ilr/<agent>/...` per agent, `calibration/...`,
    `interaction/...`, `rewards/...`, `tokens/...`, `time/...`.

    Args:
        agent_names (`Sequence[str]`):
            The agents' names, in order.
        train_stages (`Sequence[str]`):
            The trained stages.
        reward_names (`Sequence[str]`):
            The reward functions' names.
        transcript ([`~ilr.interaction.Transcript`]):
            The step's discussion.
        rewards ([`~ilr.scoring.StepRewards`]):
            Raw rewards.
        calibrated ([`~ilr.scoring.CalibratedRewards`]):
            Rewards of the trained stages after calibration.
        adv_changes (`dict[str, AdvantageChange]`):
            Per trained stage, what calibration changed in the advantages.
        update_metrics (`list[dict[str, float]]`):
            Per agent, the update's metrics (loss, grad norm, ...).
        timings (`dict[str, float]`):
            `time/...` entries; `time/generation` gives `tokens/per_second`.
        gamma (`np.ndarray` of shape `(m,)`, *optional*):
            Current abilities under `interaction_mode: dynamic`.

    Returns:
        `dict[str, float]`
    """
    metrics: dict[str, float] = {}
    for agent_index, agent in enumerate(agent_names):
        for stage in transcript.stages:
            prefix = f"ilr/{agent}/{stage}"
            groups = transcript.groups[stage][agent_index]
            metrics[f"{prefix}/reward"] = nanmean(rewards.total[stage][agent_index])
            for name in reward_names:
                metrics[f"{prefix}/rewards/{name}"] = nanmean(rewards.per_function[name][stage][agent_index])
            if "accuracy" in reward_names:
                metrics[f"{prefix}/accuracy"] = metrics[f"{prefix}/rewards/accuracy"]
            if stage in calibrated.rewards:
                metrics[f"{prefix}/reward_calibrated"] = nanmean(calibrated.rewards[stage][agent_index])
            lengths = [len(ids) for group in groups for ids in group.completion_ids]
            reasons = [reason for group in groups for reason in group.finish_reasons]
            metrics[f"{prefix}/completion_length"] = float(np.mean(lengths))
            metrics[f"{prefix}/clipped_ratio"] = float(np.mean([reason == "length" for reason in reasons]))
        for key, value in update_metrics[agent_index].items():
            metrics[f"ilr/{agent}/{key}"] = value
        metrics[f"ilr/{agent}/generated_tokens"] = float(transcript.num_generated_tokens(agent_index))
        if gamma is not None:
            metrics[f"interaction/gamma/{agent}"] = float(gamma[agent_index])
    for stage in train_stages:
        metrics[f"calibration/{stage}/clip_frac"] = calibrated.clip_frac[stage]
        for name in ("adv_delta", "reshaped_frac", "sign_flip_frac"):
            metrics[f"calibration/{stage}/{name}"] = getattr(adv_changes[stage], name.removeprefix("adv_"))
    for name in ("clip_frac", "adv_delta", "reshaped_frac", "sign_flip_frac"):
        metrics[f"calibration/{name}"] = float(
            np.mean([metrics[f"calibration/{stage}/{name}"] for stage in train_stages])
        )
    metrics["interaction/coop_frac"] = float(np.mean(transcript.cooperate))
    for name, count in rewards.unscored.items():
        metrics[f"rewards/{name}/unscored"] = float(count)
    trained = [metrics[f"ilr/{agent}/{stage}/reward"] for agent in agent_names for stage in train_stages]
    metrics["train/reward"] = nanmean(trained)
    generated = transcript.num_generated_tokens()
    metrics["tokens/generated"] = float(generated)
    metrics["tokens/per_second"] = generated / max(timings["time/generation"], 1e-9)
    metrics.update(timings)
    return metrics


def append_metrics(output_dir: str | os.PathLike, metrics: dict[str, float], step: int) -> None:
    """
    Append one step's metrics to `<output_dir>/metrics.jsonl` (NaN written as `null`).

    Args:
        output_dir (`str` or `os.PathLike`):
            The run's output folder.
        metrics (`dict[str, float]`):
            The step's metrics.
        step (`int`):
            The step number.
    """
    os.makedirs(output_dir, exist_ok=True)
    record = {"step": step, **{key: (None if math.isnan(v) else v) for key, v in metrics.items()}}
    with open(os.path.join(output_dir, METRICS_NAME), "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def trim_metrics(output_dir: str | os.PathLike, step: int) -> None:
    """
    Drop the lines of steps after `step` from `<output_dir>/metrics.jsonl`: they are about to be run again.

    Args:
        output_dir (`str` or `os.PathLike`):
            The run's output folder.
        step (`int`):
            The last step kept (0: drop every line).
    """
    path = Path(output_dir) / METRICS_NAME
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
