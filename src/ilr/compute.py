"""Training compute as generated tokens, counted the same way for ILR and the single-agent GRPO baseline.

`ILRTrainer` logs, per step, the tokens each agent generated (`ilr/<agent>/generated_tokens`: share completions,
analyses and fuse completions, averaged over processes) and the running total over all agents and processes
(`tokens/total_generated`) to `metrics.jsonl`. TRL's `GRPOTrainer` logs only the mean completion length; the
[`GeneratedTokensCallback`] that `ilr.train` hands it adds the same two counts to its log history, which the baseline
writes to `<output_dir>/trainer_state.json` when it ends. [`generated_tokens`] reads either file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback


__all__ = ["GeneratedTokensCallback", "generated_tokens", "matched_generations"]

ILR_METRICS_NAME = "metrics.jsonl"
TRAINER_STATE_NAME = "trainer_state.json"


class GeneratedTokensCallback(TrainerCallback):
    """
    Adds `tokens/generated` (since the previous log) and `tokens/total_generated` to a `GRPOTrainer`'s log history.

    TRL logs the mean completion length over a logging interval; each optimizer step samples, on average, one
    completion for each of `per_device_train_batch_size x processes x gradient_accumulation_steps / num_iterations`
    prompts (a generation batch is reused `num_iterations` times). The running total is read back from the log history,
    so it continues across a resumed checkpoint.
    """

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if not logs or "completions/mean_length" not in logs or not state.log_history:
            return
        earlier = [record for record in state.log_history[:-1] if "tokens/total_generated" in record]
        total, last_step = (earlier[-1]["tokens/total_generated"], earlier[-1]["step"]) if earlier else (0.0, 0)
        completions_per_step = (
            args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps / args.num_iterations
        )
        generated = logs["completions/mean_length"] * completions_per_step * (state.global_step - last_step)
        state.log_history[-1].update({"tokens/generated": generated, "tokens/total_generated": total + generated})


def generated_tokens(train_dir: str | os.PathLike, agents: Sequence[str]) -> dict[str, float]:
    """
    Tokens each agent generated during a finished training run, all processes together.

    Args:
        train_dir (`str` or `os.PathLike`):
            The run's `output_dir`: an ILR run's `metrics.jsonl`, or a GRPO baseline's `trainer_state.json`.
        agents (`Sequence[str]`):
            Agent names; a GRPO baseline has one.

    Returns:
        `dict[str, float]`: agent -> generated tokens.

    Raises:
        `FileNotFoundError`: the folder holds neither file (the run did not finish, or predates the counts).
    """
    train_dir = Path(train_dir)
    metrics_path, state_path = train_dir / ILR_METRICS_NAME, train_dir / TRAINER_STATE_NAME
    if metrics_path.is_file():
        records = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not records:
            return dict.fromkeys(agents, 0.0)
        # Per-agent counts are means over processes, of the logged steps only; the running total counts every step
        # and process: each agent gets its share of it.
        per_step_sum = sum(record["tokens/generated"] for record in records)
        scale = records[-1]["tokens/total_generated"] / per_step_sum if per_step_sum else 0.0
        return {agent: scale * sum(record[f"ilr/{agent}/generated_tokens"] for record in records) for agent in agents}
    if state_path.is_file():
        history = json.loads(state_path.read_text(encoding="utf-8"))["log_history"]
        totals = [record["tokens/total_generated"] for record in history if "tokens/total_generated" in record]
        if len(agents) != 1:
            raise ValueError(f"A GRPO baseline trains one agent (got {list(agents)}).")
        return {agents[0]: float(totals[-1]) if totals else 0.0}
    raise FileNotFoundError(
        f"{train_dir} holds neither {ILR_METRICS_NAME} (ILR) nor {TRAINER_STATE_NAME} (GRPO baseline): the run has "
        "not finished. Train it again (`ilr train` resumes from its last checkpoint)."
    )


def matched_generations(training_args: Any, questions: int, num_processes: int) -> tuple[int, int]:
    """
    Completions per question of a compute-matched baseline ([`compute_matched_args`]), and the ILR agent's token
    budget per question they match.

    Args:
        training_args ([`~ilr.configs.ILRConfig`]):
            The recipe's settings.
        questions (`int`):
            Questions per step (all processes).
        num_processes (`int`):
            Training processes: the generation batch must split into their micro-batches.

    Returns:
        `tuple[int, int]`: completions per question, and the budget in tokens.
    """
    group, length = training_args.num_generations, training_args.max_completion_length
    analysis_length = training_args.max_analysis_length or length
    fuse = group if "fuse" in training_args.train_stages else 1  # as `ILRTrainer` samples it
    budget = (group + fuse) * length + training_args.analysis_samples * analysis_length  # per question and agent
    micro_batch = training_args.per_device_train_batch_size * num_processes
    matched = math.ceil(budget / length)
    while questions * matched % micro_batch:
        matched += 1
    return matched, budget
