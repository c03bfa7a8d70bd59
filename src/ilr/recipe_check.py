"""`ilr check` without importing TRL, transformers or torch (seconds of imports on a small machine).

A recipe is parsed with the very flags [`ilr.configs.parse_recipe`] builds (generated into `ilr.recipe_fields`), runs
the same checks (`ilr.recipe_rules`), and, in place of TRL's and transformers' own `__post_init__` checks, the subset of
them a recipe can trip, with their messages (`_check_trl_settings`). A recipe that sets anything whose upstream checks
are not mirrored here (DeepSpeed or FSDP settings, evaluation, torch.compile, fp16, ...) is checked by `parse_recipe`
itself: slower, never different. `tests/test_recipe_check.py` holds both paths to the same answers.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from types import SimpleNamespace
from typing import Any

import yaml

from ilr import recipe_fields
from ilr.recipe_rules import (
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
    explain_generation_batch,
    hardware_notes_for,
    json_list,
)


__all__ = ["check_recipe_args"]

# Settings whose TRL/transformers checks are not mirrored in `_check_trl_settings`: a recipe that changes one of them
# from its default is checked by `parse_recipe` (with TRL). Settings typed as config classes or dicts defer likewise.
TRL_CHECKED_KEYS = frozenset(
    {
        "accelerator_config",
        "auto_find_batch_size",
        "debug",
        "deepspeed",
        "do_eval",
        "eval_steps",
        "eval_strategy",
        "fp16",
        "fp16_full_eval",
        "fsdp",
        "fsdp_config",
        "load_best_model_at_end",
        "parallelism_config",
        "torch_compile",
        "torch_compile_backend",
        "torch_compile_mode",
        "use_transformers_paged",
        "vllm_importance_sampling_cap",
    }
)


class _NeedsTRL(Exception):
    """The recipe sets something only TRL's own classes check exactly."""


class RecipeValues(SimpleNamespace):
    """One part of a recipe checked without TRL: the attributes of the matching `ilr.configs` dataclass."""


# ---------------------------------------------------------------------------------------------------------------------
# The flags
# ---------------------------------------------------------------------------------------------------------------------
def string_to_bool(value: str | bool) -> bool:
    """transformers' boolean flag type: yes/no, true/false, t/f, y/n, 1/0 (any case)."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(
        f"Truthy value expected: got {value} but expected one of yes/no, true/false, t/f, y/n, 1/0 (case insensitive)."
    )


def _converter(description: Any) -> Callable[[str], Any] | None:
    """The flag type a description of `ilr.configs._describe_type` stands for, named as argparse reports it."""
    if description is None:
        return None
    if isinstance(description, str):
        simple = {"str": str, "int": int, "float": float, "bool": string_to_bool, "json_list": json_list}
        return simple[description]
    kind, *rest = description
    if kind == "optional":
        inner = _converter(rest[0])

        def parse(value: str) -> Any:
            return None if value.lower() in ("none", "null") else inner(value)

        parse.__name__ = getattr(inner, "__name__", "value")
        return parse
    if kind == "choice":
        by_text = {str(choice): choice for choice in rest[0]}
        return lambda value: by_text.get(value, value)
    if kind == "enum":
        name, values = rest

        def member(value: str) -> str:
            if value not in values:
                raise ValueError(f"{value!r} is not a valid {name}")
            return value

        member.__name__ = name
        return member
    if kind == "call":
        return {"dict": dict, "list": list}[rest[0]]
    return str  # a config class: any value set defers to TRL (`_deferred`)


class _FlagParser(argparse.ArgumentParser):
    """The flags of `ilr.configs._RecipeParser`, rebuilt from their description, with its YAML and error handling."""

    def __init__(self, flags: Iterable[tuple], context: str = "recipe"):
        super().__init__(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        self.context = context
        self.scalar_types: dict[str, type] = {}
        self.owners: dict[str, int] = {}
        self.described: dict[str, Any] = {}
        builtin_types = {"int": int, "float": float, "bool": bool, "str": str}
        for dest, options, action, nargs, const, default, choices, kind, scalar, owner in flags:
            default = copy.deepcopy(default)
            if action == "store_false":
                self.add_argument(*options, dest=dest, action="store_false", default=default)
            else:
                self.add_argument(
                    *options,
                    dest=dest,
                    nargs=nargs,
                    const=const,
                    default=default,
                    choices=choices,
                    type=_converter(kind),
                )
            if scalar is not None:
                self.scalar_types[dest] = builtin_types[scalar]
            self.owners[dest] = owner
            self.described.setdefault(dest, kind)

    def error(self, message: str):
        raise RecipeError(f"Invalid {self.context} value: {message}. Fix it in the recipe or on the command line.")

    def set_defaults_with_config(self, **kwargs) -> None:
        actions = {action.dest: action for action in self._actions}
        check_unknown_keys(kwargs, actions)
        for key, value in kwargs.items():
            kwargs[key] = check_recipe_value(actions[key], value, self.scalar_types.get(key))
        for action in self._actions:
            if action.dest in kwargs:
                action.default = kwargs[action.dest]
                action.required = False

    def parse_parts(self, args: list[str], parts: int) -> list[RecipeValues]:
        """The values of each dataclass (by owner index), as `HfArgumentParser.parse_args_into_dataclasses` splits
        them; raises `ValueError` with its message for arguments no flag takes."""
        namespace, remaining = self.parse_known_args(args=args)
        if remaining:
            raise ValueError(f"Some specified arguments are not used by the HfArgumentParser: {remaining}")
        values: list[dict[str, Any]] = [{} for _ in range(parts)]
        for dest, value in vars(namespace).items():
            values[self.owners[dest]][dest] = value
        return [RecipeValues(**part) for part in values]


def _parser(name: str, context: str = "recipe") -> _FlagParser:
    return _FlagParser(getattr(recipe_fields, name), context=context)


@functools.cache
def _flag_defaults(name: str) -> dict[str, Any]:
    """The defaults of a flag set before any recipe sets them (the first flag of a `dest` wins, as in argparse)."""
    defaults: dict[str, Any] = {}
    for dest, _, _, _, _, default, *_ in getattr(recipe_fields, name):
        defaults.setdefault(dest, default)
    return defaults


def _deferred(values: dict[str, Any], flags: str, parser: _FlagParser) -> bool:
    """Whether `values` set a setting that only TRL's classes check exactly (`TRL_CHECKED_KEYS`, config classes,
    dicts)."""
    defaults = _flag_defaults(flags)
    for dest, value in values.items():
        kind = parser.described.get(dest)
        deferred = dest in TRL_CHECKED_KEYS or (isinstance(kind, tuple) and kind[0] in ("class", "call"))
        if deferred and value != defaults.get(dest):
            return True
    return False


# ---------------------------------------------------------------------------------------------------------------------
# What TRL's and transformers' `__post_init__` check of a recipe's values (the cases not deferred to them)
# ---------------------------------------------------------------------------------------------------------------------
def _check_model_settings(agent: RecipeValues) -> None:
    """TRL's `ModelConfig.__post_init__` (its 8-bit and 4-bit check runs earlier, with ILR's message)."""
    if hasattr(agent.lora_target_modules, "__len__") and len(agent.lora_target_modules) == 1:
        agent.lora_target_modules = agent.lora_target_modules[0]


def _check_trl_settings(config: RecipeValues) -> None:
    """transformers' `TrainingArguments` and TRL's `GRPOConfig` `__post_init__`, in their order and with their
    messages, for the settings not in `TRL_CHECKED_KEYS` (evaluation is off, as it is unless `eval_strategy` is set)."""
    config.bf16 = not config.fp16 if config.bf16 is None else config.bf16  # TRL's `_BaseConfig`
    if config.output_dir is None:
        config.output_dir = "trainer_output"
    config.output_dir = os.path.expanduser(config.output_dir)
    if config.logging_strategy == "steps" and config.logging_steps == 0:
        raise ValueError("logging strategy IntervalStrategy.STEPS requires non-zero --logging_steps")
    if config.torch_empty_cache_steps is not None and not (
        isinstance(config.torch_empty_cache_steps, int) and config.torch_empty_cache_steps > 0
    ):
        raise ValueError(
            f"`torch_empty_cache_steps` must be an integer bigger than 0, got {config.torch_empty_cache_steps}."
        )
    if config.logging_strategy == "steps" and config.logging_steps > 1:
        if config.logging_steps != int(config.logging_steps):
            raise ValueError(f"--logging_steps must be an integer if bigger than 1: {config.logging_steps}")
        config.logging_steps = int(config.logging_steps)
    if config.save_strategy == "steps" and config.save_steps > 1:
        if config.save_steps != int(config.save_steps):
            raise ValueError(f"--save_steps must be an integer if bigger than 1: {config.save_steps}")
        config.save_steps = int(config.save_steps)
    if config.lr_scheduler_type == "reduce_lr_on_plateau":  # evaluation is off here (`eval_strategy` defers)
        raise ValueError("lr_scheduler_type reduce_lr_on_plateau requires an eval strategy")
    if config.lr_scheduler_type == "greedy":
        raise ValueError("lr_scheduler_type greedy requires an eval strategy")
    if config.warmup_steps < 0:
        raise ValueError("warmup_steps must be an integer or a float")
    if config.dataloader_num_workers == 0 and config.dataloader_prefetch_factor is not None:
        raise ValueError(
            "--dataloader_prefetch_factor can only be set when data is loaded in a different process, i.e."
            " when --dataloader_num_workers > 0."
        )
    _check_grpo_config(config)


def _check_grpo_config(config: RecipeValues) -> None:
    """TRL's `GRPOConfig.__post_init__` after transformers' part."""
    if isinstance(config.pad_to_multiple_of, str) and config.pad_to_multiple_of != "auto":
        text = config.pad_to_multiple_of
        config.pad_to_multiple_of = None if text.lower() in ("none", "null") else int(text)
    if (
        config.pad_to_multiple_of == "auto"
    ):  # 128 on Neuron devices only, whose plugin defers (`_may_have_accelerator`)
        config.pad_to_multiple_of = None
    config.scale_rewards = {True: "group", False: "none"}.get(config.scale_rewards, config.scale_rewards)
    if config.log_completions_hub_repo is not None and not config.log_completions:
        raise ValueError(
            "log_completions_hub_repo is set, but log_completions is False. Enable log_completions to upload "
            "completions to the Hub, or unset log_completions_hub_repo."
        )
    processes = 1  # `ilr check` runs as one process (a distributed launch defers, see `check_recipe_args`)
    if config.generation_batch_size is None and config.steps_per_generation is None:
        config.steps_per_generation = config.gradient_accumulation_steps
        config.generation_batch_size = config.per_device_train_batch_size * processes * config.steps_per_generation
    elif config.generation_batch_size is not None and config.steps_per_generation is None:
        if config.generation_batch_size % (config.per_device_train_batch_size * processes) != 0:
            raise ValueError(
                f"generation_batch_size ({config.generation_batch_size}) must be divisible by the global batch size "
                f"({config.per_device_train_batch_size * processes})."
            )
        config.steps_per_generation = config.generation_batch_size // (config.per_device_train_batch_size * processes)
    elif config.generation_batch_size is None and config.steps_per_generation is not None:
        config.generation_batch_size = config.per_device_train_batch_size * processes * config.steps_per_generation
    else:
        raise ValueError(
            "'generation_batch_size' and 'steps_per_generation' can not be both configured at the same time"
        )
    if config.generation_batch_size % config.num_generations != 0:
        raise ValueError(
            f"generation_batch_size ({config.generation_batch_size}) must be divisible by num_generations "
            f"({config.num_generations})."
        )
    if config.num_generations < 2:
        raise ValueError(
            "GRPO requires at least 2 generations per prompt to calculate the advantages. You provided "
            f"{config.num_generations}, which is less than the minimum required."
        )
    low, high = config.vllm_importance_sampling_clip_min, config.vllm_importance_sampling_clip_max
    if low is not None and high is not None and low >= high:
        raise ValueError(
            f"vllm_importance_sampling_clip_min ({low}) must be less than vllm_importance_sampling_clip_max ({high})."
        )
    truncates = config.vllm_importance_sampling_mode in ("token_truncate", "sequence_truncate")
    if config.vllm_importance_sampling_correction and truncates and low is None and high is None:
        raise ValueError(
            "At least one of `vllm_importance_sampling_clip_min` or `vllm_importance_sampling_clip_max` "
            "must be set when `vllm_importance_sampling_mode` is a `*_truncate` mode."
        )


# ---------------------------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------------------------
def _parse_agent(index: int, raw: Any) -> RecipeValues:
    """`ilr.configs._parse_agent` without TRL."""
    where = f"agents[{index}]"
    parser = _parser("AGENT_FLAGS", context=where)
    raw = check_agent_keys(where, raw, parser.owners)
    try:
        parser.set_defaults_with_config(**{key: value for key, value in raw.items() if value is not None})
        (agent,) = parser.parse_parts([], parts=1)
        if _deferred(vars(agent), "AGENT_FLAGS", parser):
            raise _NeedsTRL(where)
        check_agent_quantization(agent)
        _check_model_settings(agent)
        check_agent(agent)
    except RecipeError as error:
        raise RecipeError(f"In `{where}`: {error}") from None
    except ValueError as error:
        raise RecipeError(f"In `{where}`: {error}. Fix it in the recipe.") from None
    return agent


def _read_config(args: list[str], parser: _FlagParser) -> list[str]:
    """`TrlParser.parse_args_and_config`'s part before parsing: the `--config` file's values become flag defaults, and
    its `env:` mapping is set in the environment."""
    if "--config" not in args:
        return args
    index = args.index("--config")
    args.pop(index)
    path = args.pop(index)
    with open(path) as handle:
        config = yaml.safe_load(handle)
    if not isinstance(config, dict):
        raise ValueError(f"Config file {path} must contain a YAML mapping.")
    if "env" in config:
        env_vars = config.pop("env", {})
        if not isinstance(env_vars, dict):
            raise ValueError("`env` field should be a dict in the YAML file.")
        for key, value in env_vars.items():
            os.environ[key] = str(value)
    parser.set_defaults_with_config(**config)
    return args


def _check(args: list[str], hardware_notes: list[str] | None) -> tuple[RecipeValues, RecipeValues, RecipeValues]:
    parser = _parser("RECIPE_FLAGS")
    try:
        script_args, agents_args, training_args = parser.parse_parts(_read_config(args, parser), parts=3)
        if _deferred(vars(training_args), "RECIPE_FLAGS", parser) or _deferred(
            vars(script_args), "RECIPE_FLAGS", parser
        ):
            raise _NeedsTRL("recipe")
        if int(os.environ.get("WORLD_SIZE", "1")) != 1:  # TRL would size the batch by the launch's processes
            raise _NeedsTRL("WORLD_SIZE")
        with hardware_notes_for(hardware_notes):
            check_script_args(script_args)
            agents_args.agents = check_agents(agents_args.agents, _parse_agent)
            check_training_settings(training_args)
            try:
                _check_trl_settings(training_args)
            except ValueError as error:
                explain_generation_batch(training_args, error)
                raise
    except (RecipeError, _NeedsTRL):
        raise
    except yaml.YAMLError as error:
        problem = " ".join(str(error).split())
        raise RecipeError(f"The `--config` file is not valid YAML ({problem}). Fix the syntax there.") from None
    except (TypeError, ValueError) as error:  # TRL's / transformers' own checks, as mirrored above
        raise RecipeError(f"{error} Fix it in the recipe or on the command line.") from error
    return script_args, agents_args, training_args


def check_recipe_args(
    args: Iterable[str] | None = None, *, hardware_notes: list[str] | None = None
) -> tuple[Any, Any, Any]:
    """
    Validates `--config recipe.yaml` plus command-line overrides as [`ilr.configs.parse_recipe`] does, in a fraction
    of the time: without TRL, unless the recipe sets something only TRL checks exactly.

    Args:
        args (`Iterable[str]`, *optional*):
            Command-line arguments; defaults to `sys.argv[1:]`.
        hardware_notes (`list[str]`, *optional*):
            As in `parse_recipe`: settings this machine cannot run are noted here instead of raised.

    Returns:
        `tuple[Any, Any, Any]`: the script, agents and training settings, with the attributes of `parse_recipe`'s
        dataclasses (they are those dataclasses when TRL was needed).

    Raises:
        [`RecipeError`]: the error `parse_recipe` raises for the same recipe.
    """
    args = list(sys.argv[1:] if args is None else args)
    if any(arg in ("-h", "--help") for arg in args):  # the help lists TRL's own help texts
        return _parse_with_trl(args, hardware_notes)
    noted = 0 if hardware_notes is None else len(hardware_notes)
    try:
        parts = _check(list(args), hardware_notes)
    except _NeedsTRL:
        if hardware_notes is not None:
            del hardware_notes[noted:]  # TRL's parse starts over (an agent may defer after another was noted)
        return _parse_with_trl(args, hardware_notes)
    check_recipe(*parts, hardware_notes=hardware_notes, training=True)
    return parts


def _parse_with_trl(args: list[str], hardware_notes: list[str] | None) -> tuple[Any, Any, Any]:
    from ilr.configs import parse_recipe

    return parse_recipe(args, hardware_notes=hardware_notes)


def flag_value(argv: Sequence[str], flag: str) -> str | None:
    """
    The value of `flag` (`--config`, `--log_level`) on a command line, before the recipe is parsed.

    Args:
        argv (`Sequence[str]`):
            The command line's arguments.
        flag (`str`):
            The flag, with its dashes.

    Returns:
        `str` or `None`: Its value (`--flag value` or `--flag=value`), or `None` when it is not given.
    """
    for index, arg in enumerate(argv):
        if arg == flag and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith(f"{flag}="):
            return arg.split("=", 1)[1]
    return None
