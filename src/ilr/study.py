r"""The paper's comparison in miniature: ILR against single-agent GRPO, with ablations, over seeds, with intervals.

    ilr study --config recipes/demo/study/study_smollm2_cpu.yaml      # or: make study
    ilr study --config study.yaml --report_only                         # the table from the runs finished so far

A study config names an ILR recipe, the arms, the seeds and the held-out evaluation. Every arm is that recipe with a
few keys changed ([`ARMS`]; a config may define its own), so all arms train on the same data with the same rewards,
lengths and optimizer:

- `ilr`: the recipe as written (normally `interaction_mode: dynamic`, calibration on);
- `grpo`: `method: grpo`, each distinct starting model trained alone with TRL's `GRPOTrainer`;
- `grpo_compute_matched`: as `grpo` with `compute_matched: true`: as many completion tokens per question as an ILR
  agent generates (share + analyses + fuse);
- `ilr_no_calibration`: `calibration: false` (Perception Calibration off: each stage's own GRPO advantages);
- `ilr_cooperate` / `ilr_compete`: `interaction_mode: cooperate` / `compete` instead of the IRT rule.

Steps, each (arm, seed) run in its own folder `<output_dir>/runs/<arm>/seed<seed>[/<agent>]` and its own process:

1. **Before**: each distinct starting model answers the held-out questions alone (`ilr.evaluate`, the single-agent
   protocol), once for the whole study: greedy decoding gives every arm and seed the same answers.
2. **Train**: `src/ilr/train.py` on the run's `recipe.yaml`, started by the config's `launcher` (default: this Python;
   e.g. `accelerate launch --config_file ...` on GPUs). A crash ends that run, not the study.
3. **After**: each trained agent answers the same questions alone, with the same settings.
4. **Report**: per arm and agent, held-out accuracy with a 95% interval over seeds and questions
   ([`~ilr.stats.crossed_bootstrap`]), the paired difference against the starting model and against the `grpo` arm
   on the same questions ([`~ilr.stats.paired_crossed_bootstrap`]), the tokens generated in training
   ([`~ilr.compute.generated_tokens`]); written to `results.md`, `results.json` and `accuracy_vs_compute.png`.

Resuming: a run whose folder holds `done.json` is skipped; a run that stopped during training continues from its last
checkpoint (`ilr.train` finds it), or starts over when it saved none; a trained run whose evaluation stopped is
evaluated again. Running the same command again is enough.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ilr.files import write_text_atomic
from ilr.stats import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, crossed_bootstrap, paired_crossed_bootstrap


__all__ = [
    "ARMS",
    "Run",
    "StudyConfig",
    "StudyConfigError",
    "StudyRow",
    "check_arms",
    "format_study_table",
    "load_study_config",
    "main",
    "plan_runs",
    "run_study",
    "summarize_study",
]

logger = logging.getLogger(__name__)

# Arm name -> the recipe keys it changes. The `ilr` arm is the recipe as written.
ARMS: dict[str, dict[str, Any]] = {
    "ilr": {},
    "grpo": {"method": "grpo"},
    "grpo_compute_matched": {"method": "grpo", "compute_matched": True},
    "ilr_no_calibration": {"calibration": False},
    "ilr_cooperate": {"interaction_mode": "cooperate"},
    "ilr_compete": {"interaction_mode": "compete"},
}
BASELINE_ARM = "grpo"
BEFORE_ARM = "before"
DONE_NAME = "done.json"
TRAINED_NAME = "trained.json"
RECIPE_NAME = "recipe.yaml"
# Evaluation settings the study sets itself, per model.
_EVAL_KEYS_SET_BY_STUDY = ("model", "name", "output_dir", "overwrite", "config", "protocol", "baseline", "command")


# ---------------------------------------------------------------------------------------------------------------------
# The config and the plan
# ---------------------------------------------------------------------------------------------------------------------
class StudyConfigError(ValueError):
    """A study config that cannot run; the message names the fix."""


@dataclass
class StudyConfig:
    """
    A study: which recipe, which arms, which seeds, which held-out questions.

    Args:
        recipe (`str`):
            The ILR recipe (`method: ilr`) every arm is derived from.
        output_dir (`str`):
            Folder of the study: `before/`, `runs/`, `irt/`, `results.*`.
        arms (`dict[str, dict]`):
            Arm name -> recipe keys it changes; built-in names ([`ARMS`]) may be listed without their keys.
        seeds (`list[int]`):
            Training seeds (`seed` of each run's recipe).
        evaluation (`dict`):
            [`~ilr.evaluate.EvalConfig`] settings of every evaluation (`benchmarks`, `data_files`, `limit`,
            `max_new_tokens`, `batch_size`, `backend`, ...); the study sets the model, name and folder.
        overrides (`dict`, *optional*):
            Recipe keys changed in every arm (e.g. `max_steps`).
        launcher (`list[str]`, *optional*):
            Command that trains a run (see [`launch_command`]), e.g. `[accelerate, launch, --config_file, zero3.yaml]`
            or `[bash, recipes/slurm/train_ilr.slurm, "{recipe}"]`; defaults to this Python interpreter.
        baseline (`str`, *optional*, defaults to `"grpo"`):
            The arm every other arm is compared with, on the same questions.
        threads (`int`, *optional*):
            Torch threads of each training and evaluation process (`OMP_NUM_THREADS`); defaults to the environment's.
        confidence (`float`, *optional*, defaults to `0.95`):
            Coverage of the intervals.
        n_resamples (`int`, *optional*, defaults to `10000`):
            Bootstrap draws.
    """

    recipe: str
    output_dir: str
    arms: dict[str, dict[str, Any]]
    seeds: list[int]
    evaluation: dict[str, Any]
    overrides: dict[str, Any] = field(default_factory=dict)
    launcher: list[str] = field(default_factory=list)
    baseline: str = BASELINE_ARM
    threads: int | None = None
    confidence: float = DEFAULT_CONFIDENCE
    n_resamples: int = DEFAULT_RESAMPLES


def load_study_config(path: str | os.PathLike, **overrides: Any) -> StudyConfig:
    """
    Read a study config (YAML) and check it.

    Args:
        path (`str` or `os.PathLike`):
            The config file.
        **overrides:
            Top-level keys that replace the file's (`None` values are ignored), e.g. `output_dir`, `seeds`.

    Returns:
        [`StudyConfig`]: The checked config; `arms` maps every arm to its recipe keys.

    Raises:
        `StudyConfigError`: an unknown key or arm, no seed, a baseline that is not an arm, or a recipe that is not ILR.
    """
    import yaml

    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    raw.update({key: value for key, value in overrides.items() if value is not None})
    known = set(StudyConfig.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise StudyConfigError(f"{path}: unknown study key(s) {unknown}; the keys are {sorted(known)}.")
    missing = [key for key in ("recipe", "output_dir", "seeds", "evaluation") if key not in raw]
    if missing:
        raise StudyConfigError(f"{path}: missing key(s) {missing} (see recipes/demo/study/study_smollm2_cpu.yaml).")
    arms_in = raw.get("arms") or list(ARMS)
    arms: dict[str, dict[str, Any]] = {}
    for item in arms_in if isinstance(arms_in, list) else list(arms_in.items()):
        name, keys = (item, None) if isinstance(item, str) else item
        if keys is None:
            if name not in ARMS:
                raise StudyConfigError(
                    f"{path}: arm {name!r} is not built in ({sorted(ARMS)}): give its recipe keys, e.g. "
                    f"`arms: {{{name}: {{learning_rate: 1.0e-6}}}}`."
                )
            keys = ARMS[name]
        arms[name] = dict(keys)
    raw["arms"] = arms
    raw["seeds"] = [int(seed) for seed in raw["seeds"]] if isinstance(raw["seeds"], list) else [int(raw["seeds"])]
    if not raw["seeds"] or len(set(raw["seeds"])) != len(raw["seeds"]):
        raise StudyConfigError(f"{path}: `seeds` must be a non-empty list of distinct integers (got {raw['seeds']}).")
    launcher = raw.get("launcher") or []
    raw["launcher"] = launcher.split() if isinstance(launcher, str) else list(launcher)
    config = StudyConfig(**raw)
    if config.baseline not in config.arms:
        raise StudyConfigError(
            f"{path}: the baseline arm {config.baseline!r} is not among the arms {list(config.arms)}."
        )
    set_by_study = sorted(set(config.evaluation) & set(_EVAL_KEYS_SET_BY_STUDY))
    if set_by_study or not (config.evaluation.get("benchmarks") or config.evaluation.get("local_benchmarks")):
        raise StudyConfigError(
            f"{path}: `evaluation` needs `benchmarks` (registered) or `local_benchmarks` (`ilr.data.local_benchmark` "
            f"arguments) and must not set {set_by_study or _EVAL_KEYS_SET_BY_STUDY}: "
            "the study evaluates each model alone, in its own folder."
        )
    recipe = _read_recipe(config.recipe)
    if recipe.get("method", "ilr") != "ilr":
        raise StudyConfigError(f"{config.recipe}: a study derives its arms from an ILR recipe (`method: ilr`).")
    return config


def _read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}


@dataclass(frozen=True)
class Run:
    """
    One training run of the study.

    Args:
        arm (`str`):
            Arm name.
        seed (`int`):
            Training seed.
        agents (`tuple[str, ...]`):
            Names of the agents it trains (one for a GRPO arm).
        directory (`Path`):
            Its folder: `recipe.yaml`, `train/`, `train.log`, `eval/<agent>/`, `done.json`.
    """

    arm: str
    seed: int
    agents: tuple[str, ...]
    directory: Path

    @property
    def train_dir(self) -> Path:
        return self.directory / "train"

    @property
    def done(self) -> bool:
        return (self.directory / DONE_NAME).is_file()


def _starting_model(agent: Mapping[str, Any]) -> tuple:
    return tuple(str(agent.get(key)) for key in ("model_name_or_path", "model_revision", "gguf_file", "dtype"))


def baseline_agents(agents: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """
    Agent name -> the agent whose single-agent GRPO run stands for its starting model (the first agent with it).

    Agents that start from the same weights share one GRPO run per seed: it would train the same model twice.

    Args:
        agents (`Sequence[Mapping]`):
            The recipe's `agents` entries.

    Returns:
        `dict[str, str]`: every agent's name -> a name among the first agents of each starting model.
    """
    first: dict[tuple, str] = {}
    return {agent["name"]: first.setdefault(_starting_model(agent), agent["name"]) for agent in agents}


def plan_runs(config: StudyConfig, agents: Sequence[Mapping[str, Any]]) -> list[Run]:
    """
    The study's runs, seed by seed (every arm of a seed before the next seed, so a stopped study has whole seeds).

    Args:
        config ([`StudyConfig`]):
            The study.
        agents (`Sequence[Mapping]`):
            The recipe's `agents` entries.

    Returns:
        `list[Run]`: ILR arms train all agents in one run; GRPO arms one run per distinct starting model.
    """
    root = Path(config.output_dir) / "runs"
    solo = sorted(set(baseline_agents(agents).values()), key=[a["name"] for a in agents].index)
    runs = []
    for seed in config.seeds:
        for arm, keys in config.arms.items():
            folder = root / arm / f"seed{seed}"
            if keys.get("method") == "grpo":
                runs += [Run(arm, seed, (name,), folder / name) for name in solo]
            else:
                runs.append(Run(arm, seed, tuple(agent["name"] for agent in agents), folder))
    return runs


def run_recipe(config: StudyConfig, run: Run, recipe: Mapping[str, Any]) -> dict[str, Any]:
    """
    The recipe of one run: the study's recipe, then `overrides`, then the arm's keys, then the run's seed and folder.

    Dynamic Interaction's IRT estimate is cached in `<output_dir>/irt` (unless the recipe names a folder), so arms and
    seeds with the same agents and data compute it once.

    Args:
        config ([`StudyConfig`]):
            The study.
        run ([`Run`]):
            The run.
        recipe (`Mapping`):
            The study's ILR recipe, parsed.

    Returns:
        `dict`: The run's recipe.
    """
    derived = {**recipe, **config.overrides, **config.arms[run.arm]}
    derived["agents"] = [dict(agent) for agent in recipe["agents"] if agent["name"] in run.agents]
    derived["seed"] = run.seed
    derived["output_dir"] = str(run.train_dir)
    derived.setdefault("difficulty_cache_dir", str(Path(config.output_dir) / "irt"))
    for key in ("push_to_hub", "resume_from_checkpoint"):
        derived.pop(key, None)  # a study keeps its models local; `ilr.train` finds the run's own checkpoints
    return derived


def check_arms(config: StudyConfig, recipe: Mapping[str, Any], runs: Sequence[Run]) -> None:
    """
    Parse the recipe of every arm as `ilr check` does, before anything is trained: a bad key fails the study at once,
    naming the arm, instead of one run after hours.

    Args:
        config ([`StudyConfig`]):
            The study.
        recipe (`Mapping`):
            The study's ILR recipe, parsed.
        runs (`Sequence[Run]`):
            The planned runs; the first of each arm is checked.

    Raises:
        `StudyConfigError`: an arm's recipe does not parse; the message holds the recipe parser's.
    """
    import tempfile

    import yaml

    from ilr.configs import parse_recipe

    checked: set[str] = set()
    with tempfile.TemporaryDirectory() as folder:
        for run in runs:
            if run.arm in checked:
                continue
            checked.add(run.arm)
            path = Path(folder) / f"{run.arm}.yaml"
            path.write_text(yaml.safe_dump(run_recipe(config, run, recipe), sort_keys=False), encoding="utf-8")
            try:  # hardware the recipe is meant for (GPUs, vLLM) is a note here, not an error
                parse_recipe(["--config", str(path)], hardware_notes=[])
            except (ValueError, TypeError) as error:
                raise StudyConfigError(f"arm {run.arm!r} (keys {config.arms[run.arm]}): {error}") from error


# ---------------------------------------------------------------------------------------------------------------------
# Processes: training and evaluation, each in a child that ends with the study
# ---------------------------------------------------------------------------------------------------------------------
class RunFailed(RuntimeError):
    """A training or evaluation process of one run failed; the study goes on with the other runs."""


def _child_env(config: StudyConfig) -> dict[str, str]:
    env = dict(os.environ)
    if config.threads:
        env["OMP_NUM_THREADS"] = str(config.threads)
    return env


def _run_child(command: list[str], log: Path, config: StudyConfig) -> None:
    """Run one child to its end, its output appended to `log`; SIGTERM/SIGINT to the study stop it first."""
    from ilr.lifetime import start_child, stop_child

    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(command)}\n".encode())
    child = start_child(command, log, env=_child_env(config), append=True)
    try:
        code = child.wait()
    finally:
        if child.poll() is None:  # the study is being stopped: let the trainer save its checkpoint and end
            stop_child(child, grace=120.0)
    if code != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-5:]
        raise RunFailed(f"`{' '.join(command[:4])} ...` exited with {code}; see {log}:\n  " + "\n  ".join(tail))


def launch_command(launcher: Sequence[str], train_script: str, recipe: str | os.PathLike) -> list[str]:
    """
    The command that trains one run.

    Args:
        launcher (`Sequence[str]`):
            The study's `launcher`: empty for this Python; a command to which `<train_script> --config <recipe>` is
            appended (`accelerate launch --config_file zero3.yaml`); or a command with the placeholders `{recipe}`
            (and `{train_script}`) that starts training itself (`bash recipes/slurm/train_ilr.slurm {recipe}`).
        train_script (`str`):
            Path of `ilr/train.py`.
        recipe (`str` or `os.PathLike`):
            The run's recipe.

    Returns:
        `list[str]`: The command.
    """
    if any("{recipe}" in part or "{train_script}" in part for part in launcher):
        return [part.format(recipe=recipe, train_script=train_script) for part in launcher]
    return [*(launcher or [sys.executable]), train_script, "--config", str(recipe)]


def _train(config: StudyConfig, run: Run, recipe: Mapping[str, Any]) -> dict[str, Any]:
    import yaml

    import ilr.train
    from ilr.compute import generated_tokens

    trained = run.directory / TRAINED_NAME
    if trained.is_file():
        return json.loads(trained.read_text(encoding="utf-8"))
    run.directory.mkdir(parents=True, exist_ok=True)
    if run.train_dir.is_dir() and not any(run.train_dir.glob("checkpoint-*")):
        shutil.rmtree(run.train_dir)  # stopped before its first checkpoint: start over, no stale metrics lines
    recipe_path = run.directory / RECIPE_NAME
    write_text_atomic(recipe_path, yaml.safe_dump(dict(recipe), sort_keys=False))
    command = launch_command(config.launcher, ilr.train.__file__, recipe_path)
    start = time.perf_counter()
    _run_child(command, run.directory / "train.log", config)
    record = {
        "train_s": round(time.perf_counter() - start, 1),
        "generated_tokens": generated_tokens(run.train_dir, run.agents),
        "models": {agent: str(run.train_dir / agent) for agent in run.agents},
    }
    write_text_atomic(trained, json.dumps(record, indent=2) + "\n")
    return record


def _evaluate(
    config: StudyConfig, models: Sequence[tuple[str, str, Mapping[str, Any], Path]], log: Path
) -> list[Path]:
    """
    Evaluate models alone, one after the other in one child process; their results files.

    Args:
        config ([`StudyConfig`]):
            The study (its `evaluation` settings).
        models (`Sequence[tuple]`):
            `(model folder or id, name, the recipe's agent entry, output folder)` for each model.
        log (`Path`):
            The child's output.
    """
    requests = []
    for model, name, agent, folder in models:
        requests.append(
            {
                **config.evaluation,
                "model": model,
                "name": name,
                "dtype": agent.get("dtype"),
                "gguf_file": agent.get("gguf_file") if model == agent["model_name_or_path"] else None,
                "output_dir": str(folder),
                "overwrite": True,  # new weights: never reuse answers of earlier ones
                "n_resamples": config.n_resamples,
                "command": f"ilr study (evaluation of {name})",
            }
        )
    log.parent.mkdir(parents=True, exist_ok=True)
    request_path = log.with_suffix(".json")
    write_text_atomic(request_path, json.dumps(requests, indent=2) + "\n")
    _run_child([sys.executable, "-m", "ilr.study", "_evaluate", str(request_path)], log, config)
    return [Path(request["output_dir"]) / f"results_{request['name']}.json" for request in requests]


def _evaluate_requests(path: str) -> int:
    """The evaluation child: `python -m ilr.study _evaluate <requests.json>`, each an `EvalConfig`'s settings; a
    request's `local_benchmarks` are [`~ilr.data.local_benchmark`] arguments (benchmarks in local files only)."""
    from ilr.data import local_benchmark
    from ilr.evaluate import EvalConfig, run_evaluation

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for request in json.loads(Path(path).read_text(encoding="utf-8")):
        local = [local_benchmark(**spec) for spec in request.pop("local_benchmarks", [])]
        run_evaluation(EvalConfig(**{**request, "benchmarks": [*request.get("benchmarks", []), *local]}))
    return 0


def per_question_scores(results_path: str | os.PathLike) -> dict[str, float]:
    """
    Question -> score of one evaluated model, over all its benchmarks (ids `<benchmark>/<id>`).

    Args:
        results_path (`str` or `os.PathLike`):
            A `results_<name>.json` of `ilr evaluate`.

    Returns:
        `dict[str, float]`: The fraction of correct samples of each question.
    """
    from ilr.evaluate import load_results, per_problem_accuracy

    results = load_results(results_path)
    return {
        f"{benchmark}/{problem}": score
        for benchmark, result in results["benchmarks"].items()
        for problem, score in per_problem_accuracy(result).items()
    }


# ---------------------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StudyRow:
    """
    One arm and agent of the study, over its seeds.

    Args:
        arm (`str`):
            Arm name (`before` for the starting model).
        agent (`str`):
            Agent name.
        seeds (`list[int]`):
            The seeds it has results for.
        accuracy (`dict`):
            Mean held-out accuracy over seeds and questions with its interval (`Interval.to_dict()`).
        vs_before (`dict`, *optional*):
            Paired difference against the starting model (`PairedComparison.to_dict()`).
        vs_baseline (`dict`, *optional*):
            Paired difference against the baseline arm, same starting model.
        generated_tokens (`float`, *optional*):
            Tokens this agent generated in training, mean over seeds.
    """

    arm: str
    agent: str
    seeds: list[int]
    accuracy: dict[str, Any]
    vs_before: dict[str, Any] | None = None
    vs_baseline: dict[str, Any] | None = None
    generated_tokens: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return dict(self.__dict__)


def summarize_study(
    scores: Mapping[str, Mapping[str, Mapping[int, Mapping[str, float]]]],
    before: Mapping[str, Mapping[str, float]],
    baseline_of: Mapping[str, str],
    *,
    baseline: str = BASELINE_ARM,
    tokens: Mapping[str, Mapping[str, Mapping[int, float]]] | None = None,
    confidence: float = DEFAULT_CONFIDENCE,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> list[StudyRow]:
    """
    The study's rows: accuracy over seeds and questions, and paired differences, per arm and agent.

    Args:
        scores (`Mapping`):
            Arm -> agent -> seed -> question id -> score after training.
        before (`Mapping`):
            Agent -> question id -> score of its starting model.
        baseline_of (`Mapping[str, str]`):
            Agent -> the agent of the baseline arm trained from the same starting model ([`baseline_agents`]).
        baseline (`str`, *optional*, defaults to `"grpo"`):
            The baseline arm; its own rows and arms without its agent get no `vs_baseline`.
        tokens (`Mapping`, *optional*):
            Arm -> agent -> seed -> generated tokens in training.
        confidence (`float`, *optional*, defaults to `0.95`):
            Coverage of the intervals.
        n_resamples (`int`, *optional*, defaults to `10000`):
            Bootstrap draws.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the draws (the same for every row).

    Returns:
        `list[StudyRow]`: One `before` row per starting model (the agents of `baseline_of`'s values), then one row
        per arm and agent in the order of `scores`.
    """
    stats = {"confidence": confidence, "n_resamples": n_resamples, "seed": seed}
    rows = [
        StudyRow(BEFORE_ARM, agent, [], crossed_bootstrap([before[agent]], **stats).to_dict(), generated_tokens=0.0)
        for agent in dict.fromkeys(baseline_of.values())
        if agent in before
    ]
    for arm, agents in scores.items():
        for agent, by_seed in agents.items():
            seeds = sorted(by_seed)
            if not seeds:
                continue
            runs = [by_seed[s] for s in seeds]
            reference = scores.get(baseline, {}).get(baseline_of.get(agent, agent), {})
            vs_baseline = None
            if arm != baseline and reference:
                vs_baseline = paired_crossed_bootstrap(runs, [reference[s] for s in sorted(reference)], **stats)
            vs_before = paired_crossed_bootstrap(runs, [before[agent]], **stats) if agent in before else None
            agent_tokens = (tokens or {}).get(arm, {}).get(agent, {})
            rows.append(
                StudyRow(
                    arm,
                    agent,
                    seeds,
                    crossed_bootstrap(runs, **stats).to_dict(),
                    vs_before=vs_before.to_dict() if vs_before else None,
                    vs_baseline=vs_baseline.to_dict() if vs_baseline else None,
                    generated_tokens=(
                        sum(agent_tokens[s] for s in seeds) / len(seeds)
                        if all(s in agent_tokens for s in seeds)
                        else None
                    ),
                )
            )
    return rows


def _pct(interval: Mapping[str, Any] | None, *, signed: bool = False) -> str:
    if interval is None:
        return "-"
    spec = "+.1f" if signed else ".1f"
    values = [format(100 * interval[key], spec) for key in ("estimate", "low", "high")]
    return f"{values[0]} [{values[1]}, {values[2]}]"


def format_study_table(rows: Sequence[StudyRow], *, baseline: str = BASELINE_ARM, confidence: float = 0.95) -> str:
    """
    The study's table in Markdown.

    Args:
        rows (`Sequence[StudyRow]`):
            From [`summarize_study`].
        baseline (`str`, *optional*, defaults to `"grpo"`):
            The baseline arm, for the header.
        confidence (`float`, *optional*, defaults to `0.95`):
            Coverage of the intervals, for the header.

    Returns:
        `str`: One line per row; intervals in percentage points.
    """
    level = f"{100 * confidence:g}%"
    header = [
        "Arm",
        "Agent",
        "Seeds",
        "Generated tokens",
        f"Accuracy (%) [{level} CI]",
        f"vs before (pp) [{level} CI]",
        f"vs {baseline} (pp) [{level} CI]",
        "Questions",
    ]
    lines = ["| " + " | ".join(header) + " |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        paired = row.vs_before or row.vs_baseline
        questions = paired["n_common"] if paired else "-"
        tokens = "-" if row.generated_tokens is None else f"{row.generated_tokens:,.0f}"
        cells = [
            row.arm,
            row.agent,
            str(len(row.seeds)) if row.seeds else "-",
            tokens,
            _pct(row.accuracy),
            _pct(row.vs_before and row.vs_before["difference"], signed=True),
            _pct(row.vs_baseline and row.vs_baseline["difference"], signed=True),
            str(questions),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_accuracy_vs_compute(rows: Sequence[StudyRow], path: str | os.PathLike, *, title: str) -> Path:
    """
    Plot held-out accuracy (with its interval) against the tokens generated in training, one marker per arm and agent.

    Args:
        rows (`Sequence[StudyRow]`):
            From [`summarize_study`]; rows without a token count are left out.
        path (`str` or `os.PathLike`):
            PNG file to write.
        title (`str`):
            Figure title.

    Returns:
        `pathlib.Path`: The written file.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.0, 4.2), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    markers = "osD^v<>Px*"
    arms = list(dict.fromkeys(row.arm for row in rows))
    agents = list(dict.fromkeys(row.agent for row in rows))
    for row in rows:
        if row.generated_tokens is None:
            continue
        accuracy = row.accuracy
        axes.errorbar(
            row.generated_tokens,
            100 * accuracy["estimate"],
            yerr=[[100 * (accuracy["estimate"] - accuracy["low"])], [100 * (accuracy["high"] - accuracy["estimate"])]],
            fmt=markers[agents.index(row.agent) % len(markers)],
            color=f"C{arms.index(row.arm) % 10}",
            capsize=3,
            label=f"{row.arm} / {row.agent}",
        )
    axes.set_xlabel("tokens generated in training (per agent, mean over seeds)")
    axes.set_ylabel("held-out accuracy (%)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="best")
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------------------------------
def _load_average() -> list[float]:
    with contextlib.suppress(OSError):
        return [round(value, 2) for value in os.getloadavg()]
    return []


class _Stop(Exception):
    """SIGTERM reached the study: the running child is stopped, finished runs stay finished."""


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop(signal.Signals(signum).name)


def run_study(config: StudyConfig, *, report_only: bool = False) -> dict[str, Any]:
    """
    Evaluate the starting models, train and evaluate every run not yet done, and write the report.

    Args:
        config ([`StudyConfig`]):
            The study.
        report_only (`bool`, *optional*, defaults to `False`):
            Only write the report, from the runs finished so far.

    Returns:
        `dict`: The content of `results.json`.
    """
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    recipe = _read_recipe(config.recipe)
    agents = recipe["agents"]
    by_name = {agent["name"]: agent for agent in agents}
    runs = plan_runs(config, agents)
    baseline_of = baseline_agents(agents)
    if not report_only:
        check_arms(config, recipe, runs)
    failures: dict[str, str] = {}
    started, load_start = time.perf_counter(), _load_average()
    previous_handler = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        ###############
        # Before: each distinct starting model alone, once
        ###############
        before_results: dict[str, Path] = {}
        todo = []
        for name in dict.fromkeys(baseline_of.values()):
            folder = output_dir / BEFORE_ARM / name
            before_results[name] = folder / f"results_{name}.json"
            if not (folder / DONE_NAME).is_file():
                todo.append((by_name[name]["model_name_or_path"], name, by_name[name], folder))
        if todo and not report_only:
            logger.info("Before training: evaluating %s alone.", [name for _, name, _, _ in todo])
            _evaluate(config, todo, output_dir / BEFORE_ARM / "eval.log")
            for _, name, _, folder in todo:
                write_text_atomic(folder / DONE_NAME, json.dumps({"results": str(before_results[name])}) + "\n")
        before_results = {name: path for name, path in before_results.items() if path.is_file()}
        ###############
        # Train and evaluate every run not done yet
        ###############
        for index, run in enumerate(runs, 1):
            label = f"{run.arm} seed {run.seed}" + (f" ({run.agents[0]})" if len(run.agents) == 1 else "")
            if run.done:
                logger.info("[%d/%d] %s: done, skipped.", index, len(runs), label)
                continue
            if report_only:
                continue
            logger.info("[%d/%d] %s: training in %s", index, len(runs), label, run.directory)
            try:
                record = _train(config, run, run_recipe(config, run, recipe))
                start = time.perf_counter()
                models = [(record["models"][a], a, by_name[a], run.directory / "eval" / a) for a in run.agents]
                paths = _evaluate(config, models, run.directory / "eval.log")
                results = {agent: str(path) for agent, path in zip(run.agents, paths)}
            except RunFailed as error:
                failures[label] = str(error)
                logger.error("[%d/%d] %s failed: %s", index, len(runs), label, error)
                continue
            done = {**record, "eval_s": round(time.perf_counter() - start, 1), "results": results}
            done.update(arm=run.arm, seed=run.seed, agents=list(run.agents), load_average=_load_average())
            write_text_atomic(run.directory / DONE_NAME, json.dumps(done, indent=2) + "\n")
            logger.info("[%d/%d] %s: done in %.0f s.", index, len(runs), label, done["train_s"] + done["eval_s"])
    except (_Stop, KeyboardInterrupt) as stop:
        logger.warning("Study stopped (%s); run the same command again to continue.", stop or "SIGINT")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    return write_report(config, runs, before_results, baseline_of, failures, time.perf_counter() - started, load_start)


def write_report(
    config: StudyConfig,
    runs: Sequence[Run],
    before_results: Mapping[str, Path],
    baseline_of: Mapping[str, str],
    failures: Mapping[str, str],
    wall_s: float,
    load_start: Sequence[float],
) -> dict[str, Any]:
    """Read every finished run and write `results.json`, `results.md` and `accuracy_vs_compute.png`."""
    output_dir = Path(config.output_dir)
    before = {
        agent: per_question_scores(before_results[base])
        for agent, base in baseline_of.items()
        if base in before_results
    }
    scores: dict[str, dict[str, dict[int, dict[str, float]]]] = {}
    tokens: dict[str, dict[str, dict[int, float]]] = {}
    finished, missing = [], []
    for run in runs:
        if not run.done:
            missing.append(f"{run.arm}/seed{run.seed}" + (f"/{run.agents[0]}" if len(run.agents) == 1 else ""))
            continue
        done = json.loads((run.directory / DONE_NAME).read_text(encoding="utf-8"))
        finished.append({"arm": run.arm, "seed": run.seed, "directory": str(run.directory), **done})
        for agent in run.agents:
            scores.setdefault(run.arm, {}).setdefault(agent, {})[run.seed] = per_question_scores(
                done["results"][agent]
            )
            tokens.setdefault(run.arm, {}).setdefault(agent, {})[run.seed] = done["generated_tokens"][agent]
    rows = summarize_study(
        scores,
        before,
        baseline_of,
        baseline=config.baseline,
        tokens=tokens,
        confidence=config.confidence,
        n_resamples=config.n_resamples,
    )
    table = format_study_table(rows, baseline=config.baseline, confidence=config.confidence)
    plot = None
    if rows:
        plot = render_accuracy_vs_compute(
            rows,
            output_dir / "accuracy_vs_compute.png",
            title=f"Held-out accuracy vs training compute ({config.recipe})",
        )
    results = {
        "recipe": config.recipe,
        "arms": config.arms,
        "seeds": config.seeds,
        "overrides": config.overrides,
        "baseline": config.baseline,
        "evaluation": config.evaluation,
        "confidence": config.confidence,
        "n_resamples": config.n_resamples,
        "rows": [row.to_dict() for row in rows],
        "runs": finished,
        "missing_runs": missing,
        "failures": dict(failures),
        "plot": str(plot) if plot else None,
        "wall_s": round(wall_s, 1),
        "train_s": round(sum(run.get("train_s", 0.0) for run in finished), 1),
        "eval_s": round(sum(run.get("eval_s", 0.0) for run in finished), 1),
        "load_average": {"start": list(load_start), "end": _load_average()},
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
    write_text_atomic(output_dir / "results.json", json.dumps(results, indent=2) + "\n")
    write_text_atomic(output_dir / "results.md", _results_markdown(results, table))
    return results


def _results_markdown(results: Mapping[str, Any], table: str) -> str:
    arms = "; ".join(f"`{arm}`: {keys or 'the recipe as written'}" for arm, keys in results["arms"].items())
    lines = [
        "# ILR study: each agent alone on held-out questions, after training in each arm",
        "",
        f"Recipe `{results['recipe']}`, changed in every arm by {results['overrides'] or 'nothing'}; arms: {arms}. "
        f"Seeds {results['seeds']}.",
        "",
        table,
        "",
        "Accuracy: mean over seeds and questions; intervals: percentile bootstrap resampling seeds and questions "
        f"independently ({results['n_resamples']:,} draws); differences are paired on the same questions, each arm's "
        "seeds resampled on their own. Generated tokens: all tokens the agent sampled in training (for ILR: share, "
        "analyses and fuse), mean over seeds.",
        "",
        f"Wall time {results['wall_s'] / 60:.1f} min this invocation (all finished runs: training "
        f"{results['train_s'] / 60:.1f} min, evaluation {results['eval_s'] / 60:.1f} min) on {results['cores']} "
        f"core(s); load average {results['load_average']['start']} at start, {results['load_average']['end']} at the "
        "end.",
    ]
    if results["missing_runs"]:
        lines += ["", f"Not finished yet ({len(results['missing_runs'])}): {', '.join(results['missing_runs'])}."]
    if results["failures"]:
        lines += [
            "",
            "Failed: " + "; ".join(f"{run}: {error.splitlines()[0]}" for run, error in results["failures"].items()),
        ]
    if results["plot"]:
        lines += ["", f"![Accuracy vs compute]({Path(results['plot']).name})"]
    return "\n".join(lines) + "\n"


def report(text: str) -> None:
    """Everything the study prints for its user goes through here."""
    print(text, flush=True)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse `ilr study` flags."""
    parser = argparse.ArgumentParser(prog="ilr study", description="ILR vs GRPO with ablations, over seeds.")
    parser.add_argument(
        "--config", required=True, help="study config (e.g. recipes/demo/study/study_smollm2_cpu.yaml)"
    )
    parser.add_argument("--output_dir", help="study folder (default: the config's)")
    parser.add_argument("--seeds", help="comma list of seeds (default: the config's)")
    parser.add_argument("--arms", help="comma list of arms of the config to run (default: all)")
    parser.add_argument("--threads", type=int, help="torch threads per process (default: the config's)")
    parser.add_argument("--report_only", action="store_true", help="write the table from the runs finished so far")
    return parser.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """
    `ilr study` (and `make study`): run or resume a study, then print its table.

    Args:
        argv (`Sequence[str]`, *optional*):
            Arguments; defaults to `sys.argv[1:]`.

    Returns:
        `int`: 0 when every run finished, 1 when some failed (the others are reported).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_evaluate"]:
        return _evaluate_requests(argv[1])
    options = parse_args(argv)
    config = load_study_config(
        options.config,
        output_dir=options.output_dir,
        seeds=[int(s) for s in options.seeds.split(",")] if options.seeds else None,
        threads=options.threads,
    )
    if options.arms:
        wanted = options.arms.split(",")
        unknown = [arm for arm in wanted if arm not in config.arms]
        if unknown:
            raise StudyConfigError(f"--arms: {unknown} not in the config's arms {list(config.arms)}.")
        config.arms = {arm: config.arms[arm] for arm in wanted}  # without the baseline: no paired column
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO,
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    try:
        results = run_study(config, report_only=options.report_only)
    except _Stop:
        return 128 + signal.SIGTERM  # the shell's code for a signal: schedulers see the study as interrupted
    report((Path(config.output_dir) / "results.md").read_text(encoding="utf-8"))
    return 1 if results["failures"] else 0


# The evaluation child imports this module again under forkserver-based reward pools: keep the guard.
if __name__ == "__main__":
    sys.exit(main())
