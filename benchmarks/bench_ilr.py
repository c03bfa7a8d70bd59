r"""The cost of interaction, measured side by side: plain TRL GRPO steps vs ILR steps with 2 and 3 agents.

    python benchmarks/bench_ilr.py                      # default sizes, a few minutes on 2 CPU cores
    python benchmarks/bench_ilr.py --quick              # smoke run (seconds), as the test does

One run measures these configurations on the same model (default: the tiny random `ilr.testing.TINY_MODEL_A`, built
on the fly; `--model` a local folder such as the demo's SmolLM2-135M; every ILR agent is a copy of it), with the same
questions per step, group size, completion length, temperature, reward function, optimizer settings and threads:

    trl_grpo      TRL's `GRPOTrainer` (CPU, fp32): one generation batch of Q x G completions and one optimizer step
    ilr_m2        `ILRTrainer`, 2 agents, Idea3 in `cooperate` mode, calibration on, every stage trained (share,
                  analyse with G analyses, fuse): per step 3 stages x 2 agents generate Q x G completions each
    trl_same_m2   the same work as ilr_m2, done by TRL: every (stage, agent) batch of each ilr_m2 step replayed as
                  one `GRPOTrainer` step with that batch's exact prompts (chat messages), G and completion length
    ilr_m2_vllm   ilr_m2 on colocated vLLM engines (needs `--model`: vLLM cannot serve the tiny model; its lengths
                  are not fixed, vLLM's sampler does not read `generation_kwargs`)
    ilr_m3        ilr_m2 with 3 agents; trl_same_m3 its same-work replay

Two ratios answer two questions. ILR / trl_grpo in seconds per generated token is what the method costs: an analyse
prompt carries every peer's idea, a fuse prompt every idea and analysis, so ILR processes ~20 prompt tokens per
generated token where TRL processes ~3. ILR / trl_same in seconds per step is what our implementation costs on top of
the work the method must do (target <= 1.10).

The configurations are interleaved (repeat 1: trl, m2, its replay, m3, ...), each repeat a fresh trainer with
`--warmup` untimed steps followed by `--steps` timed ones, so that drift of a shared machine hits all alike.

Completions have a fixed length: `generation_kwargs={"min_new_tokens": max_completion_length}` masks the EOS until the
limit, in TRL's generation config and in ILR's transformers backend alike (both read `generation_kwargs`). The tokens
actually generated are counted anyway, and the comparison is in seconds per generated token (ILR: all stages of all
agents).

What is timed:

- TRL: a step is `on_step_begin` -> `on_step_end` of a `TrainerCallback` (the trainer's `training_step`, clipping,
  optimizer and scheduler steps; the data loader's fetch and logging are outside). Generation is the time inside
  `GRPOTrainer._generate` (chat template, `model.generate`, decoding), scoring the time inside `_calculate_rewards`,
  update the rest of the step (advantages, padding, the loss forward/backward and the optimizer step).
- ILR: a step is one `ILRTrainer.training_step` call; the split is its own `time/generation` (questions, modes,
  Idea3), `time/scoring` (rewards, calibration, advantages) and `time/update` (per-agent GRPO updates).
- Backend calls: every `generate` call into each agent's generation backend is counted per step; ILR must make
  exactly stages x agents of them (one batched call per stage and agent), TRL one `_generate_single_turn`.

Where the time goes: per (stage, agent) batch, the prompt and generated tokens and generation seconds of ILR next to
the replay's generation and update seconds for the same batch, each agent's update seconds (all its stages), the
bytes each agent adds (parameters, gradients, optimizer state) and the process's peak RSS during each run.

Results go to `<output_dir>/bench_ilr.json` and `<output_dir>/bench_ilr.md`; the tables are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


TARGET_RATIO = 1.15
ILR_STAGES = ("share", "analyse", "fuse")
CONFIGS = ("trl_grpo", "ilr_m2", "trl_same_m2", "ilr_m2_vllm", "ilr_m3", "trl_same_m3")
SAME_WORK_TARGET = 1.10
# ILR on colocated vLLM engines (the CPU build here): eager, as the tests run it; Idea3's fuse prompts are long.
VLLM_SETTINGS = {"vllm_enforce_eager": True, "vllm_max_model_length": 4096}
QUICK = {
    "repeats": 1,
    "steps": 1,
    "warmup": 0,
    "questions": 1,
    "num_generations": 2,
    "max_completion_length": 4,
    "num_questions_in_data": 8,
}


# ---------------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3, help="Runs of --steps timed steps per configuration.")
    parser.add_argument("--steps", type=int, default=5, help="Timed steps per run.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed steps at the start of every run.")
    parser.add_argument("--questions", type=int, default=2, help="Questions per step (Q).")
    parser.add_argument("--num_generations", type=int, default=4, help="Group size G (and analyses per question).")
    parser.add_argument("--max_completion_length", type=int, default=16, help="New tokens per completion.")
    parser.add_argument("--num_questions_in_data", type=int, default=64, help="Rows of the toy training set.")
    parser.add_argument(
        "--model", default=None, help="A local model folder (e.g. the demo's SmolLM2); default: tiny model A, built."
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (and OMP_NUM_THREADS) for every run.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no_fixed_length", action="store_true", help="Let completions stop at EOS (default: EOS masked)."
    )
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS, help="Which to run.")
    parser.add_argument("--output_dir", default="outputs/bench", help="Where bench_ilr.json / .md are written.")
    parser.add_argument("--profile", action="store_true", help="cProfile the timed ILR steps (top functions).")
    parser.add_argument("--quick", action="store_true", help=f"Smoke-test sizes: {QUICK}.")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    for key in ("repeats", "steps", "questions", "threads", "max_completion_length", "num_questions_in_data"):
        if getattr(args, key) < 1:
            parser.error(f"--{key} must be >= 1 (got {getattr(args, key)}).")
    if args.num_generations < 2:
        parser.error(f"--num_generations must be >= 2, a GRPO group (got {args.num_generations}).")
    if "ilr_m2_vllm" in args.configs and args.model is None:
        parser.error("--configs ilr_m2_vllm needs --model: vLLM cannot serve the tiny model (head_dim 16).")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0 (got {args.warmup}).")
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Data and reward, shared by both trainers
# ---------------------------------------------------------------------------------------------------------------------
def toy_rows(count: int) -> list[dict[str, Any]]:
    """Two-number additions in the canonical schema of `ilr.data`."""
    return [
        {"id": str(i), "problem": f"What is {i} + {2 * i + 1}?", "answer": str(3 * i + 1), "task": "math",
         "source": "bench"}
        for i in range(count)
    ]  # fmt: skip


def digits_reward(completions: list, **kwargs: Any) -> list[float]:
    """Fraction of digit characters; cheap, so the benchmark measures the loops, not a verifier."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]  # TRL: chat messages, ILR: text
    return [sum(char.isdigit() for char in text) / max(1, len(text)) for text in texts]


def grpo_settings(args: argparse.Namespace, output_dir: str) -> dict[str, Any]:
    """The GRPO settings both trainers get (`GRPOConfig` for TRL, `ILRConfig` for ILR)."""
    batch = args.questions * args.num_generations
    settings = {
        "output_dir": output_dir,
        "use_cpu": True,
        "bf16": False,
        "report_to": "none",
        "disable_tqdm": True,
        "gradient_checkpointing": False,
        "num_generations": args.num_generations,
        "generation_batch_size": batch,
        "per_device_train_batch_size": batch,
        "gradient_accumulation_steps": 1,
        "num_iterations": 1,
        "max_completion_length": args.max_completion_length,
        "temperature": 1.0,
        "top_p": 1.0,
        "learning_rate": 1e-4,
        "lr_scheduler_type": "constant",
        "loss_type": "dapo",
        "scale_rewards": "group",
        "beta": 0.0,
        "max_steps": args.warmup + args.steps,
        "logging_steps": args.warmup + args.steps,
        "save_strategy": "no",
        "seed": args.seed,
        "dataloader_num_workers": 0,
    }
    if not args.no_fixed_length:
        settings["generation_kwargs"] = {"min_new_tokens": args.max_completion_length}
    return settings


# ---------------------------------------------------------------------------------------------------------------------
# Per-step records
# ---------------------------------------------------------------------------------------------------------------------
class StepProbe:
    """Collects one record per step: wall time, time split, generated/prompt tokens and backend calls."""

    def __init__(self) -> None:
        self.records: list[dict[str, float]] = []
        self.current: dict[str, float] | None = None
        self._start = 0.0

    def begin(self) -> None:
        self.current = {"generation_s": 0.0, "scoring_s": 0.0, "generated_tokens": 0, "prompt_tokens": 0, "calls": 0}
        self._start = time.perf_counter()

    def end(self) -> dict[str, float]:
        record = self.current
        record["step_s"] = time.perf_counter() - self._start
        self.records.append(record)
        self.current = None
        return record

    def add(self, key: str, value: float) -> None:
        if self.current is not None:  # calls outside a step (e.g. set-up) are not counted
            self.current[key] += value


def _wrap(owner: Any, name: str, after: Callable[[Any, float], None]) -> None:
    """Replace `owner.<name>` by a timed version that calls `after(result, seconds)`; only this instance."""
    original = getattr(owner, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = original(*args, **kwargs)
        after(result, time.perf_counter() - start)
        return result

    setattr(owner, name, timed)


# ---------------------------------------------------------------------------------------------------------------------
# The two trainers
# ---------------------------------------------------------------------------------------------------------------------
def run_trl(
    args: argparse.Namespace,
    model_path: str,
    workdir: str,
    settings: dict[str, Any] | None = None,
    dataset: Any = None,
) -> list[dict[str, float]]:
    """`--warmup` + `--steps` steps of TRL's `GRPOTrainer` (or `settings`' steps over `dataset`); one record per step."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from ilr.data import add_prompt_column

    probe = StepProbe()

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *unused: Any, **kwargs: Any) -> None:
            probe.begin()

        def on_step_end(self, *unused: Any, **kwargs: Any) -> None:
            probe.end()

    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_path),
        reward_funcs=digits_reward,
        args=GRPOConfig(**(settings or grpo_settings(args, os.path.join(workdir, "trl")))),
        train_dataset=dataset or add_prompt_column(Dataset.from_list(toy_rows(args.num_questions_in_data))),
        processing_class=AutoTokenizer.from_pretrained(model_path),
        callbacks=[StepTimer()],
    )
    trainer.remove_callback(PrinterCallback)  # the step timer stands in for the log lines

    def generated(result: Any, seconds: float) -> None:
        prompt_ids, completion_ids = result[0], result[1]
        probe.add("generation_s", seconds)
        probe.add("generated_tokens", sum(len(ids) for ids in completion_ids))
        probe.add("prompt_tokens", sum(len(ids) for ids in prompt_ids))

    _wrap(trainer, "_generate", generated)
    _wrap(trainer, "_generate_single_turn", lambda result, seconds: probe.add("calls", 1))
    _wrap(trainer, "_calculate_rewards", lambda result, seconds: probe.add("scoring_s", seconds))
    trainer.train()
    records = probe.records
    for record in records:
        record["update_s"] = record["step_s"] - record["generation_s"] - record["scoring_s"]
        record["expected_calls"] = 1
    return records


def run_ilr(
    args: argparse.Namespace,
    model_path: str,
    workdir: str,
    num_agents: int,
    profiler: Any = None,
    replay: list[list] | None = None,
    backend: str = "transformers",
) -> list[dict[str, Any]]:
    """
    `--warmup` + `--steps` ILR steps with `num_agents` copies of the model; one record per step, with one entry per
    (stage, agent) batch under `batches`. The batches' prompts are appended to `replay` when it is given.
    """
    from datasets import Dataset

    from ilr.configs import AgentConfig, ILRConfig
    from ilr.trainer import ILRTrainer

    config = ILRConfig(
        **grpo_settings(args, os.path.join(workdir, f"ilr_m{num_agents}")),
        method="ilr",
        interaction_mode="cooperate",
        train_stages=list(ILR_STAGES),
        analysis_samples=args.num_generations,
        max_analysis_length=args.max_completion_length,
        calibration=True,
        generation_backend=backend,
        **(VLLM_SETTINGS if backend == "vllm" else {}),
    )
    agents = [AgentConfig(model_name_or_path=model_path, name=f"agent{i + 1}") for i in range(num_agents)]
    trainer = ILRTrainer(
        agents, config, Dataset.from_list(toy_rows(args.num_questions_in_data)), {"digits": digits_reward}
    )

    probe = StepProbe()

    def counted(result: Any, seconds: float) -> None:
        probe.add("calls", 1)
        probe.add("backend_generated_tokens", result.num_generated_tokens)
        # Every sample of a prompt processes the prompt (as TRL's repeated prompts do).
        probe.add(
            "prompt_tokens", sum(len(ids) * len(group) for ids, group in zip(result.prompt_ids, result.completions))
        )

    for backend in trainer.backends:
        _wrap(backend, "generate", counted)
    transcripts: list[Any] = []
    _wrap(trainer, "interact", lambda transcript, seconds: transcripts.append(transcript))
    update_agent = trainer.update_agent

    def timed_update(agent_index: int, samples: list[Any]) -> dict[str, float]:
        start = time.perf_counter()
        metrics = update_agent(agent_index, samples)
        probe.current["update_s_by_agent"][agent_index] = time.perf_counter() - start
        return metrics

    trainer.update_agent = timed_update
    expected_calls = len(ILR_STAGES) * num_agents
    for step in range(1, args.warmup + args.steps + 1):
        timed = step > args.warmup
        probe.begin()
        probe.current["backend_generated_tokens"] = 0
        probe.current["update_s_by_agent"] = [0.0] * num_agents
        if profiler is not None and timed:
            profiler.enable()
        metrics = trainer.training_step(step)
        if profiler is not None and timed:
            profiler.disable()
        record = probe.end()
        record["generation_s"] = metrics["time/generation"]
        record["scoring_s"] = metrics["time/scoring"]
        record["update_s"] = metrics["time/update"]
        record["generated_tokens"] = metrics["tokens/generated"]
        record["expected_calls"] = expected_calls
        record["batches"] = stage_batches(transcripts.pop())
        if record["backend_generated_tokens"] != record["generated_tokens"]:
            raise RuntimeError(
                f"ILR counted {record['generated_tokens']} generated tokens, its backends "
                f"{record['backend_generated_tokens']}: the token accounting is broken."
            )
    for record in probe.records:
        for batch in record["batches"]:
            batch_prompts = batch.pop("prompts")  # kept out of the JSON report
            if replay is not None:
                replay.append(batch_prompts)
    for backend in trainer.backends:
        backend.close()  # a vLLM engine holds its KV cache (and its engine process) until closed
    agent_state_mb = [state_megabytes(runtime.model, runtime.optimizer) for runtime in trainer.runtimes]
    for record in probe.records:
        record["agent_state_mb"] = agent_state_mb
    return probe.records


def state_megabytes(model: Any, optimizer: Any) -> float:
    """Parameters, gradients and optimizer state of one model, in MB: what each agent adds to the process."""
    import torch

    tensors = [*model.parameters(), *(p.grad for p in model.parameters() if p.grad is not None)]
    tensors += [value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]
    return sum(t.numel() * t.element_size() for t in tensors) / 1e6


def reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM); a no-op elsewhere."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float | None:
    """The process's peak resident memory since the last `reset_peak_rss`, in MB (Linux), else `None`."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    line = next((line for line in status.splitlines() if line.startswith("VmHWM:")), None)
    return int(line.split()[1]) / 1e3 if line else None


def stage_batches(transcript: Any) -> list[dict[str, Any]]:
    """One entry per (stage, agent) `generate` call of an ILR step: its prompts, group size and token/time usage."""
    batches = []
    for stage in transcript.stages:
        for agent, groups in enumerate(transcript.groups[stage]):
            usage = transcript.usage[stage][agent]
            batches.append(
                {
                    "stage": stage,
                    "agent": agent,
                    "prompts": [group.prompt for group in groups],
                    "num_generations": groups[0].num_samples,
                    "prompt_tokens": sum(len(g.prompt_ids) * g.num_samples for g in groups),
                    "generated_tokens": usage.generated_tokens,
                    "generation_s": usage.seconds,
                }
            )
    return batches


def run_trl_same_work(
    args: argparse.Namespace, model_path: str, workdir: str, ilr_records: list[dict[str, Any]], prompts: list[list]
) -> list[dict[str, float]]:
    """
    The same work as the ILR run of `ilr_records`, done by TRL's `GRPOTrainer`: one generation + update per (stage,
    agent) batch of every ILR step, with that batch's exact prompts (chat messages), group size and completion length.

    Returns one record per ILR step (its batches' TRL steps summed) and keeps the per-batch records under `batches`.
    """
    batches = [batch for record in ilr_records for batch in record["batches"]]
    shapes = {(len(batch_prompts), batch["num_generations"]) for batch, batch_prompts in zip(batches, prompts)}
    if len(shapes) != 1:
        raise RuntimeError(f"ILR batches of different shapes {sorted(shapes)}: one TRL trainer cannot replay them.")
    (num_prompts, group_size) = shapes.pop()
    from datasets import Dataset

    rows = [{"prompt": prompt} for batch_prompts in prompts for prompt in batch_prompts]
    settings = {
        **grpo_settings(args, workdir),
        "num_generations": group_size,
        "generation_batch_size": num_prompts * group_size,
        "per_device_train_batch_size": num_prompts * group_size,
        "max_steps": len(batches),
        "logging_steps": len(batches),
        "shuffle_dataset": False,  # TRL step k replays ILR batch k
    }
    steps = run_trl(args, model_path, workdir, settings=settings, dataset=Dataset.from_list(rows))
    per_step = len(ilr_records[0]["batches"])
    records = []
    for index, ilr_record in enumerate(ilr_records):
        own = steps[index * per_step : (index + 1) * per_step]
        record = {key: sum(step[key] for step in own) for key in own[0] if key != "expected_calls"}
        record["expected_calls"] = per_step
        record["batches"] = [
            {"stage": batch["stage"], "agent": batch["agent"], **step}
            for batch, step in zip(ilr_record["batches"], own)
        ]
        records.append(record)
    return records


# ---------------------------------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------------------------------
def _quantiles(values: Sequence[float]) -> dict[str, float]:
    values = sorted(values)
    if len(values) >= 2:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q1 = q3 = values[0]
    return {"median": statistics.median(values), "q1": q1, "q3": q3, "min": values[0], "max": values[-1]}


def summarise(runs: list[list[dict[str, float]]], warmup: int) -> dict[str, Any]:
    """Statistics over the timed steps of every repeat of one configuration."""
    timed_runs = [run[warmup:] for run in runs]
    steps = [record for run in timed_runs for record in run]
    for record in steps:
        record["seconds_per_token"] = record["step_s"] / max(record["generated_tokens"], 1)
        record["tokens_per_s"] = record["generated_tokens"] / record["step_s"]
    calls = sorted({int(record["calls"]) for record in steps})
    expected = int(steps[0]["expected_calls"])
    summary = {
        "timed_steps": len(steps),
        "step_s": _quantiles([r["step_s"] for r in steps]),
        "generated_tokens_per_step": _quantiles([r["generated_tokens"] for r in steps]),
        "prompt_tokens_per_step": _quantiles([r["prompt_tokens"] for r in steps]),
        "tokens_per_s": _quantiles([r["tokens_per_s"] for r in steps]),
        "seconds_per_token": _quantiles([r["seconds_per_token"] for r in steps]),
        "time_split_s": {
            part: statistics.median(r[f"{part}_s"] for r in steps) for part in ("generation", "scoring", "update")
        },
        "calls_per_step": calls,
        "expected_calls_per_step": expected,
        "calls_ok": calls == [expected],
        "per_repeat_step_s": [statistics.median(r["step_s"] for r in run) for run in timed_runs],
        "per_repeat_seconds_per_token": [
            statistics.median(r["step_s"] / max(r["generated_tokens"], 1) for r in run) for run in timed_runs
        ],
        "steps": steps,
    }
    return summary


def add_ratios(results: dict[str, dict[str, Any]]) -> None:
    """ILR / TRL in seconds per generated token: of the medians, and per repeat (same repeat, adjacent in time)."""
    if "trl_grpo" not in results:
        return
    baseline = results["trl_grpo"]
    for summary in results.values():
        summary["ratio_vs_trl"] = summary["seconds_per_token"]["median"] / baseline["seconds_per_token"]["median"]
        per_repeat = [
            own / base
            for own, base in zip(summary["per_repeat_seconds_per_token"], baseline["per_repeat_seconds_per_token"])
        ]
        summary["ratio_vs_trl_per_repeat"] = per_repeat
        summary["ratio_vs_trl_range"] = [min(per_repeat), max(per_repeat)]


def add_same_work_ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """ILR / same-work TRL in seconds per step: of the medians, and per repeat (each ILR run against its replay)."""
    ratios = {}
    for name, summary in results.items():
        same = results.get(f"trl_same_{name.removeprefix('ilr_')}") if name.startswith("ilr_") else None
        if same is None:
            continue
        summary["ratio_vs_same_work"] = ratios[name] = summary["step_s"]["median"] / same["step_s"]["median"]
        per_repeat = [own / base for own, base in zip(summary["per_repeat_step_s"], same["per_repeat_step_s"])]
        summary["ratio_vs_same_work_range"] = [min(per_repeat), max(per_repeat)]
    return ratios


def stage_table(results: dict[str, dict[str, Any]]) -> str:
    """Where the time goes: per (stage, agent) batch, medians over the timed steps, ILR next to its same-work replay."""
    header = (
        "| config | stage | agent | prompt tokens | gen. tokens | generation s | TRL replay: generation / update s | "
        "ILR update s (agent, all stages) | agent state MB | peak RSS MB (process) |"
    )
    lines = [header, "|" + "|".join(["---"] * (header.count("|") - 1)) + "|"]
    for name, summary in results.items():
        if not name.startswith("ilr_"):
            continue
        steps = summary["steps"]
        same = results.get(f"trl_same_{name.removeprefix('ilr_')}")
        for index, batch in enumerate(steps[0]["batches"]):
            agent = batch["agent"]

            def median(records: list[dict[str, Any]], key: str, index: int = index) -> float:
                return statistics.median(record["batches"][index][key] for record in records)

            replay = "n/a"
            if same is not None:
                replay = f"{median(same['steps'], 'generation_s'):.3f} / {median(same['steps'], 'update_s'):.3f}"
            update = statistics.median(record["update_s_by_agent"][agent] for record in steps)
            rss = summary["peak_rss_mb"]
            lines.append(
                f"| {name} | {batch['stage']} | {agent + 1} | {median(steps, 'prompt_tokens'):.0f} "
                f"| {median(steps, 'generated_tokens'):.0f} | {median(steps, 'generation_s'):.3f} | {replay} "
                f"| {update:.3f} | {steps[0]['agent_state_mb'][agent]:.1f} | {'n/a' if rss is None else f'{rss:.0f}'} |"
            )
    return "\n".join(lines)


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    header = (
        "| config | step s, median [IQR] | gen. tokens/step | prompt tokens/step | gen. tokens/s | "
        "generation / scoring / update s | backend calls/step (expected) | ms per gen. token | ILR/TRL s per token "
        "[min-max over repeats] | ILR/same-work TRL s per step [min-max] | peak RSS MB |"
    )
    lines = [header, "|" + "|".join(["---"] * (header.count("|") - 1)) + "|"]
    for name, s in results.items():
        step = s["step_s"]
        split = s["time_split_s"]
        calls = ",".join(str(c) for c in s["calls_per_step"])
        flag = "" if s["calls_ok"] else " MISMATCH"
        ratio = "n/a"
        if "ratio_vs_trl" in s:
            low, high = s["ratio_vs_trl_range"]
            ratio = f"{s['ratio_vs_trl']:.2f} [{low:.2f}-{high:.2f}]"
        same_work = "n/a"
        if "ratio_vs_same_work" in s:
            low, high = s["ratio_vs_same_work_range"]
            same_work = f"{s['ratio_vs_same_work']:.2f} [{low:.2f}-{high:.2f}]"
        rss = "n/a" if s.get("peak_rss_mb") is None else f"{s['peak_rss_mb']:.0f}"
        lines.append(
            f"| {name} | {step['median']:.3f} [{step['q1']:.3f}-{step['q3']:.3f}] "
            f"| {s['generated_tokens_per_step']['median']:.0f} | {s['prompt_tokens_per_step']['median']:.0f} "
            f"| {s['tokens_per_s']['median']:.0f} "
            f"| {split['generation']:.3f} / {split['scoring']:.3f} / {split['update']:.3f} "
            f"| {calls} ({s['expected_calls_per_step']}){flag} "
            f"| {1000 * s['seconds_per_token']['median']:.3f} | {ratio} | {same_work} | {rss} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """
    Run the benchmark and write `bench_ilr.json` and `bench_ilr.md` into `--output_dir`.

    Args:
        argv (`Sequence[str]`, *optional*):
            Command-line arguments; defaults to `sys.argv[1:]`.

    Returns:
        `dict`: What `bench_ilr.json` holds.
    """
    args = parse_args(argv)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(name, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB per engine; unset, each claims most of the memory
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read by torch only if it is not imported yet
    import datasets
    import torch
    import transformers

    from ilr.testing import TINY_MODEL_A, build_tiny_model

    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()

    configs = [name for name in CONFIGS if name in args.configs]  # a same-work replay follows its ILR run
    runs: dict[str, list[list[dict[str, Any]]]] = {name: [] for name in configs}
    peak_rss: dict[str, list[float | None]] = {name: [] for name in configs}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_ilr_") as workdir:
        model_path = args.model or build_tiny_model(TINY_MODEL_A, os.path.join(workdir, "tiny_model_a")).path
        for repeat in range(args.repeats):
            replays: dict[str, list[list]] = {}
            for name in configs:
                run_started = time.perf_counter()
                run_dir = os.path.join(workdir, f"{name}_{repeat}")
                gc.collect()
                reset_peak_rss()
                if name == "trl_grpo":
                    records = run_trl(args, model_path, run_dir)
                elif name == "ilr_m2_vllm":
                    records = run_ilr(args, model_path, run_dir, 2, profiler, backend="vllm")
                elif name.startswith("ilr_"):
                    replays[name] = [] if f"trl_same_{name[4:]}" in configs else None
                    records = run_ilr(args, model_path, run_dir, int(name[-1]), profiler, replays[name])
                else:
                    ilr_name = f"ilr_{name.removeprefix('trl_same_')}"
                    records = run_trl_same_work(args, model_path, run_dir, runs[ilr_name][-1], replays[ilr_name])
                runs[name].append(records)
                peak_rss[name].append(peak_rss_mb())
                seconds = time.perf_counter() - run_started
                print(f"repeat {repeat + 1}/{args.repeats} {name}: {seconds:.1f} s", file=sys.stderr, flush=True)

    results = {name: summarise(name_runs, args.warmup) for name, name_runs in runs.items()}
    for name, summary in results.items():
        summary["peak_rss_mb"] = max((mb for mb in peak_rss[name] if mb is not None), default=None)
    add_ratios(results)
    same_work = add_same_work_ratios(results)
    ratios = {
        name: s["ratio_vs_trl"] for name, s in results.items() if name.startswith("ilr_") and "ratio_vs_trl" in s
    }
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": __import__("trl").__version__,
        },
        "settings": {
            **{key: value for key, value in vars(args).items() if key not in ("output_dir",)},
            "model": args.model or TINY_MODEL_A.name,
            "ilr_stages": list(ILR_STAGES),
            "interaction_mode": "cooperate",
            "calibration": True,
        },
        "wall_s": time.perf_counter() - started,
        "target_ratio": TARGET_RATIO,
        "ratios_vs_trl": ratios,
        "target_met": bool(ratios) and all(ratio <= TARGET_RATIO for ratio in ratios.values()),
        "same_work_target_ratio": SAME_WORK_TARGET,
        "ratios_vs_same_work": same_work,
        "same_work_target_met": bool(same_work) and all(ratio <= SAME_WORK_TARGET for ratio in same_work.values()),
        "calls_ok": all(s["calls_ok"] for s in results.values()),
        "configs": results,
    }
    table = markdown_table(results)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "bench_ilr.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    settings = report["settings"]
    caption = (
        f"{report['date']}, {report['machine']['processor']}, {report['machine']['cpu_count']} CPUs, "
        f"{report['machine']['torch_threads']} torch thread(s); Q={settings['questions']} questions x "
        f"G={settings['num_generations']}, {settings['max_completion_length']} new tokens, "
        f"{settings['repeats']} repeats x {settings['steps']} steps (+{settings['warmup']} warm-up)"
    )
    stages = stage_table(results)
    (output_dir / "bench_ilr.md").write_text(f"{caption}\n\n{table}\n\n{stages}\n", encoding="utf-8")
    print(caption)
    print(table)
    print(stages)
    verdict = "met" if report["target_met"] else "MISSED"
    print(f"Method cost, ILR/TRL s per generated token (target <= {TARGET_RATIO}): {verdict} ({ratios}).")
    if same_work:
        verdict = "met" if report["same_work_target_met"] else "MISSED"
        print(
            f"Implementation cost, ILR/same-work TRL s per step (target <= {SAME_WORK_TARGET}): {verdict} ({same_work})."
        )
    if profiler is not None:
        import pstats

        profile_path = output_dir / "bench_ilr.prof"
        profiler.dump_stats(profile_path)
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)
        print(f"Profile of the timed ILR steps: {profile_path}")
    if not report["calls_ok"]:
        raise SystemExit("Backend calls per step differ from stages x agents: see the table.")
    return report


if __name__ == "__main__":
    main()
