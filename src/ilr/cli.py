"""The `ilr` command line.

User errors (a bad recipe, a missing file) print one line and exit with code 2; internal errors keep their traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from ilr import __version__


USER_ERROR_EXIT_CODE = 2


def _check(args: list[str]) -> int:
    """Validates a recipe without loading any model or dataset, and prints the resolved ILR settings."""
    from ilr.configs import parse_recipe

    script_args, agents_args, training_args = parse_recipe(args)
    print(f"Recipe OK: method={training_args.method}, {len(agents_args.agents)} agent(s)")
    for agent in agents_args.agents:
        peft = f", LoRA r={agent.lora_r}" if agent.use_peft else ""
        print(f"  agent {agent.name}: {agent.model_name_or_path}@{agent.model_revision} ({agent.dtype}{peft})")
    print(
        f"  data: {script_args.dataset_name} / {script_args.dataset_train_split}; rewards: {script_args.reward_funcs}"
    )
    print(
        f"  interaction_mode={training_args.interaction_mode}, train_stages={training_args.train_stages}, "
        f"calibration={training_args.calibration} ({training_args.calibration_scope}), "
        f"num_generations={training_args.num_generations}, backend={training_args.generation_backend}"
    )
    return 0


# Subcommand name -> (handler taking the remaining argv, one-line help).
COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "check": (_check, "validate a recipe: ilr check --config recipes/.../config.yaml [--key value ...]"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """
    Entry point of the `ilr` console script.

    Args:
        argv (`Sequence[str]`, *optional*):
            Arguments without the program name; defaults to `sys.argv[1:]`.

    Returns:
        `int`: the process exit code.
    """
    from ilr.configs import RecipeError

    parser = argparse.ArgumentParser(prog="ilr", description="ILR: Interactive Learning for LLM Reasoning.")
    parser.add_argument("--version", action="version", version=f"ilr {__version__}")
    parser.add_argument(
        "command", choices=sorted(COMMANDS), help="; ".join(f"{k}: {v[1]}" for k, v in COMMANDS.items())
    )
    known, rest = parser.parse_known_args(argv)
    handler, _ = COMMANDS[known.command]
    try:
        return handler(rest)
    except (RecipeError, FileNotFoundError) as error:
        print(f"ilr {known.command}: error: {error}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
