"""Recipe configuration: one flat YAML parsed by `trl.TrlParser` into three dataclasses.

- [`ILRScriptArguments`]: data, prompts and rewards.
- [`AgentsArguments`]: the list of agents (models) trained together, one [`AgentConfig`] each.
- [`ILRConfig`]: TRL's `GRPOConfig` (every GRPO name keeps TRL's meaning) plus the ILR fields.

Every check runs before any model or dataset is loaded, so a broken recipe fails in well under a second with a
message naming the key and the fix. The checks themselves live in `ilr.recipe_rules` (no TRL import), which
`ilr check` also runs on a recipe parsed without TRL (`ilr.recipe_check`).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import sys
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import yaml
from trl import GRPOConfig, ModelConfig, ScriptArguments, TrlParser

from ilr.recipe_rules import (  # the checks and the names recipes use live there, without TRL; re-exported here
    AGENT_GPU_SETTINGS,
    CALIBRATION_SCOPES,
    DIFFICULTY_SOURCES,
    GENERATION_BACKENDS,
    GPU_SETTINGS,
    ILR_LOSS_TYPES,
    METHODS,
    SCALE_REWARDS,
    SHARE_SELECTIONS,
    STAGES,
    VLLM_INSTALL_COMMANDS,
    RecipeError,
    check_agent,
    check_agent_keys,
    check_agent_quantization,
    check_agents,
    check_recipe,
    check_recipe_value,
    check_script_args,
    check_training_settings,
    check_unknown_keys,
    cooperate_probability,
    explain_generation_batch,
    hardware_notes_for,
    json_list,
)


__all__ = [
    "AGENT_GPU_SETTINGS",
    "CALIBRATION_SCOPES",
    "DIFFICULTY_SOURCES",
    "GENERATION_BACKENDS",
    "GPU_SETTINGS",
    "ILR_LOSS_TYPES",
    "METHODS",
    "SCALE_REWARDS",
    "SHARE_SELECTIONS",
    "STAGES",
    "VLLM_INSTALL_COMMANDS",
    "AgentConfig",
    "AgentsArguments",
    "ILRConfig",
    "ILRScriptArguments",
    "RecipeError",
    "cooperate_probability",
    "parse_recipe",
]


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
        check_script_args(self)


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
        check_agent_quantization(self)
        super().__post_init__()
        check_agent(self)


def _parse_agent(index: int, raw: Any) -> AgentConfig:
    """Builds one [`AgentConfig`] from its recipe mapping, type-checking every value like a command-line flag."""
    where = f"agents[{index}]"
    if isinstance(raw, AgentConfig):
        return raw
    raw = check_agent_keys(where, raw, (f.name for f in dataclasses.fields(AgentConfig)))
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
        self.agents = check_agents(self.agents, _parse_agent)


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
        check_training_settings(self)
        try:
            super().__post_init__()
        except ValueError as error:
            explain_generation_batch(self, error)
            raise


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
                action.type, action.nargs = json_list, None

    def error(self, message: str):
        raise RecipeError(f"Invalid {self.context} value: {message}. Fix it in the recipe or on the command line.")

    def set_defaults_with_config(self, **kwargs) -> list[str]:
        actions = {action.dest: action for action in self._actions}
        check_unknown_keys(kwargs, actions)
        for key, value in kwargs.items():
            kwargs[key] = check_recipe_value(actions[key], value, self.scalar_types.get(key))
        return super().set_defaults_with_config(**kwargs)


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
    try:
        with hardware_notes_for(hardware_notes):
            script_args, agents_args, training_args = parser.parse_args_and_config(args)
    except RecipeError:
        raise
    except yaml.YAMLError as error:
        problem = " ".join(str(error).split())
        raise RecipeError(f"The `--config` file is not valid YAML ({problem}). Fix the syntax there.") from None
    except (TypeError, ValueError) as error:  # raised by TRL's / transformers' own __post_init__ checks
        raise RecipeError(f"{error} Fix it in the recipe or on the command line.") from error
    check_recipe(script_args, agents_args, training_args, hardware_notes=hardware_notes, training=training)
    return script_args, agents_args, training_args


# ---------------------------------------------------------------------------------------------------------------------
# The recipe's flags, for `ilr check` (see `ilr.recipe_fields`)
# ---------------------------------------------------------------------------------------------------------------------
def _describe_type(converter: Any) -> Any:
    """A flag's `type` as plain data: `None`, `"str"`, `"int"`, `"float"`, `"bool"`, `"json_list"`, `("optional",
    inner)` (TRL's `none`/`null`-accepting wrapper), `("choice", values)`, `("enum", name, values)`, `("call",
    "dict" | "list")` or `("class", name)` (a config class: a recipe that sets it is checked with TRL)."""
    if converter is None or converter in (str, int, float):
        return None if converter is None else converter.__name__
    if converter is json_list:
        return "json_list"
    name = getattr(converter, "__qualname__", "")
    if name == "string_to_bool":
        return "bool"
    if name.startswith("_accept_none."):
        return ("optional", _describe_type(converter.__closure__[0].cell_contents))
    if name.startswith("make_choice_type_function."):
        return ("choice", tuple(converter.__closure__[0].cell_contents.values()))
    if typing.get_origin(converter) in (dict, list):  # e.g. `dict[str, bool] | None`: called on the text as is
        return ("call", typing.get_origin(converter).__name__)
    if isinstance(converter, type) and issubclass(converter, enum.Enum):
        return ("enum", converter.__name__, tuple(member.value for member in converter))
    if isinstance(converter, type):  # a config class (e.g. accelerate's `ParallelismConfig`): `ilr check` defers
        return ("class", f"{converter.__module__}.{converter.__qualname__}")
    raise TypeError(f"No description for the flag type {converter!r}: extend `ilr.configs._describe_type`.")


def _plain(value: Any) -> Any:
    """A default or choice as a Python literal (enum members by value)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(item) for item in value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def describe_recipe_flags() -> dict[str, Any]:
    """
    The flags of the recipe parsers, as plain data: what `ilr.recipe_fields` holds, so that `ilr check` parses a
    recipe exactly as [`parse_recipe`] does without importing TRL.

    Returns:
        `dict[str, Any]`: `recipe` and `agent`, each a tuple of flags (`dest`, option strings, action, `nargs`, `const`,
        default, choices, type (see `_describe_type`), scalar type, owner: the index of the dataclass the field belongs
        to); `versions` of TRL and transformers.
    """
    import transformers
    import trl

    described: dict[str, Any] = {"versions": {"trl": trl.__version__, "transformers": transformers.__version__}}
    for name, types in (("recipe", (ILRScriptArguments, AgentsArguments, ILRConfig)), ("agent", (AgentConfig,))):
        parser = _RecipeParser(types)
        owners = {f.name: index for index, cls in enumerate(types) for f in dataclasses.fields(cls) if f.init}
        flags = []
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            kind = {argparse._StoreAction: "store", argparse._StoreFalseAction: "store_false"}[type(action)]
            flags.append(
                (
                    action.dest,
                    tuple(action.option_strings),
                    kind,
                    action.nargs,
                    _plain(action.const),
                    _plain(action.default),
                    None if action.choices is None else tuple(_plain(list(action.choices))),
                    _describe_type(action.type),
                    getattr(parser.scalar_types.get(action.dest), "__name__", None),
                    owners[action.dest],
                )
            )
        described[name] = tuple(flags)
    return described
