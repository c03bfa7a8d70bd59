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
import logging
import math
import os
import sys
from collections.abc import Sequence
from typing import Any


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
    import datasets
    import transformers
    from transformers import set_seed

    from ilr.hub import HubUnavailableError
    from ilr.rewards import get_reward_funcs, shutdown_reward_pool
    from ilr.trainer import ILRTrainer, TrainingInterrupted, latest_checkpoint

    ###############
    # Setup logging
    ###############
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    for name in ("ilr", __name__):
        logging.getLogger(name).setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.info("Agents: %s", [f"{agent.name} ({agent.model_name_or_path})" for agent in agents_args.agents])
    logger.info("Training/evaluation parameters %s", training_args)
    set_seed(training_args.seed)
    if int(os.environ.get("RANK", "0")) == 0:
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

    ###############
    # Train
    ###############
    trainer = None
    try:
        if training_args.method == "grpo":
            return [train_grpo_baseline(agents_args.agents[0], training_args, train_dataset, reward_funcs, resume)]
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
        logger.info("Last step: reward %.4f", metrics.get("train/reward", float("nan")))

        ###############
        # Save the final models, one folder per agent
        ###############
        folders = trainer.save_models()
        logger.info("Models saved to %s", [str(folder) for folder in folders])

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
    )
    trainer.train(resume_from_checkpoint=resume)
    folder = os.path.join(training_args.output_dir, agent.name)
    trainer.save_model(folder)
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


def matched_generations(training_args: Any, questions: int, num_processes: int) -> tuple[int, int]:
    """
    Completions per question of a compute-matched baseline ([`compute_matched_args`]), and the ILR agent's token
    budget per question they match.

    Args:
        training_args ([`~ilr.configs.ILRConfig`]):
            The recipe's settings.
        questions (`int`):
            Questions per step (all processes).
        num_processes (`int`):
            Training processes: the generation batch must split into their micro-batches.

    Returns:
        `tuple[int, int]`: completions per question, and the budget in tokens.
    """
    group, length = training_args.num_generations, training_args.max_completion_length
    analysis_length = training_args.max_analysis_length or length
    fuse = group if "fuse" in training_args.train_stages else 1  # as `ILRTrainer` samples it
    budget = (group + fuse) * length + training_args.analysis_samples * analysis_length  # per question and agent
    micro_batch = training_args.per_device_train_batch_size * num_processes
    matched = math.ceil(budget / length)
    while questions * matched % micro_batch:
        matched += 1
    return matched, budget


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
    from ilr.configs import parse_recipe
    from ilr.trainer import TrainingInterrupted

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        main(*parse_recipe(argv), recipe_path=_config_path(argv))
    except TrainingInterrupted as stop:
        logger.warning("Training %s", stop)
        return 128 + stop.signum
    return 0


def _config_path(argv: Sequence[str]) -> str | None:
    for index, arg in enumerate(argv):
        if arg == "--config" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


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
