"""`ilr interact`: run one multi-agent discussion of a recipe's agents and show what they said to each other.

    ilr interact --config recipes/.../config_group1.yaml --question "What is 17 + 21?"
    ilr interact --config ... --dataset gsm8k --data_files gsm8k.jsonl --limit 3 --protocol debate --format markdown

Everything after the command's own flags is a recipe override (`--generation_backend transformers`, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


PROTOCOLS = ("idea3", "debate", "single")


def question_rows(questions: Sequence[str], task: str = "math") -> list[dict[str, Any]]:
    """
    Canonical rows (the schema of `ilr.data`) for free-text questions typed by a user.

    Args:
        questions (`Sequence[str]`):
            The question texts.
        task (`str`, *optional*, defaults to `"math"`):
            `math` (answer in `\\boxed{}`) or `code` (a fenced python block).

    Returns:
        `list[dict]`: one row per question, with no gold answer.
    """
    return [
        {"id": f"q{index}", "problem": text, "answer": "", "tests": [], "setup": "", "entry_point": "", "task": task}
        | {"source": "cli"}
        for index, text in enumerate(questions)
    ]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ilr interact",
        description="Run one discussion of a recipe's agents and print the transcript. Unknown flags override the "
        "recipe (e.g. --generation_backend transformers).",
    )
    source = parser.add_argument_group("questions (one of)")
    source.add_argument("--question", action="append", help="a question to discuss (repeat for several)")
    source.add_argument("--dataset", help="a benchmark name (ilr.data.BENCHMARKS): discuss its first --limit rows")
    parser.add_argument("--data_files", nargs="+", help="local files of --dataset, in its own schema")
    parser.add_argument("--limit", type=int, default=1, help="questions taken from --dataset (default: 1)")
    parser.add_argument("--task", choices=("math", "code"), default="math", help="task of --question (default: math)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="idea3", help="default: idea3")
    parser.add_argument(
        "--mode",
        choices=("cooperate", "compete"),
        help="Idea3 framing for every agent. Default: the recipe's fixed interaction_mode; `dynamic` needs IRT "
        "estimates of the questions, so it falls back to cooperate here.",
    )
    parser.add_argument("--rounds", type=int, default=2, help="debate rounds after the first answers (default: 2)")
    parser.add_argument("--samples", type=int, default=1, help="samples per agent and stage (default: 1)")
    parser.add_argument("--format", choices=("text", "markdown", "json"), default="text", help="default: text")
    parser.add_argument("--all_samples", action="store_true", help="show every sample, not only the shared one")
    parser.add_argument("--show_prompts", action="store_true", help="also show each agent's prompts")
    parser.add_argument("--output", help="also write the transcript to this file")
    return parser


def _cooperate_mask(mode: str | None, interaction_mode: str, shape: tuple[int, int], seed: int):
    import numpy as np

    from ilr.configs import cooperate_probability
    from ilr.difficulty import select_modes

    if mode is not None:
        return np.full(shape, mode == "cooperate")
    if cooperate_probability(interaction_mode) is None:
        print(
            "ilr interact: `interaction_mode: dynamic` needs IRT estimates of these questions; using cooperate "
            "(choose with --mode).",
            file=sys.stderr,
        )
        return np.full(shape, True)
    return select_modes(np.zeros(shape), None, interaction_mode, rng=np.random.default_rng(seed))


def interact_command(argv: Sequence[str]) -> int:
    """
    The `ilr interact` command.

    Args:
        argv (`Sequence[str]`):
            The command's arguments; flags it does not know are recipe overrides.

    Returns:
        `int`: the exit code.
    """
    import numpy as np

    from ilr import interaction
    from ilr.configs import RecipeError, parse_recipe
    from ilr.generation import build_backend, engine_kwargs

    options, recipe_args = _parser().parse_known_args(argv)
    if bool(options.question) == bool(options.dataset):
        raise RecipeError("Give either --question (repeatable) or --dataset, not both and not neither.")
    if options.limit < 1 or options.samples < 1 or options.rounds < 0:
        raise RecipeError("--limit and --samples must be >= 1, and --rounds >= 0.")
    _, agents_args, training_args = parse_recipe(recipe_args, training=False)

    if options.question:
        rows = question_rows(options.question, options.task)
    else:
        from ilr.data import load_benchmark

        rows = load_benchmark(options.dataset, data_files=options.data_files, limit=options.limit).to_list()

    settings = interaction.Idea3Settings.from_config(training_args)
    settings = dataclasses.replace(settings, num_generations=options.samples, analysis_samples=1)
    rng = np.random.default_rng(training_args.seed)
    agents = agents_args.agents
    kwargs = engine_kwargs(training_args, len(agents))
    backends = []
    try:
        for agent in agents:
            backends.append(build_backend(agent, training_args.generation_backend, **kwargs))
            backends[-1].max_retries = training_args.generation_retries
        if options.protocol == "single":
            transcript = interaction.run_single(rows, backends, settings, rng=rng)
        elif options.protocol == "debate":
            transcript = interaction.run_debate(rows, backends, settings, rounds=options.rounds, rng=rng)
        else:
            shape = (len(rows), len(backends))
            cooperate = _cooperate_mask(options.mode, training_args.interaction_mode, shape, training_args.seed)
            transcript = interaction.run_idea3(rows, backends, cooperate, settings, rng=rng)
    finally:
        for backend in backends:
            backend.close()

    if options.format == "json":
        rendered = json.dumps(transcript.to_dict(), indent=2, ensure_ascii=False)
    else:
        render = transcript.render_markdown if options.format == "markdown" else transcript.render_text
        rendered = render(all_samples=options.all_samples, show_prompts=options.show_prompts)
    print(rendered)
    if options.output:
        Path(options.output).write_text(rendered + "\n", encoding="utf-8")
    return 0
