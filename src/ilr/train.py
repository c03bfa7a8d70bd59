"""Train agents with ILR, or the single-agent GRPO baseline, from one recipe.

    accelerate launch --config_file recipes/accelerate_configs/cpu.yaml src/ilr/train.py \\
        --config recipes/demo/ilr/config_smollm2_cpu.yaml
    python -m ilr.train --config recipes/demo/ilr/config_smollm2_cpu.yaml [--key value ...]
    ilr train --config recipes/demo/ilr/config_smollm2_cpu.yaml

`method: ilr` trains every agent of the recipe together with [`~ilr.trainer.ILRTrainer`]; `method: grpo` trains its
single agent with TRL's `GRPOTrainer` on the same data, prompt and rewards (the baseline). Final models are saved to
`<output_dir>/<agent name>`. A run whose `output_dir` already holds a checkpoint continues from it (as open-r1 does)
unless `resume_from_checkpoint` says otherwise.

Data (validation is needed only by `interaction_mode: dynamic` with `difficulty_source: self_rank`):

- `dataset_name: math_train`: the paper's MATH 11k/1k split without MATH-500 (`ilr.data.load_math_split`).
- a registered benchmark: `dataset_train_split` and `dataset_validation_split` of its Hub dataset.
- any other name: `question_column` / `answer_column` of that Hub dataset, or of the local `data_files`.
- local `data_files` hold one split: the validation questions are `ability_samples` rows held out of training
  (seeded by `seed`).
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ilr.recipe_check import flag_value


logger = logging.getLogger(__name__)


def load_data(script_args: Any, training_args: Any) -> tuple[Any, Any | None]:
    """
    Load the training questions (and the validation questions when Dynamic Interaction needs them).

    Args:
        script_args ([`~ilr.configs.ILRScriptArguments`]):
            Data settings of the recipe.
        training_args ([`~ilr.configs.ILRConfig`]):
            For `interaction_mode`, `difficulty_source`, `ability_samples` and `seed`.

    Returns:
        `tuple[datasets.Dataset, datasets.Dataset | None]`: training and validation rows in the canonical schema.
    """
    from ilr.data import BENCHMARKS, load_benchmark, load_custom_dataset, load_math_split
    from ilr.difficulty import needs_irt

    name, files = script_args.dataset_name, script_args.data_files
    wants_validation = needs_irt(training_args.interaction_mode) and training_args.difficulty_source == "self_rank"
    validation = None
    if name == "math_train":
        split = load_math_split(pool_files=files)
        train, validation = split["train"], split["validation"]
    elif name in BENCHMARKS:
        train = load_benchmark(name, data_files=files, split=script_args.dataset_train_split)
        if wants_validation and not files:
            validation = load_benchmark(name, split=script_args.dataset_validation_split)
    else:
        kwargs = {
            "question_column": script_args.question_column,
            "answer_column": script_args.answer_column,
            "answer_format": script_args.answer_format,
            "name": name,
        }
        if files:
            train = load_custom_dataset(files, **kwargs)
        else:
            train = load_custom_dataset(
                name, config=script_args.dataset_config, split=script_args.dataset_train_split, **kwargs
            )
            if wants_validation:
                validation = load_custom_dataset(
                    name, config=script_args.dataset_config, split=script_args.dataset_validation_split, **kwargs
                )
    if wants_validation and validation is None:
        # Local files are one split: hold the validation questions out of training.
        held_out = min(training_args.ability_samples, len(train) // 2)
        parts = train.train_test_split(test_size=held_out, seed=training_args.seed)
        train, validation = parts["train"], parts["test"]
        logger.info("Held out %d of the local questions as the validation set (ability gamma).", held_out)
    if script_args.max_train_samples is not None:
        train = train.select(range(min(script_args.max_train_samples, len(train))))
    return train, validation


def main(
    script_args: Any, agents_args: Any, training_args: Any, recipe_path: str | os.PathLike | None = None
) -> list[str]:
    """
    Train from parsed recipe objects (see [`~ilr.configs.parse_recipe`]).

    Args:
        script_args, agents_args, training_args:
            The recipe, parsed.
        recipe_path (`str` or `os.PathLike`, *optional*):
            The recipe file, embedded (credentials removed) in the model cards pushed with `push_to_hub`.

    Returns:
        `list[str]`: The folders the final models were saved to.

    Raises:
        `HubUnavailableError`: `push_to_hub` and a push still failed after its retries; the models are saved locally.
    """
    from ilr import console

    ###############
    # Setup logging: a quiet console (what runs, progress, warnings, result), the full log and the recipe on disk
    ###############
    main_process = int(os.environ.get("RANK", "0")) == 0
    created = console.setup(verbose=training_args.log_level if main_process else training_args.log_level_replica)
    output_dir = Path(training_args.output_dir)
    try:
        with console.log_file(output_dir / LOG_NAME, main_process=main_process) as log_path:
            if main_process:
                recipe = console.write_recipe(
                    output_dir / RECIPE_NAME, script_args, agents_args, training_args, source=recipe_path
                )
                line = describe_training(script_args, agents_args, training_args, log_path, recipe)
            else:
                line = None
            return _train(script_args, agents_args, training_args, recipe_path, line)
    finally:
        if created:  # called as a library function (tests, scripts): leave no handler behind
            console.teardown()


# Written to `output_dir` by every run: the full log, and the resolved recipe (credentials removed).
LOG_NAME = "train.log"
RECIPE_NAME = "recipe.yaml"


def describe_training(
    script_args: Any, agents_args: Any, training_args: Any, log_path: Path | None = None, recipe: Path | None = None
) -> str:
    """
    The one line a training run starts with: agents, steps, data, interaction, backend and device, output folder.

    Args:
        script_args, agents_args, training_args:
            The recipe, parsed.
        log_path (`pathlib.Path`, *optional*):
            The log file, named in the line.
        recipe (`pathlib.Path`, *optional*):
            The resolved recipe file, named in the line.

    Returns:
        `str`: The line.
    """
    from ilr.console import describe_run

    agents = agents_args.agents
    models = sorted({agent.model_name_or_path for agent in agents})
    labels = (
        [agent.name for agent in agents] if len(models) == 1 else [f"{a.name}={a.model_name_or_path}" for a in agents]
    )
    data = script_args.dataset_name
    if script_args.data_files:
        files = script_args.data_files if isinstance(script_args.data_files, list) else [script_args.data_files]
        data += f" ({', '.join(str(f) for f in files)})"
    if training_args.method == "grpo":
        what, extra = "GRPO baseline (TRL)", None
    else:
        what = "ILR training"
        mode = training_args.interaction_mode
        if mode == "dynamic":
            mode += f" ({training_args.difficulty_source})"
        extra = f"interaction {mode}, trained stages {', '.join(training_args.train_stages)}"
    if len(models) == 1:
        extra = f"from {models[0]}" + (f", {extra}" if extra else "")
    steps = training_args.max_steps if training_args.max_steps and training_args.max_steps > 0 else None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = "cpu" if training_args.use_cpu else "gpu"
    line = describe_run(
        what,
        models=labels,
        steps=steps,
        data=data,
        extra=extra,
        backend=training_args.generation_backend,
        device=f"{world} {device} processes" if world > 1 else device,
        output_dir=training_args.output_dir,
    )
    saved = [str(path.name) for path in (log_path, recipe) if path is not None]
    return line + (f" ({', '.join(saved)} there)" if saved else "")


def _train(script_args: Any, agents_args: Any, training_args: Any, recipe_path: Any, line: str | None) -> list[str]:
    """`main` once the console and the log file are set up; `line` (the main process's) is shown once the data loads,
    so that bad data stays a one-line error."""
    from transformers import set_seed

    from ilr.console import announce, format_duration
    from ilr.hub import HubUnavailableError
    from ilr.rewards import get_reward_funcs, shutdown_reward_pool
    from ilr.trainer import ILRTrainer, TrainingInterrupted, latest_checkpoint

    start = time.perf_counter()
    main_process = line is not None
    set_seed(training_args.seed)
    if main_process:
        from ilr.plan import warn_if_unfit

        # Before any model is loaded: the plan needs the models' configs only (`ilr plan` prints it in full).
        warn_if_unfit(agents_args.agents, training_args)
    ###############
    # Checkpoints
    ###############
    resume = training_args.resume_from_checkpoint
    if str(resume).lower() in ("true", "false"):  # YAML booleans arrive as strings
        resume = True if str(resume).lower() == "true" else None
    elif resume is None and (detected := latest_checkpoint(training_args.output_dir)) is not None:
        logger.info("Checkpoint detected, resuming training at %s.", detected)
        resume = str(detected)

    ###############
    # Load data and rewards
    ###############
    train_dataset, validation_dataset = load_data(script_args, training_args)
    reward_funcs = get_reward_funcs(
        script_args.reward_funcs,
        allow_code_execution=script_args.allow_code_execution,
        math_scoring=script_args.math_scoring,
    )
    logger.info("%d training questions; rewards %s", len(train_dataset), script_args.reward_funcs)
    if main_process:
        announce(line)

    ###############
    # Train
    ###############
    trainer = None
    try:
        if training_args.method == "grpo":
            folder = train_grpo_baseline(agents_args.agents[0], training_args, train_dataset, reward_funcs, resume)
            if main_process:
                announce("Done in %s. Model: %s.", format_duration(time.perf_counter() - start), folder, source=logger)
            return [folder]
        trainer = ILRTrainer(
            agents_args.agents,
            training_args,
            train_dataset,
            dict(zip(script_args.reward_funcs, reward_funcs)),
            eval_dataset=validation_dataset,
            dataset_name=script_args.dataset_name,
            data_files=script_args.data_files,
        )
        try:
            metrics = trainer.train(resume_from_checkpoint=resume)
        except TrainingInterrupted:
            _end_run(trainer)  # every process stopped at the same step, after the same checkpoint
            raise
        ###############
        # Save the final models, one folder per agent; the reward curve next to them
        ###############
        folders = trainer.save_models()
        logger.info("Models saved to %s", [str(folder) for folder in folders])
        if main_process:
            _report_result(trainer, training_args, folders, time.perf_counter() - start, metrics)

        ###############
        # Push each agent to its hub_model_id (checkpoints were queued as they were saved)
        ###############
        failed = trainer.push_final_models(folders, recipe_path)
        _end_run(trainer)
        if failed:
            raise HubUnavailableError(
                f"training finished and the models are saved in {[str(f) for f in folders]}, but {len(failed)} Hub "
                f"push(es) failed; the first: {failed[0]}"
            )
        return [str(folder) for folder in folders]
    finally:
        if trainer is not None:
            trainer.close_pushers()  # an interrupted run still delivers the checkpoints it queued
            for backend in trainer.backends:
                backend.close()  # vLLM engines hold their KV cache until closed (closing twice is a no-op)
        shutdown_reward_pool()


def _report_result(
    trainer: Any, training_args: Any, folders: Sequence[Any], elapsed_s: float, metrics: dict[str, float]
) -> None:
    """The last console line of a run: time, the reward at the start and at the end, where the models and curve are."""
    from ilr.console import announce, format_duration
    from ilr.curves import write_reward_curves

    output_dir = Path(training_args.output_dir)
    agents = [agent.name for agent in trainer.agents]
    curve = write_reward_curves(
        output_dir,
        agents,
        trained_stages=training_args.train_stages,
        title=f"ILR reward per step (trained: {', '.join(training_args.train_stages)})",
    )
    rewards = _reward_trend(output_dir / "metrics.jsonl")
    trend = f"; mean reward {rewards[0]:.3f} in the first steps, {rewards[1]:.3f} in the last" if rewards else ""
    last = metrics.get("train/reward", float("nan"))
    announce(
        "Done in %s: %d steps, last step's reward %.3f%s. Models: %s; curve: %s.",
        format_duration(elapsed_s),
        trainer.global_step,
        last,
        trend,
        ", ".join(str(folder) for folder in folders),
        curve or output_dir / "metrics.jsonl",
        source=logger,
    )


def _reward_trend(metrics_path: Path, window: int = 3) -> tuple[float, float] | None:
    """Mean `train/reward` of the first and of the last `window` logged steps (None with fewer than 2 windows)."""
    if not metrics_path.is_file():
        return None
    rewards = [
        record["train/reward"]
        for record in map(json.loads, metrics_path.read_text(encoding="utf-8").splitlines())
        if record.get("train/reward") is not None
    ]
    if len(rewards) < 2 * window:
        return None
    return sum(rewards[:window]) / window, sum(rewards[-window:]) / window


def _end_run(trainer: Any) -> None:
    """Close the generation backends, then end training: vLLM engines release process groups of the world that
    `end_training` destroys."""
    for backend in trainer.backends:
        backend.close()
    trainer.end_training()


def train_grpo_baseline(
    agent: Any, training_args: Any, train_dataset: Any, reward_funcs: list, resume: str | bool | None
) -> str:
    """
    The single-agent baseline: TRL's `GRPOTrainer` on the same rows, prompt (`add_prompt_column`) and rewards.

    Returns:
        `str`: The folder the final model was saved to, `<output_dir>/<agent name>`.
    """
    from trl import GRPOTrainer, get_peft_config

    from ilr.compute import GeneratedTokensCallback
    from ilr.data import add_prompt_column
    from ilr.models import load_model, load_tokenizer

    if training_args.compute_matched:
        training_args = compute_matched_args(training_args)
    overrides: dict[str, Any] = {}
    if training_args.push_to_hub and agent.hub_model_id:
        overrides["hub_model_id"] = agent.hub_model_id
    if training_args.hub_token:
        # The Trainer pickles its arguments into every checkpoint (`training_args.bin`) and pushes them: hand the token
        # to huggingface_hub through the environment instead, where it is read the same way.
        os.environ["HF_TOKEN"] = training_args.hub_token
        overrides["hub_token"] = None
    if overrides:  # `steps_per_generation` is derived again from `generation_batch_size`
        training_args = dataclasses.replace(training_args, steps_per_generation=None, **overrides)
    trainer = GRPOTrainer(
        model=load_model(agent),
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=add_prompt_column(train_dataset),
        processing_class=load_tokenizer(agent),
        peft_config=get_peft_config(agent),
        callbacks=[GeneratedTokensCallback()],
    )
    trainer.train(resume_from_checkpoint=resume)
    folder = os.path.join(training_args.output_dir, agent.name)
    trainer.save_model(folder)
    trainer.save_state()  # `trainer_state.json`: the log history, generated tokens included, outlives the checkpoints
    logger.info("Model saved to %s", folder)
    if training_args.push_to_hub:  # TRL's own push: the output folder, its model card, to `hub_model_id`
        trainer.push_to_hub(tags=["ilr-baseline", "grpo"])
    trainer.accelerator.end_training()  # as `ILRTrainer.end_training`: no process group left to interpreter exit
    return folder


def compute_matched_args(training_args: Any) -> Any:
    """
    The baseline's settings with as large a completion budget per question as one ILR agent gets.

    An ILR agent generates, per question, `num_generations` share completions and as many fuse completions (one when
    `fuse` is not in `train_stages`) of up to `max_completion_length` tokens, plus `analysis_samples` analyses of up to
    `max_analysis_length`: the baseline samples that many tokens' worth of completions instead (rounded up so that the
    generation batch still splits into micro-batches of `per_device_train_batch_size` on every process). The number of
    questions per step is unchanged; write the ILR recipe's `train_stages` and lengths into the baseline's recipe.

    Args:
        training_args ([`~ilr.configs.ILRConfig`]):
            The recipe's settings (`method: grpo`).

    Returns:
        [`~ilr.configs.ILRConfig`]: A copy with `num_generations` and `generation_batch_size` raised.
    """
    from ilr.compute import matched_generations  # imports transformers

    group, length = training_args.num_generations, training_args.max_completion_length
    questions = training_args.generation_batch_size // group
    matched, budget = matched_generations(training_args, questions, training_args.world_size)
    logger.info(
        "compute_matched: %d completions per question instead of %d (%d tokens at most, ILR: %d).",
        matched,
        group,
        matched * length,
        budget,
    )
    return dataclasses.replace(
        training_args,
        num_generations=matched,
        generation_batch_size=questions * matched,
        steps_per_generation=None,
        compute_matched=False,
    )


def cli_main(argv: Sequence[str] | None = None) -> int:
    """
    Parse a recipe (`--config`, CLI overrides) and train; the `ilr train` command.

    Args:
        argv (`Sequence[str]`, *optional*):
            Arguments; defaults to `sys.argv[1:]`.

    Returns:
        `int`: 0 on success; 128 + the signal number when SIGTERM/SIGINT stopped the run after a final checkpoint
        (the shell's code for a signal, so that schedulers see the job as interrupted, not finished).
    """
    from ilr import console

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--verbose" in argv:  # the console's switch; the recipe's own is `log_level`
        argv = [arg for arg in argv if arg != "--verbose"] + ["--log_level", "info"]
    # Before the libraries are imported: some speak at import time (DeepSpeed's accelerator probe).
    console.setup(verbose=flag_value(argv, "--log_level"))  # the recipe's own is applied once it is parsed

    from ilr.configs import parse_recipe
    from ilr.trainer import TrainingInterrupted

    try:
        main(*parse_recipe(argv), recipe_path=flag_value(argv, "--config"))
    except TrainingInterrupted as stop:
        logger.warning("Training %s", stop)
        return 128 + stop.signum
    finally:
        console.teardown()  # `ilr train` may run in-process (`ilr.cli.main` in tests): leave no handler behind
    return 0


def end_process(code: int) -> int:
    """
    The last call of a training process: in a process of a distributed launch, exit with `code` now, before
    interpreter finalisation; elsewhere return `code`.

    Gloo's worker threads free each finished collective's work object themselves, and with it the Python tensors it
    holds, which takes the GIL. When the main thread has already begun finalising the interpreter (the last collective
    returned, the script ended), Python stops such a thread inside C++ code that may not unwind, and the process
    aborts after all its work is done (SIGABRT, "terminate called without an active exception"; 1 in ~20 two-process
    runs here, also after `destroy_process_group`, which leaves gloo's threads running). So a process that a launcher
    started with `WORLD_SIZE` > 1 runs what a normal exit runs (atexit handlers, log and stream flushes) and leaves
    with `os._exit`.

    Args:
        code (`int`):
            The exit status.

    Returns:
        `int`: `code`, when the process was not part of a distributed launch.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        atexit._run_exitfuncs()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


# The reward pool starts worker processes with forkserver, which imports this module again: keep the guard.
if __name__ == "__main__":
    sys.exit(end_process(cli_main()))
