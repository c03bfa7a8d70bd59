r"""A short ILR run of realistic shape on one GPU, with nothing downloaded: throughput, time split, memory and MFU.

    python benchmarks/gpu_check.py                                  # one H100: about 10 minutes (--time_budget_s)
    python benchmarks/gpu_check.py --dry_run                        # shapes, parameter count and plan; no run
    python benchmarks/gpu_check.py --device cpu --tiny --steps 1    # the same code path, tiny, on CPU (the test)

Two agents, each a randomly initialised Llama-architecture model of Qwen2.5-0.5B's scale, built from a config (hidden
1024, 24 layers, 16 query / 8 key-value heads, MLP 4096, tied embeddings, a 151,936-row vocabulary: ~0.5B
parameters), with the byte-level BPE tokenizer `ilr.testing` builds in code. That tokenizer knows ~1.9k tokens: the
embedding rows above it are padding, as in Qwen's checkpoints, and generation is kept off them (`suppress_tokens`), so
sampled text decodes and the peers' prompts have realistic lengths. Completions have a fixed length (EOS masked until
`max_completion_length`, `min_new_tokens`).

The run: `ILRTrainer`, bf16 weights and autocast, the transformers generation backend, Idea3 in `cooperate` mode with
calibration, every stage trained (share, analyse with G analyses, fuse). Reported per step (`gpu_check.json`, rewritten
after every step so a run cut short keeps what it measured, and a table on stdout):

- wall time and its split (generation, scoring, update) from the trainer's own `time/*` metrics;
- generated tokens and generated tokens per second of generation;
- backend calls (must be stages x agents);
- `torch.cuda.max_memory_allocated` (peak over the run, and after the models were built);
- model FLOPs utilisation of the update: `6 * params * trained tokens / update time / peak bf16 FLOPs`, where trained
  tokens are the non-padding prompt + completion tokens of every trained sample of every agent (`mfu`), and a
  variant that charges the LM head only for the completion positions the loss scores (`mfu_lm_head_adjusted`). The
  update time includes the old-log-probability forward pass and the optimizer steps, so both are conservative.
  Peak FLOPs come from the device name (H100 SXM 989 TFLOPs dense bf16, H100 PCIe 756, H100 NVL 835, H200 989,
  A100 312) or `--peak_tflops`.

Needs torch, transformers, accelerate, datasets, trl and this package (`pip install -e . --no-deps` from the repo copy,
or wheels); `HF_HUB_OFFLINE=1` is set, nothing is fetched.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


STAGES = ("share", "analyse", "fuse")
# Dense bf16 tensor-core peaks, in TFLOPs, by a substring of `torch.cuda.get_device_name()` (first match wins).
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
)
REALISTIC = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "vocab_size": 151936,
}
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 4096,
    "questions": 1,
    "num_generations": 2,
    "max_completion_length": 4,
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "warmup": 0,
}


# ---------------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu.")
    parser.add_argument("--tiny", action="store_true", help=f"Tiny shapes and sizes for a CPU smoke run: {TINY}.")
    parser.add_argument("--dry_run", action="store_true", help="Print shapes, parameter count and plan; no run.")
    parser.add_argument("--agents", type=int, default=2, help="Number of agents (m).")
    parser.add_argument("--steps", type=int, default=6, help="Timed steps (fewer when --time_budget_s runs out).")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed steps first (CUDA kernels, allocator).")
    parser.add_argument("--time_budget_s", type=float, default=480.0, help="Start no step that would end past this.")
    parser.add_argument("--questions", type=int, default=8, help="Questions per step (Q).")
    parser.add_argument("--num_generations", type=int, default=8, help="Group size G (and analyses per question).")
    parser.add_argument("--max_completion_length", type=int, default=256, help="New tokens per completion.")
    # 8 x 8 = one optimizer step per trained stage, as Q x G = 64 completions; 8 rows of ~1.7k tokens bound activations.
    parser.add_argument("--per_device_train_batch_size", type=int, default=8)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=8)
    parser.add_argument("--hidden_size", type=int, default=REALISTIC["hidden_size"])
    parser.add_argument("--intermediate_size", type=int, default=REALISTIC["intermediate_size"])
    parser.add_argument("--num_hidden_layers", type=int, default=REALISTIC["num_hidden_layers"])
    parser.add_argument("--num_attention_heads", type=int, default=REALISTIC["num_attention_heads"])
    parser.add_argument("--num_key_value_heads", type=int, default=REALISTIC["num_key_value_heads"])
    parser.add_argument("--vocab_size", type=int, default=REALISTIC["vocab_size"], help="Model rows (padded).")
    parser.add_argument("--attn_implementation", default="sdpa")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--peak_tflops", type=float, default=None, help="Peak bf16 TFLOPs (default: from the name).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="outputs/gpu_check")
    args = parser.parse_args(argv)
    if args.tiny:
        explicit = {arg.split("=")[0].lstrip("-") for arg in (argv if argv is not None else sys.argv[1:])}
        for key, value in TINY.items():
            if key not in explicit:  # a flag given next to --tiny wins
                setattr(args, key, value)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.agents < 2:
        parser.error(f"--agents must be >= 2 (got {args.agents}).")
    if args.num_generations < 2:
        parser.error(f"--num_generations must be >= 2 (got {args.num_generations}).")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1 (got {args.steps}).")
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Models and tokenizer, built in code
# ---------------------------------------------------------------------------------------------------------------------
def build_tokenizer(max_length: int) -> Any:
    """The ChatML byte-level BPE tokenizer of `ilr.testing` (tiny model A's recipe, the largest vocabulary its corpus
    gives: ~1.9k tokens)."""
    from ilr.testing import TINY_MODEL_A, _build_tokenizer

    return _build_tokenizer(dataclasses.replace(TINY_MODEL_A, vocab_size=32000, max_position_embeddings=max_length))


def model_config(args: argparse.Namespace, tokenizer: Any, max_length: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=max(args.vocab_size, len(tokenizer)),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads,
        max_position_embeddings=max_length,
        tie_word_embeddings=True,
        rope_theta=1_000_000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_model(config: Any, tokenizer: Any, *, dtype: Any, device: str, seed: int, attn_implementation: str) -> Any:
    """A randomly initialised causal LM, created directly on `device` in `dtype`."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    config = config.__class__.from_dict(config.to_dict())
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            model = LlamaForCausalLM(config).to(dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return model


def parameter_counts(config: Any) -> dict[str, int]:
    """Total parameters (tied embeddings once) and the embedding / LM-head share, without allocating weights."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "embedding": model.get_input_embeddings().weight.numel()}


def peak_bf16_flops(device_name: str, override_tflops: float | None) -> tuple[float | None, str]:
    if override_tflops:
        return override_tflops * 1e12, "--peak_tflops"
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops * 1e12, f"table ({key})"
    return None, "unknown device: pass --peak_tflops"


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------
def training_config(args: argparse.Namespace, *, bf16: bool, generation_kwargs: dict[str, Any]) -> Any:
    """The run's ILR settings: Idea3 in `cooperate` mode, every stage trained, the transformers backend."""
    from ilr.configs import ILRConfig

    batch = args.questions * args.num_generations
    return ILRConfig(
        output_dir=args.output_dir,
        use_cpu=not args.device.startswith("cuda"),
        bf16=bf16,
        report_to="none",
        disable_tqdm=True,
        gradient_checkpointing=args.gradient_checkpointing,
        num_generations=args.num_generations,
        generation_batch_size=batch,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        num_iterations=1,
        max_completion_length=args.max_completion_length,
        max_analysis_length=args.max_completion_length,
        analysis_samples=args.num_generations,
        generation_kwargs=generation_kwargs,
        temperature=1.0,
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        loss_type="dapo",
        scale_rewards="group",
        beta=0.0,
        max_steps=args.warmup + args.steps,
        save_strategy="no",
        seed=args.seed,
        method="ilr",
        interaction_mode="cooperate",
        train_stages=list(STAGES),
        calibration=True,
        generation_backend="transformers",
    )


def agent_configs(args: argparse.Namespace, bf16: bool) -> list[Any]:
    from ilr.configs import AgentConfig

    dtype = "bfloat16" if bf16 else "float32"
    return [
        AgentConfig(model_name_or_path=f"random-init/agent{i + 1}", name=f"agent{i + 1}", dtype=dtype)
        for i in range(args.agents)
    ]


def predicted_memory(args: argparse.Namespace, config: Any, gpu_memory_bytes: int) -> dict[str, Any]:
    """
    `ilr plan`'s prediction for this run (one process, AdamW, the transformers backend), without its fixed runtime
    reserve, which `torch.cuda.max_memory_allocated` does not see either: the first GPU run checks the plan.
    """
    from ilr.plan import GB, PHASES, TRAINING_RUNTIME_GB, Distribution, Hardware, ModelShape, build_plan

    bf16 = args.device.startswith("cuda") or not args.tiny
    agents = agent_configs(args, bf16)
    shape = ModelShape.from_config(config)
    plan = build_plan(
        agents,
        training_config(args, bf16=bf16, generation_kwargs={}),
        {agent.model_name_or_path: shape for agent in agents},
        Distribution(),
        Hardware(num_gpus=1, gpu_memory_gb=gpu_memory_bytes / GB),
        question_tokens=32,  # the toy questions are short
    )
    phases = {phase: plan.total("training GPU", phase) - int(TRAINING_RUNTIME_GB * GB) for phase in PHASES}
    peak_phase = max(phases, key=phases.get)
    return {
        "peak_gib": phases[peak_phase] / 2**30,
        "peak_phase": peak_phase,
        "phases_gib": {phase: value / 2**30 for phase, value in phases.items()},
        "terms_gib": {f"{t.agent}: {t.name}": t.bytes / 2**30 for t in plan.terms if t.setting != "-"},
    }


# ---------------------------------------------------------------------------------------------------------------------
def toy_rows(count: int) -> list[dict[str, Any]]:
    return [
        {"id": str(i), "problem": f"What is {i} + {2 * i + 1}? Explain each step.", "answer": str(3 * i + 1),
         "task": "math", "source": "gpu_check"}
        for i in range(count)
    ]  # fmt: skip


def digits_reward(completions: list, **kwargs: Any) -> list[float]:
    return [sum(char.isdigit() for char in text) / max(1, len(text)) for text in completions]


def trained_tokens(transcript: Any, stages: Sequence[str]) -> dict[str, int]:
    """Non-padding tokens the update's forward/backward passes process, over all agents and trained stages."""
    prompt = completion = 0
    for stage in stages:
        for groups in transcript.groups[stage]:
            for group in groups:
                prompt += len(group.prompt_ids) * group.num_samples
                completion += sum(len(ids) for ids in group.completion_ids)
    return {"prompt": prompt, "completion": completion}


def run(args: argparse.Namespace, plan: dict[str, Any], output_path: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset

    from ilr.trainer import ILRTrainer

    cuda = args.device.startswith("cuda")
    bf16 = cuda or not args.tiny  # bf16 wherever it is fast; the CPU smoke run stays in fp32
    dtype = torch.bfloat16 if bf16 else torch.float32
    max_length = plan["max_position_embeddings"]
    tokenizer = build_tokenizer(max_length)
    config = model_config(args, tokenizer, max_length)
    started = time.perf_counter()
    models = [
        build_model(
            config,
            tokenizer,
            dtype=dtype,
            device=args.device,
            seed=args.seed + i,
            attn_implementation=args.attn_implementation,
        )
        for i in range(args.agents)
    ]
    tokenizers = [build_tokenizer(max_length) for _ in range(args.agents)]
    generation_kwargs: dict[str, Any] = {"min_new_tokens": args.max_completion_length}
    if config.vocab_size > len(tokenizer):
        generation_kwargs["suppress_tokens"] = list(range(len(tokenizer), config.vocab_size))
    training_args = training_config(args, bf16=bf16, generation_kwargs=generation_kwargs)
    agents = agent_configs(args, bf16)
    trainer = ILRTrainer(
        agents,
        training_args,
        Dataset.from_list(toy_rows(max(64, 4 * args.questions))),
        {"digits": digits_reward},
        models=models,
        tokenizers=tokenizers,
    )
    build_s = time.perf_counter() - started
    memory_after_build = torch.cuda.max_memory_allocated() if cuda else None

    calls = [0]
    for backend in trainer.backends:
        original = backend.generate

        def counted(*call_args: Any, _original: Any = original, **kwargs: Any) -> Any:
            calls[0] += 1
            return _original(*call_args, **kwargs)

        backend.generate = counted
    transcripts: list[Any] = []
    original_interact = trainer.interact

    def interact(*call_args: Any, **kwargs: Any) -> Any:
        transcripts.append(original_interact(*call_args, **kwargs))
        return transcripts[-1]

    trainer.interact = interact

    peak, peak_source = peak_bf16_flops(plan["device_name"], args.peak_tflops)
    params = plan["parameters"]
    report: dict[str, Any] = {**plan, "build_s": build_s, "peak_flops": peak, "peak_flops_source": peak_source}
    report["memory_after_build_bytes"] = memory_after_build
    steps: list[dict[str, Any]] = []
    budget_start = time.perf_counter()
    last_step_s = 0.0
    for step in range(1, args.warmup + args.steps + 1):
        elapsed = time.perf_counter() - budget_start
        if step > 1 and elapsed + last_step_s > args.time_budget_s:
            print(f"Stopping before step {step}: the time budget ({args.time_budget_s:.0f} s) would run out.")
            break
        calls[0] = 0
        if cuda:
            torch.cuda.synchronize()
        metrics = trainer.training_step(step)
        if cuda:
            torch.cuda.synchronize()
        last_step_s = metrics["time/step"]
        tokens = trained_tokens(transcripts[-1], STAGES)
        transcripts.clear()
        flops = 6 * params["total"] * (tokens["prompt"] + tokens["completion"])
        # The LM head (the tied embedding) runs only on the scored completion positions (`logits_to_keep`).
        flops_adjusted = 6 * (params["total"] - params["embedding"]) * (tokens["prompt"] + tokens["completion"])
        flops_adjusted += 6 * params["embedding"] * tokens["completion"]
        update_s = metrics["time/update"]
        record = {
            "step": step,
            "warmup": step <= args.warmup,
            "step_s": metrics["time/step"],
            "generation_s": metrics["time/generation"],
            "scoring_s": metrics["time/scoring"],
            "update_s": update_s,
            "generated_tokens": metrics["tokens/generated"],
            "generation_tokens_per_s": metrics["tokens/per_second"],
            "trained_prompt_tokens": tokens["prompt"],
            "trained_completion_tokens": tokens["completion"],
            "backend_calls": calls[0],
            "expected_backend_calls": len(STAGES) * args.agents,
            "mfu": flops / update_s / peak if peak else None,
            "mfu_lm_head_adjusted": flops_adjusted / update_s / peak if peak else None,
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        }
        steps.append(record)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}), flush=True)
        report["steps"] = steps
        report["summary"] = summarise(steps)
        output_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def summarise(steps: list[dict[str, Any]]) -> dict[str, Any]:
    timed = [record for record in steps if not record["warmup"]] or steps
    summary: dict[str, Any] = {"timed_steps": len(timed)}
    for key in ("step_s", "generation_s", "scoring_s", "update_s", "generated_tokens", "generation_tokens_per_s"):
        summary[key] = statistics.median(record[key] for record in timed)
    for key in ("mfu", "mfu_lm_head_adjusted"):
        values = [record[key] for record in timed if record[key] is not None]
        summary[key] = statistics.median(values) if values else None
    memory = [record["peak_memory_bytes"] for record in steps if record["peak_memory_bytes"] is not None]
    summary["peak_memory_gib"] = max(memory) / 2**30 if memory else None
    summary["calls_ok"] = all(record["backend_calls"] == record["expected_backend_calls"] for record in steps)
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """
    Build the models and run (or, with `--dry_run`, only plan) the GPU check; writes `<output_dir>/gpu_check.json`.

    Returns:
        `dict`: The report (the plan alone for `--dry_run`).
    """
    args = parse_args(argv)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(name, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible; use --device cpu --tiny for a smoke run.")
    # Longest sequence: a fuse prompt (template, m ideas, m analyses) plus its completion, with room to spare.
    max_length = max(1024, 4 * (args.agents + 1) * args.max_completion_length)
    tokenizer = build_tokenizer(max_length)
    config = model_config(args, tokenizer, max_length)
    parameters = parameter_counts(config)
    plan = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "settings": vars(args),
        "tokenizer_vocab": len(tokenizer),
        "model": {key: getattr(config, key) for key in REALISTIC},
        "max_position_embeddings": max_length,
        "parameters": parameters,
        "stages": list(STAGES),
    }
    gpu_memory = torch.cuda.get_device_properties(0).total_memory if cuda else 80 * 10**9
    plan["predicted_memory"] = predicted_memory(args, config, gpu_memory)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"{args.agents} agents x {parameters['total'] / 1e6:.1f}M parameters ({parameters['embedding'] / 1e6:.1f}M "
        f"embedding, tokenizer {len(tokenizer)} ids) on {plan['device_name']}; Q={args.questions} x "
        f"G={args.num_generations}, {args.max_completion_length} new tokens, {args.warmup}+{args.steps} steps."
    )
    predicted = plan["predicted_memory"]
    print(
        f"ilr plan predicts {predicted['peak_gib']:.2f} GiB allocated at the peak ({predicted['peak_phase']}; "
        f"{', '.join(f'{phase} {value:.2f}' for phase, value in predicted['phases_gib'].items())})."
    )
    if args.dry_run:
        (output_dir / "gpu_check_plan.json").write_text(json.dumps(plan, indent=2) + "\n", encoding="utf-8")
        return plan
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    report = run(args, plan, output_dir / "gpu_check.json")
    summary = report["summary"]

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}%"

    memory = "n/a" if summary["peak_memory_gib"] is None else f"{summary['peak_memory_gib']:.1f} GiB"
    print(
        "| device | step s | generation / scoring / update s | gen. tokens/step | gen. tokens/s | peak memory | "
        "ilr plan | MFU (update) | MFU, LM head adjusted | calls ok |\n|---|---|---|---|---|---|---|---|---|---|\n"
        f"| {plan['device_name']} | {summary['step_s']:.2f} | {summary['generation_s']:.2f} / "
        f"{summary['scoring_s']:.3f} / {summary['update_s']:.2f} | {summary['generated_tokens']:.0f} | "
        f"{summary['generation_tokens_per_s']:.0f} | {memory} | {predicted['peak_gib']:.1f} GiB | "
        f"{pct(summary['mfu'])} | "
        f"{pct(summary['mfu_lm_head_adjusted'])} | {summary['calls_ok']} |"
    )
    if not summary["calls_ok"]:
        raise SystemExit("Backend calls per step differ from stages x agents.")
    return report


if __name__ == "__main__":
    main()
