r"""The co-learning loop of ILR: several agents trained together, each with GRPO on its side of an Idea3 discussion.

One training step, top to bottom (docs: ARCHITECTURE.md, "Data flow of one training step"):

    draw_questions       seeded, epoch-aware sampler -> this step's questions
    select_modes         per (question, agent): cooperate | compete (IRT rule, a fixed mode, or ratio:p)
    interact             run_idea3: share (G) -> analyse -> fuse (G), one `generate` call per stage and agent
    score                every reward function on every completion of every agent and stage -> R [m, Q, n] per stage
    calibrate            Perception Calibration across the agents, per trained stage -> R'
    compute_advantages   GRPO group advantages of R' per agent, stage and question
    build_samples        per agent: its own prompt ids + its own completion ids + one advantage per completion
    update_agent         per agent: GRPO loss on those tokens, micro-batches, accumulation, optimizer steps
    sync_backends        each generation backend sees its agent's new weights
    log / save           metrics (trackers, `metrics.jsonl`, progress bar), atomic checkpoints

Every stage is a method whose inputs and outputs are plain data (lists, numpy arrays, tensors, small dataclasses), so
each can be tested alone.

Batch size and optimizer steps follow TRL's GRPO: a step has `generation_batch_size // num_generations` questions
(split over processes), so a trained stage gives each agent `generation_batch_size` completions, the size of one TRL
generation batch. An agent's groups (one question's completions) are shuffled within each trained stage and cut,
stage after stage, into micro-batches of `per_device_train_batch_size` (stages are not mixed: a fuse prompt carries the
whole discussion and is many times longer than a share prompt, so a mixed micro-batch would be mostly padding). A
group's samples stay together, so its shared prompt is computed once in the update (`grpo.grouped_per_token_logps`,
same values and gradients as one full row per sample). Every
`gradient_accumulation_steps` micro-batches make one optimizer step, and the pass repeats `num_iterations` times: with
TRL's usual `generation_batch_size = per_device_train_batch_size * gradient_accumulation_steps`, training
`[share, fuse]` gives two optimizer steps per agent and step, as TRL does with two generation batches. Old
log-probabilities follow TRL: when the step's completions feed a single optimizer step (one accumulation window,
`num_iterations == 1`) they are the detached current ones (ratio 1); otherwise later optimizer steps train on
completions of an earlier policy, so they are computed once, before the first update (TRL computes them when
`gradient_accumulation_steps % (steps_per_generation * num_iterations) != 0`); the first window's come from its own
training forward pass, which runs before any update.

Determinism: everything random in step s is seeded from `(seed, s)` (question order from `(seed, epoch)`), never from
the drift of a global RNG, so a run resumed from a checkpoint continues exactly as the uninterrupted one.

Multi-process (DDP or DeepSpeed): every process draws the same questions and keeps its share; rewards, calibration
(group scope) and advantages are per question, hence local; batch-scope calibration gathers the step's rewards from
every process first; gradients are averaged across processes (DDP, or each agent's DeepSpeed engine) and metrics
averaged across processes.

DeepSpeed ZeRO-2/3 (`accelerate launch --config_file recipes/accelerate_configs/zero2.yaml`): each agent gets its own
engine, per Accelerate's "multiple models with DeepSpeed" guide: one `DeepSpeedPlugin` per agent, copied from the
launcher's settings, and one `Accelerator` per agent (the first one, `self.accelerator`, does everything else). The
update keeps the semantics of the plain path exactly: each engine is configured with `gradient_accumulation_steps: 1`
and `train_micro_batch_size_per_gpu: per_device_train_batch_size`; the loop marks the last micro-batch of each of its
own accumulation windows as the engine's accumulation boundary, calls `engine.backward` on the loss it normalised
itself and `engine.step()` once per window; clipping is DeepSpeed's `gradient_clipping` (= `max_grad_norm`) and our
learning-rate scheduler sets the lr of the optimizer that ZeRO steps. Under ZeRO-3 the parameters are partitioned, so
generation (the transformers backend generates with the training model) runs inside `deepspeed.zero.GatheredParameters`
of every agent. Checkpoints hold, per agent, the engine's own checkpoint (partitioned optimizer state, one file per
process): a resume needs the same launch config and number of processes. FSDP is not supported (generation from
sharded weights): it stops at start-up with a message.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ilr.calibration import AdvantageChange, advantage_change, calibrate_rewards


if TYPE_CHECKING:
    from accelerate import Accelerator
    from datasets import Dataset

    from ilr.configs import AgentConfig, ILRConfig
    from ilr.difficulty import IRTEstimate
    from ilr.interaction import Transcript


__all__ = [
    "CHECKPOINT_PREFIX",
    "CalibratedRewards",
    "ILRTrainer",
    "MicroBatch",
    "QuestionSampler",
    "StepRewards",
    "StopSignals",
    "TrainingInterrupted",
    "TrainingSample",
    "collate_samples",
    "latest_checkpoint",
    "reward_names",
]

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TMP_CHECKPOINT_PREFIX = "tmp-checkpoint-"
TRAINER_STATE_NAME = "trainer_state.json"
RNG_STATE_NAME = "rng_state.pth"
IRT_STATE_NAME = "irt.json"
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
METRICS_NAME = "metrics.jsonl"
# Under DeepSpeed: the tag (sub-folder of `<checkpoint>/<agent.name>/`) of each engine's own checkpoint.
DEEPSPEED_CHECKPOINT_TAG = "deepspeed"
STATE_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------------------------------
# Stopping on SIGTERM / SIGINT
# ---------------------------------------------------------------------------------------------------------------------
class TrainingInterrupted(Exception):
    """
    Training stopped on SIGTERM or SIGINT after finishing the current step and saving a checkpoint of it.

    Attributes:
        signum (`int`): the signal received.
        step (`int`): the last step completed and saved.
        checkpoint (`Path`): the checkpoint written for it.
    """

    def __init__(self, signum: int, step: int, output_dir: Path):
        self.signum, self.step = int(signum), step
        self.checkpoint = output_dir / f"{CHECKPOINT_PREFIX}{step}"
        super().__init__(
            f"stopped by {signal.Signals(self.signum).name} after step {step}; the checkpoint {self.checkpoint} is "
            "complete. Run again with `resume_from_checkpoint: true` to continue."
        )


class StopSignals:
    """
    Context manager that turns the first SIGTERM/SIGINT into a request to stop after the current step (cluster
    schedulers send SIGTERM before a pre-emption; Ctrl-C sends SIGINT). A second signal acts as usual (SIGINT raises
    `KeyboardInterrupt`): checkpoints are written atomically, so even that loses no more than the current step.
    Outside the main thread signals cannot be caught and the context does nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        logger.warning(
            "%s received: stopping after this step, with a checkpoint. Send it again to stop at once.",
            signal.Signals(signum).name,
        )
        for number, handler in self._previous.items():
            signal.signal(number, handler)  # the second signal gets the usual behaviour

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {number: signal.signal(number, self._handle) for number in self.SIGNALS}
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


# ---------------------------------------------------------------------------------------------------------------------
# Seeds and the question sampler
# ---------------------------------------------------------------------------------------------------------------------
def _seed_sequence(*entropy: int) -> np.random.Generator:
    """A generator seeded from a tuple of ints: independent streams for (seed, step, purpose, ...)."""
    return np.random.default_rng(np.random.SeedSequence([int(value) for value in entropy]))


def _torch_seed(*entropy: int) -> int:
    return int(np.random.SeedSequence([int(value) for value in entropy]).generate_state(1, dtype=np.uint64)[0] >> 1)


class QuestionSampler:
    """
    Seeded, epoch-aware order over the training questions, with a resumable position.

    Epoch e visits every row once, in the order of a permutation seeded by `(seed, e)`; a draw that runs past the end
    of an epoch continues at the start of the next one. The state is two integers, so a checkpoint restores the exact
    position (and the permutation is recomputed, not stored).

    Args:
        num_rows (`int`):
            Number of training questions.
        seed (`int`):
            Seed of the permutations.
    """

    def __init__(self, num_rows: int, seed: int):
        if num_rows < 1:
            raise ValueError("The training dataset is empty: there are no questions to draw.")
        self.num_rows = num_rows
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order_epoch: int | None = None
        self._order: np.ndarray | None = None

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            self._order = _seed_sequence(self.seed, self.epoch).permutation(self.num_rows)
            self._order_epoch = self.epoch
        return self._order

    def draw(self, count: int) -> list[int]:
        """
        The next `count` row indices.

        Args:
            count (`int`):
                How many questions to draw.

        Returns:
            `list[int]`: Row indices, in sampling order.
        """
        indices: list[int] = []
        while len(indices) < count:
            order = self._epoch_order()
            taken = order[self.position : self.position + count - len(indices)]
            indices.extend(int(index) for index in taken)
            self.position += len(taken)
            if self.position >= self.num_rows:
                self.epoch, self.position = self.epoch + 1, 0
        return indices

    @property
    def epochs_done(self) -> float:
        """Fractional number of epochs drawn so far."""
        return self.epoch + self.position / self.num_rows

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "num_rows": self.num_rows, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_rows"] != self.num_rows or state["seed"] != self.seed:
            raise ValueError(
                f"The checkpoint's sampler was built for {state['num_rows']} questions with seed {state['seed']}, "
                f"this run has {self.num_rows} with seed {self.seed}: resume with the same data and seed."
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


# ---------------------------------------------------------------------------------------------------------------------
# Plain data passed between the stages of a step
# ---------------------------------------------------------------------------------------------------------------------
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


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """
    The complete checkpoint with the highest step in `output_dir` (`checkpoint-<step>` holding a trainer state);
    unfinished `tmp-checkpoint-*` folders are never returned.

    Args:
        output_dir (`str` or `os.PathLike`):
            The run's output folder.

    Returns:
        `Path | None`: The checkpoint folder, or `None` when there is none.
    """
    found = _complete_checkpoints(Path(output_dir))
    return found[-1] if found else None


def _complete_checkpoints(output_dir: Path) -> list[Path]:
    if not output_dir.is_dir():
        return []
    pattern = re.compile(rf"{CHECKPOINT_PREFIX}(\d+)")
    steps = []
    for path in output_dir.iterdir():
        match = pattern.fullmatch(path.name)
        if match and (path / TRAINER_STATE_NAME).is_file():
            steps.append((int(match.group(1)), path))
    return [path for _, path in sorted(steps)]


def _discard(checkpoint: Path) -> None:
    """
    Delete a checkpoint folder without ever leaving a half-deleted `checkpoint-<step>` (one that still has its trainer
    state but lost model files): it is first renamed, atomically, to a `tmp-checkpoint-*` name, which resuming ignores
    and cleans up if the process dies during the deletion.
    """
    doomed = checkpoint.with_name(f"{TMP_CHECKPOINT_PREFIX}{checkpoint.name}-deleting")
    shutil.rmtree(doomed, ignore_errors=True)  # left by an earlier deletion that failed
    os.replace(checkpoint, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _nanmean(values: np.ndarray | torch.Tensor) -> float:
    values = np.asarray(values, dtype=float)
    return float(np.nanmean(values)) if values.size and not np.isnan(values).all() else float("nan")


# ---------------------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------------------
class ILRTrainer:
    """
    Trains m >= 2 agents together with ILR: Dynamic Interaction, Idea3 and Perception-Calibrated GRPO.

    Args:
        agents (`list[AgentConfig]`):
            The agents ([`~ilr.configs.AgentConfig`]); they may differ in family, size and tokenizer.
        args ([`~ilr.configs.ILRConfig`]):
            Training settings; every GRPO field keeps TRL's meaning.
        train_dataset (`datasets.Dataset`):
            Training questions in the canonical schema of `ilr.data` (columns reach the reward functions).
        reward_funcs (`list[Callable]` or `dict[str, Callable]`):
            TRL-convention reward functions `(completions, **columns) -> list[float | None]`, weighted by
            `args.reward_weights`. A dict names them in metrics; see [`reward_names`].
        eval_dataset (`datasets.Dataset`, *optional*):
            Validation questions: the first `ability_samples` measure each agent's ability (gamma) for
            `interaction_mode: dynamic` with `difficulty_source: self_rank`.
        models (`list`, *optional*):
            Training models, one per agent; loaded with [`~ilr.models.load_model`] (LoRA applied) when missing.
        tokenizers (`list`, *optional*):
            Tokenizers, one per agent; loaded with [`~ilr.models.load_tokenizer`] when missing.
        system_prompt (`str`, *optional*):
            System message of every prompt (the one evaluation uses).
        dataset_name (`str`, *optional*):
            Name of the training data, part of the IRT cache key; defaults to the rows' `source`.
        data_files (`list[str]`, *optional*):
            Local data files, part of the IRT cache key.
    """

    # Compute a prompt shared by several samples of a micro-batch once ([`~ilr.grpo.grouped_per_token_logps`]) where
    # the model allows it; the values are the full-sequence path's. `False` forces the full-sequence path everywhere.
    share_prompt_forward: bool = True

    def __init__(
        self,
        agents: list[AgentConfig],
        args: ILRConfig,
        train_dataset: Dataset,
        reward_funcs: Sequence[Callable] | dict[str, Callable],
        *,
        eval_dataset: Dataset | None = None,
        models: list[Any] | None = None,
        tokenizers: list[Any] | None = None,
        system_prompt: str | None = None,
        dataset_name: str | None = None,
        data_files: list[str] | None = None,
    ):
        from ilr.interaction import Idea3Settings

        self.agents = list(agents)
        self.args = args
        self.reward_funcs = reward_names(reward_funcs)
        self.reward_weights = self._reward_weights()
        self.system_prompt = system_prompt
        self.train_rows = self._rows(train_dataset, "train_dataset")
        self.eval_rows = self._rows(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        self.dataset_name = dataset_name or str(self.train_rows[0].get("source", "train"))
        self.data_files = data_files
        self._check_settings()

        self.accelerator = self._build_accelerator()
        # Under DeepSpeed one `Accelerator` per agent, each preparing its agent's engine; else the one above for all.
        self.agent_accelerators = self._agent_accelerators()
        self.questions_per_step = args.generation_batch_size // args.num_generations
        self.questions_per_process = self.questions_per_step // self.accelerator.num_processes
        self.num_training_steps = self._num_training_steps()
        self.idea3_settings = Idea3Settings.from_config(args, system_prompt=system_prompt)
        if "fuse" not in args.train_stages:  # its answers only feed the metrics: one per agent and question will do
            self.idea3_settings.fuse_samples = 1
        self.sampler = QuestionSampler(len(self.train_rows), args.seed)

        self.tokenizers = self._load_tokenizers(tokenizers)
        self.models = self._prepare_models(models)
        self.optimizers = [self._build_optimizer(i) for i in range(len(self.agents))]
        self.ref_models = self._prepare_ref_models()
        self.optimizer_steps_per_step = self._optimizer_steps_per_step()
        self.schedulers = [self._build_scheduler(optimizer) for optimizer in self.optimizers]
        self.backends = self._build_backends()
        self.pushers = self._build_pushers()

        self.irt: IRTEstimate | None = None
        self.ability_window: list[dict[str, list]] = []
        self.global_step = 0
        self.total_generated_tokens = 0
        # Test-only knob: -1.0 flips every advantage (a run that must not learn).
        self._advantage_sign = 1.0

    # -----------------------------------------------------------------------------------------------------------------
    # Set-up
    # -----------------------------------------------------------------------------------------------------------------
    @staticmethod
    def _rows(dataset: Any, name: str) -> list[dict[str, Any]]:
        if dataset is None or not hasattr(dataset, "__len__"):
            raise ValueError(
                f"`{name}` must be a map-style `datasets.Dataset` (the ILR trainer does not stream data yet): set "
                "`dataset_streaming: false`."
            )
        rows = [dict(row) for row in dataset]
        if not rows:
            raise ValueError(f"`{name}` is empty.")
        missing = [column for column in ("id", "problem") if column not in rows[0]]
        if missing:
            raise ValueError(
                f"`{name}` lacks the canonical column(s) {missing}: load it with `ilr.data.load_benchmark` or "
                "`load_custom_dataset`."
            )
        return rows

    def _reward_weights(self) -> list[float]:
        weights = self.args.reward_weights
        if weights is None:
            return [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ValueError(
                f"`reward_weights` has {len(weights)} values for {len(self.reward_funcs)} reward functions: give one "
                "weight per reward."
            )
        return [float(weight) for weight in weights]

    def _check_settings(self) -> None:
        """Refuse GRPO options this loop does not implement, naming the key, before any model is loaded."""
        args = self.args
        if len(self.agents) < 2:
            raise ValueError(f"ILR trains two or more agents together (got {len(self.agents)}).")
        if args.method != "ilr":
            raise ValueError(f"`method: {args.method}` is trained by TRL's GRPOTrainer (see `ilr.train`), not here.")
        unsupported = {
            "importance_sampling_level": (args.importance_sampling_level, "token"),
            "top_entropy_quantile": (args.top_entropy_quantile, 1.0),
            "delta": (args.delta, None),
            "off_policy_mask_threshold": (getattr(args, "off_policy_mask_threshold", None), None),
            "entropy_coef": (getattr(args, "entropy_coef", 0.0), 0.0),
            "repetition_penalty": (args.repetition_penalty, 1.0),
            "min_p": (args.min_p, None),
            "sync_ref_model": (args.sync_ref_model, False),
        }
        for key, (value, supported) in unsupported.items():
            if value != supported:
                raise NotImplementedError(
                    f"`{key}: {value}` is not implemented by the ILR trainer; remove it from the recipe (supported: "
                    f"{supported})."
                )
        if not str(args.optim).lower().removeprefix("optimizernames.").startswith("adamw"):
            raise NotImplementedError(f"`optim: {args.optim}`: the ILR trainer uses AdamW; set `optim: adamw_torch`.")
        if str(getattr(args.save_strategy, "value", args.save_strategy)) not in ("steps", "no"):
            raise NotImplementedError(
                f"`save_strategy: {args.save_strategy}`: use `steps` (with `save_steps`) or `no`."
            )
        if args.push_to_hub:
            missing = [agent.name for agent in self.agents if not agent.hub_model_id]
            if missing:
                raise ValueError(
                    f"`push_to_hub: true` pushes each agent to its own repository, but agents {missing} have no "
                    "`hub_model_id`: set one per agent (e.g. `hub_model_id: org/name-ilr`) or `push_to_hub: false`."
                )
        if args.generation_batch_size % args.num_generations:
            raise ValueError(
                f"`generation_batch_size` ({args.generation_batch_size}) must be a multiple of `num_generations` "
                f"({args.num_generations}): it is questions per step x num_generations."
            )
        for stage in args.train_stages:
            if stage not in ("share", "analyse", "fuse"):
                raise ValueError(f"Unknown stage {stage!r} in `train_stages`.")
        from ilr.difficulty import needs_irt

        if needs_irt(args.interaction_mode):
            tasks = {row.get("task", "math") for row in self.train_rows}
            if tasks != {"math"}:
                raise NotImplementedError(
                    "`interaction_mode: dynamic` estimates difficulty and ability with maths answers; for code data "
                    "use a fixed mode (`cooperate`, `compete` or `ratio:p`)."
                )
            if args.difficulty_source == "self_rank" and self.eval_rows is None:
                raise ValueError(
                    "`interaction_mode: dynamic` with `difficulty_source: self_rank` measures each agent's ability on "
                    "validation questions: pass `eval_dataset` (`dataset_validation_split` in a recipe), or use "
                    "`difficulty_source: pass_rate` or a fixed `interaction_mode`."
                )
            if args.ability_refresh_steps and "accuracy" not in self.reward_funcs:
                raise ValueError(
                    "`ability_refresh_steps` refreshes gamma from the running training accuracy: add the `accuracy` "
                    "reward, or set `ability_refresh_steps: 0`."
                )

    def _build_accelerator(self) -> Accelerator:
        from accelerate import Accelerator
        from accelerate.utils import DistributedType

        args = self.args
        report_to = [args.report_to] if isinstance(args.report_to, str) else list(args.report_to or [])
        log_with = [target for target in report_to if target != "none"] or None
        mixed_precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "no"
        accelerator = Accelerator(
            cpu=args.use_cpu,
            mixed_precision=mixed_precision,
            log_with=log_with,
            project_dir=args.output_dir,
            deepspeed_plugins=self._deepspeed_plugins(),
        )
        if accelerator.distributed_type == DistributedType.FSDP:
            raise NotImplementedError(
                "FSDP is not supported by the ILR trainer yet: its generation backends read the training models' "
                "full weights, which FSDP shards. Launch with recipes/accelerate_configs/zero3.yaml (sharded weights, "
                "gathered for generation) or ddp.yaml instead."
            )
        if self.args.generation_batch_size // self.args.num_generations % accelerator.num_processes:
            raise ValueError(
                f"Questions per step ({self.args.generation_batch_size // self.args.num_generations}) must split "
                f"evenly over {accelerator.num_processes} processes: adjust `generation_batch_size`."
            )
        return accelerator

    def _deepspeed_plugins(self) -> dict[str, Any] | None:
        """
        One `DeepSpeedPlugin` per agent when the run is launched with a DeepSpeed config (`ACCELERATE_USE_DEEPSPEED`),
        else `None`. Each is built from the launcher's settings (ZeRO stage, offload, `deepspeed_config_file`), then
        set for this loop: micro-batches of `per_device_train_batch_size`, no accumulation inside DeepSpeed (the loop
        keeps its own windows and loss normalisation), clipping to `max_grad_norm`, and under ZeRO-3 the whole weights
        gathered when a model is saved.
        """
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
            return None
        from accelerate.utils import DeepSpeedPlugin, is_deepspeed_available

        if not is_deepspeed_available():
            raise ImportError(
                "The run is launched with a DeepSpeed config: install it with `pip install -e .[deepspeed]`."
            )
        if self.args.use_cpu:
            raise ValueError(
                "The run is launched with a DeepSpeed config but the recipe sets `use_cpu: true`, with which Accelerate "
                "silently drops DeepSpeed: set `use_cpu: false` (without a GPU, DeepSpeed runs on the CPU anyway)."
            )
        if len({agent.name for agent in self.agents}) != len(self.agents):
            raise ValueError(
                "Under DeepSpeed every agent needs its own `name` (it keys the agent's DeepSpeed plugin)."
            )
        args = self.args
        plugins = {}
        for agent in self.agents:
            plugin = DeepSpeedPlugin()  # the launcher's settings, from the environment; a fresh config dict each time
            config = plugin.deepspeed_config
            for section in ("optimizer", "scheduler"):
                if section in config:
                    raise ValueError(
                        f"The DeepSpeed config has a `{section}` section, but the ILR trainer builds each agent's AdamW "
                        "and learning-rate schedule from the recipe (`learning_rate`, `lr_scheduler_type`, ...): remove "
                        f"`{section}` from the DeepSpeed config."
                    )
            clipping = float(args.max_grad_norm) if args.max_grad_norm and args.max_grad_norm > 0 else 0.0
            config.update(
                train_micro_batch_size_per_gpu=args.per_device_train_batch_size,
                gradient_accumulation_steps=1,
                train_batch_size="auto",
                gradient_clipping=clipping,
            )
            plugin.gradient_accumulation_steps, plugin.gradient_clipping = 1, clipping
            if plugin.zero_stage == 3:  # `accelerator.get_state_dict` (saving) gathers the partitioned weights
                config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
                plugin.zero3_save_16bit_model = True
            plugins[agent.name] = plugin
        return plugins

    def _agent_accelerators(self) -> list[Accelerator]:
        """The `Accelerator` that prepares each agent: under DeepSpeed one per agent (an `Accelerator` ties itself to
        the engine it prepared), sharing the first one's state and plugins; else `self.accelerator` for all."""
        if not self.is_deepspeed:
            return [self.accelerator] * len(self.agents)
        from accelerate import Accelerator

        return [self.accelerator] + [Accelerator(cpu=self.args.use_cpu) for _ in self.agents[1:]]

    @property
    def is_deepspeed(self) -> bool:
        """Whether the agents are trained by DeepSpeed engines (one per agent)."""
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.DEEPSPEED

    def _is_zero3(self) -> bool:
        return self.is_deepspeed and self.accelerator.state.deepspeed_plugin.zero_stage == 3

    def _select_deepspeed_plugin(self, agent_index: int) -> None:
        """Make the agent's DeepSpeed plugin the active one (for preparing its engine, or ZeRO-3 loading)."""
        if self.is_deepspeed:
            self.accelerator.state.select_deepspeed_plugin(self.agents[agent_index].name)

    @contextlib.contextmanager
    def gathered_weights(self, agent_indices: Sequence[int] | None = None) -> Iterator[None]:
        """
        Context manager: the agents' whole weights for the duration of the block, for generation or a weight sync.
        Under ZeRO-3 each engine's partitioned parameters are gathered (`deepspeed.zero.GatheredParameters`) and its
        parameter-fetching hooks removed, as TRL's `unwrap_model_for_generation` does; otherwise it does nothing.
        Gathering is collective: every process must enter the block. It holds the full weights (not the gradients or
        optimizer states) of the agents in `agent_indices` (default: all of them) at once: `ilr plan` counts them.
        """
        if not self._is_zero3():
            yield
            return
        import deepspeed
        from trl.models.utils import add_hooks, remove_hooks

        indices = range(len(self.models)) if agent_indices is None else agent_indices
        with contextlib.ExitStack() as stack:
            for model in (self.models[index] for index in indices):
                stack.enter_context(deepspeed.zero.GatheredParameters(list(model.parameters())))
                remove_hooks(model)
                stack.callback(add_hooks, model)
            yield

    def _num_training_steps(self) -> int:
        if self.args.max_steps and self.args.max_steps > 0:
            return int(self.args.max_steps)
        return max(1, math.ceil(self.args.num_train_epochs * len(self.train_rows) / self.questions_per_step))

    def _load_tokenizers(self, tokenizers: list[Any] | None) -> list[Any]:
        from ilr.models import load_tokenizer

        if tokenizers is not None:
            if len(tokenizers) != len(self.agents):
                raise ValueError(f"Got {len(tokenizers)} tokenizers for {len(self.agents)} agents.")
            return list(tokenizers)
        return [load_tokenizer(agent) for agent in self.agents]

    def _prepare_models(self, models: list[Any] | None) -> list[Any]:
        from ilr.models import load_model

        if models is not None and len(models) != len(self.agents):
            raise ValueError(f"Got {len(models)} models for {len(self.agents)} agents.")
        prepared = []
        for index, agent in enumerate(self.agents):
            self._select_deepspeed_plugin(index)  # ZeRO-3 with `zero3_init_flag` partitions the weights as they load
            model = models[index] if models is not None else load_model(agent, for_training=True)
            model.train()
            if self.args.gradient_checkpointing:
                kwargs = self.args.gradient_checkpointing_kwargs or {"use_reentrant": False}
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
                model.config.use_cache = False
            if self.args.disable_dropout:
                from trl.trainer.utils import disable_dropout_in_model

                disable_dropout_in_model(model)
            # Under DeepSpeed a model is prepared together with its optimizer, into its engine (`_build_optimizer`).
            prepared.append(model if self.is_deepspeed else self.accelerator.prepare_model(model))
        return prepared

    def _prepare_ref_models(self) -> list[Any | None]:
        """Frozen reference models for the KL term (`beta > 0`); a LoRA agent uses its base model, adapter off."""
        from accelerate.utils import is_peft_model

        from ilr.models import load_model

        if self.args.beta == 0.0:
            return [None] * len(self.agents)
        refs = []
        for index, (agent, model) in enumerate(zip(self.agents, self.models)):
            if is_peft_model(self.accelerator.unwrap_model(model)):
                refs.append(None)
                continue
            self._select_deepspeed_plugin(index)
            ref = load_model(agent).requires_grad_(False)
            if self.is_deepspeed:
                from trl.models.utils import prepare_deepspeed

                # As TRL: an inference engine, partitioned like the trained model under ZeRO-3, whole (stage 0) else.
                refs.append(prepare_deepspeed(ref, self.accelerator))
            else:
                refs.append(self.accelerator.prepare_model(ref, evaluation_mode=True))
        return refs

    def _build_optimizer(self, index: int) -> Any:
        args = self.args
        learning_rate = self.agents[index].learning_rate or args.learning_rate
        trainable = [(name, p) for name, p in self.models[index].named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError(f"Agent `{self.agents[index].name}` has no trainable parameter.")
        # As transformers' Trainer: no weight decay on biases and normalisation weights (the 1-D parameters). A weight
        # partitioned as it loaded (ZeRO-3 init) keeps its real shape in `ds_shape`.
        matrices = [p for _, p in trainable if len(getattr(p, "ds_shape", p.shape)) > 1]
        vectors = [p for _, p in trainable if len(getattr(p, "ds_shape", p.shape)) <= 1]
        groups = [
            {"params": matrices, "weight_decay": args.weight_decay},
            {"params": vectors, "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(
            [group for group in groups if group["params"]],
            lr=learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
        )
        if not self.is_deepspeed:
            return self.accelerator.prepare_optimizer(optimizer)
        # The agent's engine: its model and optimizer prepared together, by its own Accelerator and plugin. The engine
        # replaces the model in `self.models`; the returned optimizer wraps the ZeRO optimizer, whose param groups are
        # the AdamW groups above (so the learning-rate scheduler built on it sets the lr ZeRO steps with).
        self._select_deepspeed_plugin(index)
        self.models[index], optimizer = self.agent_accelerators[index].prepare(self.models[index], optimizer)
        return optimizer

    def _samples_per_agent(self) -> int:
        """Completions each agent trains on per step and process (fixed by the settings)."""
        per_question = {"share": self.args.num_generations, "fuse": self.args.num_generations}
        per_question["analyse"] = self.args.analysis_samples
        return self.questions_per_process * sum(per_question[stage] for stage in self.args.train_stages)

    def _optimizer_steps_per_step(self) -> int:
        micro_batches = math.ceil(self._samples_per_agent() / self.args.per_device_train_batch_size)
        return self.args.num_iterations * math.ceil(micro_batches / self.args.gradient_accumulation_steps)

    def _build_scheduler(self, optimizer: Any) -> Any:
        from transformers import get_scheduler

        # Not prepared by Accelerate: it steps once per optimizer step on every process (Accelerate would step it
        # num_processes times), and its length is known exactly.
        total = self.num_training_steps * self.optimizer_steps_per_step
        return get_scheduler(
            self.args.lr_scheduler_type,
            optimizer,
            num_warmup_steps=self.args.get_warmup_steps(total),
            num_training_steps=total,
            scheduler_specific_kwargs=self.args.lr_scheduler_kwargs or {},
        )

    def _build_backends(self) -> list[Any]:
        from ilr.generation import build_backend, engine_kwargs

        args = self.args
        backends = []
        kwargs = engine_kwargs(args, len(self.agents))  # every agent's engine gets a share of the GPU
        for agent, model, tokenizer in zip(self.agents, self.models, self.tokenizers):
            unwrapped = self.accelerator.unwrap_model(model)
            # A vLLM engine loads the training weights as it starts: whole ones (ZeRO-3), one agent's at a time.
            gather = args.generation_backend != "transformers"
            with self.gathered_weights([len(backends)]) if gather else contextlib.nullcontext():
                backend = build_backend(agent, args.generation_backend, model=unwrapped, tokenizer=tokenizer, **kwargs)
            backend.max_retries = args.generation_retries
            backends.append(backend)
        return backends

    def _build_pushers(self) -> dict[str, Any]:
        """One background Hub pusher per agent repository (`push_to_hub`), on the main process only."""
        if not self.args.push_to_hub or not self.accelerator.is_main_process:
            return {}
        from ilr.hub import HubPusher

        # Snapshots are hard links: the staging folder must sit on the checkpoints' filesystem, outside them.
        staging = Path(self.args.output_dir) / ".hub_staging"
        return {
            agent.name: HubPusher(
                agent.hub_model_id,
                token=self.args.hub_token,
                private=bool(self.args.hub_private_repo),
                staging_dir=staging,
            )
            for agent in self.agents
        }

    # -----------------------------------------------------------------------------------------------------------------
    # The loop
    # -----------------------------------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None) -> dict[str, float]:
        """
        Run the co-learning loop to `max_steps` (or `num_train_epochs`), checkpointing every `save_steps`.

        Args:
            resume_from_checkpoint (`str` or `bool`, *optional*):
                `True` (or `"true"`): continue from the latest complete checkpoint in `output_dir`; a path: from that
                checkpoint. Unfinished `tmp-checkpoint-*` folders are removed first.

        Returns:
            `dict[str, float]`: The metrics of the last step.

        Raises:
            [`TrainingInterrupted`]: on SIGTERM/SIGINT, once the current step is done and saved.
        """
        from tqdm.auto import tqdm

        checkpoint = self._resolve_checkpoint(resume_from_checkpoint)
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)
            logger.info("Resumed from %s at step %d.", checkpoint, self.global_step)
        else:
            self._trim_metrics(0)  # a fresh run: lines of an earlier run in the same folder would mix with ours
            self.irt = self.prepare_irt()
        self._init_trackers()
        progress = tqdm(
            total=self.num_training_steps,
            initial=self.global_step,
            desc="ILR",
            disable=not self.accelerator.is_local_main_process,
        )
        metrics: dict[str, float] = {}
        with StopSignals() as stop:
            for step in range(self.global_step + 1, self.num_training_steps + 1):
                metrics = self.training_step(step)
                self.global_step = step
                if step % self._every(self.args.logging_steps) == 0 or step == self.num_training_steps:
                    self.log(metrics, step)
                progress.update(1)
                progress.set_postfix(
                    reward=f"{metrics['train/reward']:.3f}",
                    coop=f"{metrics['interaction/coop_frac']:.2f}",
                    tok_s=f"{metrics['tokens/per_second']:.0f}",
                )
                stopping = self._any_process(stop.signum is not None) and step < self.num_training_steps
                if stopping or (self._save_enabled() and step % self._every(self.args.save_steps) == 0):
                    self.save_checkpoint(step)
                if stopping:
                    progress.close()
                    self._finish_trackers()
                    raise TrainingInterrupted(stop.signum or signal.SIGTERM, step, Path(self.args.output_dir))
        progress.close()
        self._finish_trackers()
        return metrics

    def _finish_trackers(self) -> None:
        # Not `accelerator.end_training()`: it also destroys the process group, which saving the models still needs.
        for tracker in self.accelerator.trackers:
            tracker.finish()

    def _any_process(self, flag: bool) -> bool:
        """True on every process when `flag` is true on any (a signal may reach only some of them)."""
        if self.accelerator.num_processes == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(value, reduction="sum").item() > 0)

    def training_step(self, step: int) -> dict[str, float]:
        """
        One ILR step: questions -> modes -> Idea3 -> rewards -> calibration -> advantages -> per-agent GRPO updates.

        Args:
            step (`int`):
                The step number (1-based); seeds everything random in the step.

        Returns:
            `dict[str, float]`: The step's metrics.
        """
        torch.manual_seed(_torch_seed(self.args.seed, step, 3))
        start = time.perf_counter()
        questions = self.draw_questions()
        coop_mask = self.select_modes(questions, step)
        transcript = self.interact(questions, coop_mask, step)
        generated = time.perf_counter()

        rewards = self.score(transcript)
        calibrated = self.calibrate(rewards)
        advantages, adv_changes = self.compute_advantages(calibrated, rewards)
        scored = time.perf_counter()

        update_metrics = []
        for agent_index in range(len(self.agents)):
            samples = self.build_samples(transcript, agent_index, advantages, step)
            update_metrics.append(self.update_agent(agent_index, samples))
        synced = time.perf_counter()
        self.sync_backends()
        sync_s = time.perf_counter() - synced
        self.refresh_ability(questions, rewards, step)
        updated = time.perf_counter()

        timings = {
            "time/generation": generated - start,
            "time/scoring": scored - generated,
            "time/update": updated - scored,  # the weight sync included
            "time/sync": sync_s,
            "time/step": updated - start,
        }
        return self.step_metrics(transcript, rewards, calibrated, adv_changes, update_metrics, timings)

    # --- 1. questions and modes --------------------------------------------------------------------------------------
    def draw_questions(self) -> list[dict[str, Any]]:
        """
        The next questions of this process: every process draws the same global batch and keeps its share.

        Returns:
            `list[dict]`: Canonical question rows.
        """
        indices = self.sampler.draw(self.questions_per_step)
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        return [self.train_rows[index] for index in indices[rank::world]]

    def select_modes(self, questions: list[dict[str, Any]], step: int) -> np.ndarray:
        """
        Cooperate (`True`) or compete (`False`) for every question and agent.

        Args:
            questions (`list[dict]`):
                The step's questions.
            step (`int`):
                Seeds the `ratio:p` draws.

        Returns:
            `np.ndarray` of dtype `bool` and shape `(Q, m)`.
        """
        from ilr.difficulty import select_modes

        if self.irt is not None:
            difficulty = self.irt.difficulty_for([row["id"] for row in questions])
            gamma = self.irt.gamma
        else:
            difficulty, gamma = np.zeros((len(questions), len(self.agents))), None
        return select_modes(
            difficulty,
            gamma,
            self.args.interaction_mode,
            scale=self.args.irt_scale,
            rng=_seed_sequence(self.args.seed, step, 0),
        )

    # --- 2. interaction ----------------------------------------------------------------------------------------------
    def interact(self, questions: list[dict[str, Any]], coop_mask: np.ndarray, step: int) -> Transcript:
        """
        Idea3 over the step's questions: one `generate` call per stage and agent.

        Args:
            questions (`list[dict]`):
                The step's questions.
            coop_mask (`np.ndarray` of shape `(Q, m)`):
                From [`select_modes`].
            step (`int`):
                Seeds the share selection and the generation.

        Returns:
            [`~ilr.interaction.Transcript`]
        """
        from ilr.interaction import run_idea3

        with self.generation_weights():
            transcript = run_idea3(
                questions, self.backends, coop_mask, self.idea3_settings, rng=_seed_sequence(self.args.seed, step, 1)
            )
        # Colocated vLLM engines with `vllm_enable_sleep_mode` free their memory for the update (a no-op elsewhere).
        for backend in self.backends:
            backend.sleep()
        return transcript

    def generation_weights(self) -> contextlib.AbstractContextManager:
        """Gathered weights (ZeRO-3) where generation reads the training models (the transformers backend); vLLM
        engines hold their own copy, so gathering for them would only take memory."""
        if self.args.generation_backend == "transformers":
            return self.gathered_weights()
        return contextlib.nullcontext()

    # --- 3. rewards --------------------------------------------------------------------------------------------------
    def score(self, transcript: Transcript) -> StepRewards:
        """
        Every reward function on every completion of every agent and stage, one call per function.

        Args:
            transcript ([`~ilr.interaction.Transcript`]):
                The step's discussion.

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
        for name, func in self.reward_funcs.items():
            values = func(completions=completions, prompts=prompts, completion_ids=completion_ids, **columns)
            if len(values) != len(completions):
                raise RuntimeError(
                    f"Reward `{name}` returned {len(values)} values for {len(completions)} completions."
                )
            arrays = {stage: np.full(shape, np.nan) for stage, shape in shapes.items()}
            for (stage, agent_index, question, sample), value in zip(where, values):
                if value is not None:
                    arrays[stage][agent_index, question, sample] = float(value)
            unscored[name] = sum(value is None for value in values)
            if unscored[name]:
                logger.warning("Reward `%s` could not score %d of %d completions.", name, unscored[name], len(values))
            per_function[name] = arrays
        total = {
            stage: sum(
                weight * per_function[name][stage] for name, weight in zip(self.reward_funcs, self.reward_weights)
            )
            for stage in transcript.stages
        }
        return StepRewards(total=total, per_function=per_function, unscored=unscored)

    # --- 4. calibration ----------------------------------------------------------------------------------------------
    def calibrate(self, rewards: StepRewards) -> CalibratedRewards:
        """
        Perception Calibration of each trained stage across the agents (skipped with `calibration: false`).

        Args:
            rewards ([`StepRewards`]):
                The raw rewards.

        Returns:
            [`CalibratedRewards`]
        """
        calibrated, clip_frac = {}, {}
        for stage in self.args.train_stages:
            raw = torch.as_tensor(rewards.total[stage], dtype=torch.float32)
            if not self.args.calibration:
                calibrated[stage], clip_frac[stage] = raw, 0.0
                continue
            local_questions = raw.size(1)
            batch_wide = self.args.calibration_scope == "batch" and self.accelerator.num_processes > 1
            if batch_wide:  # the peer statistics are over the step's whole batch, not this process's share of it
                raw = self._gather_questions(raw)
            result = calibrate_rewards(raw, scope=self.args.calibration_scope, eps=self.args.calibration_eps)
            calibrated[stage], clip_frac[stage] = result.rewards, float(result.clip_frac)
            if batch_wide:
                start = self.accelerator.process_index * local_questions
                calibrated[stage] = calibrated[stage][:, start : start + local_questions]
        return CalibratedRewards(rewards=calibrated, clip_frac=clip_frac)

    def _gather_questions(self, rewards: torch.Tensor) -> torch.Tensor:
        """`[m, Q_local, n]` of every process -> `[m, Q_local * num_processes, n]`, process after process."""
        by_question = rewards.permute(1, 0, 2).contiguous().to(self.accelerator.device)
        return self.accelerator.gather(by_question).permute(1, 0, 2).cpu()

    # --- 5. advantages -----------------------------------------------------------------------------------------------
    def compute_advantages(
        self, calibrated: CalibratedRewards, raw: StepRewards | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, AdvantageChange]]:
        """
        GRPO advantages per agent, stage and question, from the calibrated rewards.

        With `scale_rewards: batch` and several processes, the std is taken over the whole batch gathered from every
        process, as TRL does, so that each process scales its questions alike.

        Args:
            calibrated ([`CalibratedRewards`]):
                Rewards of the trained stages.
            raw ([`StepRewards`], *optional*):
                The raw rewards, to measure what calibration changed (`calibration/adv_delta`, `.../reshaped_frac`,
                `.../sign_flip_frac`).

        Returns:
            `tuple[dict[str, torch.Tensor], dict[str, AdvantageChange]]`: advantages `[m, Q, n]` per trained stage (0
            where the reward is NaN) and, per stage, the change calibration made to them (all 0 without `raw` or
            calibration).
        """
        changes = {}
        advantages = {stage: self._advantages(stage_rewards) for stage, stage_rewards in calibrated.rewards.items()}
        for stage in advantages:
            changes[stage] = AdvantageChange(delta=0.0, sign_flip_frac=0.0, reshaped_frac=0.0)
            if raw is not None and self.args.calibration:
                raw_advantages = self._advantages(torch.as_tensor(raw.total[stage], dtype=torch.float32))
                changes[stage] = advantage_change(advantages[stage], raw_advantages)
        return advantages, changes

    def _advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """`[m, Q_local, n]` rewards of one stage -> advantages of the same shape."""
        from ilr.grpo import group_advantages

        scale = self.args.scale_rewards
        batch_wide = scale == "batch" and self.accelerator.num_processes > 1
        local_questions = rewards.size(1)
        if batch_wide:  # the std of the step's whole batch, not of this process's share of it
            rewards = self._gather_questions(rewards)
        advantages = self._advantage_sign * torch.stack([group_advantages(agent, scale) for agent in rewards])
        if batch_wide:
            start = self.accelerator.process_index * local_questions
            advantages = advantages[:, start : start + local_questions]
        return advantages

    # --- 6. per-agent samples and update -----------------------------------------------------------------------------
    def build_samples(
        self, transcript: Transcript, agent_index: int, advantages: dict[str, torch.Tensor], step: int
    ) -> list[TrainingSample]:
        """
        The completions one agent trains on: its own prompt ids and its own sampled tokens from its trained stages.

        Args:
            transcript ([`~ilr.interaction.Transcript`]):
                The step's discussion.
            agent_index (`int`):
                The agent.
            advantages (`dict[str, torch.Tensor]`):
                From [`compute_advantages`].
            step (`int`):
                Seeds the shuffle (as TRL shuffles a generation batch before cutting it into micro-batches).

        Returns:
            `list[TrainingSample]`: stage after stage (`train_stages` order); within a stage, the groups (one question's
            completions) in a shuffled order, each group's samples together. Unlike TRL, which shuffles single
            samples, groups stay whole, so that a micro-batch holds whole groups (when its size is a multiple of the
            group size) and [`update_agent`] computes each group's shared prompt once.
        """
        samples = []
        for stage_index, stage in enumerate(self.args.train_stages):
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
            order = _seed_sequence(self.args.seed, step, 2, agent_index, stage_index).permutation(len(groups))
            samples.extend(sample for i in order for sample in groups[i])
        return samples

    def update_agent(self, agent_index: int, samples: list[TrainingSample]) -> dict[str, float]:
        """
        GRPO updates of one agent on its own samples: micro-batches of `per_device_train_batch_size`, an optimizer step
        every `gradient_accumulation_steps` of them, `num_iterations` passes, gradients clipped to `max_grad_norm`.

        Args:
            agent_index (`int`):
                The agent.
            samples (`list[TrainingSample]`):
                From [`build_samples`].

        Returns:
            `dict[str, float]`: loss, grad norm, learning rate and the loss function's clip (and KL) metrics, averaged
            over the optimizer steps.
        """
        from ilr.grpo import grouped_per_token_logps, grpo_loss, per_token_logps, supports_grouped_logps

        args, accelerator = self.args, self.accelerator
        model, optimizer, scheduler = (
            self.models[agent_index],
            self.optimizers[agent_index],
            self.schedulers[agent_index],
        )
        tokenizer = self.tokenizers[agent_index]
        # Padding is masked out of attention and loss; any id works, the tokenizer's own keeps the model in vocab.
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        size = args.per_device_train_batch_size
        micro_batches = [
            collate_samples(
                samples[i : i + size],
                pad_token_id,
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
            if shared and self.share_prompt_forward:
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
            return per_token_logps(
                module, batch.input_ids, batch.attention_mask, batch.logits_to_keep, args.temperature
            )

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
                    ref_logps[index] = self._ref_logps(agent_index, batch, logps_of)

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
                    last = position == len(window) - 1
                    with self._accumulation(model, boundary=last):
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
                        if self.is_deepspeed:  # its own engine (gradient_accumulation_steps 1: the loss as it is)
                            model.backward(loss, scale_wrt_gas=False)
                        else:
                            accelerator.backward(loss)
                    window_loss += loss.item()
                    for key, value in loss_metrics.items():
                        totals.setdefault(key, []).append(value)
                totals.setdefault("learning_rate", []).append(scheduler.get_last_lr()[0])
                totals.setdefault("loss", []).append(window_loss)
                if self.is_deepspeed:
                    # The window's end is the engine's accumulation boundary: it reduces what is left, clips to
                    # `gradient_clipping` (= max_grad_norm), steps and zeroes the gradients.
                    model.step()
                    grad_norm = model.get_global_grad_norm()  # before clipping, as `clip_grad_norm_` returns
                    grad_norm = float("nan") if grad_norm is None else grad_norm
                else:
                    max_norm = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else float("inf")
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
                totals.setdefault("grad_norm", []).append(float(grad_norm))
                optimizer.step()  # under DeepSpeed, Accelerate's wrapper does nothing here: the engine has stepped
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        return {key: _nanmean(values) for key, values in totals.items()}

    def _accumulation(self, model: Any, boundary: bool) -> contextlib.AbstractContextManager:
        """
        Context of one micro-batch's forward and backward inside an accumulation window; `boundary` on the last one.
        DDP skips the gradient all-reduce before the boundary (`no_sync`); a DeepSpeed engine is told where the
        window ends, since it is configured with `gradient_accumulation_steps: 1` and would otherwise take every
        backward as a boundary.
        """
        if self.is_deepspeed:
            model.set_gradient_accumulation_boundary(boundary)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if boundary else self.accelerator.no_sync(model)

    def _ref_logps(self, agent_index: int, batch: MicroBatch, logps_of: Callable) -> torch.Tensor:
        ref_model = self.ref_models[agent_index]
        if ref_model is not None:
            return logps_of(ref_model, batch)
        # A LoRA agent: its base model, adapter switched off, is the reference (as in TRL).
        with self.accelerator.unwrap_model(self.models[agent_index]).disable_adapter():
            return logps_of(self.models[agent_index], batch)

    def sync_backends(self) -> None:
        """Make every generation backend sample from its agent's updated weights."""
        # The transformers backend generates with the training model itself: nothing to copy, nothing to gather.
        pushing = self.args.generation_backend != "transformers"
        # One agent's weights gathered at a time (ZeRO-3): the peak is the largest agent's, not all of them.
        for index, (backend, model) in enumerate(zip(self.backends, self.models)):
            with self.gathered_weights([index]) if pushing else contextlib.nullcontext():
                backend.update_weights(self.accelerator.unwrap_model(model))

    # --- 7. Dynamic Interaction: difficulty and ability --------------------------------------------------------------
    def prepare_irt(self) -> IRTEstimate | None:
        """
        Difficulty and ability estimates for `interaction_mode: dynamic`, from the cache or a pre-pass.

        `self_rank`: each agent rates every training question and the first `ability_samples` validation questions
        (one greedy call per agent and set), and answers those validation questions greedily (one call per agent);
        gamma is the ability matching that accuracy on the same scale. `pass_rate`: `difficulty_samples` answers per
        training question and agent, and a joint 1PL fit. The estimate is cached under `difficulty_cache_dir`
        (default `<output_dir>/irt`), keyed by agents, data and settings.

        Returns:
            `IRTEstimate | None`: `None` under a fixed interaction mode.
        """
        from ilr.difficulty import describe_modes, irt_cache_path, load_irt, needs_irt, save_irt

        if not needs_irt(self.args.interaction_mode):
            return None
        key_fields = self._irt_key_fields()
        cache_dir = self.args.difficulty_cache_dir or os.path.join(self.args.output_dir, "irt")
        path = irt_cache_path(cache_dir, key_fields)
        estimate = load_irt(path, key_fields)
        if estimate is None:
            with self.generation_weights():  # entered by every process (ZeRO-3 gathers collectively)
                if self.accelerator.is_main_process:
                    logger.info(  # console: issue 18, a pre-pass takes minutes on CPU
                        "Estimating question difficulty and agent ability (%s pre-pass, cached in %s)...",
                        self.args.difficulty_source,
                        cache_dir,
                        extra={"console": True},
                    )
                    estimate = self._irt_prepass(key_fields)
                    save_irt(path, estimate, key_fields)
                    logger.info("IRT estimate (%s) cached at %s.", estimate.source, path)
                self.accelerator.wait_for_everyone()
            estimate = load_irt(path, key_fields) if estimate is None else estimate
        else:
            logger.info("IRT estimate loaded from the cache %s.", path)
        summary, one_mode = describe_modes(estimate, [agent.name for agent in self.agents])  # console: issue 18
        logger.info(summary, extra={"console": True})
        if one_mode:
            logger.warning(one_mode)
        return estimate

    def _validation_rows(self) -> list[dict[str, Any]]:
        return (self.eval_rows or [])[: self.args.ability_samples]

    def _irt_key_fields(self) -> dict[str, Any]:
        from ilr.data import canonical_row_bytes
        from ilr.difficulty import irt_key_fields

        def fingerprint(rows: list[dict[str, Any]]) -> str:
            return hashlib.sha256(b"".join(canonical_row_bytes(row) for row in rows)).hexdigest()

        validation = self._validation_rows() if self.args.difficulty_source == "self_rank" else []
        return irt_key_fields(
            agents=[(agent.model_name_or_path, agent.model_revision) for agent in self.agents],
            dataset=self.dataset_name,
            split="train",
            source=self.args.difficulty_source,
            data_files=self.data_files,
            samples=self.args.difficulty_samples if self.args.difficulty_source == "pass_rate" else None,
            scale=self.args.irt_scale,
            seed=self.args.seed,
            dataset_fingerprint=fingerprint(self.train_rows),
            validation_fingerprint=fingerprint(validation),
            max_completion_length=self.args.max_completion_length,
            temperature=self.args.temperature,
            system_prompt=self.system_prompt,
        )

    def _irt_prepass(self, key_fields: dict[str, Any]) -> IRTEstimate:
        from ilr.data import build_prompt
        from ilr.difficulty import pass_rate_estimate, pass_rate_prepass, self_rank_estimate, self_rank_prepass
        from ilr.generation import SamplingParams

        args = self.args
        ids = [str(row["id"]) for row in self.train_rows]
        metadata = {"agents": [agent.name for agent in self.agents]}
        if args.difficulty_source == "pass_rate":
            params = SamplingParams(
                temperature=args.temperature,
                top_p=args.top_p,
                max_new_tokens=args.max_completion_length,
                seed=_torch_seed(args.seed, 0, 4),
            )
            prompts = [build_prompt(row, system_prompt=self.system_prompt) for row in self.train_rows]
            golds = [row["answer"] for row in self.train_rows]
            correct = pass_rate_prepass(prompts, golds, self.backends, args.difficulty_samples, params=params)
            return pass_rate_estimate(ids, correct, args.difficulty_samples, scale=args.irt_scale, metadata=metadata)

        validation = self._validation_rows()
        train_ratings = self_rank_prepass([row["problem"] for row in self.train_rows], self.backends)
        val_ratings = self_rank_prepass([row["problem"] for row in validation], self.backends)
        val_accuracy = self.validation_accuracy(validation)
        return self_rank_estimate(
            ids, train_ratings, val_ratings, val_accuracy, scale=args.irt_scale, metadata=metadata
        )

    def validation_accuracy(self, rows: list[dict[str, Any]]) -> np.ndarray:
        """
        Each agent's greedy accuracy on validation questions: one batched call per agent.

        Args:
            rows (`list[dict]`):
                Validation questions (canonical rows with `answer`).

        Returns:
            `np.ndarray` of shape `(m,)`.
        """
        from ilr.data import build_prompt
        from ilr.difficulty import pass_rate_prepass
        from ilr.generation import SamplingParams

        params = SamplingParams(n=1, temperature=0.0, max_new_tokens=self.args.max_completion_length)
        prompts = [build_prompt(row, system_prompt=self.system_prompt) for row in rows]
        correct = pass_rate_prepass(prompts, [row["answer"] for row in rows], self.backends, 1, params=params)
        accuracy = correct.mean(axis=0)
        logger.info(
            "Validation accuracy (%d questions): %s", len(rows), dict(zip([a.name for a in self.agents], accuracy))
        )
        return accuracy

    def refresh_ability(self, questions: list[dict[str, Any]], rewards: StepRewards, step: int) -> None:
        """
        With `ability_refresh_steps > 0`, re-solve gamma every that many steps from the share-stage accuracy (the plain
        single-agent prompt) over the questions of those steps.

        Args:
            questions (`list[dict]`):
                The step's questions.
            rewards ([`StepRewards`]):
                The step's raw rewards.
            step (`int`):
                The step number.
        """
        from ilr.difficulty import update_ability

        if self.irt is None or not self.args.ability_refresh_steps:
            return
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-unscored group: NaN, skipped below
            accuracy = np.nanmean(rewards.per_function["accuracy"]["share"], axis=2).T  # [Q, m]
        self.ability_window.append({"ids": [str(row["id"]) for row in questions], "accuracy": accuracy.tolist()})
        if step % self.args.ability_refresh_steps:
            return
        window = self.ability_window
        if self.accelerator.num_processes > 1:  # every process must reach the same gamma: pool all their questions
            from accelerate.utils import gather_object

            window = gather_object(window)
        ids = [question_id for entry in window for question_id in entry["ids"]]
        accuracy = np.concatenate([np.asarray(entry["accuracy"], dtype=float) for entry in window])
        running = np.array([_nanmean(accuracy[:, i]) for i in range(len(self.agents))])
        self.irt.gamma = update_ability(
            self.irt.gamma, running, self.irt.difficulty_for(ids), scale=self.args.irt_scale
        )
        self.ability_window = []
        logger.info("Step %d: abilities refreshed to %s.", step, np.round(self.irt.gamma, 3).tolist())

    # -----------------------------------------------------------------------------------------------------------------
    # Metrics and logging
    # -----------------------------------------------------------------------------------------------------------------
    def step_metrics(
        self,
        transcript: Transcript,
        rewards: StepRewards,
        calibrated: CalibratedRewards,
        adv_changes: dict[str, AdvantageChange],
        update_metrics: list[dict[str, float]],
        timings: dict[str, float],
    ) -> dict[str, float]:
        """
        The step's metrics, slash-namespaced: `ilr/<agent>/<stage>/...` and `ilr/<agent>/...` per agent,
        `calibration/...`, `interaction/...`, `rewards/...`, `tokens/...`, `time/...`; averaged across processes.

        Returns:
            `dict[str, float]`
        """
        metrics: dict[str, float] = {}
        for agent_index, agent in enumerate(self.agents):
            for stage in transcript.stages:
                prefix = f"ilr/{agent.name}/{stage}"
                groups = transcript.groups[stage][agent_index]
                metrics[f"{prefix}/reward"] = _nanmean(rewards.total[stage][agent_index])
                for name in self.reward_funcs:
                    metrics[f"{prefix}/rewards/{name}"] = _nanmean(rewards.per_function[name][stage][agent_index])
                if "accuracy" in self.reward_funcs:
                    metrics[f"{prefix}/accuracy"] = metrics[f"{prefix}/rewards/accuracy"]
                if stage in calibrated.rewards:
                    metrics[f"{prefix}/reward_calibrated"] = _nanmean(calibrated.rewards[stage][agent_index])
                lengths = [len(ids) for group in groups for ids in group.completion_ids]
                reasons = [reason for group in groups for reason in group.finish_reasons]
                metrics[f"{prefix}/completion_length"] = float(np.mean(lengths))
                metrics[f"{prefix}/clipped_ratio"] = float(np.mean([reason == "length" for reason in reasons]))
            for key, value in update_metrics[agent_index].items():
                metrics[f"ilr/{agent.name}/{key}"] = value
            metrics[f"ilr/{agent.name}/generated_tokens"] = float(transcript.num_generated_tokens(agent_index))
            if self.irt is not None:
                metrics[f"interaction/gamma/{agent.name}"] = float(self.irt.gamma[agent_index])
        for stage in self.args.train_stages:
            metrics[f"calibration/{stage}/clip_frac"] = calibrated.clip_frac[stage]
            for name in ("adv_delta", "reshaped_frac", "sign_flip_frac"):
                metrics[f"calibration/{stage}/{name}"] = getattr(adv_changes[stage], name.removeprefix("adv_"))
        for name in ("clip_frac", "adv_delta", "reshaped_frac", "sign_flip_frac"):
            metrics[f"calibration/{name}"] = float(
                np.mean([metrics[f"calibration/{stage}/{name}"] for stage in self.args.train_stages])
            )
        metrics["interaction/coop_frac"] = float(np.mean(transcript.cooperate))
        for name, count in rewards.unscored.items():
            metrics[f"rewards/{name}/unscored"] = float(count)
        trained = [metrics[f"ilr/{a.name}/{s}/reward"] for a in self.agents for s in self.args.train_stages]
        metrics["train/reward"] = _nanmean(trained)
        generated = transcript.num_generated_tokens()
        metrics["tokens/generated"] = float(generated)
        metrics["tokens/per_second"] = generated / max(timings["time/generation"], 1e-9)
        metrics.update(timings)
        metrics = self._reduce_across_processes(metrics)
        self.total_generated_tokens += int(metrics["tokens/generated"] * self.accelerator.num_processes)
        metrics["tokens/total_generated"] = float(self.total_generated_tokens)
        metrics["train/epoch"] = self.sampler.epochs_done
        return metrics

    def _reduce_across_processes(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.accelerator.num_processes == 1:
            return metrics
        keys = sorted(metrics)
        values = torch.tensor([metrics[key] for key in keys], dtype=torch.float64, device=self.accelerator.device)
        reduced = self.accelerator.reduce(values, reduction="mean")
        return dict(zip(keys, reduced.tolist()))

    def _init_trackers(self) -> None:
        if self.accelerator.log_with:
            config = {k: v for k, v in self.args.to_dict().items() if isinstance(v, (int, float, str, bool))}
            init_kwargs = {"wandb": {"name": self.args.run_name}} if self.args.run_name else {}
            self.accelerator.init_trackers(self.args.project or "ilr", config=config, init_kwargs=init_kwargs)

    def log(self, metrics: dict[str, float], step: int) -> None:
        """
        Send metrics to the trackers (`report_to`) and append them to `<output_dir>/metrics.jsonl`.

        Args:
            metrics (`dict[str, float]`):
                The step's metrics.
            step (`int`):
                The step number.
        """
        self.accelerator.log(metrics, step=step)
        if self.accelerator.is_main_process:
            os.makedirs(self.args.output_dir, exist_ok=True)
            record = {"step": step, **{key: (None if math.isnan(v) else v) for key, v in metrics.items()}}
            with open(os.path.join(self.args.output_dir, METRICS_NAME), "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def _every(self, interval: int | float | None) -> int:
        """A `logging_steps` / `save_steps` value in steps; below 1 it is a fraction of the run, as in transformers."""
        if not interval or interval <= 0:
            return self.num_training_steps
        return max(1, math.ceil(interval * self.num_training_steps)) if interval < 1 else int(interval)

    def _save_enabled(self) -> bool:
        return str(getattr(self.args.save_strategy, "value", self.args.save_strategy)) == "steps"

    # -----------------------------------------------------------------------------------------------------------------
    # Checkpoints
    # -----------------------------------------------------------------------------------------------------------------
    def save_checkpoint(self, step: int) -> Path:
        """
        Save everything needed to continue exactly, atomically: written to `tmp-checkpoint-<step>`, then renamed to
        `checkpoint-<step>`. Per agent (`<agent.name>/`): model or LoRA adapter, tokenizer, optimizer and scheduler
        (under DeepSpeed, instead of `optimizer.pt`, the engine's own checkpoint in `deepspeed/`: weights and optimizer
        state, one partition per process); shared: step, sampler position, RNG states, the IRT estimate. Keeps at
        most `save_total_limit` checkpoints.

        Args:
            step (`int`):
                The step just finished.

        Returns:
            `Path`: The checkpoint folder.
        """
        output_dir = Path(self.args.output_dir)
        final, tmp = output_dir / f"{CHECKPOINT_PREFIX}{step}", output_dir / f"{TMP_CHECKPOINT_PREFIX}{step}"
        main = self.accelerator.is_main_process
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        for agent, model, tokenizer, optimizer, scheduler in zip(
            self.agents, self.models, self.tokenizers, self.optimizers, self.schedulers
        ):
            self._save_agent(tmp / agent.name, model, tokenizer)
            if self.is_deepspeed:  # ZeRO partitions the optimizer state: the engine writes every process's part
                model.save_checkpoint(tmp / agent.name, tag=DEEPSPEED_CHECKPOINT_TAG, save_latest=False)
            elif main:
                torch.save(optimizer.state_dict(), tmp / agent.name / OPTIMIZER_NAME)
            if main:
                torch.save(scheduler.state_dict(), tmp / agent.name / SCHEDULER_NAME)
        if main:
            self._write_state(tmp)
            if final.exists():  # the same step saved again after a resume
                _discard(final)
            os.replace(tmp, final)
            self._push_checkpoint(final, step)
            self._rotate_checkpoints(output_dir)
        self.accelerator.wait_for_everyone()
        logger.info("Saved %s.", final)
        return final

    def _push_checkpoint(self, checkpoint: Path, step: int) -> None:
        """Queue each agent's checkpoint for its repository's `step-<step>` branch (`hub_strategy` other than `end`)."""
        if not self.pushers or str(getattr(self.args.hub_strategy, "value", self.args.hub_strategy)) == "end":
            return
        from ilr.hub import step_revision

        for agent in self.agents:
            self.pushers[agent.name].push_folder(
                checkpoint / agent.name,
                revision=step_revision(step),
                commit_message=f"ILR checkpoint, step {step}",
                extra_files={TRAINER_STATE_NAME: checkpoint / TRAINER_STATE_NAME},
            )

    def push_final_models(self, folders: list[Path], recipe_path: str | os.PathLike | None = None) -> list[Any]:
        """
        Push each agent's final model with its model card to the `main` branch of its `hub_model_id`, then wait for
        every queued push (checkpoints included). Failures are logged with the command that retries them; the local
        files are never changed.

        Args:
            folders (`list[Path]`):
                From [`save_models`], one per agent.
            recipe_path (`str` or `os.PathLike`, *optional*):
                The recipe file, embedded in the cards (credentials removed).

        Returns:
            `list[PushResult]`: The pushes that failed (empty when all succeeded or nothing was pushed).
        """
        from ilr.cards import build_training_card

        if not self.pushers:
            return []
        for agent, folder in zip(self.agents, folders):
            peers = [peer for peer in self.agents if peer is not agent]
            card = build_training_card(
                model_name=agent.hub_model_id.split("/")[-1],
                base_model=agent.model_name_or_path,
                agent_name=agent.name,
                peers={peer.name: peer.model_name_or_path for peer in peers},
                peer_repos={peer.name: peer.hub_model_id for peer in peers if peer.hub_model_id},
                recipe_path=recipe_path,
                dataset_name=self.dataset_name,
                data_files=self.data_files,
                global_step=self.global_step,
                num_training_steps=self.num_training_steps,
                repo_id=agent.hub_model_id,
            )
            card_path = Path(self.args.output_dir) / f"README-{agent.name}.md"
            card.save(card_path)
            self.pushers[agent.name].push_folder(
                folder,
                commit_message=f"ILR final model, step {self.global_step}",
                extra_files={"README.md": card_path},
            )
        return self.close_pushers()

    def close_pushers(self) -> list[Any]:
        """
        Wait for every queued Hub push and stop the pushers; log each failure.

        Returns:
            `list[PushResult]`: The pushes that failed.
        """
        failed = []
        for pusher in self.pushers.values():
            results = pusher.wait()
            pusher.close()
            failed += [result for result in results if not result.ok]
            logger.info("%d of %d pushes to %s succeeded.", sum(r.ok for r in results), len(results), pusher.repo_id)
        for result in failed:
            logger.error("Hub push failed: %s", result)
        self.pushers = {}
        return failed

    def _save_agent(self, folder: Path, model: Any, tokenizer: Any) -> None:
        state_dict = self.accelerator.get_state_dict(model)  # gathers shards (ZeRO-3) on every process
        if self.accelerator.is_main_process:
            unwrapped = self.accelerator.unwrap_model(model)
            if self.is_deepspeed:  # its state dict holds copies: tied weights no longer share storage
                state_dict = _drop_tied_copies(unwrapped, state_dict)
            unwrapped.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(folder)

    def _write_state(self, folder: Path) -> None:
        from ilr.difficulty import save_irt

        state = {
            "format_version": STATE_FORMAT_VERSION,
            "global_step": self.global_step,
            "num_training_steps": self.num_training_steps,
            "agents": [agent.name for agent in self.agents],
            "sampler": self.sampler.state_dict(),
            "ability_window": self.ability_window,
            "total_generated_tokens": self.total_generated_tokens,
        }
        (folder / TRAINER_STATE_NAME).write_text(json.dumps(state, indent=2), encoding="utf-8")
        rng_state = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        torch.save(rng_state, folder / RNG_STATE_NAME)
        if self.irt is not None:
            save_irt(folder / IRT_STATE_NAME, self.irt)

    def _rotate_checkpoints(self, output_dir: Path) -> None:
        limit = self.args.save_total_limit
        if not limit or limit < 1:
            return
        checkpoints = _complete_checkpoints(output_dir)
        for stale in checkpoints[: max(0, len(checkpoints) - limit)]:
            _discard(stale)

    def _resolve_checkpoint(self, resume_from_checkpoint: str | bool | None) -> Path | None:
        output_dir = Path(self.args.output_dir)
        if self.accelerator.is_main_process and output_dir.is_dir():
            for partial in output_dir.glob(f"{TMP_CHECKPOINT_PREFIX}*"):
                logger.warning("Removing the unfinished checkpoint %s (the run stopped while writing it).", partial)
                shutil.rmtree(partial, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        if resume_from_checkpoint is None or str(resume_from_checkpoint).lower() in ("false", "none", ""):
            return None
        if str(resume_from_checkpoint).lower() == "true":
            checkpoint = latest_checkpoint(output_dir)
            if checkpoint is None:
                raise FileNotFoundError(
                    f"`resume_from_checkpoint: true` but {output_dir} holds no complete checkpoint: remove the flag "
                    "to start a new run, or point it at a checkpoint folder."
                )
            return checkpoint
        checkpoint = Path(resume_from_checkpoint)
        if not (checkpoint / TRAINER_STATE_NAME).is_file():
            raise FileNotFoundError(f"{checkpoint} is not a complete ILR checkpoint (no {TRAINER_STATE_NAME}).")
        return checkpoint

    def load_checkpoint(self, checkpoint: str | os.PathLike) -> None:
        """
        Restore models, optimizers, schedulers, RNG states, sampler position and IRT estimate from a checkpoint.

        Args:
            checkpoint (`str` or `os.PathLike`):
                A `checkpoint-<step>` folder written by [`save_checkpoint`].
        """
        from ilr.difficulty import load_irt

        checkpoint = Path(checkpoint)
        state = json.loads((checkpoint / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
        names = [agent.name for agent in self.agents]
        if state["agents"] != names:
            raise ValueError(f"{checkpoint} was written for agents {state['agents']}, this run has {names}.")
        if state["num_training_steps"] != self.num_training_steps:
            logger.warning(
                "The checkpoint's run had %d steps, this one has %d: the learning-rate schedule differs.",
                state["num_training_steps"],
                self.num_training_steps,
            )
        for agent, model, optimizer, scheduler in zip(self.agents, self.models, self.optimizers, self.schedulers):
            folder = checkpoint / agent.name
            self._check_checkpoint_kind(folder)
            if self.is_deepspeed:  # weights (the fp32 master copy under ZeRO) and this process's optimizer partition
                model.load_checkpoint(
                    folder,
                    tag=DEEPSPEED_CHECKPOINT_TAG,
                    load_optimizer_states=True,
                    load_lr_scheduler_states=False,
                    load_module_only=False,
                )
            else:
                _load_weights(self.accelerator.unwrap_model(model), folder)
                optimizer.load_state_dict(torch.load(folder / OPTIMIZER_NAME, map_location="cpu", weights_only=True))
            scheduler.load_state_dict(torch.load(folder / SCHEDULER_NAME, weights_only=True))
        self.sync_backends()
        self.sampler.load_state_dict(state["sampler"])
        self.ability_window = state.get("ability_window", [])
        self.total_generated_tokens = state.get("total_generated_tokens", 0)
        self.global_step = int(state["global_step"])
        self.irt = load_irt(checkpoint / IRT_STATE_NAME) if (checkpoint / IRT_STATE_NAME).is_file() else None
        from ilr.difficulty import needs_irt

        if self.irt is None and needs_irt(self.args.interaction_mode):
            self.irt = self.prepare_irt()
        rng_state = torch.load(checkpoint / RNG_STATE_NAME, weights_only=False)
        random.setstate(rng_state["python"])
        np.random.set_state(rng_state["numpy"])
        torch.set_rng_state(rng_state["torch"])
        if rng_state.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng_state["cuda"])
        self._trim_metrics(self.global_step)

    def _check_checkpoint_kind(self, folder: Path) -> None:
        """Refuse, with the fix, an agent checkpoint written under another launch (DeepSpeed or not, process count)."""
        written = folder / DEEPSPEED_CHECKPOINT_TAG
        if self.is_deepspeed != written.is_dir():
            kind = "with" if written.is_dir() else "without"
            raise ValueError(
                f"{folder} was written {kind} DeepSpeed and this run is launched {'with' if self.is_deepspeed else 'without'} "
                "it: resume with the accelerate config (and number of processes) the checkpoint was written with."
            )
        if self.is_deepspeed:
            partitions = len(list(written.glob("*optim_states.pt")))
            if partitions != self.accelerator.num_processes:
                raise ValueError(
                    f"{written} holds the optimizer state of {partitions} processes (ZeRO partitions it), this run has "
                    f"{self.accelerator.num_processes}: resume with the same number of processes."
                )

    def _trim_metrics(self, step: int) -> None:
        """Drop the lines of steps after `step` from `metrics.jsonl`: they are about to be run again."""
        path = Path(self.args.output_dir) / METRICS_NAME
        if not self.accelerator.is_main_process or not path.is_file():
            return
        lines = path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def save_models(self, output_dir: str | os.PathLike | None = None) -> list[Path]:
        """
        Save each agent's final model (or LoRA adapter) and tokenizer to `<output_dir>/<agent.name>`.

        Args:
            output_dir (`str` or `os.PathLike`, *optional*):
                Defaults to `args.output_dir`.

        Returns:
            `list[Path]`: One folder per agent.
        """
        output_dir = Path(output_dir or self.args.output_dir)
        folders = []
        for agent, model, tokenizer in zip(self.agents, self.models, self.tokenizers):
            self._save_agent(output_dir / agent.name, model, tokenizer)
            folders.append(output_dir / agent.name)
        self.accelerator.wait_for_everyone()
        return folders

    def end_training(self) -> None:
        """
        Finish the trackers and destroy the process group: the last call of a run that ended on every process alike
        (finished, or stopped by a signal at the same step).

        Under DDP this must happen while the interpreter is whole: gloo's worker threads hold finished work objects
        that reference Python tensors, and a process that exits with its group alive frees them during interpreter
        finalisation and aborts (SIGABRT, "terminate called without an active exception") after its work is done.
        Not called after an error on one process: destroying the group while a peer is inside a collective can hang.
        """
        self.accelerator.wait_for_everyone()  # no process is still inside a collective when the group goes
        self.accelerator.end_training()


def _drop_tied_copies(model: Any, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep one name per tied parameter (the first, as `save_pretrained` keeps of tensors sharing storage)."""
    first_name: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first_name and first_name[id(param)] in state_dict:
            state_dict.pop(name, None)
        first_name.setdefault(id(param), name)
    return state_dict


def _load_weights(model: Any, folder: Path) -> None:
    """Load weights saved by `save_pretrained` (full model, possibly sharded, or a LoRA adapter) into `model`."""
    from accelerate.utils import is_peft_model
    from safetensors.torch import load_file

    if is_peft_model(model):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
        return
    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    )
    state_dict: dict[str, torch.Tensor] = {}
    for name in files:
        state_dict.update(load_file(folder / name))
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    # `save_pretrained` writes a tied weight once; the missing name shares its storage with a loaded one.
    loaded = {tensor.data_ptr() for name, tensor in model.state_dict().items() if name in state_dict}
    params = model.state_dict()
    untied_missing = [name for name in missing if params[name].data_ptr() not in loaded]
    if unexpected or untied_missing:
        raise RuntimeError(
            f"Checkpoint {folder} does not match the model: missing {untied_missing}, unexpected {list(unexpected)}."
        )
