r"""The offline demo that learns: evaluate each agent alone, train them together with ILR, evaluate again, compare.

    python recipes/demo/run_demo.py [--config recipes/demo/ilr/config_smollm2_demo.yaml] [--output_dir ...]
    python recipes/demo/run_demo.py --quick      # a few steps and questions: checks the whole path in a few minutes
    make demo [DEMO_ARGS="--quick"]

Run it from the repository root (the recipe names its model and data relative to it). Steps, all in this process,
offline:

1. **Before**: every distinct starting model of the recipe answers the held-out questions alone (greedy, the plain
   single-agent prompt, the answer read from `\boxed{}`), through [`~ilr.evaluate.run_evaluation`]. Agents that start
   from the same weights share this evaluation: greedy decoding gives them the same answers.
2. **Train**: [`ilr.train.main`] on the recipe (ILR: Idea3 share / analyse / fuse, Perception Calibration, GRPO
   updates), `--max_steps` steps; the trainer writes `metrics.jsonl` and each agent's final model.
3. **After**: each trained agent answers the same questions alone, with the same settings.
4. **Compare**: per agent, accuracy and answer-format compliance (a non-empty numeric `\boxed{}`), each before and
   after with a 95% bootstrap interval over questions, and the paired difference after - before with its interval
   ([`ilr.comparison`]); the reward curves from `metrics.jsonl` ([`ilr.curves`]); an eval card per agent
   ([`~ilr.cards.write_card`], the base model's results as its baseline).

Output folder (`--output_dir`):

- `before/`, `after/<agent>/`: the evaluations (`run.json`, `details_arithmetic.jsonl`, `results_<name>.json`).
- `train/`: the ILR run (`metrics.jsonl`, `recipe.yaml`, `train.log`, one folder per trained agent).
- `cards/<agent>/`: eval card (`README.md`) and its chart (`eval_chart.png`).
- `reward_curves.png`: reward per step of every agent and Idea3 stage.
- `results.md`, `results.json`: the before/after table, settings, wall times and machine load; `demo.log`: the log.

The held-out questions are `recipes/demo/data/arithmetic_test.jsonl` (written by `recipes/demo/make_arithmetic.py`
after the training rows, never among them), evaluated as the local benchmark `arithmetic` (plain integer golds; see
[`arithmetic_benchmark`]).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ilr import console
from ilr.comparison import build_table, format_table, outcomes_from_details
from ilr.console import format_duration
from ilr.curves import read_reward_curves, render_reward_curves
from ilr.data import BenchmarkSpec, local_benchmark
from ilr.files import write_text_atomic
from ilr.machine import available_cores, choose_threads, load_average
from ilr.stats import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES


DEMO_BENCHMARK = "arithmetic"
DEFAULT_CONFIG = "recipes/demo/ilr/config_smollm2_demo.yaml"
DEFAULT_EVAL_FILE = "recipes/demo/data/arithmetic_test.jsonl"
DEFAULT_OUTPUT_DIR = "outputs/demo/smollm2"
LOG_NAME = "demo.log"
# `--quick`: enough to exercise every step on the real model in a few minutes; its numbers mean nothing.
QUICK_STEPS = 2
QUICK_EVAL_QUESTIONS = 12


def arithmetic_benchmark(eval_file: str) -> BenchmarkSpec:
    """The demo's held-out questions as a local benchmark: `arithmetic`, plain integer golds, ids from the file."""
    return local_benchmark(
        eval_file,
        name=DEMO_BENCHMARK,
        question_column="problem",
        answer_column="answer",
        answer_format="plain",
        id_column="id",
        notes="The CPU demo's arithmetic questions (recipes/demo/make_arithmetic.py); local files only.",
    )


def _evaluate(
    model: str,
    name: str,
    agent: Any,
    options: argparse.Namespace,
    output_dir: Path,
    training_args: Any,
) -> tuple[Path, dict[str, dict[str, float]]]:
    """Evaluate one model alone on the held-out questions, on the recipe's engine; its results and outcomes."""
    from ilr.evaluate import EvalConfig, read_details, run_evaluation

    config = EvalConfig(
        model=model,
        name=name,
        gguf_file=agent.gguf_file if model == agent.model_name_or_path else None,
        dtype=agent.dtype,
        benchmarks=[arithmetic_benchmark(options.eval_file)],
        limit=options.eval_questions,
        max_new_tokens=options.max_new_tokens,
        batch_size=options.eval_batch_size,
        seed=options.seed,
        output_dir=str(output_dir),
        overwrite=True,  # a rerun evaluates the new weights, never reuses answers of earlier ones
        n_resamples=options.n_resamples,
        backend=training_args.generation_backend,
        vllm_max_model_length=training_args.vllm_max_model_length,
        vllm_enforce_eager=training_args.vllm_enforce_eager,
        command=_command(options),
    )
    run_evaluation(config)
    details = read_details(output_dir / f"details_{DEMO_BENCHMARK}.jsonl")
    records = [record for (_, agent_name), record in details.items() if agent_name == name]
    return output_dir / f"results_{name}.json", outcomes_from_details(records)


def _starting_model_key(agent: Any) -> tuple:
    return (agent.model_name_or_path, agent.model_revision, agent.gguf_file, str(agent.dtype))


def _label(path: str, taken: set[str]) -> str:
    base = "".join(char if char.isalnum() or char in "._-" else "-" for char in path.rstrip("/").split("/")[-1])
    label, index = base or "model", 2
    while label in taken:
        label, index = f"{base}-{index}", index + 1
    taken.add(label)
    return label


def _command(options: argparse.Namespace) -> str:
    return f"python recipes/demo/run_demo.py {' '.join(options.argv)}".strip()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """
    Parse the demo's flags.

    Args:
        argv (`Sequence[str]`, *optional*):
            Arguments; defaults to `sys.argv[1:]`.

    Returns:
        `argparse.Namespace`: The options (`argv` holds the arguments themselves, for the record).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python recipes/demo/run_demo.py",
        description="Evaluate each agent alone, train them with ILR, evaluate again: before/after with intervals.",
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="ILR recipe (default: %(default)s)")
    parser.add_argument(
        "--output_dir", default=None, help=f"default: {DEFAULT_OUTPUT_DIR} ({DEFAULT_OUTPUT_DIR}-quick)"
    )
    parser.add_argument("--eval_file", default=DEFAULT_EVAL_FILE, help="held-out questions (default: %(default)s)")
    parser.add_argument("--eval_questions", type=int, default=None, help="first N held-out questions (default: all)")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="evaluation answer length (default: 64)")
    parser.add_argument("--eval_batch_size", type=int, default=50, help="questions per generate call (default: 50)")
    parser.add_argument("--max_steps", type=int, default=None, help="training steps (default: the recipe's)")
    parser.add_argument("--skip_train", action="store_true", help="reuse the models already trained in output_dir")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps, {QUICK_EVAL_QUESTIONS} questions")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the idle cores)")
    parser.add_argument(
        "--generation_backend",
        choices=("transformers", "vllm"),
        help="for training and evaluation (default: recipe's)",
    )
    parser.add_argument("--seed", type=int, default=0, help="evaluation and bootstrap seed (default: 0)")
    parser.add_argument("--n_resamples", type=int, default=DEFAULT_RESAMPLES, help="bootstrap draws")
    parser.add_argument("--verbose", action="store_true", help="show every INFO record, not only progress and results")
    options = parser.parse_args(argv)
    options.argv = argv
    if options.quick:
        options.max_steps = options.max_steps or QUICK_STEPS
        options.eval_questions = options.eval_questions or QUICK_EVAL_QUESTIONS
    if options.output_dir is None:
        options.output_dir = DEFAULT_OUTPUT_DIR + ("-quick" if options.quick else "")
    for key in ("eval_questions", "max_steps", "threads"):
        value = getattr(options, key)
        if value is not None and value < 1:
            parser.error(f"--{key} must be >= 1 (got {value})")
    return options


def run_demo(options: argparse.Namespace) -> dict[str, Any]:
    """
    Evaluate, train, evaluate again, and write the table, the reward curves and the eval cards.

    Args:
        options (`argparse.Namespace`):
            From [`parse_args`].

    Returns:
        `dict`: The content of `results.json`.
    """
    import torch

    from ilr.cards import write_card
    from ilr.configs import parse_recipe
    from ilr.rewards import shutdown_reward_pool

    start = time.perf_counter()
    load_start = load_average()
    cores = available_cores()
    threads = options.threads or choose_threads(cores, load_start[0])
    torch.set_num_threads(threads)
    output_dir = Path(options.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    train_dir = output_dir / "train"

    recipe_argv = ["--config", options.config, "--output_dir", str(train_dir)]
    if options.max_steps is not None:
        recipe_argv += ["--max_steps", str(options.max_steps)]
    if options.generation_backend is not None:
        recipe_argv += ["--generation_backend", options.generation_backend]
    script_args, agents_args, training_args = parse_recipe(recipe_argv)
    agents = list(agents_args.agents)
    if training_args.method != "ilr":
        raise ValueError(
            f"The demo trains agents together: use a `method: ilr` recipe (got `{training_args.method}`)."
        )
    peft_agents = [agent.name for agent in agents if agent.use_peft]
    if peft_agents:
        raise NotImplementedError(
            f"Agents {peft_agents} train LoRA adapters; the demo evaluates full models. Set `use_peft: false`."
        )
    models = sorted({agent.model_name_or_path for agent in agents})
    questions = f"first {options.eval_questions}" if options.eval_questions else "all"
    console.announce(
        "Demo: %s from %s, each evaluated alone on %s held-out questions of %s, trained together with ILR for %d "
        "steps (%s), evaluated again -> %s. %d torch thread(s) on %d core(s), load average %.2f.",
        ", ".join(agent.name for agent in agents),
        ", ".join(models),
        questions,
        options.eval_file,
        training_args.max_steps,
        f"interaction {training_args.interaction_mode}, trained stages {', '.join(training_args.train_stages)}",
        output_dir,
        threads,
        cores,
        load_start[0],
    )
    timings: dict[str, float] = {}

    try:
        ###############
        # Before: each distinct starting model alone
        ###############
        phase = time.perf_counter()
        before_results: dict[str, Path] = {}
        before_outcomes: dict[str, dict[str, dict[str, float]]] = {}
        evaluated: dict[tuple, tuple[Path, dict]] = {}
        labels: set[str] = set()
        for agent in agents:
            key = _starting_model_key(agent)
            if key not in evaluated:
                label = _label(agent.model_name_or_path, labels)
                evaluated[key] = _evaluate(
                    agent.model_name_or_path, label, agent, options, output_dir / "before", training_args
                )
            before_results[agent.name], before_outcomes[agent.name] = evaluated[key]
        timings["before_s"] = time.perf_counter() - phase
        console.announce("Evaluated before training in %s.", format_duration(timings["before_s"]))

        ###############
        # Train with ILR
        ###############
        phase = time.perf_counter()
        if options.skip_train:
            missing = [agent.name for agent in agents if not (train_dir / agent.name).is_dir()]
            if missing:
                raise FileNotFoundError(
                    f"--skip_train reuses trained models, but {train_dir} has none for {missing}: run without it."
                )
        else:
            from ilr.train import main as train_main

            train_main(*parse_recipe([*recipe_argv, "--resume_from_checkpoint", "false"]))
        timings["train_s"] = time.perf_counter() - phase

        ###############
        # After: each trained agent alone
        ###############
        phase = time.perf_counter()
        after_results: dict[str, Path] = {}
        after_outcomes: dict[str, dict[str, dict[str, float]]] = {}
        for agent in agents:
            after_results[agent.name], after_outcomes[agent.name] = _evaluate(
                str(train_dir / agent.name),
                agent.name,
                agent,
                options,
                output_dir / "after" / agent.name,
                training_args,
            )
        timings["after_s"] = time.perf_counter() - phase
        console.announce("Evaluated after training in %s.", format_duration(timings["after_s"]))
    finally:
        shutdown_reward_pool()

    ###############
    # Table, curves, cards
    ###############
    table = build_table(before_outcomes, after_outcomes, n_resamples=options.n_resamples, seed=options.seed)
    markdown_table = format_table(table)
    curves_path = None
    metrics_path = train_dir / "metrics.jsonl"
    if metrics_path.is_file():
        curves = read_reward_curves(metrics_path, [agent.name for agent in agents])
        curves_path = render_reward_curves(
            curves,
            output_dir / "reward_curves.png",
            trained_stages=training_args.train_stages,
            title=f"ILR reward per step ({', '.join(script_args.reward_funcs)}; trained: "
            f"{', '.join(training_args.train_stages)})",
        )
    cards = {}
    for agent in agents:
        written = write_card(
            after_results[agent.name],
            output_dir / "cards" / agent.name,
            base_results_path=before_results[agent.name],
            recipe_path=options.config,
            model_name=agent.name,
        )
        cards[agent.name] = str(written["README.md"])
    timings["total_s"] = time.perf_counter() - start
    load_end = load_average()

    results = {
        "config": options.config,
        "command": _command(options),
        "evaluation": {
            "benchmark": DEMO_BENCHMARK,
            "file": options.eval_file,
            "questions": next(iter(next(iter(table.values())).values())).n,
            "decoding": "greedy, one answer per question",
            "max_new_tokens": options.max_new_tokens,
            "confidence": DEFAULT_CONFIDENCE,
            "n_resamples": options.n_resamples,
            "seed": options.seed,
        },
        "training": {
            "max_steps": training_args.max_steps,
            "skipped": options.skip_train,
            "train_stages": list(training_args.train_stages),
            "interaction_mode": training_args.interaction_mode,
            "output_dir": str(train_dir),
        },
        "agents": {
            agent: {
                "base_results": str(before_results[agent]),
                "results": str(after_results[agent]),
                "card": cards[agent],
                "metrics": {metric: comparison.to_dict() for metric, comparison in metrics.items()},
            }
            for agent, metrics in table.items()
        },
        "accuracy_gain": {agent: metrics["accuracy"].gain for agent, metrics in table.items()},
        "reward_curves": str(curves_path) if curves_path else None,
        "timing": {key: round(value, 1) for key, value in timings.items()},
        "machine": {"cores": cores, "torch_threads": threads, "load_start": load_start, "load_end": load_end},
    }
    write_text_atomic(output_dir / "results.json", json.dumps(results, indent=2) + "\n")
    write_text_atomic(output_dir / "results.md", _results_markdown(results, markdown_table))
    return results


def _results_markdown(results: dict[str, Any], markdown_table: str) -> str:
    evaluation, training, timing, machine = (
        results["evaluation"],
        results["training"],
        results["timing"],
        results["machine"],
    )
    steps = "skipped (models reused)" if training["skipped"] else f"{training['max_steps']} steps"
    lines = [
        "# ILR demo: each agent alone, before and after training together",
        "",
        f"Recipe `{results['config']}`; training {steps}, interaction `{training['interaction_mode']}`, trained "
        f"stages {', '.join(training['train_stages'])}.",
        f"Held-out questions: {evaluation['questions']} from `{evaluation['file']}` (never in the training file), "
        f"{evaluation['decoding']}, at most {evaluation['max_new_tokens']} new tokens.",
        "",
        markdown_table,
        "",
        "Accuracy: the last `\\boxed{}` verifies equal to the gold. Format: the last `\\boxed{}` holds a plain number "
        "(right or wrong). Intervals: percentile bootstrap over questions "
        f"({evaluation['n_resamples']:,} draws, seed {evaluation['seed']}); the difference is paired on the same "
        "questions.",
        "",
        f"Wall time {timing['total_s'] / 60:.1f} min (before {timing['before_s']:.0f} s, train {timing['train_s']:.0f} "
        f"s, after {timing['after_s']:.0f} s) on {machine['cores']} core(s), {machine['torch_threads']} torch "
        f"thread(s); load average {machine['load_start'][0]:.2f} at start, {machine['load_end'][0]:.2f} at the end.",
    ]
    if results["reward_curves"]:
        lines += ["", f"![Reward per step]({Path(results['reward_curves']).name})"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the demo and print the before/after table; `python recipes/demo/run_demo.py` (and `make demo`).

    Args:
        argv (`Sequence[str]`, *optional*):
            Arguments; defaults to `sys.argv[1:]`.

    Returns:
        `int`: 0 on success.
    """
    options = parse_args(argv)
    console.setup(verbose=options.verbose)
    output_dir = Path(options.output_dir)
    try:
        with console.log_file(output_dir / LOG_NAME):
            results = run_demo(options)
            console.result("\n" + (output_dir / "results.md").read_text(encoding="utf-8"))
            gains = [agent for agent, gain in results["accuracy_gain"].items() if gain]
            console.result(f"Accuracy gain with an interval above zero: {', '.join(gains) if gains else 'none'}.")
            console.result(
                f"Files: {output_dir}/results.md, results.json, reward_curves.png, cards/<agent>/README.md, {LOG_NAME}"
            )
    finally:
        console.teardown()  # `main` may be called in-process (tests): leave no handler behind
    return 0


# The reward pool starts worker processes with forkserver, which imports the main module again: keep the guard.
if __name__ == "__main__":
    sys.exit(main())
