"""The `ilr` command line.

User errors (a bad recipe, a missing file) print one line and exit with code 2; internal errors keep their traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ilr import __version__


USER_ERROR_EXIT_CODE = 2


def _check(args: list[str]) -> int:
    """Validates a recipe without loading any model or dataset, and prints the resolved ILR settings and notes."""
    from ilr.recipe_check import check_recipe_args  # the checks of `ilr.configs.parse_recipe`, without importing TRL

    # A recipe is checked for the machine it is meant for: what needs hardware missing here is a note, not an error.
    hardware_notes: list[str] = []
    script_args, agents_args, training_args = check_recipe_args(args, hardware_notes=hardware_notes)
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
    for note in hardware_notes:
        print(f"  note: {note}")
    return 0


def _evaluate(args: list[str]) -> int:
    """Evaluates a model alone (or a recipe's agents under a protocol) on benchmarks; see `ilr.evaluate`."""
    from ilr.evaluate import evaluate_command

    return evaluate_command(args)


def _card(args: list[str]) -> int:
    """Writes an eval card (README.md + chart) from a results file, and pushes it with --push."""
    from ilr.cards import write_card
    from ilr.hub import push_files

    parser = argparse.ArgumentParser(prog="ilr card", description="Write (and push) the eval card of a model.")
    parser.add_argument("results", help="results file of the model (ilr evaluate)")
    parser.add_argument("--base", help="results file of the base model, for the base column, paired deltas and chart")
    parser.add_argument("--config", help="training recipe: pairing and settings go in the card")
    parser.add_argument("--output_dir", help="folder for README.md and the chart (default: <results dir>/card)")
    parser.add_argument("--model_name", help="name shown in the card")
    parser.add_argument("--license", help="license identifier for the metadata")
    parser.add_argument("--push", action="store_true", help="push README.md and the chart to --repo_id")
    parser.add_argument("--repo_id", help="Hub model repository to push to (default: the evaluated model's id)")
    parser.add_argument("--create_pr", action="store_true", help="open a pull request instead of committing")
    options = parser.parse_args(args)
    output_dir = options.output_dir or str(Path(options.results).parent / "card")
    files = write_card(
        options.results,
        output_dir,
        base_results_path=options.base,
        recipe_path=options.config,
        model_name=options.model_name,
        license=options.license,
    )
    print(f"Card written: {files['README.md']} (+ {', '.join(str(p) for n, p in files.items() if n != 'README.md')})")
    if options.push:
        from ilr.evaluate import load_results

        repo_id = options.repo_id or load_results(options.results)["model"]["name_or_path"]
        if repo_id.count("/") != 1 or Path(repo_id).exists():
            raise FileNotFoundError(f"the evaluated model {repo_id!r} is not a Hub id: pass `--repo_id org/name`")
        url = push_files(repo_id, files, commit_message="Add ILR eval card", create_pr=options.create_pr)
        print(f"Pushed: {url}")
    return 0


def _compare(args: list[str]) -> int:
    """Prints a markdown leaderboard of several results files."""
    from ilr.cards import render_leaderboard
    from ilr.evaluate import load_results

    parser = argparse.ArgumentParser(prog="ilr compare", description="Markdown leaderboard of results files.")
    parser.add_argument("results", nargs="+", help="results files (ilr evaluate)")
    parser.add_argument("--output", help="also write the table to this file")
    options = parser.parse_args(args)
    table = render_leaderboard([load_results(path) for path in options.results])
    print(table)
    if options.output:
        Path(options.output).write_text(table + "\n", encoding="utf-8")
    return 0


def _download(args: list[str]) -> int:
    """Downloads a released checkpoint from the Hub, pinned to a revision."""
    from ilr.hub import download_model

    parser = argparse.ArgumentParser(prog="ilr download", description="Download a model from the Hub (resumable).")
    parser.add_argument("repo_id", help="Hub model id, org/name")
    parser.add_argument("--revision", help="branch, tag or commit (default: main), resolved to a commit sha")
    parser.add_argument("--local_dir", help="download into this folder instead of the Hugging Face cache")
    options = parser.parse_args(args)
    folder, sha = download_model(options.repo_id, revision=options.revision, local_dir=options.local_dir)
    print(f"{options.repo_id}@{sha or options.revision or 'main'} -> {folder}")
    return 0


def _plan(args: list[str]) -> int:
    """Prints a recipe's memory and throughput plan on GPUs; exits 2 when it does not fit. See `ilr.plan`."""
    from ilr.plan import plan_command

    return plan_command(args)


def _train(args: list[str]) -> int:
    """Trains the agents of a recipe (ILR, or the GRPO baseline); see `ilr.train`."""
    from ilr.train import cli_main, end_process

    return end_process(cli_main(args))  # under a distributed launcher, exits here, before interpreter finalisation


def _study(args: list[str]) -> int:
    """Runs (or resumes) a study: ILR vs GRPO with ablations over seeds, each agent evaluated alone; see `ilr.study`."""
    from ilr.study import main

    return main(args)


def _interact(args: list[str]) -> int:
    """Runs one discussion of a recipe's agents and prints the transcript; see `ilr.discussion`."""
    from ilr.discussion import interact_command

    return interact_command(args)


# Subcommand name -> (handler taking the remaining argv, one-line help).
COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "check": (_check, "validate a recipe: ilr check --config recipes/.../config.yaml [--key value ...]"),
    "plan": (_plan, "will it fit: ilr plan --config R --accelerate_config A --num_gpus 8 --gpu_memory_gb 80"),
    "interact": (_interact, "show one discussion: ilr interact --config pair.yaml --question '...' [--protocol ...]"),
    "evaluate": (_evaluate, "evaluate a model alone: ilr evaluate --model M --benchmarks gsm8k,math500 [...]"),
    "card": (_card, "write (--push: push) an eval card: ilr card results.json [--base base.json] [--config ...]"),
    "compare": (_compare, "markdown leaderboard: ilr compare a.json b.json ..."),
    "download": (_download, "download a released checkpoint: ilr download org/name [--revision R] [--local_dir D]"),
    "train": (_train, "train a recipe's agents: ilr train --config recipes/.../config.yaml [--key value ...]"),
    "study": (_study, "ILR vs GRPO with ablations over seeds: ilr study --config study.yaml [--report_only]"),
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
    # `-h` is ours only without a command: `ilr evaluate --help` must reach the command's own parser.
    parser = argparse.ArgumentParser(
        prog="ilr", description="ILR: Interactive Learning for LLM Reasoning.", add_help=False
    )
    parser.add_argument("-h", "--help", action="store_true", help="show this help (or a command's) and exit")
    parser.add_argument("--version", action="version", version=f"ilr {__version__}")
    parser.add_argument(
        "command", nargs="?", choices=sorted(COMMANDS), help="; ".join(f"{k}: {v[1]}" for k, v in COMMANDS.items())
    )
    known, rest = parser.parse_known_args(argv)
    if known.command is None:
        parser.print_help()
        return 0 if known.help else USER_ERROR_EXIT_CODE
    if known.help:
        rest = ["--help", *rest]
    handler, _ = COMMANDS[known.command]
    try:
        return handler(rest)
    except Exception as error:
        if not isinstance(error, _user_error_types()):
            raise
        print(f"ilr {known.command}: error: {error}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE


# Modules that define a user-error class, and its name. Looked up only once an error is raised: such an error can only
# come from a module already imported, and importing `ilr.configs` (trl) up front would cost seconds for every command.
_USER_ERRORS = (
    ("ilr.recipe_rules", "RecipeError"),  # also `ilr.configs.RecipeError`
    ("ilr.data", "DataError"),
    ("ilr.evaluate", "EvaluationError"),
    ("ilr.generation", "GenerationError"),  # an engine that kept failing: the message names the agent and the fix
    ("ilr.plan", "PlanError"),
    ("ilr.study", "StudyConfigError"),
)


def _user_error_types() -> tuple[type[Exception], ...]:
    """Exceptions reported as one line with exit code 2: bad input, missing files, an offline or unreachable Hub."""
    types: list[type[Exception]] = [FileNotFoundError, ConnectionError]
    types += [getattr(sys.modules[module], name) for module, name in _USER_ERRORS if module in sys.modules]
    return tuple(types)


if __name__ == "__main__":
    sys.exit(main())
