r"""The offline demo that learns: evaluate each agent alone, train them together with ILR, evaluate again, compare.

    python -m ilr.demo [--config recipes/demo/ilr/config_smollm2_demo.yaml] [--output_dir outputs/demo/smollm2]
    python -m ilr.demo --quick            # a few steps and questions: checks the whole path in a few minutes

Steps, all in this process, offline:

1. **Before**: every distinct starting model of the recipe answers the held-out questions alone (greedy, the plain
   single-agent prompt, the answer read from `\boxed{}`), through [`~ilr.evaluate.run_evaluation`]. Agents that start
   from the same weights share this evaluation: greedy decoding gives them the same answers.
2. **Train**: [`ilr.train.main`] on the recipe (ILR: Idea3 share / analyse / fuse, Perception Calibration, GRPO
   updates), `--max_steps` steps; the trainer writes `metrics.jsonl` and each agent's final model.
3. **After**: each trained agent answers the same questions alone, with the same settings.
4. **Compare**: per agent, accuracy and answer-format compliance (a non-empty numeric `\boxed{}`), each before and
   after with a 95% bootstrap interval over questions ([`~ilr.stats.bootstrap_interval`]), and the paired difference
   after - before with its interval ([`~ilr.stats.paired_bootstrap`]); the reward curves from `metrics.jsonl`; an eval
   card per agent ([`~ilr.cards.write_card`], the base model's results as its baseline).

Output folder (`--output_dir`):

- `before/`, `after/<agent>/`: the evaluations (`run.json`, `details_arithmetic.jsonl`, `results_<name>.json`).
- `train/`: the ILR run (`metrics.jsonl`, one folder per trained agent).
- `cards/<agent>/`: eval card (`README.md`) and its chart (`eval_chart.png`).
- `reward_curves.png`: reward per step of every agent and Idea3 stage.
- `results.md`, `results.json`: the before/after table, settings, wall times and machine load.

The held-out questions are `recipes/demo/data/arithmetic_test.jsonl` (written by `recipes/demo/make_arithmetic.py`
after the training rows, never among them). They are evaluated as the benchmark `arithmetic` (plain integer golds),
registered at run time (see [`register_arithmetic_benchmark`]).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ilr.files import write_text_atomic
from ilr.stats import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, bootstrap_interval, paired_bootstrap


__all__ = [
    "DEMO_BENCHMARK",
    "METRICS",
    "Comparison",
    "build_table",
    "choose_threads",
    "compare_outcomes",
    "format_table",
    "is_compliant",
    "main",
    "outcomes_from_details",
    "read_reward_curves",
    "register_arithmetic_benchmark",
    "render_reward_curves",
]

logger = logging.getLogger(__name__)

DEMO_BENCHMARK = "arithmetic"
DEFAULT_CONFIG = "recipes/demo/ilr/config_smollm2_demo.yaml"
DEFAULT_EVAL_FILE = "recipes/demo/data/arithmetic_test.jsonl"
DEFAULT_OUTPUT_DIR = "outputs/demo/smollm2"
# Metric key -> label in the table. Accuracy: math-verify finds the answer equal to the gold (`ilr evaluate`'s scoring).
# Format: the last `\boxed{}` holds a plain number (after its last `=`), right or wrong: the answer-format compliance.
METRICS: dict[str, str] = {"accuracy": "accuracy", "format": "format (numeric \\boxed{})"}
# `--quick`: enough to exercise every step on the real model in a few minutes; its numbers mean nothing.
QUICK_STEPS = 2
QUICK_EVAL_QUESTIONS = 12


# ---------------------------------------------------------------------------------------------------------------------
# Pure parts: per-question outcomes, the before/after comparison, the table, the reward curves
# ---------------------------------------------------------------------------------------------------------------------
def is_compliant(extracted: str | None) -> bool:
    r"""
    Whether a final answer follows the answer format: a non-empty `\boxed{}` whose content is a plain number.

    The content is read after its last `=` or `\approx` and must be an integer, decimal or integer fraction (units and
    `\$` allowed), the rule the training reward ([`~ilr.rewards.score_math`], `training` preset) applies to numeric
    golds: `\boxed{17+21}` and `\boxed{}` are not compliant, `\boxed{38}` and `\boxed{17+21=38}` are. Accuracy uses
    math-verify's own verdicts (the `evaluation` preset), so a correct answer stated without a box is not compliant.

    Args:
        extracted (`str` or `None`):
            The content of the last `\boxed{}` (`ilr.rewards.extract_boxed`), `None` when there is none.

    Returns:
        `bool`: Whether the answer is a numeric box.
    """
    from ilr.rewards import is_numeric_answer

    return is_numeric_answer(extracted)


def outcomes_from_details(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """
    Per-question outcomes of one model from its evaluation details (one sample per question).

    Args:
        records (`Sequence[Mapping]`):
            Its details records (`ilr.evaluate.read_details` values), each with `id`, `correct` and `extracted`.

    Returns:
        `dict[str, dict[str, float]]`: metric (`accuracy`, `format`) -> question id -> 1.0 or 0.0.
    """
    outcomes: dict[str, dict[str, float]] = {metric: {} for metric in METRICS}
    for record in records:
        if len(record["correct"]) != 1:
            raise ValueError(
                f"Question {record['id']!r} has {len(record['correct'])} samples: the demo evaluates one greedy "
                "answer per question."
            )
        outcomes["accuracy"][record["id"]] = float(bool(record["correct"][0]))
        outcomes["format"][record["id"]] = float(is_compliant(record["extracted"][0]))
    return outcomes


@dataclass(frozen=True)
class Comparison:
    """
    One metric of one agent before and after training.

    Args:
        before (`dict`):
            Mean over the questions before training with its bootstrap interval (`Interval.to_dict()`).
        after (`dict`):
            The same after training.
        difference (`dict`):
            Paired difference after - before on the common questions (`PairedComparison.to_dict()`).
        n (`int`):
            Number of questions compared.
    """

    before: dict[str, Any]
    after: dict[str, Any]
    difference: dict[str, Any]
    n: int

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval of the difference lies strictly on one side of zero."""
        interval = self.difference["difference"]
        return interval["low"] > 0 or interval["high"] < 0

    @property
    def gain(self) -> bool:
        """Whether the interval of the difference lies strictly above zero: training helped."""
        return self.difference["difference"]["low"] > 0

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {
            "before": self.before,
            "after": self.after,
            "difference": self.difference,
            "n": self.n,
            "excludes_zero": self.excludes_zero,
            "gain": self.gain,
        }


def compare_outcomes(
    before: Mapping[str, float],
    after: Mapping[str, float],
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Comparison:
    """
    Compare per-question outcomes before and after training, on the questions both runs answered.

    Args:
        before (`Mapping[str, float]`):
            Question id -> outcome (0/1) before training.
        after (`Mapping[str, float]`):
            Question id -> outcome after training.
        confidence (`float`, *optional*, defaults to `0.95`):
            Coverage of the intervals.
        n_resamples (`int`, *optional*, defaults to `10000`):
            Bootstrap draws.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the draws.

    Returns:
        [`Comparison`]: Both means with their intervals and the paired difference after - before.
    """
    stats_kwargs = {"confidence": confidence, "n_resamples": n_resamples, "seed": seed}
    paired = paired_bootstrap(after, before, **stats_kwargs)
    common = [question for question in after if question in before]
    return Comparison(
        before=bootstrap_interval([before[q] for q in common], **stats_kwargs).to_dict(),
        after=bootstrap_interval([after[q] for q in common], **stats_kwargs).to_dict(),
        difference=paired.to_dict(),
        n=paired.n_common,
    )


def build_table(
    before: Mapping[str, Mapping[str, Mapping[str, float]]],
    after: Mapping[str, Mapping[str, Mapping[str, float]]],
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict[str, dict[str, Comparison]]:
    """
    The before/after comparison of every agent and metric.

    Args:
        before (`Mapping`):
            Agent -> metric -> question id -> outcome before training (see [`outcomes_from_details`]).
        after (`Mapping`):
            The same after training; its agents and metrics set the table's rows.
        confidence (`float`, *optional*, defaults to `0.95`):
            Coverage of the intervals.
        n_resamples (`int`, *optional*, defaults to `10000`):
            Bootstrap draws.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the draws (the same for every row, so rows with the same data get the same interval).

    Returns:
        `dict[str, dict[str, Comparison]]`: agent -> metric -> [`Comparison`].
    """
    missing = [agent for agent in after if agent not in before]
    if missing:
        raise ValueError(f"No evaluation before training for agent(s) {missing}: every row needs both.")
    return {
        agent: {
            metric: compare_outcomes(
                before[agent][metric], outcomes, confidence=confidence, n_resamples=n_resamples, seed=seed
            )
            for metric, outcomes in metrics.items()
        }
        for agent, metrics in after.items()
    }


def _pct(interval: Mapping[str, Any], *, signed: bool = False) -> str:
    estimate = f"{100 * interval['estimate']:+.1f}" if signed else f"{100 * interval['estimate']:.1f}"
    return f"{estimate} [{100 * interval['low']:.1f}, {100 * interval['high']:.1f}]"


def format_table(table: Mapping[str, Mapping[str, Comparison]], *, confidence: float = DEFAULT_CONFIDENCE) -> str:
    """
    The before/after table in Markdown: one row per agent and metric, percentages with their intervals.

    Args:
        table (`Mapping[str, Mapping[str, Comparison]]`):
            From [`build_table`].
        confidence (`float`, *optional*, defaults to `0.95`):
            Coverage of the intervals, for the header.

    Returns:
        `str`: The table; the last column says whether the interval of the difference excludes zero.
    """
    level = f"{100 * confidence:g}%"
    header = [
        "Agent",
        "Metric",
        f"Before (%) [{level} CI]",
        f"After (%) [{level} CI]",
        f"After - before (pp) [{level} CI, paired]",
        "Excludes 0",
        "n",
    ]
    lines = ["| " + " | ".join(header) + " |", "|---|---|---:|---:|---:|:---:|---:|"]
    for agent, metrics in table.items():
        for metric, comparison in metrics.items():
            row = [
                agent,
                METRICS.get(metric, metric),
                _pct(comparison.before),
                _pct(comparison.after),
                _pct(comparison.difference["difference"], signed=True),
                "yes" if comparison.excludes_zero else "no",
                str(comparison.n),
            ]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def read_reward_curves(
    path: str | os.PathLike, agents: Sequence[str]
) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """
    Reward per step of every agent and Idea3 stage, from the trainer's `metrics.jsonl`.

    Args:
        path (`str` or `os.PathLike`):
            The `metrics.jsonl` of the run.
        agents (`Sequence[str]`):
            Agent names, as in the metric keys `ilr/<agent>/<stage>/reward`.

    Returns:
        `dict[str, dict[str, list[tuple[int, float]]]]`: agent -> stage -> `(step, reward)` in step order; steps where
        the reward is missing (NaN, logged as `null`) are left out.
    """
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {agent: {} for agent in agents}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        for agent in agents:
            prefix = f"ilr/{agent}/"
            for key, value in record.items():
                stage, _, leaf = key.removeprefix(prefix).partition("/")
                if key.startswith(prefix) and leaf == "reward" and value is not None:
                    curves[agent].setdefault(stage, []).append((int(record["step"]), float(value)))
    for stages in curves.values():
        for points in stages.values():
            points.sort()
    return curves


def render_reward_curves(
    curves: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]],
    path: str | os.PathLike,
    *,
    trained_stages: Sequence[str] = ("share", "fuse"),
    title: str = "ILR reward per step",
) -> Path:
    """
    Plot the reward curves, one panel per agent and one line per Idea3 stage (trained stages solid, others dashed).

    Drawn on matplotlib's Agg canvas, so it needs no display and leaves pyplot's global state alone.

    Args:
        curves (`Mapping`):
            From [`read_reward_curves`].
        path (`str` or `os.PathLike`):
            PNG file to write.
        trained_stages (`Sequence[str]`, *optional*, defaults to `("share", "fuse")`):
            The stages that got a GRPO loss (`train_stages`).
        title (`str`, *optional*, defaults to `"ILR reward per step"`):
            Figure title.

    Returns:
        `pathlib.Path`: The written file.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    agents = list(curves)
    figure = Figure(figsize=(4.2 * max(1, len(agents)), 3.4), dpi=120)
    FigureCanvasAgg(figure)
    panels = figure.subplots(1, max(1, len(agents)), sharey=True, squeeze=False)[0]
    for axes, agent in zip(panels, agents):
        for stage, points in curves[agent].items():
            if not points:
                continue
            steps, values = zip(*points)
            trained = stage in trained_stages
            axes.plot(
                steps,
                values,
                marker="o",
                markersize=3,
                linestyle="-" if trained else "--",
                linewidth=1.6 if trained else 1.0,
                label=f"{stage}{' (trained)' if trained else ''}",
            )
        axes.set_title(agent, fontsize=9)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    panels[0].set_ylabel("mean reward")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def choose_threads(cores: int, load: float) -> int:
    """
    Torch threads for this run: the cores not already busy, at least one.

    On a machine shared with other jobs, intra-op threads that wait for a busy core slow every operation down many
    times (measured: one thread ran a SmolLM2 `generate` 7x faster than two on two cores under a load of 5), so only the
    idle cores are used.

    Args:
        cores (`int`):
            Cores this process may run on.
        load (`float`):
            The 1-minute load average before the run starts.

    Returns:
        `int`: Between 1 and `cores`.
    """
    return max(1, min(cores, cores - math.floor(load)))


# ---------------------------------------------------------------------------------------------------------------------
# The benchmark and the runs
# ---------------------------------------------------------------------------------------------------------------------
def register_arithmetic_benchmark() -> None:
    """
    Make the demo's held-out questions an evaluable benchmark: `arithmetic`, local files only, plain integer golds.

    `ilr.evaluate` evaluates registered benchmarks; the spec is added to `ilr.data.BENCHMARKS` unless it is there.
    """
    from ilr.data import BENCHMARKS, BenchmarkSpec

    BENCHMARKS.setdefault(
        DEMO_BENCHMARK,
        BenchmarkSpec(
            name=DEMO_BENCHMARK,
            hub_id=None,
            split="test",
            question_column="problem",
            answer_column="answer",
            answer_format="plain",
            id_column="id",
            notes="The CPU demo's arithmetic questions (recipes/demo/make_arithmetic.py); local files only.",
        ),
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
        benchmarks=[DEMO_BENCHMARK],
        data_files={DEMO_BENCHMARK: options.eval_file},
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
        command=f"python -m ilr.demo {' '.join(options.argv)}".strip(),
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


def _load_summary() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:  # not available on this platform
        return (float("nan"),) * 3


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


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
        prog="python -m ilr.demo",
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
    load_start = _load_summary()
    cores = _cores()
    threads = options.threads or choose_threads(cores, load_start[0])
    torch.set_num_threads(threads)
    output_dir = Path(options.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    train_dir = output_dir / "train"
    register_arithmetic_benchmark()

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
    logger.info("Demo: %d torch thread(s) on %d core(s), load average %.2f.", threads, cores, load_start[0])
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
    load_end = _load_summary()

    results = {
        "config": options.config,
        "command": f"python -m ilr.demo {' '.join(options.argv)}".strip(),
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
    Run the demo and print the before/after table; `python -m ilr.demo` (and `make demo`).

    Args:
        argv (`Sequence[str]`, *optional*):
            Arguments; defaults to `sys.argv[1:]`.

    Returns:
        `int`: 0 on success.
    """
    options = parse_args(argv)
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO,
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    results = run_demo(options)
    output_dir = Path(options.output_dir)
    print()
    print((output_dir / "results.md").read_text(encoding="utf-8"))
    gains = [agent for agent, gain in results["accuracy_gain"].items() if gain]
    print(f"Accuracy gain with an interval above zero: {', '.join(gains) if gains else 'none'}.")
    print(f"Files: {output_dir}/results.md, results.json, reward_curves.png, cards/<agent>/README.md")
    return 0


# The reward pool starts worker processes with forkserver, which imports the main module again: keep the guard.
if __name__ == "__main__":
    sys.exit(main())
