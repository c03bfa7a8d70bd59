"""The co-learning loop of ILR: several agents trained together, each with GRPO on its side of an Idea3 discussion.

[`ILRTrainer`] builds one [`~ilr.runtime.AgentRuntime`] per agent and runs the loop; one step, top to bottom:

    draw_questions -> select_modes -> interact -> score -> calibrate -> compute_advantages
        -> per agent: build_samples -> update_agent -> sync_backends -> log / save

Each stage is a method whose inputs and outputs are plain data; the work is done by the modules named in
docs/trainer.md ("Where each job lives"), which also explains batch sizes, old log-probabilities, determinism,
multi-process runs and DeepSpeed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from ilr.agent_pushers import AgentPushers
from ilr.calibration import AdvantageChange, advantage_change, calibrate_rewards
from ilr.checkpoints import (
    CHECKPOINT_PREFIX,
    IRT_STATE_NAME,
    TMP_CHECKPOINT_PREFIX,
    latest_checkpoint,
    publish,
    read_trainer_state,
    remove_unfinished,
    resolve_checkpoint,
    restore_rng_state,
    rotate_checkpoints,
    save_rng_state,
    start_checkpoint,
    write_trainer_state,
)
from ilr.difficulty import describe_modes, needs_irt, select_modes, update_ability
from ilr.interaction import Idea3Settings, run_idea3
from ilr.irt import estimate_irt, irt_cache_path, load_irt, run_key_fields, save_irt
from ilr.recipe_rules import check_ilr_trainer_settings
from ilr.runtime import AgentRuntime, build_accelerator, build_runtimes, optimizer_steps_per_step
from ilr.sampler import QuestionSampler, RngStream, seed_sequence, torch_seed
from ilr.samples import TrainingSample, build_samples
from ilr.scoring import CalibratedRewards, StepRewards, agent_advantages, reward_names, score_transcript
from ilr.training_metrics import append_metrics, nanmean, step_metrics, trim_metrics
from ilr.update import grpo_update


if TYPE_CHECKING:
    from datasets import Dataset

    from ilr.configs import AgentConfig, ILRConfig
    from ilr.difficulty import IRTEstimate
    from ilr.interaction import Transcript


__all__ = ["ILRTrainer", "StopSignals", "TrainingInterrupted", "latest_checkpoint"]

logger = logging.getLogger(__name__)


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

    # Compute a prompt shared by several samples of a micro-batch once ([`~ilr.logps.grouped_per_token_logps`]) where
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

        self.accelerator = build_accelerator(args, self.agents)
        self.questions_per_step = args.generation_batch_size // args.num_generations
        self.questions_per_process = self.questions_per_step // self.accelerator.num_processes
        self.num_training_steps = self._num_training_steps()
        self.idea3_settings = Idea3Settings.from_config(args, system_prompt=system_prompt)
        if "fuse" not in args.train_stages:  # its answers only feed the metrics: one per agent and question will do
            self.idea3_settings.fuse_samples = 1
        self.sampler = QuestionSampler(len(self.train_rows), args.seed)

        self.optimizer_steps_per_step = optimizer_steps_per_step(args, self.questions_per_process)
        self.runtimes: list[AgentRuntime] = build_runtimes(
            self.agents,
            args,
            self.accelerator,
            total_optimizer_steps=self.num_training_steps * self.optimizer_steps_per_step,
            models=models,
            tokenizers=tokenizers,
        )
        self.pushers = AgentPushers(self.agents, args, enabled=args.push_to_hub and self.accelerator.is_main_process)

        self.irt: IRTEstimate | None = None
        self.ability_window: list[dict[str, list]] = []
        self.global_step = 0
        self.total_generated_tokens = 0

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
        """Refuse, before any model is loaded, what this loop cannot train: the recipe's own checks are
        [`~ilr.recipe_rules.check_ilr_trainer_settings`]; here, what depends on the agents and the data given."""
        args = self.args
        if len(self.agents) < 2:
            raise ValueError(f"ILR trains two or more agents together (got {len(self.agents)}).")
        if args.method != "ilr":
            raise ValueError(f"`method: {args.method}` is trained by TRL's GRPOTrainer (see `ilr.train`), not here.")
        check_ilr_trainer_settings(args, self.agents)
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

    def _num_training_steps(self) -> int:
        if self.args.max_steps and self.args.max_steps > 0:
            return int(self.args.max_steps)
        return max(1, math.ceil(self.args.num_train_epochs * len(self.train_rows) / self.questions_per_step))

    # --- the agents, as lists (one entry per agent) ------------------------------------------------------------------
    @property
    def models(self) -> list[Any]:
        """The prepared training models (DDP-wrapped, or DeepSpeed engines)."""
        return [runtime.model for runtime in self.runtimes]

    @property
    def tokenizers(self) -> list[Any]:
        return [runtime.tokenizer for runtime in self.runtimes]

    @property
    def backends(self) -> list[Any]:
        """The generation backends."""
        return [runtime.backend for runtime in self.runtimes]

    @property
    def is_deepspeed(self) -> bool:
        """Whether the agents are trained by DeepSpeed engines (one per agent)."""
        return self.runtimes[0].is_deepspeed

    @contextlib.contextmanager
    def gathered_weights(self, agent_indices: Sequence[int] | None = None) -> Iterator[None]:
        """
        Context manager: the whole weights of the agents in `agent_indices` (default: all of them) at once, for
        generation (see [`~ilr.runtime.AgentRuntime.gathered_weights`]; only ZeRO-3 gathers). Collective: every
        process must enter the block. `ilr plan` counts the memory it holds.
        """
        indices = range(len(self.runtimes)) if agent_indices is None else agent_indices
        with contextlib.ExitStack() as stack:
            for index in indices:
                stack.enter_context(self.runtimes[index].gathered_weights())
            yield

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
        torch.manual_seed(torch_seed(self.args.seed, step, RngStream.STEP_TORCH))
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
            rng=seed_sequence(self.args.seed, step, RngStream.MODES),
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
        with self.generation_weights():
            transcript = run_idea3(
                questions,
                self.backends,
                coop_mask,
                self.idea3_settings,
                rng=seed_sequence(self.args.seed, step, RngStream.INTERACTION),
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
        """Every reward function on every completion of every agent and stage: [`~ilr.scoring.score_transcript`]."""
        return score_transcript(transcript, self.reward_funcs, self.reward_weights)

    # --- 4. calibration ----------------------------------------------------------------------------------------------
    def calibrate(self, rewards: StepRewards) -> CalibratedRewards:
        """
        Perception Calibration of each trained stage across the agents (skipped with `calibration: false`).

        Args:
            rewards ([`~ilr.scoring.StepRewards`]):
                The raw rewards.

        Returns:
            [`~ilr.scoring.CalibratedRewards`]
        """
        calibrated, clip_frac = {}, {}
        batch_wide = self.args.calibration_scope == "batch"  # peer statistics over the step's whole batch
        for stage in self.args.train_stages:
            raw = torch.as_tensor(rewards.total[stage], dtype=torch.float32)
            if not self.args.calibration:
                calibrated[stage], clip_frac[stage] = raw, 0.0
                continue
            raw, own = self._step_batch(raw, batch_wide)
            result = calibrate_rewards(raw, scope=self.args.calibration_scope, eps=self.args.calibration_eps)
            calibrated[stage], clip_frac[stage] = own(result.rewards), float(result.clip_frac)
        return CalibratedRewards(rewards=calibrated, clip_frac=clip_frac)

    def _step_batch(
        self, rewards: torch.Tensor, batch_wide: bool
    ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """
        For a statistic over the step's whole batch (`batch_wide`, several processes): `[m, Q_local, n]` of every
        process gathered into `[m, Q_local * num_processes, n]`, process after process, and the function that takes
        this process's questions back out of a result of that shape. Otherwise the rewards as they are and identity.
        """
        if not batch_wide or self.accelerator.num_processes == 1:
            return rewards, lambda result: result
        local_questions = rewards.size(1)
        by_question = rewards.permute(1, 0, 2).contiguous().to(self.accelerator.device)
        gathered = self.accelerator.gather(by_question).permute(1, 0, 2).cpu()
        start = self.accelerator.process_index * local_questions
        return gathered, lambda result: result[:, start : start + local_questions]

    # --- 5. advantages -----------------------------------------------------------------------------------------------
    def compute_advantages(
        self, calibrated: CalibratedRewards, raw: StepRewards | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, AdvantageChange]]:
        """
        GRPO advantages per agent, stage and question, from the calibrated rewards.

        With `scale_rewards: batch` and several processes, the std is taken over the whole batch gathered from every
        process, as TRL does, so that each process scales its questions alike.

        Args:
            calibrated ([`~ilr.scoring.CalibratedRewards`]):
                Rewards of the trained stages.
            raw ([`~ilr.scoring.StepRewards`], *optional*):
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
        scale = self.args.scale_rewards
        rewards, own = self._step_batch(rewards, batch_wide=scale == "batch")  # the std of the step's whole batch
        return own(agent_advantages(rewards, scale))

    # --- 6. per-agent samples and update -----------------------------------------------------------------------------
    def build_samples(
        self, transcript: Transcript, agent_index: int, advantages: dict[str, torch.Tensor], step: int
    ) -> list[TrainingSample]:
        """The completions one agent trains on, in training order: [`~ilr.samples.build_samples`]."""
        return build_samples(
            transcript, agent_index, advantages, self.args.train_stages, seed=self.args.seed, step=step
        )

    def update_agent(self, agent_index: int, samples: list[TrainingSample]) -> dict[str, float]:
        """GRPO updates of one agent on its own samples: [`~ilr.update.grpo_update`]."""
        return grpo_update(
            self.runtimes[agent_index], samples, self.args, share_prompt_forward=self.share_prompt_forward
        )

    def sync_backends(self) -> None:
        """Make every generation backend sample from its agent's updated weights."""
        # The transformers backend generates with the training model itself: nothing to copy, nothing to gather.
        # One agent's weights gathered at a time (ZeRO-3): the peak is the largest agent's, not all of them.
        for runtime in self.runtimes:
            runtime.sync_backend(gather=self.args.generation_backend != "transformers")

    # --- 7. Dynamic Interaction: difficulty and ability --------------------------------------------------------------
    def prepare_irt(self) -> IRTEstimate | None:
        """
        Difficulty and ability estimates for `interaction_mode: dynamic`, from the cache or a pre-pass
        ([`~ilr.irt.estimate_irt`]), cached under `difficulty_cache_dir` (default `<output_dir>/irt`), keyed by agents,
        data and settings.

        Returns:
            `IRTEstimate | None`: `None` under a fixed interaction mode.
        """
        if not needs_irt(self.args.interaction_mode):
            return None
        validation = (self.eval_rows or [])[: self.args.ability_samples]
        key_fields = run_key_fields(
            self.args,
            self.agents,
            self.train_rows,
            validation,
            dataset_name=self.dataset_name,
            data_files=self.data_files,
            system_prompt=self.system_prompt,
        )
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
                    estimate = estimate_irt(
                        self.args,
                        [agent.name for agent in self.agents],
                        self.train_rows,
                        validation,
                        self.backends,
                        system_prompt=self.system_prompt,
                    )
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
            window = gather_object(window)
        ids = [question_id for entry in window for question_id in entry["ids"]]
        accuracy = np.concatenate([np.asarray(entry["accuracy"], dtype=float) for entry in window])
        running = np.array([nanmean(accuracy[:, i]) for i in range(len(self.agents))])
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
        The step's metrics ([`~ilr.training_metrics.step_metrics`]) averaged across processes, with the running totals
        (`tokens/total_generated`, `train/epoch`).

        Returns:
            `dict[str, float]`
        """
        metrics = step_metrics(
            [agent.name for agent in self.agents],
            self.args.train_stages,
            list(self.reward_funcs),
            transcript,
            rewards,
            calibrated,
            adv_changes,
            update_metrics,
            timings,
            gamma=self.irt.gamma if self.irt is not None else None,
        )
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
            append_metrics(self.args.output_dir, metrics, step)

    def _every(self, interval: int | float | None) -> int:
        """A `logging_steps` / `save_steps` value in steps; below 1 it is a fraction of the run, as in transformers."""
        if not interval or interval <= 0:
            return self.num_training_steps
        return max(1, math.ceil(interval * self.num_training_steps)) if interval < 1 else int(interval)

    def _save_enabled(self) -> bool:
        return str(getattr(self.args.save_strategy, "value", self.args.save_strategy)) == "steps"

    # -----------------------------------------------------------------------------------------------------------------
    # Checkpoints (layout and helpers: `ilr.checkpoints`)
    # -----------------------------------------------------------------------------------------------------------------
    def save_checkpoint(self, step: int) -> Path:
        """
        Save everything needed to continue exactly, atomically: written to `tmp-checkpoint-<step>`, then renamed to
        `checkpoint-<step>` (layout: [`ilr.checkpoints`]). Pushes it to the Hub (`push_to_hub`) and keeps at most
        `save_total_limit` checkpoints.

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
            start_checkpoint(tmp)
        self.accelerator.wait_for_everyone()
        for runtime in self.runtimes:
            runtime.save_model(tmp / runtime.name)
            runtime.save_training_state(tmp / runtime.name)
        if main:
            write_trainer_state(
                tmp,
                {
                    "global_step": self.global_step,
                    "num_training_steps": self.num_training_steps,
                    "agents": [agent.name for agent in self.agents],
                    "sampler": self.sampler.state_dict(),
                    "ability_window": self.ability_window,
                    "total_generated_tokens": self.total_generated_tokens,
                },
            )
            save_rng_state(tmp)
            if self.irt is not None:
                save_irt(tmp / IRT_STATE_NAME, self.irt)
            publish(tmp, final)
            self.pushers.push_checkpoint(final, step)
            rotate_checkpoints(output_dir, self.args.save_total_limit)
        self.accelerator.wait_for_everyone()
        logger.info("Saved %s.", final)
        return final

    def load_checkpoint(self, checkpoint: str | os.PathLike) -> None:
        """
        Restore models, optimizers, schedulers, RNG states, sampler position and IRT estimate from a checkpoint.

        Args:
            checkpoint (`str` or `os.PathLike`):
                A `checkpoint-<step>` folder written by [`save_checkpoint`].
        """
        checkpoint = Path(checkpoint)
        state = read_trainer_state(checkpoint, [agent.name for agent in self.agents], self.num_training_steps)
        for runtime in self.runtimes:
            runtime.load_training_state(checkpoint / runtime.name)
        self.sync_backends()
        self.sampler.load_state_dict(state["sampler"])
        self.ability_window = state.get("ability_window", [])
        self.total_generated_tokens = state.get("total_generated_tokens", 0)
        self.global_step = int(state["global_step"])
        self.irt = load_irt(checkpoint / IRT_STATE_NAME) if (checkpoint / IRT_STATE_NAME).is_file() else None
        if self.irt is None and needs_irt(self.args.interaction_mode):
            self.irt = self.prepare_irt()
        restore_rng_state(checkpoint)
        self._trim_metrics(self.global_step)

    def _resolve_checkpoint(self, resume_from_checkpoint: str | bool | None) -> Path | None:
        output_dir = Path(self.args.output_dir)
        if self.accelerator.is_main_process:
            remove_unfinished(output_dir)
        self.accelerator.wait_for_everyone()
        return resolve_checkpoint(output_dir, resume_from_checkpoint)

    def _trim_metrics(self, step: int) -> None:
        if self.accelerator.is_main_process:
            trim_metrics(self.args.output_dir, step)

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
        for runtime in self.runtimes:
            runtime.save_model(output_dir / runtime.name)
            folders.append(output_dir / runtime.name)
        self.accelerator.wait_for_everyone()
        return folders

    # -----------------------------------------------------------------------------------------------------------------
    # The Hub
    # -----------------------------------------------------------------------------------------------------------------
    def push_final_models(self, folders: list[Path], recipe_path: str | os.PathLike | None = None) -> list[Any]:
        """
        Push each agent's final model with its model card to its `hub_model_id`, then wait for every queued push
        ([`~ilr.agent_pushers.AgentPushers.push_final`]). Failures are logged; the local files are never changed.

        Args:
            folders (`list[Path]`):
                From [`save_models`], one per agent.
            recipe_path (`str` or `os.PathLike`, *optional*):
                The recipe file, embedded in the cards (credentials removed).

        Returns:
            `list[PushResult]`: The pushes that failed (empty when all succeeded or nothing was pushed).
        """
        return self.pushers.push_final(
            folders,
            recipe_path=recipe_path,
            dataset_name=self.dataset_name,
            data_files=self.data_files,
            global_step=self.global_step,
            num_training_steps=self.num_training_steps,
        )

    def close_pushers(self) -> list[Any]:
        """Wait for every queued Hub push and stop the pushers; returns the pushes that failed."""
        return self.pushers.close()

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
