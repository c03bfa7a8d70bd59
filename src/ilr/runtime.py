"""One owner per trained agent: its model, reference model, tokenizer, optimizer, scheduler, generation backend and
accelerator, and every DeepSpeed/DDP branch of training it.

[`AgentRuntime`] is what the GRPO update ([`~ilr.update.grpo_update`]), the checkpoints and the loop call for one agent:
`backward`, `accumulation`, `optimizer_step`, `gathered_weights`, `sync_backend`, `save_model`, `save_training_state`,
`load_training_state`. Each method branches on DeepSpeed inside, so its callers never do. [`build_runtimes`] builds
one per agent, in the order DeepSpeed needs (docs/trainer.md, "DeepSpeed").
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, DistributedType, is_deepspeed_available, is_peft_model
from transformers import get_scheduler
from trl.models.utils import add_hooks, prepare_deepspeed, remove_hooks
from trl.trainer.utils import disable_dropout_in_model

from ilr.checkpoints import (
    DEEPSPEED_CHECKPOINT_TAG,
    OPTIMIZER_NAME,
    SCHEDULER_NAME,
    drop_tied_copies,
    load_weights,
)
from ilr.generation import build_backend, engine_kwargs
from ilr.models import load_model, load_tokenizer


if TYPE_CHECKING:
    from ilr.configs import AgentConfig, ILRConfig
    from ilr.samples import MicroBatch


__all__ = [
    "AgentRuntime",
    "build_accelerator",
    "build_optimizer",
    "build_runtimes",
    "build_scheduler",
    "deepspeed_plugins",
]


@dataclass(eq=False)
class AgentRuntime:
    """
    Everything one trained agent is made of at run time.

    Args:
        agent ([`~ilr.configs.AgentConfig`]):
            Its settings.
        accelerator (`Accelerator`):
            The run's accelerator: devices, processes, collectives, unwrapping and saving.
        model:
            The prepared training model: DDP-wrapped (or bare on one process), or the agent's DeepSpeed engine.
        tokenizer:
            Its tokenizer.
        optimizer:
            AdamW, prepared by Accelerate (under DeepSpeed its wrapper of the ZeRO optimizer).
        scheduler (*optional*):
            The learning-rate schedule, stepped once per optimizer step (not prepared by Accelerate).
        ref_model (*optional*):
            The frozen reference model for `beta > 0` (`None` for a LoRA agent, whose base model is the reference).
        backend (*optional*):
            Its generation backend ([`~ilr.generation.GenerationBackend`]).
        engine_accelerator (`Accelerator`, *optional*):
            Under DeepSpeed, the `Accelerator` that prepared this agent's engine (an `Accelerator` ties itself to the
            engine it prepared); `accelerator` otherwise.
    """

    agent: AgentConfig
    accelerator: Accelerator
    model: Any
    tokenizer: Any
    optimizer: Any = None
    scheduler: Any = None
    ref_model: Any | None = None
    backend: Any | None = None
    engine_accelerator: Accelerator | None = None

    @property
    def name(self) -> str:
        return self.agent.name

    @property
    def is_deepspeed(self) -> bool:
        """Whether the agent is trained by a DeepSpeed engine."""
        return self.accelerator.distributed_type == DistributedType.DEEPSPEED

    @property
    def is_zero3(self) -> bool:
        return self.is_deepspeed and self.accelerator.state.deepspeed_plugin.zero_stage == 3

    @property
    def unwrapped_model(self) -> Any:
        """The bare `PreTrainedModel` (or PEFT model) inside the DDP wrapper or engine."""
        return self.accelerator.unwrap_model(self.model)

    @property
    def pad_token_id(self) -> int:
        # Padding is masked out of attention and loss; any id works, the tokenizer's own keeps the model in vocab.
        tokenizer = self.tokenizer
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # --- training ----------------------------------------------------------------------------------------------------
    def accumulation(self, boundary: bool) -> contextlib.AbstractContextManager:
        """
        Context of one micro-batch's forward and backward inside an accumulation window; `boundary` on the last one.
        DDP skips the gradient all-reduce before the boundary (`no_sync`); a DeepSpeed engine is told where the
        window ends, since it is configured with `gradient_accumulation_steps: 1` and would otherwise take every
        backward as a boundary.
        """
        if self.is_deepspeed:
            self.model.set_gradient_accumulation_boundary(boundary)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if boundary else self.accelerator.no_sync(self.model)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a loss already normalised over its accumulation window."""
        if self.is_deepspeed:  # its own engine (gradient_accumulation_steps 1: the loss as it is)
            self.model.backward(loss, scale_wrt_gas=False)
        else:
            self.accelerator.backward(loss)

    def optimizer_step(self, max_grad_norm: float | None) -> float:
        """
        End of an accumulation window: clip the gradients to `max_grad_norm`, step the optimizer and the schedule,
        zero the gradients.

        Returns:
            `float`: The gradient norm before clipping (NaN when DeepSpeed does not report it).
        """
        if self.is_deepspeed:
            # The window's end is the engine's accumulation boundary: it reduces what is left, clips to
            # `gradient_clipping` (= max_grad_norm), steps and zeroes the gradients.
            self.model.step()
            grad_norm = self.model.get_global_grad_norm()  # before clipping, as `clip_grad_norm_` returns
            grad_norm = float("nan") if grad_norm is None else grad_norm
        else:
            max_norm = max_grad_norm if max_grad_norm and max_grad_norm > 0 else float("inf")
            grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()  # under DeepSpeed, Accelerate's wrapper does nothing here: the engine has stepped
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def ref_logps(self, batch: MicroBatch, logps_of: Callable[[Any, MicroBatch], torch.Tensor]) -> torch.Tensor:
        """Per-token log-probabilities of the reference policy (no gradient is taken by the caller)."""
        if self.ref_model is not None:
            return logps_of(self.ref_model, batch)
        # A LoRA agent: its base model, adapter switched off, is the reference (as in TRL).
        with self.unwrapped_model.disable_adapter():
            return logps_of(self.model, batch)

    # --- weights for generation ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def gathered_weights(self) -> Iterator[None]:
        """
        Context manager: the agent's whole weights for the duration of the block, for generation or a weight sync.
        Under ZeRO-3 the engine's partitioned parameters are gathered (`deepspeed.zero.GatheredParameters`) and its
        parameter-fetching hooks removed, as TRL's `unwrap_model_for_generation` does; otherwise it does nothing.
        Gathering is collective: every process must enter the block.
        """
        if not self.is_zero3:
            yield
            return
        import deepspeed  # optional (the `deepspeed` extra): only a ZeRO-3 launch reaches this line

        with deepspeed.zero.GatheredParameters(list(self.model.parameters())):
            remove_hooks(self.model)
            try:
                yield
            finally:
                add_hooks(self.model)

    def sync_backend(self, gather: bool) -> None:
        """Make the generation backend sample from the current weights (gathered first when `gather`, under ZeRO-3)."""
        with self.gathered_weights() if gather else contextlib.nullcontext():
            self.backend.update_weights(self.unwrapped_model)

    # --- saving and loading ----------------------------------------------------------------------------------------
    def save_model(self, folder: Path) -> None:
        """Save the model (or LoRA adapter) and tokenizer with `save_pretrained`. Collective under ZeRO-3."""
        state_dict = self.accelerator.get_state_dict(self.model)  # gathers shards (ZeRO-3) on every process
        if self.accelerator.is_main_process:
            unwrapped = self.unwrapped_model
            if self.is_deepspeed:  # its state dict holds copies: tied weights no longer share storage
                state_dict = drop_tied_copies(unwrapped, state_dict)
            unwrapped.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
            self.tokenizer.save_pretrained(folder)

    def save_training_state(self, folder: Path) -> None:
        """
        Save what continuing the training needs besides the model: the optimizer state (under DeepSpeed the engine's
        own checkpoint, `deepspeed/`: weights and every process's optimizer partition) and the schedule.
        """
        main = self.accelerator.is_main_process
        if self.is_deepspeed:  # ZeRO partitions the optimizer state: the engine writes every process's part
            self.model.save_checkpoint(folder, tag=DEEPSPEED_CHECKPOINT_TAG, save_latest=False)
        elif main:
            torch.save(self.optimizer.state_dict(), folder / OPTIMIZER_NAME)
        if main:
            torch.save(self.scheduler.state_dict(), folder / SCHEDULER_NAME)

    def load_training_state(self, folder: Path) -> None:
        """Restore weights, optimizer and schedule from a folder written by [`save_model`] and
        [`save_training_state`]."""
        self._check_checkpoint_kind(folder)
        if self.is_deepspeed:  # weights (the fp32 master copy under ZeRO) and this process's optimizer partition
            self.model.load_checkpoint(
                folder,
                tag=DEEPSPEED_CHECKPOINT_TAG,
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
                load_module_only=False,
            )
        else:
            load_weights(self.unwrapped_model, folder)
            self.optimizer.load_state_dict(torch.load(folder / OPTIMIZER_NAME, map_location="cpu", weights_only=True))
        self.scheduler.load_state_dict(torch.load(folder / SCHEDULER_NAME, weights_only=True))

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


# ---------------------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------------------
def build_accelerator(args: ILRConfig, agents: Sequence[AgentConfig]) -> Accelerator:
    """
    The run's `Accelerator`: mixed precision, trackers (`report_to`) and, under a DeepSpeed launch, one plugin per
    agent ([`deepspeed_plugins`]). Refuses FSDP, and a batch that does not split over the processes.

    Args:
        args ([`~ilr.configs.ILRConfig`]):
            The run's settings.
        agents (`Sequence[AgentConfig]`):
            The trained agents.

    Returns:
        `Accelerator`
    """
    report_to = [args.report_to] if isinstance(args.report_to, str) else list(args.report_to or [])
    log_with = [target for target in report_to if target != "none"] or None
    mixed_precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "no"
    accelerator = Accelerator(
        cpu=args.use_cpu,
        mixed_precision=mixed_precision,
        log_with=log_with,
        project_dir=args.output_dir,
        deepspeed_plugins=deepspeed_plugins(args, agents),
    )
    if accelerator.distributed_type == DistributedType.FSDP:
        raise NotImplementedError(
            "FSDP is not supported by the ILR trainer yet: its generation backends read the training models' "
            "full weights, which FSDP shards. Launch with recipes/accelerate_configs/zero3.yaml (sharded weights, "
            "gathered for generation) or ddp.yaml instead."
        )
    if args.generation_batch_size // args.num_generations % accelerator.num_processes:
        raise ValueError(
            f"Questions per step ({args.generation_batch_size // args.num_generations}) must split "
            f"evenly over {accelerator.num_processes} processes: adjust `generation_batch_size`."
        )
    return accelerator


def deepspeed_plugins(args: ILRConfig, agents: Sequence[AgentConfig]) -> dict[str, DeepSpeedPlugin] | None:
    """
    One `DeepSpeedPlugin` per agent when the run is launched with a DeepSpeed config (`ACCELERATE_USE_DEEPSPEED`),
    else `None`. Each is built from the launcher's settings (ZeRO stage, offload, `deepspeed_config_file`), then set
    for this loop: micro-batches of `per_device_train_batch_size`, no accumulation inside DeepSpeed (the loop keeps its
    own windows and loss normalisation), clipping to `max_grad_norm`, and under ZeRO-3 the whole weights gathered when
    a model is saved.
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    if not is_deepspeed_available():
        raise ImportError(
            "The run is launched with a DeepSpeed config: install it with `pip install -e .[deepspeed]`."
        )
    if args.use_cpu:
        raise ValueError(
            "The run is launched with a DeepSpeed config but the recipe sets `use_cpu: true`, with which Accelerate "
            "silently drops DeepSpeed: set `use_cpu: false` (without a GPU, DeepSpeed runs on the CPU anyway)."
        )
    if len({agent.name for agent in agents}) != len(agents):
        raise ValueError("Under DeepSpeed every agent needs its own `name` (it keys the agent's DeepSpeed plugin).")
    plugins = {}
    for agent in agents:
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


def build_optimizer(
    model: Any,
    agent: AgentConfig,
    args: ILRConfig,
    accelerator: Accelerator,
    engine_accelerator: Accelerator | None = None,
) -> tuple[Any, Any]:
    """
    The agent's AdamW (no weight decay on biases and normalisation weights, as transformers' Trainer), prepared.

    Args:
        model:
            The agent's model (prepared by `accelerator` unless under DeepSpeed).
        agent ([`~ilr.configs.AgentConfig`]):
            Its settings (`learning_rate` overrides the run's).
        args ([`~ilr.configs.ILRConfig`]):
            The run's settings.
        accelerator (`Accelerator`):
            The run's accelerator.
        engine_accelerator (`Accelerator`, *optional*):
            Under DeepSpeed, the agent's own `Accelerator`: it prepares model and optimizer together into the agent's
            engine (its plugin must be the selected one).

    Returns:
        `tuple`: The model (under DeepSpeed the engine that replaces it) and the prepared optimizer.
    """
    learning_rate = agent.learning_rate or args.learning_rate
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"Agent `{agent.name}` has no trainable parameter.")
    # A weight partitioned as it loaded (ZeRO-3 init) keeps its real shape in `ds_shape`.
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
    if engine_accelerator is None:
        return model, accelerator.prepare_optimizer(optimizer)
    # The engine replaces the model; the returned optimizer wraps the ZeRO optimizer, whose param groups are the AdamW
    # groups above (so the learning-rate scheduler built on it sets the lr ZeRO steps with).
    return engine_accelerator.prepare(model, optimizer)


def build_scheduler(optimizer: Any, args: ILRConfig, total_steps: int) -> Any:
    """
    The learning-rate schedule over `total_steps` optimizer steps (`lr_scheduler_type`, warm-up, kwargs). Not prepared
    by Accelerate: it steps once per optimizer step on every process (Accelerate would step it num_processes times),
    and its length is known exactly.
    """
    return get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=args.get_warmup_steps(total_steps),
        num_training_steps=total_steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs or {},
    )


def optimizer_steps_per_step(args: ILRConfig, questions_per_process: int) -> int:
    """Optimizer steps each agent takes per training step (fixed by the settings): its completions of the trained
    stages, cut into micro-batches, grouped into accumulation windows, `num_iterations` times."""
    per_question = {"share": args.num_generations, "fuse": args.num_generations, "analyse": args.analysis_samples}
    samples = questions_per_process * sum(per_question[stage] for stage in args.train_stages)
    micro_batches = math.ceil(samples / args.per_device_train_batch_size)
    return args.num_iterations * math.ceil(micro_batches / args.gradient_accumulation_steps)


def build_runtimes(
    agents: Sequence[AgentConfig],
    args: ILRConfig,
    accelerator: Accelerator,
    *,
    total_optimizer_steps: int,
    models: list[Any] | None = None,
    tokenizers: list[Any] | None = None,
) -> list[AgentRuntime]:
    """
    One [`AgentRuntime`] per agent, complete: tokenizers, models, optimizers (under DeepSpeed the engines), reference
    models, schedules, generation backends. Each phase runs over every agent before the next, as DeepSpeed needs:
    every agent's plugin is selected while its model loads (ZeRO-3 `zero3_init_flag` partitions as it loads) and while
    its engine is prepared, and reference engines are prepared after the trained ones.

    Args:
        agents (`Sequence[AgentConfig]`):
            The trained agents.
        args ([`~ilr.configs.ILRConfig`]):
            The run's settings.
        accelerator (`Accelerator`):
            From [`build_accelerator`].
        total_optimizer_steps (`int`):
            Length of each learning-rate schedule.
        models (`list`, *optional*):
            Training models, one per agent; loaded with [`~ilr.models.load_model`] (LoRA applied) when missing.
        tokenizers (`list`, *optional*):
            Tokenizers, one per agent; loaded with [`~ilr.models.load_tokenizer`] when missing.

    Returns:
        `list[AgentRuntime]`
    """
    is_deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    # Under DeepSpeed one `Accelerator` per agent, each preparing its agent's engine, sharing the first one's state
    # and plugins (an `Accelerator` ties itself to the engine it prepared); else the run's one prepares everything.
    engine_accelerators = (
        [accelerator] + [Accelerator(cpu=args.use_cpu) for _ in agents[1:]] if is_deepspeed else [None] * len(agents)
    )

    def select_plugin(agent: AgentConfig) -> None:
        if is_deepspeed:
            accelerator.state.select_deepspeed_plugin(agent.name)

    if tokenizers is not None and len(tokenizers) != len(agents):
        raise ValueError(f"Got {len(tokenizers)} tokenizers for {len(agents)} agents.")
    tokenizers = list(tokenizers) if tokenizers is not None else [load_tokenizer(agent) for agent in agents]
    if models is not None and len(models) != len(agents):
        raise ValueError(f"Got {len(models)} models for {len(agents)} agents.")
    prepared = []
    for index, agent in enumerate(agents):
        select_plugin(agent)  # ZeRO-3 with `zero3_init_flag` partitions the weights as they load
        model = models[index] if models is not None else load_model(agent, for_training=True)
        model.train()
        if args.gradient_checkpointing:
            kwargs = args.gradient_checkpointing_kwargs or {"use_reentrant": False}
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            model.config.use_cache = False
        if args.disable_dropout:
            disable_dropout_in_model(model)
        # Under DeepSpeed a model is prepared together with its optimizer, into its engine (`build_optimizer`).
        prepared.append(model if is_deepspeed else accelerator.prepare_model(model))

    runtimes = []
    for agent, model, tokenizer, engine_accelerator in zip(agents, prepared, tokenizers, engine_accelerators):
        select_plugin(agent)
        model, optimizer = build_optimizer(model, agent, args, accelerator, engine_accelerator)
        runtimes.append(
            AgentRuntime(
                agent=agent,
                accelerator=accelerator,
                model=model,
                tokenizer=tokenizer,
                optimizer=optimizer,
                engine_accelerator=engine_accelerator or accelerator,
            )
        )
    # Frozen reference models for the KL term (`beta > 0`); a LoRA agent uses its base model, adapter off.
    for runtime in runtimes:
        if args.beta == 0.0 or is_peft_model(runtime.unwrapped_model):
            continue
        select_plugin(runtime.agent)
        ref = load_model(runtime.agent).requires_grad_(False)
        # As TRL: an inference engine, partitioned like the trained model under ZeRO-3, whole (stage 0) else.
        runtime.ref_model = (
            prepare_deepspeed(ref, accelerator)
            if is_deepspeed
            else accelerator.prepare_model(ref, evaluation_mode=True)
        )
    for runtime in runtimes:
        runtime.scheduler = build_scheduler(runtime.optimizer, args, total_optimizer_steps)
    for runtime in runtimes:
        runtime.backend = _build_backend(runtime, args, num_agents=len(agents))
    return runtimes


def _build_backend(runtime: AgentRuntime, args: ILRConfig, num_agents: int) -> Any:
    kwargs = engine_kwargs(args, num_agents)  # every agent's engine gets a share of the GPU
    # A vLLM engine loads the training weights as it starts: whole ones (ZeRO-3), one agent's at a time.
    gather = args.generation_backend != "transformers"
    with runtime.gathered_weights() if gather else contextlib.nullcontext():
        backend = build_backend(
            runtime.agent,
            args.generation_backend,
            model=runtime.unwrapped_model,
            tokenizer=runtime.tokenizer,
            **kwargs,
        )
    backend.max_retries = args.generation_retries
    return backend
