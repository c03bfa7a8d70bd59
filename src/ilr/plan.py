"""Memory and throughput plan of a recipe on GPUs, computed from the models' configs alone (`ilr plan`).

Per GPU and per agent: model states (parameters, gradients, optimizer) for the distribution in use (DeepSpeed's own
ZeRO estimators' formulas, DDP, LoRA), activations of one update micro-batch under gradient checkpointing, weights
and KV cache of every vLLM engine (vLLM's per-token KV size), for the colocated and the server layouts, phase by
phase (generation, update, weight sync). A rough step time follows from stated throughput assumptions. Nothing is
downloaded beyond the models' `config.json`; no weights are loaded. The assumptions are listed in the README
("Will it fit? `ilr plan`").
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml


GB = 1e9
DTYPE_BYTES = {"float32": 4, "fp32": 4, "float": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "half": 2}
# Per training process: CUDA context, cuBLAS/NCCL workspaces and allocator fragmentation.
TRAINING_RUNTIME_GB = 3.0
# Per vLLM engine, beside its profiled activations: CUDA graphs and non-torch allocations (NCCL, cuBLAS).
ENGINE_RUNTIME_GB = 1.0
# What an engine put to sleep (weights offloaded or discarded, KV cache freed) still holds on the GPU.
SLEEPING_ENGINE_GB = 0.5
# Tokens of a prompt beside the texts it quotes: chat template, system header, Idea3 instructions (the longest
# template in `ilr/prompts` is ~820 characters, ~200 tokens).
TEMPLATE_TOKENS = 256
# Bytes per logit element kept while the loss runs: the bf16 logits, their float32 copy and the temperature-scaled
# float32 copy exist together once (`grpo.per_token_logps`), and the backward holds a float32 gradient.
LOGIT_BYTES = 10
# vLLM settings this project uses: `VLLMColocateBackend` passes `max_num_batched_tokens=4096`; `max_num_seqs` and a
# server's `max_num_batched_tokens` are vLLM's defaults; `trl vllm-serve` defaults to `gpu_memory_utilization` 0.9.
COLOCATE_MAX_BATCHED_TOKENS = 4096
SERVER_MAX_BATCHED_TOKENS = 8192
VLLM_MAX_NUM_SEQS = 256
SERVER_GPU_MEMORY_UTILIZATION = 0.9
# Throughput assumptions of the step-time estimate (rough by design: the first GPU run checks them).
DECODE_BANDWIDTH_EFFICIENCY = 0.6  # fraction of HBM bandwidth a decode step reaches (weights + KV read per token)
PREFILL_MFU = 0.5  # model FLOPs utilisation of prefill
TRAIN_MFU = 0.35  # model FLOPs utilisation of the update (forward + backward)


class PlanError(ValueError):
    """The plan cannot be computed (an unknown accelerate config, a model config that cannot be read)."""


# ---------------------------------------------------------------------------------------------------------------------
# Inputs: model shapes, distribution, hardware
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """
    What the plan needs to know about a model, read from its config.

    Args:
        num_parameters (`int`):
            Parameters, shared (tied) ones counted once, as DeepSpeed's `model_to_params` counts them.
        largest_layer_parameters (`int`):
            Parameters of the largest module (non-recursive), DeepSpeed's `largest_layer_params`.
        hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim, vocab_size (`int`):
            Architecture.
        max_position_embeddings (`int`):
            The model's context length (vLLM's default `max_model_len`).
        linear_shapes (`tuple[tuple[str, int, int], ...]`):
            `(module name, in_features, out_features)` of every linear layer except the LM head (LoRA sizes).
        dtype (`str`):
            The checkpoint's dtype (`torch_dtype` of the config), used when an agent asks for `auto`.
    """

    num_parameters: int
    largest_layer_parameters: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    linear_shapes: tuple[tuple[str, int, int], ...] = ()
    dtype: str = "bfloat16"

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """
        Count parameters on the meta device (no memory, any architecture transformers knows) and read the shapes.

        Args:
            config (`transformers.PretrainedConfig`):
                The model's config.

        Returns:
            [`ModelShape`]
        """
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        total = sum({id(p): p.numel() for p in model.parameters()}.values())
        largest = max(sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules())
        head = model.get_output_embeddings()
        linears = tuple(
            (name, module.in_features, module.out_features)
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head
        )
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        dtype = str(getattr(text, "dtype", None) or "bfloat16")
        return cls(
            num_parameters=total,
            largest_layer_parameters=largest,
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_layers=text.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            vocab_size=text.vocab_size,
            max_position_embeddings=text.max_position_embeddings,
            linear_shapes=linears,
            dtype=dtype.removeprefix("torch."),
        )

    def kv_bytes_per_token(self, dtype_bytes: int, tensor_parallel: int = 1) -> int:
        """
        KV-cache bytes of one token on one GPU: keys and values of every layer, as vLLM sizes its cache
        (`FullAttentionSpec.page_size_bytes` = 2 x block_size x num_kv_heads x head_size x dtype bytes, per layer).

        Args:
            dtype_bytes (`int`):
                Bytes per element of the cache (the model's dtype by default in vLLM).
            tensor_parallel (`int`, *optional*, defaults to `1`):
                vLLM splits the KV heads over tensor-parallel ranks (replicating them when there are fewer heads).

        Returns:
            `int`
        """
        heads_per_gpu = max(1, self.num_kv_heads // tensor_parallel)
        return 2 * self.num_layers * heads_per_gpu * self.head_dim * dtype_bytes

    def lora_parameters(self, rank: int, target_modules: Sequence[str] | str | None) -> int:
        """Trainable parameters of LoRA adapters of `rank` on the target linear layers (PEFT's defaults for Llama
        and Qwen2: `q_proj`, `v_proj`; `all-linear`: every linear layer but the LM head)."""
        if target_modules is None:
            targets = {"q_proj", "v_proj"}
        elif isinstance(target_modules, str):
            targets = None if target_modules == "all-linear" else {target_modules}
        else:
            targets = set(target_modules)
        return sum(
            rank * (fan_in + fan_out)
            for name, fan_in, fan_out in self.linear_shapes
            if targets is None or name.rsplit(".", 1)[-1] in targets
        )


ZERO_KINDS = ("zero1", "zero2", "zero3")


@dataclass(frozen=True)
class Distribution:
    """
    How training is distributed, read from an accelerate config file (or from `accelerate launch`'s environment).

    Args:
        kind (`str`):
            `single` (one process), `ddp`, `zero1`, `zero2`, `zero3` or `fsdp`.
        num_processes (`int`):
            Training processes (GPUs) in the config.
        offload_optimizer (`bool`), offload_params (`bool`):
            DeepSpeed's `offload_optimizer_device` / `offload_param_device` set to `cpu` (or `nvme`).
    """

    kind: str = "single"
    num_processes: int = 1
    offload_optimizer: bool = False
    offload_params: bool = False

    @classmethod
    def from_accelerate_config(cls, path: str | os.PathLike | None) -> Distribution:
        """
        Args:
            path (`str`, *optional*):
                An accelerate config YAML (`recipes/accelerate_configs/*.yaml`); `None` means one process.
        """
        if path is None:
            return cls()
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"--accelerate_config {path!r} does not exist: pass e.g. recipes/accelerate_configs/zero3.yaml."
            )
        with open(path, encoding="utf-8") as handle:
            config = yaml.safe_load(handle) or {}
        deepspeed = config.get("deepspeed_config") or {}
        processes = int(config.get("num_processes", 1))
        kind = {"NO": "single", "MULTI_GPU": "ddp", "FSDP": "fsdp", "DEEPSPEED": "zero"}.get(
            str(config.get("distributed_type", "NO"))
        )
        if kind is None:
            raise PlanError(f"Unknown `distributed_type` {config.get('distributed_type')!r} in {path}.")
        if kind == "zero":
            stage = deepspeed.get("zero_stage")
            if stage not in (1, 2, 3):
                raise PlanError(f"{path}: `deepspeed_config.zero_stage` must be 1, 2 or 3 for a plan (got {stage!r}).")
            kind = f"zero{stage}"
        return cls(
            kind=kind,
            num_processes=processes,
            offload_optimizer=str(deepspeed.get("offload_optimizer_device", "none")) not in ("none", "None"),
            offload_params=str(deepspeed.get("offload_param_device", "none")) not in ("none", "None"),
        )

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Distribution:
        """The distribution of the running `accelerate launch` (its `ACCELERATE_*` and `WORLD_SIZE` variables)."""
        environ = os.environ if environ is None else environ
        processes = int(environ.get("WORLD_SIZE", "1"))
        truthy = ("1", "true", "yes")
        if environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in truthy:
            return cls(
                kind=f"zero{int(environ.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '2'))}",
                num_processes=processes,
                offload_optimizer=environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none") != "none",
                offload_params=environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none") != "none",
            )
        if environ.get("ACCELERATE_USE_FSDP", "").lower() in truthy:
            return cls(kind="fsdp", num_processes=processes)
        return cls(kind="ddp" if processes > 1 else "single", num_processes=processes)


@dataclass(frozen=True)
class Hardware:
    """
    The GPUs a recipe runs on.

    Args:
        num_gpus (`int`):
            All GPUs of the job (training plus, in the server layout, the vLLM servers').
        gpu_memory_gb (`float`):
            Memory of one GPU in GB (1e9 bytes): 80 for an H100 80GB, 141 for an H200.
        tflops (`float`, *optional*, defaults to `989`):
            Dense bf16 peak of one GPU (H100 SXM and H200: 989).
        bandwidth_tbps (`float`, *optional*, defaults to `3.35`):
            HBM bandwidth of one GPU in TB/s (H100 SXM 3.35, H200 4.8).
        vllm_gpus_per_agent (`int`, *optional*, defaults to `1`):
            Server layout: GPUs of each agent's `trl vllm-serve` (its tensor parallelism), as in
            `recipes/slurm/train_ilr.slurm`.
    """

    num_gpus: int
    gpu_memory_gb: float
    tflops: float = 989.0
    bandwidth_tbps: float = 3.35
    vllm_gpus_per_agent: int = 1


# ---------------------------------------------------------------------------------------------------------------------
# Memory of one training process
# ---------------------------------------------------------------------------------------------------------------------
def model_state_bytes(
    num_parameters: int,
    largest_layer_parameters: int,
    distribution: Distribution,
    num_processes: int,
    *,
    dtype_bytes: int = 2,
    trainable_parameters: int | None = None,
    on_gpu: bool = True,
) -> dict[str, int]:
    """
    Parameters, gradients and optimizer states (AdamW) of one model on one training process.

    DeepSpeed (bf16 mixed precision): the formulas of DeepSpeed's own estimators,
    `deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs` (`2P + 18P/N`: 16-bit parameters,
    then 16-bit and 32-bit gradients, 32-bit master weights and both Adam moments partitioned) and
    `stage3.estimate_zero3_model_states_mem_needs` (`18P/N + 4 x largest layer`), with their CPU-offload variants.
    Elsewhere the optimizer is `torch.optim.AdamW` on the model's own dtype: parameters, gradients, two moments and,
    on a GPU, one moment-sized temporary of the multi-tensor step; DDP keeps a second copy of the gradients in its
    all-reduce buckets. FSDP shards all of it like ZeRO-3.

    Args:
        num_parameters (`int`):
            All parameters of the model.
        largest_layer_parameters (`int`):
            Parameters of its largest module.
        distribution ([`Distribution`]):
            How training is distributed.
        num_processes (`int`):
            Training processes the states are partitioned over.
        dtype_bytes (`int`, *optional*, defaults to `2`):
            Bytes per parameter of the loaded model.
        trainable_parameters (`int`, *optional*):
            LoRA: the adapters' parameters; the base model's are frozen (no gradient, no optimizer state).
        on_gpu (`bool`, *optional*, defaults to `True`):
            `False` on CPU, where AdamW loops over tensors (its temporary is one tensor's size, left out).

    Returns:
        `dict[str, int]`: bytes of `parameters`, `gradients`, `optimizer` and `zero_buffers`.
    """
    trainable = num_parameters if trainable_parameters is None else trainable_parameters
    frozen = num_parameters - trainable
    n = max(1, num_processes)
    kind = distribution.kind
    if kind in ZERO_KINDS:
        if kind == "zero3":
            if distribution.offload_params:
                states = {"parameters": 0, "gradients": 0, "optimizer": 0}
            elif distribution.offload_optimizer:
                states = {"parameters": 2 * trainable // n, "gradients": 0, "optimizer": 0}
            else:
                states = {
                    "parameters": 2 * trainable // n,
                    "gradients": 4 * trainable // n,
                    "optimizer": 12 * trainable // n,
                }
            states["parameters"] += 0 if distribution.offload_params else dtype_bytes * frozen // n
            states["zero_buffers"] = 4 * largest_layer_parameters
            return states
        if distribution.offload_optimizer:
            return {
                "parameters": 2 * trainable + dtype_bytes * frozen,
                "gradients": 0,
                "optimizer": 0,
                "zero_buffers": 0,
            }
        return {
            "parameters": 2 * trainable + dtype_bytes * frozen,
            "gradients": 6 * trainable // n,
            "optimizer": 12 * trainable // n,
            "zero_buffers": 0,
        }
    moments = 2 * dtype_bytes * trainable
    temporary = dtype_bytes * trainable if on_gpu else 0
    if kind == "fsdp":
        return {
            "parameters": dtype_bytes * num_parameters // n,
            "gradients": dtype_bytes * trainable // n,
            "optimizer": (moments + temporary) // n,
            "zero_buffers": 2 * dtype_bytes * largest_layer_parameters,
        }
    buckets = 2 if kind == "ddp" else 1
    return {
        "parameters": dtype_bytes * num_parameters,
        "gradients": buckets * dtype_bytes * trainable,
        "optimizer": moments + temporary,
        "zero_buffers": 0,
    }


def activation_bytes(
    shape: ModelShape,
    rows: int,
    sequence_length: int,
    completion_length: int,
    *,
    gradient_checkpointing: bool,
    dtype_bytes: int = 2,
    eager_attention: bool = False,
) -> dict[str, int]:
    """
    Activations of one forward/backward pass over a micro-batch of `rows` padded rows.

    A decoder layer (RMSNorm in float32, SwiGLU MLP, fused attention without the L x L matrix) saves per token about
    `9h + 2 kv + 4i` values (h hidden, kv the key/value width, i the MLP width). Under gradient checkpointing only
    each layer's input is kept, and one layer is recomputed at a time in the backward. The loss needs the logits of
    the completion positions (`logits_to_keep`), kept as bf16 and float32 copies and a float32 gradient
    (`LOGIT_BYTES` per element).

    Args:
        shape ([`ModelShape`]):
            The model.
        rows (`int`):
            Rows of the micro-batch (`per_device_train_batch_size`).
        sequence_length (`int`):
            Padded prompt + completion length.
        completion_length (`int`):
            Completion positions scored by the loss.
        gradient_checkpointing (`bool`):
            Whether layers are recomputed in the backward.
        dtype_bytes (`int`, *optional*, defaults to `2`):
            Bytes per activation element.
        eager_attention (`bool`, *optional*, defaults to `False`):
            `attn_implementation: eager` materialises the attention scores and probabilities.

    Returns:
        `dict[str, int]`: bytes of `checkpoints` (kept layer inputs), `layer` (the layers whose activations are alive)
        and `logits`.
    """
    tokens = rows * sequence_length
    kv_width = shape.num_kv_heads * shape.head_dim
    per_token_layer = dtype_bytes * (9 * shape.hidden_size + 2 * kv_width + 4 * shape.intermediate_size)
    per_layer = tokens * per_token_layer
    if eager_attention:
        per_layer += 2 * dtype_bytes * rows * shape.num_heads * sequence_length**2
    if gradient_checkpointing:
        checkpoints = shape.num_layers * tokens * shape.hidden_size * dtype_bytes
        layers = per_layer
    else:
        checkpoints, layers = 0, shape.num_layers * per_layer
    logits = rows * (completion_length + 1) * shape.vocab_size * LOGIT_BYTES
    return {"checkpoints": checkpoints, "layer": layers, "logits": logits}


# ---------------------------------------------------------------------------------------------------------------------
# The plan of a recipe
# ---------------------------------------------------------------------------------------------------------------------
PHASES = ("generation", "update", "weight sync")


@dataclass
class MemoryTerm:
    """One row of the plan: bytes resident on one GPU of `device` during `phases`, and the setting that sizes it."""

    device: str
    agent: str
    name: str
    bytes: int
    phases: tuple[str, ...]
    setting: str


@dataclass
class Plan:
    """
    A recipe's memory plan per GPU and phase, its engines' KV-cache checks and the step estimate.

    Attributes:
        layout (`str`): `colocate` (engines on the training GPUs), `server` (one `trl vllm-serve` per agent on its own
            GPUs) or `transformers` (generation with the training models).
        gpu_memory (`int`): bytes of one GPU.
        terms (`list[MemoryTerm]`): every memory term.
        problems (`list[str]`): what does not fit, each naming the setting to change; empty when the plan fits.
        notes (`list[str]`): things that fit but deserve a look (KV cache below the batch's need, ...).
        estimate (`dict[str, float]`): questions, generated tokens and rough seconds per step.
    """

    layout: str
    gpu_memory: int
    num_training_gpus: int
    terms: list[MemoryTerm] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    estimate: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return not self.problems

    def devices(self) -> list[str]:
        return list(dict.fromkeys(term.device for term in self.terms))

    def total(self, device: str, phase: str) -> int:
        """Bytes resident on one GPU of `device` during `phase`."""
        return sum(term.bytes for term in self.terms if term.device == device and phase in term.phases)

    def peak(self, device: str) -> tuple[int, str]:
        """The largest phase total of `device`, and the phase."""
        return max((self.total(device, phase), phase) for phase in PHASES)

    def largest_term(self, device: str, phase: str) -> MemoryTerm:
        """The largest term of `device` during `phase` that a setting controls (not the fixed runtime reserve)."""
        terms = [t for t in self.terms if t.device == device and phase in t.phases and t.setting != "-"]
        return max(terms, key=lambda term: term.bytes)

    def render(self) -> str:
        """The plan as markdown: one table per GPU kind (terms x phases), the totals, the estimate and the verdict."""
        lines = []
        for device in self.devices():
            lines += [
                f"### {device} ({self.gpu_memory / GB:.0f} GB)",
                "",
                "| agent | term | GB | " + " | ".join(PHASES) + " |",
            ]
            lines.append("|---|---|---:|" + "---|" * len(PHASES))
            for term in (t for t in self.terms if t.device == device):
                marks = " | ".join("x" if phase in term.phases else "" for phase in PHASES)
                lines.append(f"| {term.agent} | {term.name} | {term.bytes / GB:.1f} | {marks} |")
            totals = " | ".join(f"**{self.total(device, phase) / GB:.1f}**" for phase in PHASES)
            lines += [f"| | **total** | | {totals} |", ""]
        estimate = self.estimate
        lines.append(
            f"Per step: {estimate['questions_per_step']:.0f} questions, at most {estimate['generated_tokens'] / 1e6:.2f}M "
            f"generated tokens (every completion at its length limit); rough step time {estimate['step_seconds']:.0f} s "
            f"(generation {estimate['generation_seconds']:.0f} s, update {estimate['update_seconds']:.0f} s)."
        )
        for note in self.notes:
            lines.append(f"- note: {note}")
        verdict = "FITS" if self.fits else "DOES NOT FIT"
        lines.append(
            f"\n{verdict}: "
            + "; ".join(
                f"{device} peak {self.peak(device)[0] / GB:.1f} of {self.gpu_memory / GB:.0f} GB ({self.peak(device)[1]})"
                for device in self.devices()
            )
        )
        lines += [f"- {problem}" for problem in self.problems]
        return "\n".join(lines)


def _dtype_bytes(agent: Any, shape: ModelShape) -> int:
    dtype = agent.dtype if agent.dtype not in (None, "auto") else shape.dtype
    return DTYPE_BYTES.get(str(dtype).lower().removeprefix("torch."), 2)


def _questions_per_step(training_args: Any, num_processes: int, explicit_generation_batch: bool) -> int:
    """Questions per step, as TRL sizes the generation batch for `num_processes` processes."""
    if explicit_generation_batch:
        batch = training_args.generation_batch_size
    else:
        batch = training_args.per_device_train_batch_size * num_processes * training_args.steps_per_generation
    return batch // training_args.num_generations


def stage_lengths(
    training_args: Any, num_agents: int, question_tokens: int, samples: int | None = None
) -> dict[str, tuple[int, int, int]]:
    """
    `(prompt tokens, completion tokens, samples per question)` of each Idea3 stage, at their limits.

    The share prompt is the question; the analyse prompt adds every agent's shared idea, the fuse prompt the ideas and
    the analyses, each cut to `peer_max_tokens` (and never longer than the completion that produced it). The GRPO
    baseline has the share stage only, with `samples` completions per question when given (compute-matched).
    """
    args = training_args
    completion = args.max_completion_length
    analysis = args.max_analysis_length or completion
    idea = min(args.peer_max_tokens, completion)
    critique = min(args.peer_max_tokens, analysis)
    share_prompt = question_tokens + TEMPLATE_TOKENS
    if args.method == "grpo":
        return {"share": (share_prompt, completion, samples or args.num_generations)}
    fuse_samples = args.num_generations if "fuse" in args.train_stages else 1
    return {
        "share": (share_prompt, completion, args.num_generations),
        "analyse": (share_prompt + num_agents * idea, analysis, args.analysis_samples),
        "fuse": (share_prompt + num_agents * (idea + critique), completion, fuse_samples),
    }


def build_plan(
    agents: Sequence[Any],
    training_args: Any,
    shapes: Mapping[str, ModelShape],
    distribution: Distribution,
    hardware: Hardware,
    *,
    question_tokens: int = 256,
    explicit_generation_batch: bool = False,
) -> Plan:
    """
    The memory and throughput plan of a parsed recipe.

    Args:
        agents (`list[AgentConfig]`):
            The recipe's agents.
        training_args ([`~ilr.configs.ILRConfig`]):
            The recipe's training settings.
        shapes (`dict[str, ModelShape]`):
            Shape of each agent's model, by `model_name_or_path`.
        distribution ([`Distribution`]):
            From the accelerate config.
        hardware ([`Hardware`]):
            GPUs and their memory.
        question_tokens (`int`, *optional*, defaults to `256`):
            Tokens of the longest question the plan provisions for (MATH problems: a few hundred at most).
        explicit_generation_batch (`bool`, *optional*, defaults to `False`):
            The recipe sets `generation_batch_size` itself (else TRL derives it from the number of processes).

    Returns:
        [`Plan`]
    """
    args = training_args
    layout = {"vllm": "colocate", "vllm_server": "server"}.get(args.generation_backend, "transformers")
    serving_gpus = len(agents) * hardware.vllm_gpus_per_agent if layout == "server" else 0
    train_gpus = hardware.num_gpus - serving_gpus
    plan = Plan(layout=layout, gpu_memory=int(hardware.gpu_memory_gb * GB), num_training_gpus=max(0, train_gpus))
    if train_gpus < 1:
        plan.problems.append(
            f"{hardware.num_gpus} GPU(s) leave none for training after {serving_gpus} serving GPU(s) "
            f"({len(agents)} agents x {hardware.vllm_gpus_per_agent}): use more GPUs or `--vllm_gpus_per_agent 1`."
        )
        return plan
    if distribution.kind == "fsdp" and args.method == "ilr":
        plan.problems.append("The ILR trainer refuses FSDP: use recipes/accelerate_configs/zero3.yaml for sharding.")
    questions = _questions_per_step(args, train_gpus, explicit_generation_batch)
    samples = None
    if args.method == "grpo" and args.compute_matched:
        from ilr.compute import matched_generations

        samples, _ = matched_generations(args, questions, train_gpus)
    stages = stage_lengths(args, len(agents), question_tokens, samples)
    trained = {stage: stages[stage] for stage in (["share"] if args.method == "grpo" else args.train_stages)}
    plan.settings = {
        "questions_per_step": questions,
        "questions_per_gpu": max(1, questions // train_gpus),
        "longest_trained_row": max(prompt + completion for prompt, completion, _ in trained.values()),
        "longest_completion": max(completion for _, completion, _ in trained.values()),
        "longest_context": max(prompt + completion for prompt, completion, _ in stages.values()),
        "training_gpus": train_gpus,
        "serving_gpus": serving_gpus,
        "agents": len(agents),
    }
    _add_training_terms(plan, agents, args, shapes, distribution)
    generation_seconds = sum(_add_engine_terms(plan, agent, args, shapes, stages, hardware) for agent in agents)
    if layout == "transformers":
        _keep_largest_generate_cache(plan)
    for device in plan.devices():
        peak, phase = plan.peak(device)
        if peak > plan.gpu_memory:
            largest = plan.largest_term(device, phase)
            plan.problems.append(
                f"{device}: {peak / GB:.1f} GB during {phase} exceeds {plan.gpu_memory / GB:.0f} GB; largest term: "
                f"{largest.name} of `{largest.agent}` ({largest.bytes / GB:.1f} GB): change {largest.setting}"
                + _layout_hint(layout, bool(args.vllm_enable_sleep_mode), phase)
            )
    # Update FLOPs: 6 per parameter and trained token (forward + backward), 2 more when checkpointed layers rerun.
    trained_tokens = questions * sum(
        samples * (prompt + completion) for prompt, completion, samples in trained.values()
    )
    flops_per_token = (8 if args.gradient_checkpointing else 6) * args.num_iterations
    update_flops = sum(flops_per_token * shapes[a.model_name_or_path].num_parameters * trained_tokens for a in agents)
    update_seconds = update_flops / (train_gpus * hardware.tflops * 1e12 * TRAIN_MFU)
    plan.estimate = {
        "questions_per_step": questions,
        "generated_tokens": questions * len(agents) * sum(n * completion for _, completion, n in stages.values()),
        "trained_tokens_per_agent": trained_tokens,
        "generation_seconds": generation_seconds,
        "update_seconds": update_seconds,
        "step_seconds": generation_seconds + update_seconds,
    }
    return plan


def _add_training_terms(
    plan: Plan, agents: Sequence[Any], args: Any, shapes: Mapping[str, ModelShape], distribution: Distribution
) -> None:
    """Model states per agent, the largest agent's activations, ZeRO-3 gathered weights and the runtime reserve."""
    train, gpus = "training GPU", plan.num_training_gpus
    sharding = (
        "the number of training GPUs (ZeRO-3 splits these over them), `use_peft: true`, or optimizer offload"
        if distribution.kind == "zero3"
        else "--accelerate_config to recipes/accelerate_configs/zero3.yaml (shards these over the GPUs)"
    )
    activations: list[tuple[int, str]] = []
    gathered: list[int] = []
    for agent in agents:
        shape = shapes[agent.model_name_or_path]
        dtype_bytes = _dtype_bytes(agent, shape)
        trainable = shape.lora_parameters(agent.lora_r, agent.lora_target_modules) if agent.use_peft else None
        states = model_state_bytes(
            shape.num_parameters,
            shape.largest_layer_parameters,
            distribution,
            gpus,
            dtype_bytes=dtype_bytes,
            trainable_parameters=trainable,
        )
        lora = f" (LoRA r={agent.lora_r}: {trainable / 1e6:.0f}M trainable)" if trainable is not None else ""
        for key, name in (
            ("parameters", f"parameters{lora}"),
            ("gradients", "gradients"),
            ("optimizer", "optimizer states"),
            ("zero_buffers", "ZeRO-3 gather buffer"),
        ):
            if states[key] or key != "zero_buffers":
                plan.terms.append(MemoryTerm(train, agent.name, name, states[key], PHASES, sharding))
        if args.beta != 0.0 and not agent.use_peft:
            reference = dtype_bytes * shape.num_parameters // (gpus if distribution.kind == "zero3" else 1)
            plan.terms.append(MemoryTerm(train, agent.name, "reference model", reference, PHASES, "`beta: 0.0`"))
        activation = activation_bytes(
            shape,
            args.per_device_train_batch_size,
            plan.settings["longest_trained_row"],
            plan.settings["longest_completion"],
            gradient_checkpointing=args.gradient_checkpointing,
            eager_attention=agent.attn_implementation == "eager",
        )
        activations.append((sum(activation.values()), agent.name))
        # TRL's GRPOTrainer syncs a full fine-tuned model parameter by parameter (within the gather buffer); the ILR
        # trainer and any LoRA merge gather one agent's whole weights at a time.
        if distribution.kind == "zero3" and (args.method == "ilr" or agent.use_peft):
            gathered.append(dtype_bytes * shape.num_parameters)
    # Agents are updated one after the other: the largest agent's activations are the peak.
    peak, name = max(activations)
    checkpointed = ", checkpointed" if args.gradient_checkpointing else ""
    rows = f"{args.per_device_train_batch_size} rows x {plan.settings['longest_trained_row']} tokens{checkpointed}"
    setting = "`per_device_train_batch_size` (raise `gradient_accumulation_steps` to keep the batch)"
    setting += "" if args.gradient_checkpointing else ", or `gradient_checkpointing: true`"
    plan.terms.append(MemoryTerm(train, name, f"activations ({rows})", peak, ("update",), setting))
    if gathered and plan.layout == "transformers":
        # The transformers backend generates with every agent's whole weights, gathered for the whole discussion.
        plan.terms.append(
            MemoryTerm(train, "all", "ZeRO-3 gathered weights", sum(gathered), ("generation",), "zero2.yaml")
        )
    elif gathered:
        plan.terms.append(
            MemoryTerm(train, "largest", "ZeRO-3 gathered weights", max(gathered), ("weight sync",), "more GPUs")
        )
    reserve = int(TRAINING_RUNTIME_GB * GB)
    plan.terms.append(MemoryTerm(train, "-", "CUDA context, workspaces, fragmentation", reserve, PHASES, "-"))


def _add_engine_terms(
    plan: Plan,
    agent: Any,
    args: Any,
    shapes: Mapping[str, ModelShape],
    stages: Mapping[str, tuple[int, int, int]],
    hardware: Hardware,
) -> float:
    """One agent's generation memory (vLLM engine or `generate`'s KV cache) and its checks; returns its rough
    generation seconds per step."""
    shape = shapes[agent.model_name_or_path]
    dtype_bytes = _dtype_bytes(agent, shape)
    context = plan.settings["longest_context"]
    local_questions = plan.settings["questions_per_gpu"]
    if plan.layout == "transformers":
        sequences = local_questions * max(samples for _, _, samples in stages.values())
        kv = sequences * context * shape.kv_bytes_per_token(dtype_bytes)
        name = f"KV cache of generate ({sequences} sequences)"
        plan.terms.append(
            MemoryTerm("training GPU", agent.name, name, kv, ("generation",), "`generation_backend: vllm`")
        )
        return _generation_seconds(shape, dtype_bytes, stages, local_questions, hardware, 1, 1)
    # Colocated tensor parallelism is TRL's (`vllm_tensor_parallel_size`, the GRPO baseline); ILR's engines use one
    # GPU each. A tensor-parallel group serves the questions of all its GPUs.
    if plan.layout == "server":
        tp = hardware.vllm_gpus_per_agent
        budget = int(SERVER_GPU_MEMORY_UTILIZATION * plan.gpu_memory)
        max_model_len = shape.max_position_embeddings
        device, questions = f"server GPU ({agent.name})", plan.settings["questions_per_step"]
        setting = "`trl vllm-serve --gpu_memory_utilization` (0.9)"
        sleeping = False
    else:
        tp = args.vllm_tensor_parallel_size if args.method == "grpo" else 1
        budget = int(args.vllm_gpu_memory_utilization / plan.settings["agents"] * plan.gpu_memory)
        max_model_len = args.vllm_max_model_length or shape.max_position_embeddings
        device, questions = "training GPU", local_questions * tp
        setting = "`vllm_gpu_memory_utilization` (split between the agents' engines)"
        # Engines sleep through the update and wake for the weight sync: the ILR trainer puts them to sleep after
        # the discussion, TRL's GRPOTrainer after generating.
        sleeping = bool(args.vllm_enable_sleep_mode)
    weights = dtype_bytes * shape.num_parameters // tp
    batched = SERVER_MAX_BATCHED_TOKENS if plan.layout == "server" else COLOCATE_MAX_BATCHED_TOKENS
    widths = 2 * shape.hidden_size + 2 * shape.num_kv_heads * shape.head_dim + 2 * shape.intermediate_size
    # Profiled activations of one batch of tokens, the sampler's float32 logits, CUDA graphs and non-torch memory.
    runtime = int(batched * dtype_bytes * widths // tp + 3 * VLLM_MAX_NUM_SEQS * shape.vocab_size * 4)
    runtime += int(ENGINE_RUNTIME_GB * GB)
    kv_capacity = max(0, budget - weights - runtime)
    kv_per_token = shape.kv_bytes_per_token(dtype_bytes, tp)
    awake = ("generation", "weight sync") if sleeping else PHASES
    plan.terms += [
        MemoryTerm(device, agent.name, f"vLLM weights (tp={tp})", weights, awake, setting),
        MemoryTerm(device, agent.name, "vLLM activations, CUDA graphs", runtime, awake, setting),
        MemoryTerm(
            device,
            agent.name,
            f"vLLM KV cache ({kv_capacity // kv_per_token} tokens)",
            kv_capacity,
            ("generation",) if sleeping else PHASES,
            setting,
        ),
    ]
    if sleeping:
        plan.terms.append(
            MemoryTerm(device, agent.name, "vLLM asleep", int(SLEEPING_ENGINE_GB * GB), ("update",), "-")
        )
    if max_model_len < context:
        plan.problems.append(
            f"vLLM engine of `{agent.name}`: max_model_len {max_model_len} is shorter than the longest Idea3 row "
            f"(~{context} tokens: prompt with the peers' texts + completion); vLLM rejects longer requests. Raise "
            "`vllm_max_model_length`, or lower `peer_max_tokens` / `max_completion_length`."
        )
    needed = max_model_len * kv_per_token
    if kv_capacity < needed:
        if plan.layout == "server":
            fix = "Give each server more GPUs (`--vllm_gpus_per_agent`, the Slurm script's VLLM_GPUS_PER_AGENT)"
        else:
            share = (weights + runtime + needed) / plan.gpu_memory * plan.settings["agents"]
            fix = f"Raise `vllm_gpu_memory_utilization` to >= {share:.2f}"
        plan.problems.append(
            f"vLLM engine of `{agent.name}`: {budget / GB:.1f} GB leave {kv_capacity / GB:.1f} GB of KV cache "
            f"after {weights / GB:.1f} GB of weights, less than one sequence of max_model_len {max_model_len} needs "
            f"({needed / GB:.1f} GB; vLLM refuses to start). {fix}, or lower `vllm_max_model_length` (the longest "
            f"Idea3 row is ~{context} tokens)."
        )
    else:
        batch = max(questions * (prompt + samples * completion) for prompt, completion, samples in stages.values())
        if kv_capacity < batch * kv_per_token:
            plan.notes.append(
                f"`{agent.name}`'s KV cache holds {kv_capacity // kv_per_token} tokens, "
                f"{100 * kv_capacity / (batch * kv_per_token):.0f}% of its largest stage's {batch} tokens: vLLM "
                "runs that stage in waves."
            )
    return _generation_seconds(
        shape, dtype_bytes, stages, questions, hardware, tp, max(1, kv_capacity // kv_per_token)
    )


def _keep_largest_generate_cache(plan: Plan) -> None:
    """The transformers backend generates agent after agent, freeing each cache: only the largest one is a peak."""
    caches = [term for term in plan.terms if term.name.startswith("KV cache of generate")]
    largest = max(caches, key=lambda term: term.bytes)
    plan.terms = [term for term in plan.terms if term not in caches or term is largest]


def _layout_hint(layout: str, sleeping: bool, phase: str) -> str:
    if layout == "colocate" and not sleeping and phase == "update":
        return "; or set `vllm_enable_sleep_mode: true` (engines release their memory during the update)"
    if layout == "colocate":
        return "; or `generation_backend: vllm_server` (engines on their own GPUs, recipes/slurm/train_ilr.slurm)"
    return ""


def _generation_seconds(
    shape: ModelShape,
    dtype_bytes: int,
    stages: Mapping[str, tuple[int, int, int]],
    questions: int,
    hardware: Hardware,
    tensor_parallel: int,
    kv_tokens: int,
) -> float:
    """
    Rough time of one agent's generation calls of a step on one engine: prefill is compute-bound (`PREFILL_MFU`),
    each decode step reads the weights and the live KV cache once (`DECODE_BANDWIDTH_EFFICIENCY` of HBM bandwidth);
    sequences run `VLLM_MAX_NUM_SEQS` at a time or as many as the KV cache holds.
    """
    flops = hardware.tflops * 1e12 * tensor_parallel
    bandwidth = hardware.bandwidth_tbps * 1e12 * tensor_parallel * DECODE_BANDWIDTH_EFFICIENCY
    seconds = 0.0
    for prompt, completion, samples in stages.values():
        sequences = questions * samples
        seconds += 2 * shape.num_parameters * questions * prompt / (flops * PREFILL_MFU)
        concurrent = max(1, min(sequences, VLLM_MAX_NUM_SEQS, kv_tokens // (prompt + completion)))
        waves = math.ceil(sequences / concurrent)
        average_context = prompt + completion / 2
        per_step = (
            dtype_bytes * shape.num_parameters + concurrent * average_context * shape.kv_bytes_per_token(dtype_bytes)
        ) / bandwidth
        seconds += waves * completion * max(per_step, 2 * shape.num_parameters * concurrent / (flops * PREFILL_MFU))
    return seconds


# ---------------------------------------------------------------------------------------------------------------------
# Entry points: `ilr plan` and the check before `ilr train`
# ---------------------------------------------------------------------------------------------------------------------
def load_shapes(agents: Iterable[Any], configs: Mapping[str, Any] | None = None) -> dict[str, ModelShape]:
    """
    Each agent's [`ModelShape`], from `configs` (by `model_name_or_path`) or from the model's `config.json` (a local
    folder or the Hub; only the config is fetched).
    """
    from transformers import AutoConfig

    shapes: dict[str, ModelShape] = {}
    for agent in agents:
        path = agent.model_name_or_path
        if path in shapes:
            continue
        config = (configs or {}).get(path)
        if isinstance(config, ModelShape):
            shapes[path] = config
            continue
        if config is None:
            try:
                config = AutoConfig.from_pretrained(
                    path,
                    revision=agent.model_revision,
                    trust_remote_code=bool(getattr(agent, "trust_remote_code", False)),
                )
            except (OSError, ValueError) as error:
                raise PlanError(
                    f"Cannot read the config of `{path}` for the plan ({str(error).splitlines()[0]}). Pass a local "
                    "folder holding its config.json, or allow Hub access (unset HF_HUB_OFFLINE)."
                ) from None
        shapes[path] = ModelShape.from_config(config)
    return shapes


def plan_recipe(
    recipe_args: Sequence[str],
    hardware: Hardware,
    distribution: Distribution,
    *,
    configs: Mapping[str, Any] | None = None,
    question_tokens: int = 256,
) -> Plan:
    """
    Parse a recipe (`--config recipe.yaml` plus overrides) and plan it.

    Args:
        recipe_args (`list[str]`):
            `--config recipe.yaml` and any recipe overrides.
        hardware ([`Hardware`]), distribution ([`Distribution`]):
            Where it runs.
        configs (`dict`, *optional*):
            Model configs (or [`ModelShape`]s) by `model_name_or_path`, instead of reading them.
        question_tokens (`int`, *optional*, defaults to `256`):
            See [`build_plan`].

    Returns:
        [`Plan`]
    """
    from ilr.configs import parse_recipe

    recipe_args = list(recipe_args)
    config_path = _config_path(recipe_args)
    recipe: dict[str, Any] = {}
    if config_path is not None:
        with open(config_path, encoding="utf-8") as handle:
            recipe = yaml.safe_load(handle) or {}
    backend = recipe.get("generation_backend", "transformers")
    for index, arg in enumerate(recipe_args):
        if arg == "--generation_backend" and index + 1 < len(recipe_args):
            backend = recipe_args[index + 1]
        elif arg.startswith("--generation_backend="):
            backend = arg.split("=", 1)[1]
    # The plan is for another machine: parsed without vLLM (which the recipe check asks for) and without bf16 (which
    # TrainingArguments checks against this machine); the plan reads the backend and each agent's dtype itself.
    overrides = ["--generation_backend", "transformers", "--bf16", "false"]
    _, agents_args, training_args = parse_recipe([*recipe_args, *overrides])
    if backend == "vllm_server":
        from ilr.recipe_rules import check_vllm_server_ports

        check_vllm_server_ports(agents_args.agents)
    training_args.generation_backend = backend
    explicit = "generation_batch_size" in recipe or any("generation_batch_size" in arg for arg in recipe_args)
    shapes = load_shapes(agents_args.agents, configs)
    return build_plan(
        agents_args.agents,
        training_args,
        shapes,
        distribution,
        hardware,
        question_tokens=question_tokens,
        explicit_generation_batch=explicit,
    )


def warn_if_unfit(
    agents: Sequence[Any],
    training_args: Any,
    *,
    gpu_memory_bytes: int | None = None,
    environ: Mapping[str, str] | None = None,
    configs: Mapping[str, Any] | None = None,
) -> Plan | None:
    """
    Before `ilr train` loads any model: plan the recipe on the GPUs of this launch and log a warning when it does not
    fit. Needs only the models' configs; a plan that cannot be computed is skipped (it never stops training).

    Args:
        agents (`list[AgentConfig]`), training_args ([`~ilr.configs.ILRConfig`]):
            The parsed recipe.
        gpu_memory_bytes (`int`, *optional*):
            Memory of one GPU; defaults to CUDA device 0's. Without a GPU nothing is planned.
        environ (`dict`, *optional*):
            `accelerate launch`'s environment (`WORLD_SIZE`, `ACCELERATE_*`); defaults to `os.environ`.
        configs (`dict`, *optional*):
            Model configs by `model_name_or_path`, instead of reading them.

    Returns:
        [`Plan`] or `None` when nothing was planned.
    """
    import logging

    logger = logging.getLogger(__name__)
    if gpu_memory_bytes is None:
        import torch

        if not torch.cuda.is_available():
            return None
        gpu_memory_bytes = torch.cuda.get_device_properties(0).total_memory
    distribution = Distribution.from_environment(environ)
    serving = len(agents) if training_args.generation_backend == "vllm_server" else 0
    hardware = Hardware(num_gpus=distribution.num_processes + serving, gpu_memory_gb=gpu_memory_bytes / GB)
    try:
        plan = build_plan(agents, training_args, load_shapes(agents, configs), distribution, hardware)
    except (PlanError, OSError, ValueError, KeyError, AttributeError) as error:
        logger.debug("No memory plan: %s", error)
        return None
    if not plan.fits:
        logger.warning(
            "This recipe does not fit the GPUs by `ilr plan` (%s); it may run out of memory:\n%s",
            ", ".join(f"{device} peak {plan.peak(device)[0] / GB:.1f} GB" for device in plan.devices()),
            "\n".join(f"  - {problem}" for problem in plan.problems),
        )
    return plan


def plan_arguments(argv: Sequence[str]) -> tuple[Any, list[str]]:
    """`ilr plan`'s own options, and the recipe arguments (`--config` first, then the overrides)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="ilr plan",
        description="Memory and throughput plan of a recipe on GPUs, from the models' configs alone. Other flags "
        "are recipe overrides, as for `ilr check`.",
    )
    parser.add_argument("--config", required=True, help="the recipe")
    parser.add_argument("--accelerate_config", help="accelerate config file (default: one process, no sharding)")
    parser.add_argument(
        "--num_gpus", type=int, help="all GPUs of the job (default: the accelerate config's processes)"
    )
    parser.add_argument("--gpu_memory_gb", type=float, default=80.0, help="memory of one GPU in GB (default 80)")
    parser.add_argument("--gpu_tflops", type=float, default=989.0, help="dense bf16 TFLOPs of one GPU (H100: 989)")
    parser.add_argument("--gpu_bandwidth_tbps", type=float, default=3.35, help="HBM TB/s (H100 SXM 3.35, H200 4.8)")
    parser.add_argument("--vllm_gpus_per_agent", type=int, default=1, help="server layout: GPUs per vLLM server")
    parser.add_argument("--question_tokens", type=int, default=256, help="longest question provisioned for")
    options, recipe_overrides = parser.parse_known_args(list(argv))
    return options, ["--config", options.config, *recipe_overrides]


def plan_from_arguments(argv: Sequence[str], configs: Mapping[str, Any] | None = None) -> Plan:
    """
    The plan `ilr plan ARGV` prints.

    Args:
        argv (`list[str]`):
            `ilr plan`'s arguments (see `ilr plan --help`).
        configs (`dict`, *optional*):
            Model configs or [`ModelShape`]s by `model_name_or_path`, instead of reading them.

    Returns:
        [`Plan`]
    """
    options, recipe_args = plan_arguments(argv)
    distribution = Distribution.from_accelerate_config(options.accelerate_config)
    hardware = Hardware(
        num_gpus=options.num_gpus or distribution.num_processes,
        gpu_memory_gb=options.gpu_memory_gb,
        tflops=options.gpu_tflops,
        bandwidth_tbps=options.gpu_bandwidth_tbps,
        vllm_gpus_per_agent=options.vllm_gpus_per_agent,
    )
    plan = plan_recipe(recipe_args, hardware, distribution, configs=configs, question_tokens=options.question_tokens)
    plan.settings["distribution"] = distribution.kind
    return plan


def plan_command(argv: Sequence[str]) -> int:
    """`ilr plan`: print a recipe's memory plan; exit 2 when it does not fit."""
    import sys

    plan = plan_from_arguments(argv)
    print(
        f"Layout: {plan.layout}; {plan.settings.get('training_gpus', 0)} training GPU(s) "
        f"({plan.settings['distribution']}), {plan.settings.get('serving_gpus', 0)} serving GPU(s).\n"
    )
    print(plan.render())
    if not plan.fits:
        print(f"ilr plan: error: {plan.problems[0]}", file=sys.stderr)
        return 2
    return 0


def _config_path(args: Sequence[str]) -> str | None:
    from ilr.recipe_check import flag_value

    return flag_value(args, "--config")
